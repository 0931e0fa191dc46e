"""Greedy decoding of one model at several batch sizes, on the dev split: how much time does a larger
`eval.generation.batch_size` save, and are the summaries the same?

    python bench/decode_batch.py --config trainer/configs/demo.yaml --model runs/demo/ppo/model --batch 8 25 50

Reads `data.dev_split` (a choice may be made on it), never the evaluation split. Greedy decoding pads
every batch on the left to its longest prompt and runs until its last summary ends, so a larger batch
does more wasted work per row but far fewer steps; on a CPU the weights are read once per step for the
whole batch. Prints seconds (the model load included), words per second and the share of summaries
identical to the first batch size's.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from lastmile import distributed
from lastmile.config import load_config
from lastmile.data.records import load_split
from lastmile.generation import generate_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", required=True, help="a causal LM folder (e.g. runs/demo/ppo/model)")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 25, 50])
    ap.add_argument("--examples", type=int, default=0, help="the first N dev examples (0: all)")
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    dist = distributed.setup()
    examples = load_split(cfg.data, cfg.data.dev_split, args.examples or None)
    print(f"{args.model} on {len(examples)} papers of {cfg.data.dev_split}, greedy, "
          f"{cfg.eval.generation.max_new_tokens} new tokens, precision {cfg.precision}")
    first = None
    for batch in args.batch:
        gen = replace(cfg.eval.generation, strategy="greedy", batch_size=batch)
        t0 = time.perf_counter()
        texts = generate_examples(args.model, cfg, examples, dist, gen, desc=f"batch {batch}")
        seconds = time.perf_counter() - t0
        words = sum(len(t.split()) for t in texts)
        first = first or texts
        same = sum(a == b for a, b in zip(first, texts)) / len(texts)
        print(f"batch {batch}: {seconds:.1f} s, {words / seconds:.1f} words/s, "
              f"the same summary as batch {args.batch[0]}: {same:.2f}", flush=True)


if __name__ == "__main__":
    main()
