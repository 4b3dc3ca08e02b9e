#!/usr/bin/env bash
# A one-node SLURM cluster on loopback, from Debian's packages, for the real `--executor slurm` test.
#
#   bash .ci/slurm-cluster.sh start   # install (apt) if needed, configure, start munged + slurmctld + slurmd
#   bash .ci/slurm-cluster.sh stop    # stop only the daemons this script started
#
# Needs root (apt, /etc/slurm, daemons). There is no slurmdbd: accounting is off, so job status comes
# from `squeue`; MinJobAge=600 keeps finished jobs visible to it long enough for snakemake-executor-plugin-slurm
# (which needs MinJobAge >= 3x its first status-check delay). The test passes `--slurm-status-command squeue`.
set -euo pipefail

STATE_DIR=/var/run/cellkd-slurm        # pid files of the daemons started here
SPOOL=/var/spool/cellkd-slurm
LOG_DIR=/var/log/cellkd-slurm

start() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "slurm-cluster: needs root to install and start slurm; skipping (the slurm test will skip)" >&2
        return 0
    fi
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
        echo "slurm-cluster: installing slurmctld slurmd slurm-client munge from Debian" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null
    fi
    mkdir -p "$STATE_DIR" "$SPOOL/ctld" "$SPOOL/d" "$LOG_DIR" /etc/slurm /run/munge /var/lib/munge /var/log/munge
    chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge 2>/dev/null || true
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key

    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
    cat >/etc/slurm/slurm.conf <<EOF
# written by cellkd .ci/slurm-cluster.sh: one node on loopback, no accounting database
ClusterName=cellkd-ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=${SPOOL}/ctld
SlurmdSpoolDir=${SPOOL}/d
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
# containers have no usable cgroup hierarchy for slurm: track processes by parent pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MinJobAge=600
ReturnToService=2
MpiDefault=none
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF

    if ! munge -n </dev/null >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
        pgrep -x munged >"$STATE_DIR/munged.pid"
    fi
    slurmctld
    slurmd
    for _ in $(seq 1 30); do
        if sinfo --noheader --states=idle --format=%N 2>/dev/null | grep -q .; then
            sinfo
            return 0
        fi
        sleep 1
    done
    echo "slurm-cluster: node did not become idle in 30 s; logs:" >&2
    tail -n 20 "$LOG_DIR"/*.log >&2 || true
    return 1
}

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        [[ -s "$STATE_DIR/$name.pid" ]] || continue
        pid=$(cat "$STATE_DIR/$name.pid")
        kill "$pid" 2>/dev/null || true
        rm -f "$STATE_DIR/$name.pid"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
