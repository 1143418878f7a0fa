#!/usr/bin/env bash
# A real two-node Slurm on this one machine, for tests: nodes n1 and n2 are two slurmd daemons
# (`slurmd -N n1`, `slurmd -N n2`) on 127.0.0.1 with distinct ports, one slurmctld, one munged.
# Debian/Ubuntu, as root. What it relies on: Debian's packages (slurmctld slurmd slurm-client munge);
# munged started as the munge user with the key the package creates; Debian's `slurmd -N NAME` runs two
# emulated nodes on one host when slurm.conf gives each `NodeHostname=<this host> NodeAddr=127.0.0.1` and a
# distinct Port, with `%n` in the slurmd pid file and spool dir (see `write_conf` below for every setting).
#
#   scripts/slurm_local.sh install   apt-get the packages (skipped when installed)
#   scripts/slurm_local.sh start     write the config, start the daemons, wait until n1 and n2 are idle
#   scripts/slurm_local.sh status    daemons alive? sinfo
#   scripts/slurm_local.sh stop      cancel jobs, kill the daemons by their pid files, remove the state dir
#   scripts/slurm_local.sh env       print `export SLURM_CONF=...` for clients (sbatch, sinfo, ...)
#
# Knobs (environment variables, [default]):
#   SLURM_LOCAL_DIR      state dir: config, logs, pid files, spool, munge socket; no spaces, and
#                        every parent must be world-executable (munged checks)  [/tmp/tp_lora_slurm]
#   SLURM_LOCAL_TIMEOUT  seconds `start` waits for both nodes to be idle          [60]
#   SLURM_LOCAL_KEEP     1 = `stop` keeps the state dir (logs) instead of removing it  [0]
# Clients need SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf (`eval "$(scripts/slurm_local.sh env)"`).
# Exit status of `install`: 0 ok, 3 the apt repository could not be reached, 1 anything else.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/tp_lora_slurm}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
PACKAGES=(slurmctld slurmd slurm-client munge)
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
NODES=(n1 n2)
MARKER=.slurm_local  # proves the state dir is ours before `stop` removes it

log() { echo "slurm_local: $*" >&2; }

installed() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || return 1
    done
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null
}

cmd_install() {
    if installed; then log "packages already installed"; return 0; fi
    [[ $(id -u) == 0 ]] || { log "install needs root"; return 1; }
    local out rc=0
    out=$(mktemp)
    export DEBIAN_FRONTEND=noninteractive
    {
        timeout 300 apt-get update -q &&
        timeout 300 apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
    } >"$out" 2>&1 || rc=$?
    if [[ $rc != 0 ]] || ! installed; then
        tail -n 30 "$out" >&2
        # apt-get update only warns when a repository is unreachable; install then fails to find the
        # packages or to download them.
        if grep -qiE "Could not resolve|Temporary failure|Failed to fetch|Unable to connect|Network is unreachable|Connection (failed|timed out|refused)|Unable to locate package|has no installation candidate" "$out"; then
            log "apt repository unreachable"; rm -f "$out"; return 3
        fi
        log "apt-get failed (rc=$rc)"; rm -f "$out"; return 1
    fi
    rm -f "$out"
    log "installed ${PACKAGES[*]}"
}

alive() {  # the pid in file $1 runs one of our daemons (not a stranger that reused a stale pid)
    local pid
    [[ -s "$1" ]] && pid=$(cat "$1") && kill -0 "$pid" 2>/dev/null &&
        grep -qxE 'slurmctld|slurmd|munged' "/proc/$pid/comm" 2>/dev/null
}

pid_files() { echo "$DIR/run/slurmctld.pid"; for n in "${NODES[@]}"; do echo "$DIR/run/slurmd.$n.pid"; done; echo "$DIR/munge/munged.pid"; }

all_alive() { local f; for f in $(pid_files); do alive "$f" || return 1; done; }

free_ports() {  # N distinct free TCP ports, held open together while picked so they differ
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

nodes_idle() {
    local states
    states=$(SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    for n in "${NODES[@]}"; do grep -qE "^$n idle$" <<<"$states" || return 1; done
}

dump_logs() { local f; for f in "$DIR"/log/*.log; do [[ -f $f ]] && { echo "== $f" >&2; tail -n 20 "$f" >&2; }; done; }

write_conf() {
    local host ctld_port p1 p2
    host=$(hostname -s)
    read -r ctld_port p1 p2 <<<"$(free_ports 3)"
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh; two emulated nodes on $host.
ClusterName=tplora
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
# Keep n1/n2 at CPUs=2 even where slurmd counts fewer cores (else it drains the node).
SlurmdParameters=config_overrides
MailProg=/bin/true
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$p1 CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$p2 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

cmd_start() {
    [[ $(id -u) == 0 ]] || { log "start needs root"; return 1; }
    installed || { log "packages missing: run '$0 install'"; return 1; }
    if all_alive && nodes_idle; then log "already running ($DIR)"; return 0; fi
    if [[ -e "$DIR" && ! -f "$DIR/$MARKER" && -n "$(ls -A "$DIR")" ]]; then
        log "$DIR exists and was not written by this script; choose another SLURM_LOCAL_DIR"; return 1
    fi
    cmd_stop  # a half-started or stale instance: start over from a clean state dir
    mkdir -p "$DIR" && touch "$DIR/$MARKER"
    mkdir -p "$DIR"/{run,log,ctld,munge} "${NODES[@]/#/$DIR/spool/}"
    chmod 755 "$DIR"
    chown munge:munge "$DIR/munge"
    chmod 755 "$DIR/munge"  # munged requires world-execute on its socket dir
    write_conf

    su -s /bin/sh munge -c "/usr/sbin/munged --socket=$MUNGE_SOCKET --pid-file=$DIR/munge/munged.pid \
        --log-file=$DIR/munge/munged.log --seed-file=$DIR/munge/munged.seed"
    munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET" >/dev/null || { log "munge does not work"; return 1; }

    slurmctld -c -f "$CONF"
    for n in "${NODES[@]}"; do slurmd -N "$n" -f "$CONF"; done

    local deadline=$(( SECONDS + TIMEOUT ))
    until nodes_idle; do
        if (( SECONDS >= deadline )); then
            log "n1/n2 not idle after ${TIMEOUT}s:"; SLURM_CONF=$CONF sinfo -N >&2 || true; dump_logs
            return 1
        fi
        sleep 0.5
    done
    log "running: $(SLURM_CONF=$CONF sinfo -h -o '%P %D %t %N' | tr '\n' ' ')(SLURM_CONF=$CONF)"
}

stop_pid_files() {  # TERM the pids recorded in the given files together, wait up to 10 s, then KILL
    local f pids=() pid i
    for f in "$@"; do alive "$f" && pids+=("$(cat "$f")"); done
    (( ${#pids[@]} )) || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for i in $(seq 100); do
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; done
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pids ${pids[*]} ignored SIGTERM for 10 s; killing"
    kill -9 "${pids[@]}" 2>/dev/null || true
}

cmd_stop() {
    if [[ -f "$CONF" ]] && alive "$DIR/run/slurmctld.pid"; then
        # Jobs first, so slurmstepd and the job's processes end before their slurmd does.
        SLURM_CONF=$CONF timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
        local i
        for i in $(seq 20); do
            [[ -z "$(SLURM_CONF=$CONF timeout 5 squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
    local n slurm_pids=("$DIR/run/slurmctld.pid")
    for n in "${NODES[@]}"; do slurm_pids+=("$DIR/run/slurmd.$n.pid"); done
    stop_pid_files "${slurm_pids[@]}"
    stop_pid_files "$DIR/munge/munged.pid"  # last: slurm daemons talk to it until they exit
    if [[ ! -e "$DIR" ]]; then
        return 0
    elif [[ "${SLURM_LOCAL_KEEP:-0}" == 1 ]]; then
        log "stopped; state kept in $DIR"
    elif [[ -f "$DIR/$MARKER" ]]; then
        rm -rf "$DIR"
        log "stopped; removed $DIR"
    else
        log "stopped; $DIR has no $MARKER, so it was not written by this script: left in place"
    fi
}

cmd_status() {
    local f rc=0
    for f in $(pid_files); do
        if alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): stopped"; rc=1; fi
    done
    if [[ $rc == 0 ]]; then SLURM_CONF=$CONF timeout 10 sinfo -N || rc=1; fi
    return $rc
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
