"""precision=bf16: DeepSpeed's bf16 (bf16 weights and gradients, fp32 master weights and AdamW moments),
frozen models loaded in bf16, and the memory plan counting that layout. CPU runs bf16 (emulated where
it has no native support), so the path is tested here; its speed is a GPU matter."""

import pytest
import torch

from lastmile import distributed
from lastmile import memory_plan as mp
from lastmile.config import OptimSettings, load_config, plan_batches
from lastmile.models import TokenLogprobModel, load_causal_lm

from conftest import ROOT, TINY, run_cli

OPTIM = OptimSettings(lr=1e-2, weight_decay=0.0, warmup_steps=0, schedule="constant", max_grad_norm=1.0)


def test_bf16_is_the_precision_settings_and_not_the_jsons():
    raw = distributed.load_ds_config("zero2")
    on = distributed.fill_ds_config(raw, plan_batches(4, 2, 1), max_grad_norm=1.0, hidden_size=64, bf16=True)
    off = distributed.fill_ds_config(raw, plan_batches(4, 2, 1), max_grad_norm=1.0, hidden_size=64)
    assert on["bf16"] == {"enabled": True} and on["fp16"] == {"enabled": False}
    assert off["bf16"] == {"enabled": False} and distributed.bf16_enabled(on) and not distributed.bf16_enabled(off)
    assert distributed.use_bf16("bf16", torch.device("cpu")) and not distributed.use_bf16("fp32", torch.device("cpu"))
    from lastmile.errors import ConfigError

    with pytest.raises(ConfigError, match="bf16.enabled"):
        distributed.fill_ds_config({"bf16": {"enabled": True}}, plan_batches(4, 2, 1), max_grad_norm=1.0, hidden_size=8)


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_engine_keeps_fp32_master_weights_and_moments(stage):
    """A trained model under precision=bf16: loaded in bf16, bf16 in the module, fp32 master weights
    and AdamW moments in the optimizer, and two steps move the weights; a frozen model loads in bf16."""
    distributed.setup()
    cfg = load_config(TINY)
    ds = distributed.ds_config_for(f"zero{stage}", plan_batches(4, 2, 1), OPTIM, hidden_size=64, bf16=True)
    lm, _ = load_causal_lm(cfg.model, torch.device("cpu"), seed=0, ds=ds)
    assert all(p.dtype == torch.bfloat16 for p in lm.parameters())
    engine = distributed.build_engine(TokenLogprobModel(lm, logprob_impl="chunked"), ds, OPTIM, total_steps=4)
    opt = engine.optimizer
    masters = opt.single_partition_of_fp32_groups if stage == 2 else opt.fp32_partitioned_groups_flat
    assert masters and all(m.dtype == torch.float32 for m in masters)
    before = [m.clone() for m in masters]
    ids = torch.randint(10, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    for _ in range(2):
        loss = -engine(ids, mask, mask, reduction="sum") / 10
        engine.backward(loss)
        engine.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, masters))
    moments = [s["exp_avg"] for s in opt.optimizer.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    frozen, _ = load_causal_lm(cfg.model, torch.device("cpu"), seed=0, ds=ds)
    ref = distributed.inference_engine(TokenLogprobModel(frozen, logprob_impl="chunked"), ds, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in ref.parameters())


def test_the_plan_counts_the_bf16_layout():
    """precision=bf16: 2 bytes a weight for every model (frozen ones too), DeepSpeed's mixed layout for the
    trained ones (fp32 master and moments), against 4 bytes and the fp32 layout for precision=fp32."""
    shape, hw, zero2 = mp.SHAPES["135m"], mp.Hardware(1, 1, None, None), {"zero_optimization": {"stage": 2}}
    rows = {}
    for precision in ("bf16", "fp32"):
        cfg = load_config(str(ROOT / "trainer" / "configs" / "demo.yaml"), [f"precision={precision}",
                                                                          "ppo.advantage=gae", "ppo.samples_per_prompt=1",
                                                                          "ppo.minibatch_size=8"])
        (ppo,) = mp.plan_memory(cfg, shape, hw, ("ppo",), zero2)
        rows[precision] = {r.what: r.device for r in ppo.resident}
        assert mp.settings(cfg, zero2, hw).mixed == (precision == "bf16")
    for role in ("actor", "reference", "critic", "reward model"):
        assert rows["bf16"][f"{role} weights"] * 2 == rows["fp32"][f"{role} weights"], role
    mixed = mp.model_states(shape.params, trained=True, z=mp.ZeroSettings(2, False, False, "none", mixed=True), world=1)
    assert rows["bf16"]["actor optimizer states"] == mixed[1].device == shape.params * 12  # master 4 + moments 8


@pytest.mark.slow  # 80 s of emulated bf16 on 2 cores: `make test-slow`
def test_tiny_pipeline_in_bf16_publishes_bf16_models(tmp_path):
    from safetensors import safe_open

    proc = run_cli("pipeline", "--config", str(TINY), "precision=bf16", f"output_dir={tmp_path}",
                   "tracking.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("sft", "reward_model", "ppo"):
        with safe_open(str(tmp_path / stage / "model" / "model.safetensors"), "pt") as f:
            assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16, stage
    assert (tmp_path / "report" / "report.md").is_file()


def test_auto_is_resolved_when_a_stage_begins_and_kept_when_it_resumes_elsewhere(tmp_path, monkeypatch, capsys):
    """precision=auto depends on the CPU (native bf16 or not). A stage resolves it once, into
    <stage>/precision.json, and a run resumed on another machine goes on in that precision: the next
    session's host, or a requeue onto other nodes, never switches a half-done run from fp32 to bf16."""
    import json
    from dataclasses import replace

    from lastmile.stages import common

    cfg = load_config(TINY, [f"output_dir={tmp_path / 'a'}", "tracking.enabled=false", "precision=auto"])
    begin = lambda c: common.begin(c, "sft", "SFT", inputs={"base": c.model.path})  # noqa: E731
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)  # an AVX2-only CPU
    start = begin(cfg)
    assert start.precision == "fp32" and start.settled(cfg).precision == "fp32"
    assert json.loads((tmp_path / "a" / "sft" / "precision.json").read_text()) == {"setting": "auto", "resolved": "fp32"}

    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)  # on a CPU with native bf16
    capsys.readouterr()
    assert begin(cfg).precision == "bf16"  # nothing kept to go on from (a false start): resolved again, here
    assert json.loads((tmp_path / "a" / "sft" / "precision.json").read_text())["resolved"] == "bf16"
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    assert begin(cfg).precision == "fp32"
    step = tmp_path / "a" / "sft" / "checkpoints" / "step-0000004"  # a checkpoint: work to resume
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")

    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)  # resumed on a CPU with native bf16
    capsys.readouterr()
    start = begin(cfg)
    assert start.precision == "fp32" and start.as_given(cfg).precision == "auto"  # recorded as it was given
    out = capsys.readouterr().out
    assert f"SFT: {tmp_path / 'a' / 'sft'} began in fp32" in out and "here precision=auto would give bf16" in out
    assert f"delete {tmp_path / 'a' / 'sft'} or use a new output_dir" in out
    assert json.loads((tmp_path / "a" / "sft" / "precision.json").read_text())["resolved"] == "fp32"

    fresh = replace(cfg, output_dir=str(tmp_path / "b"))  # a stage that begins on this machine
    assert begin(fresh).precision == "bf16"
    explicit = replace(cfg, output_dir=str(tmp_path / "c"), precision="fp32")  # an explicit setting applies as is
    assert begin(explicit).precision == "fp32" and "began in" not in capsys.readouterr().out


def test_an_evaluation_keeps_generations_per_concrete_precision(tmp_path, monkeypatch):
    """A report begun where precision=auto is fp32 and finished where it is bf16 generates every system again
    there (the cache key changes), so the systems it compares were all decoded in one precision."""
    from lastmile.data.records import Example
    from lastmile.stages import evaluate

    cfg = load_config(TINY, [f"output_dir={tmp_path}", "precision=auto"])
    spec = evaluate.SystemSpec("mle", model="smollm2-135m-instruct")
    examples = [Example(id="a", document="d", summary="s", references=("s",))]
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    fp32 = evaluate._generation_cache(cfg, spec, examples, torch.device("cpu"))
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    bf16 = evaluate._generation_cache(cfg, spec, examples, torch.device("cpu"))
    assert fp32 != bf16 and fp32.parent == bf16.parent == tmp_path / "eval" / "generations"


def test_an_evaluation_is_identified_by_its_concrete_precision(tmp_path):
    """Results decoded in fp32 are not reused for a bf16 evaluation of the same systems (nor the reverse)."""
    from lastmile.data.records import Example
    from lastmile.stages import evaluate

    specs = [evaluate.SystemSpec("mle", model="smollm2-135m-instruct")]
    examples = [Example(id="a", document="d", summary="s", references=("s",))]
    ident = {p: evaluate._identity(load_config(TINY, [f"output_dir={tmp_path}", f"precision={p}"]), specs, examples)
             for p in ("fp32", "bf16")}
    assert ident["fp32"] != ident["bf16"]
