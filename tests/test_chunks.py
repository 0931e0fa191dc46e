"""Long sampling in kept chunks (`lastmile.chunks`): rows in order, a rerun computes only the missing
chunks, a stop signal ends the run after the chunk in progress with every finished chunk on disk; the
reward model's policy samples, stopped and resumed, are the samples of an uninterrupted run; an
evaluation (the report) stops between systems and its rerun reuses what was generated."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY, signals_kept, tiny_inputs
from lastmile import chunks, preemption
from lastmile.config import load_config
from lastmile.data.records import load_split
from lastmile.distributed import DistInfo
from lastmile.stages import evaluate, reward_model

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture
def stop_handler(monkeypatch):
    """The stop-signal handler installed as a stage installs it, its requests dropped afterwards."""
    monkeypatch.setattr(preemption, "_requested", [])
    with signals_kept():
        preemption.install()
        yield


def _work(calls: list[int], *, signal_at: int | None = None):
    def work(k: int, idx: list[int]) -> list[dict]:
        calls.append(k)
        if len(calls) == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return [{"item": i, "square": i * i} for i in idx]

    return work


def test_rows_come_in_order_and_a_rerun_reads_the_kept_chunks(tmp_path):
    parts = chunks.split(7, 3)
    assert parts == [[0, 1, 2], [3, 4, 5], [6]]
    calls: list[int] = []
    rows = chunks.run(tmp_path / "c", parts, _work(calls), ONE, desc="squares")
    assert calls == [0, 1, 2] and [r["item"] for r in rows] == list(range(7))
    assert rows == chunks.run(tmp_path / "c", parts, _work(calls), ONE, desc="squares") and calls == [0, 1, 2]
    chunks.finish(tmp_path / "c", tmp_path / "all.jsonl", rows, ONE)
    assert not (tmp_path / "c").exists() and chunks.read_rows(tmp_path / "all.jsonl") == rows


def test_a_stop_signal_keeps_the_finished_chunks_and_the_rerun_computes_the_rest(tmp_path, stop_handler):
    parts, calls = chunks.split(10, 2), []
    with pytest.raises(preemption.Preempted, match=r"stopped with 2 of 5 chunks of squares kept in .*c; the next run"):
        chunks.run(tmp_path / "c", parts, _work(calls, signal_at=2), ONE, desc="squares")
    assert calls == [0, 1]  # the chunk in progress when the signal came was finished, no other was begun
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["chunk-000000.jsonl", "chunk-000001.jsonl"]
    preemption._requested.clear()  # the next run, a new process
    rows = chunks.run(tmp_path / "c", parts, _work(calls), ONE, desc="squares")
    assert calls == [0, 1, 2, 3, 4] and rows == [{"item": i, "square": i * i} for i in range(10)]


def test_a_stop_signal_in_the_last_chunk_lets_it_finish(tmp_path, stop_handler):
    calls: list[int] = []
    rows = chunks.run(tmp_path / "c", chunks.split(4, 2), _work(calls, signal_at=2), ONE, desc="squares")
    assert calls == [0, 1] and len(rows) == 4  # nothing left to stop for: the stage's next step stops


def test_policy_samples_stopped_and_resumed_are_the_uninterrupted_samples(tmp_path, tiny_lm, tokenizer, monkeypatch,
                                                                          stop_handler):
    """The reward model's own-sample negatives in chunks of 2 of 6 papers, seeded by chunk: SIGTERM in the
    second chunk keeps two chunk files, and the rerun's six samples equal a run that was never stopped."""
    init, _ = tiny_inputs(tmp_path, tiny_lm, tokenizer)
    cfg = load_config(TINY, [f"rm.policy_negatives_model={init}", "eval.generation.max_new_tokens=6",
                             "eval.generation.batch_size=2"])
    examples = load_split(cfg.data, cfg.data.train_split, 6)
    monkeypatch.setattr(reward_model, "POLICY_SAMPLE_CHUNK", 2)
    whole = reward_model.policy_samples(cfg, examples, ONE, tmp_path / "whole" / "policy_samples.jsonl")
    assert len(whole) == len(examples) and any(whole)

    stopped = tmp_path / "stopped" / "policy_samples.jsonl"
    calls, real = [], chunks.run

    def run_counting(folder, parts, work, dist, **kw):
        def counted(k, idx):
            calls.append(k)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return work(k, idx)

        return real(folder, parts, counted, dist, **kw)

    monkeypatch.setattr(chunks, "run", run_counting)
    with pytest.raises(preemption.Preempted, match="stopped with 2 of 3 chunks of policy samples"):
        reward_model.policy_samples(cfg, examples, ONE, stopped)
    assert sorted(p.name for p in Path(stopped.with_suffix("")).iterdir()) == ["chunk-000000.jsonl", "chunk-000001.jsonl"]
    preemption._requested.clear()
    resumed = reward_model.policy_samples(cfg, examples, ONE, stopped)
    assert calls == [0, 1, 2]  # the rerun sampled the third chunk only
    assert resumed == whole
    kept = [json.loads(x) for x in stopped.read_text().splitlines()]  # for a restarted stage
    assert kept == [{"id": e.id, "prediction": t} for e, t in zip(examples, whole)]
    assert not stopped.with_suffix("").exists()


def test_an_evaluation_stops_between_systems_and_reuses_what_it_generated(tmp_path, tiny_lm, tokenizer, monkeypatch,
                                                                          stop_handler):
    init, _ = tiny_inputs(tmp_path, tiny_lm, tokenizer)
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'out'}", "data.max_eval_examples=2", "tracking.enabled=false",
                             "eval.generation.max_new_tokens=4", "eval.bootstrap_samples=10"])
    specs = [evaluate.SystemSpec("a", model=str(init)), evaluate.SystemSpec("b", model=str(init))]
    generated, real = [], evaluate.generate_examples

    def generate_examples(model, *args, **kwargs):
        generated.append(model)
        if len(generated) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # during the first system's generation
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_examples", generate_examples)
    kept = tmp_path / "out" / "eval" / "generations"
    with pytest.raises(preemption.Preempted, match=r"stopped after generating 1 of 2 systems \(a\)"):
        evaluate.evaluate_systems(cfg, specs, [("a", "b")], tmp_path / "out" / "eval" / "ab", run_name="ab")
    assert [p.name.split("-")[0] for p in kept.iterdir()] == ["a"]
    preemption._requested.clear()
    results = evaluate.evaluate_systems(cfg, specs, [("a", "b")], tmp_path / "out" / "eval" / "ab", run_name="ab")
    assert len(generated) == 2  # the rerun generated b alone
    assert {"a", "a+post", "b", "b+post"} <= set(results["systems"])
