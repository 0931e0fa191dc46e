"""The hybrid sequence reward. Pure torch; imports nothing of ours.

    score = rm_weight * (rm - mean) / std                     model-based: the learned reward model,
                                                              normalized by the reference scores' stats
          + metric_weight * metric                            model-free: e.g. la-ROUGE-L vs the references
          - length_penalty * |length_ratio - target_ratio|    words / reference words
          - no_eos_penalty * (no EOS produced)
    clipped to [-clip, clip].

The hybrid of a model-based and a model-free term is the reward of the last-mile RL paper this
project follows; the length terms keep the policy from trading content for length (Singhal et al.
2023, "A Long Way to Go"), and the no-EOS penalty is TRL's `missing_eos_penalty`.
"""

from __future__ import annotations

import torch


def hybrid_reward(rm_scores: torch.Tensor, metric: torch.Tensor, length_ratio: torch.Tensor, ended: torch.Tensor, *,
                  rm_mean: float, rm_std: float, rm_weight: float, metric_weight: float, length_target_ratio: float,
                  length_penalty: float, no_eos_penalty: float, clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """rm_scores (B,), metric (B,), length_ratio (B,), ended (B,) bool -> (scores (B,), terms name -> (B,))."""
    terms = {
        "rm": rm_weight * (rm_scores.float() - rm_mean) / max(rm_std, 1e-6),
        "metric": metric_weight * metric.float(),
        "length": -length_penalty * (length_ratio.float() - length_target_ratio).abs(),
        "no_eos": -no_eos_penalty * (~ended).float(),
    }
    total = torch.stack(list(terms.values())).sum(0).clamp(-clip, clip)
    return total, {f"{k}_term": v for k, v in terms.items()}
