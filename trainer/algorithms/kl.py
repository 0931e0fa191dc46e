"""KL penalty between the policy and the frozen reference model. Pure torch; imports nothing of ours.

PPO for language models (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences"; Stiennon et al. 2020, "Learning to summarize from human feedback") optimises the
reward-model score minus beta * KL(pi || pi_ref), paid token by token. This module holds the
per-token KL estimators, the reward shaping that combines them with the score, and the
controller that sets beta.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *,
                 estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    logprobs (B, R): log pi(a_t | s_t) of the sampled response tokens under the policy.
    ref_logprobs (B, R): the same tokens under the reference model.
    mask (B, R) bool: True = real response token.
    Returns (B, R) float, 0 where mask is False.

    With d = log pi_ref - log pi (= log r, r = pi_ref / pi), Schulman 2020, "Approximating KL
    Divergence" (http://joschu.net/blog/kl-approx.html):
      k1 = -d                 unbiased, high variance, can be negative;
      k2 = d**2 / 2           biased, low variance, >= 0;
      k3 = exp(d) - d - 1     = (r - 1) - log r: unbiased, low variance, >= 0.
    Gradients flow through both inputs; detach them when the KL is a reward rather than a loss.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator ({estimator!r}) is not a known KL estimator. "
                         f"Schulman 2020 defines {', '.join(KL_ESTIMATORS)}. Use one of those.")
    # Zero d off the mask first, so padding (whatever its log-probs) cannot make inf/nan
    # values or gradients: every estimator is 0 at d = 0.
    d = torch.where(mask, ref_logprobs - logprobs, torch.zeros_like(logprobs))
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * d.square()
    else:
        kl = torch.expm1(d) - d
    return torch.where(mask, kl, torch.zeros_like(kl))


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: the KL penalty on every real token, the sequence score on the last one.

    scores (B,): reward-model score of each response (before shaping).
    kl (B, R): per-token KL estimate (`kl_per_token`), normally detached.
    mask (B, R) bool: True = real response token; need not be a contiguous prefix.
    Returns rewards (B, R): r_t = -kl_coef * kl_t on real tokens, plus scores[b] at the last True
    position of row b; 0 off the mask; a row with no True position is all zeros.

    Ziegler et al. 2019, sec. 2.2: R(x, y) = r(x, y) - beta * log(pi(y|x) / rho(y|x)); Stiennon et
    al. 2020 use the same KL-penalised reward. Spread over tokens (as in OpenAI's
    lm-human-preferences): the KL term is a per-token reward and the reward-model score arrives
    when the episode ends.
    """
    dtype = torch.promote_types(kl.dtype, scores.dtype)
    rewards = torch.where(mask, -kl_coef * kl.to(dtype), torch.zeros((), dtype=dtype, device=kl.device))
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)  # (B,), -1 = no real token
    has_token = last >= 0
    bonus = torch.where(has_token, scores.to(dtype), torch.zeros_like(scores, dtype=dtype))
    return rewards.scatter_add(1, last.clamp(min=0)[:, None], bonus[:, None])


class KLController:
    """The KL coefficient beta: fixed, or adapted towards a target KL.

    Adaptive rule (Ziegler et al. 2019, sec. 2.2; the `AdaptiveKLController` of OpenAI's
    lm-human-preferences and TRL):
        e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon)
    so beta rises when the policy drifts further than the target and falls when it stays closer;
    the clip bounds the change per update.
    """

    def __init__(self, coef: float, *, target: float | None = None, horizon: int = 10000):
        if coef < 0:
            raise ValueError(f"coef ({coef}) is negative. A negative KL coefficient rewards drifting from "
                             f"the reference model. Use a coefficient >= 0.")
        if target is not None and target <= 0:
            raise ValueError(f"target ({target}) must be > 0. The adaptive rule divides by the target KL. "
                             f"Set a positive target, or None for a fixed coefficient.")
        if horizon <= 0:
            raise ValueError(f"horizon ({horizon}) must be > 0. It is the number of samples over which the "
                             f"coefficient adapts. Use a positive integer such as 10000.")
        self.value = float(coef)
        self.target = None if target is None else float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt the coefficient after `n_steps` samples (sequences) with mean KL `current_kl`.
        A no-op when the controller is fixed (target is None)."""
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        """The state to checkpoint: the current coefficient (target and horizon come from the config)."""
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the coefficient saved by `state_dict`."""
        self.value = float(state["value"])
