"""Greedy decoding of one model in fp32 and in bf16 autocast, on the dev split: does the precision of
decoding alone change the summaries (their la-ROUGE-L, loops and unfinished endings)?

    python bench/decode_precision.py --config trainer/configs/demo.yaml --model runs/demo/sft/model

Reads `data.dev_split` (a choice may be made on it), never the evaluation split. Prints one row per
precision and the share of summaries that are the same in both. bf16 needs a device that computes it
natively (a CPU with AVX-512 BF16 or AMX, a GPU): elsewhere it is emulated and about 12x slower.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from lastmile import distributed, metrics
from lastmile.config import load_config
from lastmile.data.records import load_split
from lastmile.generation import generate_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", required=True, help="a causal LM folder (e.g. runs/demo/sft/model)")
    ap.add_argument("--examples", type=int, default=0, help="the first N dev examples (0: all)")
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    dist = distributed.setup()
    examples = load_split(cfg.data, cfg.data.dev_split, args.examples or None)
    refs = [list(e.references) for e in examples]
    print(f"{args.model} on {len(examples)} papers of {cfg.data.dev_split}, greedy, {cfg.eval.generation.max_new_tokens} "
          f"new tokens; CPU bf16 native: {distributed.cpu_has_native_bf16()}")
    texts = {}
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        texts[precision] = generate_examples(args.model, replace(cfg, precision=precision), examples, dist,
                                             cfg.eval.generation, desc=precision)
        seconds = time.perf_counter() - t0
        rouge = metrics.rouge_per_example(texts[precision], refs)
        fail = metrics.failure_stats(texts[precision])
        ratio = metrics.length_stats(texts[precision], refs)["len/ratio_mean"]
        print(f"{precision}: la-ROUGE-L {sum(rouge['la_rougeL']) / len(examples):.4f}  "
              f"ROUGE-L {sum(rouge['rougeL']) / len(examples):.4f}  length ratio {ratio:.2f}  "
              f"with repetition {fail['repetition_share']:.2f}  unfinished {fail['unfinished_share']:.2f}  "
              f"({seconds:.0f} s)")
    same = sum(a == b for a, b in zip(texts["fp32"], texts["bf16"])) / len(examples)
    print(f"the same summary in both: {same:.2f}")


if __name__ == "__main__":
    main()
