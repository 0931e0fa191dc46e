"""One RL iteration (rollout + scoring + update): lastmile PPO vs TRL GRPOTrainer, RLOOTrainer and PPOTrainer.

    bash bench/setup_peers.sh                      # once: venvs with trl 1.16.0 and trl 1.7.1
    python bench/rl_iteration.py --rounds 2 --steps 3

SmolLM2-135M-Instruct (the offline default), prompts from ACLSum training papers (the same text for
every trainer), an untrained 1-label reward model built from the same backbone (seeded, shared by
all), fp32 on CPU. Like for like:
- vs TRL GRPO: 4 prompts x 4 completions, up to 48 new tokens, one optimizer step over the 16, KL to a
  frozen reference; ours with `ppo.advantage=grpo` (critic-free, same group estimator).
- vs TRL RLOO (1.16): the same work with the leave-one-out baseline; ours with `ppo.advantage=rloo`.
- vs TRL PPO: 16 prompts x 1 completion, critic initialized from the reward model, one PPO epoch as one
  optimizer step; ours with `ppo.advantage=gae`.
Runs alternate (ours, GRPO peer, ours, PPO peer per round, the order rotating); each reports its own
per-iteration times (the first iteration is warm-up and dropped) and its peak RSS. Prints seconds
per iteration, prompts/s and the ratios (speed-up = peer seconds / ours; memory = ours / peer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / "bench" / "venvs"
PEERS = {"grpo": "trl-1.16.0", "rloo": "trl-1.16.0", "ppo": "trl-1.7.1"}
GROUP = ("grpo", "rloo")  # critic-free: prompts x completions; ppo: prompts*completions x 1


def untrained_reward_model(work: Path, model: str, tok) -> Path:
    """A seeded, untrained 1-label reward model from the backbone `model`, with neutral statistics,
    in work/reward_model (made once): the same reward signal for every trainer a bench compares."""
    import torch
    from transformers import AutoModelForSequenceClassification

    rm_dir = work / "reward_model"
    if not (rm_dir / "config.json").is_file():
        torch.manual_seed(0)
        rm = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
        rm.config.pad_token_id = tok.pad_token_id
        rm.save_pretrained(rm_dir)
        tok.save_pretrained(rm_dir)
        (rm_dir / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    return rm_dir


def prepare(work: Path, n_prompts: int, doc_tokens: int) -> dict:
    """Model folder, shared reward model, prompts (text for TRL, a data folder for us)."""
    from lastmile.config import DataConfig, ModelConfig, PromptConfig
    from lastmile.data.prompts import PromptBuilder
    from lastmile.data.records import load_split
    from lastmile.models import load_tokenizer, resolve_model_path

    model = resolve_model_path("smollm2-135m-instruct")
    tok = load_tokenizer(ModelConfig())
    rm_dir = untrained_reward_model(work, model, tok)
    examples = load_split(DataConfig(), "train", n_prompts)
    builder = PromptBuilder(tok, PromptConfig(max_document_tokens=doc_tokens))
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": builder.prompt_text(e.document)[0]}) + "\n"
                                                for e in examples), encoding="utf-8")
    data = work / "data"
    data.mkdir(exist_ok=True)
    rows = "".join(json.dumps({"id": e.id, "document": e.document, "summary": e.summary}) + "\n" for e in examples)
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text(rows, encoding="utf-8")
    return {"model": model, "reward_model": str(rm_dir), "prompts": str(work / "prompts.jsonl"), "data": str(data)}


def run_ours(kind: str, inputs: dict, args, out: Path) -> dict:
    prompts, samples = (args.prompts, args.completions) if kind in GROUP else (args.prompts * args.completions, 1)
    overrides = [
        f"output_dir={out}", "precision=fp32", "tracking.enabled=false", f"data.source={inputs['data']}",
        "data.references_field=null", "data.eval_split=test", "data.dev_split=validation",
        f"prompt.max_document_tokens={args.doc_tokens}", f"ppo.init={inputs['model']}",
        f"ppo.reward.model={inputs['reward_model']}", "ppo.reward.metric=none", "ppo.reward.length_penalty=0",
        "ppo.reward.no_eos_penalty=0", f"ppo.iterations={args.steps}", f"ppo.prompts_per_iteration={prompts}",
        f"ppo.samples_per_prompt={samples}", f"ppo.minibatch_size={prompts * samples}",
        f"ppo.micro_batch_size={args.micro_batch}", "ppo.epochs=1", f"ppo.max_new_tokens={args.max_new_tokens}",
        f"ppo.advantage={kind if kind in GROUP else 'gae'}", "ppo.kl_coef=0.05", "ppo.eval_every=0",
        "ppo.eval_examples=1", "ppo.save_every=0", "ppo.lr=1e-6", "ppo.whiten_advantages=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, "-m", "lastmile", "ppo", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lastmile ppo failed:\n{proc.stderr[-3000:]}")
    history = json.loads((out / "ppo" / "history.json").read_text())["history"]
    return {"trainer": f"lastmile-{kind}", "step_seconds": [h["time/iteration_s"] for h in history],
            "peak_rss_gb": max(h["perf/peak_rss_gb"] for h in history), "prompts_per_step": prompts,
            "completions_per_step": prompts * samples,
            "mean_completion_tokens": statistics.mean(h["rollout/response_tokens_mean"] for h in history)}


def run_peer(kind: str, inputs: dict, args, out: Path) -> dict:
    python = VENVS / PEERS[kind] / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python} is missing. Run `bash bench/setup_peers.sh` first.")
    prompts, completions = (args.prompts, args.completions) if kind in GROUP else (args.prompts * args.completions, 1)
    result = out / "result.json"
    cmd = [str(python), str(ROOT / "bench" / "trl_peer.py"), "--trainer", kind, "--model", inputs["model"],
           "--reward-model", inputs["reward_model"], "--prompts", inputs["prompts"], "--prompts-per-step",
           str(prompts), "--completions-per-prompt", str(completions), "--max-new-tokens", str(args.max_new_tokens),
           "--steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--out", str(result)]
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{PEERS[kind]} {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="iterations per run; the first is warm-up")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--completions", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--doc-tokens", type=int, default=192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peers", default="grpo,rloo,ppo")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="lastmile-rlbench-"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = prepare(work, 32, args.doc_tokens)
    peers = [k for k in args.peers.split(",") if k]
    results: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        jobs = [(f"ours-{k}", k) for k in peers if not args.skip_ours] + [(f"trl-{k}", k) for k in peers]
        jobs = jobs[r % len(jobs):] + jobs[: r % len(jobs)]  # rotate the order every round
        for name, kind in jobs:
            out = work / f"round{r}" / name
            res = run_ours(kind, inputs, args, out) if name.startswith("ours") else run_peer(kind, inputs, args, out)
            results.setdefault(name, []).append(res)
            print(f"round {r} {name}: {['%.1f' % s for s in res['step_seconds']]} s/iteration, "
                  f"peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    def seconds(name):  # median over rounds of the per-run median, warm-up iteration dropped
        return statistics.median(statistics.median(r["step_seconds"][1:] or r["step_seconds"]) for r in results[name])

    def rss(name):
        return max(r["peak_rss_gb"] for r in results[name])

    print(f"\nOne RL iteration on SmolLM2-135M-Instruct, 2 CPU threads, fp32, {args.max_new_tokens} new tokens, "
          f"{args.rounds} alternating rounds x {args.steps} iterations (first dropped)")
    print(f"{'trainer':<14}{'prompts':>8}{'compl.':>8}{'s/iter':>9}{'prompts/s':>11}{'peak RSS GB':>13}"
          f"{'speed-up':>10}{'memory':>8}")
    for kind in [k for k in ("grpo", "rloo", "ppo") if f"trl-{k}" in results]:
        for name in (f"ours-{kind}", f"trl-{kind}"):
            if name not in results:
                continue
            r0 = results[name][0]
            s = seconds(name)
            ratio = ""
            if name.startswith("trl") and f"ours-{kind}" in results:
                ratio = f"{s / seconds(f'ours-{kind}'):>9.2f}x{rss(f'ours-{kind}') / rss(name):>7.2f}x"
            print(f"{name:<14}{r0['prompts_per_step']:>8}{r0['completions_per_step']:>8}{s:>9.1f}"
                  f"{r0['prompts_per_step'] / s:>11.3f}{rss(name):>13.2f}{ratio}")
    print("speed-up = peer s/iteration / ours; memory = our peak RSS / the peer's (lower is better)")


if __name__ == "__main__":
    main()
