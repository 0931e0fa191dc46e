"""Padded batches. One mask polarity everywhere: `*_mask` is bool, True means a real token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lastmile.data.prompts import TokenizedExample


@dataclass(frozen=True)
class SFTBatch:
    input_ids: torch.Tensor  # (B, T) long, prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    target_mask: torch.Tensor  # (B, T) bool, True where the token is a response token (trained on)
    position_ids: torch.Tensor | None = None  # (1, T) long, set for packed batches: restarts at 0 per sequence

    @property
    def num_target_tokens(self) -> int:
        return int(self.target_mask.sum())

    @property
    def num_real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_processed_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> "SFTBatch":
        pos = None if self.position_ids is None else self.position_ids.to(device)
        return SFTBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device), pos)


@dataclass(frozen=True)
class PromptBatch:
    ids: list[str]
    prompt_ids: torch.Tensor  # (B, P) long, left-padded so generation continues at the right edge
    prompt_mask: torch.Tensor  # (B, P) bool


def collate_sft(examples: list[TokenizedExample], pad_id: int) -> SFTBatch:
    T = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.bool)
    target = torch.zeros((B, T), dtype=torch.bool)
    for i, e in enumerate(examples):
        p, r = len(e.prompt_ids), len(e.response_ids)
        input_ids[i, : p + r] = torch.tensor(e.prompt_ids + e.response_ids)
        attention[i, : p + r] = True
        target[i, p : p + r] = True
    return SFTBatch(input_ids, attention, target)


def collate_packed(examples: list[TokenizedExample]) -> SFTBatch:
    """All sequences in one row, no padding. Position ids restart at every sequence, which is how
    transformers recognizes packing: block-diagonal causal masks for SDPA/eager, varlen kernels for
    flash-attention 2. A target token is never first in its sequence, so the shifted loss never
    crosses a boundary."""
    ids, pos, target = [], [], []
    for e in examples:
        p, r = len(e.prompt_ids), len(e.response_ids)
        ids.extend(e.prompt_ids + e.response_ids)
        pos.extend(range(p + r))
        target.extend([False] * p + [True] * r)
    input_ids = torch.tensor([ids], dtype=torch.long)
    return SFTBatch(input_ids, torch.ones_like(input_ids, dtype=torch.bool), torch.tensor([target]),
                    torch.tensor([pos], dtype=torch.long))


def collate_prompts(examples: list[TokenizedExample], pad_id: int) -> PromptBatch:
    P = max(len(e.prompt_ids) for e in examples)
    ids = torch.full((len(examples), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), P), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.prompt_ids)
        ids[i, P - n :] = torch.tensor(e.prompt_ids)
        mask[i, P - n :] = True
    return PromptBatch([e.id for e in examples], ids, mask)
