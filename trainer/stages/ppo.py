"""PPO stage: RL fine-tuning of the SFT model against the hybrid reward, with a KL penalty.

    lastmile ppo --config trainer/configs/tiny.yaml output_dir=runs/tiny
    deepspeed --num_gpus 2 trainer/main.py ppo --config trainer/configs/tiny.yaml deepspeed.config=zero3

Models: the actor (trained, from <output_dir>/sft/model), a frozen reference (the same weights),
the reward model (<output_dir>/reward_model/model, frozen) and, for `ppo.advantage=gae`, a critic
initialized from the reward model. Frozen models are inference engines (partitioned under ZeRO-3,
no optimizer). One iteration reads: rollout -> rewards and advantages -> update -> log -> maybe
evaluate and save. Writes <output_dir>/ppo/: model/ (the best checkpoint by `ppo.best_metric` on the
dev split), history.json, curves.png, checkpoints/ (actor, critic, trainer state: resumable; a finished
run keeps its final one, from which a larger ppo.iterations continues it, see common.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lastmile import checkpoint, distributed, lora, preemption, rollout, seeding, tracking
from lastmile.algorithms.advantages import compute_gae, greedy_baseline_advantages, group_advantages, masked_whiten
from lastmile.algorithms.kl import KLController, kl_per_token, shape_rewards
from lastmile.algorithms.losses import masked_sum, policy_loss, token_mean_loss, value_loss
from lastmile.config import Config, PPOPlan, whitens_advantages
from lastmile.data.prefix_pack import groups_of
from lastmile.data.sampling import micro_batch_indices
from lastmile.distributed import DistInfo
from lastmile.errors import UserError
from lastmile.hybrid_engine import Sampling
from lastmile.rollout import Rollout, RolloutModels
from lastmile.stages import common, ppo_setup
from lastmile.stages.ppo_eval import Evaluator
from lastmile.timing import PhaseTimer, phase, trim_host_memory

log = logging.getLogger(__name__)


@dataclass
class PPOState:
    """Everything besides the engines needed to resume exactly; saved as trainer_state.json."""

    iteration: int = 0
    run_id: str | None = None
    kl: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one metrics dict per iteration
    evals: list[dict] = field(default_factory=list)  # in-loop evaluations
    best: dict | None = None  # {"iteration", "metric", "value"}
    bad_batches: int = 0
    alarms: list[str] = field(default_factory=list)


@dataclass
class PPOContext:
    cfg: Config
    dist: DistInfo
    plan: PPOPlan
    setup: ppo_setup.Setup
    evaluator: Evaluator
    kl: KLController
    tracker: tracking.Tracker
    stage_dir: Path
    identity: dict

    @property
    def models(self) -> RolloutModels:
        return self.setup.models


def run(cfg: Config) -> Path:
    ppo_setup.check(cfg, distributed.setup().world_size)  # settings first, before looking for inputs
    init, rm_path = ppo_setup.input_paths(cfg)
    ppo_setup.check_inputs(cfg, init, rm_path)  # each model against its role, before anything is written
    start = common.begin(cfg, "ppo", "PPO", inputs={"init": init, "reward_model": rm_path})
    dist, stage_dir = start.dist, start.stage_dir
    if start.done:
        return stage_dir / "model"
    cfg = start.settled(cfg)  # precision=auto as this stage began (common.stage_precision)
    s = ppo_setup.build(cfg, dist)
    plan = s.plan
    extra = {"critic_engine": s.models.critic} if s.models.critic is not None else {}
    state = PPOState(**(checkpoint.resume(s.models.actor_engine, stage_dir / "checkpoints", is_main=dist.is_main,
                                          extra_engines=extra) or {}))
    if start.horizon:  # ppo.iterations changed: go on from the checkpoint to the new number of iterations
        common.continue_stage(start, "PPO", steps_done=state.iteration, total=cfg.ppo.iterations, unit="iterations",
                              engines=(s.models.actor_engine, *extra.values()))
        if dist.is_main:
            _restore_best(stage_dir, state)
    tracker = tracking.start(start.as_given(cfg), stage="ppo", is_main=dist.is_main, resume_run_id=state.run_id,
                             record=stage_dir / "mlflow_run.json",
                             upstream_run_id=tracking.upstream_run_id(cfg.output_dir, "reward_model"))
    state.run_id = tracker.run_id
    kl = KLController(cfg.ppo.kl_coef, target=cfg.ppo.kl_target, horizon=cfg.ppo.kl_horizon)
    if state.kl:
        kl.load_state_dict(state.kl)
    ctx = PPOContext(cfg, dist, plan, s, Evaluator(cfg, s, dist), kl, tracker, stage_dir, start.identity)
    common.write_stage_config(start.as_given(cfg), stage_dir, tracker, dist,
                              runtime={"precision": cfg.precision, **s.runtime})
    with tracking.closing(tracker):
        train(ctx, state)
        finish(ctx, state)
    return stage_dir / "model"


def train(ctx: PPOContext, state: PPOState) -> None:
    o = ctx.cfg.ppo
    if state.iteration == 0 and o.eval_every:
        evaluate(ctx, state)  # the SFT model's in-loop scores: the start of every curve
    bar = tqdm(total=o.iterations, initial=state.iteration, desc="ppo", unit="it", disable=not ctx.dist.is_main)
    while state.iteration < o.iterations:
        metrics = iterate(ctx, state)  # None: a skipped rollout, whose iteration still counts (and evaluates,
        bar.update(1)                  # saves and stops on schedule: the curve keeps its points)
        if metrics is not None:
            bar.set_postfix(reward=f"{metrics['reward/score_mean']:.3f}", kl=f"{metrics['kl/seq_mean']:.3f}")
        if o.eval_every and state.iteration % o.eval_every == 0 and state.iteration < o.iterations:
            evaluate(ctx, state)
            trim_host_memory()
            if state.alarms and o.stop_on_alarm:
                log.warning("stopping at iteration %d on alarm: %s", state.iteration, state.alarms[-1])
                break
        stop = preemption.requested()
        if (o.save_every and state.iteration % o.save_every == 0) or stop:
            save(ctx, state)
        if stop:
            bar.close()
            raise preemption.Preempted(f"stopped at iteration {state.iteration}; the next run resumes from the checkpoint")
    bar.close()


def iterate(ctx: PPOContext, state: PPOState) -> dict[str, float] | None:
    """One iteration: rollout -> rewards and advantages -> update -> metrics, logged and kept in the
    history (None: the rollout was skipped). `time/<phase>_s` for each phase; `time/logging_s` is in
    history.json only (it is measured while logging)."""
    o = ctx.cfg.ppo
    timer = PhaseTimer(ctx.dist.device)
    t0 = time.perf_counter()
    batch = collect_rollout(ctx, state.iteration, timer)
    t_rollout = time.perf_counter() - t0
    if not _finite(batch, state, o.max_bad_batches):
        state.iteration += 1
        return None
    advantages, returns, kl_stats = compute_advantages(ctx, batch)
    recorded = torch.zeros_like(batch.gen_logprobs) if batch.old_logprobs is None else None
    metrics = update(ctx, batch, advantages, returns, state.iteration, record=recorded, timer=timer)
    trim_host_memory()  # the update's freed activations, before the next rollout allocates differently
    if recorded is not None:  # ppo.old_logprobs=update: the update's forward, for the parity check
        batch = dataclasses.replace(batch, old_logprobs=recorded)
    ctx.kl.update(kl_stats["kl/seq_mean"], ctx.plan.rollout)
    state.iteration += 1
    metrics.update(kl_stats)
    metrics.update(rollout_metrics(ctx, batch))
    metrics.update(timer.metrics())
    metrics.update({"kl/coef": ctx.kl.value, "time/rollout_s": t_rollout, "time/iteration_s": time.perf_counter() - t0,
                    "perf/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
    _check_parity(metrics, state, o.parity_bound, o.parity_max_bound)
    if (changed := weights_changed(ctx.models)) is not None:
        metrics["policy/weights_changed"] = changed
    t_log = time.perf_counter()
    state.history.append({"iteration": state.iteration, **metrics})
    if ctx.dist.is_main:
        ctx.tracker.log_metrics(metrics, step=state.iteration)
    state.history[-1]["time/logging_s"] = time.perf_counter() - t_log
    return metrics


def collect_rollout(ctx: PPOContext, iteration: int, timer: PhaseTimer | None = None) -> Rollout:
    """This rank's prompts for the iteration, each sampled `samples_per_prompt` times, then scored."""
    o, s = ctx.cfg.ppo, ctx.setup
    groups = micro_batch_indices(len(s.prompts), iteration, ctx.plan.prompt_plan, rank=ctx.dist.rank, seed=ctx.cfg.seed)
    mine = [i for g in groups for i in g for _ in range(o.samples_per_prompt)]
    seeding.seed_everything(ctx.cfg.seed, stage="ppo_rollout", step=iteration, rank=ctx.dist.rank)  # distinct ranks
    sampling = Sampling(o.max_new_tokens, do_sample=True, temperature=o.temperature, top_p=o.top_p)
    batch = rollout.sample(ctx.models, [s.prompts[i] for i in mine], mine, sampling, batch_size=ctx.plan.rollout_per_rank,
                           timer=timer)
    batch = rollout.complete(batch, ctx.models, s.examples, o.reward, temperature=o.temperature, timer=timer,
                             old_logprobs=s.old_logprobs == "forward")
    if o.advantage == "remax":
        with phase(timer, "greedy_baseline"):
            batch = dataclasses.replace(batch, greedy_scores=greedy_scores(ctx, [i for g in groups for i in g]))
    return batch


def greedy_scores(ctx: PPOContext, prompt_idx: list[int]) -> torch.Tensor:
    """ReMax's baseline: each prompt's greedy response (the decoding that is evaluated), scored by the same
    hybrid reward; (len(prompt_idx) * samples_per_prompt,), repeated per sample like the rollout's rows.
    Generated as one batch on every rank (ZeRO-3 needs the same number of forwards everywhere)."""
    o, s = ctx.cfg.ppo, ctx.setup
    greedy = Sampling(o.max_new_tokens, do_sample=False)
    g = rollout.sample(ctx.models, [s.prompts[i] for i in prompt_idx], prompt_idx, greedy, batch_size=len(prompt_idx))
    return rollout.score(g, ctx.models, s.examples, o.reward).scores.repeat_interleave(o.samples_per_prompt)


def _finite(batch: Rollout, state: PPOState, max_bad: int) -> bool:
    """Skip a rollout with non-finite rewards or log-probs (on every rank); stop when it persists."""
    tensors = [batch.scores, batch.behaviour_logprobs, batch.ref_logprobs] + [
        t for t in (batch.values, batch.greedy_scores) if t is not None]
    bad = distributed.all_reduce_sum(0.0 if all(torch.isfinite(t).all() for t in tensors) else 1.0) > 0
    if not bad:
        state.bad_batches = 0
        return True
    state.bad_batches += 1
    log.warning("iteration %d: non-finite rewards or log-probs; the rollout is skipped (%d in a row)",
                state.iteration + 1, state.bad_batches)
    if state.bad_batches >= max_bad:
        raise UserError(
            f"{state.bad_batches} rollouts in a row had non-finite rewards or log-probs (limit ppo.max_bad_batches="
            f"{max_bad}). The weights were last changed at iteration {state.iteration - state.bad_batches}. Lower "
            "ppo.lr, set precision=fp32, or check the reward model with `lastmile reward-model`.")
    return False


def compute_advantages(ctx: PPOContext, b: Rollout) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """KL-shaped rewards and GAE with the critic, or a baseline without one (rloo/grpo: the prompt's other
    samples; remax: its greedy response) with the KL in the score."""
    o = ctx.cfg.ppo
    mask = b.response_mask
    kl = kl_per_token(b.behaviour_logprobs, b.ref_logprobs, mask, estimator=o.kl_estimator)  # (B, R)
    kl_seq = kl.sum(-1)  # (B,)
    if o.advantage == "gae":
        rewards = shape_rewards(b.scores, kl, mask, kl_coef=ctx.kl.value)
        advantages, returns = compute_gae(rewards, b.values, mask, gamma=o.gamma, lam=o.lam)
    elif o.advantage == "remax":  # the greedy response's reward, without KL (it is not trained on)
        seq = greedy_baseline_advantages(b.scores - ctx.kl.value * kl_seq, b.greedy_scores)
        advantages, returns = seq[:, None] * mask, None
    else:
        seq = group_advantages(b.scores - ctx.kl.value * kl_seq, o.samples_per_prompt, estimator=o.advantage)
        advantages, returns = seq[:, None] * mask, None
    if whitens_advantages(o):
        advantages = masked_whiten(advantages, mask, reduce_sum=distributed.all_reduce_sum)  # global batch stats
    n = distributed.all_reduce_sum(len(b))
    return advantages, returns, {"kl/seq_mean": distributed.all_reduce_sum(float(kl_seq.sum())) / n,
                                 "kl/token_mean": distributed.all_reduce_sum(float(kl.sum())) /
                                 distributed.all_reduce_sum(float(mask.sum()))}


def update(ctx: PPOContext, b: Rollout, advantages: torch.Tensor, returns: torch.Tensor | None,
           iteration: int, *, record: torch.Tensor | None = None, timer: PhaseTimer | None = None) -> dict[str, float]:
    """`epochs` passes over the rollout in minibatches; each minibatch is one optimizer step of the actor
    (and critic), accumulated over micro-batches, loss = token-mean over the global minibatch. Without
    `b.old_logprobs` (ppo.old_logprobs=update) the actor's forward gives them, and `record` (B, R)
    receives them."""
    o, plan, m = ctx.cfg.ppo, ctx.plan, ctx.models
    sums: dict[str, float] = {}
    per_rank_minibatch = plan.train.micro_batch * plan.train.grad_accum
    for epoch in range(o.epochs):
        seed = seeding.derive_seed(ctx.cfg.seed, stage="ppo_update_order", step=iteration * o.epochs + epoch,
                                   rank=ctx.dist.rank)
        order = update_order(b, torch.Generator().manual_seed(seed), by_group=m.shared_prefix)
        for k in range(plan.minibatches):
            rows = order[k * per_rank_minibatch : (k + 1) * per_rank_minibatch]
            tokens = int(distributed.all_reduce_sum(float(b.response_mask[rows].sum())))
            for j in range(0, len(rows), plan.train.micro_batch):
                micro = rows[j : j + plan.train.micro_batch]
                with phase(timer, "actor_update"):
                    stats, logp = actor_step(ctx, b.rows(micro), advantages[micro], tokens)
                _accumulate(sums, stats)
                if record is not None:
                    record[micro] = logp
                if m.critic is not None:
                    with phase(timer, "critic_update"):
                        _accumulate(sums, critic_step(ctx, b.rows(micro), returns[micro], tokens))
    tokens_total = distributed.all_reduce_sum(sums.pop("tokens", 0.0))
    out = {k: distributed.all_reduce_sum(v) / max(tokens_total, 1) for k, v in sorted(sums.items())}
    out["policy/lr"] = m.actor_engine.get_lr()[0]
    return out


def update_order(b: Rollout, gen: torch.Generator, *, by_group: bool) -> torch.Tensor:
    """A random order of the rollout's rows: whole groups of a prompt's samples kept together when the
    update packs them with a shared prefix (each micro-batch then holds whole groups where its size
    allows), else row by row."""
    if not by_group:
        return torch.randperm(len(b), generator=gen)
    groups = groups_of(b.example_idx)
    return torch.tensor([i for g in torch.randperm(len(groups), generator=gen).tolist() for i in groups[g]])


def _accumulate(sums: dict[str, float], stats: dict[str, float]) -> None:
    for k, v in stats.items():
        sums[k] = sums.get(k, 0.0) + v


def actor_step(ctx: PPOContext, mb: Rollout, advantages: torch.Tensor,
               global_tokens: int) -> tuple[dict[str, float], torch.Tensor]:
    """One micro-batch of the clipped surrogate (+ entropy bonus); DeepSpeed steps at the boundary.
    Returns the stats and this forward's log-probs (b, R), detached. Without `mb.old_logprobs` they
    are the old ones (ppo.old_logprobs=update: the weights have not moved yet, so the ratio is 1)."""
    o, m = ctx.cfg.ppo, ctx.models
    if rollout.packs(m, mb):  # each prompt once, its gradient formed once
        k = mb.pack(m.tokenizer).to(m.device)
        with distributed.autocast(m.precision, m.device):
            flat, flat_ent = m.actor_engine(k.input_ids, k.attention_mask, None, k.position_ids, with_entropy=True,
                                            temperature=o.temperature, token_index=k.token_index,
                                            token_ids=k.token_ids)
        logp, entropy = k.per_token(flat), k.per_token(flat_ent)  # (b, R)
    else:
        P = mb.prompt_ids.shape[1]
        ids, attn, target = mb.sequences(m.device)
        with distributed.autocast(m.precision, m.device):
            logp, entropy = m.actor_engine(ids, attn, target, with_entropy=True, temperature=o.temperature)
        logp, entropy = logp[:, P - 1 :], entropy[:, P - 1 :]
    mask = mb.response_mask.to(logp.device)
    old = logp.detach() if mb.old_logprobs is None else mb.old_logprobs.to(logp.device)
    loss_sum, st = policy_loss(logp, old, advantages.to(logp.device), mask, clip_range=o.clip_range)
    ent_sum = masked_sum(entropy, mask)
    loss = token_mean_loss(loss_sum - o.entropy_coef * ent_sum, global_tokens=global_tokens,
                           grad_accum=ctx.plan.train.grad_accum, world_size=ctx.plan.train.world_size)
    m.actor_engine.backward(loss)
    m.actor_engine.step()
    stats = {"policy/loss": float(loss_sum.detach()), "policy/clipfrac": st["clipped"],
             "policy/approx_kl": st["approx_kl"], "policy/ratio": st["ratio"], "policy/entropy": float(ent_sum.detach()),
             "tokens": st["tokens"]}
    return stats, logp.detach().float().cpu()


def critic_step(ctx: PPOContext, mb: Rollout, returns: torch.Tensor, global_tokens: int) -> dict[str, float]:
    o, m = ctx.cfg.ppo, ctx.models
    if rollout.packs(m, mb):
        k = mb.pack(m.tokenizer).to(m.device)
        with distributed.autocast(m.precision, m.device):
            values = k.per_token(m.critic(k.input_ids, k.attention_mask, k.position_ids,
                                          value_index=k.token_index).float())  # (b, R)
    else:
        P = mb.prompt_ids.shape[1]
        ids, attn, _ = mb.sequences(m.device)
        with distributed.autocast(m.precision, m.device):
            values = m.critic(ids, attn)[:, P - 1 : -1].float()
    mask = mb.response_mask.to(values.device)
    loss_sum, st = value_loss(values, mb.values.to(values.device), returns.to(values.device), mask,
                              clip_range=o.value_clip_range)
    loss = token_mean_loss(loss_sum, global_tokens=global_tokens, grad_accum=ctx.plan.train.grad_accum,
                           world_size=ctx.plan.train.world_size)
    m.critic.backward(loss)
    m.critic.step()
    return {"value/loss": float(loss_sum.detach()), "value/clipfrac": st["clipped"],
            "value/squared_error": st["squared_error"]}


def rollout_metrics(ctx: PPOContext, b: Rollout) -> dict[str, float]:
    """Means over the global rollout, and log-prob parity between generation and the training forward."""
    n = distributed.all_reduce_sum(len(b))
    out = {"reward/score_mean": distributed.all_reduce_sum(float(b.scores.sum())) / n}
    for k, v in b.reward_parts.items():
        out[f"reward/{k}_mean"] = distributed.all_reduce_sum(float(v.float().sum())) / n
    lengths = b.response_mask.sum(-1).float()
    out["rollout/response_tokens_mean"] = distributed.all_reduce_sum(float(lengths.sum())) / n
    out["rollout/eos_fraction"] = distributed.all_reduce_sum(float(b.ended.float().sum())) / n
    if b.greedy_scores is not None:  # remax: the reward of the decoding that is evaluated, on this iteration's prompts
        out["reward/greedy_score_mean"] = distributed.all_reduce_sum(float(b.greedy_scores.sum())) / n
    diff = (b.gen_logprobs - b.old_logprobs).abs()[b.response_mask]
    tokens = distributed.all_reduce_sum(float(diff.numel()))
    out["parity/mean_abs"] = distributed.all_reduce_sum(float(diff.sum())) / max(tokens, 1)
    out["parity/max_abs"] = distributed.all_reduce_max(float(diff.max()) if diff.numel() else 0.0)
    return out


@torch.no_grad()
def weights_changed(models: RolloutModels) -> float | None:
    """The share of the actor's stored weights that differ from the reference's, its starting point (None
    with LoRA, whose reference is the actor itself). Under bf16 an optimizer step moves a stored weight
    only when the fp32 master weight crosses half a bf16 spacing (|w| / 512 to |w| / 256): smaller updates are kept in
    the optimizer but the forward, the rollout and the published model do not see them. Compares this
    rank's partitions under ZeRO-3 (actor and reference are partitioned alike); summed over ranks."""
    if models.actor_engine is None or isinstance(models.ref, lora.AdaptersOff) or models.ref is None:
        return None
    changed = total = 0
    for a, r in zip(models.actor_engine.module.parameters(), _module(models.ref).parameters(), strict=True):
        x, y = _stored(a), _stored(r)
        changed += int((x != y).sum())
        total += x.numel()
    return distributed.all_reduce_sum(float(changed)) / max(distributed.all_reduce_sum(float(total)), 1.0)


def _stored(p: torch.nn.Parameter) -> torch.Tensor:
    """The elements of `p` this rank stores: all of them, or under ZeRO-3 its partition without the
    padding the last rank's partition carries (never written, so never compared)."""
    part = getattr(p, "ds_tensor", None)
    if part is None:
        return p.data.reshape(-1)
    start = ppo_setup.torch_rank() * part.numel()
    return part.data.reshape(-1)[: max(0, min(part.numel(), p.ds_numel - start))]


def _module(model) -> torch.nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine's module, or the module itself


def _check_parity(metrics: dict[str, float], state: PPOState, bound: float, max_bound: float) -> None:
    """Alarm when the mean |generation - training| log-prob per response token exceeds `bound` (a gap on
    every token: a wrong temperature, position or mask), or one token's exceeds `max_bound` (a gap on a
    few: a boundary slip); bf16 rounding stays under both (`ppo.parity_bound`, `ppo.parity_max_bound`)."""
    mean, top = metrics["parity/mean_abs"], metrics["parity/max_abs"]
    alarm = mean > bound or top > max_bound
    if alarm:
        msg = (f"iteration {state.iteration}: generation and training log-probs differ by {mean:.4f} nats per "
               f"token on average and by up to {top:.4f} on one token (ppo.parity_bound {bound}, "
               f"ppo.parity_max_bound {max_bound}): the responses were sampled from a distribution that far from "
               "the one PPO's ratio assumes")
        log.warning(msg)
        state.alarms.append(msg)
    metrics["parity/alarm"] = float(alarm)


def evaluate(ctx: PPOContext, state: PPOState) -> None:
    """In-loop evaluation on the dev split; keeps the best actor by `ppo.best_metric`; raises alarms."""
    result = ctx.evaluator.run(state.iteration)
    previous = state.evals[-1] if state.evals else None
    state.evals.append(result)
    alarms = ctx.evaluator.alarms(result, previous)
    state.alarms.extend(alarms)
    if ctx.dist.is_main:
        ctx.tracker.log_metrics({k: v for k, v in result.items() if k.startswith("eval/")} |
                                {"eval/policy/alarm": float(bool(alarms))}, step=state.iteration)
        for a in alarms:
            log.warning("alarm: %s", a)
        changed = state.history[-1].get("policy/weights_changed") if state.history else None
        if ctx.cfg.precision == "bf16" and changed is not None and changed < 0.5:
            log.warning("iteration %d: %.1f%% of the actor's bf16 weights differ from the start; the rest of the "
                        "update is below bf16's resolution (about |w| / 256) and the model does not see it yet. A short "
                        "run at this ppo.lr moves the model little: precision=fp32 trains and evaluates it in full.",
                        state.iteration, 100 * changed)
    key = f"eval/policy/{ctx.cfg.ppo.best_metric}"
    if key in result and (state.best is None or result[key] > state.best["value"]):
        state.best = {"iteration": state.iteration, "metric": ctx.cfg.ppo.best_metric, "value": result[key]}
        ctx.setup.save_best(ctx.stage_dir / "best", state.best)


def save(ctx: PPOContext, state: PPOState) -> Path:
    state.kl = ctx.kl.state_dict()
    m = ctx.models
    extra = {"critic_engine": m.critic} if m.critic is not None else {}
    return checkpoint.save_checkpoint(m.actor_engine, ctx.setup.ds_actor, ctx.setup.actor_lm, m.tokenizer,
                                      state.__dict__.copy(), ctx.stage_dir / "checkpoints", state.iteration,
                                      keep=ctx.cfg.ppo.keep_checkpoints, extra_engines=extra)


def finish(ctx: PPOContext, state: PPOState) -> None:
    evaluated = not state.evals or state.evals[-1]["iteration"] != state.iteration  # else a stop on alarm just did
    if evaluated:
        evaluate(ctx, state)
    final = ctx.stage_dir / "checkpoints" / f"step-{state.iteration:07d}"
    if evaluated or not final.is_dir():  # the kept final checkpoint (a continued run starts there) holds the evaluation
        final = save(ctx, state)
    if not ctx.dist.is_main:
        return
    best = ctx.stage_dir / "best"
    source = best if state.best and (best / "config.json").is_file() else final / "model"
    checkpoint.publish_model(source, ctx.stage_dir / "model")
    summary = {"iterations": state.iteration, "best": state.best, "alarms": state.alarms, "history": state.history,
               "evals": state.evals, "published": source.relative_to(ctx.stage_dir.parent).as_posix()}  # ppo/best
    ppo_setup.write_outputs(ctx.stage_dir, summary, ctx.tracker)
    common.mark_done(ctx.cfg, ctx.stage_dir, "ppo", state.run_id, ctx.identity)
    print(f"PPO done: {state.iteration} iterations, model at {ctx.stage_dir / 'model'} "
          f"(best {state.best['metric']} {state.best['value']:.4f} at iteration {state.best['iteration']})"
          if state.best else f"PPO done: {state.iteration} iterations", flush=True)


def _restore_best(stage_dir: Path, state: PPOState) -> None:
    """A continued run's best-so-far model: the finished run published it as model/ and deleted best/."""
    best, published = stage_dir / "best", stage_dir / "model"
    if state.best is None or (best / "config.json").is_file() or not (published / "best.json").is_file():
        return
    if json.loads((published / "best.json").read_text()) != state.best:
        return
    tmp = best.with_name("best.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(published, tmp, ignore=shutil.ignore_patterns(common.IDENTITY_FILE, checkpoint.MANIFEST))
    checkpoint.write_manifest(tmp)
    os.rename(tmp, best)
