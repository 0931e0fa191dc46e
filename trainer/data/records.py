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
    `data.dev_fraction`), the first `limit` of them when given. The ids of the dev and evaluation
    splits must be unique (checked over the whole split)."""
    name = split
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
    if name in (cfg.dev_split, cfg.eval_split):
        check_unique_ids(examples, cfg, name, where)
    if part is not None:
        examples = [e for e in examples if in_part(e.id, part, cfg)]
        if not examples:
            knob = "dev_fraction" if part in ("dev", "report") else "holdout_fraction"
            raise DataError(f"{where}@{part} holds no examples with data.{knob}={getattr(cfg, knob)}. Move "
                            f"data.{knob} away from 0 or 1.")
    return examples[:limit] if limit else examples


def check_unique_ids(examples: list[Example], cfg: DataConfig, name: str, where: str) -> None:
    """Evaluated and dev examples are matched by id (predictions files, samples, the @dev/@report rule)
    and averaged one score per example: a repeated id is a DataError naming the split, file and ids."""
    rows: dict[str, list[int]] = {}
    for i, e in enumerate(examples, start=1):
        rows.setdefault(e.id, []).append(i)
    dups = [(i, r) for i, r in rows.items() if len(r) > 1]
    if not dups:
        return
    fields = " and ".join(f"data.{f} ({name})" for f in ("dev_split", "eval_split") if getattr(cfg, f) == name)
    shown = ", ".join(f"{i!r} (rows {', '.join(map(str, r[:4]))}{', ...' if len(r) > 4 else ''})" for i, r in dups[:5])
    more = f", and {len(dups) - 5} more" if len(dups) > 5 else ""
    raise DataError(
        f"{fields}: {where} has {len(dups)} duplicated example id(s): {shown}{more}. Predictions and samples are "
        "matched to examples by id and every example is one score in the mean, so a repeated id scores the wrong "
        f"summary or counts one example twice. Give every example its own id (data.id_field, now {cfg.id_field!r}, "
        "names the id field).")


def split_problem(cfg: DataConfig, field: str) -> str | None:
    """Why `data.<field>` names no split of `cfg.source`, without reading any data; None when it does,
    or when only the network could tell (a hub dataset). For `<split>@dev` the base split is checked."""
    value = getattr(cfg, field)
    split, _ = split_part(value)
    why = "Loading it would fail, and in a pipeline only after the stages before it have trained."
    if cfg.source == "aclsum":
        if split in ACLSUM_FILES:
            return None
        return (f"data.{field} ({value}) is not a split of aclsum, which has: train, validation, test. {why} Set "
                f"data.{field} to one of them.")
    if cfg.source.startswith("hub:") or _find_local_file(cfg.source, split) is not None:
        return None
    return (f"data.{field} ({value}) names no data: {_no_file(cfg.source, split)} {why} Set data.{field} to one of "
            "their names without the suffix, or to a data file.")


def count_rows(cfg: DataConfig, split: str) -> int | None:
    """An upper bound on the examples of `split` (of its base split for `<split>@dev`), counted as the
    non-blank lines of its JSONL file without parsing them; None when the split is not a JSONL file."""
    split, _ = split_part(split)
    if cfg.source == "aclsum":
        path = _aclsum_file(split) if split in ACLSUM_FILES else None
    elif cfg.source.startswith("hub:"):
        return None
    else:
        path = _find_local_file(cfg.source, split)
    if path is None or path.suffix != ".jsonl" or not path.is_file():
        return None
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def in_dev_part(example_id: str, dev_fraction: float) -> bool:
    """The fixed rule of `<split>@dev`: sha256(id), first 8 bytes big-endian, as a fraction of 2**64."""
    return _hash_fraction(example_id) < dev_fraction


def in_holdout_part(example_id: str, holdout_fraction: float, salt: str) -> bool:
    """The fixed rule of `<split>@holdout`: sha256(salt + ":" + id), read as `in_dev_part` reads it."""
    return _hash_fraction(f"{salt}:{example_id}") < holdout_fraction


def in_part(example_id: str, part: str, cfg: DataConfig) -> bool:
    """Whether an example belongs to `part` (dev, report, fit or holdout) of its split."""
    if part in ("dev", "report"):
        return in_dev_part(example_id, cfg.dev_fraction) == (part == "dev")
    if cfg.holdout_fraction is None:
        raise DataError(f"The split part @{part} needs data.holdout_fraction (the share that @holdout takes).")
    return in_holdout_part(example_id, cfg.holdout_fraction, cfg.holdout_salt) == (part == "holdout")


def _hash_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def to_examples(rows: Iterable[dict[str, Any]], cfg: DataConfig, where: str) -> list[Example]:
    """Validate fields row by row; every problem is collected before raising."""
    examples, problems, seen_rows = [], [], 0
    for i, row in enumerate(rows):
        seen_rows += 1
        label = f"{where} row {i + 1}" + (f" (line {row['__line__']})" if "__line__" in row else "")
        doc, summ = row.get(cfg.document_field), row.get(cfg.summary_field)
        bad = [f for f in (text_problem(row, cfg.document_field), text_problem(row, cfg.summary_field)) if f]
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


def text_problem(row: dict[str, Any], name: str) -> str | None:
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
    path = _find_local_file(source, split)
    if path is None:
        raise DataError(f"{_no_file(source, split)} Set data.train_split / data.eval_split to one of them.")
    return path


def _no_file(source: str, split: str) -> str:
    return (f"data split ({split}) has no file in {source}: looked for {split}{{{','.join(LOCAL_SUFFIXES)}}}. "
            f"Files there: {', '.join(_local_files(source)) or 'none'}.")


def _find_local_file(source: str, split: str) -> Path | None:
    direct = resolve_local_path(split)
    if direct is not None and direct.suffix in LOCAL_SUFFIXES and direct.is_file():
        return direct
    folder = resolve_local_path(source) or Path(source)
    return next((folder / f"{split}{s}" for s in LOCAL_SUFFIXES if (folder / f"{split}{s}").is_file()), None)


def _local_files(source: str) -> list[str]:
    folder = resolve_local_path(source)
    return sorted(p.name for p in folder.glob("*") if p.suffix in LOCAL_SUFFIXES) if folder and folder.is_dir() else []


def _local_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return read_jsonl_rows(path)
    import datasets

    kind = {".json": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"{path} could not be read as {kind}: {e}") from None
    return list(ds)


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
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

ACLSUM_FILES = {"train": "train", "validation": "val", "val": "val", "test": "test"}  # split -> the package's file


def _aclsum_file(split: str) -> Path | None:
    """The package's JSONL file of an ACLSum split (a key of ACLSUM_FILES); None when aclsum is not installed."""
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "dataset" / f"{ACLSUM_FILES[split]}.jsonl"


def _aclsum_rows(split: str, aspect: str) -> list[dict[str, Any]]:
    if split not in ACLSUM_FILES:
        raise DataError(f"data split ({split}) is not an ACLSum split. Use train, validation or test.")
    path = _aclsum_file(split)
    if path is None:
        raise DataError("data.source (aclsum) needs the PyPI package aclsum: pip install aclsum==0.1.2.")
    rows = []
    for raw in read_jsonl_rows(path):
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
