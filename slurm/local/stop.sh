#!/usr/bin/env bash
# Stop the cluster started by slurm/local/start.sh, by PID file only. Safe to repeat.
set -uo pipefail
PREFIX=${LASTMILE_SLURM_PREFIX:-/tmp/lastmile-slurm}
export SLURM_CONF="$PREFIX/etc/slurm.conf" PATH="$PATH:/usr/sbin:/sbin"
[ -f "$SLURM_CONF" ] && scancel --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null
for f in "$PREFIX"/run/slurmd*.pid "$PREFIX/run/slurmctld.pid" "$PREFIX/run/munged.pid"; do  # slurmd-n1.pid ... too
  [ -s "$f" ] || continue
  pid=$(cat "$f"); kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do st=$(awk '/^State:/{print $2}' /proc/$pid/status 2>/dev/null); [ -z "$st" ] || [ "$st" = Z ] && break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null; rm -f "$f"
done
[ "${LASTMILE_SLURM_PURGE:-0}" = 1 ] && rm -rf "$PREFIX"
echo "[slurm/local/stop] stopped" >&2
