#!/usr/bin/env bash
# One end of scripts/bench's ghostunnel chain. ghostunnel serves one
# listener per process, so this starts one process per LISTEN TARGET pair
# and waits for them all: scripts/bench starts it in a process group of its
# own and measures (and stops) the group as one proxy.
# Usage: end.sh GHOSTUNNEL server|client LISTEN TARGET [LISTEN TARGET ...] -- FLAGS...
set -euo pipefail
ghostunnel=$1 mode=$2
shift 2
pairs=()
while (($#)) && [[ $1 != -- ]]; do
    pairs+=("$1")
    shift
done
[[ ${1:-} == -- ]] || { echo "end.sh: missing -- before the ghostunnel flags" >&2; exit 2; }
shift
for ((i = 0; i + 1 < ${#pairs[@]}; i += 2)); do
    "$ghostunnel" "$mode" --listen "127.0.0.1:${pairs[i]}" --target "127.0.0.1:${pairs[i + 1]}" "$@" &
done
wait
