"""SFT stage: maximum-likelihood fine-tuning on (document, summary) pairs, loss on summary tokens.

    lastmile sft --config trainer/configs/tiny.yaml output_dir=runs/tiny
    deepspeed --num_gpus 2 trainer/main.py sft --config trainer/configs/tiny.yaml deepspeed.config=zero3

Writes to <output_dir>/sft/: model/ (Hugging Face format), checkpoints/step-N/ (resumable),
config.yaml, metrics.json, loss_curve.png, run.json (the MLflow run id for later stages).
A rerun with the same output_dir resumes from the newest complete checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kernels.logprob import resolve_impl
from trainer import checkpoint, distributed, preemption, tracking
from trainer.algorithms.losses import token_mean_loss
from trainer.config import BatchPlan, Config, plan_batches
from trainer.data import sampling
from trainer.data.collate import SFTBatch, collate_packed, collate_sft
from trainer.data.prompts import PromptBuilder, TokenizedExample
from trainer.data.records import load_split
from trainer.data.sampling import micro_batch_indices
from trainer.distributed import DistInfo
from trainer.errors import UserError
from trainer.generation import generate
from trainer.models import TokenLogprobModel, count_parameters, load_causal_lm, load_tokenizer
from trainer.plots import plot_curves
from trainer.stages import common

log = logging.getLogger(__name__)


@dataclass
class SFTState:
    """Everything besides the engine needed to resume; saved as trainer_state.json."""

    step: int = 0
    run_id: str | None = None
    loss_history: list[tuple[int, float]] | None = None
    val_history: list[tuple[int, float]] | None = None

    def __post_init__(self):
        self.loss_history = [tuple(x) for x in (self.loss_history or [])]
        self.val_history = [tuple(x) for x in (self.val_history or [])]


def run(cfg: Config) -> Path:
    start = common.begin(cfg, "sft", "SFT", inputs={"base": cfg.model.path})
    dist, stage_dir = start.dist, start.stage_dir
    if start.done:
        return stage_dir / "model"
    ckpt_root = stage_dir / "checkpoints"
    tokenizer = load_tokenizer(cfg.model)
    train, val = _load_data(cfg, tokenizer, dist)
    plan = plan_batches(cfg.sft.batch_size, cfg.sft.micro_batch_size, dist.world_size)
    total_steps = sampling.total_steps(cfg.sft, len(train), plan, field_prefix="sft", unit="examples")

    lm, attn = load_causal_lm(cfg.model, dist.device)
    if dist.is_main:
        log.info("ranks: %d; attention: %s (%s); logprob impl: %s; %d parameters", dist.world_size,
                 attn.implementation, attn.reason, cfg.sft.logprob_impl, count_parameters(lm))
    engine, ds = distributed.engine_for(TokenLogprobModel(lm, logprob_impl=cfg.sft.logprob_impl), cfg.sft.optim(), plan,
                                        total_steps=total_steps, ds_config=cfg.deepspeed.config,
                                        hidden_size=lm.config.hidden_size)
    state = SFTState(**(checkpoint.resume(engine, ckpt_root, is_main=dist.is_main) or {}))

    tracker = tracking.start(cfg, stage="sft", is_main=dist.is_main, resume_run_id=state.run_id,
                             record=stage_dir / "mlflow_run.json")
    state.run_id = tracker.run_id if dist.is_main else None
    common.write_stage_config(cfg, stage_dir, tracker, dist, runtime={
        "attention": attn.implementation, "world_size": dist.world_size,
        "logprob_impl": resolve_impl(cfg.sft.logprob_impl, dist.device), "train_examples": len(train),
        "total_steps": total_steps, "grad_accum": plan.grad_accum})
    with tracking.closing(tracker):
        _train_loop(cfg, engine, ds, lm, tokenizer, train, val, plan, total_steps, state, tracker, dist, ckpt_root)
        _finish(cfg, engine, ds, lm, tokenizer, val, state, tracker, dist, stage_dir, ckpt_root)
        if dist.is_main:
            common.mark_done(cfg, stage_dir, "sft", state.run_id, start.identity)
    return stage_dir / "model"


def _load_data(cfg: Config, tokenizer, dist: DistInfo) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    builder = PromptBuilder(tokenizer, cfg.prompt)
    train_ex = load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_examples)
    val_ex = load_split(cfg.data, cfg.data.dev_split, cfg.data.max_eval_examples)
    train, report = builder.tokenize(train_ex)
    val, _ = builder.tokenize(val_ex[: max(cfg.sft.eval_examples, cfg.sft.num_samples)])
    if dist.is_main:
        log.info("train data: %s", report.describe())
    return train, val


def step_micro_batches(train: list[TokenizedExample], step: int, plan: BatchPlan, rank: int, seed: int,
                       pad_id: int, *, packing: bool = False) -> list[SFTBatch]:
    """This rank's collated micro-batches for a global step."""
    groups = micro_batch_indices(len(train), step, plan, rank=rank, seed=seed)
    return [collate_packed([train[i] for i in g]) if packing else collate_sft([train[i] for i in g], pad_id)
            for g in groups]


def train_step(engine, micro_batches: list[SFTBatch], plan: BatchPlan, precision: str, device: torch.device) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; token-mean NLL over the global batch."""
    global_tokens = int(distributed.all_reduce_sum(sum(mb.num_target_tokens for mb in micro_batches)))
    nll_total = 0.0
    for mb in micro_batches:
        mb = mb.to(device)
        with distributed.autocast(precision, device):
            nll_sum = -engine(mb.input_ids, mb.attention_mask, mb.target_mask, mb.position_ids, reduction="sum")
        loss = token_mean_loss(nll_sum, global_tokens=global_tokens, grad_accum=plan.grad_accum, world_size=plan.world_size)
        if distributed.all_reduce_sum(0.0 if torch.isfinite(loss) else 1.0) > 0:
            raise UserError(
                f"sft loss became {float(loss)} (not finite) before the update. The weights were not changed. "
                "Lower sft.lr, set precision=fp32, or check the data for empty summaries."
            )
        engine.backward(loss)
        engine.step()
        nll_total += float(nll_sum.detach())
    grad_norm = engine.get_global_grad_norm()
    return {
        "sft/loss": distributed.all_reduce_sum(nll_total) / max(global_tokens, 1),
        "sft/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "sft/lr": engine.get_lr()[0],
        "sft/target_tokens": global_tokens,
    }


def _train_loop(cfg, engine, ds, lm, tokenizer, train, val, plan, total_steps, state: SFTState, tracker, dist,
                ckpt_root: Path) -> None:
    s = cfg.sft
    if state.step == 0 and s.eval_every:  # the untuned model's validation loss: the baseline of the curve
        _validate(cfg, engine, ds, lm, tokenizer, val, state, tracker, dist)
    bar = tqdm(total=total_steps, initial=state.step, desc="sft", unit="step", disable=not dist.is_main)
    engine.train()
    while state.step < total_steps:
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed + state.step)  # dropout etc. depend on the step only: resume is exact
        mbs = step_micro_batches(train, state.step, plan, dist.rank, cfg.seed, tokenizer.pad_token_id,
                                 packing=s.packing)
        metrics = train_step(engine, mbs, plan, cfg.precision, dist.device)
        state.step += 1
        elapsed = time.perf_counter() - t0
        real = distributed.all_reduce_sum(sum(mb.num_real_tokens for mb in mbs))
        processed = distributed.all_reduce_sum(sum(mb.num_processed_tokens for mb in mbs))
        metrics.update({"perf/tokens_per_s": real / elapsed, "perf/padding_fraction": 1 - real / processed,
                        "time/step_s": elapsed})
        state.loss_history.append((state.step, metrics["sft/loss"]))
        if dist.is_main and state.step % s.log_every == 0:
            tracker.log_metrics(metrics, step=state.step)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['sft/loss']:.4f}")
        last = state.step == total_steps
        if s.eval_every and state.step % s.eval_every == 0 and not last:
            _validate(cfg, engine, ds, lm, tokenizer, val, state, tracker, dist)
        stop = preemption.requested()
        if (s.save_every and state.step % s.save_every == 0) or stop:
            checkpoint.save_checkpoint(engine, ds, lm, tokenizer, _state_dict(state), ckpt_root, state.step,
                                       keep=s.keep_checkpoints)
        if stop:
            bar.close()
            raise preemption.Preempted(f"stopped at step {state.step}; the next run resumes from the checkpoint")
    bar.close()


def _state_dict(state: SFTState) -> dict:
    return {"step": state.step, "run_id": state.run_id, "loss_history": state.loss_history, "val_history": state.val_history}


@torch.no_grad()
def validation_loss(engine, val: list[TokenizedExample], micro_batch: int, precision: str, dist: DistInfo, pad_id: int) -> float:
    """Token-mean NLL over `val`. Every rank runs the same number of forwards (ZeRO-3 needs it)."""
    shard = val[dist.rank :: dist.world_size]
    n_batches = -(-len(val[0 :: dist.world_size]) // micro_batch)
    nll, tokens = 0.0, 0
    engine.eval()
    for b in range(n_batches):
        chunk = shard[b * micro_batch : (b + 1) * micro_batch]
        counts = bool(chunk)
        mb = collate_sft(chunk or val[:1], pad_id).to(dist.device)  # a dummy forward keeps ranks in step
        with distributed.autocast(precision, dist.device):
            logprob_sum = engine(mb.input_ids, mb.attention_mask, mb.target_mask, reduction="sum")
        if counts:
            nll -= float(logprob_sum)
            tokens += mb.num_target_tokens
    engine.train()
    return distributed.all_reduce_sum(nll) / max(distributed.all_reduce_sum(tokens), 1)


def _validate(cfg, engine, ds, lm, tokenizer, val, state: SFTState, tracker, dist) -> None:
    if not val or not cfg.sft.eval_examples:
        return
    loss = validation_loss(engine, val[: cfg.sft.eval_examples], cfg.sft.micro_batch_size, cfg.precision, dist,
                           tokenizer.pad_token_id)
    state.val_history.append((state.step, loss))
    samples = _sample_generations(cfg, lm, tokenizer, val, ds, dist)
    if dist.is_main:
        tracker.log_metrics({"sft/val_loss": loss}, step=state.step)
        if samples:
            tracker.log_text(samples, f"samples/step-{state.step:07d}.md")
        log.info("step %d: val_loss %.4f", state.step, loss)


def _sample_generations(cfg, lm, tokenizer, val, ds, dist) -> str:
    n = min(cfg.sft.num_samples, len(val))
    if n == 0:
        return ""
    multi = dist.world_size > 1 and distributed.zero_stage(ds) == 3
    texts = generate(lm, tokenizer, val[:n], cfg.eval.generation, dist.device, synced_gpus=multi,
                     autocast_ctx=distributed.autocast(cfg.precision, dist.device), show_progress=False)
    return "\n\n".join(f"### {ex.id}\n{t}" for ex, t in zip(val[:n], texts))


def _finish(cfg, engine, ds, lm, tokenizer, val, state: SFTState, tracker, dist, stage_dir: Path, ckpt_root: Path) -> None:
    _validate(cfg, engine, ds, lm, tokenizer, val, state, tracker, dist)
    final = ckpt_root / f"step-{state.step:07d}"
    if not final.is_dir():
        final = checkpoint.save_checkpoint(engine, ds, lm, tokenizer, _state_dict(state), ckpt_root, state.step,
                                           keep=cfg.sft.keep_checkpoints)
    if not dist.is_main:
        return
    checkpoint.publish_model(final / "model", stage_dir / "model")
    summary = {"step": state.step, "final_loss": state.loss_history[-1][1] if state.loss_history else None,
               "final_val_loss": state.val_history[-1][1] if state.val_history else None,
               "loss_history": state.loss_history, "val_history": state.val_history}
    checkpoint.write_json_atomic(stage_dir / "metrics.json", summary)
    plot = plot_curves(stage_dir / "loss_curve.png", {"train loss": state.loss_history, "val loss": state.val_history},
                       title="SFT", ylabel="NLL per target token")
    for path in (stage_dir / "metrics.json", plot):
        tracker.log_artifact(path)
    print(f"SFT done: {state.step} steps, model at {stage_dir / 'model'}", flush=True)
