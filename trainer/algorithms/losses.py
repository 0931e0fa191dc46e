"""Loss aggregation for token-level objectives. Pure torch; imports nothing of ours.

Token-mean over the *global* batch (every rank, every accumulation micro-step) is the quantity
we optimize, so that 1 x 8 and 8 x 1 micro-batching, and 1 or N ranks, give the same gradient.
DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients over
data-parallel ranks; `sft_loss` multiplies that back out and divides by the global token count
(the aggregation argument of verl's `agg_loss`, `token-mean` mode).
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values (B, T) float, mask (B, T) bool -> scalar sum over True entries."""
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values (B, T), mask (B, T) bool -> scalar mean over True entries (0 when none)."""
    return masked_sum(values, mask) / mask.sum().clamp(min=1)


def sft_loss(nll_sum: torch.Tensor, *, global_tokens: int, grad_accum: int, world_size: int) -> torch.Tensor:
    """The micro-batch loss to backpropagate, scaled so that the step's gradient is the gradient of
    the token-mean NLL over the global batch.

    nll_sum: scalar, summed negative log-likelihood of this micro-batch's target tokens
    (-masked_sum(logprobs (B, T-1), mask (B, T-1))). global_tokens: target tokens in the whole
    optimizer step across ranks and micro-batches. DeepSpeed divides by grad_accum and averages
    over world_size ranks, so we multiply both back in.
    """
    return nll_sum * (grad_accum * world_size) / max(global_tokens, 1)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry loss for a reward model: -log sigmoid(r_chosen - r_rejected - margin), mean over pairs.

    chosen (P,), rejected (P,) scalar scores. `margin` > 0 asks for a gap (Llama 2 reward model,
    Touvron et al. 2023, eq. 2). Stats: pairwise accuracy and mean score gap.
    """
    gap = chosen.float() - rejected.float()
    loss = -torch.nn.functional.logsigmoid(gap - margin).mean()
    detached = gap.detach()
    return loss, {"accuracy": float((detached > 0).float().mean()), "margin": float(detached.mean())}


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties count 1/2
    (the Mann-Whitney U statistic). positive (P,), negative (Q,)."""
    pos, neg = positive.float()[:, None], negative.float()[None, :]
    return float(((pos > neg).float() + 0.5 * (pos == neg).float()).mean())
