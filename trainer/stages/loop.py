"""The optimizer-step loop the supervised stages share (SFT, reward model): one typed context instead
of a dozen arguments, one loop instead of two copies.

Each step: seed from (seed, stage, step, rank) with `seeding.seed_everything` (dropout and data order
depend on the step only, so resume is exact), the stage's `step_fn`, its `on_step` (history,
validation), metrics to the tracker, a checkpoint every `save_every` steps or when a stop signal
arrived (then `Preempted`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from lastmile import checkpoint, preemption, seeding
from lastmile.config import BatchPlan, Config, TrainConfig
from lastmile.distributed import DistInfo
from lastmile.tracking import Tracker


@dataclass
class TrainState:
    """What a supervised stage saves in trainer_state.json to resume exactly (its engines hold the rest)."""

    step: int = 0  # optimizer steps done
    run_id: str | None = None  # the stage's MLflow run, reopened on resume

    @classmethod
    def resumed(cls, saved: dict | None):
        """From a checkpoint's trainer_state.json (None: a fresh start). An unknown key is an error, not lost."""
        return cls(**(saved or {}))


@dataclass
class SFTState(TrainState):
    loss_history: list = field(default_factory=list)  # (step, training loss) per step
    val_history: list = field(default_factory=list)  # (step, validation loss) per validation


@dataclass
class RewardModelState(TrainState):
    history: list = field(default_factory=list)  # (step, loss, accuracy) per step


@dataclass
class TrainContext:
    cfg: Config
    dist: DistInfo
    train: TrainConfig  # cfg.sft or cfg.rm
    engine: Any  # the DeepSpeed engine
    ds: dict  # its filled DeepSpeed config
    model: Any  # the Hugging Face model inside the engine's module, saved in checkpoints
    prefix: str  # that model's attribute in the engine's module, with a dot ("lm.", "rm.")
    tokenizer: Any
    plan: BatchPlan
    total_steps: int
    tracker: Tracker
    stage_dir: Path
    name: str  # progress bar label; also the stage name its seeds derive from

    @property
    def ckpt_root(self) -> Path:
        return self.stage_dir / "checkpoints"

    def save(self, state: TrainState) -> Path:
        """Collective: an atomic checkpoint of the engine and `state` at state.step."""
        return checkpoint.save_checkpoint(self.engine, self.ds, self.model, self.tokenizer, dataclasses.asdict(state),
                                          self.ckpt_root, state.step, keep=self.train.keep_checkpoints,
                                          prefix=self.prefix)

    def final_checkpoint(self, state: TrainState) -> Path:
        """The checkpoint at the last step (saved now unless it exists)."""
        final = self.ckpt_root / f"step-{state.step:07d}"
        return final if final.is_dir() else self.save(state)


def train_loop(ctx: TrainContext, state: TrainState, step_fn: Callable[[int], dict[str, float]], *,
               on_step: Callable[[TrainState, dict], None] | None = None, log_every: int = 1,
               show: tuple[str, ...] = ()) -> None:
    """Run optimizer steps from state.step to ctx.total_steps. step_fn(step) -> metrics."""
    bar = tqdm(total=ctx.total_steps, initial=state.step, desc=ctx.name, unit="step", disable=not ctx.dist.is_main)
    ctx.engine.train()
    while state.step < ctx.total_steps:
        t0 = time.perf_counter()
        seeding.seed_everything(ctx.cfg.seed, stage=ctx.name, step=state.step, rank=ctx.dist.rank)
        metrics = step_fn(state.step)
        state.step += 1
        metrics["time/step_s"] = time.perf_counter() - t0
        if ctx.dist.is_main and state.step % log_every == 0:
            ctx.tracker.log_metrics(metrics, step=state.step)
        if on_step is not None:
            on_step(state, metrics)
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.4f}" for k in show if k in metrics})
        stop = preemption.requested()
        if (ctx.train.save_every and state.step % ctx.train.save_every == 0) or stop:
            ctx.save(state)
        if stop:
            bar.close()
            raise preemption.Preempted(f"stopped at step {state.step}; the next run resumes from the checkpoint")
    bar.close()
