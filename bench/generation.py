"""Generation under ZeRO-3: our hybrid engine vs naive ZeRO-3 `generate` vs one unsharded process.

    python bench/generation.py                      # 2 CPU ranks, SmolLM2-135M-Instruct, ACLSum prompts
    python bench/generation.py --rounds 3 --new-tokens 32 --batch 4

The ZeRO-3 part runs under `deepspeed --num_gpus 2` (one process per rank, OMP_NUM_THREADS=1): in
the same processes it alternates rounds of naive generation (the model stays partitioned, ZeRO-3's
hooks gather every layer for every token, `synced_gpus=True`) and hybrid-engine generation (gather
once, hooks off). The unsharded baseline is one process with 2 threads generating both ranks'
prompts. Greedy tokens must be identical across the three. Prints tokens/s and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _prompts(n: int, max_document_tokens: int):
    from lastmile.config import DataConfig, ModelConfig, PromptConfig
    from lastmile.data.collate import collate_prompts
    from lastmile.data.prompts import PromptBuilder
    from lastmile.data.records import load_split
    from lastmile.models import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    examples = load_split(DataConfig(), "train", n)
    prompts, _ = PromptBuilder(tok, PromptConfig(max_document_tokens=max_document_tokens)).tokenize(
        examples, with_response=False)
    return tok, prompts, collate_prompts


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def worker_zero3(args) -> None:
    import torch

    from lastmile import distributed
    from lastmile.config import ModelConfig, OptimSettings, plan_batches
    from lastmile.hybrid_engine import HybridEngine, Sampling
    from lastmile.models import TokenLogprobModel, load_causal_lm

    dist = distributed.setup()
    tok, prompts, collate = _prompts(args.batch * dist.world_size, args.doc_tokens)
    mine = collate(prompts[dist.rank * args.batch : (dist.rank + 1) * args.batch], tok.pad_token_id)
    optim = OptimSettings(1e-6, 0.0, 0, "constant", 1.0)
    ds = distributed.ds_config_for("zero3", plan_batches(dist.world_size, 1, dist.world_size), optim, hidden_size=576)
    lm, _ = load_causal_lm(ModelConfig(), dist.device, seed=0, ds=ds)
    engine = distributed.build_engine(TokenLogprobModel(lm), ds, optim, total_steps=1)
    hybrid = HybridEngine(engine, lm, ds, dist.device, gather="all", world_size=dist.world_size)
    sampling = Sampling(args.new_tokens, do_sample=False)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    def naive():
        lm.eval()
        with torch.no_grad():
            out = lm.generate(input_ids=mine.prompt_ids, attention_mask=mine.prompt_mask.long(), synced_gpus=True, **kw)
        lm.train()
        return out[:, mine.prompt_ids.shape[1]:]

    def ours():
        with hybrid.generation_mode():
            return lm.generate(input_ids=mine.prompt_ids, attention_mask=mine.prompt_mask.long(), **kw)[
                :, mine.prompt_ids.shape[1]:]

    def ours_gather_only():
        with hybrid.generation_mode():
            pass

    results = {"naive": [], "hybrid": [], "gather_s": []}
    tokens = {}
    for r in range(args.rounds):
        for name, fn in (("naive", naive), ("hybrid", ours)) if r % 2 == 0 else (("hybrid", ours), ("naive", naive)):
            distributed.barrier()
            out, secs = _timed(fn)
            distributed.barrier()
            results[name].append(secs)
            tokens[name] = out.tolist()
        _, g = _timed(ours_gather_only)
        results["gather_s"].append(g)
    # the generation-mode path used by PPO (records log-probs too) gives the same greedy tokens
    with hybrid.generation_mode():
        g = hybrid.generate(mine.prompt_ids, mine.prompt_mask, sampling, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    results["ppo_path_tokens"] = g.response_ids.tolist()
    all_results = distributed.gather_objects({"rank": dist.rank, "times": results, "tokens": tokens, "eos": tok.eos_token_id,
                                              "generated": args.batch * args.new_tokens})
    if dist.is_main:
        Path(args.out).write_text(json.dumps(all_results))


def worker_single(args) -> None:
    import torch

    from lastmile.config import ModelConfig
    from lastmile.models import load_causal_lm

    tok, prompts, collate = _prompts(args.batch * args.world, args.doc_tokens)
    lm, _ = load_causal_lm(ModelConfig(), torch.device("cpu"), seed=0)
    lm.eval()
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    times, tokens = [], []
    for _ in range(args.rounds):
        toks = []

        def run():
            for r in range(args.world):  # each rank's prompts as its own batch, as the ranks generate them
                b = collate(prompts[r * args.batch : (r + 1) * args.batch], tok.pad_token_id)
                with torch.no_grad():
                    toks.append(lm.generate(input_ids=b.prompt_ids, attention_mask=b.prompt_mask.long(), **kw)[
                        :, b.prompt_ids.shape[1]:].tolist())

        _, secs = _timed(run)
        times.append(secs)
        tokens = toks
    Path(args.out).write_text(json.dumps({"times": times, "tokens": tokens,
                                          "generated": args.batch * args.world * args.new_tokens}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["zero3", "single"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="prompts per rank")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--doc-tokens", type=int, default=192)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--out")
    args, _ = p.parse_known_args()
    if args.worker == "zero3":
        return worker_zero3(args)
    if args.worker == "single":
        return worker_single(args)
    tmp = Path(tempfile.mkdtemp(prefix="lastmile-genbench-"))
    common = ["--rounds", str(args.rounds), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens),
              "--doc-tokens", str(args.doc_tokens), "--world", str(args.world)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    subprocess.run(["deepspeed", "--num_gpus", str(args.world), "--master_port", "29561", __file__, "--worker", "zero3",
                    "--out", str(tmp / "zero3.json"), *common], check=True, cwd=ROOT,
                   env={**env, "OMP_NUM_THREADS": "1"})
    subprocess.run([sys.executable, __file__, "--worker", "single", "--out", str(tmp / "single.json"), *common],
                   check=True, cwd=ROOT, env={**env, "OMP_NUM_THREADS": str(args.world)})
    z = json.loads((tmp / "zero3.json").read_text())
    s = json.loads((tmp / "single.json").read_text())
    report(z, s, args)


def _agrees_until_eos(forced: list[int], stopped: list[int], eos: int) -> bool:
    """`forced` ran to the length limit (min_new_tokens), `stopped` ends at its first EOS: equal up to there."""
    n = stopped.index(eos) if eos in stopped else len(stopped)
    return forced[:n] == stopped[:n]


def report(z: list[dict], s: dict, args) -> None:
    import statistics

    total = sum(r["generated"] for r in z)
    rate = {name: total / statistics.median([max(r["times"][name][i] for r in z) for i in range(args.rounds)])
            for name in ("naive", "hybrid")}
    rate["single"] = s["generated"] / statistics.median(s["times"])
    same = all(r["tokens"]["naive"] == r["tokens"]["hybrid"] == s["tokens"][r["rank"]] for r in z)
    ppo_same = all(_agrees_until_eos(full, ppo, r["eos"])
                   for r in z for full, ppo in zip(r["tokens"]["hybrid"], r["times"]["ppo_path_tokens"]))
    gather = statistics.median([g for r in z for g in r["times"]["gather_s"]])
    print(f"\nGeneration, SmolLM2-135M-Instruct, {args.world} CPU ranks x {args.batch} prompts, {args.new_tokens} new "
          f"tokens, greedy, median of {args.rounds} rounds (alternating)")
    print(f"{'path':<34}{'tokens/s (all ranks)':>22}{'vs naive':>10}{'vs unsharded':>14}")
    for name, label in (("naive", "naive ZeRO-3 generate"), ("hybrid", "hybrid engine (gather once)"),
                        ("single", f"one unsharded process, {args.world} threads")):
        print(f"{label:<34}{rate[name]:>22.1f}{rate[name] / rate['naive']:>9.2f}x{rate[name] / rate['single']:>13.2f}x")
    print(f"gather + hooks off/on per rollout: {gather:.3f} s; identical greedy tokens (naive, hybrid, unsharded): "
          f"{same}; PPO generation path agrees: {ppo_same}")


if __name__ == "__main__":
    main()
