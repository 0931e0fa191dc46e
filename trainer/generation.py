"""Batched generation from prompts with a Hugging Face causal LM (greedy, beam or sampling)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lastmile import distributed
from lastmile.config import Config, GenerationConfig
from lastmile.data.collate import collate_prompts
from lastmile.data.prompts import PromptBuilder, TokenizedExample
from lastmile.data.records import Example
from lastmile.distributed import DistInfo
from lastmile.hybrid_engine import HybridEngine
from lastmile.models import hidden_size_of, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


def generation_kwargs(cfg: GenerationConfig, tokenizer) -> dict:
    kw = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if cfg.strategy == "greedy":
        kw.update(do_sample=False, num_beams=1)
    elif cfg.strategy == "beam":
        kw.update(do_sample=False, num_beams=cfg.num_beams, early_stopping=True)
    else:
        kw.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    return kw


@torch.no_grad()
def generate(
    lm, tokenizer, prompts: list[TokenizedExample], cfg: GenerationConfig, device: torch.device, *,
    autocast_ctx=None, synced_gpus: bool = False, show_progress: bool = True, desc: str = "generate",
) -> list[str]:
    """One decoded continuation per prompt, in order. `synced_gpus` for ZeRO-3 with several ranks."""
    import contextlib

    was_training = lm.training
    lm.eval()
    outputs: list[str] = []
    kwargs = generation_kwargs(cfg, tokenizer)
    bar = tqdm(total=len(prompts), desc=desc, unit="ex", disable=not show_progress, leave=False)
    for i in range(0, len(prompts), cfg.batch_size):
        batch = collate_prompts(prompts[i : i + cfg.batch_size], tokenizer.pad_token_id)
        with autocast_ctx or contextlib.nullcontext():
            out = lm.generate(
                input_ids=batch.prompt_ids.to(device), attention_mask=batch.prompt_mask.long().to(device),
                synced_gpus=synced_gpus, **kwargs,
            )
        new_tokens = out[:, batch.prompt_ids.shape[1]:]
        outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        bar.update(len(batch.ids))
    bar.close()
    lm.train(was_training)
    return outputs


def load_generator(cfg: Config, model_path: str, device: torch.device, *, ds: dict | None = None):
    """(tokenizer, causal LM, attention choice) of the published model at `model_path`: its own tokenizer
    and weights, whatever `model.*` names (only the attention and trust settings carry over)."""
    tokenizer = load_tokenizer(replace(cfg.model, path=model_path, tokenizer_path=None, gguf_file=None))
    lm, attn = load_causal_lm(cfg.model, device, seed=cfg.seed, path=model_path, ds=ds)
    return tokenizer, lm, attn


@dataclass
class Generator:
    """A published model loaded for generation on this rank. Under ZeRO-3 with several ranks it is
    loaded partitioned (no rank holds it whole while loading) and generates through the hybrid engine's
    generation mode, gathered once (or per layer when it does not fit the device): then every rank must
    call `texts` with the same number of prompts."""

    tokenizer: Any
    lm: torch.nn.Module
    hybrid: HybridEngine | None
    precision: str
    device: torch.device

    @property
    def collective(self) -> bool:
        return self.hybrid is not None

    def texts(self, prompts: list[TokenizedExample], gen: GenerationConfig, *, show_progress: bool = False,
              desc: str = "generate") -> list[str]:
        run = {"autocast_ctx": distributed.autocast(self.precision, self.device), "show_progress": show_progress,
               "desc": desc}
        if self.hybrid is None:
            return generate(self.lm, self.tokenizer, prompts, gen, self.device, **run)
        with self.hybrid.generation_mode():
            return generate(self.lm, self.tokenizer, prompts, gen, self.device, synced_gpus=self.hybrid.synced_gpus,
                            **run)


def open_generator(model_path: str, cfg: Config, dist: DistInfo) -> Generator:
    """The model at `model_path` ready to generate on this rank (`Generator`)."""
    ds = _partitioned_inference_config(cfg, model_path, dist)
    tokenizer, lm, attn = load_generator(cfg, model_path, dist.device, ds=ds)
    if dist.is_main:
        log.info("generating with %s (attention: %s%s)", model_path, attn.implementation,
                 ", ZeRO-3 partitioned" if ds else "")
    hybrid = None if ds is None else HybridEngine(distributed.inference_engine(lm, ds, dist.device), lm, ds, dist.device,
                                                  gather=cfg.deepspeed.generation_gather, world_size=dist.world_size)
    return Generator(tokenizer, lm if ds is not None else lm.to(dist.device), hybrid, cfg.precision, dist.device)


def generate_examples(model_path: str, cfg: Config, examples: list[Example], dist: DistInfo, gen: GenerationConfig, *,
                      desc: str | None = None) -> list[str]:
    """One summary per example from the model at `model_path`, in order, with the settings `gen`.
    Data-parallel: each rank generates its shard (`open_generator` for ZeRO-3)."""
    g = open_generator(model_path, cfg, dist)
    prompts, report = PromptBuilder(g.tokenizer, cfg.prompt).tokenize(examples, with_response=False)
    if dist.is_main:
        log.info("prompts: %s", report.describe())
    shard = list(range(dist.rank, len(prompts), dist.world_size))
    run = {"show_progress": dist.is_main, "desc": desc or f"generate ({Path(model_path).name})"}
    if not g.collective:
        texts = g.texts([prompts[i] for i in shard], gen, **run)
    else:
        per_rank = -(-len(prompts) // dist.world_size)  # equal batch counts on every rank: layer mode's collectives
        padded = shard + (shard[-1:] or [0]) * (per_rank - len(shard))
        texts = g.texts([prompts[i] for i in padded], gen, **run)[: len(shard)]
    out: list[str] = [""] * len(prompts)
    for idx, txts in zip(distributed.gather_objects(shard), distributed.gather_objects(texts)):
        for i, t in zip(idx, txts):
            out[i] = t
    return out


def _partitioned_inference_config(cfg: Config, model_path: str, dist: DistInfo) -> dict | None:
    """The filled ZeRO-3 config for loading the generating model partitioned, or None (one rank, ZeRO-1/2)."""
    if dist.world_size == 1 or distributed.zero_stage(distributed.load_ds_config(cfg.deepspeed.config)) != 3:
        return None
    return distributed.inference_ds_config(cfg.deepspeed.config, dist.world_size,
                                           hidden_size=hidden_size_of(cfg.model, model_path),
                                           bf16=distributed.use_bf16(cfg.precision, dist.device))
