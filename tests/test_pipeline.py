"""The whole pipeline on the tiny preset (SFT -> reward model -> PPO -> report), its MLflow record,
stage identities, a PPO kill and exact resume, and PPO under 2-rank ZeRO-3. Real CLI subprocesses."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import clean_env, ROOT, TINY, run_cli


def _runs(out):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    return mlflow.search_runs(experiment_names=["lastmile"])


def test_pipeline_writes_the_report_and_one_child_run_per_stage(tiny_pipeline):
    out, proc = tiny_pipeline
    assert "SFT already complete" in proc.stdout
    report = (out / "report" / "report.md").read_text()
    for system in ("| mle |", "| mle+post |", "| rl |", "| rl+post |"):
        assert system in report
    assert "| rl - mle |" in report
    samples = [json.loads(x) for x in (out / "report" / "samples.jsonl").read_text().splitlines() if x.strip()]
    changed = sum(s["rl"] != s["mle"] for s in samples)  # the tiny PPO may publish its iteration 0 (= MLE)
    assert ("RL and MLE differ nowhere" in report) == (changed == 0)
    title = "The one example" if changed == 1 else f"The {min(changed, 5)} examples"
    assert changed == 0 or f"{title} where RL and MLE differ" in report
    assert "8 examples drawn by a fixed rule" in report  # all 8 of the tiny split
    results = json.loads((out / "report" / "results.json").read_text())
    assert results["data"]["split"] == "test" and results["n_examples"] == 8
    assert {"rl - mle", "rl - mle+post", "rl+post - mle+post"} <= set(results["comparisons"])
    # the reward model's (normalized) score of every system, with paired intervals like every metric
    assert all(isinstance(v["reward"], float) for v in results["systems"].values())
    assert "reward" in results["comparisons"]["rl - mle"]
    assert "| reward |" in report.split("\n")[2]  # a column of the systems table
    for name in ("curves.png", "metrics.png", "samples.md"):
        assert (out / "report" / name).stat().st_size > 500
    # tiny.yaml's report.goals, read off these results: each line met or not, with the numbers it read
    goal_record = json.loads((out / "report" / "goals.json").read_text())
    goal_lines = goal_record["lines"]
    assert goal_record["provenance"].startswith("Written down before the results")  # recorded when the run began
    drop = results["comparisons"]["rl - mle"]["la_rougeL"]
    assert goal_lines[0]["met"] is (drop["ci_high"] >= 0) and f"{drop['ci_high']:+.4f}]" in goal_lines[0]["numbers"]
    assert goal_lines[1]["met"] is (results["systems"]["rl"]["unfinished_share"] <= 0.5)
    assert "## The goal, line by line" in report and "| RL's summaries mostly finish | rl unfinished_share" in report
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "ppo" / "model")
    history = json.loads((out / "ppo" / "history.json").read_text())
    assert [h["iteration"] for h in history["history"]] == [1, 2, 3, 4]
    assert all(h["parity/max_abs"] < 1e-3 for h in history["history"])  # fp32: generation = training forward
    changed = [h["policy/weights_changed"] for h in history["history"]]  # fp32: every step reaches the model
    assert all(0.99 < c <= 1.0 for c in changed), changed
    # iteration 0: the actor is the reference. In fp32 the evaluation's actor side is generation's own
    # log-probs (no second forward), so a KL of ~0 also says they line up with the reference's forward
    assert history["evals"][0]["iteration"] == 0 and abs(history["evals"][0]["eval/policy/kl"]) < 1e-2

    runs = _runs(out)
    parent = runs[runs["tags.lastmile.stage"] == "pipeline"]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    pid = parent.iloc[0]["run_id"]
    children = runs[runs["tags.mlflow.parentRunId"] == pid]
    names = sorted(children["tags.mlflow.runName"])
    assert "ppo" in names and "evaluate:report" in names
    assert "sft" in names  # run before the pipeline (tiny_sft_run), then nested under it
    # a stage finished earlier with the same identity is skipped, not re-run under the pipeline
    assert "reward_model" in names or "Reward model already complete" in proc.stdout
    assert (children["status"] == "FINISHED").all()
    assert len(runs[runs["tags.lastmile.stage"] == "ppo"]) == 1
    import mlflow

    client = mlflow.MlflowClient()
    ppo_run = children[children["tags.mlflow.runName"] == "ppo"].iloc[0]["run_id"]
    steps = [m.step for m in client.get_metric_history(ppo_run, "reward/score_mean")]
    assert steps == [1, 2, 3, 4]
    assert {"report/report.md", "report/curves.png", "report/goals.json"} <= {
        a.path for a in client.list_artifacts(pid, "report")}


def test_rerun_skips_finished_stages_and_refuses_changed_data(tiny_pipeline, tmp_path):
    out, _ = tiny_pipeline
    again = run_cli("pipeline", "--config", str(TINY), f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "PPO already complete" in again.stdout and "unchanged" in again.stdout
    data = tmp_path / "data"
    data.mkdir()
    row = {"id": "a", "document": "We study things. " * 20, "summary": "Things are studied."}
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({**row, "id": f"{split}{i}"}) + "\n" for i in range(40)))
    changed = run_cli("pipeline", "--config", str(TINY), f"output_dir={out}", f"data.source={data}",
                      "data.references_field=null", f"tracking.uri=sqlite:///{out}/mlflow.db")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "holds a SFT run made with other settings or inputs" in changed.stderr
    assert "data.source (aclsum -> " in changed.stderr
    assert "Use a new output_dir" in changed.stderr


@pytest.mark.slow  # 24 s: kept out of the default run's 8 minutes (`make test-slow`); the stage itself is in test_best_of_n
def test_best_of_n_joins_the_pipeline_and_its_report(tiny_pipeline, tmp_path):
    """best_of_n.in_pipeline: the stage runs between the reward model and PPO (PPO, whose identity does not
    depend on it, is skipped), and the report holds best-of-n raw and post-processed, compared with MLE and RL."""
    out = tmp_path / "out"
    shutil.copytree(tiny_pipeline[0], out, ignore=shutil.ignore_patterns("report*"))
    proc = run_cli("pipeline", "--config", str(TINY), f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db",
                   "best_of_n.in_pipeline=true", "best_of_n.samples_per_example=2", "best_of_n.max_new_tokens=8",
                   "best_of_n.epochs=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "PPO already complete" in proc.stdout and (out / "best_of_n" / "model" / "config.json").is_file()
    results = json.loads((out / "report" / "results.json").read_text())
    assert {"best-of-n", "best-of-n+post", "mle", "rl"} <= set(results["systems"])
    assert {"best-of-n - mle", "rl - best-of-n", "rl+post - best-of-n+post"} <= set(results["comparisons"])
    report = (out / "report" / "report.md").read_text()
    assert "| best-of-n |" in report and "| rl - best-of-n |" in report


@pytest.mark.slow  # tests/test_faults.py's fault trials (also slow) kill PPO mid-save and check the same
def test_ppo_killed_mid_run_resumes_to_the_same_result(tiny_pipeline, tmp_path):
    """SIGKILL after the iteration-2 checkpoint; the rerun resumes there and ends with the same
    reward history as the uninterrupted pipeline, in one MLflow run without duplicated steps."""
    src, _ = tiny_pipeline
    out = tmp_path / "resume"
    out.mkdir()
    for stage in ("sft", "reward_model"):
        shutil.copytree(src / stage, out / stage, ignore=shutil.ignore_patterns("checkpoints"))
    args = [sys.executable, "-m", "lastmile", "ppo", "--config", str(TINY), f"output_dir={out}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=clean_env(OMP_NUM_THREADS="2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpt = out / "ppo" / "checkpoints" / "step-0000002"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert ckpt.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no checkpoint"
    time.sleep(1.0)  # let iteration 3 start, so that its metrics reach MLflow before the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = run_cli("ppo", "--config", str(TINY), f"output_dir={out}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr
    resumed = json.loads((out / "ppo" / "history.json").read_text())["history"]
    reference = json.loads((src / "ppo" / "history.json").read_text())["history"]
    assert [h["iteration"] for h in resumed] == [1, 2, 3, 4]
    for key in ("reward/score_mean", "kl/seq_mean", "policy/loss"):
        assert [h[key] for h in resumed] == pytest.approx([h[key] for h in reference], rel=1e-4, abs=1e-6)
    runs = _runs(out)
    ppo_runs = runs[runs["tags.lastmile.stage"] == "ppo"]
    assert len(ppo_runs) == 1 and ppo_runs.iloc[0]["status"] == "FINISHED"
    import mlflow

    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(ppo_runs.iloc[0]["run_id"], "reward/score_mean")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow  # kept out of the default run's 8 minutes: `make test-slow`
def test_ppo_stops_on_an_alarm_and_publishes_the_best_checkpoint(tiny_pipeline, tmp_path):
    """ppo.stop_on_alarm: the first in-loop evaluation after an alarm (here: summaries shorter than
    ppo.length_alarm_low x the references) stops the run, and the best dev checkpoint so far becomes
    ppo/model; each evaluation is recorded once."""
    src, _ = tiny_pipeline
    out = tmp_path / "alarm"
    proc = run_cli("ppo", "--config", str(TINY), f"output_dir={out}", f"ppo.init={src / 'sft' / 'model'}",
                   f"ppo.reward.model={src / 'reward_model' / 'model'}", "ppo.length_alarm_low=0.9", "ppo.stop_on_alarm=true",
                   "tracking.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "ppo" / "history.json").read_text())
    assert [h["iteration"] for h in summary["history"]] == [1, 2]  # stopped at the iteration-2 evaluation of 4
    assert "reference length, outside [0.9, 3.0]" in summary["alarms"][0]
    assert "stopping at iteration 2 on alarm" in proc.stderr
    assert [e["iteration"] for e in summary["evals"]] == [0, 2]
    evals = {e["iteration"]: e["eval/policy/la_rougeL"] for e in summary["evals"]}
    assert summary["best"]["iteration"] == max(evals, key=lambda k: (evals[k], -k))
    assert summary["published"].endswith("best") and (out / "ppo" / "DONE.json").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "ppo" / "model")


@pytest.mark.slow  # kept out of the default run's 8 minutes: `make test-slow`
def test_critic_free_ppo_trains_end_to_end_without_a_critic(tiny_pipeline, tmp_path):
    """`ppo.advantage=rloo`: no critic is built, trained or saved; the policy still updates, the run
    evaluates, checkpoints and publishes a model transformers loads. One epoch in one minibatch, so the
    update's own forward gives the old log-probs (ppo.old_logprobs=auto), and the parity check compares
    the generation-time log-probs with it."""
    src, _ = tiny_pipeline
    out = tmp_path / "rloo"
    proc = run_cli("ppo", "--config", str(TINY), f"output_dir={out}", f"ppo.init={src / 'sft' / 'model'}",
                   f"ppo.reward.model={src / 'reward_model' / 'model'}", "ppo.advantage=rloo", "ppo.iterations=2", "ppo.epochs=1", "ppo.minibatch_size=8",
                   "ppo.save_every=1", "ppo.keep_checkpoints=2", "tracking.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "ppo" / "history.json").read_text())
    assert [h["iteration"] for h in summary["history"]] == [1, 2]
    for h in summary["history"]:
        assert not any(k.startswith("value/") for k in h)  # no critic step ran
        assert h["policy/ratio"] == pytest.approx(1.0) and math.isfinite(h["policy/loss"])  # old = this forward
        assert h["parity/max_abs"] < 1e-3 and h["time/generation_s"] > 0 and "time/old_logprobs_s" not in h
    assert "old_logprobs update" in proc.stdout + proc.stderr  # the resolved choice, logged
    assert [e["iteration"] for e in summary["evals"]] == [0, 2]
    assert (out / "ppo" / "DONE.json").is_file()
    import torch
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(src / "sft" / "model")
    after = AutoModelForCausalLM.from_pretrained(out / "ppo" / "model")
    if summary["best"]["iteration"] > 0:  # the published model is a trained one: its weights moved
        assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values(), strict=True))


def test_remax_ppo_scores_a_greedy_response_per_prompt_as_the_baseline(tiny_pipeline, tmp_path):
    """`ppo.advantage=remax`: one greedy response per prompt, scored by the same reward and not trained
    on, is the baseline; no critic; the iteration logs the greedy reward and the phase's time."""
    src, _ = tiny_pipeline
    out = tmp_path / "remax"
    proc = run_cli("ppo", "--config", str(TINY), f"output_dir={out}", f"ppo.init={src / 'sft' / 'model'}",
                   f"ppo.reward.model={src / 'reward_model' / 'model'}", "ppo.advantage=remax", "ppo.iterations=1",
                   "ppo.samples_per_prompt=2", "ppo.prompts_per_iteration=4", "ppo.minibatch_size=8", "ppo.eval_every=0",
                   "ppo.save_every=0", "tracking.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (h,) = json.loads((out / "ppo" / "history.json").read_text())["history"]
    assert not any(k.startswith("value/") for k in h) and math.isfinite(h["policy/loss"])
    assert math.isfinite(h["reward/greedy_score_mean"]) and h["time/greedy_baseline_s"] > 0
    assert h["mem/generation_peak_gb"] > 0  # phase memory is measured alongside phase time


@pytest.mark.distributed
def test_two_rank_zero3_ppo(tiny_pipeline, tmp_path):
    """`deepspeed --num_gpus 2 trainer/main.py ppo ... deepspeed.config=zero3` on CPU: the hybrid engine
    gathers the partitioned actor for generation; parity holds; the published model loads."""
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    src, _ = tiny_pipeline
    out = tmp_path / "z3"
    env = clean_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", "29519", "trainer/main.py", "ppo", "--config", str(TINY),
           f"output_dir={out}", "deepspeed.config=zero3", f"ppo.init={src / 'sft' / 'model'}",
           f"ppo.reward.model={src / 'reward_model' / 'model'}", "ppo.iterations=1", "ppo.eval_every=0",
           "tracking.enabled=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "generation_gather all" in proc.stderr and "world_size 2" in proc.stderr
    history = json.loads((out / "ppo" / "history.json").read_text())["history"]
    assert len(history) == 1 and all(h["parity/max_abs"] < 1e-3 for h in history)
    assert 0.5 < history[0]["policy/weights_changed"] <= 1.0  # counted over both ranks' partitions
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "ppo" / "model")
