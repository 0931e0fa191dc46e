"""The README of a folder of blind predictions: which commit, config and model made each file.

    python bench/blind_manifest.py docs/results/blind --config trainer/configs/scitldr_v2.yaml \
        --input ../shared/data/blind/scitldr_a_blind.jsonl

For every `<system>.jsonl` in the folder that has a `<system>.jsonl.meta.json` beside it (written by
`lastmile predict`), the table names the model, its identity and the number of ids; a
`<system>+post.jsonl` is the same predictions post-processed (`predict.postprocessed_output`). Every
file's sha256 is listed, so that a scorer can check that what they score is what was committed. The
prompt and decoding settings must be the same for every file, and every file must hold each id of the
input exactly once (when --input is a readable file); the script refuses a folder where either fails.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lastmile.errors import UserError


@dataclass(frozen=True)
class Entry:
    file: str
    system: str
    model: str  # "<path> [<identity>]" as `lastmile predict` records it; for +post, its raw file's model
    ids: int
    sha256: str
    post_of: str | None  # the raw file a +post file was made from


class ManifestError(Exception):
    pass


def _ids(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise ManifestError(f"{path} holds an id twice. Rerun `lastmile predict` into a fresh file.")
    return ids


def read_folder(folder: Path, documents: set[str] | None = None) -> tuple[list[Entry], dict]:
    """(one entry per predictions file, the prompt and decoding settings they share). With `documents`
    (the input's ids), every file must hold exactly those ids."""
    raws = sorted(p for p in folder.glob("*.jsonl") if not p.stem.endswith("+post"))
    if not raws:
        raise ManifestError(f"{folder} holds no <system>.jsonl predictions.")
    entries, shared, id_sets = [], None, {}
    for raw in raws:
        meta_file = raw.with_name(raw.name + ".meta.json")
        if not meta_file.is_file():
            raise ManifestError(f"{raw} has no {meta_file.name} beside it: copy it from where `lastmile predict` "
                                "wrote the file, or the model that made it cannot be named.")
        settings = dict(json.loads(meta_file.read_text())["settings"])
        model = settings.pop("predict.model")
        if shared is None:
            shared = settings
        elif settings != shared:
            changed = sorted(k for k in set(settings) | set(shared) if settings.get(k) != shared.get(k))
            raise ManifestError(f"{raw} was made with other prompt or decoding settings than {raws[0]}: "
                                f"{', '.join(changed)}. Every system must be predicted the same way.")
        system = raw.stem
        files = [(raw, None)]
        post = raw.with_name(f"{system}+post.jsonl")
        if post.is_file():
            files.append((post, raw.name))
        for path, post_of in files:
            ids = _ids(path)
            id_sets[path.name] = set(ids)
            entries.append(Entry(file=path.name, system=path.stem, model=model, ids=len(ids),
                                 sha256=hashlib.sha256(path.read_bytes()).hexdigest(), post_of=post_of))
    orphans = sorted(p.name for p in folder.glob("*+post.jsonl") if p.name not in id_sets)
    if orphans:
        raise ManifestError(f"{', '.join(orphans)} in {folder} has no raw file beside it.")
    if documents is not None:
        for name, ids in id_sets.items():
            if ids != documents:
                raise ManifestError(f"{folder / name} does not hold exactly the input's {len(documents)} ids "
                                    f"({len(documents - ids)} missing, {len(ids - documents)} not in the input). "
                                    "Rerun `lastmile predict`: it finishes the missing ids.")
    first = next(iter(id_sets))
    for name, ids in id_sets.items():
        if ids != id_sets[first]:
            raise ManifestError(f"{folder / name} and {folder / first} hold different ids "
                                f"({len(ids ^ id_sets[first])} differ). Every system must predict every document.")
    return entries, shared


def markdown(entries: list[Entry], settings: dict, *, commit: str, config: str, source: str, date: str) -> str:
    rows = "\n".join(
        f"| `{e.file}` | {e.system} | "
        + (f"`{e.post_of}` post-processed" if e.post_of else f"`{e.model}`")
        + f" | {e.ids} | `{e.sha256[:16]}` |" for e in entries)
    decoding = "\n".join(f"- `{k}`: {v}" for k, v in sorted(settings.items()))
    return f"""# Blind predictions

Made once, on {date}, at commit `{commit}`, with `{config}`, from `{source}`. The documents'
references are held back: these files are scored elsewhere, and no choice of the study was made
on them.

| file | system | model [identity] | ids | sha256 (first 16) |
|---|---|---|---|---|
{rows}

A `+post` file is its raw file with the report's post-processing applied (docs/evaluation.md). Each
raw file's `.meta.json` beside it is what `lastmile predict` recorded of the model and settings.

Prompt and decoding, the same for every file:
{decoding}
"""


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" (with uncommitted changes)" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--config", required=True, help="the config the predictions were made with")
    ap.add_argument("--input", required=True, help="the blind documents file")
    ap.add_argument("--commit", help="default: git rev-parse HEAD of the current directory")
    ap.add_argument("--id-field", default="id", help="the input's id column (predict.id_field)")
    ap.add_argument("--document-field", default="document", help="the input's document column")
    args = ap.parse_args(argv)
    try:
        documents = None
        if Path(args.input).is_file():
            from lastmile.data.documents import read_documents

            documents = {d.id for d in read_documents(Path(args.input), args.id_field, args.document_field)}
        entries, settings = read_folder(args.folder, documents)
    except (ManifestError, UserError, OSError, ValueError, KeyError) as e:
        print(f"blind_manifest: {e}", file=sys.stderr)
        return 2
    text = markdown(entries, settings, commit=args.commit or git_commit(), config=args.config, source=args.input,
                    date=datetime.date.today().isoformat())
    out = args.folder / "README.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out} ({len(entries)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
