"""Seconds the pipeline's report takes to score fixed summaries with the reward model: one right-padded row
per summary in micro-batches of 8 (the report's code up to 2026-12-07) against each document once with all
its systems' summaries in one shared-prefix row (trainer/report.py `add_reward_scores` now), in one run,
alternating.

    python bench/report_reward.py                       # 16 documents x 8 systems, 2 rounds
    python bench/report_reward.py --documents 32 --systems 4

SmolLM2-135M-Instruct with a seeded untrained 1-label head (scores are not the point, time is), documents
cut to the v2 study's 320 tokens, fp32 on CPU, micro-batches of 8 rows (eval.generation.batch_size: with 8
systems, one document per shared-prefix micro-batch).
Documents: SciTLDR-A validation abstracts from --data (default ../shared/data/scitldr_a, a development
copy beside the project) or ACLSum's test split when that is absent. The systems' summaries are the
reference with 0..systems-1 words added, so they differ in length like real systems' summaries. The
scores of the two layouts are also compared (max |difference|).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = ROOT.parent / "shared" / "data" / "scitldr_a"
    p.add_argument("--data", type=Path, default=default_data if default_data.is_dir() else None)
    p.add_argument("--documents", type=int, default=16)
    p.add_argument("--systems", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from lastmile.config import DataConfig, ModelConfig, PromptConfig
    from lastmile.data.prompts import PromptBuilder
    from lastmile.data.records import load_split
    from lastmile.models import ScalarRewardModel, load_reward_backbone, load_tokenizer, resolve_model_path
    from lastmile.rollout import RolloutModels, fixed_rollout, reward_model_scores
    from lastmile.stages.reward_model import collate_sequences, summary_ids

    torch.set_num_threads(args.threads)
    data = DataConfig(source=str(args.data)) if args.data else DataConfig()
    examples = load_split(data, "validation" if args.data else "test", args.documents)
    model_cfg = ModelConfig()
    path = resolve_model_path(model_cfg.path)
    tokenizer = load_tokenizer(replace(model_cfg, path=path, gguf_file=None, tokenizer_path=None))
    builder = PromptBuilder(tokenizer, PromptConfig(max_document_tokens=320, max_summary_tokens=64))
    rows = [(i, j) for i in range(len(examples)) for j in range(args.systems)]
    prompts = [tuple(builder.prompt_ids(e.document)[0]) for e in examples]
    summaries = [summary_ids(builder, examples[i].summary + " and more" * j) for i, j in rows]
    rollout = fixed_rollout([i for i, _ in rows], [prompts[i] for i, _ in rows], summaries, tokenizer.pad_token_id)
    device = torch.device("cpu")
    backbone, attn = load_reward_backbone(model_cfg, path, device, tokenizer.pad_token_id, seed=0)
    rm = ScalarRewardModel(backbone).eval()
    print(f"{len(examples)} documents ({data.source}) x {args.systems} systems; prompt tokens per document "
          f"{statistics.mean(map(len, prompts)):.0f}, summary tokens {statistics.mean(map(len, summaries)):.1f}; "
          f"attention {attn.implementation}; {args.threads} threads, fp32")
    seqs = [prompts[i] + summaries[r] for r, (i, _) in enumerate(rows)]

    def one_row_per_summary() -> torch.Tensor:  # the report's code up to 2026-12-07, micro-batch by micro-batch
        out = []
        for b in range(0, len(seqs), 8):
            ids, mask = collate_sequences(seqs[b : b + 8], tokenizer.pad_token_id)
            with torch.no_grad():
                out.append(rm(ids, mask))
        return torch.cat(out)

    def shared_prefix() -> torch.Tensor:  # the report's code now
        models = RolloutModels(actor=None, actor_engine=None, ref=None, rm=rm, critic=None, tokenizer=tokenizer,
                               rm_stats={}, device=device, precision="fp32", micro_batch=8, shared_prefix=True)
        return reward_model_scores(rm, rollout, models)

    times: dict[str, list[float]] = {"one row per summary": [], "shared prefix": []}
    scores = {}
    for _ in range(args.rounds):
        for name, score in (("one row per summary", one_row_per_summary), ("shared prefix", shared_prefix)):
            start = time.perf_counter()
            scores[name] = score()
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        each = ", ".join(f"{x:.1f}" for x in t)
        print(f"{name}: median {statistics.median(t):.1f} s for {len(rows)} summaries ({each})")
    ratio = statistics.median(times["one row per summary"]) / statistics.median(times["shared prefix"])
    diff = (scores["one row per summary"] - scores["shared prefix"]).abs().max().item()
    print(f"shared prefix is {ratio:.2f}x one row per summary; max |score difference| {diff:.2e}")


if __name__ == "__main__":
    main()
