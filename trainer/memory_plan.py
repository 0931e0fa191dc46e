"""Memory and time per rank, from the config, the model's shape and the hardware, before anything loads.

    lastmile plan --config trainer/configs/demo.yaml
    lastmile plan --config trainer/configs/scitldr.yaml --shape 7b --gpus 8 --gpu-mem 80 --nodes 2

What is counted is what the code holds: in fp32 (precision=fp32, or `auto` on a CPU without native
bf16) every model's weights in fp32, DeepSpeed's fp32 optimizer-side copy, AdamW's two fp32 moments for
a trained model, fp32 gradients; with bf16 (`precision=bf16`, or `auto` on a GPU) DeepSpeed's bf16
layout (`mixed`): bf16 weights, frozen models included, and bf16 gradients beside fp32 master weights,
moments and gradient partitions, bf16 activations. ZeRO stage 1 partitions the optimizer state across ranks, stage 2 the gradients
too, stage 3 the weights too (frozen models included). An offloaded optimizer (and with it its fp32
gradients) or offloaded weights live in host memory instead of the device. Activations are counted per
micro-batch at the configured lengths (`activations` below), the KV cache and the kept per-step logits
while generating, and under ZeRO-3 the gathered actor in generation mode (the whole model in `all`
mode, one layer in `layer` mode).

`deepspeed_model_states` gives DeepSpeed's own estimate for the same shape
(`estimate_zero{2,3}_model_states_mem_needs`). DeepSpeed assumes its mixed precision (16-bit weights
and gradients beside fp32 master weights and moments, 18 bytes a parameter at ZeRO-3): `model_states`
with `mixed=True` counts that layout, and the tests hold the two within 1% for 135M, 1B, 7B and 70B.

Time is a floor, not a forecast: FLOPs (2 per parameter per token forward, 6 forward and backward) at
an assumed fraction of the device's peak, and generation's decode bounded by reading the weights once
per token from memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from lastmile.errors import ConfigError

GiB = 1024**3

# Tokens the prompt template adds around the document (the chat template's system and user turns).
TEMPLATE_TOKENS = 48
# Host memory one process holds before any model: Python, torch, transformers, DeepSpeed, tokenizers
# (measured here 2026-12-06: `import lastmile.stages.ppo` then a tokenizer, RSS 0.9 GiB).
RUNTIME_BYTES_CPU = int(0.9 * GiB)
RUNTIME_BYTES_GPU = int(1.0 * GiB)  # the CUDA context and kernels: assumed, not measured here


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture decoder (grouped-query attention, gated MLP, RMSNorm)."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * self.head_dim
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """The causal LM: embedding, layers, final norm, and an untied output projection."""
        head = 0 if self.tied else self.embedding_params
        return self.embedding_params + self.layers * self.layer_params + self.hidden + head

    @property
    def scalar_head_params(self) -> int:
        """A reward model or critic: the backbone (no output projection) and a one-output head."""
        return self.embedding_params + self.layers * self.layer_params + self.hidden + self.hidden

    def lora_params(self, r: int, targets: list[str]) -> int:
        """LoRA adapters of rank r on the named projections of every layer: r x (in + out) each."""
        H, I, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        sizes = {"q_proj": H + q, "k_proj": H + kv, "v_proj": H + kv, "o_proj": q + H, "gate_proj": H + I,
                 "up_proj": H + I, "down_proj": I + H}
        return self.layers * r * sum(sizes.get(t, 0) for t in targets)

    @property
    def largest_module_params(self) -> int:
        """DeepSpeed's `largest_layer_params`: the largest single module's own parameters (the embedding
        or an MLP projection)."""
        return max(self.embedding_params, self.hidden * self.intermediate)

    @classmethod
    def from_hf_config(cls, c, name: str = "model") -> ModelShape:
        heads = c.num_attention_heads
        return cls(name, c.vocab_size, c.hidden_size, c.num_hidden_layers, heads,
                   getattr(c, "num_key_value_heads", None) or heads, c.intermediate_size,
                   bool(getattr(c, "tie_word_embeddings", False)))


# Published shapes: SmolLM2-135M (the offline default), Llama-3.2-1B, Llama-2-7B, Llama-3.1-70B.
SHAPES = {
    "135m": ModelShape("SmolLM2-135M", 49152, 576, 30, 9, 3, 1536, True),
    "1b": ModelShape("Llama-3.2-1B", 128256, 2048, 16, 32, 8, 8192, True),
    "7b": ModelShape("Llama-2-7B", 32000, 4096, 32, 32, 32, 11008, False),
    "70b": ModelShape("Llama-3.1-70B", 128256, 8192, 80, 64, 8, 28672, False),
}


@dataclass(frozen=True)
class Hardware:
    """Ranks and what one rank has. `device_bytes` None: CPU ranks, whose memory is the host's."""

    ranks_per_node: int = 1
    nodes: int = 1
    device_bytes: int | None = None
    host_bytes: int | None = None  # per node
    # per rank. The CPU default is measured: `make demo`'s SFT on 2 AVX2 cores in fp32 (2026-12-06) trained
    # 110 tokens/s of SmolLM2-135M, 6 x 134.5M x 110 = 0.089 TFLOP/s
    peak_tflops: float = 0.089
    mfu: float = 1.0  # fraction of peak a training step reaches (the CPU rate above is already measured)
    bandwidth_gbs: float = 20.0  # per rank, memory bandwidth for decoding

    @property
    def world(self) -> int:
        return self.ranks_per_node * self.nodes

    @property
    def gpu(self) -> bool:
        return self.device_bytes is not None

    @classmethod
    def gpus(cls, n: int, mem_gib: float, *, nodes: int = 1, host_gib: float | None = None,
             tflops: float = 989.0, mfu: float = 0.4, bandwidth_gbs: float = 3350.0) -> Hardware:
        """n GPUs per node (defaults: an H100 SXM's dense bf16 peak and HBM3 bandwidth, 40% MFU)."""
        return cls(n, nodes, int(mem_gib * GiB), None if host_gib is None else int(host_gib * GiB),
                   tflops, mfu, bandwidth_gbs)


@dataclass(frozen=True)
class ZeroSettings:
    stage: int
    offload_optimizer: bool
    offload_params: bool
    gather: str  # generation under ZeRO-3: "all" (the whole actor at once) or "layer"
    mixed: bool = False  # DeepSpeed's bf16: 16-bit weights (and gradients), fp32 master weights and moments

    @property
    def weight_bytes(self) -> int:
        return 2 if self.mixed else 4

    @classmethod
    def from_ds(cls, ds: dict, gather: str = "auto", *, world: int = 1) -> ZeroSettings:
        z = ds.get("zero_optimization", {})
        device = lambda key: (z.get(key) or {}).get("device", "none") not in ("none", None)  # noqa: E731
        stage = int(z.get("stage", 0))
        # hybrid_engine's auto: whole-model gathering on several ranks; one rank already holds everything
        resolved = "all" if gather == "auto" else gather
        return cls(stage, device("offload_optimizer"), device("offload_param") and stage == 3,
                   resolved if stage == 3 and world > 1 else "none")


@dataclass
class Row:
    what: str
    device: int = 0  # bytes on the rank's device (on CPU ranks: its share of host memory)
    host: int = 0  # bytes in host memory when the device is a GPU (offload)


@dataclass
class StagePlan:
    """One stage's memory per rank: rows that stay for the whole stage, and the largest transient phase."""

    stage: str
    resident: list[Row] = field(default_factory=list)
    phases: dict[str, list[Row]] = field(default_factory=dict)
    seconds_per_step: float | None = None
    step_name: str = "step"

    def phase_total(self, name: str) -> int:
        return sum(r.device for r in self.phases[name])

    @property
    def peak_phase(self) -> str | None:
        return max(self.phases, key=self.phase_total) if self.phases else None

    @property
    def peak_device(self) -> int:
        return sum(r.device for r in self.resident) + (self.phase_total(self.peak_phase) if self.phases else 0)

    @property
    def peak_host(self) -> int:
        return sum(r.host for r in self.resident) + max((sum(r.host for r in rows) for rows in self.phases.values()),
                                                        default=0)


# ----------------------------------------------------------------------------- pure arithmetic


def model_states(params: int, *, trained: bool, z: ZeroSettings, world: int, mixed: bool = False) -> list[Row]:
    """Weights, DeepSpeed's optimizer-side copies and AdamW state of one model on one rank (bytes).
    Gradients are in `gradients` (they exist from the backward to the optimizer step).

    fp32, as the code runs today, measured on one CPU rank after two optimizer steps of a 136M-parameter
    Llama (tests/test_memory_plan.py holds these within 10%): no ZeRO 12 bytes a parameter (weights 4,
    moments 8); ZeRO-1/2 16.5 (DeepSpeed keeps its own fp32 partition for the optimizer to step, a copy
    even when the weights are fp32 already); ZeRO-3 20.8 (that copy and a flat buffer of the weight
    partitions). `mixed`: DeepSpeed's bf16/fp16 layout, as its estimators count it: 16-bit weights
    (partitioned only at ZeRO-3), fp32 master weights, moments and gradient partition."""
    shard = lambda n: math.ceil(n / world) if z.stage >= 1 else n  # noqa: E731
    mixed = mixed or z.mixed
    w_bytes = 2 if mixed else 4
    weights = params * w_bytes if z.stage < 3 else math.ceil(params * w_bytes / world)
    rows = [Row("weights", 0 if z.offload_params else weights, weights if z.offload_params else 0)]
    if not trained:
        return rows
    master = 4 if (mixed or z.stage >= 1) else 0
    flat = 4 if (z.stage == 3 and not mixed) else 0
    optim = shard(params * (master + flat + 8))
    rows.append(Row("optimizer states", 0 if z.offload_optimizer else optim, optim if z.offload_optimizer else 0))
    return rows


def gradients(params: int, *, z: ZeroSettings, world: int, mixed: bool = False) -> Row:
    """A trained model's gradients on one rank, from its backward to its optimizer step. fp32: one fp32
    gradient per weight, partitioned from ZeRO-2. `mixed`, as DeepSpeed's estimators count it: the
    fp32 partition the optimizer reads, and at ZeRO-2 also the 16-bit partition it is converted from
    (ZeRO-3 reduces 16-bit gradients in small buckets straight into the fp32 partition)."""
    shard = lambda n: n if z.stage < 2 else math.ceil(n / world)  # noqa: E731
    mixed = mixed or z.mixed
    grads = shard(params * 4) + (shard(params * 2) if mixed and z.stage < 3 else 0)
    return Row("gradients", 0 if z.offload_optimizer else grads, grads if z.offload_optimizer else 0)


def trained_states_bytes(params: int, *, z: ZeroSettings, world: int, mixed: bool = False) -> tuple[int, int]:
    """(device, host) bytes of a trained model's states at the optimizer step: weights, optimizer, gradients."""
    rows = model_states(params, trained=True, z=z, world=world, mixed=mixed) + [gradients(params, z=z, world=world,
                                                                                           mixed=mixed)]
    return sum(r.device for r in rows), sum(r.host for r in rows)


def activations(shape: ModelShape, tokens: int, *, seq: int, trained: bool, bytes_per: int,
                checkpointed: bool = False) -> int:
    """The peak of one forward and backward (`trained`) over `tokens` = micro-batch x sequence length, or
    the largest live set of a no-grad forward. Per layer and token, 12 H + 6 I values: fitted to the
    measured peak above a model's gradients (2026-12-06, CPU, fp32, SDPA: SmolLM2-135M 2.1 MB a token,
    12% above this count; random Llamas with H 576-1152 and I 1536-4608 21-25% below it). SDPA's fused
    path keeps no T x T matrix. Log-probs are computed in vocabulary chunks of 4096
    (`lastmile_kernels.logprob`), so the logits never exist whole."""
    per_token_layer = 12 * shape.hidden + 6 * shape.intermediate
    logits_chunk = tokens * 4096 * 4 * 2  # a chunk's logits and their softmax, fp32
    if not trained:  # one layer's working set at a time, and the hidden states in and out
        return tokens * (per_token_layer + 2 * shape.hidden) * bytes_per + logits_chunk
    if checkpointed:  # every layer's input kept, one layer's working set rebuilt at a time in the backward
        return tokens * (shape.layers * shape.hidden + per_token_layer) * bytes_per + tokens * shape.hidden * 4 \
            + logits_chunk
    return tokens * shape.layers * per_token_layer * bytes_per + tokens * shape.hidden * 4 + logits_chunk


def kv_cache(shape: ModelShape, batch: int, length: int, *, bytes_per: int) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * batch * length * bytes_per


def comparable_model_states(shape: ModelShape, *, stage: int, hw: Hardware, offload_optimizer: bool = False,
                            offload_params: bool = False) -> int:
    """Our device bytes per rank for what DeepSpeed's estimators count: `shape` trained alone in mixed
    precision, its states at the optimizer step, plus under ZeRO-3 the largest module gathered in fp32."""
    z = ZeroSettings(stage, offload_optimizer, offload_params and stage == 3, "none")
    device, _ = trained_states_bytes(shape.params, z=z, world=hw.world, mixed=True)
    return device + (4 * shape.largest_module_params if stage == 3 else 0)


def deepspeed_model_states(shape: ModelShape, *, stage: int, hw: Hardware, offload_optimizer: bool = False,
                           offload_params: bool = False) -> tuple[int, int]:
    """(device bytes, host bytes) per rank, from DeepSpeed's own estimators for `shape` trained alone.
    Their host figure for a run without offload is the loading buffer; for ZeRO-3 ours is `zero_init`."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        host, device, _ = estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_module_params, hw.ranks_per_node, hw.nodes, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params, zero_init=True)
        return device, host
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    host, device = estimate_zero2_model_states_mem_needs(shape.params, hw.ranks_per_node, hw.nodes,
                                                         cpu_offload=offload_optimizer)
    return device, host


# ----------------------------------------------------------------------------- from a config


@dataclass(frozen=True)
class Lengths:
    prompt: int
    response: int

    @property
    def sequence(self) -> int:
        return self.prompt + self.response


def _lengths(cfg, response: int) -> Lengths:
    return Lengths(cfg.prompt.max_document_tokens + TEMPLATE_TOKENS, response)


def _flops_seconds(flops: float, hw: Hardware) -> float:
    return flops / (hw.world * hw.peak_tflops * 1e12 * hw.mfu)


def _train_stage(name: str, shape: ModelShape, params: int, t, lengths: Lengths, z: ZeroSettings, hw: Hardware,
                 act_bytes: int, sequences_per_item: int = 1) -> StagePlan:
    """SFT (one sequence per example) or the reward model (a pair per item)."""
    sp = StagePlan(name, step_name="optimizer step")
    sp.resident = model_states(params, trained=True, z=z, world=hw.world)
    tokens = t.micro_batch_size * sequences_per_item * lengths.sequence
    sp.phases["update"] = [gradients(params, z=z, world=hw.world),
                           Row("activations", activations(shape, tokens, seq=lengths.sequence, trained=True,
                                                          bytes_per=act_bytes))]
    if z.stage == 3:
        sp.phases["update"].append(Row("gathered layers (prefetch)", 2 * z.weight_bytes * shape.layer_params))
    sp.seconds_per_step = _flops_seconds(6 * params * t.batch_size * sequences_per_item * lengths.sequence, hw)
    return sp


def settings(cfg, ds: dict, hw: Hardware) -> ZeroSettings:
    """The layout a run of `cfg` has on `hw`: ZeRO stage, offload and gathering from `ds`, and DeepSpeed's
    bf16 (`mixed`) where `precision` gives bf16 on that device (`distributed.use_bf16`; GPUs: anything but
    fp32)."""
    import torch

    from lastmile.distributed import use_bf16

    bf16 = cfg.precision != "fp32" if hw.gpu else use_bf16(cfg.precision, torch.device("cpu"))
    return replace(ZeroSettings.from_ds(ds, cfg.deepspeed.generation_gather, world=hw.world), mixed=bf16)


def plan_memory(cfg, shape: ModelShape, hw: Hardware, stages: tuple[str, ...], ds: dict, *,
                reward: ModelShape | None = None) -> list[StagePlan]:
    """Per stage of the command, memory per rank and seconds per optimizer step (or PPO iteration).
    `shape` is the trained model's; `reward` the reward model's (and the critic's started from it) where
    it differs (default: `shape`, as when the reward model starts from the SFT model)."""
    from lastmile.config import plan_ppo

    reward = reward or shape
    z = settings(cfg, ds, hw)
    act = 2 if z.mixed else 4
    out = []
    for stage in stages:
        if stage == "sft":
            out.append(_train_stage("sft", shape, shape.params, cfg.sft, _lengths(cfg, cfg.prompt.max_summary_tokens),
                                    z, hw, act))
        elif stage == "reward-model":
            out.append(_train_stage("reward-model", shape, shape.scalar_head_params, cfg.rm,
                                    _lengths(cfg, cfg.prompt.max_summary_tokens), z, hw, act, sequences_per_item=2))
        elif stage == "ppo":
            o = cfg.ppo
            p = plan_ppo(o.prompts_per_iteration, o.samples_per_prompt, o.minibatch_size, o.micro_batch_size, o.epochs,
                         hw.world)
            out.append(_ppo_stage(cfg, shape, reward, hw, z, p, act))
        elif stage == "best-of-n":  # sampling with two frozen models, then SFT's training on the kept summaries
            b = cfg.best_of_n
            sp = StagePlan("best-of-n sampling", step_name="chunk")
            for role, params in (("model", shape.params), ("reward model", reward.scalar_head_params)):
                for r in model_states(params, trained=False, z=z, world=hw.world):
                    sp.resident.append(Row(f"{role} {r.what}", r.device, r.host))
            sp.phases["generation"] = _generation_rows(shape, b.batch_size * b.samples_per_example,
                                                       _lengths(cfg, b.max_new_tokens), z, hw, act, keep_logits=True)
            out.append(sp)
            out.append(_train_stage("best-of-n fine-tune", shape, shape.params, b.fine_tuning(cfg.sft),
                                    _lengths(cfg, cfg.prompt.max_summary_tokens), z, hw, act))
        elif stage in ("evaluate", "report"):
            g = cfg.eval.generation
            lengths = _lengths(cfg, g.max_new_tokens)
            sp = StagePlan(stage, step_name="batch")
            sp.resident = [Row("weights (model, and the baseline's in turn)",
                               *_place(model_states(shape.params, trained=False, z=z, world=hw.world)))]
            sp.phases["generation"] = _generation_rows(shape, g.batch_size * (g.num_beams if g.strategy == "beam" else 1),
                                                       lengths, z, hw, act, keep_logits=False)
            out.append(sp)
    return out


def _place(rows: list[Row]) -> tuple[int, int]:
    return sum(r.device for r in rows), sum(r.host for r in rows)


def _generation_rows(shape: ModelShape, batch: int, lengths: Lengths, z: ZeroSettings, hw: Hardware, act: int,
                     *, keep_logits: bool) -> list[Row]:
    rows = [Row("KV cache", kv_cache(shape, batch, lengths.sequence, bytes_per=act)),
            Row("prefill activations", activations(shape, batch * lengths.prompt, seq=lengths.prompt, trained=False,
                                                   bytes_per=act))]
    if keep_logits:  # hybrid_engine asks generate() for every step's logits (B, V) in fp32
        rows.append(Row("per-step logits", lengths.response * batch * shape.vocab * 4))
    if z.gather == "all":
        w = z.weight_bytes
        rows.append(Row("gathered actor (generation_gather=all)", w * shape.params - math.ceil(w * shape.params / hw.world)))
    elif z.gather == "layer":
        rows.append(Row("gathered layer (generation_gather=layer)",
                        z.weight_bytes * max(shape.layer_params, shape.embedding_params)))
    return rows


def _ppo_micro_batch_tokens(cfg, lengths: Lengths) -> int:
    """Tokens in one micro-batch of PPO's forwards: rows x (prompt + response), or with ppo.shared_prefix
    (samples_per_prompt > 1; off with flash_attention_2) each prompt once for its samples in the micro-batch."""
    o = cfg.ppo
    k = o.samples_per_prompt
    if o.shared_prefix and k > 1 and cfg.model.attn_implementation != "flash_attention_2":
        groups = math.ceil(o.micro_batch_size / k)  # groups stay whole where the micro-batch allows
        return groups * lengths.prompt + o.micro_batch_size * lengths.response
    return o.micro_batch_size * lengths.sequence


def _ppo_stage(cfg, shape: ModelShape, reward: ModelShape, hw: Hardware, z: ZeroSettings, p, act: int) -> StagePlan:
    o = cfg.ppo
    lengths = _lengths(cfg, o.max_new_tokens)
    critic = o.advantage == "gae"
    rm = o.reward.rm_weight > 0
    sp = StagePlan("ppo", step_name="iteration")
    if o.lora.r:  # a frozen actor trained through adapters, which is its own reference with them off
        roles = [("actor", shape.params, False), ("actor adapters", shape.lora_params(o.lora.r, o.lora.target_modules),
                                                   True)]
    else:
        roles = [("actor", shape.params, True), ("reference", shape.params, False)]
    roles += [("critic", reward.scalar_head_params, True)] if critic else []
    roles += [("reward model", reward.scalar_head_params, False)] if rm else []
    for role, params, trained in roles:
        for r in model_states(params, trained=trained, z=z, world=hw.world):
            sp.resident.append(Row(f"{role} {r.what}", r.device, r.host))
    sp.phases["generation"] = _generation_rows(shape, p.rollout_per_rank, lengths, z, hw, act, keep_logits=True)
    tokens = _ppo_micro_batch_tokens(cfg, lengths)
    # the actor's and the critic's steps alternate per micro-batch, so both models' gradients are live
    upd = [Row(f"{role} gradients", *_place([gradients(params, z=z, world=hw.world)]))
           for role, params, trained in roles if trained]
    upd.append(Row("actor activations", activations(shape, tokens, seq=lengths.sequence, trained=True, bytes_per=act,
                                                    checkpointed=o.gradient_checkpointing)))
    scoring = [Row("frozen forward", max(activations(s, tokens, seq=lengths.sequence, trained=False, bytes_per=act)
                                         for s in (shape, reward)))]
    if z.stage == 3:
        # layers are gathered one at a time (and the next prefetched); the output embedding is the log-prob
        # head's external parameter (TokenLogprobModel), whole for the entire forward and backward
        gathered = [Row("gathered layers (prefetch)", 2 * z.weight_bytes * shape.layer_params),
                    Row("gathered output embedding", z.weight_bytes * shape.embedding_params)]
        upd += gathered
        scoring += gathered
    sp.phases["update"] = upd
    sp.phases["scoring"] = scoring
    # time: generation (prefill FLOPs, decode bounded by reading the gathered weights once per token),
    # frozen forwards, the update (forward and backward; a separate old-log-prob forward unless skipped)
    R, T = p.rollout, lengths.sequence
    n_frozen = shape.params + (reward.scalar_head_params if rm else 0) + (reward.scalar_head_params if critic else 0)
    actor = (4 if o.lora.r else 6) * shape.params  # a frozen weight needs no weight gradient (LoRA)
    update_flops = o.epochs * (actor + 6 * (reward.scalar_head_params if critic else 0)) * R * T
    old_lp = 0 if o.old_logprobs == "update" else 2 * shape.params * R * T
    # remax also decodes one greedy response per prompt
    batches = [p.rollout_per_rank] + ([p.prompts_per_rank] if o.advantage == "remax" else [])
    decode = sum(o.max_new_tokens * max(2 * shape.params * b / (hw.peak_tflops * 1e12 * hw.mfu),
                                        4 * shape.params / (hw.bandwidth_gbs * 1e9)) for b in batches)
    sp.seconds_per_step = decode + _flops_seconds(2 * shape.params * R * lengths.prompt + 2 * n_frozen * R * T
                                                  + old_lp + update_flops, hw)
    return sp


# ----------------------------------------------------------------------------- verdict


@dataclass
class Verdict:
    fits: str  # "fits", "fits with offload" (as configured), "does not fit as configured" (advice fits), "does not fit"
    peak_device: int
    budget: int | None
    advice: list[str] = field(default_factory=list)  # settings that would make it fit, cheapest first


def budget_per_rank(hw: Hardware) -> int | None:
    if hw.gpu:
        return hw.device_bytes
    if hw.host_bytes:
        return hw.host_bytes // hw.ranks_per_node
    return None


def _peak(plans: list[StagePlan], hw: Hardware) -> int:
    """The largest stage's peak per rank. A CPU rank's "device" is the host: what is offloaded stays in
    the same memory, beside the runtime."""
    if hw.gpu:
        return max(sp.peak_device for sp in plans)
    return max(sp.peak_device + sp.peak_host for sp in plans) + RUNTIME_BYTES_CPU


def verdict(cfg, shape: ModelShape, hw: Hardware, stages: tuple[str, ...], ds: dict, *,
            reward: ModelShape | None = None) -> tuple[list[StagePlan], Verdict]:
    """The plan, whether its peak fits 90% of each rank's memory, and settings that would make it fit."""
    plans = plan_memory(cfg, shape, hw, stages, ds, reward=reward)
    peak, budget = _peak(plans, hw), budget_per_rank(hw)
    z = settings(cfg, ds, hw)
    if budget is None:
        return plans, Verdict("unknown (no memory budget: pass --gpu-mem, or --host-mem for CPU ranks)", peak, None)
    if peak <= 0.9 * budget:
        offload = z.offload_optimizer or z.offload_params
        return plans, Verdict("fits with offload" if offload else "fits", peak, budget)
    fitting = []
    for label, offload, (alt_cfg, alt_ds) in _alternatives(cfg, ds):
        if offload and not hw.gpu:  # offloading to the host from a CPU rank frees nothing
            continue
        alt = plan_memory(alt_cfg, shape, hw, stages, alt_ds, reward=reward)
        alt_peak, host = _peak(alt, hw), max(sp.peak_host for sp in alt) if hw.gpu else 0
        if alt_peak <= 0.9 * budget and (not host or hw.host_bytes is None or host * hw.ranks_per_node <= 0.9 * hw.host_bytes):
            fitting.append(f"{label}: peak {alt_peak / GiB:.1f} GiB per rank"
                           + (f" and {host * hw.ranks_per_node / GiB:.0f} GiB of host memory per node" if host else ""))
    more = _ranks_needed(cfg, shape, hw, stages, ds, budget, reward)
    advice = fitting + ([more] if more else [])
    return plans, Verdict("does not fit as configured" if advice else "does not fit", peak, budget, advice)


def _with_zero3(ds: dict, *, offload: bool = False) -> dict:
    """A copy of the DeepSpeed dict at ZeRO-3, with the optimizer and the weights offloaded to the host if asked."""
    import copy

    d = copy.deepcopy(ds)
    zo = d.setdefault("zero_optimization", {})
    zo["stage"] = 3
    if offload:
        zo["offload_optimizer"] = {"device": "cpu"}
        zo["offload_param"] = {"device": "cpu"}
    return d


def _alternatives(cfg, ds: dict):
    """Settings a user can change, each alone and cumulatively, in the order they cost least speed."""

    small = replace(cfg, ppo=replace(cfg.ppo, micro_batch_size=1), sft=replace(cfg.sft, micro_batch_size=1),
                    rm=replace(cfg.rm, micro_batch_size=1))
    layer = replace(small, deepspeed=replace(cfg.deepspeed, generation_gather="layer"))
    yield "deepspeed.config=zero3", False, (cfg, _with_zero3(ds))
    yield "deepspeed.config=zero3 and micro_batch_size=1", False, (small, _with_zero3(ds))
    yield "deepspeed.config=zero3, micro_batch_size=1, deepspeed.generation_gather=layer", False, (layer, _with_zero3(ds))
    yield ("deepspeed.config=zero3_offload, micro_batch_size=1, deepspeed.generation_gather=layer", True,
           (layer, _with_zero3(ds, offload=True)))


def _ranks_needed(cfg, shape, hw: Hardware, stages, ds, budget: int,
                  reward: ModelShape | None = None) -> str | None:
    """The fewest ranks per node (then nodes) at which ZeRO-3 with layer gathering fits, up to 1024 ranks."""
    d = _with_zero3(ds)
    alt_cfg = replace(cfg, deepspeed=replace(cfg.deepspeed, generation_gather="layer"))
    for world in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if world <= hw.world:
            continue
        per_node = min(world, max(hw.ranks_per_node, 8 if hw.gpu else hw.ranks_per_node))
        alt_hw = replace(hw, ranks_per_node=per_node, nodes=math.ceil(world / per_node))
        try:
            alt = plan_memory(alt_cfg, shape, alt_hw, stages, d, reward=reward)
        except ConfigError:  # batch sizes that do not divide by this many ranks
            continue
        if _peak(alt, hw) <= 0.9 * budget:
            return (f"{alt_hw.world} ranks ({alt_hw.nodes} node(s) x {alt_hw.ranks_per_node}) with zero3 and "
                    "generation_gather=layer")
    return None


def describe(plans: list[StagePlan], v: Verdict, shape: ModelShape, hw: Hardware, z: ZeroSettings, *,
             reward: ModelShape | None = None) -> str:
    g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
    where = (f"{hw.nodes} node(s) x {hw.ranks_per_node} GPU(s) of {hw.device_bytes / GiB:.0f} GiB" if hw.gpu
             else f"{hw.world} CPU rank(s)")
    lines = [f"Memory plan: {shape.name} ({shape.params / 1e6:,.0f}M parameters) on {where}, ZeRO-{z.stage}"
             + (" with optimizer offload" if z.offload_optimizer else "") + (" and parameter offload" if z.offload_params
                                                                             else "")
             + ("" if z.gather == "none" else f", generation_gather={z.gather}")
             + (", bf16 weights with fp32 master weights" if z.mixed else ", fp32 weights")
             + (f"; reward model {reward.name} ({reward.params / 1e6:,.0f}M)" if reward else "")]
    for sp in plans:
        lines.append(f"  {sp.stage}: peak {(sp.peak_device + (0 if hw.gpu else sp.peak_host)) / GiB:.2f} GiB per rank"
                     + (f" (+{sp.peak_host / GiB:.2f} GiB host)" if sp.peak_host and hw.gpu else "")
                     + (f", about {sp.seconds_per_step:.3g} s per {sp.step_name} at best" if sp.seconds_per_step else ""))
        for r in sp.resident:
            lines.append(f"    {g(r.device)} GiB  {r.what}" + (f"  (+{r.host / GiB:.2f} GiB host)" if r.host else ""))
        for name, rows in sp.phases.items():
            mark = "  <- peak" if name == sp.peak_phase else ""
            lines.append(f"    {g(sp.phase_total(name))} GiB  while {name}: "
                         + ", ".join(f"{r.what} {r.device / GiB:.2f}" for r in rows if r.device) + mark)
    lines.append(f"  runtime (Python, torch, libraries): {(RUNTIME_BYTES_GPU if hw.gpu else RUNTIME_BYTES_CPU) / GiB:.1f}"
                 " GiB per process" + (" on the host" if hw.gpu else ""))
    budget = "" if v.budget is None else f" of {v.budget / GiB:.1f} GiB per rank (90% usable)"
    lines.append(f"Verdict: {v.fits}: peak {v.peak_device / GiB:.2f} GiB{budget}.")
    lines += [f"  fits with {a}" for a in v.advice]
    return "\n".join(lines)
