"""Best-of-n stage: rejection-sampling fine-tuning (RAFT, Dong et al. 2023; ReST, Gulcehre et al. 2023),
the cheap baseline RL has to beat.

    lastmile best-of-n --config trainer/configs/tiny.yaml output_dir=runs/tiny

The init model (default: the SFT model) samples `best_of_n.samples_per_example` summaries per training
example; PPO's hybrid reward scores them (`ppo.reward.*`: the same reward model and terms, through PPO's
own `rollout.sample` and `rollout.score`); each example keeps its highest-scoring summary, and the init
model is fine-tuned on (document, kept summary) by SFT's training (`sft.fine_tune` with `sft.*`, and
`best_of_n.epochs` / `best_of_n.lr` where set), validated on data.dev_split as SFT is.

Writes <output_dir>/best_of_n/: samples.jsonl (per example: its samples with their scores, and the
chosen one), model/ (Hugging Face format), metrics.json, loss_curve.png, config.yaml, run.json.
Sampling goes in chunks of `best_of_n.batch_size` examples per rank (`lastmile.chunks`), each kept in
samples/ as soon as it is scored, so that a rerun after a kill samples only the chunks that are missing
(each chunk's seed depends on its index alone); a stop signal (SIGTERM, SIGUSR1) ends the stage after
the chunk being sampled, with exit 75; a kill or stop during the fine-tune resumes from its newest
checkpoint.
"""

from __future__ import annotations

import functools
import gc
import logging
from dataclasses import replace
from pathlib import Path

from lastmile import chunks, distributed, rollout, seeding, tracking
from lastmile.config import Config
from lastmile.data.prompts import PromptBuilder, TokenizedExample
from lastmile.data.records import Example, load_split
from lastmile.distributed import DistInfo
from lastmile.errors import UserError
from lastmile.hybrid_engine import HybridEngine, Sampling
from lastmile.model_inputs import CAUSAL_LM, REWARD_MODEL, check_model_input, check_same_vocabulary
from lastmile.models import (TREE_MASK_ATTENTION, ScalarRewardModel, hidden_size_of, load_causal_lm, load_reward_backbone,
                             load_tokenizer)
from lastmile.rollout import RolloutModels
from lastmile.stages import common, ppo_setup, sft

log = logging.getLogger(__name__)


def run(cfg: Config) -> Path:
    init, rm_path = _init_path(cfg), ppo_setup.reward_model_path(cfg)
    tokenizer = _check_inputs(cfg, init, rm_path)  # before anything is written
    start = common.begin(cfg, "best_of_n", "Best-of-n", inputs={"init": init, "reward_model": rm_path})
    if start.done:
        return start.stage_dir / "model"
    cfg = start.settled(cfg)  # precision=auto as this stage began (common.stage_precision)
    examples = load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_examples)
    rows = sample_best(cfg, start, examples, init, rm_path, tokenizer)
    distributed.release_engines()  # the sampling models, before the fine-tune builds its own
    gc.collect()
    chosen = {r["id"]: r["chosen"] for r in rows}
    builder = PromptBuilder(tokenizer, cfg.prompt)
    train, report = builder.tokenize([replace(e, summary=chosen[e.id]) for e in examples])
    stats = sampling_metrics(rows)
    if start.dist.is_main:
        log.info("sampled: %s; train data (the chosen summaries): %s",
                 ", ".join(f"{k} {v:.4f}" for k, v in stats.items()), report.describe())
    return sft.fine_tune(cfg, start, cfg.best_of_n.fine_tuning(cfg.sft), tokenizer, train,
                         sft.dev_examples(cfg, builder), label="Best-of-n", init=init, metrics=stats,
                         upstream_run_id=tracking.upstream_run_id(cfg.output_dir, "sft"))


def _init_path(cfg: Config) -> str:
    init = cfg.best_of_n.init or str(Path(cfg.output_dir) / "sft" / "model")
    if not (Path(init) / "config.json").is_file():
        raise UserError(f"best_of_n.init ({init}) holds no model. Best-of-n samples from and fine-tunes the SFT "
                        "model. Run `lastmile sft` with the same output_dir first, or set best_of_n.init to a "
                        "causal LM folder.")
    return init


def _check_inputs(cfg: Config, init: str, rm_path: str):
    """The init model a causal LM, the reward model a trained scorer reading its token ids (as PPO checks
    its actor and reward model); returns the init model's tokenizer."""
    check_model_input("best_of_n.init", init, CAUSAL_LM)
    check_model_input("ppo.reward.model", rm_path, REWARD_MODEL)
    tokenizer = load_tokenizer(replace(cfg.model, path=init, gguf_file=None), field="best_of_n.init")
    check_same_vocabulary("ppo.reward.model", rm_path, tokenizer, reader="the sampling model", reader_path=init)
    return tokenizer


def sample_best(cfg: Config, start: common.StageStart, examples: list[Example], init: str, rm_path: str,
                tokenizer) -> list[dict]:
    """One row per example (samples.jsonl): from samples.jsonl when sampling finished, else sampled chunk by
    chunk (`chunks.run`: each chunk kept as soon as it is scored, a stop signal honoured between chunks)."""
    dist, stage_dir = start.dist, start.stage_dir
    samples_file, folder = stage_dir / "samples.jsonl", stage_dir / "samples"
    if samples_file.is_file():
        return chunks.read_rows(samples_file)
    parts = chunks.split(len(examples), cfg.best_of_n.batch_size)

    @functools.cache
    def sampler() -> tuple[RolloutModels, list[TokenizedExample]]:  # loaded for the first chunk that is missing
        prompts, _ = PromptBuilder(tokenizer, cfg.prompt).tokenize(examples, with_response=False)
        return _sampling_models(cfg, dist, init, rm_path, tokenizer), prompts

    def work(k: int, idx: list[int]) -> list[dict]:
        models, prompts = sampler()
        return sample_chunk(cfg, models, examples, prompts, idx, chunk=k)

    rows = chunks.run(folder, parts, work, dist, desc="best-of-n")
    chunks.finish(folder, samples_file, rows, dist)
    return rows


def sample_chunk(cfg: Config, models: RolloutModels, examples: list[Example], prompts: list[TokenizedExample],
                 idx: list[int], *, chunk: int) -> list[dict]:
    """Examples `idx`, each sampled samples_per_example times in one generate call and scored by PPO's
    hybrid reward; a row per example with every sample and the best one. The seed depends on the chunk
    alone (not on the rank that samples it), so a resumed run samples a chunk as the killed one would."""
    b, n = cfg.best_of_n, cfg.best_of_n.samples_per_example
    rows = [i for i in idx for _ in range(n)]  # each example's samples side by side, as in PPO's rollouts
    seeding.seed_everything(cfg.seed, stage="best_of_n", step=chunk)
    sampling = Sampling(b.max_new_tokens, do_sample=True, temperature=b.temperature, top_p=b.top_p)
    batch = rollout.sample(models, [prompts[i] for i in rows], rows, sampling, batch_size=len(rows))
    batch = rollout.score(batch, models, examples, cfg.ppo.reward)
    scores = batch.scores.view(len(idx), n)  # (E, n)
    ratios = batch.reward_parts["length_ratio"].view(len(idx), n)
    best = scores.argmax(-1)  # (E,)
    out = []
    for e, i in enumerate(idx):
        j = int(best[e])
        out.append({"id": examples[i].id, "document": examples[i].document, "chosen": batch.texts[e * n + j],
                    "chosen_score": float(scores[e, j]), "chosen_length_ratio": float(ratios[e, j]),
                    "samples": [{"text": batch.texts[e * n + s], "score": float(scores[e, s])} for s in range(n)]})
    return out


def _sampling_models(cfg: Config, dist: DistInfo, init: str, rm_path: str, tokenizer) -> RolloutModels:
    """The init model (generation only) and the reward model, frozen, as PPO's rollout takes them
    (ppo_setup.build); best-of-n has no trained actor, reference or critic."""
    ds = distributed.inference_ds_config(cfg.deepspeed.config, dist.world_size,
                                         hidden_size=hidden_size_of(cfg.model, init),
                                         bf16=distributed.use_bf16(cfg.precision, dist.device))
    lm, attn = load_causal_lm(cfg.model, dist.device, seed=cfg.seed, path=init, ds=ds, field="best_of_n.init")
    actor = HybridEngine(distributed.inference_engine(lm, ds, dist.device), lm, ds, dist.device,
                         gather=cfg.deepspeed.generation_gather, world_size=dist.world_size)
    rm_model, _ = load_reward_backbone(cfg.model, rm_path, dist.device, tokenizer.pad_token_id, seed=cfg.seed, ds=ds,
                                       field="ppo.reward.model")
    rm = distributed.inference_engine(ScalarRewardModel(rm_model), ds, dist.device)
    return RolloutModels(actor=actor, actor_engine=None, ref=None, rm=rm, critic=None, tokenizer=tokenizer,
                         rm_stats=ppo_setup.reward_stats(rm_path), device=dist.device, precision=cfg.precision,
                         micro_batch=cfg.best_of_n.batch_size * cfg.best_of_n.samples_per_example,  # a chunk
                         shared_prefix=attn.implementation in TREE_MASK_ATTENTION)  # each document once per n


def sampling_metrics(rows: list[dict]) -> dict[str, float]:
    """The kept summaries against all samples: mean hybrid reward of each, and the kept ones' length
    (words / reference words)."""
    scores = [s["score"] for r in rows for s in r["samples"]]
    return {"best_of_n/chosen_score_mean": sum(r["chosen_score"] for r in rows) / len(rows),
            "best_of_n/sample_score_mean": sum(scores) / len(scores),
            "best_of_n/chosen_length_ratio_mean": sum(r["chosen_length_ratio"] for r in rows) / len(rows)}
