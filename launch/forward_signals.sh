#!/usr/bin/env bash
# Run a training launcher so that SIGUSR1 reaches every training process.
#
#   launch/forward_signals.sh COMMAND [ARGS...]
#   e.g. launch/forward_signals.sh torchrun --nproc_per_node 8 -m distllm train CONFIG
#
# Why: distllm saves a checkpoint and exits when it gets SIGUSR1 (Slurm's `--signal=USR1@N`
# before the time limit), SIGTERM or SIGINT. Launchers get in the way of SIGUSR1: torchrun's
# agent (which `accelerate launch` runs in-process) handles only SIGTERM/SIGINT/SIGHUP/SIGQUIT,
# dies of SIGUSR1 by default and starts its workers in new sessions, so a signal sent to the
# launcher or its process group never reaches them (Accelerate #1918); in a container only PID 1
# gets `docker kill --signal=USR1`.
#
# What it does:
#   - starts COMMAND with SIGUSR1 ignored: the launcher survives it, and each worker ignores it
#     until distllm installs its own handler (dispositions are inherited through exec);
#   - on SIGUSR1: sends SIGUSR1 to every descendant process that catches it (the distllm
#     workers; the launcher ignores it, and helpers that would die of it, e.g. compile workers,
#     are left alone); touches $SIGNAL_MARKER if set (train.sbatch requeues the job on it);
#   - on SIGTERM / SIGINT / SIGHUP: passes the signal to COMMAND (torchrun forwards it to its
#     workers itself);
#   - exits with COMMAND's exit status (128 + N if it died of signal N).
#
# It may receive the same signal as its workers (Slurm signals every process of a job step):
# distllm's handler only sets a flag, so a second SIGUSR1 is harmless.
set -uo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi

# Prints the pids of all descendants of $1 (children first), read from /proc (no procps needed).
descendants() {
    local root=$1 stat line pid rest ppid
    local -A children=()
    for stat in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$stat" || continue
        pid=${line%% *}
        rest=${line##*) }  # fields after "(comm)", which may itself hold spaces
        ppid=${rest#* }
        ppid=${ppid%% *}
        children[$ppid]+=" $pid"
    done
    local queue=("$root") next
    while [ "${#queue[@]}" -gt 0 ]; do
        next=${queue[0]}
        queue=("${queue[@]:1}")
        for pid in ${children[$next]:-}; do
            echo "$pid"
            queue+=("$pid")
        done
    done
}

# True if process $1 has a handler installed for signal number $2 (SigCgt mask of /proc/PID/status).
catches() {
    local key value mask=""
    while read -r key value; do
        if [ "$key" = "SigCgt:" ]; then mask=$value; break; fi
    done 2>/dev/null <"/proc/$1/status" || return 1
    [ -n "$mask" ] && (( (16#$mask >> ($2 - 1)) & 1 ))
}

forward_usr1() {
    local pid n=0 usr1 sent="" skipped=""
    usr1=$(kill -l USR1)
    if [ -n "${SIGNAL_MARKER:-}" ]; then
        date +%s >"$SIGNAL_MARKER" 2>/dev/null || true
    fi
    for pid in $(descendants "$child"); do
        if catches "$pid" "$usr1" && kill -USR1 "$pid" 2>/dev/null; then
            n=$((n + 1))
            sent+=" $pid"
        else
            skipped+=" $pid"
        fi
    done
    # the pids say which process was or was not reached, should a worker ever miss the signal
    echo "forward_signals: SIGUSR1 forwarded to $n process(es) (pids:${sent:- none}; not catching it:${skipped:- none})" >&2
}

forward() {
    kill "-$1" "$child" 2>/dev/null || true
}

trap '' USR1
( trap - INT QUIT; exec "$@" ) &  # `&` would leave SIGINT/SIGQUIT ignored in the child
child=$!
trap forward_usr1 USR1
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP

# `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until the
# command has really exited.
while true; do
    wait "$child"
    status=$?
    if [ "$status" -gt 128 ] && kill -0 "$child" 2>/dev/null; then
        continue
    fi
    exit "$status"
done
