"""What the GPU device lacks and cannot fetch (it has no network), carried in one ignored folder:
wheels of the distributions in bench/gpu_wheels.txt and SmolLM2's tokenizer without its weights.

    python bench/gpu_bundle.py pins                                        # name==version of each wheel to build
    python bench/gpu_bundle.py export-tokenizer bench/gpu_bundle/smollm2   # here (bench/gpu_wheels.sh runs both)
    python bench/gpu_bundle.py size bench/gpu_bundle                       # fails when the upload would pass 64 MiB
    python bench/gpu_bundle.py missing bench/gpu_bundle/wheels             # on the device: the wheels to install

Standard library only at import time: `missing` runs on the device before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_LIST = ROOT / "bench" / "gpu_wheels.txt"
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"
DEVICE_BASE = ("torch", "transformers", "triton", "peft")  # assumed on the device, with their requirements
UPLOAD_LIMIT = 64 * 2**20  # the device tool's limit on the working tree plus the carried paths


def wheel_list(path: Path = WHEEL_LIST) -> list[str]:
    """The distributions bench/gpu_wheels.sh builds (one per line, # comments)."""
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def pins(listed: list[str], constraints: Path = CONSTRAINTS) -> list[str]:
    """'name==version' for each listed distribution, at the version the last green CI installed."""
    versions = {}
    for line in constraints.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            versions[norm(name)] = version.strip()
    unpinned = [n for n in listed if norm(n) not in versions]
    if unpinned:
        raise SystemExit(f"{', '.join(unpinned)} not in {constraints}: pin them there (make lock) or drop them from "
                         f"{WHEEL_LIST.name}.")
    return [f"{n}=={versions[norm(n)]}" for n in listed]


def norm(name: str) -> str:
    """PEP 503's normalized name: 'Python_Dateutil' -> 'python-dateutil'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    """The distribution a wheel file holds: 'python_dateutil-2.9.0-py2.py3-none-any.whl' -> 'python-dateutil'."""
    return norm(path.name.split("-")[0])


def missing(listed: list[str], wheels: Path) -> tuple[list[Path], list[str]]:
    """(the wheels in `wheels` of the listed distributions not installed here, report lines for all of them)."""
    files = {wheel_name(w): w for w in wheels.glob("*.whl")}
    install, lines = [], []
    for name in listed:
        try:
            lines.append(f"present: {name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            wheel = files.get(norm(name))
            lines.append(f"missing: {name}" + (f" -> {wheel.name}" if wheel else " (no wheel in the bundle!)"))
            install += [wheel] if wheel else []
    return install, lines


def tree_bytes(root: Path = ROOT) -> int:
    """What the device tool sends besides the carried paths: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sum((root / n).stat().st_size for n in names if n and (root / n).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def size_problem(bundle: int, tree: int, limit: int = UPLOAD_LIMIT) -> str | None:
    """Why the bundle cannot travel with the tree, or None."""
    if bundle + tree <= limit:
        return None
    return (f"the bundle ({bundle / 2**20:.1f} MiB) and the working tree ({tree / 2**20:.1f} MiB) add up to more than "
            f"the device's {limit / 2**20:.0f} MiB upload. Drop the largest wheels the device already has "
            "(bench/gpu_wheels.txt), or shrink what else travels.")


def requirement_closure(roots: tuple[str, ...]) -> set[str]:
    """The installed distributions `roots` need (their non-extra requirements, recursively), roots included."""
    from packaging.requirements import Requirement

    seen, todo = set(), [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return seen


def device_like_path(dest: Path, allowed: set[str]) -> Path:
    """A folder of links to the installed files of the `allowed` distributions and to our two packages
    only: with `python -S` and PYTHONPATH=dest a process sees what the device has once bench/gpu_check.sh
    installed the wheels (--no-deps), so a missing requirement fails here, on CPU, first."""
    dest.mkdir(parents=True, exist_ok=True)
    links = {"lastmile": ROOT / "trainer", "lastmile_kernels": ROOT / "kernels" / "lastmile_kernels"}
    for dist in importlib.metadata.distributions():
        if norm(dist.metadata["Name"]) in allowed:
            for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
                links.setdefault(top, Path(dist.locate_file(top)))
    for name, target in links.items():
        if target.exists() and not (dest / name).exists():
            (dest / name).symlink_to(target)
    return dest


def export_tokenizer(dest: Path) -> Path:
    """Config and tokenizer files of the offline default (about 3.5 MB), for a machine without the GGUF."""
    from transformers import AutoConfig, AutoTokenizer

    from lastmile.models import resolve_model_path

    source = resolve_model_path("smollm2-135m-instruct")
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    AutoConfig.from_pretrained(source).save_pretrained(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("pins", "export-tokenizer", "size", "missing"))
    p.add_argument("folder", type=Path, nargs="?")
    args = p.parse_args(argv)
    if args.command != "pins" and args.folder is None:
        p.error(f"{args.command} needs a folder")
    if args.command == "pins":
        print("\n".join(pins(wheel_list())))
    elif args.command == "export-tokenizer":
        print(export_tokenizer(args.folder))
    elif args.command == "size":
        bundle, tree = folder_bytes(args.folder), tree_bytes()
        print(f"bundle {bundle / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = "
              f"{(bundle + tree) / 2**20:.1f} MiB (limit {UPLOAD_LIMIT / 2**20:.0f} MiB)")
        if problem := size_problem(bundle, tree):
            print(problem, file=sys.stderr)
            return 1
    else:
        install, lines = missing(wheel_list(), args.folder)
        print("\n".join(lines), file=sys.stderr)
        print("\n".join(str(w) for w in install))
        if any("no wheel" in line for line in lines):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
