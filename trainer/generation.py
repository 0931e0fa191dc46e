"""Batched generation from prompts with a Hugging Face causal LM (greedy, beam or sampling)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from trainer.config import GenerationConfig
from trainer.data.collate import collate_prompts
from trainer.data.prompts import TokenizedExample


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
