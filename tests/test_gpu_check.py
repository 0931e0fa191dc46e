"""bench/gpu_check.py, the GPU check of issue 20, without a GPU: its dry run takes every check's code path
on CPU at toy sizes (two real `lastmile ppo` runs among them, with only the packages the device is assumed
to have plus bench/gpu_wheels.txt), and the bundle's helpers are checked on their own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_bundle  # noqa: E402
import gpu_check  # noqa: E402


@pytest.mark.slow  # about a minute: kept out of the default run's 8 minutes (`make test-slow`)
def test_dry_run_reports_every_check_with_numbers_or_a_reason(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(out), "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    checks = results["checks"]
    assert list(checks) == ["attention", "logprob", "ppo-135m", "ppo-1b", "bundle"]
    assert results["dry_run"] and results["device"].startswith("cpu")

    attention = checks["attention"]
    assert attention["status"] == "skipped" and "flash-attn" in attention["reason"]
    assert all(row["sdpa_ms"] > 0 for row in attention["rows"])  # SDPA is timed even without flash-attn

    logprob = checks["logprob"]
    assert logprob["status"] == "ok" and "Triton kernels need a CUDA device" in logprob["triton"]
    chunked = [r for r in logprob["rows"] if r["impl"] == "chunked"]
    assert chunked and all(r["fwd_bwd_ms"] > 0 and r["grad_w_rel_err"] < logprob["bound"] for r in chunked)

    for name in ("ppo-135m", "ppo-1b"):
        ppo = checks[name]
        assert ppo["status"] == "ok", ppo.get("stderr_tail")
        assert ppo["phases_s"]["generation"] > 0 and ppo["phases_s"]["actor_update"] > 0
        assert ppo["peak_gb"]["actor_update"] > 0 and ppo["tokens_trained"] > ppo["prompt_tokens"] > 0
        assert ppo["update_tflops"] > 0 and ppo["mfu"] is None and ppo["peak_entry"].startswith("none")
        assert ppo["attention"] == "sdpa" and ppo["logprob_impl"] == "chunked"
    assert checks["ppo-1b"]["parameters"] > checks["ppo-135m"]["parameters"]  # one more layer

    bundle = checks["bundle"]  # both PPO runs had only the device's packages and the listed wheels
    assert bundle["status"] == "ok" and "deepspeed" in bundle["wheels_imported"]

    markdown = (out / "gpu_check.md").read_text()
    assert all(f"## {name}:" in markdown for name in checks) and "| actor_update |" in markdown
    ours = [line for line in proc.stdout.splitlines() if not line.startswith("[20")]  # DeepSpeed's log lines
    assert all(line.startswith(f"[{results['device']}]") for line in ours if any(c.isdigit() for c in line))


def test_missing_names_the_wheels_of_distributions_not_installed(tmp_path):
    (tmp_path / "hjson-3.1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "no_such_dist_xyz-1.0-py3-none-any.whl").write_bytes(b"")
    install, lines = gpu_bundle.missing(["hjson", "No.Such-Dist_xyz", "also-not-there"], tmp_path)
    assert install == [tmp_path / "no_such_dist_xyz-1.0-py3-none-any.whl"]
    assert lines[0].startswith("present: hjson ")
    assert lines[1] == "missing: No.Such-Dist_xyz -> no_such_dist_xyz-1.0-py3-none-any.whl"
    assert lines[2] == "missing: also-not-there (no wheel in the bundle!)"


def test_size_check_against_the_upload_limit(tmp_path):
    mib = 2**20
    assert gpu_bundle.size_problem(30 * mib, 2 * mib) is None
    assert gpu_bundle.size_problem(62 * mib, 2 * mib) is None  # exactly the limit travels
    problem = gpu_bundle.size_problem(60 * mib, 5 * mib)
    assert "60.0 MiB" in problem and "5.0 MiB" in problem and "64 MiB" in problem
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "a.whl").write_bytes(b"x" * 1000)
    (tmp_path / "b.json").write_bytes(b"x" * 24)
    assert gpu_bundle.folder_bytes(tmp_path) == 1024


def test_every_listed_wheel_is_pinned_and_the_device_base_is_not_listed():
    listed = gpu_bundle.wheel_list()
    pins = gpu_bundle.pins(listed)
    assert len(pins) == len(listed) and all("==" in p for p in pins)
    assert not {gpu_bundle.norm(n) for n in listed} & {gpu_bundle.norm(n) for n in gpu_bundle.DEVICE_BASE}
    with pytest.raises(SystemExit, match="not-a-real-dist"):
        gpu_bundle.pins(["not-a-real-dist"])


@pytest.mark.parametrize("name,entry", [
    ("NVIDIA H100 80GB HBM3", ("H100", 989.0)), ("NVIDIA H100 PCIe", ("H100 PCIe", 756.0)),
    ("NVIDIA H200", ("H200", 989.0)), ("NVIDIA A100-SXM4-80GB", ("A100", 312.0)), ("NVIDIA L40S", ("L40S", 362.0)),
    ("Tesla T4", None),
])
def test_peak_table_picks_the_most_specific_entry(name, entry):
    assert gpu_check.peak_tflops(name) == entry
