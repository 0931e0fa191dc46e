"""The peer side of bench/rl_iteration.py: TRL's GRPOTrainer or RLOOTrainer (trl 1.16) or PPOTrainer (trl 1.7.1).

Runs inside a peer venv (bench/setup_peers.sh), never in the project's:

    bench/venvs/trl-1.16.0/bin/python bench/trl_peer.py --trainer grpo --model DIR --reward-model DIR \
        --prompts prompts.jsonl --prompts-per-step 4 --completions-per-prompt 4 --max-new-tokens 48 --steps 3 --out r.json

Same work per step as ours: the given number of prompts x completions sampled (temperature 1) up to
max-new-tokens, scored by the given 1-label reward model, a KL penalty to a frozen reference, and
one optimizer step over the whole batch (one epoch). fp32 on CPU, as ours is run for this benchmark.
Times every step (time between step ends; the first step from train begin), and reports the process's
peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trainer", choices=["grpo", "rloo", "ppo"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--reward-model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--completions-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    torch.manual_seed(0)
    prompts = [json.loads(x)["prompt"] for x in open(args.prompts, encoding="utf-8") if x.strip()]
    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

    out_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"trl-{args.trainer}-work")
    common = dict(output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, bf16=False,
                  fp16=False, learning_rate=1e-6, seed=0, per_device_train_batch_size=args.micro_batch,
                  gradient_checkpointing=False)  # TRL's default (True) recomputes activations; ours does not
    total = args.prompts_per_step * args.completions_per_prompt
    if args.trainer in ("grpo", "rloo"):  # trl 1.x's RLOOTrainer is GRPOTrainer's loop with the leave-one-out baseline
        Config, Trainer = ((trl.GRPOConfig, trl.GRPOTrainer) if args.trainer == "grpo"
                           else (trl.RLOOConfig, trl.RLOOTrainer))
        cfg = Config(**common, num_generations=args.completions_per_prompt, max_completion_length=args.max_new_tokens,
                     gradient_accumulation_steps=total // args.micro_batch, num_iterations=1, beta=0.05,
                     temperature=1.0, max_steps=args.steps, generation_batch_size=total)
        trainer = Trainer(model=args.model, reward_funcs=args.reward_model, args=cfg,
                          train_dataset=Dataset.from_list([{"prompt": x} for x in prompts]),
                          processing_class=tok, callbacks=[StepTimer()])
    else:
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        assert args.completions_per_prompt == 1, "PPOTrainer samples one completion per prompt"
        cfg = PPOConfig(**common, gradient_accumulation_steps=args.prompts_per_step // args.micro_batch,
                        num_mini_batches=1, num_ppo_epochs=1, total_episodes=args.steps * args.prompts_per_step,
                        local_rollout_forward_batch_size=args.prompts_per_step, response_length=args.max_new_tokens,
                        stop_token="eos", temperature=1.0, kl_coef=0.05, num_sample_generations=0)
        # PPOTrainer masks every pad-id token; SmolLM2 pads with <|im_end|>, which chat prompts contain
        if "<|endoftext|>" in tok.get_vocab():
            tok.pad_token = "<|endoftext|>"
        ids = [tok(x, add_special_tokens=False)["input_ids"] for x in prompts]
        policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        rm = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1, dtype=torch.float32)
        value = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1, dtype=torch.float32)
        trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                             value_model=value, train_dataset=Dataset.from_list([{"input_ids": x} for x in ids]),
                             callbacks=[StepTimer()])
    trainer.train()
    result = {"trainer": f"trl-{args.trainer}", "trl_version": trl.__version__,
              "transformers_version": transformers.__version__, "steps": len(times), "step_seconds": times,
              "prompts_per_step": args.prompts_per_step, "completions_per_step": total,
              "max_new_tokens": args.max_new_tokens,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
