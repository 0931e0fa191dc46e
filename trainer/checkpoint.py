"""Atomic checkpoints: a Hugging Face model folder, the DeepSpeed engine state, and trainer state.

A checkpoint is built in `step-NNNNNNN.partial/` and renamed to `step-NNNNNNN/` only when every
file is written and synced, so a kill mid-write never leaves a folder that looks complete.
Layout:  <root>/step-0000050/{model/ (from_pretrained loads it), engine/ (DeepSpeed), trainer_state.json}
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer import distributed

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under root, if any."""
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def remove_partials(root: Path) -> None:
    """Leftovers of a killed save; call on rank 0 before training starts."""
    if root.is_dir():
        for p in root.glob("*.partial"):
            shutil.rmtree(p, ignore_errors=True)


def save_hf_model(lm, tokenizer, state_dict: dict[str, torch.Tensor], dest: Path, *, prefix: str = "lm.") -> None:
    """Write `lm` (config + weights from `state_dict`, keys under `prefix`) and the tokenizer to dest."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    dest.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(dest, state_dict=sd)
    tokenizer.save_pretrained(dest)


def save_checkpoint(engine, ds_config: dict, lm, tokenizer, state: dict[str, Any], root: Path, step: int, *, keep: int,
                    prefix: str = "lm.", extra_engines: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. `lm` is the Hugging Face model inside the engine's module,
    under attribute `prefix`; `extra_engines` (tag -> engine, e.g. PPO's critic) are saved beside it
    in the same atomic folder. Returns the final checkpoint folder."""
    final = root / f"step-{step:07d}"
    partial = root / f"step-{step:07d}.partial"
    is_main = torch.distributed.get_rank() == 0
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    distributed.barrier()
    engine.save_checkpoint(str(partial), tag="engine", save_latest=False)
    for tag, extra in (extra_engines or {}).items():
        extra.save_checkpoint(str(partial), tag=tag, save_latest=False)
    sd = distributed.consolidated_state_dict(engine, ds_config)
    if is_main:
        save_hf_model(lm, tokenizer, sd, partial / "model", prefix=prefix)
        write_json_atomic(partial / STATE_FILE, state)
        _fsync_tree(partial)
        if final.exists():  # re-saving the same step after a resume
            shutil.rmtree(final)
        os.rename(partial, final)
        _prune(root, keep)
    distributed.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(engine, folder: Path, extra_engines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore engines (weights, optimizer, scheduler) and return the trainer state."""
    for tag, eng in {"engine": engine, **(extra_engines or {})}.items():
        eng.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    return json.loads((folder / STATE_FILE).read_text())


def resume(engine, root: Path, *, is_main: bool, extra_engines: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Clear leftovers of a killed save, then load the newest complete checkpoint if there is one
    (collective). Returns its trainer state, or None for a fresh start."""
    if is_main:
        remove_partials(root)
    distributed.barrier()
    latest = latest_checkpoint(root)
    if latest is None:
        return None
    if is_main:
        log.info("resuming from %s", latest)
    return load_checkpoint(engine, latest, extra_engines)


def publish_model(src: Path, dest: Path) -> None:
    """Copy a checkpoint's HF model to the stage's `model/` folder atomically (rank 0 only)."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    _fsync_tree(tmp)
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


DONE_FILE = "DONE.json"
