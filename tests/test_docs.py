"""What the docs and docstrings claim agrees with the code and with the measurements: every
document the code cites is in the project, no comment names a module by a package name we no longer
have, the hybrid engine's speed-up is the one docs/benchmarks.md measured, and the runs the README
lists are runs that tests perform."""

import re

import pytest

from conftest import ROOT

SOURCES = sorted((ROOT / "trainer").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


def _hits(pattern: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{n}: {m.group(0)}" for path in SOURCES
            for n, line in enumerate(path.read_text().splitlines(), 1) for m in re.finditer(pattern, line)]


def test_cited_documents_exist_in_the_project():
    """A project document (an upper-case name such as README.md, or a path under docs/) that the code
    cites must be in the repository; output files the code writes (samples.md, report.md) are lower-case."""
    cited = _hits(r"(?<![\w./-])(?:docs/[\w.-]+\.md|[A-Z][A-Z_]*\.md)\b")
    missing = [c for c in cited if not (ROOT / c.rsplit(": ", 1)[1]).is_file()]
    assert not missing, f"the code cites documents the project does not have: {missing}"


def test_no_comment_names_a_module_by_an_old_package_name():
    """The packages are `lastmile` (trainer/) and `lastmile_kernels` (kernels/lastmile_kernels/): a
    dotted `trainer.x` or `kernels.x` names nothing a reader can import."""
    stale = _hits(r"(?<![\w./])(?:trainer|kernels)\.[a-z_]\w*")
    assert not stale, f"write lastmile.x or lastmile_kernels.x instead: {stale}"


def _measured_hybrid_speedup() -> str:
    table = (ROOT / "docs" / "benchmarks.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| **hybrid engine"))
    return re.findall(r"\*\*([\d.]+)x\*\*", row)[0]  # columns: tokens/s, vs naive ZeRO-3, vs unsharded


def test_hybrid_engine_speedup_is_the_measured_one():
    measured = _measured_hybrid_speedup()
    readme = re.findall(r"([\d.]+)x naive ZeRO-3", (ROOT / "README.md").read_text())
    docstring = re.findall(r"([\d.]+)x the naive path", (ROOT / "trainer" / "hybrid_engine.py").read_text())
    assert readme == [measured] and docstring == [measured], (measured, readme, docstring)


@pytest.mark.parametrize("test_file, test_name", [
    ("test_e2e.py", "test_two_rank_zero3_matches_single_process"),  # 2 ranks under deepspeed, ZeRO-3
    ("test_slurm.py", "test_sbatch_runs_the_tiny_pipeline_with_two_tasks"),  # 2 tasks, local Slurm
])
def test_the_runs_the_readme_lists_are_tested(test_file, test_name):
    readme = (ROOT / "README.md").read_text()
    assert "2 ranks under `deepspeed`" in readme and "local single-node Slurm cluster" in readme
    assert "no GPU run exists" in readme
    assert f"def {test_name}(" in (ROOT / "tests" / test_file).read_text()


def test_reward_model_evaluation_reads_the_dev_split(monkeypatch):
    """rm.eval_examples counts examples of data.dev_split (its docstring says so), never of eval_split."""
    from lastmile.config import load_config
    from lastmile.stages import reward_model

    class Loaded(Exception):
        pass

    def fake_load_split(data, split, limit=None):
        raise Loaded(split, limit)

    monkeypatch.setattr(reward_model, "load_split", fake_load_split)
    cfg = load_config(None, ["data.dev_split=validation@dev", "data.eval_split=validation@report",
                             "rm.eval_examples=5"])
    with pytest.raises(Loaded) as e:
        reward_model.evaluate_reward_model(cfg, None, None, None, None)
    assert e.value.args == ("validation@dev", 5)
    source = (ROOT / "trainer" / "config.py").read_text()
    doc = source.split("    eval_examples: int | None = None\n", 1)[1].split('"""')[1]
    assert "data.dev_split" in doc and "eval_split" not in doc
