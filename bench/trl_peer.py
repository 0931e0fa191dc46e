"""The peer side of bench/rl_iteration.py: RL iterations with TRL's GRPOTrainer or PPOTrainer.

Runs inside a peer venv made by `bash bench/setup_peers.sh`, never in the project's (lastmile does
not depend on trl):

    bench/venvs/trl-1.16.0/bin/python bench/trl_peer.py --trainer grpo --model DIR --reward-model DIR \
        --prompts prompts.jsonl --prompts-per-step 4 --completions-per-prompt 4 --max-new-tokens 48 \
        --steps 3 --out result.json
    bench/venvs/trl-1.7.1/bin/python bench/trl_peer.py --trainer ppo ...   (the same flags)

One step is one RL iteration: prompts_per_step x completions_per_prompt completions sampled at
temperature 1 up to max_new_tokens, scored by the 1-label reward model, a KL penalty to a frozen
reference, and one optimizer step over all of them (one epoch, one minibatch, gradient accumulation
over micro-batches of --micro-batch completions).
- grpo: `trl.GRPOTrainer` (trl 1.16). The reward model folder is its one reward function,
  num_generations = completions_per_prompt, beta = --kl-coef (which loads the reference).
- ppo: `trl.experimental.ppo.PPOTrainer` (trl 1.7.1, the last release that has it; trl has no
  top-level `PPOTrainer` in 1.x). Reward and value model both start from the reward model folder.
  It samples one completion per dataset row, so each prompt is listed completions_per_prompt times
  and the rows are served in order, one step's prompts per batch.
Both trainers see the first steps x prompts_per_step prompts of the file, in file order.

Times every step as the time between `on_step_end` callbacks (the first from `on_train_begin`),
drops the first step as warm-up when there is more than one, and writes a JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPOTrainer lives in trl.experimental on purpose

import torch  # after the offline switch above
import transformers
import trl
from datasets import Dataset
from transformers import TrainerCallback


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", choices=["grpo", "ppo"], required=True)
    p.add_argument("--model", required=True, help="policy (and reference): a local Hugging Face folder")
    p.add_argument("--reward-model", required=True, help="a 1-label AutoModelForSequenceClassification folder")
    p.add_argument("--prompts", required=True, help='JSONL of {"prompt": "<chat-formatted text>"}')
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--completions-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=3, help="RL iterations; the first is warm-up when there are more")
    p.add_argument("--micro-batch", type=int, default=4, help="completions per forward/backward pass")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (default fp32; TRL's default is bf16)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (TRL's default; off here because lastmile has none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="result JSON")
    args = p.parse_args()
    problems = [f"--{name.replace('_', '-')} ({getattr(args, name)}) must be at least 1."
                for name in ("prompts_per_step", "completions_per_prompt", "max_new_tokens", "steps", "micro_batch")
                if getattr(args, name) < 1]
    completions = args.prompts_per_step * args.completions_per_prompt
    if not problems and completions % args.micro_batch:
        problems.append(f"--micro-batch ({args.micro_batch}) does not divide the {completions} completions of a step. "
                        "One optimizer step must consume exactly one step's completions. Pick a divisor.")
    if problems:
        p.error("\n".join(problems))
    return args


def load_prompts(path: str, count: int) -> list[str]:
    """The first `count` prompts of the file, cycling when it holds fewer."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines if line.strip()]
    if not prompts:
        sys.exit(f"--prompts ({path}) holds no prompts. Write one {{\"prompt\": ...}} object per line.")
    return [prompts[i % len(prompts)] for i in range(count)]


class StepClock(TrainerCallback):
    """Seconds per optimizer step, and GRPO's logged mean completion length per step."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.completion_tokens: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "completions/mean_length" in logs:
            self.completion_tokens.append(logs["completions/mean_length"])


def common_config(args: argparse.Namespace, work: Path) -> dict:
    """TrainingArguments shared by both trainers: CPU, no eval, no saving, no tracker.

    bf16 and gradient checkpointing are set explicitly: GRPOConfig and PPOConfig default both to True,
    and the update must match ours (fp32 unless --bf16, no activation recomputation)."""
    completions = args.prompts_per_step * args.completions_per_prompt
    return {"output_dir": str(work), "report_to": "none", "save_strategy": "no", "eval_strategy": "no",
            "logging_steps": 1, "disable_tqdm": True, "use_cpu": True, "dataloader_pin_memory": False,
            "bf16": args.bf16, "fp16": False, "gradient_checkpointing": args.gradient_checkpointing,
            "learning_rate": args.lr, "seed": args.seed, "per_device_train_batch_size": args.micro_batch,
            "gradient_accumulation_steps": completions // args.micro_batch}


def build_grpo(args: argparse.Namespace, prompts: list[str], clock: StepClock, work: Path):
    from trl import GRPOConfig, GRPOTrainer

    completions = args.prompts_per_step * args.completions_per_prompt
    # generation_batch_size = one step's completions, so each optimizer step generates once and
    # uses every completion once (steps_per_generation = gradient_accumulation_steps).
    cfg = GRPOConfig(**common_config(args, work), max_steps=args.steps, num_iterations=1,
                     num_generations=args.completions_per_prompt, generation_batch_size=completions,
                     max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                     beta=args.kl_coef, shuffle_dataset=False, model_init_kwargs={"dtype": "float32"})
    return GRPOTrainer(model=args.model, reward_funcs=args.reward_model, args=cfg,
                       train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), callbacks=[clock])


def import_ppo():
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError:
        try:
            from trl import PPOConfig, PPOTrainer
        except ImportError:
            sys.exit(f"trl {trl.__version__} has no PPOTrainer (trl.experimental.ppo was removed after 1.7.1). "
                     "Run --trainer ppo with bench/venvs/trl-1.7.1/bin/python.")
    return PPOConfig, PPOTrainer


def build_ppo(args: argparse.Namespace, prompts: list[str], clock: StepClock, work: Path):
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    PPOConfig, PPOTrainer = import_ppo()
    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    # TRL's PPO treats every pad-id token as padding, prompt tokens included (generate masks them
    # out). SmolLM2 pads with its EOS <|im_end|>, which the chat prompts contain, so pad with another
    # token already in the vocabulary (<|endoftext|>), as TRL's PPO examples add a [PAD] token.
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.pad_token = tok.unk_token if tok.unk_token_id not in (None, tok.eos_token_id) else tok.bos_token
    completions = args.prompts_per_step * args.completions_per_prompt
    cfg = PPOConfig(**common_config(args, work), total_episodes=args.steps * completions, num_ppo_epochs=1,
                    num_mini_batches=1, local_rollout_forward_batch_size=completions,
                    response_length=args.max_new_tokens, stop_token="eos", temperature=1.0, kl_coef=args.kl_coef,
                    num_sample_generations=0)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1, dtype=torch.float32)
    rows = [{"input_ids": tok(p, add_special_tokens=False)["input_ids"]}
            for p in prompts for _ in range(args.completions_per_prompt)]
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_list(rows), callbacks=[clock])
    # PPOTrainer shuffles its rows; serve them in order so a step holds its prompts' copies together.
    trainer.dataloader = trainer.accelerator.prepare(
        DataLoader(trainer.train_dataset, batch_size=completions, shuffle=False, collate_fn=trainer.data_collator,
                   drop_last=True))
    count_ppo_completion_tokens(clock, tok.eos_token_id)
    return trainer


def count_ppo_completion_tokens(clock: StepClock, eos_id: int) -> None:
    """PPOTrainer logs no completion length: count it (up to and including the first EOS) at generation."""
    from trl.experimental.ppo import ppo_trainer

    generate_batches = ppo_trainer.batch_generation

    def counted(model, queries, *rest, **kwargs):
        query_responses, logits = generate_batches(model, queries, *rest, **kwargs)
        responses = query_responses[:, queries.shape[1]:]
        is_eos = responses == eos_id
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, responses.shape[1])
        clock.completion_tokens.append(lengths.float().mean().item())
        return query_responses, logits

    ppo_trainer.batch_generation = counted


def peak_rss_gb() -> dict:
    """ru_maxrss is in KiB on Linux; children's is the largest child's, added as an upper bound."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"peak_rss_gb": own + children, "peak_rss_self_gb": own, "peak_rss_children_gb": children}


def main() -> None:
    args = parse_args()
    if args.bf16:
        # What `accelerate launch --mixed_precision bf16` sets. GRPOTrainer takes bf16 from its config;
        # PPOTrainer (1.7.1) builds its own Accelerator from this variable only, ignoring `bf16`.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    torch.manual_seed(args.seed)
    out = Path(args.out).resolve()
    work = out.parent / f"trl-{args.trainer}-work"
    prompts = load_prompts(args.prompts, args.steps * args.prompts_per_step)
    clock = StepClock()
    build = build_grpo if args.trainer == "grpo" else build_ppo
    trainer = build(args, prompts, clock, work)
    trainer.train()
    if len(clock.seconds) != args.steps:
        sys.exit(f"{args.trainer}: expected {args.steps} timed steps, got {len(clock.seconds)}.")
    warm = 1 if args.steps > 1 else 0
    result = {
        "trainer": f"trl-{args.trainer}", "trainer_class": type(trainer).__module__ + "." + type(trainer).__name__,
        "trl_version": trl.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
        "precision": "bf16" if trainer.accelerator.mixed_precision == "bf16" else "fp32",
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": args.steps - warm,
        "warmup_seconds": clock.seconds[0] if warm else None, "step_seconds": clock.seconds[warm:],
        "prompts_per_step": args.prompts_per_step,
        "completions_per_step": args.prompts_per_step * args.completions_per_prompt,
        "max_new_tokens": args.max_new_tokens, "micro_batch": args.micro_batch, "lr": args.lr, "kl_coef": args.kl_coef,
        **peak_rss_gb(),
    }
    if len(clock.completion_tokens) == args.steps:
        result["mean_completion_tokens"] = statistics.mean(clock.completion_tokens[warm:])
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
