"""Reward-model stage: learn to prefer the reference summary over failures made from the data.

    lastmile reward-model --config trainer/configs/tiny.yaml output_dir=runs/tiny
    deepspeed --num_gpus 2 trainer/main.py reward-model --config X deepspeed.config=zero3

Pairs (document, reference, negative) come from lastmile.data.negatives (synthetic failure modes,
mixed by `rm.mode_weights`) and optionally from a policy's own low-ROUGE samples. A scalar head on
the SFT backbone is trained with the Bradley-Terry loss. At the end, on held-out examples
(`data.dev_split`): pairwise accuracy and AUROC per failure mode, score distributions of references
and of the MLE outputs (raw and post-processed, from `<output_dir>/eval/` when `evaluate` ran), the
20 negatives the model prefers most, and the reference-score mean/std that later stages use to
normalize rewards. Writes <output_dir>/reward_model/: model/ (AutoModelForSequenceClassification,
plus reward_stats.json), results.json, fooled.md, scores.png, checkpoints/.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lastmile import checkpoint, chunks, distributed, metrics, seeding, tracking
from lastmile.algorithms.losses import auroc, pairwise_loss
from lastmile.config import FAILURE_MODES, BatchPlan, Config, plan_batches
from lastmile.data import sampling
from lastmile.data.negatives import NegativeContext, Pair, make_pairs, pairs_for_every_mode
from lastmile.data.predictions import read_predictions
from lastmile.data.prefix_pack import PrefixPack, pack_shared_prefix
from lastmile.data.prompts import PromptBuilder, TokenizedExample
from lastmile.data.records import Example, load_split
from lastmile.data.sampling import micro_batch_indices
from lastmile.errors import ConfigError, UserError
from lastmile.generation import Generator, open_generator
from lastmile.model_inputs import ANY_LM, CAUSAL_LM, check_model_input
from lastmile.models import TREE_MASK_ATTENTION, ScalarRewardModel, hidden_size_of, load_reward_backbone, load_tokenizer
from lastmile.plots import plot_histograms
from lastmile.rollout import fixed_rollout
from lastmile.stages import common
from lastmile.stages.loop import RewardModelState, TrainContext, train_loop

log = logging.getLogger(__name__)
STATS_FILE = "reward_stats.json"


@dataclass(frozen=True)
class EncodedPair:
    chosen: tuple[int, ...]  # prompt + reference tokens (no EOS: the score is read at the last token)
    rejected: tuple[int, ...]  # prompt + negative tokens
    mode: str
    prompt_len: int  # the prompt's tokens at the start of both


def run(cfg: Config) -> Path:
    init = _init_path(cfg)
    _check_inputs(cfg, init)  # before anything is written
    start = common.begin(cfg, "reward_model", "Reward model", inputs={"init": init})
    dist, stage_dir = start.dist, start.stage_dir
    if start.done:
        return stage_dir / "model"
    cfg = start.settled(cfg)  # precision=auto as this stage began (common.stage_precision)
    tokenizer = load_tokenizer(replace(cfg.model, path=init, gguf_file=None, tokenizer_path=cfg.model.tokenizer_path),
                               field=_init_field(cfg, init))
    builder = PromptBuilder(tokenizer, cfg.prompt)
    train_ex = load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_examples)
    pairs = make_pairs(train_ex, negative_context(tokenizer, train_ex), cfg.rm.mode_weights,
                       per_example=cfg.rm.negatives_per_example,
                       seed=seeding.derive_seed(cfg.seed, stage="rm_train_pairs"))
    if cfg.rm.policy_negatives_model:
        pairs += policy_negatives(cfg, train_ex, dist, stage_dir / "policy_samples.jsonl")
    train = encode_pairs(pairs, prompt_ids_by_id(train_ex, builder), builder)
    plan = plan_batches(cfg.rm.batch_size, cfg.rm.micro_batch_size, dist.world_size, field_prefix="rm")
    total_steps = sampling.total_steps(cfg.rm, len(train), plan, field_prefix="rm", unit="pairs")

    ds = distributed.ds_config_for(cfg.deepspeed.config, plan, cfg.rm.optim(),
                                   hidden_size=hidden_size_of(cfg.model, None if init == cfg.model.path else init),
                                   bf16=distributed.use_bf16(cfg.precision, dist.device))
    rm, attn = load_reward_backbone(cfg.model, init, dist.device, tokenizer.pad_token_id, seed=cfg.seed, ds=ds)
    engine = distributed.build_engine(ScalarRewardModel(rm), ds, cfg.rm.optim(), total_steps=total_steps)
    if dist.is_main:
        log.info("reward model from %s: %d training pairs (%s), %d steps, attention %s", init, len(train),
                 _mode_counts(pairs), total_steps, attn.implementation)
    state = RewardModelState.resumed(checkpoint.resume(engine, stage_dir / "checkpoints", is_main=dist.is_main))
    tracker = tracking.start(start.as_given(cfg), stage="reward_model", is_main=dist.is_main,
                             resume_run_id=state.run_id,
                             record=stage_dir / "mlflow_run.json",
                             upstream_run_id=tracking.upstream_run_id(cfg.output_dir, "sft"))
    state.run_id = tracker.run_id
    shared = cfg.rm.shared_prefix and attn.implementation in TREE_MASK_ATTENTION
    layout = "shared_prefix" if shared else "packed" if cfg.rm.packing else "padded"  # how a micro-batch's pairs sit
    common.write_stage_config(start.as_given(cfg), stage_dir, tracker, dist, runtime={
        "precision": cfg.precision, "attention": attn.implementation, "world_size": dist.world_size,
        "train_pairs": len(train), "layout": layout,
        "total_steps": total_steps})
    ctx = TrainContext(cfg, dist, cfg.rm, engine, ds, rm, "rm.", tokenizer, plan, total_steps, tracker, stage_dir,
                       "reward-model")
    with tracking.closing(tracker):
        train_loop(ctx, state, lambda step: rm_train_step(engine, train, step, plan, cfg, dist, tokenizer.pad_token_id,
                                                          shared_prefix=shared),
                   on_step=lambda st, m: st.history.append((st.step, m["rm/loss"], m["rm/accuracy"])),
                   show=("rm/loss", "rm/accuracy"))
        _evaluate_and_save(ctx, builder, state)
        if dist.is_main:
            common.mark_done(cfg, stage_dir, "reward_model", state.run_id, start.identity)
    return stage_dir / "model"


def _init_path(cfg: Config) -> str:
    if cfg.rm.init:
        return cfg.rm.init
    sft = Path(cfg.output_dir) / "sft" / "model"
    if (sft / "config.json").is_file():
        return str(sft)
    if cfg.model.random_init:
        raise ConfigError(
            f"rm.init is unset and {sft} holds no SFT model, while model.random_init is true. Run `lastmile sft` "
            "with the same output_dir first, or set rm.init to a model path."
        )
    return cfg.model.path


def _init_field(cfg: Config, init: str) -> str:
    """The setting that chose `init`, for messages: rm.init (set, or unset: the SFT model), else model.path."""
    return "model.path" if init == cfg.model.path and not cfg.rm.init else "rm.init"


def _check_inputs(cfg: Config, init: str) -> None:
    """rm.init a causal LM (it gets a new score head) or a reward model, with its weights; the model
    sampling policy negatives a causal LM (lastmile.model_inputs)."""
    from_base = init == cfg.model.path and not cfg.rm.init
    check_model_input(_init_field(cfg, init), init, ANY_LM, gguf_file=cfg.model.gguf_file if from_base else None)
    if cfg.rm.policy_negatives_model:
        check_model_input("rm.policy_negatives_model", cfg.rm.policy_negatives_model, CAUSAL_LM)


def _mode_counts(pairs: list[Pair]) -> str:
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p.mode] = counts.get(p.mode, 0) + 1
    return ", ".join(f"{m} {n}" for m, n in sorted(counts.items()))


def negative_context(tokenizer, examples: list[Example]) -> NegativeContext:
    vocab = [t for t in (tokenizer.decode([i]) for i in range(len(tokenizer))) if t.strip() and t.isprintable()]
    return NegativeContext(others=examples, vocab=vocab,
                           count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))


POLICY_SAMPLE_CHUNK = 64  # papers per kept chunk of policy samples (about a minute each for SmolLM2-135M on 2 cores)


def policy_negatives(cfg: Config, examples: list[Example], dist, cache: Path) -> list[Pair]:
    """The policy's own sampled summaries whose ROUGE-L against the reference is low. The samples are
    drawn once and kept in `cache`, so a resumed stage trains on the same pairs without sampling again;
    while they are drawn, each chunk of POLICY_SAMPLE_CHUNK papers is kept as soon as it is done, seeded
    by its index (`lastmile.chunks`: a kill loses one chunk, a stop signal ends the stage after one)."""
    texts = policy_samples(cfg, examples, dist, cache)
    scores = metrics.rouge_per_example(texts, [list(e.references) for e in examples])["rougeL"]
    return [Pair(e.id, "policy", e.summary, t) for e, t, s in zip(examples, texts, scores)
            if t.strip() and s < cfg.rm.policy_negatives_max_rougeL]


def policy_samples(cfg: Config, examples: list[Example], dist, cache: Path) -> list[str]:
    """One sample per example at T = 1 from rm.policy_negatives_model, in order (kept in `cache` as
    `{"id", "prediction"}` lines)."""
    if cache.is_file():
        return read_predictions(cache, examples)
    gen = replace(cfg.eval.generation, strategy="sample", temperature=1.0, top_p=1.0)

    @functools.cache
    def sampler() -> tuple[Generator, list[TokenizedExample]]:  # loaded for the first chunk that is missing
        g = open_generator(cfg.rm.policy_negatives_model, cfg, dist)
        return g, PromptBuilder(g.tokenizer, cfg.prompt).tokenize(examples, with_response=False)[0]

    def work(k: int, idx: list[int]) -> list[dict]:
        g, prompts = sampler()
        seeding.seed_everything(cfg.seed, stage="rm_policy_negatives", step=k)  # the chunk's, on any rank
        padded = idx + idx[-1:] * (POLICY_SAMPLE_CHUNK - len(idx)) if g.collective else idx  # equal calls per rank
        texts = g.texts([prompts[i] for i in padded], gen)[: len(idx)]
        return [{"id": examples[i].id, "prediction": t} for i, t in zip(idx, texts)]

    folder = cache.with_suffix("")
    rows = chunks.run(folder, chunks.split(len(examples), POLICY_SAMPLE_CHUNK), work, dist, desc="policy samples")
    chunks.finish(folder, cache, rows, dist)
    return [r["prediction"] for r in rows]


def prompt_ids_by_id(examples: list[Example], builder: PromptBuilder) -> dict[str, tuple[int, ...]]:
    return {e.id: tuple(builder.prompt_ids(e.document)[0]) for e in examples}


def encode_pairs(pairs: list[Pair], prompts: dict[str, tuple[int, ...]], builder: PromptBuilder) -> list[EncodedPair]:
    return [EncodedPair(prompts[p.id] + summary_ids(builder, p.chosen), prompts[p.id] + summary_ids(builder, p.rejected),
                        p.mode, len(prompts[p.id])) for p in pairs]


def summary_ids(builder: PromptBuilder, text: str) -> tuple[int, ...]:
    return tuple(builder.response_ids(text)[0][:-1])  # drop EOS: see ScalarRewardModel


def collate_sequences(seqs: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids (B, T) long and attention_mask (B, T) bool."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return ids, mask


def pack_sequences(seqs: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One row without padding: input_ids (1, L) and position_ids (1, L) restarting per sequence."""
    ids = [t for s in seqs for t in s]
    pos = [i for s in seqs for i in range(len(s))]
    return torch.tensor([ids], dtype=torch.long), torch.tensor([pos], dtype=torch.long)


def pack_pairs(batch: list[EncodedPair], pad_id: int) -> PrefixPack:
    """Each pair as one shared-prefix group: its prompt once, then the reference and the negative (rows
    2i and 2i + 1 of the pack's read_index: chosen, rejected)."""
    rows = [(i, p.chosen if side == 0 else p.rejected) for i, p in enumerate(batch) for side in (0, 1)]
    rollout = fixed_rollout([i for i, _ in rows], [batch[i].chosen[: batch[i].prompt_len] for i, _ in rows],
                            [seq[batch[i].prompt_len :] for i, seq in rows], pad_id)
    return pack_shared_prefix(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask,
                              rollout.example_idx, eos_id=-1, pad_id=pad_id)  # summaries hold no EOS: read at the last


def rm_train_step(engine, train: list[EncodedPair], step: int, plan: BatchPlan, cfg: Config, dist, pad_id: int, *,
                  shared_prefix: bool) -> dict:
    stats = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
    real = processed = 0
    for group in micro_batch_indices(len(train), step, plan, rank=dist.rank, seed=cfg.seed):
        batch = [train[i] for i in group]
        seqs = [p.chosen for p in batch] + [p.rejected for p in batch]
        with distributed.autocast(cfg.precision, dist.device):
            if shared_prefix:
                k = pack_pairs(batch, pad_id).to(dist.device)
                both = engine(k.input_ids, k.attention_mask, k.position_ids, read_index=k.read_index)  # (2n,)
                scores, ids = torch.cat([both[0::2], both[1::2]]), k.input_ids
                tokens = sum(len(p.chosen) + len(p.rejected) - p.prompt_len for p in batch)
            elif cfg.rm.packing:
                ids, pos = pack_sequences(seqs)
                scores = engine(ids.to(dist.device), torch.ones_like(ids, dtype=torch.bool).to(dist.device),
                                pos.to(dist.device))
                tokens = sum(len(x) for x in seqs)
            else:
                ids, mask = collate_sequences(seqs, pad_id)
                scores = engine(ids.to(dist.device), mask.to(dist.device))
                tokens = sum(len(x) for x in seqs)
        real, processed = real + tokens, processed + ids.numel()
        n = len(batch)
        loss, st = pairwise_loss(scores[:n], scores[n:], margin=cfg.rm.margin)
        if distributed.all_reduce_sum(0.0 if torch.isfinite(loss) else 1.0) > 0:
            raise UserError(f"rm loss became {float(loss)} (not finite) at step {step + 1}; the weights were not "
                            "changed. Lower rm.lr or set precision=fp32.")
        engine.backward(loss)
        engine.step()
        for k, v in (("loss", float(loss.detach())), ("accuracy", st["accuracy"]), ("margin", st["margin"])):
            stats[k] += v / plan.grad_accum
    out = {f"rm/{k}": distributed.all_reduce_sum(v) / dist.world_size for k, v in stats.items()}
    out["perf/padding_fraction"] = 1 - distributed.all_reduce_sum(real) / distributed.all_reduce_sum(processed)
    out["rm/lr"] = engine.get_lr()[0]
    return out


@torch.no_grad()
def score_sequences(engine, seqs: list[tuple[int, ...]], micro: int, precision: str, dist, pad_id: int) -> list[float]:
    """Scores in order. Ranks score interleaved shards with equal forward counts (ZeRO-3 needs it)."""
    engine.eval()
    mine = list(range(dist.rank, len(seqs), dist.world_size))
    n_batches = -(-len(range(0, len(seqs), dist.world_size)) // micro)
    out: list[float] = []
    for b in range(n_batches):
        idx = mine[b * micro : (b + 1) * micro]
        ids, mask = collate_sequences([seqs[i] for i in idx] or [seqs[0]], pad_id)  # dummy keeps ranks in step
        with distributed.autocast(precision, dist.device):
            s = engine(ids.to(dist.device), mask.to(dist.device))
        out.extend(s.tolist()[: len(idx)])
    engine.train()
    scores = [0.0] * len(seqs)
    for idx, vals in zip(distributed.gather_objects(mine), distributed.gather_objects(out)):
        for i, v in zip(idx, vals):
            scores[i] = v
    return scores


def evaluate_reward_model(cfg: Config, engine, tokenizer, builder: PromptBuilder, dist) -> dict:
    """Per-mode accuracy/AUROC on held-out examples, score distributions, and the most-fooling negatives."""
    eval_ex = load_split(cfg.data, cfg.data.dev_split, cfg.rm.eval_examples or cfg.data.max_eval_examples)
    prompts = prompt_ids_by_id(eval_ex, builder)
    pairs = pairs_for_every_mode(eval_ex, negative_context(tokenizer, eval_ex), FAILURE_MODES,
                                 seed=seeding.derive_seed(cfg.seed, stage="rm_eval_pairs"))
    encoded = encode_pairs(pairs, prompts, builder)
    refs = [prompts[e.id] + summary_ids(builder, e.summary) for e in eval_ex]
    mle = _mle_outputs(Path(cfg.output_dir))
    mle_prompts = prompt_ids_by_id(load_split(cfg.data, cfg.data.eval_split, cfg.data.max_eval_examples), builder) \
        if mle else {}
    mle_seqs = {name: [mle_prompts[i] + summary_ids(builder, t) for i, t in rows if i in mle_prompts]
                for name, rows in mle.items()}
    everything = refs + [p.rejected for p in encoded] + [s for seqs in mle_seqs.values() for s in seqs]
    scores = score_sequences(engine, everything, cfg.rm.micro_batch_size, cfg.precision, dist, tokenizer.pad_token_id)
    ref_scores = dict(zip((e.id for e in eval_ex), scores[: len(refs)]))
    neg_scores = scores[len(refs) : len(refs) + len(encoded)]
    per_mode = {}
    for mode in FAILURE_MODES:
        rows = [(ref_scores[p.id], s) for p, s in zip(pairs, neg_scores) if p.mode == mode]
        if rows:
            r, n = torch.tensor([x for x, _ in rows]), torch.tensor([y for _, y in rows])
            per_mode[mode] = {"pairs": len(rows), "accuracy": float((r > n).float().mean()),
                              "auroc": auroc(r, n), "mean_gap": float((r - n).mean())}
    ref_t = torch.tensor(list(ref_scores.values()))
    distributions = {"reference": list(ref_scores.values())}
    offset = len(refs) + len(encoded)
    for name, seqs in mle_seqs.items():
        distributions[name] = scores[offset : offset + len(seqs)]
        offset += len(seqs)
    fooled = sorted(((s - ref_scores[p.id], p) for p, s in zip(pairs, neg_scores)), key=lambda x: -x[0])[:20]
    return {
        "n_examples": len(eval_ex),
        "per_mode": per_mode,
        "reward_stats": {"mean": float(ref_t.mean()), "std": float(ref_t.std()) if len(ref_t) > 1 else 1.0,
                         "n": len(ref_t), "split": cfg.data.dev_split},
        "score_means": {k: sum(v) / len(v) for k, v in distributions.items() if v},
        "distributions": distributions,
        "fooled": [{"gap": g, "id": p.id, "mode": p.mode, "reference": p.chosen, "negative": p.rejected}
                   for g, p in fooled],
    }


def _mle_outputs(output_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """The evaluate stage's predictions of the SFT model (eval/sft/), raw and post-processed: (id, text)."""
    out = {}
    for name, file in (("mle_raw", "predictions-model.jsonl"), ("mle_post", "predictions-model+post.jsonl")):
        path = output_dir / "eval" / "sft" / file
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
            out[name] = [(str(r["id"]), r["prediction"]) for r in rows if r["prediction"].strip()]
    return out


def _evaluate_and_save(ctx: TrainContext, builder: PromptBuilder, state: RewardModelState) -> None:
    results = evaluate_reward_model(ctx.cfg, ctx.engine, ctx.tokenizer, builder, ctx.dist)
    final = ctx.final_checkpoint(state)
    if not ctx.dist.is_main:
        return
    stage_dir, tracker = ctx.stage_dir, ctx.tracker
    checkpoint.write_json_atomic(final / "model" / STATS_FILE, results["reward_stats"])
    checkpoint.publish_model(final / "model", stage_dir / "model")
    checkpoint.write_json_atomic(stage_dir / "results.json", results)
    (stage_dir / "fooled.md").write_text(_fooled_table(results["fooled"]))
    plot = plot_histograms(stage_dir / "scores.png", results["distributions"], title="Reward model scores (held out)",
                           xlabel="score")
    flat = {f"rm_eval/{mode}/{k}": v for mode, d in results["per_mode"].items() for k, v in d.items() if k != "pairs"}
    flat.update({f"rm_eval/score_mean/{k}": v for k, v in results["score_means"].items()})
    tracker.log_metrics(flat, step=state.step)
    for path in (stage_dir / "results.json", stage_dir / "fooled.md", plot):
        tracker.log_artifact(path)
    lines = [f"{'mode':<20}{'pairs':>7}{'accuracy':>10}{'auroc':>8}"]
    lines += [f"{m:<20}{d['pairs']:>7}{d['accuracy']:>10.3f}{d['auroc']:>8.3f}" for m, d in results["per_mode"].items()]
    print(f"Reward model on {results['n_examples']} held-out examples:\n" + "\n".join(lines), flush=True)


def _fooled_table(rows: list[dict]) -> str:
    def cell(t: str) -> str:
        return t.replace("|", "\\|").replace("\n", " ")[:300]

    head = "| score gap (neg - ref) | mode | id | negative | reference |\n|---|---|---|---|---|\n"
    return head + "".join(f"| {r['gap']:+.3f} | {r['mode']} | {r['id']} | {cell(r['negative'])} | {cell(r['reference'])} |\n"
                          for r in rows)
