#!/usr/bin/env bash
# Stop the test cluster that start.sh started: cancel its jobs, then end exactly the daemons whose
# PIDs start.sh recorded under $RSD_SLURM_DIR/pids (TERM, then KILL after 10 s), newest first.
# Other processes, and SLURM daemons this script did not start, are left alone.
#   scripts/slurm/stop.sh            # keep the state (a restart takes ~2 s)
#   scripts/slurm/stop.sh --wipe     # also delete $RSD_SLURM_DIR (job ids start again at 1)
set -uo pipefail
DIR="${RSD_SLURM_DIR:-/tmp/rsd_batch-slurm-$(id -u)}"
export SLURM_CONF="$DIR/slurm.conf" PATH="$PATH:/usr/sbin:/sbin"
[[ -d $DIR/pids ]] || { echo "no test cluster in $DIR"; exit 0; }

alive() {
    local f="$DIR/pids/$1.pid"
    [[ -f $f ]] && [[ -d /proc/$(cat "$f") ]] && grep -q "$1" "/proc/$(cat "$f")/cmdline" 2>/dev/null
}
if alive slurmctld; then  # jobs of this cluster only: its own controller answers
    scancel --full --quiet -u "$(id -un)" 2>/dev/null || true
fi
for name in slurmd slurmctld slurmdbd mariadbd munged; do
    if alive "$name"; then
        pid=$(cat "$DIR/pids/$name.pid")
        kill -TERM "$pid" 2>/dev/null
        for ((i = 0; i < 50; i++)); do [[ -d /proc/$pid ]] || break; sleep 0.2; done
        [[ -d /proc/$pid ]] && kill -KILL "$pid" 2>/dev/null
        echo "stopped $name ($pid)"
    fi
    rm -f "$DIR/pids/$name.pid"
done
if [[ "${1:-}" == "--wipe" ]]; then
    rm -rf "$DIR" && echo "deleted $DIR"
fi
