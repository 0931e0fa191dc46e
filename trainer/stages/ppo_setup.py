"""Building the PPO stage's models, engines and data, and writing its outputs.

Kept apart from `ppo.py` so that the stage module reads as the iteration loop. The actor and the
critic are trained engines; the reference and the reward model are inference engines. Under ZeRO-3
every model is created partitioned (`models.partitioned_loading`), so no rank holds a whole model
except the actor's gathered copy while it generates (`hybrid_engine`, `deepspeed.generation_gather`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lastmile_kernels.logprob import resolve_impl
from lastmile import checkpoint, distributed, lora
from lastmile.config import Config, PPOConfig, PPOPlan
from lastmile.data.prompts import PromptBuilder, TokenizedExample
from lastmile.data.records import Example, load_split
from lastmile.distributed import DistInfo
from lastmile.errors import ConfigError, UserError
from lastmile.hybrid_engine import HybridEngine
from lastmile.model_inputs import CAUSAL_LM, REWARD_MODEL, check_model_input, check_same_vocabulary, read_reward_stats
from lastmile.models import (TREE_MASK_ATTENTION, ScalarRewardModel, TokenLogprobModel, ValueModel, hidden_size_of,
                             load_causal_lm, load_reward_backbone, load_tokenizer)
from lastmile.plan import check_run, too_few_prompts
from lastmile.plots import plot_grid
from lastmile.rollout import RolloutModels

log = logging.getLogger(__name__)


@dataclass
class Setup:
    plan: PPOPlan
    models: RolloutModels
    actor_lm: object  # the Hugging Face causal LM inside the actor engine
    ds_actor: dict
    prompts: list[TokenizedExample]  # the training prompt pool (prompt only)
    examples: list[Example]  # the same examples, for references
    dev_prompts: list[TokenizedExample]
    dev_examples: list[Example]
    runtime: dict  # what was chosen at run time, logged as params
    old_logprobs: str = "forward"  # `forward` or `update` (ppo.old_logprobs resolved)

    def save_best(self, folder: Path, best: dict) -> None:
        """Collective: the actor's current weights as a Hugging Face model in `folder`, atomically."""
        sd = distributed.consolidated_state_dict(self.models.actor_engine, self.ds_actor)
        if torch_rank() == 0:
            tmp = folder.with_name(folder.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            checkpoint.save_hf_model(self.actor_lm, self.models.tokenizer, sd, tmp)
            checkpoint.write_json_atomic(tmp / "best.json", best)
            checkpoint.write_manifest(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)
        distributed.barrier()


def torch_rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def input_paths(cfg: Config) -> tuple[str, str]:
    """(actor init, reward model): the configured paths, else the earlier stages' models in output_dir."""
    out = Path(cfg.output_dir)
    init = cfg.ppo.init or (str(out / "sft" / "model") if (out / "sft" / "model" / "config.json").is_file() else None)
    if init is None:
        if cfg.model.random_init:
            raise ConfigError(f"ppo.init is unset and {out / 'sft' / 'model'} holds no SFT model, while "
                              "model.random_init is true. Run `lastmile sft` with the same output_dir first, or set "
                              "ppo.init to a model path.")
        init = cfg.model.path
    return init, reward_model_path(cfg)


def reward_model_path(cfg: Config) -> str:
    """ppo.reward.model, else the reward model in output_dir; UserError when it holds none."""
    rm = cfg.ppo.reward.model or str(Path(cfg.output_dir) / "reward_model" / "model")
    if not (Path(rm) / "config.json").is_file():
        raise UserError(f"ppo.reward.model ({rm}) holds no reward model. Run `lastmile reward-model` with the same "
                        "output_dir first, or point ppo.reward.model at a reward model folder.")
    return rm


def check_inputs(cfg: Config, init: str, rm_path: str) -> None:
    """Every model input against its role, before anything loads or is written (lastmile.model_inputs):
    the actor and the reference (init) a causal LM; the reward model, and the critic started from it, a
    trained one-label scorer with reward_stats.json that reads the actor's token ids."""
    from_base = init == cfg.model.path and not cfg.ppo.init
    field = "model.path" if from_base else "ppo.init"
    check_model_input(field, init, CAUSAL_LM, gguf_file=cfg.model.gguf_file if from_base else None)
    check_model_input("ppo.reward.model", rm_path, REWARD_MODEL)
    tokenizer = load_tokenizer(cfg.model if from_base else replace(cfg.model, path=init, gguf_file=None), field=field)
    check_same_vocabulary("ppo.reward.model", rm_path, tokenizer, reader="the actor", reader_path=init)


def check(cfg: Config, world_size: int) -> PPOPlan:
    """The settings PPO needs beyond field validation (lastmile.plan): the batch plan for this many
    ranks, the splits."""
    return check_run(cfg, "ppo", world_size).ppo


def build(cfg: Config, dist: DistInfo) -> Setup:
    o = cfg.ppo
    plan = check(cfg, dist.world_size)
    init, rm_path = input_paths(cfg)
    from_base = init == cfg.model.path
    tokenizer = load_tokenizer(cfg.model if from_base else replace(cfg.model, path=init, gguf_file=None,
                                                                      tokenizer_path=cfg.model.tokenizer_path))
    builder = PromptBuilder(tokenizer, cfg.prompt)
    examples = load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_examples)
    dev_examples = load_split(cfg.data, cfg.data.dev_split, o.eval_examples)
    prompts, report = builder.tokenize(examples, with_response=False)
    dev_prompts, _ = builder.tokenize(dev_examples, with_response=False)
    if problem := too_few_prompts(o, len(prompts)):
        raise ConfigError(problem)
    total_steps = o.iterations * plan.steps_per_iteration
    hidden = hidden_size_of(cfg.model, None if from_base else init)
    bf16 = distributed.use_bf16(cfg.precision, dist.device)  # bf16 weights, fp32 master weights and moments
    ds_actor = distributed.ds_config_for(cfg.deepspeed.config, plan.train, o.actor_optim(), hidden_size=hidden, bf16=bf16)
    actor_lm, attn = load_causal_lm(cfg.model, dist.device, seed=cfg.seed, path=None if from_base else init,
                                    ds=ds_actor)
    if o.gradient_checkpointing:
        checkpoint_activations(actor_lm)
    if o.lora.r:
        actor_lm = lora.add_adapters(actor_lm, o.lora)
    actor_engine = distributed.build_engine(TokenLogprobModel(actor_lm, logprob_impl=o.logprob_impl), ds_actor,
                                            o.actor_optim(), total_steps=total_steps)
    if o.lora.r:  # the reference is the actor itself with its adapters off
        ref = lora.AdaptersOff(actor_engine, actor_lm)
    else:
        ref_lm, _ = load_causal_lm(cfg.model, dist.device, seed=cfg.seed, path=None if from_base else init, ds=ds_actor)
        ref = distributed.inference_engine(TokenLogprobModel(ref_lm, logprob_impl=o.logprob_impl), ds_actor,
                                           dist.device)
    rm_model, _ = load_reward_backbone(cfg.model, rm_path, dist.device, tokenizer.pad_token_id, seed=cfg.seed,
                                       ds=ds_actor)
    rm = distributed.inference_engine(ScalarRewardModel(rm_model), ds_actor, dist.device)
    critic, stats = None, reward_stats(rm_path)
    if o.advantage == "gae":
        ds_critic = distributed.ds_config_for(cfg.deepspeed.config, plan.train, o.critic_optim(), hidden_size=hidden,
                                              bf16=bf16)
        critic_model, _ = load_reward_backbone(cfg.model, rm_path, dist.device, tokenizer.pad_token_id,
                                                seed=cfg.seed, ds=ds_critic)
        w = o.reward.rm_weight  # values in the reward's units (see ValueModel)
        if o.gradient_checkpointing:
            checkpoint_activations(critic_model)
        critic_model = ValueModel(critic_model, scale=w / stats["std"], shift=-w * stats["mean"] / stats["std"])
        critic = distributed.build_engine(critic_model, ds_critic, o.critic_optim(), total_steps=total_steps)
    hybrid = HybridEngine(actor_engine, actor_lm, ds_actor, dist.device, gather=cfg.deepspeed.generation_gather,
                          world_size=dist.world_size)
    models = RolloutModels(actor=hybrid, actor_engine=actor_engine, ref=ref, rm=rm, critic=critic, tokenizer=tokenizer,
                           rm_stats=stats, device=dist.device, precision=cfg.precision,
                           micro_batch=o.micro_batch_size,
                           shared_prefix=uses_shared_prefix(o, attn.implementation))
    old_logprobs = resolve_old_logprobs(o, plan, bf16=bf16)
    trained = sum(getattr(p, "ds_numel", p.numel()) for p in actor_lm.parameters() if p.requires_grad)
    runtime = {"attention": attn.implementation, "world_size": dist.world_size, "generation_gather": hybrid.gather,
               "trained_parameters": trained, "reference": "actor with adapters off" if o.lora.r else "frozen copy",
               "old_logprobs": old_logprobs, "shared_prefix": models.shared_prefix,
               "logprob_impl": resolve_impl(o.logprob_impl, dist.device), "init": init, "reward_model": rm_path,
               "rollout": plan.rollout, "grad_accum": plan.train.grad_accum, "optimizer_steps": total_steps}
    if dist.is_main:
        log.info("PPO: %s; train prompts: %s", ", ".join(f"{k} {v}" for k, v in runtime.items()), report.describe())
    return Setup(plan, models, actor_lm, ds_actor, prompts, examples, dev_prompts, dev_examples, runtime,
                 old_logprobs=old_logprobs)


def checkpoint_activations(model) -> None:
    """ppo.gradient_checkpointing: transformers' checkpointing of every decoder layer, non-reentrant (it
    needs no input that requires grad, so frozen embeddings and LoRA work). transformers checkpoints only
    in training mode, and `from_pretrained` returns a model in eval mode: the model is put in training
    mode with every dropout at 0 (PPO trains without dropout, as TRL does), so its outputs are the eval
    mode's. Generation still runs in eval mode (hybrid_engine), and no-grad forwards keep nothing."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    for module in model.modules():  # attention layers copy attention_dropout from the config when built
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def uses_shared_prefix(o: PPOConfig, attention: str) -> bool:
    """ppo.shared_prefix where it can act: more than one sample per prompt and an attention that takes
    the tree mask."""
    return o.shared_prefix and o.samples_per_prompt > 1 and attention in TREE_MASK_ATTENTION


def resolve_old_logprobs(o: PPOConfig, plan: PPOPlan, *, bf16: bool) -> str:
    """`forward` or `update` for ppo.old_logprobs (see its docstring); `update` was checked by the plan."""
    if o.old_logprobs != "auto":
        return o.old_logprobs
    one_pass = o.epochs == 1 and plan.minibatches == 1
    return "update" if one_pass and not bf16 else "forward"


def reward_stats(rm_path: str) -> dict[str, float]:
    """The reward model's reference-score mean and std (its reward_stats.json), checked."""
    return read_reward_stats("ppo.reward.model", rm_path)


def write_outputs(stage_dir: Path, summary: dict, tracker) -> None:
    """history.json and curves.png (reward, KL, length, evaluation), logged to the run (rank 0)."""
    checkpoint.write_json_atomic(stage_dir / "history.json", summary)
    hist, evals = summary["history"], summary["evals"]

    def curve(rows, key):
        return [(r["iteration"], r[key]) for r in rows if key in r]

    panels = {
        "reward": {"score": curve(hist, "reward/score_mean"), "rm term": curve(hist, "reward/rm_term_mean"),
                   "metric term": curve(hist, "reward/metric_term_mean")},
        "KL to reference (nats/seq)": {"rollout": curve(hist, "kl/seq_mean"), "eval (greedy)": curve(evals, "eval/policy/kl")},
        "response length (tokens)": {"rollout": curve(hist, "rollout/response_tokens_mean")},
        "eval la-ROUGE-L / ROUGE-L": {"la_rougeL": curve(evals, "eval/policy/la_rougeL"), "rougeL": curve(evals, "eval/policy/rougeL")},
        "eval reward-model score": {"normalized": curve(evals, "eval/policy/reward")},
        "log-prob parity (nats/token)": {"max |gen - train|": curve(hist, "parity/max_abs"),
                                         "mean": curve(hist, "parity/mean_abs")},
        "actor weights changed since the start": {"share": curve(hist, "policy/weights_changed")},
    }
    plot = plot_grid(stage_dir / "curves.png", panels, title="PPO")
    for path in (stage_dir / "history.json", plot):
        tracker.log_artifact(path)
