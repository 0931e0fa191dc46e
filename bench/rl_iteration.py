"""One RL iteration (rollout + scoring + update): lastmile PPO vs TRL's GRPOTrainer and PPOTrainer.

    bash bench/setup_peers.sh                                        # once: the two TRL venvs
    .venv/bin/python bench/rl_iteration.py --rounds 3 --steps 4 --out runs/rl_iteration
    .venv/bin/python bench/rl_iteration.py --skip-ours --rounds 1 --steps 1 \
        --prompts-per-step 2 --completions-per-prompt 2 --max-new-tokens 8 --out /tmp/rlbench   # smoke

The same work for every trainer, on SmolLM2-135M-Instruct (the offline default), fp32 on CPU:
prompts_per_step ACLSum training papers as chat prompts (documents cut to 256 tokens), each sampled
completions_per_prompt times at temperature 1 up to max_new_tokens, scored by one shared 1-label
reward model (the policy's backbone with a seeded, untrained head), a KL penalty to a frozen
reference (--kl-coef), then one optimizer step over all completions (one epoch, one minibatch,
micro-batches of --micro-batch). The peers, each in its own venv (bench/trl_peer.py):
- trl-grpo: trl 1.16.0 `GRPOTrainer` (critic-free, group-normalised rewards);
- trl-ppo:  trl 1.7.1 `trl.experimental.ppo.PPOTrainer` (critic initialised from the reward model).
Runs alternate: every round runs ours and each peer once, the order rotating by one each round, so
drift on the machine spreads over all of them. Each run drops its first iteration as warm-up when it
has more than one. Reported: seconds per iteration (median over the timed iterations of all rounds),
prompts/s, peak RSS (the largest over rounds), and ours against each peer: speed-up = peer s / ours s,
memory = ours RSS / peer RSS.

This module runs in the project venv and never imports trl; the peers run as subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_VENVS = {"grpo": ROOT / "bench" / "venvs" / "trl-1.16.0", "ppo": ROOT / "bench" / "venvs" / "trl-1.7.1"}
DOCUMENT_TOKENS = 256


@dataclass(frozen=True)
class SharedInputs:
    """What every trainer reads, prepared once per --out folder (written there as inputs.json)."""

    model: str  # the policy and reference: a Hugging Face folder
    reward_model: str  # 1-label AutoModelForSequenceClassification folder, with the tokenizer
    prompts: str  # JSONL of {"prompt": chat-formatted text}, in the order every trainer uses them
    data: str  # the same papers as a lastmile data folder ({train,validation,test}.jsonl), for ours

    @classmethod
    def load(cls, out: Path) -> SharedInputs:
        return cls(**json.loads((out / "inputs.json").read_text()))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="iterations per run; the first is warm-up when > 1")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--completions-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--micro-batch", type=int, default=4, help="completions per forward/backward pass")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision for every trainer (default fp32)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="activation checkpointing in the peers (TRL's default; ours has none, so off)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    p.add_argument("--peers", default="grpo,ppo", help="comma-separated subset of grpo,ppo")
    p.add_argument("--skip-ours", action="store_true", help="run the peers only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "rl_iteration")
    args = p.parse_args()
    args.peers = [k for k in args.peers.split(",") if k]
    args.out = args.out.resolve()
    problems = [f"--{name.replace('_', '-')} ({getattr(args, name)}) must be at least 1." for name in
                ("rounds", "steps", "prompts_per_step", "completions_per_prompt", "max_new_tokens", "micro_batch",
                 "threads") if getattr(args, name) < 1]
    unknown = [k for k in args.peers if k not in PEER_VENVS]
    if unknown or not args.peers:
        problems.append(f"--peers ({','.join(args.peers)}) must name one or more of {','.join(PEER_VENVS)}.")
    completions = args.prompts_per_step * args.completions_per_prompt
    if args.micro_batch >= 1 and completions % args.micro_batch:
        problems.append(f"--micro-batch ({args.micro_batch}) does not divide the {completions} completions of an "
                        "iteration. One optimizer step must consume exactly one iteration. Pick a divisor.")
    missing = [str(PEER_VENVS[k]) for k in args.peers
               if k in PEER_VENVS and not (PEER_VENVS[k] / "bin" / "python").is_file()]
    if missing:
        problems.append(f"peer venv(s) {', '.join(missing)} missing. The peers need their own trl. "
                        "Run `bash bench/setup_peers.sh`.")
    if problems:
        p.error("\n".join(problems))
    return args


def prepare(args: argparse.Namespace) -> SharedInputs:
    """The model folder, the shared reward model and the prompts, written under --out."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainer.config import DataConfig, PromptConfig
    from trainer.data.prompts import PromptBuilder
    from trainer.data.records import load_split
    from trainer.models import resolve_model_path

    out = args.out
    model = resolve_model_path("smollm2-135m-instruct")  # converts the GGUF once into ~/.cache/lastmile/models
    tok = AutoTokenizer.from_pretrained(model)
    rm_dir = out / "reward_model"
    if not (rm_dir / "model.safetensors").is_file():
        torch.manual_seed(args.seed)  # the new score head is the only random part
        rm = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
        rm.config.pad_token_id = tok.pad_token_id
        rm.save_pretrained(rm_dir)
        tok.save_pretrained(rm_dir)  # GRPOTrainer loads the reward model's tokenizer from its folder
        (rm_dir / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))  # unnormalised scores
    papers = load_split(DataConfig(), "train", args.steps * args.prompts_per_step)
    if len(papers) < args.steps * args.prompts_per_step:
        print(f"note: ACLSum train has {len(papers)} papers; the prompts repeat after them", flush=True)
    builder = PromptBuilder(tok, PromptConfig(max_document_tokens=DOCUMENT_TOKENS))
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": builder.prompt_text(e.document)[0]}) + "\n" for e in papers),
                       encoding="utf-8")
    data = out / "data"
    data.mkdir(exist_ok=True)
    rows = "".join(json.dumps({"id": e.id, "document": e.document, "summary": e.summary}) + "\n" for e in papers)
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text(rows, encoding="utf-8")
    inputs = SharedInputs(model=model, reward_model=str(rm_dir), prompts=str(prompts), data=str(data))
    (out / "inputs.json").write_text(json.dumps(asdict(inputs), indent=1))
    return inputs


def run_ours(args: argparse.Namespace, workdir: Path) -> dict:
    """lastmile PPO on the shared inputs (`SharedInputs.load(args.out)`), results like a peer's.

    Returns {"trainer": "ours", "step_seconds": [timed iterations, warm-up dropped], "prompts_per_step",
    "completions_per_step", "max_new_tokens", "peak_rss_gb", and "mean_completion_tokens" if known}.
    """
    raise NotImplementedError(
        "run_ours is not written yet: it should run `lastmile ppo` with overrides that match the peers "
        "(shared model, reward model and data from SharedInputs.load(args.out); --prompts-per-step, "
        "--completions-per-prompt, --max-new-tokens, --micro-batch, --lr, --kl-coef, --bf16, one epoch) and return "
        "its per-iteration seconds and peak RSS. Until then, run with --skip-ours.")


def run_peer(kind: str, args: argparse.Namespace, inputs: SharedInputs, workdir: Path) -> dict:
    """bench/trl_peer.py in its venv; its log goes to workdir/peer.log."""
    workdir.mkdir(parents=True, exist_ok=True)
    result, log = workdir / "result.json", workdir / "peer.log"
    cmd = [str(PEER_VENVS[kind] / "bin" / "python"), str(ROOT / "bench" / "trl_peer.py"), "--trainer", kind,
           "--model", inputs.model, "--reward-model", inputs.reward_model, "--prompts", inputs.prompts,
           "--prompts-per-step", str(args.prompts_per_step), "--completions-per-prompt",
           str(args.completions_per_prompt), "--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.steps),
           "--micro-batch", str(args.micro_batch), "--lr", str(args.lr), "--kl-coef", str(args.kl_coef),
           "--seed", str(args.seed), "--out", str(result), *(["--bf16"] if args.bf16 else []),
           *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    with log.open("w") as f:
        code = subprocess.run(cmd, check=False, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"trl-{kind} failed (exit code {code}); the end of {log}:\n{tail}")
    return json.loads(result.read_text())


def run_rounds(args: argparse.Namespace, inputs: SharedInputs) -> dict[str, list[dict]]:
    names = ([] if args.skip_ours else ["ours"]) + [f"trl-{k}" for k in args.peers]
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            workdir = args.out / f"round{r}" / name
            try:
                res = run_ours(args, workdir) if name == "ours" else run_peer(name[4:], args, inputs, workdir)
            except NotImplementedError as e:
                sys.exit(str(e))
            results[name].append(res)
            print(f"round {r} {name}: {', '.join(f'{s:.1f}' for s in res['step_seconds'])} s/iteration, "
                  f"peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)
    return results


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    rows = {}
    for name, runs in results.items():
        seconds = statistics.median(s for r in runs for s in r["step_seconds"])
        tokens = [r["mean_completion_tokens"] for r in runs if r.get("mean_completion_tokens") is not None]
        rows[name] = {"version": runs[0].get("trl_version", "lastmile"), "prompts": runs[0]["prompts_per_step"],
                      "completions": runs[0]["completions_per_step"], "seconds_per_iteration": seconds,
                      "prompts_per_second": runs[0]["prompts_per_step"] / seconds,
                      "mean_completion_tokens": statistics.mean(tokens) if tokens else None,
                      "peak_rss_gb": max(r["peak_rss_gb"] for r in runs)}
    if "ours" in rows:
        ours = rows["ours"]
        for name, row in rows.items():
            if name != "ours":
                row["speed_up"] = row["seconds_per_iteration"] / ours["seconds_per_iteration"]
                row["memory_ratio"] = ours["peak_rss_gb"] / row["peak_rss_gb"]
    return rows


def print_table(rows: dict[str, dict], args: argparse.Namespace) -> None:
    precision = "bf16" if args.bf16 else "fp32"
    print(f"\nOne RL iteration, SmolLM2-135M-Instruct, {precision}, {args.threads} threads, {args.prompts_per_step} "
          f"prompts x {args.completions_per_prompt} completions, up to {args.max_new_tokens} new tokens; "
          f"{args.rounds} alternating round(s) x {args.steps} iteration(s)"
          f"{' (the first dropped)' if args.steps > 1 else ''}")
    print(f"{'trainer':<10}{'version':>9}{'s/iter':>9}{'prompts/s':>11}{'compl. tok':>12}{'peak RSS GB':>13}"
          f"{'speed-up':>10}{'memory':>8}")
    for name, row in rows.items():
        tokens = f"{row['mean_completion_tokens']:.1f}" if row["mean_completion_tokens"] is not None else "-"
        ratios = f"{'-':>10}{'-':>8}"
        if "speed_up" in row:
            ratios = f"{row['speed_up']:>9.2f}x{row['memory_ratio']:>7.2f}x"
        print(f"{name:<10}{row['version']:>9}{row['seconds_per_iteration']:>9.2f}{row['prompts_per_second']:>11.3f}"
              f"{tokens:>12}{row['peak_rss_gb']:>13.2f}{ratios}")
    print("speed-up = peer s/iteration / ours (above 1: ours is faster); memory = ours peak RSS / peer's (below 1: "
          "ours uses less)")


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = prepare(args)
    results = run_rounds(args, inputs)
    rows = summarize(results)
    (args.out / "results.json").write_text(json.dumps({"runs": results, "summary": rows}, indent=1))
    print_table(rows, args)


if __name__ == "__main__":
    main()
