"""Shared-prefix packing: a prompt's k sampled responses in one row, the prompt once.

With `samples_per_prompt = k` every frozen forward of a rollout (reference, reward model, critic) and
the actor's update would process the same prompt k times. Here each group of rows that share a prompt
becomes one row: the prompt's real tokens, then each response's real tokens (up to and including EOS),
right-padded to the longest group. A 4D attention mask makes it a tree:

    prompt tokens       attend causally to the prompt
    response i tokens   attend to the whole prompt and causally to response i, never to response j

and the position ids of every response continue at the prompt's length, as in the padded row
`[pad.. prompt, response_i, pad..]`. So every hidden state the losses read is the one the padded
batch gives (up to float summation order), and the prompt is processed (and in the update
back-propagated) once per group: at 320 prompt and 64 response tokens and k = 4, 576 tokens instead
of 1536.

Groups are runs of consecutive rows with the same example index (a rollout keeps a prompt's samples
together); a run of one row is a plain padding-free row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefixPack:
    input_ids: torch.Tensor  # (G, L) long: per group the prompt once, then each response; right-padded
    position_ids: torch.Tensor  # (G, L) long: prompt 0..p-1, every response continuing at p
    attention_mask: torch.Tensor  # (G, 1, L, L) bool: True where query position i may attend key j
    token_index: torch.Tensor  # (N,) long: flat index into (G*L) of the hidden state that predicts each
    #                            response token; N = response_mask.sum(), in row-major order of (B, R)
    token_ids: torch.Tensor  # (N,) long: those response tokens
    read_index: torch.Tensor  # (B,) long: flat index of each response's last token before EOS (the
    #                           prompt's last token when it has none): where a reward model reads its score
    response_mask: torch.Tensor  # (B, R) bool: the rows' response mask, to put (N,) results back in place

    def to(self, device: torch.device) -> "PrefixPack":
        return PrefixPack(*(t.to(device) for t in (self.input_ids, self.position_ids, self.attention_mask,
                                                    self.token_index, self.token_ids, self.read_index,
                                                    self.response_mask)))

    def per_token(self, flat: torch.Tensor) -> torch.Tensor:
        """(N,) values at the response tokens -> (B, R), zero where response_mask is False (differentiable)."""
        out = torch.zeros(self.response_mask.shape, dtype=flat.dtype, device=flat.device)
        return out.masked_scatter(self.response_mask.to(flat.device), flat)


def groups_of(example_idx: tuple[int, ...] | list[int]) -> list[range]:
    """Runs of consecutive rows with the same example index."""
    runs, start = [], 0
    for i in range(1, len(example_idx) + 1):
        if i == len(example_idx) or example_idx[i] != example_idx[start]:
            runs.append(range(start, i))
            start = i
    return runs


def has_shared_prefix(example_idx: tuple[int, ...] | list[int]) -> bool:
    """True when some prompt has more than one row next to each other (packing then saves tokens)."""
    return any(len(g) > 1 for g in groups_of(example_idx))


def pack_shared_prefix(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                       response_mask: torch.Tensor, example_idx: tuple[int, ...] | list[int], *, eos_id: int,
                       pad_id: int) -> PrefixPack:
    """prompt_ids (B, P) left-padded, prompt_mask (B, P) bool, response_ids (B, R), response_mask (B, R)
    bool (True up to and including EOS; a row may have none: the report's empty summaries), example_idx (B,):
    rows of one prompt are consecutive with the same index and the same prompt tokens. Returns the
    PrefixPack of the groups (see the module)."""
    B, R = response_ids.shape
    groups = groups_of(example_idx)
    rows = []  # per group: (tokens, positions, segment of each token: -1 prompt, i response i)
    for g in groups:
        prompt = prompt_ids[g.start][prompt_mask[g.start]]
        for i in g:
            if not torch.equal(prompt_ids[i][prompt_mask[i]], prompt):
                raise ValueError(f"rows {g.start} and {i} share example index {example_idx[i]} but not their prompt")
        p = prompt.numel()
        tokens, positions, segment = [prompt], [torch.arange(p)], [torch.full((p,), -1)]
        for j, i in enumerate(g):
            resp = response_ids[i][response_mask[i]]
            tokens.append(resp)
            positions.append(torch.arange(p, p + resp.numel()))
            segment.append(torch.full((resp.numel(),), j))
        rows.append((torch.cat(tokens), torch.cat(positions), torch.cat(segment), p))
    G, L = len(groups), max(t.numel() for t, *_ in rows)
    input_ids = torch.full((G, L), pad_id, dtype=torch.long)
    position_ids = torch.full((G, L), -1, dtype=torch.long)  # -1: padding (reset to 0 below)
    mask = torch.zeros((G, 1, L, L), dtype=torch.bool)
    token_index = torch.empty(int(response_mask.sum()), dtype=torch.long)
    read_index = torch.empty(B, dtype=torch.long)
    n = 0
    for gi, (g, (tokens, positions, segment, p)) in enumerate(zip(groups, rows)):
        t = tokens.numel()
        input_ids[gi, :t], position_ids[gi, :t] = tokens, positions
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        same = (segment[:, None] == segment[None, :]) | (segment[None, :] == -1)  # own segment or the prompt
        mask[gi, 0, :t, :t] = causal & same
        mask[gi, 0, torch.arange(t, L), torch.arange(t, L)] = True  # padding attends to itself: no empty row
        base, start = gi * L, p
        for j, i in enumerate(g):
            r = int(response_mask[i].sum())
            # token m of response j is predicted by the hidden state before it: the prompt's last for m = 0
            before = torch.cat([torch.tensor([p - 1]), torch.arange(start, start + max(r - 1, 0))])
            token_index[n : n + r] = base + before[:r]
            kept = int((response_mask[i] & (response_ids[i] != eos_id)).sum())
            read_index[i] = base + (start + kept - 1 if kept else p - 1)
            n += r
            start += r
    token_ids = response_ids[response_mask]
    return PrefixPack(input_ids, position_ids.clamp(min=0), mask, token_index, token_ids, read_index,
                      response_mask.clone())
