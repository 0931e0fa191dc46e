"""Atomic checkpoints: a Hugging Face model folder, the DeepSpeed engine state, and trainer state.

A checkpoint is built in `step-NNNNNNN.partial/` and renamed to `step-NNNNNNN/` only when every
file is written and synced, so a kill mid-write never leaves a folder that looks complete. Every
checkpoint and published model carries MANIFEST.json (size and SHA-256 of each file); resume and
publish verify it, and a damaged newest checkpoint is reported and the previous valid one used.
Layout:  <root>/step-0000050/{model/ (from_pretrained loads it), engine/ (DeepSpeed), trainer_state.json}
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lastmile import distributed, faults, lora

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or all of `text`, never a part (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """MANIFEST.json: relative path -> [size, sha256] of every file under folder (written last)."""
    files = {str(p.relative_to(folder)): [p.stat().st_size, _sha256(p)]
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_json_atomic(folder / MANIFEST, {"files": files})


def verify_manifest(folder: Path, *, checksums: bool = True) -> list[str]:
    """Problems with folder against its MANIFEST.json (empty: intact; a folder without one is
    checked only for a readable trainer state, as older versions wrote)."""
    path = folder / MANIFEST
    if not path.is_file():
        return [] if (folder / STATE_FILE).is_file() or (folder / "config.json").is_file() else [f"{folder} is empty"]
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, OSError):
        return [f"{path} is unreadable"]
    problems = []
    for rel, (size, digest) in files.items():
        f = folder / rel
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{f} has {f.stat().st_size} bytes, {size} expected")
        elif checksums and _sha256(f) != digest:
            problems.append(f"{f} does not match its checksum")
    return problems


def _readable_state(folder: Path) -> bool:
    try:
        return isinstance(json.loads((folder / STATE_FILE).read_text()), dict)
    except (json.JSONDecodeError, OSError):
        return False


def checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoints under root, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint under root (verified against its manifest), if any; damaged
    newer ones are reported and skipped."""
    for p in checkpoints(root):
        problems = verify_manifest(p) + ([] if _readable_state(p) else [f"{p / STATE_FILE} is unreadable"])
        if not problems:
            return p
        log.warning("checkpoint %s is damaged (%s); trying the previous one", p, "; ".join(problems[:3]))
    return None


def remove_partials(root: Path) -> None:
    """Leftovers of a killed save; call on rank 0 before training starts."""
    if root.is_dir():
        for p in root.glob("*.partial"):
            shutil.rmtree(p, ignore_errors=True)


def save_hf_model(lm, tokenizer, state_dict: dict[str, torch.Tensor], dest: Path, *, prefix: str = "lm.") -> None:
    """Write `lm` (config + weights from `state_dict`, keys under `prefix`) and the tokenizer to dest.
    LoRA adapters in `lm` are merged into their base weights: the folder holds a plain model."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if lora.has_adapters(lm):
        sd = lora.merged_state_dict(sd, lora.scaling(lm))
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
    with _full_disk_as_oserror(root, partial):
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        distributed.barrier()
        engine.save_checkpoint(str(partial), tag="engine", save_latest=False,
                               exclude_frozen_parameters=_has_frozen(engine))  # a LoRA actor: its adapters only
        for tag, extra in (extra_engines or {}).items():
            extra.save_checkpoint(str(partial), tag=tag, save_latest=False)
        sd = distributed.consolidated_state_dict(engine, ds_config)
        if is_main:
            save_hf_model(lm, tokenizer, sd, partial / "model", prefix=prefix)
            write_manifest(partial / "model")
            write_json_atomic(partial / STATE_FILE, state)
            write_manifest(partial)
            _fsync_tree(partial)
            faults.point("checkpoint.before_rename")
            if final.exists():  # re-saving the same step after a resume
                shutil.rmtree(final)
            os.rename(partial, final)
            faults.point("checkpoint.after_rename")
            _prune(root, keep)
        distributed.barrier()
        return final


@contextlib.contextmanager
def _full_disk_as_oserror(root: Path, partial: Path):
    """torch.save reports a full disk as a RuntimeError without errno: make it the OSError it is."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
        if not full:  # e.g. "failed writing" or "[enforce fail at inline_container.cc] unexpected pos"
            try:
                full = shutil.disk_usage(root).free < (64 << 20)
            except OSError:
                pass
        if full:  # the partial folder is useless and holds the space that ending the MLflow run needs
            import gc
            import traceback

            failed: BaseException | None = e  # the failed write's frames keep its file open, and its space
            while failed is not None:
                traceback.clear_frames(failed.__traceback__)
                failed = failed.__context__
            gc.collect()
            shutil.rmtree(partial, ignore_errors=True)
            raise OSError(errno.ENOSPC, "No space left on device", str(partial)) from None
        raise


def _has_frozen(engine) -> bool:
    """Some of the engine's parameters do not train (LoRA's frozen base): checkpoints leave them out,
    since the stage rebuilds them from its inputs."""
    return any(not p.requires_grad for p in engine.module.parameters())


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(engine, folder: Path, extra_engines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore engines (weights, optimizer, scheduler) and return the trainer state."""
    for tag, eng in {"engine": engine, **(extra_engines or {})}.items():
        eng.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                            load_module_strict=not _has_frozen(eng))  # frozen weights were left out, as built
    return json.loads((folder / STATE_FILE).read_text())


def resume(engine, root: Path, *, is_main: bool, extra_engines: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Clear leftovers of a killed save, then load the newest complete checkpoint if there is one
    (collective). Returns its trainer state, or None for a fresh start."""
    if is_main:
        remove_partials(root)
    distributed.barrier()
    latest = latest_checkpoint(root) if is_main else None
    latest = distributed.gather_objects(latest)[0]  # rank 0 verified it; every rank loads the same one
    if latest is None:
        return None
    if is_main:
        log.info("resuming from %s", latest)
    return load_checkpoint(engine, latest, extra_engines)


def publish_model(src: Path, dest: Path) -> None:
    """Copy a checkpoint's HF model to the stage's `model/` folder atomically (rank 0 only), after
    verifying it against its manifest: a damaged model is never published."""
    problems = verify_manifest(src)
    if problems:
        from lastmile.errors import UserError

        raise UserError(f"the model to publish is damaged: {'; '.join(problems[:3])}. Nothing was published. Delete "
                        f"{src.parent} and rerun the same command: the stage resumes from the previous checkpoint.")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    write_manifest(tmp)
    _fsync_tree(tmp)
    faults.point("publish.after_copy")
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


DONE_FILE = "DONE.json"
