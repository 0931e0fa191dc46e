"""A local Slurm whose daemons were killed with a job running (the machine or session stopped mid-job)
starts again with a free node: slurm/local/start.sh drops the dead cluster's jobs instead of recovering
them as RUNNING, which held the node and left every later job PENDING. Marker `slurm`; its own prefix and
module, so it never runs beside another test cluster (they share slurmctld's port)."""

import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, local_slurm
from test_slurm import _job, _wait

pytestmark = pytest.mark.slurm
PREFIX = "/tmp/lastmile-slurm-restart"


def _of_this_cluster(prefix: str) -> list[int]:
    """PIDs whose environment names this cluster's slurm.conf: its slurmstepd and the jobs' processes
    (never another cluster's on the same host)."""
    mark = f"SLURM_CONF={prefix}/etc/slurm.conf".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _kill_hard(prefix: str) -> None:
    """SIGKILL the daemons and the job's processes, leaving PID files and saved state behind, as a lost
    machine does."""
    daemons = [int(p.read_text()) for p in Path(prefix, "run").glob("*.pid") if p.read_text().strip()]
    for pid in set(daemons + _of_this_cluster(prefix)) - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_cluster_killed_mid_job_starts_again_with_a_free_node(tmp_path):
    with local_slurm(PREFIX) as env:
        sleeper = subprocess.run(["sbatch", "--parsable", "--ntasks=2", f"--output={tmp_path}/sleep.out",
                                  "--wrap", "sleep 600"], env=env, capture_output=True, text=True, check=True)
        sleeper_id = sleeper.stdout.strip().split(";")[0]
        _wait(env, sleeper_id, condition=lambda info: info.get("JobState") == "RUNNING", timeout=60)
        _kill_hard(PREFIX)

        restart = subprocess.run(["bash", str(ROOT / "slurm/local/start.sh")], capture_output=True, text=True,
                                 timeout=300, check=False,
                                 env={**os.environ, "LASTMILE_SLURM_PREFIX": PREFIX, "LASTMILE_SLURM_NODES": "1"})
        assert restart.returncode == 0, restart.stderr[-2000:]
        assert _job(env, sleeper_id).get("JobState") is None, "the dead cluster's job came back"

        job = subprocess.run(["sbatch", "--parsable", "--ntasks=2", f"--output={tmp_path}/true.out", "--wrap", "true"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
        info = _wait(env, job, timeout=120)
        assert info["JobState"] == "COMPLETED", info
