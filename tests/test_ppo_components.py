"""PPO components on a tiny model in this process (ZeRO-3 with one rank has the same hooks and
partitioning machinery as with many): EOS truncation, the hybrid engine's generation mode against
plain `generate`, log-prob parity, one update, and 1x8 = 8x1 micro-batching through DeepSpeed."""

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from lastmile import distributed
from lastmile.config import OptimSettings, load_config, plan_ppo
from lastmile.hybrid_engine import HybridEngine, Sampling, truncate_after_eos
from lastmile.models import TokenLogprobModel, load_causal_lm
from lastmile.rollout import Rollout, RolloutModels, response_logprobs

from conftest import TINY

OPTIM = OptimSettings(lr=1e-2, weight_decay=0.0, warmup_steps=0, schedule="constant", max_grad_norm=1.0)


def test_truncate_after_eos():
    eos = 2
    tokens = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 5, 5, 5, 5]])
    mask, ended = truncate_after_eos(tokens, eos)
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5, [True, False, False, False, False]]
    assert ended.tolist() == [True, False, True]


@pytest.fixture(scope="module")
def dist():
    return distributed.setup()


def _engine(stage: int, micro: int, accum: int, lm=None):
    cfg = load_config(TINY)
    if lm is None:
        lm, _ = load_causal_lm(cfg.model, torch.device("cpu"), seed=cfg.seed)
    plan = plan_ppo(8, 1, micro * accum, micro, 1, 1).train
    ds = distributed.ds_config_for(f"zero{stage}", plan, OPTIM, hidden_size=lm.config.hidden_size)
    engine = distributed.build_engine(TokenLogprobModel(lm, logprob_impl="chunked"), ds, OPTIM, total_steps=10)
    return engine, lm, ds


def _prompts(n=4, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[1, :3] = False  # left padding on one row
    ids[1, :3] = 0
    return ids, mask


def test_generation_mode_matches_plain_generate_and_training_resumes(dist, tokenizer):
    engine, lm, ds = _engine(3, micro=2, accum=1)
    hybrid = HybridEngine(engine, lm, ds, torch.device("cpu"), gather="all")
    assert hybrid.gather == "all"
    ids, mask = _prompts()
    with hybrid.generation_mode():
        full = {n: p.detach().clone() for n, p in lm.named_parameters()}
        assert all(p.numel() == p.ds_numel for p in lm.parameters())  # whole weights while generating
        g = hybrid.generate(ids, mask, Sampling(12, do_sample=False), eos_id=tokenizer.eos_token_id,
                            pad_id=tokenizer.pad_token_id)
    plain = load_causal_lm(load_config(TINY).model, torch.device("cpu"), seed=0)[0].eval()
    missing, _ = plain.load_state_dict(full, strict=False)
    assert set(missing) <= {"lm_head.weight"}  # tied to the input embedding
    with torch.no_grad():
        out = plain.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    expected = out[:, ids.shape[1]:]
    assert torch.equal(g.response_ids[g.response_mask], expected[:, : g.response_ids.shape[1]][g.response_mask])
    # back in training mode: partitioned again, hooks back, and a training step works
    assert all(p.numel() == 0 for p in lm.parameters() if p.ds_numel > 10 * lm.config.hidden_size)
    assert len(engine.optimizer.parameter_offload.forward_hooks) > 0
    # parity: the training forward reproduces the log-probs recorded while generating
    r = Rollout((0, 1, 2, 3), ids, mask, g.response_ids, g.response_mask, g.ended, ("",) * 4, g.logprobs)
    models = RolloutModels(hybrid, engine, None, None, None, tokenizer, {"mean": 0.0, "std": 1.0},
                           torch.device("cpu"), "fp32", 2)
    train_lp = response_logprobs(engine, r, models)
    assert (train_lp - g.logprobs)[g.response_mask].abs().max() < 1e-4
    # sampling at a temperature: the training forward at that temperature reproduces the recorded log-probs
    torch.manual_seed(0)
    with hybrid.generation_mode():
        hot = hybrid.generate(ids, mask, Sampling(8, do_sample=True, temperature=0.7), eos_id=tokenizer.eos_token_id,
                              pad_id=tokenizer.pad_token_id)
    r_hot = Rollout((0, 1, 2, 3), ids, mask, hot.response_ids, hot.response_mask, hot.ended, ("",) * 4, hot.logprobs)
    hot_lp = response_logprobs(engine, r_hot, models, temperature=0.7)
    assert (hot_lp - hot.logprobs)[hot.response_mask].abs().max() < 1e-4
    assert (response_logprobs(engine, r_hot, models) - hot.logprobs)[hot.response_mask].abs().max() > 1e-3
    before = [p.ds_tensor.clone() for p in lm.parameters()]
    seq, attn, target = r.sequences(torch.device("cpu"))
    for half in (slice(0, 2), slice(2, 4)):
        loss = -engine(seq[half], attn[half], target[half], reduction="sum") / 10
        engine.backward(loss)
        engine.step()
    assert any(not torch.equal(b, p.ds_tensor) for b, p in zip(before, lm.parameters()))


def _fake_rollout(n=8, P=5, R=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(10, 1000, (n, P), generator=g)
    resp = torch.randint(10, 1000, (n, R), generator=g)
    rmask = torch.ones(n, R, dtype=torch.bool)
    for i in range(n):
        rmask[i, R - (i % 3):] = False  # different response lengths
    old = -torch.rand(n, R, generator=g) * 3
    return Rollout(tuple(range(n)), prompt, torch.ones(n, P, dtype=torch.bool), resp, rmask,
                   torch.ones(n, dtype=torch.bool), ("",) * n, old, old_logprobs=old, ref_logprobs=old,
                   scores=torch.randn(n, generator=g))


def capture_step_gradients(engine) -> dict[str, torch.Tensor]:
    """A dict that receives the engine's full gradients (ZeRO-3's `safe_get_full_grad`) at each optimizer
    step, before clipping and the step itself."""
    from deepspeed.utils import safe_get_full_grad

    grads: dict[str, torch.Tensor] = {}
    real_step = engine.step

    def step():
        if engine.is_gradient_accumulation_boundary():
            grads.update({n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()})
        real_step()

    engine.step = step
    return grads


def _update_gradients(micro: int, accum: int, lm, *, old_from: str = "given",
                      record: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The actor's gradients at the optimizer step (before clipping and the step itself), read through
    the real ZeRO-3 engine with `safe_get_full_grad` while one PPO update runs. `old_from`: the fake
    rollout's old log-probs (`given`), a separate training forward (`forward`), or none, so that the
    update's own forward gives them (`update`, into `record`)."""
    from lastmile.stages import ppo

    engine, lm, ds = _engine(3, micro, accum, lm=lm)
    grads = capture_step_gradients(engine)
    cfg = load_config(TINY, ["ppo.advantage=rloo", "ppo.samples_per_prompt=2", "ppo.clip_range=0.2", "ppo.epochs=1"])
    plan = plan_ppo(8 // 2, 2, 8, micro, 1, 1)
    models = RolloutModels(None, engine, None, None, None, None, {}, torch.device("cpu"), "fp32", micro)
    ctx = SimpleNamespace(cfg=cfg, plan=plan, models=models, dist=SimpleNamespace(rank=0))
    b = _fake_rollout()
    if old_from == "forward":
        b = dataclasses.replace(b, old_logprobs=response_logprobs(engine, b, models))
    elif old_from == "update":
        b = dataclasses.replace(b, old_logprobs=None)
    adv = torch.linspace(-1, 1, 8)[:, None] * b.response_mask
    stats = ppo.update(ctx, b, adv, None, iteration=0, record=record)
    assert stats["policy/clipfrac"] >= 0 and torch.isfinite(torch.tensor(stats["policy/loss"]))
    return grads


def test_one_by_eight_equals_eight_by_one_through_deepspeed(dist):
    """The same minibatch as 1 micro-batch of 8 or 8 accumulated micro-batches of 1 (ZeRO-3 engine):
    the same gradient, element by element (a wrong scale or a dropped micro-batch would show)."""
    base, _ = load_causal_lm(load_config(TINY).model, torch.device("cpu"), seed=0)
    a = _update_gradients(8, 1, copy.deepcopy(base))
    b = _update_gradients(1, 8, copy.deepcopy(base))
    assert a.keys() == b.keys() and len(a) > 5
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in a.values())).item()
    assert norm > 1e-6  # a real gradient, not zeros
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6 * norm), k


def test_old_logprobs_from_the_update_forward_equal_a_separate_forward(dist):
    """ppo.old_logprobs=update (one epoch, one minibatch): the update's own forward, detached, serves as
    the old log-probs. Same values as the separate training forward (to 1e-5) and the same gradients."""
    base, _ = load_causal_lm(load_config(TINY).model, torch.device("cpu"), seed=0)
    engine, _, _ = _engine(3, 4, 2, lm=copy.deepcopy(base))
    models = RolloutModels(None, engine, None, None, None, None, {}, torch.device("cpu"), "fp32", 4)
    separate = response_logprobs(engine, _fake_rollout(), models)
    record = torch.full_like(separate, float("nan"))
    from_forward = _update_gradients(4, 2, copy.deepcopy(base), old_from="forward")
    from_update = _update_gradients(4, 2, copy.deepcopy(base), old_from="update", record=record)
    mask = _fake_rollout().response_mask
    assert (record - separate)[mask].abs().max() < 1e-5
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in from_forward.values())).item()
    assert norm > 1e-6 and from_forward.keys() == from_update.keys()
    for k in from_forward:
        assert torch.allclose(from_forward[k], from_update[k], rtol=1e-5, atol=1e-6 * norm), k


def test_old_logprobs_update_needs_one_pass_in_one_minibatch():
    from lastmile.plan import make_plan
    from lastmile.stages.ppo_setup import resolve_old_logprobs

    cfg = load_config(TINY, ["ppo.old_logprobs=update"])  # tiny: 2 epochs of 2 minibatches
    assert any(p.startswith("ppo.old_logprobs (update) needs one pass") for p in make_plan(cfg, "ppo", 1).problems)
    one_pass = load_config(TINY, ["ppo.epochs=1", "ppo.minibatch_size=8"])
    p = make_plan(one_pass, "ppo", 1).ppo
    assert resolve_old_logprobs(one_pass.ppo, p, bf16=False) == "update"
    assert resolve_old_logprobs(one_pass.ppo, p, bf16=True) == "forward"  # generation and training forwards differ
    assert resolve_old_logprobs(cfg.ppo, make_plan(load_config(TINY), "ppo", 1).ppo, bf16=False) == "update"
    assert resolve_old_logprobs(load_config(TINY).ppo, make_plan(load_config(TINY), "ppo", 1).ppo, bf16=False) == "forward"


def test_update_lowers_the_surrogate(dist):
    """One PPO update on fixed advantages raises the log-prob of positive-advantage tokens."""
    from lastmile.stages import ppo

    engine, lm, _ = _engine(2, 4, 2)
    cfg = load_config(TINY)
    models = RolloutModels(None, engine, None, None, None, None, {}, torch.device("cpu"), "fp32", 4)
    b = _fake_rollout()
    first = response_logprobs(engine, b, models)
    b = Rollout(**{**b.__dict__, "old_logprobs": first})
    adv = torch.where(torch.arange(8)[:, None] < 4, 1.0, -1.0) * b.response_mask
    ctx = SimpleNamespace(cfg=cfg, plan=plan_ppo(8, 1, 8, 4, 1, 1), models=models, dist=SimpleNamespace(rank=0))
    ppo.update(ctx, b, adv, None, iteration=0)
    after = response_logprobs(engine, b, models)
    surrogate = lambda lp: -((lp - first).exp() * adv)[b.response_mask].sum()  # noqa: E731
    assert surrogate(after) < surrogate(first)


def test_ppo_batch_plan_divides_exactly():
    plan = plan_ppo(8, 4, 16, 2, 2, 2)
    assert (plan.rollout, plan.rollout_per_rank, plan.minibatches, plan.steps_per_iteration) == (32, 16, 2, 4)
    assert (plan.train.global_batch, plan.train.grad_accum) == (16, 4)
    from lastmile.errors import ConfigError

    with pytest.raises(ConfigError, match=r"ppo.minibatch_size \(12\) does not divide"):
        plan_ppo(8, 4, 12, 2, 1, 2)
    with pytest.raises(ConfigError, match="prompts_per_iteration"):
        plan_ppo(3, 1, 3, 1, 1, 2)


def test_non_finite_rewards_skip_the_rollout_then_stop_the_run(dist):
    from lastmile.errors import UserError
    from lastmile.stages.ppo import PPOState, _finite

    good = _fake_rollout()
    bad = Rollout(**{**good.__dict__, "scores": torch.tensor([float("nan")] + [0.0] * 7)})
    state = PPOState(iteration=5)
    assert _finite(good, state, max_bad=2) and state.bad_batches == 0
    assert not _finite(bad, state, max_bad=2) and state.bad_batches == 1  # skipped with a warning
    assert _finite(good, state, max_bad=2) and state.bad_batches == 0  # a good rollout resets the count
    assert not _finite(bad, state, max_bad=2)
    with pytest.raises(UserError, match=r"2 rollouts in a row had non-finite rewards or log-probs \(limit "
                                         r"ppo.max_bad_batches=2\)"):
        _finite(bad, state, max_bad=2)


def test_critic_starts_in_the_reward_units():
    """The critic from the reward model predicts rm_weight * (score - mean) / std, the reward's rm term,
    not the raw score (which would overestimate every return by about mean / std)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lastmile.models import ScalarRewardModel, ValueModel

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                    pad_token_id=0)).eval()
    ids = torch.randint(1, 50, (3, 6))
    mask = torch.ones_like(ids, dtype=torch.bool)
    raw = ScalarRewardModel(rm)(ids, mask)  # (3,): the score at the last token
    mean, std, weight = 5.2, 1.2, 2.0
    critic = ValueModel(rm, scale=weight / std, shift=-weight * mean / std)
    with torch.no_grad():
        values = critic(ids, mask)  # (3, 6)
    assert values.shape == (3, 6)
    torch.testing.assert_close(values[:, -1], weight * (raw - mean) / std, rtol=1e-4, atol=1e-4)
    assert [n for n, p in critic.named_parameters() if p.requires_grad and n == "shift"] == ["shift"]
    identity = ValueModel(rm, scale=1.0, shift=0.0)  # no rescaling: the raw score itself
    torch.testing.assert_close(identity(ids, mask)[:, -1], raw, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_update(dist):
    """ppo.gradient_checkpointing: the actor's gradient at the optimizer step (ZeRO-3, 2 micro-batches)
    equals the one without checkpointing, element by element."""
    from lastmile.stages.ppo_setup import checkpoint_activations

    base, _ = load_causal_lm(load_config(TINY).model, torch.device("cpu"), seed=0)
    plain = _update_gradients(4, 2, copy.deepcopy(base))
    lm = copy.deepcopy(base).eval()  # as from_pretrained returns it
    checkpoint_activations(lm)
    assert lm.training
    saved = {}
    ids = torch.randint(10, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    for name, model in (("plain", copy.deepcopy(base).eval()), ("checkpointed", copy.deepcopy(lm))):
        n = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.__setitem__(0, n[0] + t.numel()) or t, lambda t: t):
            model.model(input_ids=ids).last_hidden_state.sum()
        saved[name] = n[0]
    assert saved["checkpointed"] < saved["plain"] / 3  # the decoder keeps little for the backward
    checkpointed = _update_gradients(4, 2, lm)
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in plain.values())).item()
    assert norm > 1e-6 and plain.keys() == checkpointed.keys()
    for k in plain:
        assert torch.allclose(plain[k], checkpointed[k], rtol=1e-5, atol=1e-7 * norm), k


def test_a_skipped_rollout_still_gets_its_evaluation_checkpoint_and_stop(monkeypatch):
    """An iteration whose rollout was skipped (non-finite) still counts: the in-loop evaluation and the
    checkpoint due at it happen (the budget curve keeps its point), and a stop signal is honoured."""
    from types import SimpleNamespace

    from lastmile import preemption
    from lastmile.stages import ppo

    calls = []

    def fake_iterate(ctx, state):
        state.iteration += 1
        return None if state.iteration in (2, 3) else {"reward/score_mean": 0.0, "kl/seq_mean": 0.0}

    monkeypatch.setattr(ppo, "iterate", fake_iterate)
    monkeypatch.setattr(ppo, "evaluate", lambda ctx, s: calls.append(("eval", s.iteration)))
    monkeypatch.setattr(ppo, "save", lambda ctx, s: calls.append(("save", s.iteration)))
    monkeypatch.setattr(ppo, "trim_host_memory", lambda: None)
    cfg = SimpleNamespace(ppo=SimpleNamespace(iterations=6, eval_every=2, save_every=2, stop_on_alarm=True))
    ctx = SimpleNamespace(cfg=cfg, dist=SimpleNamespace(is_main=False))
    ppo.train(ctx, ppo.PPOState())
    assert calls == [("eval", 0), ("eval", 2), ("save", 2), ("eval", 4), ("save", 4), ("save", 6)]

    calls.clear()
    monkeypatch.setattr(preemption, "requested", lambda: True)  # a stop signal arrives during skipped iteration 3
    state = ppo.PPOState(iteration=2)
    with pytest.raises(preemption.Preempted, match="stopped at iteration 3"):
        ppo.train(ctx, state)
    assert calls == [("save", 3)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_actor_starts_as_its_reference_in_the_engines_ppo_builds(dist, tmp_path, tiny_lm, tokenizer, precision):
    """`policy/weights_changed` reads 0 before any step: the stored weights of the actor engine and of the
    frozen reference PPO builds from one init model are equal in both precisions, so what it counts after
    a step is the update alone."""
    from conftest import tiny_inputs

    from lastmile.stages import ppo_setup
    from lastmile.stages.ppo import weights_changed

    init, rm = tiny_inputs(tmp_path, tiny_lm, tokenizer)
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'out'}", f"ppo.init={init}", f"ppo.reward.model={rm}",
                             "tracking.enabled=false", f"precision={precision}"])
    models = ppo_setup.build(cfg, dist).models
    assert next(models.actor_engine.module.parameters()).dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert weights_changed(models) == 0.0
