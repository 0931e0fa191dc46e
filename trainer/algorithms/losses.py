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


def sft_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, *, global_tokens: int, grad_accum: int, world_size: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative log-likelihood of the target tokens of one micro-batch, scaled for the global batch.

    logprobs (B, T-1) fp32: log p(x_{t+1} | x_<=t); mask (B, T-1) bool: True on target tokens.
    global_tokens: target tokens in the whole optimizer step across ranks and micro-batches.
    Returns the loss to backpropagate and stats: `nll_sum` (this micro-batch's summed NLL) and
    `tokens`. The step's mean NLL is sum(nll_sum) / global_tokens over all micro-batches.
    """
    nll_sum = -masked_sum(logprobs, mask)
    loss = nll_sum * (grad_accum * world_size) / max(global_tokens, 1)
    return loss, {"nll_sum": float(nll_sum.detach()), "tokens": int(mask.sum())}
