"""LoRA adapters on the PPO actor (Hu et al. 2021; the layers are peft's), `ppo.lora.*`.

The adapters go into the Hugging Face model in place (`peft.inject_adapter_in_model`), so every
module name stays what the rest of the code expects (`TokenLogprobModel(lm)`, the hybrid engine,
ZeRO-3's partitioning) and only LoRA's own weights are trained. Three things follow:

- The reference is the actor with its adapters switched off (`AdaptersOff`): no second copy of the
  model in memory and no second model to load. At the start (lora_B = 0) actor and reference agree.
- The optimizer holds state for the adapters only, and checkpoints leave the frozen base out.
- A published model is plain: `merged_state_dict` folds every adapter into its base weight,
  W + (alpha / r) B A, so `ppo/model` loads with `AutoModelForCausalLM` and knows nothing of LoRA.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lastmile.config import LoRASettings

ADAPTER = "default"  # peft's name for the one adapter


def add_adapters(lm: torch.nn.Module, settings: LoRASettings) -> torch.nn.Module:
    """Insert LoRA layers into `lm` (in place; returned for chaining) and freeze everything else."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0,  # dropout would break parity
                        target_modules=list(settings.target_modules), bias="none")
    from peft.utils.error import NoMatchingPeftModuleError

    try:
        lm = inject_adapter_in_model(config, lm, adapter_name=ADAPTER)
    except NoMatchingPeftModuleError:
        from lastmile.errors import ConfigError

        raise ConfigError(f"ppo.lora.target_modules ({', '.join(settings.target_modules)}) names no linear layer of "
                          "the model. Name the projections of its attention and MLP, e.g. q_proj, v_proj.") from None
    for name, p in lm.named_parameters():
        p.requires_grad_(".lora_" in name)
    return lm


def tuner_layers(lm: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]


def has_adapters(lm: torch.nn.Module) -> bool:
    return bool(tuner_layers(lm))


@contextlib.contextmanager
def adapters_off(lm: torch.nn.Module):
    """Inside: `lm` computes as its base model (every LoRA layer passes its input to the base layer only)."""
    layers = tuner_layers(lm)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


class AdaptersOff:
    """The reference model of a LoRA actor: the actor's engine (or module) called with its adapters off.
    Called like a TokenLogprobModel; used without gradients (rollout.response_logprobs)."""

    def __init__(self, engine, lm: torch.nn.Module):
        self.engine, self.lm = engine, lm

    def __call__(self, *args, **kwargs):
        with adapters_off(self.lm):
            return self.engine(*args, **kwargs)


def scaling(lm: torch.nn.Module) -> float | None:
    """alpha / r of the adapters in `lm` (one value: every layer gets the same settings); None without."""
    layers = tuner_layers(lm)
    return float(layers[0].scaling[ADAPTER]) if layers else None


def merged_state_dict(sd: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict of a model with LoRA layers -> the plain model's: for each adapted layer `x`,
    x.weight = x.base_layer.weight + scaling * lora_B (out, r) @ lora_A (r, in); `x.base_layer.bias`
    becomes `x.bias`; the adapters' own entries are dropped. Computed in fp32, stored in the base's dtype."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".lora_" in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        layer, _, leaf = key.rpartition(".base_layer.")
        if leaf == "weight":
            a = sd[f"{layer}.lora_A.{ADAPTER}.weight"].float()  # (r, in)
            b = sd[f"{layer}.lora_B.{ADAPTER}.weight"].float()  # (out, r)
            value = (value.float() + scaling * (b @ a)).to(value.dtype)
        out[f"{layer}.{leaf}"] = value
    return out
