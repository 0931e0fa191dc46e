"""One PPO iteration of a ~1B-parameter Llama on CPU ranks under ZeRO-3, with a LoRA actor.

    python bench/ppo_1b_cpu.py                 # 2 ranks (deepspeed launcher), results in /tmp/lastmile-1b
    python bench/ppo_1b_cpu.py --ranks 1 --work /tmp/one

The model: Llama-3.2-1B's shape with SmolLM2's vocabulary (1.07B parameters; random weights, written
once in bf16 and loaded in fp32, partitioned across the ranks while loading). The actor trains LoRA
adapters (ppo.lora.r=16): the frozen base is partitioned, AdamW holds the adapters only, and the
reference is the actor with its adapters off. Generation gathers one layer at a time
(deepspeed.generation_gather=layer), so no rank ever holds the whole model. The reward model is a
small random scorer that reads the same tokens (what is measured is the machinery, not quality).
Critic-free (rloo, 2 samples per prompt), one prompt per rank, 16 new tokens, documents cut to 64
tokens; ACLSum's papers. Prints the wall time, the iteration's phase times and rank 0's peak memory
per phase (ppo/history.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16)


def write_models(work: Path) -> tuple[Path, Path, int]:
    """(actor folder, reward-model folder, actor parameters): random weights from SmolLM2's config."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lastmile.config import ModelConfig
    from lastmile.models import load_tokenizer, model_config

    tokenizer = load_tokenizer(ModelConfig())
    actor, rm = work / "actor", work / "rm"
    if not (actor / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        cfg = model_config(ModelConfig(config_overrides=LLAMA_1B))
        lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)  # this setup's one whole copy, 2 GB
        lm.save_pretrained(actor)
        tokenizer.save_pretrained(actor)
        del lm
    if not (rm / "config.json").is_file():
        torch.manual_seed(0)
        cfg = model_config(ModelConfig(config_overrides=SMALL))
        cfg.num_labels, cfg.pad_token_id = 1, tokenizer.pad_token_id
        AutoModelForSequenceClassification.from_config(cfg).save_pretrained(rm)
        tokenizer.save_pretrained(rm)
        (rm / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    from transformers import AutoConfig

    from lastmile.memory_plan import ModelShape

    return actor, rm, ModelShape.from_hf_config(AutoConfig.from_pretrained(actor)).params


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/lastmile-1b"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    actor, rm, params = write_models(args.work)
    prepare_s = time.perf_counter() - t0
    out = args.work / f"run-{args.ranks}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"output_dir={out}", "precision=fp32", "deepspeed.config=zero3", "deepspeed.generation_gather=layer",
                 f"ppo.init={actor}", f"ppo.reward.model={rm}", "ppo.lora.r=16", "ppo.lora.alpha=32",
                 "ppo.advantage=rloo", "ppo.iterations=1", f"ppo.prompts_per_iteration={args.ranks}",
                 "ppo.samples_per_prompt=2", f"ppo.minibatch_size={2 * args.ranks}", "ppo.micro_batch_size=1",
                 "ppo.max_new_tokens=16", "prompt.max_document_tokens=64", "ppo.eval_every=0",
                 f"ppo.eval_examples={args.ranks}", "ppo.save_every=0", "data.max_train_examples=8",
                 "tracking.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.ranks)),
           "DS_ACCELERATOR": "cpu"}
    cmd = ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", "29531", "trainer/main.py", "ppo",
           "--config", "trainer/configs/demo.yaml", *overrides]
    t1 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t1
    (out / "launch.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    print(f"actor {params / 1e9:.2f}B parameters, {args.ranks} CPU rank(s), ZeRO-3, LoRA r=16; setup {prepare_s:.0f} s")
    if proc.returncode != 0:
        print(f"FAILED (exit {proc.returncode}) after {wall:.0f} s; log: {out / 'launch.log'}")
        print((proc.stdout + proc.stderr)[-3000:])
        return 1
    (h,) = json.loads((out / "ppo" / "history.json").read_text())["history"]
    print(f"lastmile ppo wall (launch, load, one iteration, final evaluation, save): {wall:.0f} s")
    print(f"iteration {h['time/iteration_s']:.1f} s, trained {h.get('policy/loss', float('nan')):.4f} loss")
    for k in sorted(h):
        if k.startswith(("time/", "mem/")):
            print(f"  {k} {h[k]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
