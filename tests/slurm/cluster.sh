#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py.
#
#   tests/slurm/cluster.sh start STATE_DIR   install (if missing) and start the cluster
#   tests/slurm/cluster.sh stop STATE_DIR    stop every daemon that `start` started
#
# Daemons: MariaDB (the accounting database), munge, slurmdbd, slurmctld, slurmd; one node
# (this machine, `hostname -s`), one partition `test`, one account `testacct` with root as
# its user. Configs are rendered from the *.in templates beside this script. Everything the
# daemons write (configs, database, spool, state, logs, pid files) stays under STATE_DIR;
# ports are picked free at start; nothing under /etc is written or read.
#
# Slurm's client commands find the cluster through SLURM_CONF. Inside a job, the Snakemake
# SLURM plugin removes most SLURM_* variables before it calls `srun`, so `start` also writes
# STATE_DIR/bin/{sbatch,srun,sacct,...}: wrappers that set SLURM_CONF and run the real
# command. A shell uses the cluster after `source STATE_DIR/env` (PATH and SLURM_CONF); the
# jobs inherit PATH, and so the wrappers (the plugin submits with `sbatch --export=ALL`).
#
# Needs root, and apt-get with the Debian archive when the packages are missing. When a step
# fails, `start` prints `cluster.sh: FAILED STEP: <step>` and that step's log on stderr and
# exits 1; `stop` then still stops whatever had been started (by the pids it recorded).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
CLIENTS=(sbatch srun salloc sacct sacctmgr squeue sinfo scontrol scancel sshare sstat)
CLUSTER=fishertest
PARTITION=test
ACCOUNT=testacct
DB_USER=slurm
DB_PASS=slurmtest
DB_NAME=slurm_acct_db

usage() {
    echo "usage: $0 start|stop STATE_DIR" >&2
    exit 2
}

fail() {  # fail STEP [LOGFILE]
    echo "cluster.sh: FAILED STEP: $1" >&2
    if [[ -n "${2:-}" && -f "$2" ]]; then
        echo "--- last lines of $2:" >&2
        tail -n 30 "$2" >&2
    fi
    exit 1
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

pick_port() {  # pick_port VAR: set VAR to a port nothing listens on at 127.0.0.1, not picked before
    local port
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 30000))
        if [[ " $PICKED_PORTS " != *" $port "* ]] && ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            PICKED_PORTS+=" $port"
            printf -v "$1" '%s' "$port"
            return 0
        fi
    done
    fail "ports: no free port found"
}

wait_for() {  # wait_for SECONDS COMMAND...: retry COMMAND every 0.2 s until it succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

install_packages() {
    local missing=() cmd t0
    for cmd in slurmctld slurmd sbatch sacct munged slurmdbd mariadbd mariadb-install-db; do
        command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] || missing+=("$cmd")
    done
    if ((${#missing[@]} == 0)); then
        echo "packages: already installed"
        return 0
    fi
    t0=$(now)
    command -v apt-get >/dev/null 2>&1 || fail "install: no apt-get to install ${PACKAGES[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >"$STATE/log/apt-update.log" 2>&1 || fail "install: apt-get update" "$STATE/log/apt-update.log"
    apt-get install -y --no-install-recommends "${PACKAGES[@]}" >"$STATE/log/apt-install.log" 2>&1 \
        || fail "install: apt-get install ${PACKAGES[*]}" "$STATE/log/apt-install.log"
    echo "packages: installed in $(elapsed "$t0") s"
}

render() {  # render TEMPLATE OUT: fill in the @NAME@ fields of tests/slurm/TEMPLATE
    sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$HOST|g" -e "s|@CLUSTER@|$CLUSTER|g" \
        -e "s|@PARTITION@|$PARTITION|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEMORY@|$MEMORY|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
        -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_USER@|$DB_USER|g" -e "s|@DB_PASS@|$DB_PASS|g" \
        -e "s|@DB_NAME@|$DB_NAME|g" "$HERE/$1" >"$2"
    if grep -q "@[A-Z_]*@" "$2"; then
        fail "config: a field of $1 left unfilled: $(grep -o "@[A-Z_]*@" "$2" | head -1)"
    fi
}

write_configs() {
    local hardware cmd
    HOST=$(hostname -s)
    hardware=$(slurmd -C 2>"$STATE/log/slurmd-C.log") || fail "config: slurmd -C" "$STATE/log/slurmd-C.log"
    CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hardware" | head -1)
    MEMORY=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hardware" | head -1)
    [[ -n "$CPUS" && -n "$MEMORY" ]] || fail "config: slurmd -C reported no CPUs or RealMemory: $hardware"
    PICKED_PORTS=""
    pick_port CTLD_PORT
    pick_port SLURMD_PORT
    pick_port DBD_PORT
    pick_port DB_PORT
    render slurm.conf.in "$STATE/etc/slurm.conf"
    render cgroup.conf.in "$STATE/etc/cgroup.conf"
    render slurmdbd.conf.in "$STATE/etc/slurmdbd.conf"
    chmod 600 "$STATE/etc/slurmdbd.conf"
    for cmd in "${CLIENTS[@]}"; do
        printf '#!/bin/sh\nSLURM_CONF=%q exec /usr/bin/%s "$@"\n' "$STATE/etc/slurm.conf" "$cmd" >"$STATE/bin/$cmd"
        chmod 755 "$STATE/bin/$cmd"
    done
    printf 'export PATH=%q:"$PATH"\nexport SLURM_CONF=%q\n' "$STATE/bin" "$STATE/etc/slurm.conf" >"$STATE/env"
}

start_mariadb() {
    mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" \
        --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
        || fail "mariadb: mariadb-install-db" "$STATE/log/mariadb-install.log"
    mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$STATE/run/mysqld.sock" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$STATE/run/mariadb.pid" --log-error="$STATE/log/mariadb.log" \
        --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
    echo $! >"$STATE/run/mariadb.launch.pid"
    wait_for 60 mariadb-admin --no-defaults --socket="$STATE/run/mysqld.sock" ping \
        || fail "mariadb: server did not answer" "$STATE/log/mariadb.log"
    mariadb --no-defaults --socket="$STATE/run/mysqld.sock" -u root >"$STATE/log/mariadb-grant.log" 2>&1 <<EOF \
        || fail "mariadb: create the accounting user" "$STATE/log/mariadb-grant.log"
CREATE USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

start_munge() {
    mungekey --create --keyfile="$STATE/munge/munge.key" >"$STATE/log/mungekey.log" 2>&1 \
        || fail "munge: create key" "$STATE/log/mungekey.log"
    chmod 600 "$STATE/munge/munge.key"
    # --force: the state dir may lie under a world-writable /tmp, which munged otherwise refuses.
    munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed" >"$STATE/log/munged.out" 2>&1 \
        || fail "munge: start munged" "$STATE/log/munged.out"
    wait_for 10 sh -c "munge -S '$STATE/munge/munge.socket' -n | unmunge -S '$STATE/munge/munge.socket'" \
        || fail "munge: munge/unmunge round trip" "$STATE/log/munged.log"
}

start_slurm() {
    export SLURM_CONF="$STATE/etc/slurm.conf"
    slurmdbd >"$STATE/log/slurmdbd.out" 2>&1 || fail "slurmdbd: start" "$STATE/log/slurmdbd.log"
    wait_for 60 sacctmgr -n list cluster || fail "slurmdbd: not answering sacctmgr" "$STATE/log/slurmdbd.log"
    {
        sacctmgr -i add cluster "$CLUSTER" &&
            sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description=tests Organization=tests &&
            sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER"
    } >"$STATE/log/sacctmgr.log" 2>&1 || fail "slurmdbd: sacctmgr add cluster/account/user" "$STATE/log/sacctmgr.log"
    slurmctld >"$STATE/log/slurmctld.out" 2>&1 || fail "slurmctld: start" "$STATE/log/slurmctld.log"
    wait_for 30 scontrol ping || fail "slurmctld: not answering scontrol ping" "$STATE/log/slurmctld.log"
    slurmd >"$STATE/log/slurmd.out" 2>&1 || fail "slurmd: start" "$STATE/log/slurmd.log"
    # The node is usable once sinfo shows it idle in the partition.
    wait_for 60 sh -c "sinfo -h -p $PARTITION -o %t | grep -qx idle" \
        || fail "slurmd: node not idle ($(sinfo -h -N -o '%N %t %E' 2>&1 | head -1))" "$STATE/log/slurmd.log"
}

start() {
    local t0 t1
    t0=$(now)
    mkdir -p "$STATE"/{etc,bin,log,run,munge,mysql,spool/ctld,spool/d}
    chmod 700 "$STATE/munge"
    [[ $(id -u) -eq 0 ]] || fail "root: the daemons run as root (uid is $(id -u))"
    install_packages
    t1=$(now)
    write_configs
    start_mariadb
    start_munge
    start_slurm
    echo "cluster: started in $(elapsed "$t1") s (install and start: $(elapsed "$t0") s); source $STATE/env"
}

stop_pid() {  # stop_pid NAME PIDFILE: TERM, then KILL after 10 s
    local name=$1 pidfile=$2 pid
    [[ -f "$pidfile" ]] || return 0
    pid=$(cat "$pidfile" 2>/dev/null || true)
    [[ -n "$pid" ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$name (pid $pid) ignored TERM: KILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

stop() {
    [[ -d "$STATE" ]] || return 0
    if [[ -f "$STATE/etc/slurm.conf" && -f "$STATE/run/slurmctld.pid" ]]; then
        # Jobs left running (a test that failed half way) go first.
        export SLURM_CONF="$STATE/etc/slurm.conf"
        timeout 10 scancel --full --partition="$PARTITION" >/dev/null 2>&1 || true
        wait_for 30 sh -c '[ -z "$(timeout 5 squeue -h -o %i)" ]' || echo "jobs still queued or running after scancel" >&2
    fi
    stop_pid slurmd "$STATE/run/slurmd.pid"
    stop_pid slurmctld "$STATE/run/slurmctld.pid"
    stop_pid slurmdbd "$STATE/run/slurmdbd.pid"
    stop_pid munged "$STATE/run/munged.pid"
    stop_pid mariadb "$STATE/run/mariadb.pid"
    stop_pid mariadb "$STATE/run/mariadb.launch.pid"
    echo "cluster: stopped"
}

[[ $# -eq 2 ]] || usage
STATE=$(mkdir -p "$2" && cd "$2" && pwd)
case "$1" in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
