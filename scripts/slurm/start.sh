#!/usr/bin/env bash
# Start (or find running) a single-node SLURM test cluster on loopback: munged, MariaDB, slurmdbd,
# slurmctld, slurmd, each started here in the background with its PID recorded, so that stop.sh
# ends exactly these processes and nothing else.
#
#   scripts/slurm/start.sh            # idempotent: daemons already running are kept
#   eval "$(scripts/slurm/start.sh --env)"   # same, then print only `export SLURM_CONF=...`
#
# Everything lives under $RSD_SLURM_DIR (default /tmp/rsd_batch-slurm-$UID): configs, munge key and
# socket, the MariaDB data folder, SLURM state, logs (log/), PIDs (pids/). Installs Debian's packages
# (slurmctld slurmd slurm-client munge slurmdbd mariadb-server) first when they are missing.
# Settings: RSD_SLURM_PORT_BASE (16817: slurmctld, +1 slurmd, +2 slurmdbd, +3 MariaDB),
# RSD_SLURM_MAX_ARRAY_SIZE (4), RSD_SLURM_CRED_EXPIRE (10 s: how long a requeued job waits).
set -euo pipefail

ENV_ONLY=0
[[ "${1:-}" == "--env" ]] && ENV_ONLY=1
say() { if [[ $ENV_ONLY == 1 ]]; then echo "$*" >&2; else echo "$*"; fi; }
die() { echo "start.sh: error: $*" >&2; exit 1; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${RSD_SLURM_DIR:-/tmp/rsd_batch-slurm-$(id -u)}"
BASE="${RSD_SLURM_PORT_BASE:-16817}"
CTLD_PORT=$BASE; SLURMD_PORT=$((BASE + 1)); DBD_PORT=$((BASE + 2)); MYSQL_PORT=$((BASE + 3))
MAX_ARRAY_SIZE="${RSD_SLURM_MAX_ARRAY_SIZE:-4}"
CRED_EXPIRE="${RSD_SLURM_CRED_EXPIRE:-10}"
USER_NAME="$(id -un)"
export SLURM_CONF="$DIR/slurm.conf"

# ---------------------------------------------------------------- packages
need=()
for b in slurmctld slurmd sbatch sacct munged slurmdbd mariadbd mariadb-install-db; do
    command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || need+=("$b")
done
if (( ${#need[@]} )); then
    say "installing SLURM and MariaDB from Debian's packages (missing: ${need[*]}) ..."
    SUDO=""
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null && sudo -n true 2>/dev/null || die "missing ${need[*]} and not root (no passwordless sudo): install slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
        SUDO="sudo -n"
    fi
    export DEBIAN_FRONTEND=noninteractive
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge slurmdbd mariadb-server; } >"/tmp/rsd_batch-slurm-apt.log" 2>&1 \
        || die "apt-get install failed; see /tmp/rsd_batch-slurm-apt.log"
fi
export PATH="$PATH:/usr/sbin:/sbin"

mkdir -p "$DIR"/{munge,mysql,state,spool,run,log,pids}
chmod 711 "$DIR" "$DIR/munge"

alive() {  # alive NAME: the process started here under NAME is still running
    local f="$DIR/pids/$1.pid" pid
    [[ -f $f ]] || return 1
    pid=$(cat "$f")
    [[ -d /proc/$pid ]] && grep -q "$1" "/proc/$pid/cmdline" 2>/dev/null
}
launch() {  # launch NAME CMD...: start CMD in its own session, record its PID
    local name=$1; shift
    setsid "$@" >>"$DIR/log/$name.console" 2>&1 </dev/null &
    echo $! >"$DIR/pids/$name.pid"
}
wait_for() {  # wait_for NAME SECONDS CMD...: until CMD succeeds; fail at once if NAME died
    local name=$1 secs=$2; shift 2
    for ((i = 0; i < secs * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        alive "$name" || die "$name exited at start; see $DIR/log/$name.console and $DIR/log/"
        sleep 0.2
    done
    die "$name did not come up within ${secs}s; see $DIR/log/"
}
started=()

# ---------------------------------------------------------------- configs
if [[ ! -f $DIR/slurm.conf ]]; then
    read -r CPUS MEMORY < <(slurmd -C | awk '{for (i = 1; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}} /NodeName/ {print v["CPUs"], v["RealMemory"]; exit}')
    [[ -n ${CPUS:-} && -n ${MEMORY:-} ]] || die "could not read CPUs and RealMemory from slurmd -C"
    DB_PASS="rsd-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    fill() {
        sed -e "s|@DIR@|$DIR|g" -e "s|@USER@|$USER_NAME|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
            -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
            -e "s|@MYSQL_PORT@|$MYSQL_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" -e "s|@CPUS@|$CPUS|g" \
            -e "s|@MEMORY@|$MEMORY|g" -e "s|@MAX_ARRAY_SIZE@|$MAX_ARRAY_SIZE|g" \
            -e "s|@CRED_EXPIRE@|$CRED_EXPIRE|g" "$1"
    }
    fill "$HERE/slurmdbd.conf.in" >"$DIR/slurmdbd.conf"
    chmod 600 "$DIR/slurmdbd.conf"
    echo "$DB_PASS" >"$DIR/mysql.pass"; chmod 600 "$DIR/mysql.pass"
    fill "$HERE/slurm.conf.in" >"$DIR/slurm.conf.tmp" && mv "$DIR/slurm.conf.tmp" "$DIR/slurm.conf"
fi

# ---------------------------------------------------------------- munged (private key and socket)
SOCK="$DIR/munge/munge.socket"
if ! alive munged; then
    [[ -f $DIR/munge/munge.key ]] || { head -c 1024 /dev/urandom >"$DIR/munge/munge.key"; chmod 400 "$DIR/munge/munge.key"; }
    rm -f "$SOCK" "$SOCK.lock"
    launch munged munged --foreground --force --key-file="$DIR/munge/munge.key" --socket="$SOCK" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for munged 20 bash -c "munge -n -S '$SOCK' | unmunge -S '$SOCK'"
    started+=(munged)
fi

# ---------------------------------------------------------------- MariaDB (accounting storage)
MYSOCK="$DIR/mysql/mysqld.sock"
mysql_root() { mariadb --no-defaults --socket="$MYSOCK" -uroot "$@"; }
if ! alive mariadbd; then
    fresh_db=0
    if [[ ! -d $DIR/mysql/data/mysql ]]; then
        mariadb-install-db --no-defaults --user="$USER_NAME" --datadir="$DIR/mysql/data" \
            --auth-root-authentication-method=socket --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
        fresh_db=1
    fi
    rm -f "$MYSOCK"
    launch mariadbd mariadbd --no-defaults --user="$USER_NAME" --datadir="$DIR/mysql/data" \
        --socket="$MYSOCK" --port="$MYSQL_PORT" --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadbd.pid" \
        --log-error="$DIR/log/mariadbd.log" --innodb-buffer-pool-size=64M --skip-log-bin \
        --innodb-lock-wait-timeout=900 --max-connections=50
    wait_for mariadbd 60 mariadb-admin --no-defaults --socket="$MYSOCK" -uroot ping
    if [[ $fresh_db == 1 ]]; then
        P=$(cat "$DIR/mysql.pass")
        mysql_root -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$P';
            CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$P';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
    fi
    started+=(mariadbd)
fi

# ---------------------------------------------------------------- slurmdbd, then the cluster record
if ! alive slurmdbd; then
    launch slurmdbd slurmdbd -D  # reads slurmdbd.conf next to $SLURM_CONF
    wait_for slurmdbd 60 sacctmgr -n show cluster
    started+=(slurmdbd)
fi
if ! sacctmgr -n -P show cluster format=cluster | grep -qx rsdtest; then
    sacctmgr -i add cluster rsdtest >/dev/null
fi

# ---------------------------------------------------------------- slurmctld, slurmd
if ! alive slurmctld; then
    launch slurmctld slurmctld -D -f "$SLURM_CONF"
    wait_for slurmctld 60 scontrol ping
    started+=(slurmctld)
fi
if ! alive slurmd; then
    launch slurmd slurmd -D -N localhost -f "$SLURM_CONF"
    started+=(slurmd)
fi
node_ready() { sinfo -h -n localhost -o %t | grep -Eq '^(idle|mix|alloc)'; }
for ((i = 0; i < 150; i++)); do
    node_ready && break
    if sinfo -h -n localhost -o %t | grep -Eq '^(down|drain)'; then
        scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    fi
    sleep 0.2
done
node_ready || die "the node did not become idle; see $DIR/log/slurmd.log and slurmctld.log"

if (( ${#started[@]} )); then
    say "SLURM test cluster started (${started[*]}) in $DIR"
else
    say "SLURM test cluster already running in $DIR"
fi
say "logs: $DIR/log/   stop: $HERE/stop.sh"
echo "export SLURM_CONF=$SLURM_CONF" >"$DIR/env.sh"
echo "export SLURM_CONF=$SLURM_CONF"  # the last line, in both modes
