"""Advantage estimators: GAE with a value model (PPO), group baselines without one (RLOO, GRPO), and
the greedy response's reward as the baseline (ReMax).
Pure torch; imports nothing of ours.

Advantages and returns are targets, never differentiated through: every function here returns
tensors without gradient, computed in float32 (or wider) whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

GROUP_ESTIMATORS = ("rloo", "grpo")


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                  reduce_sum: Callable[[float], float] | None = None) -> torch.Tensor:
    """Normalise to mean 0 and variance 1 over the real tokens.

    values (B, R) float, mask (B, R) bool (True = real token) -> (B, R), 0 where mask is False.
    Mean and population variance are taken over the True entries only, so padding does not move
    them. With shift_mean=False the mean is added back (only the scale changes), as TRL's
    `masked_whiten` and the `whiten` of OpenAI's lm-human-preferences do for advantages.
    `reduce_sum` sums a float over data-parallel ranks (e.g. an all-reduce): the statistics are then
    those of the global batch, so 1 rank and N ranks whiten alike.
    """
    reduce_sum = reduce_sum or (lambda x: x)
    values = torch.where(mask, values.detach().double(), torch.zeros((), dtype=torch.float64))
    count = max(reduce_sum(float(mask.sum())), 1.0)
    mean = reduce_sum(float(values.sum())) / count
    centred = torch.where(mask, values - mean, torch.zeros_like(values))
    var = reduce_sum(float(centred.square().sum())) / count
    whitened = centred / math.sqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened)).float()


@torch.no_grad()
def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation", eq. 16), one episode per row.

    rewards (B, R): per-token rewards (`shape_rewards`). values (B, R): V(s_t) from the value model.
    mask (B, R) bool: True = real response token.
    Returns (advantages (B, R), returns (B, R)), float32 or wider, both 0 where mask is False:
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V  (the value model's regression target, the TD(lambda) return)
    The episode ends at the last real token, so V and A beyond it are 0. Masked positions are
    skipped: their rewards and values are ignored and t+1 means the next *real* token, so a padded
    row gives the same numbers as the unpadded row.
    """
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards, values = rewards.to(dtype), values.to(dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V_{t+1}: 0 after the episode ends
    next_advantage = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    for t in reversed(range(values.shape[1])):  # R is small; each step is vectorised over B
        real = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(real, advantage, torch.zeros_like(advantage))
        next_value = torch.where(real, values[:, t], next_value)
        next_advantage = torch.where(real, advantage, next_advantage)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


@torch.no_grad()
def group_advantages(scores: torch.Tensor, group_size: int, *, estimator: str, eps: float = 1e-6) -> torch.Tensor:
    """Sequence-level advantages from a baseline computed within each group of responses to the same
    prompt (no value model).

    scores (B,) with B = n_groups * group_size, groups contiguous:
    [prompt0 sample0 .. sample{k-1}, prompt1 sample0 ..]. Returns (B,) float32 or wider.
      "rloo": A_i = s_i - mean_{j != i} s_j, the leave-one-out baseline (Kool et al. 2019, "Buy 4
              REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al. 2024, "Back to Basics:
              Revisiting REINFORCE Style Optimization for Learning from Human Feedback"). Equal to k/(k-1) * (s_i - mean(group)).
      "grpo": A_i = (s_i - mean(group)) / (std(group) + eps), std unbiased (Shao et al. 2024,
              "DeepSeekMath", eq. 3 with outcome supervision, sec. 4.1.2). eps keeps a group of equal scores at 0.
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"estimator ({estimator!r}) is not a known group estimator. "
                         f"Use one of {', '.join(GROUP_ESTIMATORS)}.")
    if group_size < 2:
        raise ValueError(f"group_size ({group_size}) must be >= 2. A group baseline needs at least two "
                         f"responses per prompt. Sample 2 or more responses per prompt.")
    if scores.ndim != 1 or scores.shape[0] % group_size != 0:
        raise ValueError(f"scores shape ({tuple(scores.shape)}) is not (n_groups * group_size,) with "
                         f"group_size {group_size}. Groups must be whole and contiguous. Pass a 1-D tensor "
                         f"whose length is a multiple of group_size.")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    grouped = scores.to(dtype).view(-1, group_size)  # (n_groups, k)
    if estimator == "rloo":
        leave_one_out_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        advantages = grouped - leave_one_out_mean
    else:
        mean = grouped.mean(dim=1, keepdim=True)
        advantages = (grouped - mean) / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    return advantages.reshape(-1)


@torch.no_grad()
def greedy_baseline_advantages(scores: torch.Tensor, greedy_scores: torch.Tensor) -> torch.Tensor:
    """ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method
    for Aligning Large Language Models", eq. 7; self-critical training, Rennie et al. 2017): the
    baseline of a sampled response is the reward of the greedy response to the same prompt, so the
    update moves the policy relative to the decoding that is evaluated.

    scores (B,) of the sampled responses; greedy_scores (B,) the greedy response's reward of each
    row's prompt (repeated for the samples of one prompt). Returns (B,) scores - greedy_scores,
    float32 or wider: positive where a sample beat greedy decoding."""
    if scores.shape != greedy_scores.shape or scores.ndim != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and greedy_scores {tuple(greedy_scores.shape)} must both be "
                         "(B,): one greedy reward per sampled row. Repeat each prompt's greedy reward for its samples.")
    dtype = torch.promote_types(torch.promote_types(scores.dtype, greedy_scores.dtype), torch.float32)
    return scores.to(dtype) - greedy_scores.to(dtype)
