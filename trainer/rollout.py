"""PPO's experience: sample responses, score them, and record old / reference log-probs and values.

One `Rollout` per rank per iteration. Rows are this rank's prompts, each repeated
`samples_per_prompt` times in a row (the groups of the critic-free estimators stay on one rank).
Every forward pass here runs the same number of micro-batches on every rank, as ZeRO-3 needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lastmile import distributed, metrics
from lastmile.algorithms.rewards import hybrid_reward
from lastmile.config import RewardConfig
from lastmile.data.collate import collate_prompts
from lastmile.data.prefix_pack import PrefixPack, groups_of, has_shared_prefix, pack_shared_prefix
from lastmile.data.prompts import TokenizedExample
from lastmile.data.records import Example
from lastmile.hybrid_engine import HybridEngine, Sampling
from lastmile.timing import PhaseTimer, phase

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase

    from lastmile.models import ScalarRewardModel, TokenLogprobModel


@dataclass(frozen=True)
class Rollout:
    example_idx: tuple[int, ...]  # (B,) row -> index of its example in the prompt pool
    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P) bool
    response_ids: torch.Tensor  # (B, R) long, pad after the first EOS
    response_mask: torch.Tensor  # (B, R) bool, True up to and including EOS
    ended: torch.Tensor  # (B,) bool, the response produced EOS
    texts: tuple[str, ...]  # (B,) decoded responses
    gen_logprobs: torch.Tensor  # (B, R) recorded while generating
    old_logprobs: torch.Tensor | None = None  # (B, R) training-mode actor forward before the update (or during it)
    ref_logprobs: torch.Tensor | None = None  # (B, R) frozen reference
    values: torch.Tensor | None = None  # (B, R) critic, value of the state before each response token
    scores: torch.Tensor | None = None  # (B,) hybrid reward before KL shaping
    reward_parts: dict[str, torch.Tensor] | None = None  # name -> (B,) the terms of `scores`
    greedy_scores: torch.Tensor | None = None  # (B,) ppo.advantage=remax: the reward of the row's prompt's greedy response

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def behaviour_logprobs(self) -> torch.Tensor:
        """(B, R) the sampling policy's log-probs before the update: the training forward's when it ran,
        else those recorded while generating (equal up to the parity bound)."""
        return self.old_logprobs if self.old_logprobs is not None else self.gen_logprobs

    def rows(self, idx: list[int] | torch.Tensor) -> "Rollout":
        """A sub-batch of rows (a minibatch). Every field is indexed by row, derived from the fields
        themselves, so a new field can never keep its full batch size by mistake."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return dataclasses.replace(self, **{f.name: _pick_rows(getattr(self, f.name), idx)
                                            for f in dataclasses.fields(self)})

    def pack(self, tokenizer: PreTrainedTokenizerBase) -> PrefixPack:
        """The rows as a shared-prefix pack: each prompt once, its samples after it (data/prefix_pack.py)."""
        return pack_shared_prefix(self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask,
                                  self.example_idx, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)

    def sequences(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids (B, P+R), attention_mask (B, P+R) bool, target_mask (B, P+R) bool on response tokens)."""
        ids = torch.cat([self.prompt_ids, self.response_ids], 1).to(device)
        mask = torch.cat([self.prompt_mask, self.response_mask], 1).to(device)
        target = torch.cat([torch.zeros_like(self.prompt_mask), self.response_mask], 1).to(device)
        return ids, mask, target


def fixed_rollout(example_idx: list[int], prompts: list[tuple[int, ...]], responses: list[tuple[int, ...]],
                  pad_id: int) -> Rollout:
    """Rows of given prompt and response tokens, nothing sampled (the report scores fixed summaries with
    `reward_model_scores`): prompts left-padded, responses right-padded; rows of one prompt consecutive
    with the same example index, so that the shared-prefix pack takes the prompt once."""
    B = len(prompts)
    P, R = max(map(len, prompts)), max(1, max(map(len, responses)))
    prompt_ids, prompt_mask = torch.full((B, P), pad_id), torch.zeros((B, P), dtype=torch.bool)
    response_ids, response_mask = torch.full((B, R), pad_id), torch.zeros((B, R), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        prompt_ids[i, P - len(p):], prompt_mask[i, P - len(p):] = torch.tensor(p, dtype=torch.long), True
        if r:
            response_ids[i, : len(r)], response_mask[i, : len(r)] = torch.tensor(r, dtype=torch.long), True
    return Rollout(tuple(example_idx), prompt_ids, prompt_mask, response_ids, response_mask,
                   torch.zeros(B, dtype=torch.bool), ("",) * B, torch.zeros((B, R)))


def _pick_rows(value, idx: torch.Tensor):
    """Rows `idx` of one Rollout field: a (B, ...) tensor, a (B,) tuple, a dict of (B,) tensors, or None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[idx]
    if isinstance(value, tuple):
        return tuple(value[i] for i in idx.tolist())
    if isinstance(value, dict):
        return {k: v[idx] for k, v in value.items()}
    raise TypeError(f"Rollout field of type {type(value).__name__} has no rows")


@dataclass
class RolloutModels:
    """Everything a rollout touches; built once by the PPO stage."""

    actor: HybridEngine
    actor_engine: DeepSpeedEngine | None  # over TokenLogprobModel(actor lm); None where nothing trains (best-of-n)
    ref: DeepSpeedEngine | TokenLogprobModel | None  # frozen: inference engine or the module itself; None: no KL
    rm: DeepSpeedEngine | ScalarRewardModel  # frozen
    critic: DeepSpeedEngine | None  # over ValueModel; None for critic-free estimators
    tokenizer: PreTrainedTokenizerBase
    rm_stats: dict[str, float]  # mean/std of reference scores (reward_stats.json)
    device: torch.device
    precision: str
    micro_batch: int
    shared_prefix: bool = False  # pack each prompt's samples with the prompt once (ppo.shared_prefix)


def sample(models: RolloutModels, prompts: list[TokenizedExample], example_idx: list[int], sampling: Sampling,
           *, batch_size: int, timer: PhaseTimer | None = None) -> Rollout:
    """Generate one response per row (rows already repeated per sample) in generation mode."""
    tok = models.tokenizer
    parts = []
    with phase(timer, "generation"), models.actor.generation_mode():
        for i in range(0, len(prompts), batch_size):
            batch = collate_prompts(prompts[i : i + batch_size], tok.pad_token_id)
            runs = {len(g) for g in groups_of(example_idx[i : i + batch_size])}
            repeats = runs.pop() if models.shared_prefix and len(runs) == 1 else 1  # equal groups: one prefill each
            g = models.actor.generate(batch.prompt_ids, batch.prompt_mask, sampling, eos_id=tok.eos_token_id,
                                      pad_id=tok.pad_token_id, repeats=repeats,
                                      autocast_ctx=distributed.autocast(models.precision, models.device))
            parts.append((batch, g))
    P = max(b.prompt_ids.shape[1] for b, _ in parts)
    R = max(g.response_ids.shape[1] for _, g in parts)

    def cat(tensors, width, value, left=False):
        padded = []
        for t in tensors:
            pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
            padded.append(torch.cat([pad, t] if left else [t, pad], 1))
        return torch.cat(padded, 0).cpu()

    response_ids = cat([g.response_ids for _, g in parts], R, tok.pad_token_id)
    response_mask = cat([g.response_mask for _, g in parts], R, False)
    texts = [t.strip() for t in tok.batch_decode(response_ids.masked_fill(~response_mask, tok.pad_token_id),
                                                 skip_special_tokens=True)]
    return Rollout(
        example_idx=tuple(example_idx),
        prompt_ids=cat([b.prompt_ids for b, _ in parts], P, tok.pad_token_id, left=True),
        prompt_mask=cat([b.prompt_mask for b, _ in parts], P, False, left=True),
        response_ids=response_ids, response_mask=response_mask,
        ended=torch.cat([g.ended for _, g in parts]).cpu(), texts=tuple(texts),
        gen_logprobs=cat([g.logprobs for _, g in parts], R, 0.0),
    )


def _micro_batches(n: int, micro: int) -> list[range]:
    return [range(i, min(i + micro, n)) for i in range(0, n, micro)]


def packs(models: RolloutModels, sub: Rollout) -> bool:
    """Whether the forwards over these rows use the shared-prefix pack: asked for, and some prompt has
    more than one sample among them (else packing saves nothing)."""
    return models.shared_prefix and has_shared_prefix(sub.example_idx)


@torch.no_grad()
def response_logprobs(model, rollout: Rollout, models: RolloutModels, *, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (B, R) of the response tokens under softmax(logits / temperature) of `model` (a
    TokenLogprobModel or its engine): the distribution the responses were sampled from."""
    P = rollout.prompt_ids.shape[1]
    out = []
    for r in _micro_batches(len(rollout), models.micro_batch):
        sub = rollout.rows(list(r))
        if packs(models, sub):
            k = sub.pack(models.tokenizer).to(models.device)
            with distributed.autocast(models.precision, models.device):
                flat, _ = model(k.input_ids, k.attention_mask, None, k.position_ids, temperature=temperature,
                                token_index=k.token_index, token_ids=k.token_ids)
            out.append(k.per_token(flat.float()).cpu())
            continue
        ids, mask, target = sub.sequences(models.device)
        with distributed.autocast(models.precision, models.device):
            logp, _ = model(ids, mask, target, temperature=temperature)  # (b, T-1), aligned with ids[:, 1:]
        out.append(logp[:, P - 1 :].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def response_values(critic, rollout: Rollout, models: RolloutModels) -> torch.Tensor:
    """Values (B, R): the critic at the position before each response token, zero where masked."""
    P = rollout.prompt_ids.shape[1]
    out = []
    for r in _micro_batches(len(rollout), models.micro_batch):
        sub = rollout.rows(list(r))
        if packs(models, sub):
            k = sub.pack(models.tokenizer).to(models.device)
            with distributed.autocast(models.precision, models.device):
                flat = critic(k.input_ids, k.attention_mask, k.position_ids, value_index=k.token_index)
            out.append(k.per_token(flat.float()).cpu())
            continue
        ids, mask, _ = sub.sequences(models.device)
        with distributed.autocast(models.precision, models.device):
            v = critic(ids, mask)[:, P - 1 : -1].float().cpu()
        out.append(torch.where(sub.response_mask, v, torch.zeros_like(v)))
    return torch.cat(out)


@torch.no_grad()
def reward_model_scores(rm, rollout: Rollout, models: RolloutModels) -> torch.Tensor:
    """Raw reward-model scores (B,) of prompt + response without EOS, the form the reward model was
    trained on (its score is read at the last real token)."""
    eos = models.tokenizer.eos_token_id
    out = []
    for r in _micro_batches(len(rollout), models.micro_batch):
        sub = rollout.rows(list(r))
        if packs(models, sub):
            k = sub.pack(models.tokenizer).to(models.device)
            with distributed.autocast(models.precision, models.device):
                out.append(rm(k.input_ids, k.attention_mask, k.position_ids, read_index=k.read_index).float().cpu())
            continue
        ids = torch.cat([sub.prompt_ids, sub.response_ids], 1).to(models.device)
        keep = sub.response_mask & (sub.response_ids != eos)
        mask = torch.cat([sub.prompt_mask, keep], 1).to(models.device)
        with distributed.autocast(models.precision, models.device):
            out.append(rm(ids, mask).float().cpu())
    return torch.cat(out)


def score(rollout: Rollout, models: RolloutModels, examples: list[Example], cfg: RewardConfig) -> Rollout:
    """The hybrid reward per response: normalized reward-model score, reference-metric term, length penalty."""
    raw = reward_model_scores(models.rm, rollout, models)
    refs = [list(examples[i].references) for i in rollout.example_idx]
    if cfg.metric != "none":
        metric = torch.tensor(metrics.rouge_per_example(list(rollout.texts), refs)[cfg.metric])
    else:
        metric = torch.zeros(len(rollout))
    ratio = torch.tensor([metrics.n_words(t) / max(1.0, sum(metrics.n_words(r) for r in rs) / len(rs))
                          for t, rs in zip(rollout.texts, refs)])
    total, parts = hybrid_reward(raw, metric, ratio, rollout.ended, rm_mean=models.rm_stats["mean"],
                                 rm_std=models.rm_stats["std"], rm_weight=cfg.rm_weight, metric_weight=cfg.metric_weight,
                                 length_target_ratio=cfg.length_target_ratio, length_penalty=cfg.length_penalty,
                                 no_eos_penalty=cfg.no_eos_penalty, clip=cfg.clip)
    return dataclasses.replace(rollout, scores=total, reward_parts={**parts, "rm_raw": raw, "metric": metric,
                                                                     "length_ratio": ratio})


def complete(rollout: Rollout, models: RolloutModels, examples: list[Example], cfg: RewardConfig, *,
             temperature: float, old_logprobs: bool = True, timer: PhaseTimer | None = None) -> Rollout:
    """Scores, then the log-probs of the actor in training mode (unless `old_logprobs` is False: the
    update's own forward gives them, ppo.old_logprobs=update) and of the reference at the sampling
    temperature (the policy PPO optimizes is the one that sampled), and values."""
    with phase(timer, "reward"):
        rollout = score(rollout, models, examples, cfg)
    old = None
    if old_logprobs:
        with phase(timer, "old_logprobs"):
            old = response_logprobs(models.actor_engine, rollout, models, temperature=temperature)
    with phase(timer, "reference"):
        ref = response_logprobs(models.ref, rollout, models, temperature=temperature)
    with phase(timer, "critic_values"):
        values = response_values(models.critic, rollout, models) if models.critic is not None else None
    return dataclasses.replace(rollout, old_logprobs=old, ref_logprobs=ref, values=values)
