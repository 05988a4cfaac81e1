#!/usr/bin/env bash
# A one- or two-node SLURM (munged + slurmctld + slurmd) for the tests, run wholly from a folder of its own: its
# slurm.conf, state, spool, logs and pid files, free ports of its own, ClusterName=ssmforge_test and a
# munged of its own (own socket and key, named by AuthInfo=socket=...). Nothing under /etc is read or
# written, so a site's SLURM and munge on this machine (a login node, a cluster's container) stay as
# they are; SLURM commands reach this cluster only through SLURM_CONF=DIR/slurm.conf.
#
#   bash slurm/start_local_cluster.sh [start|stop|status|install] [DIR]
#     start   (default) start the cluster in DIR; idempotent: when DIR's cluster answers and its node is
#             usable, do nothing. A cluster that half-answers is stopped and started afresh.
#     stop    cancel its jobs, then stop the slurmd, slurmctld and munged it started (by DIR's pid files)
#     status  exit 0 when DIR's cluster answers and its node is usable, 1 otherwise
#     install only install the packages where they are missing (see below); start does it too
#   DIR defaults to $SSMFORGE_TEST_SLURM_DIR, else ${TMPDIR:-/tmp}/ssmforge-slurm-<uid>. Then:
#     export SLURM_CONF=DIR/slurm.conf; sinfo; sbatch ...
#   The tests (tests/slurm/conftest.py) start one in a temporary folder per session and stop it at the end.
#   SSMFORGE_SLURM_NODES=2 starts two nodes on this machine, named after the host and `localhost` (names
#   that resolve here); each is a slurmd of its own with a private /dev/shm, as a real node has (a mount
#   namespace, `unshare -m`), and each offers all of the machine's CPUs, so jobs on both share the cores.
#
# Made for a container: proctrack/linuxproc, task/none, no cgroups, no accounting daemon; needs root
# (slurmd starts the jobs). Where slurmctld, slurmd, munged or sbatch is missing it installs Debian's
# packages only when SSMFORGE_TEST_SLURM_INSTALL=1 (root and apt-get); without it, it exits 3 with one
# line saying so. Any other failure: one line on stderr, exit 1. SSMFORGE_SLURM_QUIET=1 silences progress.
set -uo pipefail

fail() { echo "start_local_cluster: $*" >&2; exit "${FAIL_CODE:-1}"; }
say() { [ -n "${SSMFORGE_SLURM_QUIET:-}" ] || echo "start_local_cluster: $*"; }

MODE=start
case "${1:-}" in start|stop|status|install) MODE=$1; shift ;; -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac
[ $# -le 1 ] || fail "usage: start_local_cluster.sh [start|stop|status|install] [DIR]"
DIR=${1:-${SSMFORGE_TEST_SLURM_DIR:-${TMPDIR:-/tmp}/ssmforge-slurm-$EUID}}
case "$DIR" in /*) ;; *) DIR=$PWD/$DIR ;; esac
CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
SOCKET=$MUNGE_DIR/munge.socket
PACKAGES="slurmctld slurmd munge slurm-client"
NODES=${SSMFORGE_SLURM_NODES:-1}
case "$NODES" in 1|2) ;; *) fail "SSMFORGE_SLURM_NODES=$NODES: 1 or 2 nodes (two names resolve on one machine)" ;; esac
# every SLURM command of this script (and of the jobs it runs) reads this cluster's config, never /etc's
export SLURM_CONF=$CONF

# ---- the daemons this folder started, by their pid files -------------------------------------------
# a pid file names our daemon only while that process lives (a zombie does not) and is the program
# (pids are reused)
running() {  # running NAME PIDFILE
    local pid stat
    pid=$(cat "$2" 2>/dev/null) && [ -n "$pid" ] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    case "$stat" in "$pid ($1) Z"*|"$pid ($1) X"*) return 1 ;; "$pid ($1) "*) return 0 ;; esac
    return 1
}

stop_daemon() {  # stop_daemon NAME PIDFILE
    running "$1" "$2" || { rm -f "$2"; return 0; }
    local pid
    pid=$(cat "$2")
    kill "$pid" 2>/dev/null
    for _ in $(seq 40); do running "$1" "$2" || break; sleep 0.25; done
    running "$1" "$2" && { kill -9 "$pid" 2>/dev/null; sleep 0.5; }
    running "$1" "$2" && fail "cannot stop $1 (pid $pid)"
    rm -f "$2"
}

munge_works() { munge -n -S "$SOCKET" 2>/dev/null | unmunge -S "$SOCKET" >/dev/null 2>&1; }

node_names() { echo "$HOST"; [ "$NODES" = 1 ] || echo localhost; }

node_ready() {  # node_ready NAME
    local state
    state=$(sinfo -h -n "$1" -o %T 2>/dev/null | head -n1)
    case "$state" in idle|mixed|allocated|completing) return 0 ;; esac
    return 1
}

nodes_ready() {
    local name
    for name in $(node_names); do node_ready "$name" || return 1; done
}

cluster_up() {
    [ -s "$CONF" ] && command -v scontrol >/dev/null && running munged "$MUNGE_DIR/munged.pid" \
        && running slurmctld "$DIR/slurmctld.pid" && scontrol ping >/dev/null 2>&1 || return 1
    [ "$(sinfo -h -N -o %N 2>/dev/null | sort -u | wc -l)" = "$NODES" ] || return 1
    local name
    for name in $(node_names); do running slurmd "$DIR/slurmd-$name.pid" || return 1; done
    nodes_ready
}

stop_cluster() {
    if [ -s "$CONF" ] && running slurmctld "$DIR/slurmctld.pid" && scontrol ping >/dev/null 2>&1; then
        # jobs first: their steps would outlive slurmd
        squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null
        for _ in $(seq 60); do [ -z "$(squeue -h -t R,CG -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    local pidfile
    for pidfile in "$DIR"/slurmd*.pid; do [ -e "$pidfile" ] && stop_daemon slurmd "$pidfile"; done
    stop_daemon slurmctld "$DIR/slurmctld.pid"
    stop_daemon munged "$MUNGE_DIR/munged.pid"
}

# ---- free ports --------------------------------------------------------------------------------------
port_in_use() {  # any socket bound to this local port (IPv4 or IPv6)
    local hex files=() f
    hex=$(printf '%04X' "$1")
    for f in /proc/net/tcp /proc/net/tcp6; do [ -r "$f" ] && files+=("$f"); done
    [ ${#files[@]} -gt 0 ] || return 1
    awk -v p="$hex" 'FNR > 1 { sub(/.*:/, "", $2); if ($2 == p) found = 1 } END { exit !found }' "${files[@]}"
}

free_port() {  # free_port [TAKEN]: a free port in [10000, 20000), below both the jobs' MASTER_PORT range
    local port      # (20000 + job id mod 20000) and Linux's ephemeral ports, so neither takes it first
    for _ in $(seq 200); do
        port=$((10000 + RANDOM % 10000))
        [ "$port" != "${1:-}" ] && ! port_in_use "$port" && { echo "$port"; return 0; }
    done
    return 1
}

# ---- the packages ------------------------------------------------------------------------------------
COMMANDS="slurmctld slurmd munged munge sbatch srun scontrol sinfo squeue scancel"
have_slurm() {
    local cmd
    for cmd in $COMMANDS; do command -v "$cmd" >/dev/null || return 1; done
}

install_slurm() {  # Debian's packages, only when asked for: the system's package set is not ours to change
    have_slurm && return 0
    if [ "${SSMFORGE_TEST_SLURM_INSTALL:-}" != 1 ]; then
        FAIL_CODE=3 fail "SLURM is not installed here; set SSMFORGE_TEST_SLURM_INSTALL=1 to let this script" \
            "install Debian's $PACKAGES (root, apt-get)"
    fi
    [ "$EUID" = 0 ] || fail "not root: cannot install $PACKAGES"
    command -v apt-get >/dev/null || fail "SLURM is not installed and there is no apt-get to install it"
    mkdir -p "$DIR/log" || fail "cannot create $DIR/log"
    say "installing $PACKAGES (apt-get, SSMFORGE_TEST_SLURM_INSTALL=1)"
    local log=$DIR/log/apt.log cmd
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $PACKAGES >"$log" 2>&1 \
        || { apt-get update -q >>"$log" 2>&1 \
             && apt-get install -y -q --no-install-recommends $PACKAGES >>"$log" 2>&1; } \
        || fail "apt-get install of $PACKAGES failed (see $log)"
    hash -r
    for cmd in $COMMANDS; do command -v "$cmd" >/dev/null || fail "$cmd is missing after installing $PACKAGES"; done
}

# ---- modes -------------------------------------------------------------------------------------------
case "$MODE" in
    install) install_slurm; exit 0 ;;
    stop)
        [ -d "$DIR" ] || { say "nothing to stop in $DIR"; exit 0; }
        stop_cluster
        say "stopped the cluster of $DIR"
        exit 0 ;;
esac
if have_slurm; then
    HOST=$(hostname -s) || fail "hostname -s failed"
    if cluster_up; then
        [ "$MODE" = status ] && exit 0
        say "SLURM already running on $HOST (SLURM_CONF=$CONF)"
        exit 0
    fi
fi
[ "$MODE" = status ] && exit 1
install_slurm
HOST=$(hostname -s) || fail "hostname -s failed"

[ "$EUID" = 0 ] || fail "not root: slurmd must run as root to start jobs"
# nproc alone would answer OMP_NUM_THREADS when it is set
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) || fail "nproc failed"
# a unix socket path holds at most 107 bytes; slurmstepd's sockets in the spool folder are longer still
[ ${#DIR} -le 70 ] || fail "$DIR is too long for the cluster's sockets (at most 70 characters): pass a shorter DIR"

# a cluster that half-answers (a daemon died, a stale node) is restarted whole, on fresh ports
stop_cluster
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$MUNGE_DIR" || fail "cannot create folders in $DIR"
# munge clients of any user may reach the socket; the key itself is readable by root alone
chmod 755 "$DIR" && chmod 711 "$MUNGE_DIR" || fail "cannot chmod $DIR"

# munge: a key of this cluster, and munged on this folder's socket (--force: it runs as root here)
KEY=$MUNGE_DIR/munge.key
if [ ! -s "$KEY" ]; then
    (umask 077 && dd if=/dev/urandom of="$KEY" bs=1024 count=1 status=none) || fail "cannot write $KEY"
fi
chmod 400 "$KEY"
say "starting munged on $SOCKET"
munged --force --socket="$SOCKET" --key-file="$KEY" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$MUNGE_DIR/munged.seed" >>"$DIR/log/munged.start.log" 2>&1 \
    || fail "munged did not start (see $DIR/log/munged.log)"
for _ in $(seq 40); do munge_works && break; sleep 0.25; done
munge_works || fail "munge does not work on $SOCKET (see $DIR/log/munged.log)"

CTLD_PORT=$(free_port) || fail "no free port for slurmctld"
FIRST_JOB_ID=$((1 + RANDOM % 19000))
SLURMD_PORT=$(free_port "$CTLD_PORT") || fail "no free port for slurmd"
NODE_LINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS Port=$SLURMD_PORT State=UNKNOWN"
if [ "$NODES" = 2 ]; then
    SECOND_PORT=$(free_port "$SLURMD_PORT") || fail "no free port for the second slurmd"
    [ "$SECOND_PORT" != "$CTLD_PORT" ] || SECOND_PORT=$(free_port "$SLURMD_PORT") || fail "no free port"
    NODE_LINES="$NODE_LINES
NodeName=localhost NodeHostname=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS Port=$SECOND_PORT State=UNKNOWN"
fi
cat >"$CONF" <<EOF || fail "cannot write $CONF"
# written by ssmforge slurm/start_local_cluster.sh: a $NODES-node test cluster of its own (SLURM_CONF=$CONF)
ClusterName=ssmforge_test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# this folder's munged; credentials live 10 s (default 120): a requeued job waits cred_expire + 1 s
# before it may start again
AuthInfo=socket=$SOCKET,cred_expire=10
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
# job ids from a random start: a job's MASTER_PORT derives from its id, and two clusters on one machine
# should not give their jobs the same one (a random start makes a clash unlikely, not impossible)
FirstJobId=$FIRST_JOB_ID
MinJobAge=3600
KillWait=10
# slurmd answers late on a loaded host: a message that times out (10 s by default) is retried
# later, and a late step kill may reach the step of the same id in a job that was requeued meanwhile
MessageTimeout=30
InactiveLimit=0
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
$NODE_LINES
PartitionName=debug Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

say "starting slurmctld on port $CTLD_PORT"
slurmctld -f "$CONF" >>"$DIR/log/slurmctld.start.log" 2>&1 \
    || fail "slurmctld did not start (see $DIR/log/slurmctld.log)"
for _ in $(seq 40); do scontrol ping >/dev/null 2>&1 && break; sleep 0.25; done
scontrol ping >/dev/null 2>&1 || fail "slurmctld does not answer (see $DIR/log/slurmctld.log)"
for name in $(node_names); do
    say "starting slurmd for node $name with $CPUS CPUs"
    if [ "$NODES" = 1 ]; then
        slurmd -f "$CONF" -N "$name" >>"$DIR/log/slurmd.start.log" 2>&1
    else  # a /dev/shm of its own: streaming names its shared memory after the shard folder, per node
        unshare -m --propagation private sh -c 'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec slurmd -f "$1" -N "$2"' \
            node "$CONF" "$name" >>"$DIR/log/slurmd.start.log" 2>&1
    fi || fail "slurmd for $name did not start (see $DIR/log/slurmd-$name.log and slurmd.start.log)"
done
for _ in $(seq 60); do nodes_ready && break; sleep 0.5; done
for name in $(node_names); do
    node_ready "$name" && continue
    scontrol update nodename="$name" state=resume >/dev/null 2>&1
    for _ in $(seq 20); do node_ready "$name" && break; sleep 0.5; done
    node_ready "$name" || fail "node $name is not idle: $(sinfo -h -n "$name" -o '%T %E' 2>&1 | head -n1)"
done
say "SLURM up: node(s) $(node_names | paste -sd' '), $CPUS CPUs each, partition debug; use it with SLURM_CONF=$CONF"
