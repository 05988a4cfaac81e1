#!/usr/bin/env bash
# Start a single-node SLURM (munge + slurmctld + slurmd) on this machine, for the tests.
#
# Made for a container: proctrack/linuxproc, task/none, no cgroups, no accounting daemon. Installs
# Debian's packages if they are missing (needs root and apt), writes /etc/slurm/slurm.conf for this
# host (`hostname -s`, `nproc` CPUs), and waits until the node is idle. Idempotent: when a controller
# already answers and the node is usable it does nothing. On failure it prints one line and exits 1.
#   bash slurm/start_local_cluster.sh          # SSMFORGE_SLURM_QUIET=1 silences progress lines
set -uo pipefail

fail() { echo "start_local_cluster: $*" >&2; exit 1; }
say() { [ -n "${SSMFORGE_SLURM_QUIET:-}" ] || echo "start_local_cluster: $*"; }

node_ready() {
    local state
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1)
    case "$state" in idle|mixed|allocated|completing) return 0 ;; esac
    return 1
}

HOST=$(hostname -s) || fail "hostname -s failed"
CPUS=$(nproc) || fail "nproc failed"
STATE=/var/spool/ssmforge-slurm
CONF=/etc/slurm/slurm.conf

NEW_CONF=$(cat <<EOF
# written by ssmforge slurm/start_local_cluster.sh: a one-node test cluster in a container
ClusterName=ssmforge
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# credentials live 10 s (default 120): a requeued job waits cred_expire + 1 s before it may start again
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
InactiveLimit=0
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)

if command -v sinfo >/dev/null 2>&1 && scontrol ping >/dev/null 2>&1 && node_ready \
        && [ "$(cat "$CONF" 2>/dev/null)" = "$NEW_CONF" ]; then
    say "SLURM already running on $HOST"
    exit 0
fi

[ "$(id -u)" = 0 ] || fail "not root: cannot install or start slurmctld/slurmd/munge here"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || fail "slurm is not installed and there is no apt-get to install it"
    say "installing slurmctld slurmd munge slurm-client (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurmctld slurmd munge slurm-client >/tmp/ssmforge-slurm-apt.log 2>&1 \
        || { apt-get update -q >>/tmp/ssmforge-slurm-apt.log 2>&1 \
             && apt-get install -y -q slurmctld slurmd munge slurm-client >>/tmp/ssmforge-slurm-apt.log 2>&1; } \
        || fail "apt-get install of slurm failed (see /tmp/ssmforge-slurm-apt.log)"
fi

# munge: a key, then the daemon (as the munge user when it exists)
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none || fail "cannot write munge key"
fi
MUNGE_USER=root
id munge >/dev/null 2>&1 && MUNGE_USER=munge
chown -R "$MUNGE_USER" /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 700 /etc/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [ "$MUNGE_USER" = munge ]; then
        runuser -u munge -- munged >/dev/null 2>&1 || fail "munged did not start"
    else
        munged --force >/dev/null 2>&1 || fail "munged did not start"
    fi
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || fail "munge does not work after starting munged"
fi

mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" /var/log/slurm
if [ "$(cat "$CONF" 2>/dev/null)" != "$NEW_CONF" ]; then
    printf '%s\n' "$NEW_CONF" > "$CONF" || fail "cannot write $CONF"
    # a changed config needs fresh daemons
    [ -s "$STATE/slurmctld.pid" ] && kill "$(cat "$STATE/slurmctld.pid")" 2>/dev/null
    [ -s "$STATE/slurmd.pid" ] && kill "$(cat "$STATE/slurmd.pid")" 2>/dev/null
    sleep 1
fi

if ! scontrol ping >/dev/null 2>&1; then
    say "starting slurmctld"
    slurmctld >>/var/log/slurm/slurmctld.start.log 2>&1 \
        || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
    for _ in $(seq 40); do scontrol ping >/dev/null 2>&1 && break; sleep 0.25; done
    scontrol ping >/dev/null 2>&1 || fail "slurmctld does not answer (see /var/log/slurm/slurmctld.log)"
fi
if ! { [ -s "$STATE/slurmd.pid" ] && kill -0 "$(cat "$STATE/slurmd.pid")" 2>/dev/null; }; then
    say "starting slurmd on $HOST with $CPUS CPUs"
    slurmd >>/var/log/slurm/slurmd.start.log 2>&1 || fail "slurmd did not start (see /var/log/slurm/slurmd.log)"
fi
for _ in $(seq 60); do node_ready && break; sleep 0.5; done
if ! node_ready; then
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1
    for _ in $(seq 20); do node_ready && break; sleep 0.5; done
fi
node_ready || fail "node $HOST is not idle: $(sinfo -h -n "$HOST" -o '%T %E' 2>&1 | head -n1)"
say "SLURM up: node $HOST, $CPUS CPUs, partition debug"
