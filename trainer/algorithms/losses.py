"""Loss aggregation for token-level objectives. Pure torch; imports nothing of ours.

Token-mean over the *global* batch (every rank, every accumulation micro-step) is the quantity
we optimize, so that 1 x 8 and 8 x 1 micro-batching, and 1 or N ranks, give the same gradient.
DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients over
data-parallel ranks; `token_mean_loss` multiplies that back out and divides by the global token count
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


def token_mean_loss(loss_sum: torch.Tensor, *, global_tokens: int, grad_accum: int, world_size: int) -> torch.Tensor:
    """The micro-batch loss to backpropagate for any token-summed loss (NLL, PPO policy or value),
    scaled so that the step's gradient is the gradient of the token-mean over the global batch.

    loss_sum: scalar, this micro-batch's loss summed over its real tokens. global_tokens: real
    tokens in the whole optimizer step across ranks and micro-batches. DeepSpeed divides by
    grad_accum and averages over world_size ranks, so we multiply both back in (module docstring).
    """
    return loss_sum * (grad_accum * world_size) / max(global_tokens, 1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate, summed over real tokens (Schulman et al. 2017, "Proximal Policy
    Optimization Algorithms", eq. 7, negated to be minimised):
        ratio_t = exp(logprobs_t - old_logprobs_t)
        loss_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - c, 1 + c))

    logprobs (B, R): current policy, with grad. old_logprobs (B, R): the policy that sampled the
    rollout. advantages (B, R). mask (B, R) bool: True = real token. old_logprobs and advantages
    are constants (detached here). Aggregate with `token_mean_loss`.
    Returns (loss_sum: scalar with grad, stats): stats are python floats summed over real tokens,
    so they add across micro-batches and ranks; divide by "tokens" for means:
      "clipped": tokens where the clipped term was strictly larger (their gradient is 0),
      "approx_kl": sum of 0.5 * (logprobs - old_logprobs)**2 (the k2 estimator of KL(old || new)),
      "ratio": sum of ratios, "tokens": number of real tokens.
    """
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    # Zero the log-ratio off the mask first, so padding cannot make inf/nan values or gradients.
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    log_ratio = torch.where(mask, logprobs.to(dtype) - old_logprobs.detach().to(dtype), zero)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach().to(dtype)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    is_clipped = clipped > unclipped
    loss_sum = masked_sum(torch.where(is_clipped, clipped, unclipped), mask)
    with torch.no_grad():
        stats = {
            "clipped": float((is_clipped & mask).sum()),
            "approx_kl": float(masked_sum(0.5 * log_ratio.square(), mask)),
            "ratio": float(masked_sum(ratio, mask)),
            "tokens": float(mask.sum()),
        }
    return loss_sum, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss, summed over real tokens (PPO value clipping of OpenAI baselines' ppo2, used
    for language models by Ziegler et al. 2019's lm-human-preferences):
        v_clip_t = clip(v_t, old_t - c, old_t + c)
        loss_t   = 0.5 * max((v_t - R_t)**2, (v_clip_t - R_t)**2)

    values (B, R): current value model, with grad. old_values (B, R): values at rollout time.
    returns (B, R): targets (`compute_gae`). mask (B, R) bool: True = real token. old_values and
    returns are constants (detached here). Aggregate with `token_mean_loss`.
    Returns (loss_sum: scalar with grad, stats): python floats summed over real tokens:
      "clipped": tokens where the clipped term was strictly larger (their gradient is 0),
      "squared_error": sum of (v - R)**2, "tokens": number of real tokens.
    """
    dtype = torch.promote_types(values.dtype, torch.float32)
    values, old_values, returns = values.to(dtype), old_values.detach().to(dtype), returns.detach().to(dtype)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    values = torch.where(mask, values, zero)  # padding cannot make inf/nan values or gradients
    old_values, returns = torch.where(mask, old_values, zero), torch.where(mask, returns, zero)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    is_clipped = clipped_error > unclipped_error
    loss_sum = masked_sum(0.5 * torch.where(is_clipped, clipped_error, unclipped_error), mask)
    with torch.no_grad():
        stats = {
            "clipped": float((is_clipped & mask).sum()),
            "squared_error": float(masked_sum(unclipped_error, mask)),
            "tokens": float(mask.sum()),
        }
    return loss_sum, stats
