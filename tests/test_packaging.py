"""Our import names are ours alone, and the project runs from its root the way an installed user
runs it. transformers 5.25 began importing Hugging Face's `kernels` package, and our old top-level
`kernels` package shadowed it wherever the project root was on sys.path (`python -m pytest`,
`trainer/main.py`): every model load failed. These tests catch that class of break."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import ROOT, TINY, clean_env


def _setuptools_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _our_top_level_names() -> set[str]:
    return {p for p in _setuptools_table()["packages"] if "." not in p}


def _importable_from_root() -> set[str]:
    """Names `import X` finds in the project root when the root is on sys.path: packages with an
    __init__.py and modules."""
    return {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} | {p.stem for p in ROOT.glob("*.py")}


def test_no_other_distribution_provides_our_top_level_names():
    owners = importlib.metadata.packages_distributions()
    ours = _our_top_level_names()
    assert ours == {"lastmile", "lastmile_kernels"}
    clashes = {name: sorted(d for d in owners.get(name, []) if d != "lastmile") for name in ours}
    assert not any(clashes.values()), f"top-level names we install are also installed by {clashes}"


def test_nothing_in_the_project_root_shadows_an_installed_package():
    owners = importlib.metadata.packages_distributions()
    shadowing = {n: owners[n] for n in _importable_from_root() if n in owners and owners[n] != ["lastmile"]}
    assert not shadowing, f"importable from the project root and also installed by: {shadowing}"
    # The folder kernels/ is not a package: Hugging Face's `kernels` stays visible from the root.
    assert not (ROOT / "kernels" / "__init__.py").exists()


def _folder(package: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools takes `package` from: the longest package-dir prefix, then the rest as folders."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in package_dir:
            return ROOT / package_dir[".".join(parts[:i])] / Path(*parts[i:])
    return ROOT / Path(*parts)


def test_every_subpackage_is_installed():
    """A folder with an __init__.py under trainer/ or kernels/ that pyproject does not list would be
    missing from a non-editable install; a listed data-only folder ships its files."""
    table = _setuptools_table()
    folders = {p: _folder(p, table["package-dir"]) for p in table["packages"]}
    assert all(f.is_dir() for f in folders.values()), folders
    data_only = {p for p, f in folders.items() if not (f / "__init__.py").exists()}
    assert data_only == {"lastmile.configs", "lastmile.ds_configs"}
    for p in data_only:
        patterns = table["package-data"][p]
        assert any(list(folders[p].glob(pat)) for pat in patterns), (p, patterns)
    found = set()
    for name, folder in table["package-dir"].items():
        if name in data_only:
            continue
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            found.add(".".join((name, *init.parent.relative_to(base).parts)))
    assert found == set(table["packages"]) - data_only


def test_installed_package_is_this_checkout():
    spec = importlib.util.find_spec("lastmile")
    assert spec is not None and Path(spec.origin).resolve() == ROOT / "trainer" / "__init__.py"
    spec = importlib.util.find_spec("lastmile_kernels")
    assert Path(spec.origin).resolve() == ROOT / "kernels" / "lastmile_kernels" / "__init__.py"


def test_from_the_project_root_transformers_imports_and_main_py_trains(tmp_path):
    """From the root (on sys.path, as under `python -m pytest`): transformers.activations imports, and
    `python trainer/main.py sft` loads the tiny model, takes a step and publishes it (sft.max_steps=1
    cuts the preset's run short: its warmup is then only a warning)."""
    env = clean_env(OMP_NUM_THREADS="2")
    code = ("import transformers.activations, importlib.util, pathlib, sys\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "where = pathlib.Path(spec.origin).resolve() if spec and spec.origin else None\n"
            "sys.exit(f'kernels resolves to {where}' if where and where.parent == pathlib.Path(sys.argv[1]) else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "kernels")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "x"
    cmd = [sys.executable, "trainer/main.py", "sft", "--config", str(TINY), f"output_dir={out}", "sft.max_steps=1",
           "sft.eval_every=0", "sft.num_samples=0", "tracking.enabled=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "sft" / "model").num_parameters() > 0
