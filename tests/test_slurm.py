"""Real Slurm (slurm/local/start.sh brings up slurmctld + slurmd on localhost): sbatch the tiny
stages with 2 tasks, preempt a job mid-run and watch it resume, and a failing job's message.
Marker `slurm`: run with `python -m pytest -m slurm`; skipped when the cluster cannot start."""

import json
import re
import subprocess
import time

import pytest
from conftest import ROOT, TINY, local_slurm

pytestmark = pytest.mark.slurm
PREFIX = "/tmp/lastmile-slurm"


@pytest.fixture(scope="module")
def slurm_env():
    with local_slurm(PREFIX) as env:
        yield env


def _sbatch(env, out, *args, stages=None):
    """stages=None: the script's default (the whole pipeline)."""
    log = out / "job.out"
    cmd = ["sbatch", "--parsable", f"--output={log}", "slurm/rl_finetune.sh", str(TINY), f"output_dir={out}", *args]
    env = {k: v for k, v in env.items() if k != "LASTMILE_STAGES"} | ({"LASTMILE_STAGES": stages} if stages else {})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip().split(";")[0], log


def _job(env, job_id):
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True, check=False).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _wait(env, job_id, *, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=600,
          condition=None):
    """Poll scontrol (sbatch --wait polls at 2/8/32 s and is slow to notice)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job(env, job_id)
        if condition is not None and condition(info):
            return info
        if condition is None and info.get("JobState") in until:
            return info
        time.sleep(1)
    info = _job(env, job_id)
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %E"], env=env, capture_output=True, text=True, check=False).stdout
    raise AssertionError(f"job {job_id} still {info.get('JobState')} (reason {info.get('Reason')}) after {timeout} s; "
                         f"nodes: {nodes.strip()}")


def test_sbatch_runs_the_tiny_pipeline_with_two_tasks(slurm_env, tmp_path):
    """The script's default: the whole pipeline (SFT, reward model, PPO, report), 2 ranks (gloo), one job."""
    job, log = _sbatch(slurm_env, tmp_path)
    info = _wait(slurm_env, job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert "2 ranks" in text and "ranks: 2" in text and "all stages done: pipeline" in text
    assert (tmp_path / "sft/model/model.safetensors").is_file()
    assert (tmp_path / "ppo/model/model.safetensors").is_file() and "world_size 2" in text
    assert json.loads((tmp_path / "report/results.json").read_text())["n_examples"] == 8
    rm = json.loads((tmp_path / "reward_model/results.json").read_text())
    assert rm["n_examples"] == 8 and len(rm["per_mode"]) == 8  # scored by 2 ranks, gathered in order


def test_preempted_job_resumes_in_the_same_mlflow_run(slurm_env, tmp_path):
    job, log = _sbatch(slurm_env, tmp_path, "sft.epochs=25", "sft.save_every=20", "sft.eval_every=0",
                       "sft.num_samples=0", stages="sft")
    ckpt_dir = tmp_path / "sft" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpt_dir / "step-0000020").exists() and time.time() < deadline:
        time.sleep(0.5)
    assert (ckpt_dir / "step-0000020").exists(), log.read_text()[-3000:] if log.exists() else "no log"
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True)
    info = _wait(slurm_env, job, condition=lambda i: i.get("JobState") == "COMPLETED" and int(i.get("Restarts", 0)) >= 1,
                 timeout=400)
    text = log.read_text()
    assert "checkpointed after a stop signal; requeueing" in text and "resuming from" in text, text[-4000:]
    assert "restart 1" in text and info["Restarts"] == "1"
    metrics = json.loads((tmp_path / "sft/metrics.json").read_text())
    steps = [s for s, _ in metrics["loss_history"]]
    assert steps == list(range(1, 101))  # 25 epochs x 4 steps, none lost or repeated
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["lastmile"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["tags.lastmile.resumed"] == "true"
    history = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "sft/loss")
    assert sorted({h.step for h in history}) == list(range(1, 101))


def test_a_bad_config_fails_the_job_with_the_trainers_message(slurm_env, tmp_path):
    job, log = _sbatch(slurm_env, tmp_path, "sft.lrr=1", stages="sft")
    info = _wait(slurm_env, job)
    text = log.read_text()
    assert info["JobState"] == "FAILED"
    assert "sft.lrr is not a known setting. Did you mean 'sft.lr'?" in text and "failed with exit code 2" in text
