"""Shared-prefix packing (ppo.shared_prefix): the layout by hand, and the same log-probs, reward-model
scores, critic values and update gradients as the padded rows (fp32, tiny model)."""

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY
from lastmile import distributed
from lastmile.config import load_config, plan_ppo
from lastmile.data.prefix_pack import groups_of, pack_shared_prefix
from lastmile.models import ScalarRewardModel, TokenLogprobModel, ValueModel, load_causal_lm, load_reward_backbone
from lastmile.rollout import Rollout, RolloutModels, response_logprobs, response_values, reward_model_scores
from test_ppo_components import _engine, capture_step_gradients

EOS = 2


def test_groups_are_runs_of_one_example():
    assert groups_of((7, 7, 7, 3, 3, 9)) == [range(3), range(3, 5), range(5, 6)]
    assert groups_of([]) == []


def test_layout_by_hand():
    """Two prompts (lengths 2 and 3, left-padded to 3), two samples each; responses of 2, 1 (EOS only),
    3 (ending in EOS) and 2 tokens."""
    prompt_ids = torch.tensor([[0, 11, 12], [0, 11, 12], [21, 22, 23], [21, 22, 23]])
    prompt_mask = prompt_ids != 0
    response_ids = torch.tensor([[31, 32, 0], [EOS, 0, 0], [41, 42, EOS], [51, 52, 0]])
    response_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    k = pack_shared_prefix(prompt_ids, prompt_mask, response_ids, response_mask, (5, 5, 8, 8), eos_id=EOS, pad_id=0)
    assert k.input_ids.tolist() == [[11, 12, 31, 32, EOS, 0, 0, 0], [21, 22, 23, 41, 42, EOS, 51, 52]]
    assert k.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 0, 0], [0, 1, 2, 3, 4, 5, 3, 4]]
    m = k.attention_mask[1, 0].int()
    assert m[6].tolist() == [1, 1, 1, 0, 0, 0, 1, 0]  # response 2's first token: the prompt and itself
    assert m[5].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]  # response 1's EOS: the prompt and response 1
    assert k.attention_mask[0, 0, 4].int().tolist() == [1, 1, 0, 0, 1, 0, 0, 0]  # the EOS-only response
    assert k.attention_mask[0, 0, 6].int().tolist() == [0, 0, 0, 0, 0, 0, 1, 0]  # padding sees itself only
    # predicted tokens, row by row: the first by the prompt's last position, the next by the one before
    assert k.token_ids.tolist() == [31, 32, EOS, 41, 42, EOS, 51, 52]
    assert k.token_index.tolist() == [1, 2, 1, 8 + 2, 8 + 3, 8 + 4, 8 + 2, 8 + 6]
    # the reward model reads the last token before EOS; the EOS-only response is read at the prompt's end
    assert k.read_index.tolist() == [3, 1, 8 + 4, 8 + 7]
    assert k.per_token(torch.arange(8.0)).tolist() == [[0, 1, 0], [2, 0, 0], [3, 4, 5], [6, 7, 0]]


def test_rows_of_one_example_must_share_their_prompt():
    ids = torch.tensor([[1, 2], [1, 3]])
    with pytest.raises(ValueError, match="share example index"):
        pack_shared_prefix(ids, ids > 0, ids, ids > 0, (0, 0), eos_id=EOS, pad_id=0)


def grouped_rollout(groups=3, k=4, P=9, R=7, seed=3):
    """`groups` prompts of different lengths (left-padded to P), k samples each with different lengths,
    some ending in EOS."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids, prompt_mask = [], []
    for j in range(groups):
        n = P - 2 * j
        p = torch.cat([torch.zeros(P - n, dtype=torch.long), torch.randint(10, 1000, (n,), generator=g)])
        for _ in range(k):
            prompt_ids.append(p)
            prompt_mask.append(p != 0)
    B = groups * k
    response_ids = torch.randint(10, 1000, (B, R), generator=g)
    response_mask = torch.zeros(B, R, dtype=torch.bool)
    for i in range(B):
        n = R - (i * 3) % R
        response_mask[i, :n] = True
        if i % 2:
            response_ids[i, n - 1] = EOS
        response_ids[i, n:] = 0
    old = -torch.rand(B, R, generator=g) * response_mask
    return Rollout(tuple(j for j in range(groups) for _ in range(k)), torch.stack(prompt_ids), torch.stack(prompt_mask),
                   response_ids, response_mask, torch.ones(B, dtype=torch.bool), ("",) * B, old, old_logprobs=old,
                   ref_logprobs=old, scores=torch.randn(B, generator=g))


def _models(micro: int, shared: bool, **kw) -> RolloutModels:
    tok = SimpleNamespace(eos_token_id=EOS, pad_token_id=0)
    m = dict(actor=None, actor_engine=None, ref=None, rm=None, critic=None, tokenizer=tok, rm_stats={},
             device=torch.device("cpu"), precision="fp32", micro_batch=micro, shared_prefix=shared)
    return RolloutModels(**{**m, **kw})


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_logprobs_equal_the_padded_rows(attention):
    cfg = load_config(TINY, [f"model.attn_implementation={attention}"])
    lm, _ = load_causal_lm(cfg.model, torch.device("cpu"), seed=0)
    assert lm.config._attn_implementation == attention
    model = TokenLogprobModel(lm, logprob_impl="chunked").eval()
    b = grouped_rollout()
    for micro in (4, 6, 12):  # whole groups, groups split across micro-batches, one micro-batch
        for t in (1.0, 0.7):
            plain = response_logprobs(model, b, _models(micro, False), temperature=t)
            packed = response_logprobs(model, b, _models(micro, True), temperature=t)
            assert plain[b.response_mask].abs().min() > 0  # real log-probs
            assert (packed - plain).abs().max() < 1e-5, (micro, t)


def test_reward_scores_and_values_equal_the_padded_rows():
    cfg = load_config(TINY)
    lm, _ = load_causal_lm(cfg.model, torch.device("cpu"), seed=0)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        lm.save_pretrained(d)
        backbone, _ = load_reward_backbone(cfg.model, d, torch.device("cpu"), 0, seed=1)
    rm, critic = ScalarRewardModel(backbone).eval(), ValueModel(copy.deepcopy(backbone), scale=2.0, shift=0.5).eval()
    b = grouped_rollout()
    for micro in (4, 6):
        plain = reward_model_scores(rm, b, _models(micro, False))
        packed = reward_model_scores(rm, b, _models(micro, True))
        assert plain.std() > 0 and (packed - plain).abs().max() < 1e-5
        plain_v = response_values(critic, b, _models(micro, False))
        packed_v = response_values(critic, b, _models(micro, True))
        assert plain_v[b.response_mask].abs().min() > 0 and (packed_v - plain_v).abs().max() < 1e-5


def test_update_gradients_equal_the_padded_rows():
    """One PPO update (ZeRO-3 engine, 2 micro-batches of 2 groups of 2): the actor's gradient at the
    optimizer step is the padded rows' gradient, element by element; the recorded log-probs equal."""
    from lastmile.stages import ppo

    distributed.setup()
    base, _ = load_causal_lm(load_config(TINY).model, torch.device("cpu"), seed=0)
    b = dataclasses.replace(grouped_rollout(groups=4, k=2), old_logprobs=None)

    def gradients(shared: bool):
        engine, _, _ = _engine(3, 4, 2, lm=copy.deepcopy(base))
        grads = capture_step_gradients(engine)
        cfg = load_config(TINY, ["ppo.advantage=rloo", "ppo.samples_per_prompt=2", "ppo.epochs=1"])
        ctx = SimpleNamespace(cfg=cfg, plan=plan_ppo(4, 2, 8, 4, 1, 1), models=_models(4, shared, actor_engine=engine),
                              dist=SimpleNamespace(rank=0))
        record = torch.full(b.response_mask.shape, float("nan"))
        adv = torch.linspace(-1, 1, 8)[:, None] * b.response_mask
        ppo.update(ctx, b, adv, None, iteration=0, record=record)
        return grads, record

    plain, plain_lp = gradients(False)
    packed, packed_lp = gradients(True)
    mask = b.response_mask
    assert (plain_lp - packed_lp)[mask].abs().max() < 1e-5
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in plain.values())).item()
    assert norm > 1e-6 and plain.keys() == packed.keys()
    for n in plain:
        assert torch.allclose(plain[n], packed[n], rtol=1e-4, atol=1e-6 * norm), n


def test_generation_prefills_each_prompt_once_with_the_same_result(tokenizer):
    """HybridEngine.generate(repeats=k) (one prefill per prompt, its cache copied to the k rows) gives
    the tokens and log-probs of k separate prefills, greedy and sampled from the same seed, under a
    ZeRO-3 engine in generation mode."""
    from lastmile.hybrid_engine import HybridEngine, Sampling

    distributed.setup()
    engine, lm, ds = _engine(3, micro=2, accum=1)
    hybrid = HybridEngine(engine, lm, ds, torch.device("cpu"), gather="all")
    b = grouped_rollout(groups=2, k=3)
    kw = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    for sampling in (Sampling(10, do_sample=False), Sampling(10, do_sample=True, temperature=0.7)):
        out = {}
        with hybrid.generation_mode():
            for repeats in (1, 3):
                torch.manual_seed(0)
                out[repeats] = hybrid.generate(b.prompt_ids, b.prompt_mask, sampling, repeats=repeats, **kw)
        assert torch.equal(out[1].response_ids, out[3].response_ids)
        assert (out[1].logprobs - out[3].logprobs).abs().max() < 1e-5
        assert out[1].logprobs.min() < -0.1  # real log-probs


def test_reward_model_training_pairs_share_their_prompt_with_the_same_gradients():
    """rm.shared_prefix: each pair as one row (the prompt once, the reference and the negative after it).
    One optimizer step of 2 micro-batches of 2 pairs through a ZeRO-3 engine: the same loss, accuracy and
    gradient, element by element, as padded rows and as padding-free packing; fewer tokens processed."""
    from lastmile.config import plan_batches
    from lastmile.stages.reward_model import EncodedPair, rm_train_step
    from test_ppo_components import OPTIM

    dist = distributed.setup()
    cfg = load_config(TINY)
    lm, _ = load_causal_lm(cfg.model, torch.device("cpu"), seed=0)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        lm.save_pretrained(d)
        base, _ = load_reward_backbone(cfg.model, d, torch.device("cpu"), 0, seed=1)
    g = torch.Generator().manual_seed(5)
    pairs = []
    for i in range(4):
        prompt = tuple(torch.randint(10, 1000, (9 - i,), generator=g).tolist())
        ref, neg = (tuple(torch.randint(10, 1000, (n,), generator=g).tolist()) for n in (3 + i, 3 - i))
        # random-token negatives may hold the pad/EOS id (0 here) mid-summary: it is read past, like any token
        neg = neg[:1] + (0,) + neg[1:] if i == 1 else neg  # pair 3's negative is empty: read at the prompt's end
        pairs.append(EncodedPair(prompt + ref, prompt + neg, "random_tokens", len(prompt)))
    plan = plan_batches(4, 2, 1, field_prefix="rm")

    def one_step(layout: str):
        ds = distributed.ds_config_for("zero3", plan, OPTIM, hidden_size=base.config.hidden_size)
        engine = distributed.build_engine(ScalarRewardModel(copy.deepcopy(base)), ds, OPTIM, total_steps=10)
        grads = capture_step_gradients(engine)
        run = load_config(TINY, [f"rm.packing={layout == 'packed'}"])
        stats = rm_train_step(engine, pairs, 0, plan, run, dist, 0, shared_prefix=layout == "shared")
        return stats, grads

    results = {layout: one_step(layout) for layout in ("padded", "packed", "shared")}
    (padded, g0), (packed, g1), (shared, g2) = (results[k] for k in ("padded", "packed", "shared"))
    for k in ("rm/loss", "rm/accuracy", "rm/margin"):
        assert abs(shared[k] - padded[k]) < 1e-5 and abs(packed[k] - padded[k]) < 1e-5, k
    assert shared["perf/padding_fraction"] < padded["perf/padding_fraction"]
    norm = torch.sqrt(sum((x.float() ** 2).sum() for x in g0.values())).item()
    assert norm > 1e-6 and g0.keys() == g2.keys()
    for n in g0:
        assert torch.allclose(g2[n], g0[n], rtol=1e-4, atol=1e-6 * norm), n
        assert torch.allclose(g1[n], g0[n], rtol=1e-4, atol=1e-6 * norm), n
