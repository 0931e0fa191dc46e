"""LoRA on the PPO actor (`ppo.lora.r`, lastmile.lora): the merge that publishes a plain model equals
the adapted model, adapters off is the base model, and PPO trains adapters only, with the reference
being the actor itself (KL exactly 0 before the first update), small checkpoints, a continued run
resuming from them, and a published model that loads without LoRA."""

import copy
import json

import pytest
import torch
from conftest import TINY, run_cli, tiny_inputs
from lastmile import lora
from lastmile.config import LoRASettings


def _adapted(tiny_lm, r=4, alpha=8.0):
    lm = lora.add_adapters(copy.deepcopy(tiny_lm), LoRASettings(r=r, alpha=alpha))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at 0 (the adapted model = the base): give it weight
        for name, p in lm.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return lm.eval()


def _logits(lm, ids):
    with torch.no_grad():
        return lm(input_ids=ids).logits


def test_merged_state_dict_is_the_adapted_model_and_adapters_off_is_the_base(tiny_lm):
    ids = torch.randint(10, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    base = copy.deepcopy(tiny_lm).eval()
    lm = _adapted(tiny_lm)
    assert all(p.requires_grad == (".lora_" in n) for n, p in lm.named_parameters())
    assert lora.scaling(lm) == pytest.approx(8.0 / 4)
    adapted = _logits(lm, ids)
    assert (adapted - _logits(base, ids)).abs().max() > 1e-3  # the adapters change the output
    with lora.adapters_off(lm):
        assert torch.equal(_logits(lm, ids), _logits(base, ids))
    assert torch.equal(_logits(lm, ids), adapted)  # back on after the block

    merged = lora.merged_state_dict(lm.state_dict(), lora.scaling(lm))
    assert not any(".lora_" in k or ".base_layer." in k for k in merged)
    plain = copy.deepcopy(tiny_lm).eval()
    plain.load_state_dict(merged, strict=True)  # exactly the plain model's keys
    assert torch.allclose(_logits(plain, ids), adapted, atol=1e-5)
    # peft's own merge agrees
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in lm.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    assert torch.allclose(_logits(lm, ids), adapted, atol=1e-5)


def test_lora_names_no_layer_is_one_message(tiny_lm):
    from lastmile.errors import ConfigError

    with pytest.raises(ConfigError, match=r"ppo.lora.target_modules \(no_such_proj\) names no linear layer"):
        lora.add_adapters(copy.deepcopy(tiny_lm), LoRASettings(r=4, target_modules=["no_such_proj"]))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_lm, tokenizer):
    return tiny_inputs(tmp_path_factory.mktemp("lora"), tiny_lm, tokenizer)


def _ppo(out, inputs, *extra):
    init, rm = inputs
    return run_cli("ppo", "--config", str(TINY), f"output_dir={out}", f"ppo.init={init}", f"ppo.reward.model={rm}",
                   "ppo.lora.r=4", "ppo.lora.alpha=8", "ppo.lr=1e-2", "ppo.advantage=rloo", "ppo.samples_per_prompt=2",
                   "ppo.prompts_per_iteration=4", "ppo.minibatch_size=8", "ppo.eval_every=0", "ppo.save_every=1",
                   "ppo.keep_checkpoints=1", "tracking.enabled=false", *extra)


def test_lora_ppo_trains_adapters_only_and_publishes_a_plain_model(tmp_path, inputs):
    out = tmp_path / "ppo"
    first = _ppo(out, inputs, "ppo.iterations=1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "reference actor with adapters off" in first.stdout + first.stderr
    # optimizer state for the adapters only (AdamW over the whole model would be twice its weights)
    init, _ = inputs
    base_bytes = sum(p.stat().st_size for p in init.glob("*.safetensors"))
    (optim,) = (out / "ppo" / "checkpoints").glob("step-*/engine/*optim_states.pt")
    assert 0 < optim.stat().st_size < base_bytes / 20
    again = _ppo(out, inputs, "ppo.iterations=2")  # a larger horizon continues from the kept checkpoint
    assert again.returncode == 0, again.stderr[-3000:]
    history = json.loads((out / "ppo" / "history.json").read_text())["history"]
    assert [h["iteration"] for h in history] == [1, 2]
    assert history[0]["kl/seq_mean"] == pytest.approx(0.0, abs=1e-6)  # reference = actor before any update
    assert history[1]["kl/seq_mean"] != pytest.approx(0.0, abs=1e-6)  # the adapters moved it
    from transformers import AutoModelForCausalLM

    published = AutoModelForCausalLM.from_pretrained(out / "ppo" / "model")
    assert not any("lora" in k for k in published.state_dict())
    before = AutoModelForCausalLM.from_pretrained(init)
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), published.state_dict().values(),
                                                     strict=True))


def test_the_run_plan_counts_the_adapters_peft_builds(tiny_lm):
    from lastmile.memory_plan import ModelShape

    settings = LoRASettings(r=4)
    lm = lora.add_adapters(copy.deepcopy(tiny_lm), settings)
    built = sum(p.numel() for n, p in lm.named_parameters() if ".lora_" in n)
    assert ModelShape.from_hf_config(tiny_lm.config).lora_params(4, settings.target_modules) == built
