#!/usr/bin/env bash
# A single-node SLURM (munged, slurmctld, slurmd) for the tests, everything under one folder.
#
#   tests/slurm/cluster.sh install          apt-get the Debian packages (root; needs the network)
#   tests/slurm/cluster.sh start DIR        start it (idempotent); prints the line to source for the clients
#   tests/slurm/cluster.sh status DIR       exit 0 when all three daemons run and the node takes jobs
#   tests/slurm/cluster.sh stop DIR         cancel every job, stop the daemons by their pid files
#
# Clients (sbatch, squeue, scontrol, and submitit's `scontrol requeue` inside a job) need `SLURM_CONF=DIR/slurm.conf`
# (sbatch passes it on into the job). DIR's path must be short: munge's unix socket path must fit in 108 bytes.
# Exit codes: 0 done, 3 not root or the packages are missing (the tests skip), 1 anything else.
# SLURMCTLD_PORT and SLURMD_PORT (default 6817, 6818) choose the ports.
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 1; }
unavailable() { echo "cluster.sh: $*" >&2; exit 3; }

command_name=${1:-}
[ -n "$command_name" ] || die "usage: $0 install | start DIR | status DIR | stop DIR"

if [ "$command_name" = install ]; then
    [ "$(id -u)" = 0 ] || unavailable "installing SLURM needs root"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || unavailable "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || unavailable "apt-get install slurmctld slurmd slurm-client munge failed"
    exit 0
fi

dir=${2:-}
[ -n "$dir" ] || die "usage: $0 $command_name DIR"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf="$dir/slurm.conf"
socket="$dir/munge/munge.socket"
[ ${#socket} -lt 100 ] || die "$dir is too long a path for munge's socket; take a shorter one (e.g. /tmp/rslurm-XXXX)"

running() {  # running PIDFILE: the process its pid file names is alive
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_ready() {
    local state
    state=$(SLURM_CONF="$conf" sinfo -h -N -o %T 2>/dev/null | head -n1) || return 1
    case "$state" in idle* | mixed* | allocated*) return 0 ;; *) return 1 ;; esac
}

all_running() {
    running "$dir/munge/munged.pid" && running "$dir/slurmctld.pid" && running "$dir/slurmd.pid"
}

stop_pidfile() {  # stop_pidfile PIDFILE: TERM, wait up to 10 s, then KILL; only the process the file names
    local pid
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

write_config() {
    local node hardware
    node=$(hostname -s)
    # "NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105": what slurmd sees, less its first word.
    hardware=$(slurmd -C | head -n1 | cut -d' ' -f2-)
    cat >"$conf" <<EOF
# Written by tests/slurm/cluster.sh: one node, no cgroups (containers), no accounting database.
ClusterName=runner-tests
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again only this many seconds after its requeue (default 120).
AuthInfo=socket=$socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
NodeName=$node NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [ "$(id -u)" = 0 ] || unavailable "a local SLURM needs root (slurmd runs jobs as their users)"
    for binary in munged slurmctld slurmd sbatch scontrol; do
        command -v "$binary" >/dev/null || unavailable "$binary not found; run \`$0 install\` as root first"
    done
    if all_running && node_ready; then
        echo "export SLURM_CONF=$conf"
        return 0
    fi
    stop  # a half-started cluster: start over

    mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
    chmod 0755 "$dir" "$dir/munge"  # munged refuses a socket folder others may write to
    if [ ! -s "$dir/munge/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0600 "$dir/munge/munge.key"
    munged --socket="$socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
        --seed-file="$dir/munge/munged.seed" --log-file="$dir/munge/munged.log" \
        || die "munged did not start; see $dir/munge/munged.log"

    write_config
    export SLURM_CONF="$conf"
    slurmctld -f "$conf" || die "slurmctld did not start; see $dir/log/slurmctld.log"
    slurmd -f "$conf" || die "slurmd did not start; see $dir/log/slurmd.log"
    for _ in $(seq 300); do
        node_ready && { echo "export SLURM_CONF=$conf"; return 0; }
        sleep 0.1
    done
    die "the node did not become ready within 30 s; see $dir/log/"
}

stop() {
    if running "$dir/slurmctld.pid"; then
        # Jobs first, so that no job outlives the daemons that would clean it up.
        SLURM_CONF="$conf" scancel --full --quiet --user=root 2>/dev/null || true
        for _ in $(seq 100); do
            [ -z "$(SLURM_CONF="$conf" squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
}

case "$command_name" in
    start) start ;;
    stop) stop ;;
    status) all_running && node_ready ;;
    *) die "unknown command $command_name; use install, start, status or stop" ;;
esac
