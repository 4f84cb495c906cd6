#!/usr/bin/env bash
# spiffe-tunnel with a real SPIRE server and agent on one machine.
#
# Needs spire-server and spire-agent: a SPIRE release you installed
# (https://spiffe.io/downloads) on PATH, or given as SPIRE_SERVER/SPIRE_AGENT
# (scripts/test builds v1.13.3 into target/spire/1.13.3/bin).
# It starts the server, attests an agent with a join token, registers two
# workloads for your uid (spiffe://example.org/web and .../api), starts an
# inbound and an outbound tunnel end against the agent's Workload API, and
# sends a request through them. Everything stops on exit (Ctrl-C).
#
# Usage: scripts/spire-quickstart.sh        (from the repository root)
#
# Environment (all optional):
#   SPIRE_SERVER, SPIRE_AGENT  the SPIRE binaries (default: from PATH)
#   SPIFFE_TUNNEL              the spiffe-tunnel binary (default: target/release,
#                              built if missing)
#   QUICKSTART_DIR             work folder for SPIRE's data, sockets and all logs
#                              (default /tmp/spiffe-tunnel-spire; emptied first)
#   QUICKSTART_AGENT_SOCKET    the agent's Workload API socket (default
#                              /tmp/spire-agent/public/api.sock, which
#                              examples/spire/*.toml name)
# Fixed ports: SPIRE server 8081, backend 8000, tunnels 8443 and 8080, admin
# endpoints 9901 and 9902.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
spire_server=${SPIRE_SERVER:-spire-server}
spire_agent=${SPIRE_AGENT:-spire-agent}
tunnel=${SPIFFE_TUNNEL:-"$repo/target/release/spiffe-tunnel"}
work=${QUICKSTART_DIR:-/tmp/spiffe-tunnel-spire}
server_socket=$work/server/api.sock
agent_socket=${QUICKSTART_AGENT_SOCKET:-/tmp/spire-agent/public/api.sock}
trust_domain=example.org
node_id=spiffe://$trust_domain/node/quickstart

for tool in "$spire_server" "$spire_agent"; do
    if ! command -v "$tool" >/dev/null; then
        echo "error: $tool not found; install a SPIRE release or set SPIRE_SERVER/SPIRE_AGENT" >&2
        exit 2
    fi
done
if [[ ! -x $tunnel ]]; then
    echo "building spiffe-tunnel (release)..."
    (cd "$repo" && cargo build --release --quiet)
fi

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# wait_for DESCRIPTION SECONDS COMMAND...: retries COMMAND until it succeeds.
wait_for() {
    local what=$1 seconds=$2
    shift 2
    for ((i = 0; i < seconds * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "error: timed out waiting for $what (logs are in $work)" >&2
    exit 1
}

rm -rf "$work"
mkdir -p "$work/server/data" "$work/agent/data" "$(dirname "$agent_socket")"
# The configs' data paths are relative: SPIRE runs in the work folder.
cd "$work"

echo "==> starting spire-server (trust domain $trust_domain)"
"$spire_server" run -config "$repo/spire-config/server.conf" \
    -socketPath "$server_socket" >"$work/server.log" 2>&1 &
pids+=($!)
wait_for "spire-server" 30 "$spire_server" healthcheck -socketPath "$server_socket"

echo "==> attesting an agent with a join token"
token=$("$spire_server" token generate -socketPath "$server_socket" -spiffeID "$node_id" | awk '/Token:/ {print $2}')
"$spire_agent" run -config "$repo/spire-config/agent.conf" -socketPath "$agent_socket" \
    -joinToken "$token" >"$work/agent.log" 2>&1 &
pids+=($!)
wait_for "spire-agent" 30 "$spire_agent" healthcheck -socketPath "$agent_socket"

echo "==> registering the two tunnel ends for uid $(id -u)"
for workload in web api; do
    "$spire_server" entry create -socketPath "$server_socket" \
        -parentID "$node_id" \
        -spiffeID "spiffe://$trust_domain/$workload" \
        -selector "unix:uid:$(id -u)" \
        -x509SVIDTTL 300 >/dev/null
done
has_both_svids() {
    local out
    out=$("$spire_agent" api fetch x509 -socketPath "$agent_socket" 2>/dev/null) || return 1
    grep -q "spiffe://$trust_domain/web" <<<"$out" && grep -q "spiffe://$trust_domain/api" <<<"$out"
}
wait_for "the agent to issue both SVIDs" 60 has_both_svids

echo "==> starting a backend and both tunnel ends"
mkdir -p "$work/www" && echo "hello through spiffe-tunnel and SPIRE" >"$work/www/index.html"
python3 -m http.server 8000 --bind 127.0.0.1 --directory "$work/www" >"$work/backend.log" 2>&1 &
pids+=($!)
"$tunnel" run -c "$repo/examples/spire/inbound.toml" --socket "unix://$agent_socket" >"$work/inbound.log" 2>&1 &
pids+=($!)
"$tunnel" run -c "$repo/examples/spire/outbound.toml" --socket "unix://$agent_socket" >"$work/outbound.log" 2>&1 &
pids+=($!)
wait_for "the outbound tunnel" 60 grep -q "spiffe-tunnel is running" "$work/outbound.log"
wait_for "the inbound tunnel" 60 grep -q "spiffe-tunnel is running" "$work/inbound.log"
wait_for "the backend" 10 curl --silent --output /dev/null http://127.0.0.1:8000/

echo "==> GET http://127.0.0.1:8080/ (web -> mTLS -> api -> backend)"
curl --fail --silent --show-error http://127.0.0.1:8080/
echo
echo "Logs are in $work. Press Ctrl-C to stop everything."
wait
