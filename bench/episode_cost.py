"""Seconds per episode (one sampled response) of a whole PPO iteration, with the time of each phase.

    python bench/episode_cost.py                      # gae, rloo (k=4), grpo (k=4); before and after
    python bench/episode_cost.py --estimators grpo --rounds 2 --steps 4

The study's setting: SmolLM2-135M-Instruct, documents cut to 320 tokens, responses up to 64 new
tokens, 16 episodes per iteration (gae: 16 prompts x 1; rloo and grpo: 4 prompts x 4), one epoch over
the rollout in one minibatch of micro-batches of 4, fp32 on CPU, an untrained 1-label reward model
from the same backbone (seeded). Documents: SciTLDR-A training abstracts from --data (default
../shared/data/scitldr_a, a development copy beside the project) or ACLSum when that is absent.

Each estimator runs as `before` (`ppo.old_logprobs=forward`: a separate training-mode forward for the
old log-probs, and `ppo.shared_prefix=false`: every sample's row holds its own copy of the prompt, as
every version up to 2026-12-06 did) and `after` (the defaults), alternating in one
process tree, the order rotated each round. Per run the first iteration is warm-up and dropped; the
table shows medians over the rest and the rounds. Phases are the `time/*_s` metrics of
ppo/history.json: generation, reward (reward model + metric), old_logprobs, reference, critic_values,
actor_update, critic_update, logging; `other` is the rest of the iteration.
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
PHASES = ("generation", "reward", "old_logprobs", "reference", "critic_values", "actor_update", "critic_update",
          "logging")
SHAPES = {"gae": (16, 1), "rloo": (4, 4), "grpo": (4, 4)}
VARIANTS = {"before": ["ppo.old_logprobs=forward", "ppo.shared_prefix=false"], "after": []}


def prepare(work: Path, data: Path | None, n: int) -> dict:
    """The model, a seeded untrained reward model, and a data folder of `n` documents (all splits alike)."""
    from rl_iteration import untrained_reward_model  # bench/ is this script's folder, first on sys.path

    from lastmile.config import DataConfig, ModelConfig
    from lastmile.data.records import load_split
    from lastmile.models import load_tokenizer, resolve_model_path

    model = resolve_model_path("smollm2-135m-instruct")
    rm_dir = untrained_reward_model(work, model, load_tokenizer(ModelConfig()))
    source = DataConfig(source=str(data), references_field=None) if data else DataConfig()
    examples = load_split(source, "train", n)
    folder = work / "data"
    folder.mkdir(exist_ok=True)
    rows = "".join(json.dumps({"id": e.id, "document": e.document, "summary": e.summary}) + "\n" for e in examples)
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text(rows, encoding="utf-8")
    return {"model": model, "reward_model": str(rm_dir), "data": str(folder), "source": str(data or "aclsum")}


def run_once(estimator: str, variant: str, inputs: dict, args, out: Path) -> dict:
    prompts, k = SHAPES[estimator]
    overrides = [
        f"output_dir={out}", "precision=fp32", "tracking.enabled=false", f"data.source={inputs['data']}",
        "data.references_field=null", "data.eval_split=test", "data.dev_split=validation",
        f"prompt.max_document_tokens={args.doc_tokens}", f"ppo.init={inputs['model']}",
        f"ppo.reward.model={inputs['reward_model']}", f"ppo.iterations={args.steps}",
        f"ppo.prompts_per_iteration={prompts}", f"ppo.samples_per_prompt={k}", f"ppo.minibatch_size={prompts * k}",
        f"ppo.micro_batch_size={args.micro_batch}", "ppo.epochs=1", f"ppo.max_new_tokens={args.max_new_tokens}",
        f"ppo.advantage={estimator}", "ppo.eval_every=0", "ppo.eval_examples=1", "ppo.save_every=0",
        "ppo.lr=1e-6", *VARIANTS[variant],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, "-m", "lastmile", "ppo", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lastmile ppo ({estimator}, {variant}) failed:\n{proc.stderr[-3000:]}")
    history = json.loads((out / "ppo" / "history.json").read_text())["history"]
    return {"iterations": history, "episodes": prompts * k}


def summarize(runs: list[dict]) -> dict[str, float]:
    """Medians over rounds of each run's median (warm-up iteration dropped), per phase and in all."""
    def med(key: str) -> float:
        per_run = [statistics.median(h.get(key, 0.0) for h in (r["iterations"][1:] or r["iterations"])) for r in runs]
        return statistics.median(per_run)

    out = {p: med(f"time/{p}_s") for p in PHASES}
    out["iteration"] = med("time/iteration_s")
    out["other"] = out["iteration"] - sum(out[p] for p in PHASES)
    out["tokens"] = med("rollout/response_tokens_mean")
    out["per_episode"] = out["iteration"] / runs[0]["episodes"]
    return out


def report(results: dict[tuple[str, str], list[dict]], args, inputs: dict) -> None:
    print(f"\nPPO iteration cost, SmolLM2-135M-Instruct, fp32, {args.threads} threads, documents from "
          f"{inputs['source']} cut to {args.doc_tokens} tokens, up to {args.max_new_tokens} new tokens, "
          f"{args.rounds} round(s) x {args.steps} iterations (first dropped)")
    cols = ("s/episode", "s/iter", "tokens") + PHASES + ("other",)
    print(f"{'estimator':<10}{'variant':<8}" + "".join(f"{c:>14}" for c in cols))
    rows = {}
    for (est, var), runs in results.items():
        s = rows[(est, var)] = summarize(runs)
        vals = (s["per_episode"], s["iteration"], s["tokens"]) + tuple(s[p] for p in PHASES) + (s["other"],)
        print(f"{est:<10}{var:<8}" + "".join(f"{v:>14.2f}" for v in vals))
    for est in dict.fromkeys(e for e, _ in results):
        if (est, "before") in rows and (est, "after") in rows:
            speed = rows[(est, "before")]["per_episode"] / rows[(est, "after")]["per_episode"]
            print(f"{est}: after is {speed:.2f}x before (seconds per episode)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = ROOT.parent / "shared" / "data" / "scitldr_a"
    p.add_argument("--data", type=Path, default=default_data if default_data.is_dir() else None)
    p.add_argument("--estimators", default="gae,rloo,grpo")
    p.add_argument("--variants", default="before,after")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="iterations per run; the first is warm-up")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--doc-tokens", type=int, default=320)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="lastmile-episode-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = prepare(work, args.data, 64)
    jobs = [(e, v) for e in args.estimators.split(",") for v in args.variants.split(",")]
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        order = jobs[r % len(jobs):] + jobs[: r % len(jobs)]
        for est, var in order:
            res = run_once(est, var, inputs, args, work / f"round{r}" / f"{est}-{var}")
            results.setdefault((est, var), []).append(res)
            secs = [h["time/iteration_s"] for h in res["iterations"]]
            print(f"round {r} {est} {var}: {['%.1f' % s for s in secs]} s/iteration", flush=True)
    (work / "results.json").write_text(json.dumps({f"{e}-{v}": x for (e, v), x in results.items()}, indent=1))
    report(results, args, inputs)


if __name__ == "__main__":
    main()
