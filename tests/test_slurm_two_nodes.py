"""Two nodes under real Slurm: slurm/local/start.sh with LASTMILE_SLURM_NODES=2 runs two slurmd on this
host (n1, n2), so `sbatch --nodes=2 slurm/rl_finetune.sh` launches one training across both: 2 nodes
x 2 ranks, rendezvous on the first node's address, and a preempted job requeues and resumes on both.
Marker `slurm` (`make test-slurm`); skipped when the cluster cannot start. Its own prefix and module,
so it never runs beside the one-node cluster of test_slurm.py."""

import json
import subprocess
import time

import pytest
from conftest import ROOT, TINY, local_slurm
from test_slurm import _job, _wait

pytestmark = pytest.mark.slurm
PREFIX = "/tmp/lastmile-slurm-2n"


@pytest.fixture(scope="module")
def two_nodes():
    with local_slurm(PREFIX, nodes=2) as env:
        yield env


def test_two_nodes_train_one_model_and_resume_after_preemption(two_nodes, tmp_path):
    env = {**two_nodes, "LASTMILE_STAGES": "sft"}
    log = tmp_path / "job.out"
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", f"--output={log}", "slurm/rl_finetune.sh",
         str(TINY), f"output_dir={tmp_path}", "sft.epochs=25", "sft.save_every=20", "sft.eval_every=0",
         "sft.num_samples=0"], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    info = _wait(two_nodes, job, condition=lambda i: i.get("JobState") == "RUNNING", timeout=120)
    assert info["NodeList"] == "n[1-2]" and info["NumTasks"] == "4", info
    ckpt = tmp_path / "sft" / "checkpoints" / "step-0000020"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert ckpt.exists(), log.read_text()[-3000:] if log.exists() else "no log"
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=two_nodes, check=True)
    info = _wait(two_nodes, job, timeout=500,
                 condition=lambda i: i.get("JobState") == "COMPLETED" and int(i.get("Restarts", 0)) >= 1)
    text = log.read_text()
    assert "on n[1-2]: 4 ranks, master 127.0.0.1:" in text, text[-3000:]  # rank 0's node, by its NodeAddr
    assert "ranks: 4" in text and "requeueing" in text and "resuming from" in text and info["Restarts"] == "1"
    steps = [s for s, _ in json.loads((tmp_path / "sft/metrics.json").read_text())["loss_history"]]
    assert steps == list(range(1, 101))  # 25 epochs x 4 steps of 8 = 2 per micro-batch x 4 ranks, none lost
    assert (tmp_path / "sft/model/model.safetensors").is_file() and _job(two_nodes, job)["JobState"] == "COMPLETED"
