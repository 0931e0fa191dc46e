"""(document, summary, references) records from ACLSum, local files, or a `datasets` hub dataset.

Every source becomes a list of `Example`. Empty or missing fields are reported by row (with the
file's line number for JSONL), all of them at once, as a `DataError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lastmile.config import DataConfig, resolve_local_path, split_part
from lastmile.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True)
class Example:
    id: str
    document: str
    summary: str
    references: tuple[str, ...]  # at least one; the summary is the first when none were given


def load_split(cfg: DataConfig, split: str, limit: int | None = None) -> list[Example]:
    """The examples of `split` (a name, a file, or `<split>@dev` / `<split>@report`: one part of it by
    `data.dev_fraction`), the first `limit` of them when given."""
    split, part = split_part(split)
    if cfg.source == "aclsum":
        rows, where = _aclsum_rows(split, cfg.aclsum_aspect), "aclsum"
        field_cfg = DataConfig(id_field="id", document_field="document", summary_field="summary", references_field=None)
    elif cfg.source.startswith("hub:"):
        rows, where = _hub_rows(cfg.source[4:], cfg.hub_config, split), cfg.source
        field_cfg = cfg
    else:
        path = _local_file(cfg.source, split)
        rows, where = _local_rows(path), str(path)
        field_cfg = cfg
    examples = to_examples(rows, field_cfg, where)
    if part is not None:
        examples = [e for e in examples if in_dev_part(e.id, cfg.dev_fraction) == (part == "dev")]
        if not examples:
            raise DataError(f"{where}@{part} holds no examples with data.dev_fraction={cfg.dev_fraction}. Move "
                            "data.dev_fraction away from 0 or 1.")
    return examples[:limit] if limit else examples


def in_dev_part(example_id: str, dev_fraction: float) -> bool:
    """The fixed rule of `<split>@dev`: sha256(id), first 8 bytes big-endian, as a fraction of 2**64."""
    h = int.from_bytes(hashlib.sha256(example_id.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < dev_fraction


def to_examples(rows: Iterable[dict[str, Any]], cfg: DataConfig, where: str) -> list[Example]:
    """Validate fields row by row; every problem is collected before raising."""
    examples, problems, seen_rows = [], [], 0
    for i, row in enumerate(rows):
        seen_rows += 1
        label = f"{where} row {i + 1}" + (f" (line {row['__line__']})" if "__line__" in row else "")
        doc, summ = row.get(cfg.document_field), row.get(cfg.summary_field)
        bad = [f for f in (_text_problem(row, cfg.document_field), _text_problem(row, cfg.summary_field)) if f]
        refs: list[str] = []
        if cfg.references_field and row.get(cfg.references_field) is not None:
            raw = row[cfg.references_field]
            refs = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, (list, tuple)) else []
            if not refs or not all(_nonempty_text(r) for r in refs):
                bad.append(f"{cfg.references_field!r} is not a list of non-empty texts")
        if bad:
            problems.append(f"{label}: " + "; ".join(bad))
            continue
        refs = [r.strip() for r in refs] or [summ.strip()]
        ex_id = str(row.get(cfg.id_field, i)) if row.get(cfg.id_field) is not None else str(i)
        examples.append(Example(ex_id, doc.strip(), summ.strip(), tuple(refs)))
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DataError(
            f"{len(problems)} of {seen_rows} rows in {where} are unusable:\n  " + "\n  ".join(shown) + more +
            f"\nFix the rows, or map the field names with data.document_field / data.summary_field "
            f"(now {cfg.document_field!r} / {cfg.summary_field!r})."
        )
    if not examples:
        raise DataError(f"{where} holds no examples. Check data.source and the split name.")
    return examples


def _text_problem(row: dict[str, Any], name: str) -> str | None:
    """What is wrong with a text field of a row, or None."""
    if row.get(name) is None:
        return f"field {name!r} is missing"
    v = row[name]
    if not isinstance(v, str):
        kind = type(v).__name__
        return f"field {name!r} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} ({json.dumps(v, default=str)[:40]}), not text"
    return None if v.strip() else f"field {name!r} is empty"


def _nonempty_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


# ----------------------------------------------------------------------------- local files


def _local_file(source: str, split: str) -> Path:
    direct = resolve_local_path(split)
    if direct is not None and direct.suffix in LOCAL_SUFFIXES and direct.is_file():
        return direct
    folder = resolve_local_path(source) or Path(source)
    for suffix in LOCAL_SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    found = sorted(p.name for p in folder.glob("*") if p.suffix in LOCAL_SUFFIXES) if folder.is_dir() else []
    raise DataError(
        f"data split ({split}) has no file in {source}: looked for {split}{{{','.join(LOCAL_SUFFIXES)}}}. "
        f"Files there: {', '.join(found) or 'none'}. Set data.train_split / data.eval_split to one of them."
    )


def _local_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    import datasets

    kind = {".json": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"{path} could not be read as {kind}: {e}") from None
    return list(ds)


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """JSONL read line by line so a malformed line is reported with its number."""
    rows, problems = [], []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"line {n}: not UTF-8 text (save the file as UTF-8)")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"line {n}: not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"line {n}: a JSON {type(row).__name__}, not an object")
                continue
            row["__line__"] = n
            rows.append(row)
    if problems:
        raise DataError(f"{path} has {len(problems)} malformed line(s):\n  " + "\n  ".join(problems[:MAX_REPORTED_PROBLEMS]))
    return rows


def _hub_rows(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:
        raise DataError(
            f"data.source (hub:{name}) split {split!r} could not be loaded: {e}. Without hub access, download the "
            "data elsewhere and point data.source at a local folder."
        ) from None


# ----------------------------------------------------------------------------- ACLSum


def _aclsum_rows(split: str, aspect: str) -> list[dict[str, Any]]:
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.source (aclsum) needs the PyPI package aclsum: pip install aclsum==0.1.2.")
    names = {"validation": "val", "val": "val", "train": "train", "test": "test"}
    if split not in names:
        raise DataError(f"data split ({split}) is not an ACLSum split. Use train, validation or test.")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset" / f"{names[split]}.jsonl"
    rows = []
    for raw in _jsonl_rows(path):
        sections = raw["sentences"]
        document = " ".join(
            detokenize(" ".join(sections.get(part, []))) for part in ("abstract", "introduction", "conclusion")
        )
        aspects = ("challenge", "approach", "outcome") if aspect == "all" else (aspect,)
        summary = " ".join(raw["summary"][a].strip() for a in aspects)
        rows.append({"id": raw["id"], "document": document.strip(), "summary": summary, "__line__": raw["__line__"]})
    return rows


_DETOK = [
    (re.compile(r"\s+([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$])\s+"), r"\1"),
    (re.compile(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
    (re.compile(r"``\s*|\s*''"), '"'),
    (re.compile(r"-LRB-\s*"), "("),
    (re.compile(r"\s*-RRB-"), ")"),
    (re.compile(r"\s+"), " "),
]


def detokenize(text: str) -> str:
    """Light undo of PTB tokenization ('results , in ( 20 % )' -> 'results, in (20%)')."""
    for pattern, repl in _DETOK:
        text = pattern.sub(repl, text)
    return text.strip()
