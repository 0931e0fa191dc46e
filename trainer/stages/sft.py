"""SFT stage: maximum-likelihood fine-tuning on (document, summary) pairs, loss on summary tokens.

    lastmile sft --config trainer/configs/tiny.yaml output_dir=runs/tiny
    deepspeed --num_gpus 2 trainer/main.py sft --config trainer/configs/tiny.yaml deepspeed.config=zero3

Writes to <output_dir>/sft/: model/ (Hugging Face format), checkpoints/step-N/ (resumable),
config.yaml, metrics.json, loss_curve.png, run.json (the MLflow run id for later stages).
A rerun with the same output_dir resumes from the newest complete checkpoint, in the same MLflow run;
a larger sft.max_steps / sft.epochs continues a finished run from its kept final checkpoint (common.py).
The training itself (`fine_tune`) also serves best-of-n, on its chosen samples (stages/best_of_n.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from lastmile_kernels.logprob import resolve_impl
from lastmile import checkpoint, distributed, tracking
from lastmile.algorithms.losses import token_mean_loss
from lastmile.config import BatchPlan, Config, SFTConfig, plan_batches
from lastmile.data import sampling
from lastmile.data.collate import SFTBatch, collate_packed, collate_sft
from lastmile.data.prompts import PromptBuilder, TokenizedExample
from lastmile.data.records import load_split
from lastmile.data.sampling import micro_batch_indices
from lastmile.distributed import DistInfo
from lastmile.errors import UserError
from lastmile.generation import generate
from lastmile.hybrid_engine import HybridEngine
from lastmile.model_inputs import check_base_model
from lastmile.models import TokenLogprobModel, count_parameters, hidden_size_of, load_causal_lm, load_tokenizer
from lastmile.plots import plot_curves
from lastmile.stages import common
from lastmile.stages.loop import SFTState, TrainContext, train_loop

log = logging.getLogger(__name__)


def run(cfg: Config) -> Path:
    check_base_model(cfg.model)  # before anything is written: a wrong model or shape is one message
    start = common.begin(cfg, "sft", "SFT", inputs={"base": cfg.model.path})
    if start.done:
        return start.stage_dir / "model"
    cfg = start.settled(cfg)  # precision=auto as this stage began (common.stage_precision)
    tokenizer = load_tokenizer(cfg.model)
    builder = PromptBuilder(tokenizer, cfg.prompt)
    train, report = builder.tokenize(load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_examples))
    if start.dist.is_main:
        log.info("train data: %s", report.describe())
    return fine_tune(cfg, start, cfg.sft, tokenizer, train, dev_examples(cfg, builder), label="SFT")


def fine_tune(cfg: Config, start: common.StageStart, settings: SFTConfig, tokenizer, train: list[TokenizedExample],
              val: list[TokenizedExample], *, label: str, init: str | None = None, upstream_run_id: str | None = None,
              metrics: dict[str, float] | None = None) -> Path:
    """MLE on `train` from `init` (None: model.*) with `settings`, validated on `val`, in `start`'s stage
    folder and MLflow run: resumed from its newest checkpoint, published to <stage dir>/model, marked done.
    SFT trains on the references; best-of-n on its chosen samples, logging its sampling `metrics` at step 0."""
    dist, stage_dir, stage = start.dist, start.stage_dir, start.stage_dir.name  # a stage's folder bears its name
    plan = plan_batches(settings.batch_size, settings.micro_batch_size, dist.world_size)
    total_steps = sampling.total_steps(settings, len(train), plan, field_prefix="sft", unit="examples")
    ds = distributed.ds_config_for(cfg.deepspeed.config, plan, settings.optim(),
                                   hidden_size=hidden_size_of(cfg.model, init),
                                   bf16=distributed.use_bf16(cfg.precision, dist.device))
    lm, attn = load_causal_lm(cfg.model, dist.device, seed=cfg.seed, path=init, ds=ds)
    if dist.is_main:
        log.info("ranks: %d; attention: %s (%s); logprob impl: %s; %d parameters", dist.world_size,
                 attn.implementation, attn.reason, settings.logprob_impl, count_parameters(lm))
    engine = distributed.build_engine(TokenLogprobModel(lm, logprob_impl=settings.logprob_impl), ds, settings.optim(),
                                      total_steps=total_steps)
    state = SFTState.resumed(checkpoint.resume(engine, stage_dir / "checkpoints", is_main=dist.is_main))
    if start.horizon:  # sft.epochs / sft.max_steps changed: go on from the checkpoint to the new horizon
        common.continue_stage(start, label, steps_done=state.step, total=total_steps, unit="steps",
                              engines=(engine,))
    tracker = tracking.start(start.as_given(cfg), stage=stage, is_main=dist.is_main, resume_run_id=state.run_id,
                             record=stage_dir / "mlflow_run.json", upstream_run_id=upstream_run_id)
    state.run_id = tracker.run_id if dist.is_main else None
    common.write_stage_config(start.as_given(cfg), stage_dir, tracker, dist, runtime={
        "precision": cfg.precision, "attention": attn.implementation, "world_size": dist.world_size,
        "logprob_impl": resolve_impl(settings.logprob_impl, dist.device), "train_examples": len(train),
        "total_steps": total_steps, "grad_accum": plan.grad_accum, **({"init": init} if init else {})})
    ctx = TrainContext(cfg, dist, settings, engine, ds, lm, "lm.", tokenizer, plan, total_steps, tracker, stage_dir,
                       stage)
    with tracking.closing(tracker):
        if state.step == 0 and dist.is_main and metrics:
            tracker.log_metrics(metrics, step=0)
        if state.step == 0 and settings.eval_every:  # the untuned model's validation loss: the curve's start
            _validate(ctx, val, state)
        train_loop(ctx, state, lambda step: _step(ctx, train, step),
                   on_step=lambda st, m: _after_step(ctx, val, st, m), log_every=settings.log_every,
                   show=("sft/loss",))
        _finish(ctx, val, state, label)
        if dist.is_main:
            common.mark_done(cfg, stage_dir, stage, state.run_id, start.identity)
    return stage_dir / "model"


def dev_examples(cfg: Config, builder: PromptBuilder) -> list[TokenizedExample]:
    """The validation examples of data.dev_split: as many as the validation loss and the logged samples use."""
    val_ex = load_split(cfg.data, cfg.data.dev_split, cfg.data.max_eval_examples)
    return builder.tokenize(val_ex[: max(cfg.sft.eval_examples, cfg.sft.num_samples)])[0]


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


def _step(ctx: TrainContext, train: list[TokenizedExample], step: int) -> dict[str, float]:
    t0 = time.perf_counter()
    mbs = step_micro_batches(train, step, ctx.plan, ctx.dist.rank, ctx.cfg.seed, ctx.tokenizer.pad_token_id,
                             packing=ctx.train.packing)
    metrics = train_step(ctx.engine, mbs, ctx.plan, ctx.cfg.precision, ctx.dist.device)
    elapsed = time.perf_counter() - t0
    real = distributed.all_reduce_sum(sum(mb.num_real_tokens for mb in mbs))
    processed = distributed.all_reduce_sum(sum(mb.num_processed_tokens for mb in mbs))
    metrics.update({"perf/tokens_per_s": real / elapsed, "perf/padding_fraction": 1 - real / processed})
    return metrics


def _after_step(ctx: TrainContext, val: list[TokenizedExample], state: SFTState, metrics: dict[str, float]) -> None:
    state.loss_history.append((state.step, metrics["sft/loss"]))
    every = ctx.train.eval_every
    if every and state.step % every == 0 and state.step < ctx.total_steps:
        _validate(ctx, val, state)


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


def _validate(ctx: TrainContext, val: list[TokenizedExample], state: SFTState) -> None:
    s = ctx.train
    if not val or not s.eval_examples:
        return
    loss = validation_loss(ctx.engine, val[: s.eval_examples], s.micro_batch_size, ctx.cfg.precision, ctx.dist,
                           ctx.tokenizer.pad_token_id)
    state.val_history.append((state.step, loss))
    samples = _sample_generations(ctx, val)
    if ctx.dist.is_main:
        ctx.tracker.log_metrics({"sft/val_loss": loss}, step=state.step)
        if samples:
            ctx.tracker.log_text(samples, f"samples/step-{state.step:07d}.md")
        log.info("step %d: val_loss %.4f", state.step, loss)


def _sample_generations(ctx: TrainContext, val: list[TokenizedExample]) -> str:
    """A few greedy summaries of validation documents, through the hybrid engine's generation mode
    (under ZeRO-3: gathered once, not per token)."""
    n = min(ctx.train.num_samples, len(val))
    if n == 0:
        return ""
    hybrid = HybridEngine(ctx.engine, ctx.model, ctx.ds, ctx.dist.device, world_size=ctx.dist.world_size)
    with hybrid.generation_mode():
        texts = generate(ctx.model, ctx.tokenizer, val[:n], ctx.cfg.eval.generation, ctx.dist.device,
                         synced_gpus=hybrid.synced_gpus, show_progress=False,
                         autocast_ctx=distributed.autocast(ctx.cfg.precision, ctx.dist.device))
    return "\n\n".join(f"### {ex.id}\n{t}" for ex, t in zip(val[:n], texts))


def _finish(ctx: TrainContext, val: list[TokenizedExample], state: SFTState, label: str) -> None:
    validations = len(state.val_history)
    if not validations or state.val_history[-1][0] != state.step:  # a finish resumed after a kill has it
        _validate(ctx, val, state)
    # The kept final checkpoint is where a larger horizon continues: it holds the final validation too.
    final = ctx.save(state) if len(state.val_history) > validations else ctx.final_checkpoint(state)
    if not ctx.dist.is_main:
        return
    stage_dir = ctx.stage_dir
    checkpoint.publish_model(final / "model", stage_dir / "model")
    losses, vals = state.loss_history, state.val_history
    summary = {"step": state.step, "final_loss": losses[-1][1] if losses else None,
               "final_val_loss": vals[-1][1] if vals else None, "loss_history": losses, "val_history": vals}
    checkpoint.write_json_atomic(stage_dir / "metrics.json", summary)
    plot = plot_curves(stage_dir / "loss_curve.png", {"train loss": losses, "val loss": vals}, title=label,
                       ylabel="NLL per target token")
    for path in (stage_dir / "metrics.json", plot):
        ctx.tracker.log_artifact(path)
    print(f"{label} done: {state.step} steps, model at {stage_dir / 'model'}", flush=True)
