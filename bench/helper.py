#!/usr/bin/env python3
"""Helpers for scripts/bench: network probes, the idle-connection memory
test, parsing iperf3 and wrk output into sample records, and the final
report (medians, ratios to the best peer, targets, JSON).

Standard library only, so it runs on a fresh Debian with just python3.

    helper.py probe --port P [--deadline S]
    helper.py idle --port P --backend-port B --count N --pgid G [--pgid G ...]
    helper.py metric --port ADMIN --name METRIC [--label 'k="v"']
    helper.py sample --run R --chain C --kind iperf|wrk_close|wrk_keepalive FILE [--label L]
    helper.py record --run R --chain C --figure F [--value V] [--raw-file F] [--message M]
    helper.py meta                      (reads BM_* from the environment)
    helper.py report --samples FILE --meta FILE [--json OUT]
"""

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import socket
import statistics
import sys
import time

# --------------------------------------------------------------------------
# Probes


def http_get(port, path="/", timeout=3.0):
    """A plain HTTP/1.0 GET on loopback; returns (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return status, body


def cmd_probe(args):
    """GET / through a chain until it answers 200 or the deadline passes."""
    deadline = time.monotonic() + args.deadline
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            status, body = http_get(args.port)
            if status == 200:
                return 0
            last = f"HTTP status {status} ({body[:80]!r})"
        except OSError as e:
            last = str(e) or type(e).__name__
        time.sleep(0.2)
    print(f"no HTTP 200 through 127.0.0.1:{args.port} within {args.deadline}s: {last}",
          file=sys.stderr)
    return 1


def cmd_metric(args):
    """Sums every sample of a Prometheus metric from an admin endpoint (only
    those whose labels contain --label, when given)."""
    status, body = http_get(args.port, "/metrics")
    if status != 200:
        print(f"admin 127.0.0.1:{args.port}/metrics answered {status}", file=sys.stderr)
        return 1
    total = 0.0
    for line in body.decode(errors="replace").splitlines():
        if args.label and args.label not in line.split(" ", 1)[0]:
            continue
        if line.startswith(args.name) and line[len(args.name):len(args.name) + 1] in (" ", "{"):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    print(int(total) if total.is_integer() else total)
    return 0


# --------------------------------------------------------------------------
# Memory per idle tunnelled connection


def group_processes(pgids):
    """(pid, fields of /proc/PID/stat after the command name) of every live
    process whose process group is one of pgids: all workers of every proxy
    instance."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) in pgids and fields[0] != "Z":
                yield entry, fields
        except (OSError, IndexError, ValueError):
            continue


def group_usage(pgids):
    """(RSS KiB, threads, processes) summed over the process groups pgids."""
    rss = threads = procs = 0
    for pid, _ in group_processes(pgids):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        t = re.search(r"^Threads:\s+(\d+)", status, re.M)
        rss += int(m.group(1)) if m else 0
        threads += int(t.group(1)) if t else 0
        procs += 1
    return rss, threads, procs


def group_cpu_seconds(pgids):
    """User plus system CPU seconds used so far by the process groups pgids
    (all threads, exited ones included)."""
    ticks = sum(int(f[11]) + int(f[12]) for _, f in group_processes(pgids))
    return ticks / os.sysconf("SC_CLK_TCK")


def cmd_cpu(args):
    print(f"{group_cpu_seconds(set(args.pgid)):.3f}")
    return 0


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def idle_test(args):
    pgids = set(args.pgid)
    accepted = []

    async def on_backend(reader, writer):
        accepted.append(writer)
        try:
            data = await reader.readexactly(1)
            writer.write(data)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(on_backend, "127.0.0.1", args.backend_port,
                                        backlog=4096, reuse_address=True)
    await asyncio.sleep(args.settle)
    before = group_usage(pgids)

    clients = []
    sem = asyncio.Semaphore(args.concurrency)

    async def one():
        async with sem:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", args.port), 20)
            clients.append(writer)
            # One byte there and back: both handshakes are done and both
            # directions have carried data, then the connection sits idle.
            writer.write(b"x")
            await writer.drain()
            await asyncio.wait_for(reader.readexactly(1), 20)

    t0 = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(args.count)), return_exceptions=True)
    open_s = time.monotonic() - t0
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    await asyncio.sleep(args.settle)
    after = group_usage(pgids)
    established = len(results) - len(errors)

    for w in clients:
        w.close()
    for w in accepted:
        w.close()
    server.close()
    await asyncio.sleep(0.2)

    out = {
        "count": args.count,
        "established": established,
        "backend_accepted": len(accepted),
        "errors": errors[:5],
        "error_count": len(errors),
        "open_seconds": round(open_s, 3),
        "rss_before_kib": before[0],
        "rss_after_kib": after[0],
        "threads_before": before[1],
        "threads_after": after[1],
        "processes": after[2],
        "kib_per_connection": (after[0] - before[0]) / args.count,
    }
    out["value"] = out["kib_per_connection"]
    print(json.dumps(out))
    return 0 if not errors and len(accepted) == args.count else 1


def cmd_idle(args):
    limit = raise_nofile()
    if limit < 2 * args.count + 64:
        print(f"open-files limit {limit} is too low for {args.count} idle connections",
              file=sys.stderr)
        return 1
    return asyncio.run(idle_test(args))


# --------------------------------------------------------------------------
# Samples: one JSON object per line, {"run", "chain", "figure", "value", "raw"}


def parse_wrk(text):
    """Requests/s, latency percentiles (ms) and errors from wrk --latency output."""
    def ms(value, unit):
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    out = {"errors": {}}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    out["requests"] = int(m.group(1)) if m else None
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        out[f"p{pct}_ms"] = ms(m.group(1), m.group(2)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["errors"]["non_2xx"] = int(m.group(1))
    return out


def cmd_sample(args):
    with open(args.file) as f:
        text = f.read()
    base = {"run": args.run, "chain": args.chain}
    records = []
    if args.kind == "iperf":
        doc = json.loads(text)
        if "error" in doc:
            print(f"iperf3 failed: {doc['error']}", file=sys.stderr)
            return 1
        end = doc["end"]
        gbps = end["sum_received"]["bits_per_second"] / 1e9
        raw = {
            "sent_gbps": end["sum_sent"]["bits_per_second"] / 1e9,
            "received_gbps": gbps,
            "retransmits": end["sum_sent"].get("retransmits"),
            "streams": doc["start"]["test_start"]["num_streams"],
            "seconds": doc["start"]["test_start"]["duration"],
            "cpu": end.get("cpu_utilization_percent"),
        }
        records.append({**base, "figure": args.label, "value": gbps, "raw": raw})
    elif args.kind in ("wrk_close", "wrk_keepalive"):
        w = parse_wrk(text)
        if w["rps"] is None:
            print(f"cannot read wrk output:\n{text}", file=sys.stderr)
            return 1
        if args.kind == "wrk_close":
            records.append({**base, "figure": "conn_rate", "value": w["rps"], "raw": w})
        else:
            records.append({**base, "figure": "ka_rps", "value": w["rps"], "raw": w})
            records.append({**base, "figure": "ka_p50_ms", "value": w["p50_ms"], "raw": None})
            records.append({**base, "figure": "ka_p99_ms", "value": w["p99_ms"], "raw": None})
    for r in records:
        print(json.dumps(r))
    return 0


def cmd_record(args):
    """Any other sample: a value, the JSON document in --raw-file (whose
    "value" is used when --value is not given), or an error message."""
    raw = None
    if args.raw_file:
        with open(args.raw_file) as f:
            text = f.read().strip()
        try:
            raw = json.loads(text) if text else None
        except json.JSONDecodeError:
            raw = {"text": text[-2000:]}
    value = args.value
    if value is None and isinstance(raw, dict):
        value = raw.get("value")
    if args.message is not None:
        raw = {**(raw if isinstance(raw, dict) else {}), "message": args.message}
    print(json.dumps({"run": args.run, "chain": args.chain, "figure": args.figure,
                      "value": value, "raw": raw}))
    return 0


# --------------------------------------------------------------------------
# Report

PEERS = ["haproxy", "nginx", "stunnel", "ghostunnel"]
OURS = "spiffe-tunnel"
MUX = "spiffe-tunnel-mux"
# Issue 17's targets for the multiplexed chain: (figure, against, ratio).
# against: "peer" = the best peer, "direct" = spiffe-tunnel direct.
MUX_TARGETS = {
    "conn_rate": [("peer", 5.0), ("direct", 2.0)],
    "ka_p99_ms": [("direct", 1.0)],
    "tput1": [("direct", 0.8)],
    "mem_kib": [("peer", 0.3)],
}
# figure key, label, higher is better, target ratio (None: reported only)
FIGURES = [
    ("tput1", "iperf3 1 stream (Gbit/s)", True, 1.3),
    ("tput4", "iperf3 4 streams (Gbit/s)", True, 1.3),
    ("conn_rate", "new connections/s (wrk, Connection: close)", True, 3.0),
    ("ka_rps", "keep-alive requests/s (wrk)", True, 1.2),
    ("ka_p50_ms", "keep-alive p50 latency (ms)", False, None),
    ("ka_p99_ms", "keep-alive p99 latency (ms)", False, 1.0),
    ("mem_kib", "memory per idle connection (KiB, both ends)", False, 0.5),
    ("cost_tput1", "CPU s per GB moved, 1 stream (both ends)", False, None),
    ("cost_tput4", "CPU s per GB moved, 4 streams", False, None),
    ("cost_close", "CPU us per new connection", False, None),
    ("cost_keepalive", "CPU us per keep-alive request", False, None),
]


def cost_samples(samples, duration):
    """What each measurement cost the chain's two proxies in CPU: the
    cpu_<figure> samples divided by the gigabytes moved or the requests
    served in the same measurement."""
    by_key = {(s["run"], s["chain"], s["figure"]): s for s in samples}
    out = []
    for (run, chain, figure), s in by_key.items():
        if not figure.startswith("cpu_") or s["value"] is None:
            continue
        kind = figure[4:]
        measured = by_key.get((run, chain, {"close": "conn_rate", "keepalive": "ka_rps"}
                               .get(kind, kind)))
        if not measured or not measured["value"]:
            continue
        raw = measured.get("raw") or {}
        if kind in ("tput1", "tput4"):
            gigabytes = measured["value"] * (raw.get("seconds") or duration) / 8
            value = s["value"] / gigabytes
        else:
            requests = raw.get("requests") or measured["value"] * duration
            value = s["value"] * 1e6 / requests
        out.append({"run": run, "chain": chain, "figure": f"cost_{kind}", "value": value,
                     "raw": None})
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, figure=None):
    if v is None:
        return "-"
    if figure in ("tput1", "tput4"):
        return f"{v:.2f}"
    if figure in ("ka_p50_ms", "ka_p99_ms"):
        return f"{v:.3f}"
    if figure in ("mem_kib", "cost_close", "cost_keepalive"):
        return f"{v:.1f}"
    if figure in ("cost_tput1", "cost_tput4"):
        return f"{v:.2f}"
    return f"{v:,.0f}"


def cmd_report(args):
    samples = []
    with open(args.samples) as f:
        for line in f:
            line = line.strip()
            if line:
                samples.append(json.loads(line))
    with open(args.meta) as f:
        meta = json.load(f)
    samples += cost_samples(samples, meta["duration"])

    def values(chain, figure):
        return [s["value"] for s in samples if s["chain"] == chain and s["figure"] == figure]

    chains = ["direct"] + PEERS + [OURS, MUX]
    rows = []
    mux_rows = []
    summary = {}
    for key, label, higher, target in FIGURES:
        med = {c: median(values(c, key)) for c in chains}
        peers = [med[p] for p in PEERS if med[p] is not None]
        best = (max(peers) if higher else min(peers)) if peers else None
        ours = med[OURS]
        ratio = ours / best if ours is not None and best else None
        if target is None or ratio is None:
            verdict = "-" if target is None else "n/a"
        elif higher:
            verdict = "PASS" if ratio >= target else "MISS"
        else:
            verdict = "PASS" if ratio <= target else "MISS"
        target_text = "-" if target is None else (f">= {target}x" if higher else f"<= {target}x")
        # The same ratio within each run (where the chains were measured
        # back to back), to show how much the machine moved between runs.
        per_run = []
        for run in sorted({s["run"] for s in samples}):
            at = {c: [s["value"] for s in samples if s["chain"] == c and s["figure"] == key
                      and s["run"] == run and s["value"] is not None] for c in PEERS + [OURS]}
            run_peers = [v[0] for p, v in at.items() if p != OURS and v]
            if at[OURS] and run_peers:
                run_best = max(run_peers) if higher else min(run_peers)
                if run_best:
                    per_run.append(at[OURS][0] / run_best)
        rows.append([label] + [fmt(med[c], key) for c in chains]
                    + ["-" if ratio is None else f"{ratio:.2f}x", target_text, verdict,
                       " ".join(f"{r:.2f}" for r in per_run) or "-"])
        summary[key] = {"label": label, "higher_is_better": higher, "medians": med,
                        "best_peer": best, "ratio": ratio, "target": target, "result": verdict,
                        "ratio_per_run": per_run}
        # The multiplexed chain against the best peer and against direct,
        # per run as well (the chains of a run are measured back to back).
        mux = med[MUX]
        if mux is not None:
            cells = [label, fmt(mux, key)]
            mux_summary = {}
            for against in ("peer", "direct"):
                base = best if against == "peer" else med[OURS]
                r = mux / base if base else None
                runs = []
                for run in sorted({s["run"] for s in samples}):
                    def first(c):
                        v = [s["value"] for s in samples if s["chain"] == c and s["figure"] == key
                             and s["run"] == run and s["value"] is not None]
                        return v[0] if v else None
                    m = first(MUX)
                    if against == "peer":
                        ps = [v for v in (first(p) for p in PEERS) if v is not None]
                        b = (max(ps) if higher else min(ps)) if ps else None
                    else:
                        b = first(OURS)
                    if m is not None and b:
                        runs.append(m / b)
                goal = dict(MUX_TARGETS.get(key, [])).get(against)
                if goal is None or r is None:
                    verdict = "-" if goal is None else "n/a"
                    goal_text = "-"
                else:
                    ok = r >= goal if higher else r <= goal
                    verdict = "PASS" if ok else "MISS"
                    goal_text = f">= {goal}x" if higher else f"<= {goal}x"
                cells += ["-" if r is None else f"{r:.2f}x", goal_text, verdict,
                          " ".join(f"{x:.2f}" for x in runs) or "-"]
                mux_summary[against] = {"ratio": r, "target": goal, "result": verdict,
                                        "ratio_per_run": runs}
            mux_rows.append(cells)
            summary[key]["multiplexed"] = {"median": mux, **mux_summary}

    # SVID rotation: spiffe-tunnel against itself.
    still = median(values("spiffe-tunnel/no-rotation", "tput1"))
    rotating = median(values("spiffe-tunnel/rotation", "tput1"))
    rotations = [s["value"] for s in samples
                 if s["chain"] == "spiffe-tunnel/rotation" and s["figure"] == "rotations"]
    rot_ratio = rotating / still if still and rotating is not None else None
    rot_per_run = []
    for run in sorted({s["run"] for s in samples}):
        a = median([s["value"] for s in samples if s["run"] == run and s["figure"] == "tput1"
                    and s["chain"] == "spiffe-tunnel/no-rotation"])
        b = median([s["value"] for s in samples if s["run"] == run and s["figure"] == "tput1"
                    and s["chain"] == "spiffe-tunnel/rotation"])
        if a and b is not None:
            rot_per_run.append(b / a)
    rot_verdict = "n/a" if rot_ratio is None else ("PASS" if rot_ratio >= 0.95 else "MISS")
    summary["rotation"] = {"no_rotation_gbps": still, "rotation_gbps": rotating,
                           "ratio": rot_ratio, "target": 0.95, "result": rot_verdict,
                           "ratio_per_run": rot_per_run,
                           "rotations_seen_per_run": rotations}

    # present = "caller" against present = "own": spiffe-tunnel against itself.
    own = median(values("spiffe-tunnel/present-own", "conn_rate"))
    caller = median(values("spiffe-tunnel/present-caller", "conn_rate"))
    present_ratio = caller / own if own and caller is not None else None
    present_per_run = []
    for run in sorted({s["run"] for s in samples}):
        a = median([s["value"] for s in samples if s["run"] == run and s["figure"] == "conn_rate"
                    and s["chain"] == "spiffe-tunnel/present-own"])
        b = median([s["value"] for s in samples if s["run"] == run and s["figure"] == "conn_rate"
                    and s["chain"] == "spiffe-tunnel/present-caller"])
        if a and b is not None:
            present_per_run.append(b / a)
    summary["present_caller"] = {"own_conn_rate": own, "caller_conn_rate": caller,
                                 "ratio": present_ratio, "ratio_per_run": present_per_run}

    header = ["figure", "direct"] + PEERS + [OURS, MUX, "ratio", "target", "result",
                                             "ratio per run"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i])
                         for i, c in enumerate(cells))

    out = []
    out.append(f"spiffe-tunnel side-by-side benchmark, {meta['date']}")
    out.append(f"machine: {meta['nproc']} cores (nproc), {meta['cpu']}, Linux {meta['kernel']}, "
               f"{meta['os']}")
    out.append(f"load average (1/5/15 min): {meta.get('load', '?')}")
    for v in meta["versions"]:
        out.append(f"  {v}")
    out.append(f"runs: {meta['runs']} (medians shown), {meta['duration']} s per measurement, "
               f"wrk {meta['wrk']}, {meta['idle_count']} idle connections; loopback, "
               "TLS 1.3, mTLS with P-256 SPIFFE certs")
    if meta.get("note"):
        out.append(f"note: {meta['note']}")
    out.append("")
    out.append(line(header))
    out.append(line(["-" * w for w in widths]))
    for r in rows:
        out.append(line(r))
    if mux_rows:
        mux_header = ["figure (multiplexed)", MUX, "/ best peer", "target", "result",
                      "per run", "/ direct", "target", "result", "per run"]
        mux_widths = [max(len(str(r[i])) for r in mux_rows + [mux_header])
                      for i in range(len(mux_header))]

        def mux_line(cells):
            return "  ".join(str(c).ljust(mux_widths[0]) if i == 0 else str(c).rjust(mux_widths[i])
                             for i, c in enumerate(cells))

        out.append("")
        out.append(mux_line(mux_header))
        out.append(mux_line(["-" * w for w in mux_widths]))
        for r in mux_rows:
            out.append(mux_line(r))
        conns = sum(values(MUX, "mux_connections"))
        if conns:
            out.append(f"spiffe-tunnel-mux: mTLS connections made during the new-connection runs: "
                       f"{conns:,.0f}")
    out.append("")
    out.append("direct = client straight to the backend (no proxy), for reference; ratio = "
               "spiffe-tunnel / best peer (memory, latency: lower is better, so <= targets), "
               "from the medians; ratio per run = the same within each run (chains measured "
               "back to back); CPU = user + system time of both proxies during the measurement")
    rot_seen = ", ".join(str(int(r)) for r in rotations) if rotations else "-"
    out.append(
        f"SVID rotation every 1 s (spiffe-tunnel, dev agent --ttl 2s, iperf3 1 stream): "
        f"{fmt(rotating, 'tput1')} Gbit/s vs {fmt(still, 'tput1')} Gbit/s without "
        f"(--ttl 1h) = {'-' if rot_ratio is None else f'{rot_ratio:.3f}'}x, target >= 0.95x: "
        f"{rot_verdict}  (per run: {' '.join(f'{r:.2f}' for r in rot_per_run) or '-'}; "
        f"rotations seen per measurement: {rot_seen})")
    out.append(
        f"present = \"caller\" (each caller's SVID from the dev agent's Delegated Identity API) "
        f"vs present = \"own\", new connections/s (wrk, Connection: close): "
        f"{fmt(caller, 'conn_rate')} vs {fmt(own, 'conn_rate')} = "
        f"{'-' if present_ratio is None else f'{present_ratio:.3f}'}x  "
        f"(per run: {' '.join(f'{r:.2f}' for r in present_per_run) or '-'})")
    full = sum(values(OURS, "handshakes_full"))
    resumed = sum(values(OURS, "handshakes_resumed"))
    if full + resumed:
        out.append(f"spiffe-tunnel handshakes at the server side during the new-connection runs: "
                   f"{resumed:,.0f} resumed of {full + resumed:,.0f} "
                   f"({100 * resumed / (full + resumed):.0f} %)")
        summary["handshakes"] = {"full": full, "resumed": resumed}
    problems = [s for s in samples if s.get("figure") == "error"]
    if problems:
        out.append("")
        out.append("problems during the run:")
        for p in problems:
            out.append(f"  run {p['run']} {p['chain']}: {p['raw'].get('message')}")
    text = "\n".join(out)
    print(text)

    if args.json:
        doc = {"meta": meta, "summary": summary, "table": text, "samples": samples}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return 0


def cmd_meta(_args):
    """The run's description as JSON, from BM_* environment variables set
    by scripts/bench plus /proc/cpuinfo and /etc/os-release."""
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    osname = "unknown OS"
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    osname = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    e = os.environ
    print(json.dumps({
        "date": e["BM_DATE"], "nproc": os.cpu_count(), "cpu": cpu,
        "kernel": platform.release(), "os": osname, "load": e["BM_LOAD"],
        "runs": int(e["BM_RUNS"]), "duration": int(e["BM_DURATION"]), "wrk": e["BM_WRK"],
        "idle_count": int(e["BM_IDLE"]), "chains": e["BM_CHAINS"], "note": e["BM_NOTE"],
        "versions": [v for v in e["BM_VERSIONS"].splitlines() if v],
    }, indent=1))
    return 0


# --------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("probe")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--deadline", type=float, default=20)
    s.set_defaults(fn=cmd_probe)

    s = sub.add_parser("metric")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--label", default="")
    s.set_defaults(fn=cmd_metric)

    s = sub.add_parser("idle")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--backend-port", type=int, required=True)
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--pgid", type=int, action="append", required=True)
    s.add_argument("--settle", type=float, default=2.0)
    s.add_argument("--concurrency", type=int, default=50)
    s.set_defaults(fn=cmd_idle)

    s = sub.add_parser("cpu")
    s.add_argument("--pgid", type=int, action="append", required=True)
    s.set_defaults(fn=cmd_cpu)

    s = sub.add_parser("sample")
    s.add_argument("--run", type=int, required=True)
    s.add_argument("--chain", required=True)
    s.add_argument("--kind", required=True, choices=["iperf", "wrk_close", "wrk_keepalive"])
    s.add_argument("--label", default=None)
    s.add_argument("file")
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("record")
    s.add_argument("--run", type=int, required=True)
    s.add_argument("--chain", required=True)
    s.add_argument("--figure", required=True)
    s.add_argument("--value", type=float)
    s.add_argument("--message")
    s.add_argument("--raw-file")
    s.set_defaults(fn=cmd_record)

    s = sub.add_parser("meta")
    s.set_defaults(fn=cmd_meta)

    s = sub.add_parser("report")
    s.add_argument("--samples", required=True)
    s.add_argument("--meta", required=True)
    s.add_argument("--json")
    s.set_defaults(fn=cmd_report)

    args = p.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
