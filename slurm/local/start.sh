#!/usr/bin/env bash
# Start a real Slurm (munged + slurmctld + slurmd on localhost) for tests and local use.
# Installs Debian's slurm-wlm and munge when missing. State lives under $LASTMILE_SLURM_PREFIX.
# LASTMILE_SLURM_NODES=2 starts two slurmd on this host, nodes n1 and n2 (own ports, spool, logs), so
# that `sbatch --nodes=2` runs a real two-node job; the default is one node named after the host.
# Idempotent: a second call only checks health. A controller that is not running starts clean, with no
# jobs from a cluster that was killed (machine lost mid-job). Stop it with slurm/local/stop.sh.
# Container-friendly: proctrack/linuxproc, task/none (no cgroups); a short cred_expire so that a
# requeued job restarts in ~15 s instead of ~2.5 min (../shared/slurm/README.md lists the traps).
set -euo pipefail
PREFIX=${LASTMILE_SLURM_PREFIX:-/tmp/lastmile-slurm}
CPUS=${LASTMILE_SLURM_CPUS:-$(nproc)}
NODES=${LASTMILE_SLURM_NODES:-1}
export PATH="$PATH:/usr/sbin:/sbin"
log() { echo "[slurm/local/start] $*" >&2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
fi

alive() { [ -s "$1" ] && local st && st=$(awk '/^State:/{print $2}' "/proc/$(cat "$1")/status" 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]; }
mkdir -p "$PREFIX"/{etc,run,log,spool/ctld,spool/d,munge}
chmod 0755 "$PREFIX" "$PREFIX"/{etc,run,log}; chmod 0700 "$PREFIX/munge"
[ -s "$PREFIX/munge/munge.key" ] || { dd if=/dev/urandom of="$PREFIX/munge/munge.key" bs=1024 count=1 status=none; chmod 0400 "$PREFIX/munge/munge.key"; }
SOCK="$PREFIX/run/munge.socket"
if ! alive "$PREFIX/run/munged.pid"; then
  rm -f "$SOCK" "$SOCK.lock"
  munged --force --socket="$SOCK" --key-file="$PREFIX/munge/munge.key" --pid-file="$PREFIX/run/munged.pid" \
    --log-file="$PREFIX/log/munged.log" --seed-file="$PREFIX/munge/seed"
  for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
fi

NODE=$(hostname -s 2>/dev/null || hostname); getent hosts "$NODE" >/dev/null 2>&1 || NODE=localhost
MEM=$(( $(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
EXTRA=""; [ "$CPUS" -gt "$(nproc)" ] || [ "$NODES" -gt 1 ] && EXTRA="SlurmdParameters=config_overrides"
if [ "$NODES" -gt 1 ]; then  # n1..nN share this host: each slurmd its own port, PID file, spool and log (%n)
  NAMES=$(seq -f "n%g" -s, 1 "$NODES"); PER_NODE="-%n"
  NODELINES=$(for i in $(seq 1 "$NODES"); do
    echo "NodeName=n$i NodeHostname=$NODE NodeAddr=127.0.0.1 Port=$((6830 + i)) CPUs=$CPUS RealMemory=$((MEM / NODES)) State=UNKNOWN"
  done)
else
  NAMES=$NODE; PER_NODE=""
  NODELINES="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
fi
cat >"$PREFIX/etc/slurm.conf" <<CONF
ClusterName=lastmile
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=10
StateSaveLocation=$PREFIX/spool/ctld
SlurmdSpoolDir=$PREFIX/spool/d$PER_NODE
SlurmctldPidFile=$PREFIX/run/slurmctld.pid
SlurmdPidFile=$PREFIX/run/slurmd$PER_NODE.pid
SlurmctldLogFile=$PREFIX/log/slurmctld.log
SlurmdLogFile=$PREFIX/log/slurmd$PER_NODE.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=15
InactiveLimit=0
MailProg=/bin/true
$EXTRA
$NODELINES
PartitionName=debug Nodes=$NAMES Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$PREFIX/etc/slurm.conf"
# A controller that is not running starts clean (-c): the state a killed cluster left under $PREFIX (a
# machine or session stopped mid-job) would otherwise recover its jobs as RUNNING and hold the node forever.
alive "$PREFIX/run/slurmctld.pid" || slurmctld -c -f "$SLURM_CONF"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
for n in ${NAMES//,/ }; do
  pidfile="$PREFIX/run/slurmd${PER_NODE:+-$n}.pid"
  [ -n "$PER_NODE" ] && mkdir -p "$PREFIX/spool/d-$n"
  alive "$pidfile" || slurmd -f "$SLURM_CONF" -N "$n"
  for _ in $(seq 150); do
    state=$(sinfo -h -n "$n" -o %T 2>/dev/null | head -1)
    case "$state" in idle|mixed|allocated) break ;; down*|drain*) scontrol update NodeName="$n" State=RESUME 2>/dev/null || true ;; esac
    sleep 0.2
  done
  case "$state" in idle|mixed|allocated) ;; *) log "node $n not ready ($state); see $PREFIX/log"; exit 1 ;; esac
done
log "up: node(s) $NAMES, $CPUS CPUs each"
echo "export SLURM_CONF=$SLURM_CONF"
