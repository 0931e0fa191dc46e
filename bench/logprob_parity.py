"""How far apart are the log-probs recorded while sampling and the training forward's, in fp32 and bf16,
and how far apart would a real bug put them? Grounds `ppo.parity_bound`.

    python bench/logprob_parity.py --config trainer/configs/demo.yaml --model runs/demo/sft/model

Samples `--prompts` dev prompts x `--samples` responses at each `--temperatures` with PPO's own code
(`rollout.sample` through the hybrid engine's KV-cached generation), then runs PPO's training-mode
forward on the same tokens (`rollout.response_logprobs`), and prints per precision and temperature the
mean and max |generation - training| log-prob per response token for:
- `correct`: the forward PPO runs (logits / T);
- `T forgotten`: a bug, the forward at T = 1 while sampling was at T;
- `one token off`: a bug, each token compared with the training log-prob of the token after it.
bf16 is DeepSpeed's bf16 layout (bf16 weights) under bf16 autocast, as PPO runs it. The training
forward here is the no-grad one PPO runs with `ppo.old_logprobs=forward` (with `update`, PPO compares
against the update's own forward instead). Reads
`data.dev_split` only. bf16 needs a device that computes it natively (elsewhere it is emulated, ~12x slower).
"""

from __future__ import annotations

import argparse

import torch

from lastmile import distributed
from lastmile.config import load_config
from lastmile.data.prompts import PromptBuilder
from lastmile.data.records import load_split
from lastmile.hybrid_engine import HybridEngine, Sampling
from lastmile.models import TokenLogprobModel, load_causal_lm, load_tokenizer
from lastmile.rollout import RolloutModels, response_logprobs, sample
from lastmile.stages.ppo_setup import uses_shared_prefix


def gaps(gen: torch.Tensor, train: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """gen, train, mask (B, R) -> (mean, max) of |gen - train| over the masked tokens."""
    d = (gen - train).abs()[mask]
    return float(d.mean()), float(d.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", default=None, help="a causal LM folder (default: the config's model.path)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    device = torch.device("cpu")
    tok = load_tokenizer(cfg.model)
    examples = load_split(cfg.data, cfg.data.dev_split, args.prompts)
    prompts, _ = PromptBuilder(tok, cfg.prompt).tokenize(examples, with_response=False)
    rows = [p for p in prompts for _ in range(args.samples)]
    idx = [i for i in range(len(prompts)) for _ in range(args.samples)]
    print(f"{args.model or cfg.model.path}: {len(prompts)} prompts of {cfg.data.dev_split} x {args.samples} samples, "
          f"up to {cfg.ppo.max_new_tokens} new tokens; CPU bf16 native: {distributed.cpu_has_native_bf16()}")
    print("| precision | T | tokens | correct: mean | correct: max | T forgotten: mean | T forgotten: max "
          "| one token off: mean | one token off: max |")
    print("|---|---|---|---|---|---|---|---|---|")
    for precision in args.precisions:
        ds = {"bf16": {"enabled": precision == "bf16"}}
        lm, attn = load_causal_lm(cfg.model, device, seed=cfg.seed, path=args.model, ds=ds)
        models = RolloutModels(actor=HybridEngine(None, lm, {}, device), actor_engine=None, ref=None, rm=None,
                               critic=None, tokenizer=tok, rm_stats={}, device=device, precision=precision,
                               micro_batch=cfg.ppo.micro_batch_size,
                               shared_prefix=uses_shared_prefix(cfg.ppo, attn.implementation))
        scorer = TokenLogprobModel(lm, logprob_impl=cfg.ppo.logprob_impl).eval()
        for t in args.temperatures:
            torch.manual_seed(cfg.seed)
            r = sample(models, rows, idx, Sampling(cfg.ppo.max_new_tokens, True, t, cfg.ppo.top_p), batch_size=len(rows))
            right = response_logprobs(scorer, r, models, temperature=t)
            wrong_t = response_logprobs(scorer, r, models, temperature=1.0)
            m = r.response_mask
            shifted = gaps(r.gen_logprobs[:, :-1], right[:, 1:], m[:, 1:] & m[:, :-1])
            cells = [*gaps(r.gen_logprobs, right, m), *gaps(r.gen_logprobs, wrong_t, m), *shifted]
            print(f"| {precision} | {t} | {int(m.sum())} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
        del lm, models, scorer


if __name__ == "__main__":
    main()
