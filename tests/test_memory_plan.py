"""`lastmile plan`'s memory arithmetic (lastmile.memory_plan): parameter counts against transformers,
model states against DeepSpeed's own estimators and against a measured DeepSpeed engine, the verdict
and its advice, the command. CPU; the measured engines run in subprocesses (in `make test-slow`, about 25 s each)."""

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, TINY, clean_env

from lastmile import memory_plan as mp
from lastmile.cli import main
from lastmile.config import load_config


@pytest.mark.parametrize("tied,kv_heads", [(True, 2), (False, 4)])
def test_shape_counts_what_transformers_builds(tied, kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    c = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    shape = mp.ModelShape.from_hf_config(c)
    lm = LlamaForCausalLM(c)
    assert shape.params == sum(p.numel() for p in lm.parameters())  # tied weights counted once
    rm = LlamaForSequenceClassification(c.__class__(**{**c.to_dict(), "num_labels": 1}))
    assert shape.scalar_head_params == sum(p.numel() for p in rm.parameters())


def test_published_shapes_have_their_published_sizes():
    sizes = {k: s.params for k, s in mp.SHAPES.items()}
    assert sizes["135m"] == 134_515_008  # SmolLM2-135M
    assert 1.23e9 < sizes["1b"] < 1.24e9 and 6.73e9 < sizes["7b"] < 6.75e9 and 70.5e9 < sizes["70b"] < 70.6e9


@pytest.mark.parametrize("shape", list(mp.SHAPES))
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("offload", [False, True])
def test_model_states_agree_with_deepspeeds_estimators(shape, stage, offload):
    for gpus, nodes in ((1, 1), (8, 1), (8, 8)):
        hw = mp.Hardware.gpus(gpus, 80, nodes=nodes)
        ours = mp.comparable_model_states(mp.SHAPES[shape], stage=stage, hw=hw, offload_optimizer=offload,
                                          offload_params=offload)
        theirs, _ = mp.deepspeed_model_states(mp.SHAPES[shape], stage=stage, hw=hw, offload_optimizer=offload,
                                              offload_params=offload)
        assert abs(ours - theirs) <= 0.01 * theirs, (shape, stage, offload, gpus * nodes, ours, theirs)


def test_zero3_model_states_fall_as_one_over_the_ranks():
    z = mp.ZeroSettings(3, False, False, "all")
    one, _ = mp.trained_states_bytes(mp.SHAPES["1b"].params, z=z, world=1)
    two, _ = mp.trained_states_bytes(mp.SHAPES["1b"].params, z=z, world=2)
    assert two == pytest.approx(one / 2, rel=1e-6)


_ENGINE = textwrap.dedent("""
    import ctypes, gc, json, os, sys
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    import torch, deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from lastmile.config import OptimSettings, plan_batches
    from lastmile.distributed import build_engine, fill_ds_config
    from lastmile.models import partitioned_loading
    from lastmile.timing import rss_bytes
    stage = int(sys.argv[1])
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    def rss():
        gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0); return rss_bytes()
    c = LlamaConfig(**json.loads(sys.argv[3]))
    raw = {"zero_optimization": {"stage": stage, "reduce_bucket_size": "auto", "contiguous_gradients": True,
           "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}}
    ds = fill_ds_config(raw, plan_batches(1, 1, 1), max_grad_norm=1.0, hidden_size=c.hidden_size)
    before = rss()
    with partitioned_loading(ds):
        model = LlamaForCausalLM(c)
    engine = build_engine(model, ds, OptimSettings(lr=1e-5, weight_decay=0.0, warmup_steps=0, schedule="constant",
                                                   max_grad_norm=1.0), total_steps=10)
    x = torch.randint(0, c.vocab_size, (1, 16))
    for _ in range(2):
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    print(json.dumps({"held": rss() - before}))
""")


# 136M parameters: small models hold a few fixed buffers that are a visible share of their size
ENGINE_MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                    tie_word_embeddings=True)


@pytest.mark.slow  # about 25 s each: `make test-slow`
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fp32_model_states_match_what_a_deepspeed_engine_holds(stage, tmp_path):
    """After two optimizer steps (gradients freed), the process holds the plan's weights and optimizer
    states for a trained model on one CPU rank, within 10% (measured 2026-12-06: 12.2, 16.5 and 20.8
    bytes a parameter at ZeRO-0, 2 and 3; planned 12, 16 and 20)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "engine.py"
    script.write_text(_ENGINE)
    out = subprocess.run([sys.executable, str(script), str(stage), port, json.dumps(ENGINE_MODEL)], capture_output=True,
                         text=True, timeout=300,
                         env=clean_env(OMP_NUM_THREADS="1"), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    held = json.loads(out.stdout.strip().splitlines()[-1])["held"]
    from transformers import LlamaConfig

    shape = mp.ModelShape.from_hf_config(LlamaConfig(**ENGINE_MODEL))
    planned = sum(r.device for r in mp.model_states(shape.params, trained=True, z=mp.ZeroSettings(stage, False, False, "none"),
                                                    world=1))
    assert held == pytest.approx(planned, rel=0.10), (stage, held / shape.params, planned / shape.params)


def _cfg(*overrides: str):
    return load_config(str(TINY), list(overrides))


def test_a_plan_that_fits_says_so_and_counts_every_ppo_model():
    cfg = _cfg()
    hw = mp.Hardware(1, 1, None, 24 * mp.GiB)
    shape = mp.SHAPES["135m"]
    plans, v = mp.verdict(cfg, shape, hw, ("sft", "reward-model", "ppo", "report"), {"zero_optimization": {"stage": 2}})
    assert v.fits == "fits" and not v.advice
    ppo = next(p for p in plans if p.stage == "ppo")
    whats = " ".join(r.what for r in ppo.resident)
    for role in ("actor", "reference", "reward model"):
        assert f"{role} weights" in whats
    assert ("critic weights" in whats) == (cfg.ppo.advantage == "gae")
    assert ppo.peak_phase in ppo.phases and ppo.seconds_per_step > 0


def test_a_model_too_large_for_its_gpus_gets_the_settings_that_fit():
    cfg = _cfg("ppo.prompts_per_iteration=64", "ppo.minibatch_size=64", "ppo.micro_batch_size=2")
    hw = mp.Hardware.gpus(8, 80, nodes=2)
    plans, v = mp.verdict(cfg, mp.SHAPES["70b"], hw, ("ppo",), {"zero_optimization": {"stage": 3}})
    assert v.fits == "does not fit as configured" and v.peak_device > 0.9 * v.budget
    assert any("offload" in a for a in v.advice), v.advice
    # the advice is a plan that fits: applying it gives a peak under the budget
    text = mp.describe(plans, v, mp.SHAPES["70b"], hw, mp.ZeroSettings(3, False, False, "all"))
    assert "Verdict: does not fit as configured" in text and "fits with deepspeed.config=zero3_offload" in text


def test_offloading_from_a_cpu_rank_is_never_advised():
    cfg = _cfg("ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.minibatch_size=4")
    hw = mp.Hardware(1, 1, None, 24 * mp.GiB)
    _, v = mp.verdict(cfg, mp.SHAPES["7b"], hw, ("ppo",), {"zero_optimization": {"stage": 3}})
    assert not v.fits.startswith("fits") and not any("offload" in a for a in v.advice)


def test_plan_command_prints_the_plan_and_the_verdict(capsys):
    rc = main(["plan", "--config", str(TINY), "--shape", "135m", "--host-mem", "24"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Plan of `lastmile pipeline` on 1 rank:" in out and "Memory plan: SmolLM2-135M" in out
    assert "ppo: peak" in out and "Verdict: fits" in out


def test_plan_command_exits_3_when_nothing_fits_and_refuses_an_unknown_shape(capsys):
    rc = main(["plan", "--config", str(TINY), "--for", "sft", "--shape", "70b", "--gpus", "1", "--gpu-mem", "8"])
    assert rc == 3 and "Verdict: does not fit" in capsys.readouterr().out
    rc = main(["plan", "--config", str(TINY), "--shape", "13b"])
    err = capsys.readouterr().err
    assert rc != 0 and "--shape (13b) is not a known shape" in err and "135m, 1b, 7b, 70b" in err


def test_the_readme_table_is_what_the_plan_says():
    """README's "What fits where" rows: the verdict and peak `lastmile plan` gives for each, on make demo's
    config with GAE (a critic), 64 prompts per iteration of one sample each and micro-batches of 2, without
    gradient checkpointing."""
    readme = (ROOT / "README.md").read_text()
    gae = ["ppo.advantage=gae", "ppo.samples_per_prompt=1", "ppo.gradient_checkpointing=false"]
    cfg = load_config(str(ROOT / "trainer" / "configs" / "demo.yaml"),  # on GPUs precision=auto (bf16), as the rows say
                      gae + ["precision=auto", "ppo.prompts_per_iteration=64", "ppo.minibatch_size=64", "ppo.micro_batch_size=2"])
    zero2, zero3 = {"zero_optimization": {"stage": 2}}, {"zero_optimization": {"stage": 3}}
    rows = [("1b", mp.Hardware.gpus(1, 80), zero2, "| Llama-3.2-1B | 1 x 80 GB GPU | fits ({peak} GiB) |"),
            ("7b", mp.Hardware.gpus(1, 80), zero2, "| Llama-2-7B | 1 x 80 GB GPU | does not fit as configured ({peak} GiB)"),
            ("7b", mp.Hardware.gpus(8, 80), zero3, "| Llama-2-7B | 8 x 80 GB GPUs, ZeRO-3 | fits ({peak} GiB) |"),
            ("70b", mp.Hardware.gpus(8, 80, nodes=2), zero3, "| Llama-3.1-70B | 2 nodes x 8 x 80 GB, ZeRO-3 | does not "
             "fit as configured ({peak} GiB)")]
    for shape, hw, ds, row in rows:
        _, v = mp.verdict(cfg, mp.SHAPES[shape], hw, ("ppo",), ds)
        assert row.format(peak=round(v.peak_device / mp.GiB)) in readme, (shape, v)
    _, v = mp.verdict(cfg, mp.SHAPES["70b"], mp.Hardware.gpus(8, 80, nodes=2), ("ppo",), zero3)
    assert any(a.startswith("deepspeed.config=zero3_offload") and "peak 18.7 GiB" in a for a in v.advice)
    cpu = gae + ["ppo.minibatch_size=8", "precision=fp32"]  # fp32 as the row says (auto is bf16 on a bf16 CPU)
    _, v = mp.verdict(load_config(str(ROOT / "trainer" / "configs" / "demo.yaml"), cpu),
                      mp.SHAPES["1b"],
                      mp.Hardware(1, 1, None, 24 * mp.GiB), ("ppo",), zero2)
    assert v.fits == "does not fit" and f"does not fit ({round(v.peak_device / mp.GiB)} GiB)" in readme


_RELEASE = textwrap.dedent("""
    import gc, json, os, sys
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    import torch, deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from lastmile import distributed
    from lastmile.config import OptimSettings, plan_batches
    deepspeed.init_distributed(dist_backend="gloo")

    def live_bytes():
        gc.collect()
        storages = {}
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and not o.is_meta and o.untyped_storage().data_ptr():
                storages[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
        return sum(storages.values())

    def train_once():
        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4))
        ds = distributed.fill_ds_config({"zero_optimization": {"stage": 2}}, plan_batches(1, 1, 1), max_grad_norm=1.0,
                                        hidden_size=64)
        engine = distributed.build_engine(model, ds, OptimSettings(lr=1e-4, weight_decay=0.0, warmup_steps=0,
                                                                   schedule="constant", max_grad_norm=1.0), total_steps=1)
        x = torch.randint(0, 512, (1, 8))
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()

    train_once()  # every Python reference to the engine is gone when it returns
    kept = live_bytes()
    released = distributed.release_engines()
    print(json.dumps({"kept": kept, "released": released, "after": live_bytes()}))
""")


def test_a_finished_stages_engine_is_freed_by_release_engines(tmp_path):
    """DeepSpeed's gradient hooks keep an engine (model, optimizer state) alive after its stage returns;
    the pipeline's release_engines() between stages frees it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "release.py"
    script.write_text(_RELEASE)
    out = subprocess.run([sys.executable, str(script), port], capture_output=True, text=True, timeout=300,
                         env=clean_env(OMP_NUM_THREADS="1"), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["released"] == 1 and r["kept"] > 4 * 100_000  # the model's weights and AdamW state were still held
    assert r["after"] < r["kept"] / 10


def test_the_plan_reads_the_actor_and_reward_model_it_will_load(tmp_path):
    """`lastmile plan --for ppo` plans ppo.init's shape and ppo.reward.model's (a small scorer beside a
    large actor is counted as small), from their config.json files; without those folders, model.path's."""
    from lastmile.config import ModelConfig
    from lastmile.models import model_config
    from lastmile.plan import _shapes

    folders = {}
    for name, layers in (("actor", 6), ("rm", 1)):
        c = model_config(ModelConfig(config_overrides={"num_hidden_layers": layers}))
        c.save_pretrained(tmp_path / name)
        folders[name] = (tmp_path / name, mp.ModelShape.from_hf_config(c).params)
    cfg = load_config(TINY, [f"ppo.init={folders['actor'][0]}", f"ppo.reward.model={folders['rm'][0]}"])
    actor, reward = _shapes(cfg, "ppo")
    assert (actor.params, reward.params) == (folders["actor"][1], folders["rm"][1])
    assert actor.layers == 6 and reward.layers == 1
    base, none = _shapes(cfg, "sft")
    assert none is None and base.params == mp.ModelShape.from_hf_config(model_config(cfg.model)).params
    hw, zero2 = mp.Hardware(1, 1, None, None), {"zero_optimization": {"stage": 2}}
    planned = {r.what: r.device for r in mp.plan_memory(cfg, actor, hw, ("ppo",), zero2, reward=reward)[0].resident}
    assert planned["reward model weights"] == 4 * reward.scalar_head_params
    assert planned["actor weights"] == 4 * actor.params
