"""Best-of-n on the tiny preset, in this process: n samples per training example, the best by PPO's
hybrid reward kept, the init model fine-tuned on them; a sampling cut short resumes with the missing
chunks only; a stop signal ends the sampling after the chunk in progress; a finished stage is skipped;
`lastmile validate --for best-of-n` shows its plan.

The init model is the tiny random LM and the reward model a random head on it (conftest): what is
tested is the machinery, not which summary is good."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY, clean_env, run_cli, signals_kept, tiny_inputs
from lastmile import preemption, rollout
from lastmile.config import load_config
from lastmile.data.records import load_split
from lastmile.stages import best_of_n

# 6 examples in chunks of 2, 2 samples each; the fine-tune: 3 steps of 2 examples, no periodic validation
SETTINGS = ["data.max_train_examples=6", "best_of_n.samples_per_example=2", "best_of_n.batch_size=2",
            "best_of_n.max_new_tokens=8", "best_of_n.epochs=1", "sft.batch_size=2", "sft.micro_batch_size=2",
            "sft.warmup_steps=0", "sft.eval_every=0", "sft.eval_examples=2", "sft.num_samples=0", "sft.save_every=0"]


class Interrupted(Exception):
    pass


def _run(cfg, *, stop_at: int | None = None, signal_at: int | None = None) -> SimpleNamespace:
    """best_of_n.run, counting rollout.sample calls (one per chunk); `stop_at`: raise at that call, as a
    kill in the middle of sampling would stop it; `signal_at`: send this process SIGTERM during that
    call, as a scheduler would. Returns the calls' example rows and what it printed."""
    calls, real = [], rollout.sample

    def sample(models, prompts, example_idx, *args, **kwargs):
        calls.append(list(example_idx))
        if len(calls) == stop_at:
            raise Interrupted
        if len(calls) == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler the stage installed only notes it
        return real(models, prompts, example_idx, *args, **kwargs)

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, signals_kept(), contextlib.redirect_stdout(printed):
        mp.setattr(rollout, "sample", sample)
        mp.setattr(preemption, "_requested", [])  # this test's stop requests end with it
        try:
            best_of_n.run(cfg)
        except Interrupted:
            pass
    return SimpleNamespace(calls=calls, printed=printed.getvalue())


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_lm, tokenizer):
    """Sampling stopped at its third chunk, then the same command again (the rest, and the fine-tune)."""
    root = tmp_path_factory.mktemp("best_of_n")
    init, rm = tiny_inputs(root, tiny_lm, tokenizer)
    cfg = load_config(TINY, [f"output_dir={root / 'out'}", f"best_of_n.init={init}", f"ppo.reward.model={rm}",
                             *SETTINGS])
    stage_dir = root / "out" / "best_of_n"
    first = _run(cfg, stop_at=3)
    kept = {f.name: f.read_text() for f in sorted((stage_dir / "samples").iterdir())}
    resumed = _run(cfg)
    return SimpleNamespace(cfg=cfg, init=init, dir=stage_dir, first=first, kept=kept, resumed=resumed,
                           rows=[json.loads(x) for x in (stage_dir / "samples.jsonl").read_text().splitlines()])


def test_every_example_keeps_its_best_sample(stage):
    ids = [e.id for e in load_split(stage.cfg.data, stage.cfg.data.train_split, 6)]
    assert [r["id"] for r in stage.rows] == ids
    for r in stage.rows:
        assert len(r["samples"]) == 2 and r["document"]
        best = max(r["samples"], key=lambda s: s["score"])
        assert r["chosen"] == best["text"] and r["chosen_score"] == best["score"]


def test_an_interrupted_sampling_samples_only_the_missing_chunks(stage):
    assert stage.first.calls == [[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]]  # stopped in the third chunk
    assert list(stage.kept) == ["chunk-000000.jsonl", "chunk-000001.jsonl"]
    assert stage.resumed.calls == [[4, 4, 5, 5]]
    kept_rows = [json.loads(x) for text in stage.kept.values() for x in text.splitlines()]
    assert stage.rows[:4] == kept_rows  # the kept chunks as they were written
    assert not (stage.dir / "samples").exists()  # samples.jsonl holds them now


def test_a_stop_signal_ends_the_sampling_after_the_chunk_in_progress(tmp_path, tiny_lm, tokenizer):
    init, rm = tiny_inputs(tmp_path, tiny_lm, tokenizer)
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'out'}", f"best_of_n.init={init}", f"ppo.reward.model={rm}",
                             "tracking.enabled=false", *SETTINGS])
    with pytest.raises(preemption.Preempted, match="stopped with 2 of 3 chunks of best-of-n kept"):
        _run(cfg, signal_at=2)
    folder = tmp_path / "out" / "best_of_n" / "samples"
    assert sorted(f.name for f in folder.iterdir()) == ["chunk-000000.jsonl", "chunk-000001.jsonl"]
    assert not (tmp_path / "out" / "best_of_n" / "samples.jsonl").exists()
    assert not (tmp_path / "out" / "best_of_n" / "checkpoints").exists()  # the fine-tune had not begun


def test_the_fine_tuned_model_is_published_and_differs_from_the_init_model(stage):
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(stage.dir / "model").state_dict()
    init = AutoModelForCausalLM.from_pretrained(stage.init).state_dict()
    assert tuned.keys() == init.keys()
    assert any(not torch.equal(tuned[k], init[k]) for k in init)
    assert json.loads((stage.dir / "metrics.json").read_text())["step"] == 3  # 6 kept summaries, 2 per step
    assert "Best-of-n done: 3 steps" in stage.resumed.printed


def test_one_mlflow_run_logs_the_sampling_and_the_fine_tune(stage):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{stage.cfg.output_dir}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["lastmile"])
    assert list(runs["tags.lastmile.stage"]) == ["best_of_n"] and runs.iloc[0]["status"] == "FINISHED"
    metrics = {k.split(".", 1)[1]: v for k, v in runs.iloc[0].items() if k.startswith("metrics.")}
    assert metrics["best_of_n/chosen_score_mean"] >= metrics["best_of_n/sample_score_mean"]
    assert metrics["best_of_n/chosen_score_mean"] == pytest.approx(
        sum(r["chosen_score"] for r in stage.rows) / len(stage.rows))
    assert "best_of_n/chosen_length_ratio_mean" in metrics and "sft/loss" in metrics


def test_a_finished_stage_is_skipped(stage):
    again = _run(stage.cfg)
    assert again.calls == [] and "Best-of-n already complete" in again.printed


def test_validate_shows_the_plan_of_best_of_n(capsys):
    from lastmile.cli import main

    assert main(["validate", "--config", str(TINY), "--for", "best-of-n", *SETTINGS]) == 0
    err = capsys.readouterr().err
    assert "best-of-n  2 samples per training example, 2 examples per generate call per rank" in err
    assert "at most 3 optimizer steps" in err


def test_bad_settings_are_reported_at_once():
    from lastmile.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["best_of_n.samples_per_example=0", "best_of_n.top_p=1.5", "best_of_n.lr=-1"])
    for problem in ("best_of_n.samples_per_example (0) must be greater than 0",
                    "best_of_n.top_p (1.5) must be in (0, 1]", "best_of_n.lr (-1.0) must be greater than 0"):
        assert problem in str(e.value)


@pytest.mark.slow  # two launches, about a minute and a half: `make test-slow`
@pytest.mark.distributed
def test_two_rank_zero3_sampling_equals_one_process(tiny_pipeline, tmp_path):
    """Two ranks under ZeRO-3 sample the 3 chunks in two rounds (in the second, rank 1 samples the last chunk
    again and writes nothing): the same samples and scores as one process, each chunk seeded by its index."""
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    src, _ = tiny_pipeline
    given = [f"best_of_n.init={src / 'sft' / 'model'}", f"ppo.reward.model={src / 'reward_model' / 'model'}",
             "tracking.enabled=false", *SETTINGS, "sft.micro_batch_size=1"]  # the fine-tune: a micro-batch per rank
    one = run_cli("best-of-n", "--config", str(TINY), f"output_dir={tmp_path / 'one'}", *given)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", "29527", "trainer/main.py", "best-of-n", "--config",
           str(TINY), f"output_dir={tmp_path / 'two'}", "deepspeed.config=zero3", *given]
    two = subprocess.run(cmd, cwd=ROOT, env=clean_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"), capture_output=True,
                         text=True, timeout=600, check=False)
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    a, b = ([json.loads(x) for x in (tmp_path / d / "best_of_n" / "samples.jsonl").read_text().splitlines()]
            for d in ("one", "two"))
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 6
    assert [[x["text"] for x in r["samples"]] for r in a] == [[x["text"] for x in r["samples"]] for r in b]
    assert [x["score"] for r in a for x in r["samples"]] == pytest.approx(
        [x["score"] for r in b for x in r["samples"]], abs=1e-4)
