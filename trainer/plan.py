"""The run plan: what every stage of a command will do, derived from the config and the number of
ranks before anything loads, with every problem found at once.

    lastmile validate --config trainer/configs/tiny.yaml                         (the plan of `pipeline`)
    lastmile validate --config trainer/configs/rm_scitldr.yaml --for reward-model

`validate`, every stage's preflight and `pipeline` call `check_run` first, so that a setting a late
stage would refuse (PPO's batch plan, an evaluation split the data does not have) stops the command
before the first stage trains. No arithmetic is repeated here: batch sizes come from
`config.plan_batches` / `config.plan_ppo`, step counts from `data.sampling.total_steps`. Data sizes
are upper bounds counted without parsing (the lines of a JSONL file); only when one of them makes a
check fail is the training split loaded, to check again on the true count (or report why it cannot be
read). Each stage checks again on the examples it loads; hub datasets are counted only then.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass, field

from lastmile.config import (Config, PPOConfig, PPOPlan, TrainConfig, plan_batches, plan_ppo, ppo_batch_problems,
                             splits_overlap)
from lastmile.data import records, sampling
from lastmile.errors import ConfigError, UserError

# The stages each command runs, in order; `report` is the pipeline's evaluation of the MLE and RL models.
STAGES = {"pipeline": ("sft", "reward-model", "ppo", "report"), "sft": ("sft",), "reward-model": ("reward-model",),
          "ppo": ("ppo",), "best-of-n": ("best-of-n",), "evaluate": ("evaluate",)}
# The data.* splits each stage reads. The reward model also scores SFT's evaluation outputs on
# data.eval_split when output_dir has them; that optional read is left to the stage.
SPLITS = {"sft": ("train_split", "dev_split"), "reward-model": ("train_split", "dev_split"),
          "ppo": ("train_split", "dev_split"), "best-of-n": ("train_split", "dev_split"), "evaluate": ("eval_split",),
          "report": ("eval_split",)}


def pipeline_stages(cfg: Config) -> tuple[str, ...]:
    """The pipeline's stages: best-of-n joins them (before PPO) when best_of_n.in_pipeline is set."""
    extra = ("best-of-n",) if cfg.best_of_n.in_pipeline else ()
    return ("sft", "reward-model", *extra, "ppo", "report")


@dataclass
class RunPlan:
    command: str
    world_size: int
    stages: dict[str, str] = field(default_factory=dict)  # stage -> what it will do, one line
    problems: list[str] = field(default_factory=list)  # in the house template, every one found
    ppo: PPOPlan | None = None  # when the command runs PPO and its batch sizes divide

    def add(self, problem: str | None) -> None:
        """A problem, once: stages that read the same data find the same fault."""
        if problem and problem not in self.problems:
            self.problems.append(problem)

    def describe(self) -> str:
        width = max((len(s) for s in self.stages), default=0)
        return "\n".join([f"Plan of `lastmile {self.command}` on {_n(self.world_size, 'rank')}:"]
                         + [f"  {stage:<{width}}  {line}" for stage, line in self.stages.items()])


def world_size_from_env() -> int:
    """The ranks this process will run with, as the launchers announce them before torch.distributed
    starts: WORLD_SIZE (deepspeed, torchrun), else SLURM_NTASKS under srun (as distributed.setup maps
    them), else 1."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and os.environ.get("SLURM_NTASKS"):
        return int(os.environ["SLURM_NTASKS"])
    return 1


def check_run(cfg: Config, command: str, world_size: int) -> RunPlan:
    """The plan of `lastmile <command>`; raises one ConfigError listing every problem."""
    plan = make_plan(cfg, command, world_size)
    if plan.problems:
        raise ConfigError(f"`lastmile {command}` on {_n(world_size, 'rank')} would fail as configured:\n"
                          + "\n".join(f"  - {p}" for p in plan.problems))
    return plan


def make_plan(cfg: Config, command: str, world_size: int) -> RunPlan:
    """The plan and its problems (none raised). Commands that train nothing (compare, ...) have an empty plan."""
    plan = RunPlan(command, world_size)
    stages = pipeline_stages(cfg) if command == "pipeline" else STAGES.get(command, ())
    for name in dict.fromkeys(f for stage in stages for f in SPLITS[stage]):
        plan.add(records.split_problem(cfg.data, name))
    describe = {"sft": _sft, "reward-model": _reward_model, "ppo": _ppo, "best-of-n": _best_of_n,
                "evaluate": _evaluation, "report": _report}
    for stage in stages:
        plan.stages[stage] = describe[stage](cfg, plan)
    _check_model_inputs(cfg, stages, plan)
    return plan


def _model_inputs(cfg: Config) -> dict[str, tuple[tuple[str, str | None, str], ...]]:
    """Per stage, the model settings a user names (field, value, role)."""
    from lastmile.model_inputs import ANY_LM, CAUSAL_LM, REWARD_MODEL

    return {"reward-model": (("rm.init", cfg.rm.init, ANY_LM),
                             ("rm.policy_negatives_model", cfg.rm.policy_negatives_model, CAUSAL_LM)),
            "ppo": (("ppo.init", cfg.ppo.init, CAUSAL_LM), ("ppo.reward.model", cfg.ppo.reward.model, REWARD_MODEL)),
            "best-of-n": (("best_of_n.init", cfg.best_of_n.init, CAUSAL_LM),
                          ("ppo.reward.model", cfg.ppo.reward.model, REWARD_MODEL)),
            "evaluate": (("eval.model", cfg.eval.model, CAUSAL_LM), ("eval.baseline_model", cfg.eval.baseline_model,
                                                                      CAUSAL_LM))}


def _check_model_inputs(cfg: Config, stages: tuple[str, ...], plan: RunPlan) -> None:
    """Each model setting against its role (a reward model given as the actor, ...), from its files,
    before the first stage trains. Only models that exist already: one an earlier stage of this
    command writes (the pipeline's sft/model) is checked by the stage that reads it."""
    from pathlib import Path

    from lastmile.model_inputs import check_model_input

    inputs = _model_inputs(cfg)
    for stage in stages:
        for field_name, value, role in inputs.get(stage, ()):
            if value and Path(value).exists():
                try:
                    check_model_input(field_name, value, role)
                except UserError as e:
                    plan.add(str(e))


def too_few_prompts(o: PPOConfig, prompts: int) -> str | None:
    """PPO's check that an iteration's prompts exist; `prompts` is how many the training split holds."""
    if prompts >= o.prompts_per_iteration:
        return None
    return (f"ppo.prompts_per_iteration ({o.prompts_per_iteration}) is more than the {prompts} training prompts. "
            "Each iteration takes that many distinct prompts from data.train_split. Lower it, raise "
            "data.max_train_examples, or add data.")


def _examples(cfg: Config, split: str, limit: int | None) -> int | None:
    """At most how many examples a stage gets from `split` with `limit`; None when unknown before loading."""
    rows = records.count_rows(cfg.data, split)
    return None if rows is None else min(rows, limit) if limit else rows


def _confirmed(cfg: Config, bound: int, check: Callable[[int], str | None]) -> str | None:
    """`check(n)` on the training examples: first on `bound`, an upper bound on their number; a refusal
    is checked again on the loaded examples, so that its count is exact and an unreadable split is
    reported as what it is (the loader's message) rather than as a size."""
    if check(bound) is None:
        return None
    try:
        return check(len(records.load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_examples)))
    except UserError as e:
        return str(e)


def _trained(cfg: Config, plan: RunPlan, prefix: str, t: TrainConfig, unit: str, per_example: int | None) -> str:
    """SFT's and the reward model's plan: batch sizes, then optimizer steps when the number of training
    items (`per_example` per training example) is known before loading."""
    try:
        batches = plan_batches(t.batch_size, t.micro_batch_size, plan.world_size, field_prefix=prefix)
    except ConfigError as e:
        plan.add(str(e))
        return "batch sizes do not divide (see the problems)"
    line = (f"{batches.global_batch} {unit} per optimizer step = {batches.micro_batch} per micro-batch x "
            f"{_n(batches.world_size, 'rank')} x {batches.grad_accum} accumulation")
    bound = _examples(cfg, cfg.data.train_split, cfg.data.max_train_examples) if per_example else None
    if bound is None:
        return line + "; steps known once the data is loaded"

    def refusal(n: int) -> str | None:  # the stage's own check (sampling.total_steps) on n training examples
        try:
            sampling.total_steps(t, n * per_example, batches, field_prefix=prefix, unit=unit)
        except ConfigError as e:
            return str(e)
        return None

    problem = _confirmed(cfg, bound, refusal)
    if problem:
        plan.add(problem)
        return line
    steps = sampling.total_steps(t, bound * per_example, batches, field_prefix=prefix, unit=unit)
    return line + f"; at most {steps} optimizer steps (from at most {bound * per_example} {unit})"


def _sft(cfg: Config, plan: RunPlan) -> str:
    return _trained(cfg, plan, "sft", cfg.sft, "examples", 1)


def _reward_model(cfg: Config, plan: RunPlan) -> str:
    # at most negatives_per_example pairs per example; policy negatives add a number known only after sampling
    per_example = None if cfg.rm.policy_negatives_model else cfg.rm.negatives_per_example
    return _trained(cfg, plan, "rm", cfg.rm, "pairs", per_example)


def _ppo(cfg: Config, plan: RunPlan) -> str:
    o, data = cfg.ppo, cfg.data
    if splits_overlap(data.dev_split, data.eval_split):
        plan.add(
            f"data.dev_split ({data.dev_split}) overlaps data.eval_split ({data.eval_split}). PPO picks its best "
            "checkpoint on the dev split, so reporting on the same data would report a tuned number. Set "
            "data.eval_split (or data.dev_split) to another split, or use the two parts of one split: "
            "validation@dev and validation@report.")
    batch_problems = ppo_batch_problems(o.prompts_per_iteration, o.samples_per_prompt, o.minibatch_size,
                                        o.micro_batch_size, plan.world_size)
    if batch_problems:
        for problem in batch_problems:
            plan.add(problem)
        return "batch sizes do not divide (see the problems)"
    p = plan_ppo(o.prompts_per_iteration, o.samples_per_prompt, o.minibatch_size, o.micro_batch_size, o.epochs,
                 plan.world_size)
    plan.ppo = p
    if o.old_logprobs == "update" and (o.epochs != 1 or p.minibatches != 1):
        plan.add(f"ppo.old_logprobs (update) needs one pass over the rollout in one minibatch, not {o.epochs} "
                 f"epoch(s) x {p.minibatches} minibatches. After the first optimizer step the update's forward is no "
                 "longer the policy that sampled. Set ppo.epochs=1 and ppo.minibatch_size to the rollout "
                 f"({p.rollout}), or ppo.old_logprobs=auto.")
    steps = o.iterations * p.steps_per_iteration
    if o.warmup_steps >= steps:
        plan.add(f"ppo.warmup_steps ({o.warmup_steps}) is not below the run's {steps} optimizer steps: the "
                 "learning rate would never reach ppo.lr. Lower ppo.warmup_steps.")
    prompts = _examples(cfg, data.train_split, data.max_train_examples)
    if prompts is not None:
        plan.add(_confirmed(cfg, prompts, lambda n: too_few_prompts(o, n)))
    return (f"{_n(o.prompts_per_iteration, 'prompt')} x {_n(o.samples_per_prompt, 'sample')} = {p.rollout} "
            f"responses per iteration ({p.prompts_per_rank} prompts per rank); minibatches of {o.minibatch_size} = "
            f"{p.train.micro_batch} per micro-batch x {_n(p.train.world_size, 'rank')} x {p.train.grad_accum} "
            f"accumulation; {_n(p.minibatches, 'minibatch', 'minibatches')} x {_n(o.epochs, 'epoch')} = "
            f"{_n(p.steps_per_iteration, 'optimizer step')} per iteration, {steps} in {o.iterations} iterations")


def _best_of_n(cfg: Config, plan: RunPlan) -> str:
    b = cfg.best_of_n
    fine_tune = _trained(cfg, plan, "sft", b.fine_tuning(cfg.sft), "examples", 1)  # one kept summary per example
    return (f"{_n(b.samples_per_example, 'sample')} per training example, {b.batch_size} examples per generate call "
            f"per rank; the fine-tune on the best ones: {fine_tune}")


def _evaluation(cfg: Config, plan: RunPlan) -> str:
    n = _examples(cfg, cfg.data.eval_split, cfg.eval.max_examples or cfg.data.max_eval_examples)
    return f"data.eval_split ({cfg.data.eval_split})" + ("" if n is None else f", at most {n} examples")


def _report(cfg: Config, plan: RunPlan) -> str:
    goals = cfg.report.goals
    return _evaluation(cfg, plan) + (f"; the goal's {_n(len(goals), 'line')} (report.goals) read off its results"
                                     if goals else "")


def _n(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _shapes(cfg: Config, command: str):
    """(the trained model's shape, the reward model's or None when the same) from config.json files: the
    actor is `ppo.init` for `lastmile ppo` when it names a folder, else model.path (SFT's output keeps
    its shape); the reward model is `ppo.reward.model` when it names a folder, else the actor's shape (the
    reward model starts from the SFT model)."""
    from lastmile import memory_plan as mp
    from lastmile.models import model_config

    def folder_shape(path: str | None, field: str):
        if path and (Path(path) / "config.json").is_file():
            return mp.ModelShape.from_hf_config(model_config(cfg.model, path, field=field), name=path)
        return None

    actor = (folder_shape(cfg.ppo.init, "ppo.init") if command == "ppo" else None) or \
        mp.ModelShape.from_hf_config(model_config(cfg.model), name=cfg.model.path)
    reward = folder_shape(cfg.ppo.reward.model, "ppo.reward.model") if command in ("ppo", "best-of-n") else None
    return actor, reward


def print_memory_plan(cfg: Config, args) -> int:
    """`lastmile plan`: the run plan (refused as `validate` refuses it), then memory per rank and time per
    step of each stage on the given hardware, the verdict and what would make it fit."""
    from lastmile import memory_plan as mp
    from lastmile.config import read_ds_config as load_ds_config

    if args.shape and args.shape.lower() not in mp.SHAPES:
        raise ConfigError(f"--shape ({args.shape}) is not a known shape. Use one of: {', '.join(mp.SHAPES)}, or "
                          "leave it out to plan model.path's own shape.")
    # GPU nodes are planned, not this machine: their host memory is unknown unless given
    host = int(args.host_mem * mp.GiB) if args.host_mem else None if args.gpus else _host_bytes()
    if args.gpus:
        hw = mp.Hardware.gpus(args.gpus, args.gpu_mem or 80.0, nodes=args.nodes,
                              host_gib=None if host is None else host / mp.GiB, tflops=args.tflops or 989.0)
    else:
        ranks = world_size_from_env()
        hw = mp.Hardware(ranks, args.nodes, None, host, args.tflops or mp.Hardware.peak_tflops)
    run = check_run(cfg, args.for_command, hw.world)
    shape, reward = (mp.SHAPES[args.shape.lower()], None) if args.shape else _shapes(cfg, args.for_command)
    ds = load_ds_config(cfg.deepspeed.config)
    plans, v = mp.verdict(cfg, shape, hw, STAGES[args.for_command], ds, reward=reward)
    print(run.describe())
    print(mp.describe(plans, v, shape, hw, mp.settings(cfg, ds, hw), reward=reward))
    return 0 if v.fits.startswith("fits") or v.budget is None else 3
