"""The PPO stage's pure math (KL, reward shaping, KL controller, GAE, group baselines, whitening,
clipped losses) against numbers computed by hand in the comments."""

import json
import math

import pytest
import torch

from lastmile.algorithms.advantages import compute_gae, group_advantages, masked_whiten
from lastmile.algorithms.kl import KLController, kl_per_token, shape_rewards
from lastmile.algorithms.losses import policy_loss, value_loss


def close(actual, expected, atol=1e-5):
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32),
                          torch.as_tensor(expected, dtype=torch.float32), atol=atol)


# ----------------------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    logprobs = torch.tensor([[-1.0, -2.0, 7.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -50.0]])
    mask = torch.tensor([[True, True, False]])  # the third token is padding with garbage log-probs
    # d = ref - logp = [-0.5, 1.0]
    # k1 = -d = [0.5, -1.0]
    assert close(kl_per_token(logprobs, ref_logprobs, mask, estimator="k1"), [[0.5, -1.0, 0.0]])
    # k2 = d^2 / 2 = [0.125, 0.5]
    assert close(kl_per_token(logprobs, ref_logprobs, mask, estimator="k2"), [[0.125, 0.5, 0.0]])
    # k3 = exp(d) - d - 1 = [e^-0.5 + 0.5 - 1, e - 1 - 1] = [0.1065307, 0.7182818]
    assert close(kl_per_token(logprobs, ref_logprobs, mask, estimator="k3"),
                 [[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(logprobs, ref_logprobs, mask, estimator="k4")


def test_k3_and_k2_are_nonnegative_and_zero_when_policies_agree():
    torch.manual_seed(0)
    logprobs, ref_logprobs = -torch.rand(4, 16) * 5, -torch.rand(4, 16) * 5
    mask = torch.rand(4, 16) > 0.3
    for estimator in ("k2", "k3"):
        assert (kl_per_token(logprobs, ref_logprobs, mask, estimator=estimator) >= 0).all()
        assert (kl_per_token(logprobs, logprobs, mask, estimator=estimator) == 0).all()


def test_kl_padding_gives_no_nan_gradient():
    logprobs = torch.tensor([[-1.0, 80.0]], requires_grad=True)  # exp(d) would overflow at the pad
    ref_logprobs = torch.tensor([[-2.0, -80.0]])
    kl = kl_per_token(logprobs, ref_logprobs, torch.tensor([[True, False]]), estimator="k3")
    (grad,) = torch.autograd.grad(kl.sum(), logprobs)
    # d(k3)/d(logp) = -(exp(d) - 1) with d = -1: 1 - e^-1 = 0.6321206; zero at the pad
    assert close(grad, [[1 - math.exp(-1.0), 0.0]])


def test_shape_rewards_puts_the_score_on_the_last_real_token():
    scores = torch.tensor([2.0, -1.0, 3.0])
    kl = torch.tensor([[1.0, 2.0, 9.0], [0.5, 0.5, 0.5], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    rewards = shape_rewards(scores, kl, mask, kl_coef=0.1)
    # row 0: [-0.1*1, -0.1*2 + 2, pad] = [-0.1, 1.8, 0]
    # row 1: [-0.05, -0.05, -0.05 - 1] = [-0.05, -0.05, -1.05]
    # row 2: no real token -> all zeros (its score is dropped)
    assert close(rewards, [[-0.1, 1.8, 0.0], [-0.05, -0.05, -1.05], [0.0, 0.0, 0.0]])


def test_shape_rewards_finds_the_last_true_position_in_any_mask():
    scores = torch.tensor([5.0])
    kl = torch.zeros(1, 5)
    mask = torch.tensor([[False, True, False, True, False]])  # not a contiguous prefix
    assert close(shape_rewards(scores, kl, mask, kl_coef=0.1), [[0.0, 0.0, 0.0, 5.0, 0.0]])


def test_adaptive_kl_controller_moves_towards_the_target_and_clips_at_20_percent():
    ctl = KLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=1000)
    # error = clip(12/6 - 1 = 1.0, -0.2, 0.2) = 0.2; coef = 0.1 * (1 + 0.2 * 1000/10000) = 0.102
    assert ctl.value == pytest.approx(0.102)
    ctl = KLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=5.7, n_steps=1000)
    # error = 5.7/6 - 1 = -0.05 (inside the clip); coef = 0.1 * (1 - 0.05 * 0.1) = 0.0995
    assert ctl.value == pytest.approx(0.0995)
    ctl = KLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=0.0, n_steps=1000)
    # error = clip(-1.0) = -0.2; coef = 0.1 * (1 - 0.02) = 0.098
    assert ctl.value == pytest.approx(0.098)


def test_fixed_kl_controller_stays_fixed():
    ctl = KLController(0.05)
    for kl in (0.0, 100.0, 3.0):
        ctl.update(current_kl=kl, n_steps=512)
    assert ctl.value == 0.05


def test_kl_controller_state_round_trip_through_json():
    ctl = KLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=1000)
    restored = KLController(0.1, target=6.0, horizon=10000)
    restored.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert restored.value == ctl.value == pytest.approx(0.102)
    ctl.update(current_kl=9.0, n_steps=500)
    restored.update(current_kl=9.0, n_steps=500)
    assert restored.value == ctl.value


def test_kl_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="target"):
        KLController(0.1, target=0.0)
    with pytest.raises(ValueError, match="horizon"):
        KLController(0.1, target=6.0, horizon=0)


# ------------------------------------------------------------------------------------------ GAE


def test_gae_gamma_1_lambda_1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # delta_2 = 2 + 0 - 1.5 = 0.5 (V after the last token is 0)
    # delta_1 = 0 + 1.5 - 1.0 = 0.5
    # delta_0 = 1 + 1.0 - 0.5 = 1.5
    # A = [1.5 + 0.5 + 0.5, 0.5 + 0.5, 0.5] = [2.5, 1.0, 0.5]; returns = A + V = [3, 2, 2] (reward-to-go)
    assert close(advantages, [[2.5, 1.0, 0.5]])
    assert close(returns, [[3.0, 2.0, 2.0]])


def test_gae_gamma_09_lambda_05_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # gamma * lam = 0.45
    # delta_2 = 2 + 0.9*0 - 1.5 = 0.5;       A_2 = 0.5
    # delta_1 = 0 + 0.9*1.5 - 1.0 = 0.35;    A_1 = 0.35 + 0.45*0.5 = 0.575
    # delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4;     A_0 = 1.4 + 0.45*0.575 = 1.65875
    # returns = A + V = [2.15875, 1.575, 2.0]
    assert close(advantages, [[1.65875, 0.575, 0.5]])
    assert close(returns, [[2.15875, 1.575, 2.0]])


def test_gae_ignores_padding():
    """A padded row gives the numbers of the unpadded row; padding's rewards and values are ignored
    and both outputs are 0 there (right padding, and a hole in the middle)."""
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0, 5.0], [1.0, 9.0, 0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0, 7.0], [0.5, -3.0, 1.0, 1.5, 8.0]])
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, False]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert close(advantages, [[1.65875, 0.575, 0.5, 0.0, 0.0], [1.65875, 0.0, 0.575, 0.5, 0.0]])
    assert close(returns, [[2.15875, 1.575, 2.0, 0.0, 0.0], [2.15875, 0.0, 1.575, 2.0, 0.0]])


def test_gae_rows_are_independent_and_outputs_have_no_grad():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.0, 0.0, 0.0]], requires_grad=True)
    advantages, returns = compute_gae(rewards, values, torch.ones(2, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    assert close(advantages[1], [0.0, 0.0, 0.0]) and close(advantages[0], [2.5, 1.0, 0.5])
    assert not advantages.requires_grad and not returns.requires_grad


# ------------------------------------------------------------------------------- group baselines


def test_rloo_hand_values():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # groups [1, 2], [3, 4]: s_i - the other one = [1-2, 2-1, 3-4, 4-3]
    assert close(group_advantages(scores, 2, estimator="rloo"), [-1.0, 1.0, -1.0, 1.0])
    # one group of 4: s_i - mean of the other three:
    # 1 - (2+3+4)/3 = -2; 2 - 8/3 = -2/3; 3 - 7/3 = 2/3; 4 - 6/3 = 2
    assert close(group_advantages(scores, 4, estimator="rloo"), [-2.0, -2 / 3, 2 / 3, 2.0])


def test_grpo_hand_values():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # group [1, 2]: mean 1.5, unbiased std = sqrt((0.25 + 0.25) / 1) = 0.7071068 -> -+0.5/0.7071068
    s = 0.5 / math.sqrt(0.5)
    assert close(group_advantages(scores, 2, estimator="grpo", eps=0.0), [-s, s, -s, s])
    # group [1, 2, 3, 4]: mean 2.5, unbiased var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, std = 1.2909944
    std = math.sqrt(5 / 3)
    assert close(group_advantages(scores, 4, estimator="grpo", eps=0.0), [-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std])
    # eps keeps a group of equal scores at 0 instead of 0/0
    assert close(group_advantages(torch.tensor([3.0, 3.0, 1.0, 2.0]), 2, estimator="grpo"), [0.0, 0.0, -s, s],
                 atol=1e-4)


@pytest.mark.parametrize("estimator,whiten,expected", [
    # the estimators as cited: rloo and grpo are their own advantages, unwhitened (groups [1, 2], [3, 5])
    ("rloo", None, [-1.0, 1.0, -2.0, 2.0]),
    ("grpo", None, [-1 / math.sqrt(2), 1 / math.sqrt(2), -1 / math.sqrt(2), 1 / math.sqrt(2)]),
    # whitening asked for: mean 0, population variance 1 over the four: rloo's [-1, 1, -2, 2] / sqrt(2.5)
    ("rloo", True, [-1 / math.sqrt(2.5), 1 / math.sqrt(2.5), -2 / math.sqrt(2.5), 2 / math.sqrt(2.5)]),
    # remax: minus the greedy reward of each row's prompt (1.5 and 4.5, one per prompt, repeated per sample)
    ("remax", None, [-0.5, 0.5, -1.5, 0.5]),
])
def test_ppo_stage_uses_each_group_estimator_as_cited_unless_whitening_is_asked(estimator, whiten, expected):
    from types import SimpleNamespace

    from lastmile.config import load_config, whitens_advantages
    from lastmile.stages.ppo import compute_advantages

    cfg = load_config(None, [f"ppo.advantage={estimator}", "ppo.samples_per_prompt=2", "ppo.kl_coef=0.0"]
                      + ([f"ppo.whiten_advantages={str(whiten).lower()}"] if whiten is not None else []))
    assert whitens_advantages(cfg.ppo) is bool(whiten)
    mask = torch.tensor([[True, True, False]] * 4)
    zeros = torch.zeros(4, 3)
    rollout = SimpleNamespace(scores=torch.tensor([1.0, 2.0, 3.0, 5.0]), response_mask=mask, behaviour_logprobs=zeros,
                              ref_logprobs=zeros, values=None, greedy_scores=torch.tensor([1.5, 1.5, 4.5, 4.5]))
    ctx = SimpleNamespace(cfg=cfg, kl=SimpleNamespace(value=0.0))
    advantages, returns, _ = compute_advantages(ctx, _Sized(rollout))
    assert returns is None
    assert close(advantages[:, 0], expected, atol=1e-4) and close(advantages[:, 1], expected, atol=1e-4)
    assert close(advantages[:, 2], [0.0] * 4)
    assert load_config(None, []).ppo.whiten_advantages is None and whitens_advantages(load_config(None, []).ppo)


class _Sized:
    """A rollout stand-in with a length (SimpleNamespace has none)."""

    def __init__(self, ns):
        self.__dict__.update(vars(ns))

    def __len__(self):
        return len(self.scores)


def test_greedy_baseline_hand_values_and_shapes():
    from lastmile.algorithms.advantages import greedy_baseline_advantages

    # sampled rewards [0.2, 0.9] for a prompt whose greedy response scored 0.5: one below, one above
    a = greedy_baseline_advantages(torch.tensor([0.2, 0.9], dtype=torch.bfloat16), torch.tensor([0.5, 0.5]))
    assert a.dtype == torch.float32 and close(a, [-0.3, 0.4], atol=5e-3)
    with pytest.raises(ValueError, match="one greedy reward per sampled row"):
        greedy_baseline_advantages(torch.zeros(4), torch.zeros(2))


def test_group_advantages_rejects_bad_groups():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.arange(5.0), 2, estimator="rloo")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.arange(4.0), 1, estimator="grpo")
    with pytest.raises(ValueError, match="ppo"):
        group_advantages(torch.arange(4.0), 2, estimator="ppo")


# ------------------------------------------------------------------------------------ whitening


def test_masked_whiten_mean_0_var_1_over_the_mask_and_zero_outside():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, -100.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    # real entries 1..5: mean 3, population variance (4 + 1 + 0 + 1 + 4) / 5 = 2
    r2 = math.sqrt(2.0)
    whitened = masked_whiten(values, mask)
    assert close(whitened, [[-2 / r2, -1 / r2, 0.0, 0.0], [1 / r2, 2 / r2, 0.0, 0.0]])
    real = whitened[mask]
    assert abs(float(real.mean())) < 1e-6 and abs(float(real.var(unbiased=False)) - 1.0) < 1e-5
    # shift_mean=False keeps the mean (3) and only rescales
    assert close(masked_whiten(values, mask, shift_mean=False),
                 [[3 - 2 / r2, 3 - 1 / r2, 3.0, 0.0], [3 + 1 / r2, 3 + 2 / r2, 0.0, 0.0]])


# --------------------------------------------------------------------------------------- losses


def test_policy_loss_inside_the_clip_range_is_the_plain_surrogate():
    old = torch.tensor([[-1.0, -2.0]])
    logprobs = (old + torch.tensor([[0.1, -0.1]])).requires_grad_()
    advantages = torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    ratio = torch.exp(torch.tensor([0.1, -0.1]))  # [1.1051709, 0.9048374], both in [0.8, 1.2]
    # -sum(A * ratio) = -(1.1051709 - 1.8096748) = 0.7045039
    assert close(loss, -(advantages[0] * ratio).sum()) and close(loss, 0.7045039)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert close(grad, [(-advantages[0] * ratio).tolist()])  # d/dlogp (-A * ratio) = -A * ratio
    assert stats["clipped"] == 0 and stats["tokens"] == 2
    assert stats["ratio"] == pytest.approx(float(ratio.sum()))
    assert stats["approx_kl"] == pytest.approx(0.5 * 0.01 * 2)  # 0.5 * 0.1^2 per token


def test_policy_loss_outside_the_clip_range_takes_the_pessimistic_term():
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -3.0]])
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.0]])
    logprobs = (old + ratio.log()).detach()
    logprobs[0, 4] = 90.0  # padding with a garbage log-prob: exp(93) must not leak a nan
    logprobs.requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0, 4.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # token 0: A=+1, ratio 1.5: max(-1.5, -1.2) = -1.2  clipped
    # token 1: A=-1, ratio 1.5: max( 1.5,  1.2) =  1.5  unclipped, grad -A*ratio = 1.5
    # token 2: A=-1, ratio 0.5: max( 0.5,  0.8) =  0.8  clipped
    # token 3: A=+1, ratio 0.5: max(-0.5, -0.8) = -0.5  unclipped, grad -A*ratio = -0.5
    # sum = -1.2 + 1.5 + 0.8 - 0.5 = 0.6
    assert close(loss, 0.6)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert close(grad, [[0.0, 1.5, 0.0, -0.5, 0.0]])  # zero gradient where clipped and at the pad
    # approx_kl = 0.5 * (2 ln(1.5)^2 + 2 ln(0.5)^2) = ln(1.5)^2 + ln(2)^2 = 0.1644019 + 0.4804530
    assert stats == pytest.approx({"clipped": 2.0, "approx_kl": math.log(1.5) ** 2 + math.log(2) ** 2,
                                   "ratio": 4.0, "tokens": 4.0})


def test_value_loss_hand_values():
    values = torch.tensor([[1.0, 1.5, 1.5, 50.0]], requires_grad=True)
    old_values = torch.tensor([[0.9, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: v=1.0 within 0.9 +- 0.2 -> v_clip = 1.0; both errors (1-2)^2 = 1; 0.5 * 1 = 0.5
    # token 1: v_clip = 1.2; (1.5-2)^2 = 0.25 < (1.2-2)^2 = 0.64 -> clipped; 0.5 * 0.64 = 0.32
    # token 2: v_clip = 1.2; (1.5-1)^2 = 0.25 > (1.2-1)^2 = 0.04 -> unclipped; 0.5 * 0.25 = 0.125
    # sum = 0.945
    assert close(loss, 0.945)
    (grad,) = torch.autograd.grad(loss, values)
    # d/dv 0.5 (v - R)^2 = v - R: [-1, 0 (clipped), 0.5, 0 (pad)]
    assert close(grad, [[-1.0, 0.0, 0.5, 0.0]])
    # squared_error = 1 + 0.25 + 0.25 = 1.5
    assert stats == pytest.approx({"clipped": 1.0, "squared_error": 1.5, "tokens": 3.0})




def test_masked_whiten_over_ranks_equals_whitening_the_global_batch():
    """Two ranks' halves, each all-reducing its three sums (count, sum, centred square sum: the order
    masked_whiten asks for them) with the other rank's, whiten exactly like one rank holding both."""
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, -100.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    whole = masked_whiten(values, mask)
    mean = float(values[mask].mean())  # 3.0
    for r in (0, 1):
        v, m = values[1 - r : 2 - r], mask[1 - r : 2 - r]  # the other rank's row
        other = iter([float(m.sum()), float(v[m].sum()), float(((v[m] - mean) ** 2).sum())])
        mine = masked_whiten(values[r : r + 1], mask[r : r + 1], reduce_sum=lambda x: x + next(other))
        assert close(mine, whole[r : r + 1])


# ------------------------------------------------------------------------------------ hybrid reward


def test_hybrid_reward_terms_hand_values():
    from lastmile.algorithms.rewards import hybrid_reward

    total, parts = hybrid_reward(torch.tensor([11.0, 5.0]), torch.tensor([0.5, 0.1]), torch.tensor([1.5, 0.8]),
                                 torch.tensor([True, False]), rm_mean=9.0, rm_std=2.0, rm_weight=1.0, metric_weight=2.0,
                                 length_target_ratio=1.0, length_penalty=0.5, no_eos_penalty=1.0, clip=10.0)
    # row 0: (11-9)/2 = 1, + 2*0.5 = 1, - 0.5*|1.5-1| = -0.25, EOS: 0  -> 1.75
    # row 1: (5-9)/2 = -2, + 2*0.1 = 0.2, - 0.5*|0.8-1| = -0.1, no EOS: -1 -> -2.9
    assert close(total, [1.75, -2.9])
    assert close(parts["rm_term"], [1.0, -2.0]) and close(parts["no_eos_term"], [0.0, -1.0])
    clipped, _ = hybrid_reward(torch.tensor([100.0]), torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([True]),
                               rm_mean=0.0, rm_std=1.0, rm_weight=1.0, metric_weight=0.0, length_target_ratio=1.0,
                               length_penalty=0.0, no_eos_penalty=0.0, clip=5.0)
    assert close(clipped, [5.0])


# ------------------------------------------------------------------------------ guards and alarms


def test_parity_alarm_fires_on_a_gap_everywhere_or_on_one_token_but_not_on_bf16_rounding():
    from lastmile.stages.ppo import PPOState, _check_parity

    state = PPOState(iteration=3)
    rounding = {"parity/mean_abs": 0.03, "parity/max_abs": 0.48}  # bf16 at T = 0.7 (bench/logprob_parity.py)
    _check_parity(rounding, state, bound=0.1, max_bound=1.0)
    assert rounding["parity/alarm"] == 0.0 and state.alarms == []
    everywhere = {"parity/mean_abs": 0.37, "parity/max_abs": 0.9}  # a gap on every token
    _check_parity(everywhere, state, bound=0.1, max_bound=1.0)
    few = {"parity/mean_abs": 0.04, "parity/max_abs": 3.0}  # one token per response off: the mean hides it
    _check_parity(few, state, bound=0.1, max_bound=1.0)
    assert everywhere["parity/alarm"] == few["parity/alarm"] == 1.0 and len(state.alarms) == 2
    assert "by 0.3700 nats per token on average and by up to 0.9000 on one token" in state.alarms[0]
    assert "by up to 3.0000 on one token (ppo.parity_bound 0.1, ppo.parity_max_bound 1.0)" in state.alarms[1]


def test_weights_changed_counts_what_bf16_rounding_lets_through():
    """An fp32 master update below half a bf16 spacing (|w| / 256) leaves the stored bf16 weight as it was;
    `weights_changed` reports the share of stored weights that moved, against the frozen reference."""
    from types import SimpleNamespace

    import torch

    from lastmile.stages.ppo import weights_changed

    torch.manual_seed(0)
    ref = torch.nn.Linear(64, 64).to(torch.bfloat16)
    actor = torch.nn.Linear(64, 64).to(torch.bfloat16)
    actor.load_state_dict(ref.state_dict())
    models = SimpleNamespace(actor_engine=SimpleNamespace(module=actor), ref=ref)
    assert weights_changed(models) == 0.0
    master = [p.detach().float() for p in actor.parameters()]
    with torch.no_grad():
        for p, m in zip(actor.parameters(), master):
            m += 1e-5 * torch.sign(m)  # lr 1e-5, one Adam-sized step: below |w| / 256 for |w| > 5e-3
            p.copy_(m.to(torch.bfloat16))
    small = weights_changed(models)
    share_tiny = sum(int((m.abs() < 2.6e-3).sum()) for m in master) / sum(m.numel() for m in master)
    assert small < 0.1 and small <= share_tiny + 0.02  # only weights near 0 have a spacing that fine
    with torch.no_grad():
        for p, m in zip(actor.parameters(), master):
            m += 1e-2 * torch.sign(m)
            p.copy_(m.to(torch.bfloat16))
    assert weights_changed(models) == 1.0
    assert weights_changed(SimpleNamespace(actor_engine=None, ref=ref)) is None


def test_weights_changed_reads_a_zero3_partition_without_its_padding(monkeypatch):
    """Under ZeRO-3 each rank compares its partition (`ds_tensor`); the last one's padding is never
    written, so it is left out: 5 elements over 2 ranks are partitions of 3, rank 1 holds 2 and a pad."""
    import torch

    from lastmile.stages.ppo import _stored

    p = torch.nn.Parameter(torch.empty(0))
    p.ds_numel, p.ds_tensor = 5, torch.tensor([1.0, 2.0, float("nan")])
    assert _stored(p).numel() == 3  # one process, rank 0: all 3 of its elements are real
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert _stored(p).tolist() == [1.0, 2.0]  # rank 1: 5 - 3 = 2 real elements, the NaN pad left out


def test_evaluation_warns_when_bf16_rounding_kept_most_weights_still(caplog, tmp_path):
    """Under bf16 an in-loop evaluation after an iteration that left most stored weights unchanged warns
    and names precision=fp32; in fp32, or once half the weights have moved, it stays quiet."""
    import logging
    from types import SimpleNamespace

    from lastmile.stages.ppo import PPOState, evaluate

    logged = []

    def ctx(precision):
        cfg = SimpleNamespace(precision=precision, ppo=SimpleNamespace(best_metric="la_rougeL"))
        evaluator = SimpleNamespace(run=lambda it: {"iteration": it, "eval/policy/la_rougeL": 0.2},
                                    alarms=lambda result, previous: [])
        return SimpleNamespace(cfg=cfg, evaluator=evaluator, dist=SimpleNamespace(is_main=True),
                               tracker=SimpleNamespace(log_metrics=lambda m, step: logged.append(step)),
                               setup=SimpleNamespace(save_best=lambda path, best: None), stage_dir=tmp_path)

    def warnings(precision, changed):
        caplog.clear()
        state = PPOState(iteration=4, history=[{"iteration": 4, "policy/weights_changed": changed}])
        with caplog.at_level(logging.WARNING, logger="lastmile.stages.ppo"):
            evaluate(ctx(precision), state)
        assert state.best == {"iteration": 4, "metric": "la_rougeL", "value": 0.2}
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    found = warnings("bf16", 0.051)
    assert len(found) == 1 and "5.1% of the actor's bf16 weights" in found[0] and "precision=fp32" in found[0]
    assert warnings("bf16", 0.6) == []
    assert warnings("fp32", 0.051) == []
    assert logged == [4, 4, 4]  # every evaluation is logged, warning or not


def test_evaluation_reads_the_actor_side_of_its_kl_from_generation_only_in_fp32(monkeypatch):
    """fp32: generation's own log-probs (a forward gives the same numbers); bf16: a forward of the actor
    engine, like the reference's side, since cached decoding rounds differently from a forward."""
    from types import SimpleNamespace

    import torch

    from lastmile import rollout
    from lastmile.stages.ppo_eval import Evaluator

    greedy = SimpleNamespace(gen_logprobs=torch.tensor([[-0.5, -1.0, 0.0]]))  # exact in float32
    forwards = []

    def forward(model, batch, models):
        forwards.append(model)
        return torch.tensor([[-0.25, -1.5, 0.0]])

    monkeypatch.setattr(rollout, "response_logprobs", forward)
    for precision, expected, engines in (("fp32", [[-0.5, -1.0, 0.0]], []), ("bf16", [[-0.25, -1.5, 0.0]], ["actor"])):
        forwards.clear()
        ev = Evaluator.__new__(Evaluator)  # only its setup's models are read
        ev.setup = SimpleNamespace(models=SimpleNamespace(precision=precision, actor_engine="actor"))
        assert ev.actor_logprobs(greedy).tolist() == expected and forwards == engines


def test_in_loop_alarms_for_kl_length_and_reward_rising_while_the_metric_falls():
    from lastmile.config import PPOConfig
    from lastmile.stages.ppo_eval import find_alarms

    o = PPOConfig(kl_alarm=5.0, length_alarm_low=0.5, length_alarm_high=2.0, best_metric="la_rougeL")

    def result(it, kl=1.0, ratio=1.0, reward=0.0, metric=0.3):
        return {"iteration": it, "eval/policy/kl": kl, "eval/policy/length_ratio": ratio,
                "eval/policy/reward": reward, "eval/policy/la_rougeL": metric}

    assert find_alarms(result(5), None, o) == []
    assert find_alarms(result(5, reward=1.0, metric=0.31), result(0), o) == []  # both up: fine
    found = find_alarms(result(10, kl=6.0, ratio=2.5, reward=1.0, metric=0.25), result(5), o)
    assert len(found) == 3
    assert "KL to the reference 6.00 nats > ppo.kl_alarm 5.0" in found[0]
    assert "2.50x the reference length, outside [0.5, 2.0]" in found[1]
    assert "reward-model score rose (0.000 -> 1.000) while la_rougeL fell (0.3000 -> 0.2500)" in found[2]
    assert "0.10x" in find_alarms(result(10, ratio=0.1), None, o)[0]  # collapse to nothing
