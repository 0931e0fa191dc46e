"""Which items each rank trains on at each step. The order depends only on (seed, epoch), so a
resumed run sees exactly the batches the interrupted one would have seen."""

from __future__ import annotations

import logging

from lastmile.config import BatchPlan, TrainConfig
from lastmile.errors import ConfigError
from lastmile.seeding import derive_seed

log = logging.getLogger(__name__)


def total_steps(train: TrainConfig, n_items: int, plan: BatchPlan, *, field_prefix: str, unit: str) -> int:
    """Optimizer steps: full global batches per epoch x epochs, capped by max_steps."""
    per_epoch = n_items // plan.global_batch
    if per_epoch == 0:
        raise ConfigError(
            f"{field_prefix}.batch_size ({plan.global_batch}) is larger than the {n_items} training {unit}. "
            f"An optimizer step needs a full batch. Lower {field_prefix}.batch_size or add data."
        )
    total = per_epoch * train.epochs
    capped = bool(train.max_steps) and train.max_steps < total  # a run cut short on purpose (a smoke test)
    total = min(total, train.max_steps) if train.max_steps else total
    if train.warmup_steps >= total:
        problem = (f"{field_prefix}.warmup_steps ({train.warmup_steps}) is not below the run's {total} optimizer "
                   f"steps: the learning rate would never reach {field_prefix}.lr")
        if not capped:
            raise ConfigError(f"{problem}. Lower {field_prefix}.warmup_steps.")
        log.warning("%s (%s.max_steps=%d cuts the run short; fine for a smoke test)", problem, field_prefix,
                    train.max_steps)
    return total


def micro_batch_indices(n_items: int, step: int, plan: BatchPlan, *, rank: int, seed: int) -> list[list[int]]:
    """This rank's micro-batches (lists of item indices) for global step `step` (0-based).

    The step's global batch is a contiguous slice of the epoch's permutation; rank r takes the r-th
    block of micro_batch x grad_accum items, cut into grad_accum micro-batches.
    """
    import torch  # here, not at the top: lastmile.plan counts steps with total_steps and needs no torch

    per_epoch = n_items // plan.global_batch
    epoch, within = divmod(step, per_epoch)
    epoch_seed = derive_seed(seed, stage="data_order", step=epoch)  # rank 0 for all: one global permutation
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
    step_idx = order[within * plan.global_batch : (within + 1) * plan.global_batch]
    per_rank = plan.micro_batch * plan.grad_accum
    mine = step_idx[rank * per_rank : (rank + 1) * per_rank]
    return [mine[j : j + plan.micro_batch] for j in range(0, per_rank, plan.micro_batch)]
