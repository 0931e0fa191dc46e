"""Long sampling jobs in chunks that survive a kill and stop on a stop signal.

Best-of-n's samples (about 1.3 hours in the v2 study) and the reward model's policy samples (about half
an hour) are one long loop each, with no optimizer state to checkpoint. `run` splits the items into
chunks, writes each chunk's rows to `<folder>/chunk-NNNNNN.jsonl` (atomically) as soon as it is done,
and on a rerun samples only the chunks that are missing. The work function seeds each chunk from its
index alone, so a resumed run gives what an uninterrupted one would, on any number of ranks. After
each round a stop signal (SIGTERM or SIGUSR1, `preemption`) ends the run with `Preempted`, which the
CLI turns into exit 75 for the job script to requeue.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from lastmile import checkpoint, distributed, preemption
from lastmile.distributed import DistInfo

# (chunk index, the item indices in it) -> one JSON-able row per item, in order
Work = Callable[[int, list[int]], list[dict]]


def split(n_items: int, chunk_size: int) -> list[list[int]]:
    """[0, n_items) in consecutive chunks of `chunk_size` (the last one shorter)."""
    return [list(range(i, min(i + chunk_size, n_items))) for i in range(0, n_items, chunk_size)]


def chunk_file(folder: Path, k: int) -> Path:
    return folder / f"chunk-{k:06d}.jsonl"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rows_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def run(folder: Path, chunks: list[list[int]], work: Work, dist: DistInfo, *, desc: str, unit: str = "ex") -> list[dict]:
    """Every chunk's rows, in chunk order: chunk files already in `folder` are read, the others computed
    round-robin over the ranks and written by the rank that computed them. Every rank runs the same
    number of rounds (ZeRO-3's forwards are collective): a rank past the end of a round computes the last
    missing chunk again and writes nothing. A stop signal ends the run after the round it arrived in,
    with every finished chunk on disk (`preemption.Preempted`)."""
    todo = [k for k in range(len(chunks)) if not chunk_file(folder, k).is_file()]
    distributed.barrier()  # every rank has listed the chunks before any rank writes one
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        world = dist.world_size
        total = sum(map(len, chunks))
        bar = tqdm(total=total, initial=total - sum(len(chunks[k]) for k in todo), desc=desc, unit=unit,
                   disable=not dist.is_main)
        for first in range(0, len(todo), world):
            i = first + dist.rank
            k = todo[min(i, len(todo) - 1)]
            rows = work(k, chunks[k])
            if i < len(todo):
                checkpoint.write_text_atomic(chunk_file(folder, k), rows_text(rows))
            bar.update(sum(len(chunks[j]) for j in todo[first : first + world]))
            done = first + world
            if done < len(todo) and preemption.requested():
                bar.close()
                distributed.barrier()  # every rank's chunk of this round is on disk
                kept = len(chunks) - len(todo) + done
                raise preemption.Preempted(f"stopped with {kept} of {len(chunks)} chunks of {desc} kept in {folder}; "
                                           "the next run computes the rest")
        bar.close()
    distributed.barrier()
    return [row for k in range(len(chunks)) for row in read_rows(chunk_file(folder, k))]


def finish(folder: Path, final: Path, rows: list[dict], dist: DistInfo) -> None:
    """Rank 0 writes `rows` to `final` (atomically) and removes the chunk folder, after every rank has
    read the chunks."""
    distributed.barrier()
    if dist.is_main:
        checkpoint.write_text_atomic(final, rows_text(rows))
        if folder.exists():
            shutil.rmtree(folder)
    distributed.barrier()
