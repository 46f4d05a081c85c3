#!/usr/bin/env python3
"""The gateway's tail latency over time, next to the ledger's commits.

Runs the release gateway pinned to the last CPU (all its threads: the Pingora worker and the
ledger writer share it), with one key that has an rpm, an rpd, a hard budget and a
max_inflight (as benches/wrk_compare.sh sets it up), in front of the mock provider. The load
comes from the first CPU: target/release/examples/latency_log, a closed loop of
--connections keep-alive connections (like wrk -c N) that keeps every request's start time
and latency. The gateway logs each ledger commit at debug (target spidergate::ledger: its
duration, from the writer's wake-up through the transaction, and its wall-clock end), and
this script lines the two up:

  - p50 and p99 per --window-ms window over the whole run, commits marked under the curve;
  - a --zoom-ms stretch with every request as a dot (x: its start, y: its latency) and each
    commit as a shaded band (its duration);
  - p99 by phase: requests grouped by when they started relative to the commit before
    them, in 1/10ths of the flush interval;
  - p99 of the requests whose [start, end] overlapped a commit against those that did not,
    and the share of the slowest 1 % that overlapped one (against the share of all requests).

Writes an SVG (drawn here, no plotting library) and prints the figures. Loopback only,
bounded: one measured run of --duration seconds after a 2 s warm-up. Build first:
  cargo build --release --workspace --bins --examples

Usage: benches/p99_timeline.py [--duration 10] [--connections 32] [--window-ms 100]
         [--flush-interval-ms N] [--zoom-ms 500] [--svg docs/p99_timeline.svg] [--no-pin]
GW_BIN=path/to/spidergate measures another gateway build (it must log commits at debug).
"""
import argparse
import bisect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT_RE = re.compile(r"commit: (\d+) requests, (\d+) traces in (\d+) us, ended at unix_us (\d+)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what, log):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on 127.0.0.1:{port} ({what}); log: {open(log).read()[-2000:]}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(sorted_vals, p):
    if not sorted_vals:
        return 0
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--window-ms", type=float, default=100)
    ap.add_argument("--zoom-ms", type=float, default=500)
    ap.add_argument("--flush-interval-ms", type=int, default=None,
                    help="server.flush_interval_ms for the gateway (default: the gateway's default)")
    ap.add_argument("--svg", default=os.path.join(ROOT, "target/bench/p99_timeline.svg"))
    ap.add_argument("--tsv", default=None, help="also write every request (start_us latency_us status)")
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()

    rel = os.path.join(ROOT, "target/release")
    gw_bin = os.environ.get("GW_BIN", os.path.join(rel, "spidergate"))
    mock = os.path.join(rel, "spidergate-mock")
    client = os.path.join(rel, "examples/latency_log")
    for b in (gw_bin, mock, client):
        if not os.access(b, os.X_OK):
            sys.exit(f"missing {b} (cargo build --release --workspace --bins --examples)")
    ncpu = os.cpu_count() or 1
    pin = not args.no_pin and shutil.which("taskset") and ncpu > 1
    proxy_pin = ["taskset", "-c", str(ncpu - 1)] if pin else []
    load_pin = ["taskset", "-c", "0"] if pin else []

    tmp = tempfile.mkdtemp(prefix="p99-timeline-")
    procs = []

    def cleanup(*_):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        mock_port, gw_port = free_port(), free_port()
        mock_log = os.path.join(tmp, "mock.log")
        procs.append(subprocess.Popen(load_pin + [mock, "--listen", f"127.0.0.1:{mock_port}", "--threads", "1"],
                                      stdout=open(mock_log, "w"), stderr=subprocess.STDOUT))
        wait_port(mock_port, "mock", mock_log)
        cfg = os.path.join(tmp, "gw.yaml")
        flush = f"\n  flush_interval_ms: {args.flush_interval_ms}" if args.flush_interval_ms else ""
        with open(cfg, "w") as f:
            f.write(f"""listen: "127.0.0.1:{gw_port}"
database: "{tmp}/gw.db"
providers:
  - name: mock
    kind: openai
    base_url: "http://127.0.0.1:{mock_port}/v1"
    api_key_env: SPIDERGATE_BENCH_MOCK_KEY
models:
  - id: gpt-4o-mini
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 16384
server:
  threads: 1{flush}
""")
        env = dict(os.environ, SPIDERGATE_BENCH_MOCK_KEY="sk-bench")
        subprocess.run([gw_bin, "--config", cfg, "check-config"], env=env, check=True, stdout=subprocess.DEVNULL)
        # A key with every per-request control on (limits far above what the run can reach).
        out = subprocess.run([gw_bin, "--config", cfg, "keys", "create", "--name", "bench", "--json",
                              "--rpm", "100000000", "--rpd", "1000000000", "--budget", "1000000",
                              "--budget-mode", "hard", "--max-inflight", "100000"],
                             env=env, check=True, capture_output=True, text=True).stdout
        secret = json.loads(out)["secret"]
        gw_log = os.path.join(tmp, "gateway.log")
        genv = dict(env, RUST_LOG="warn,spidergate::ledger=debug", SPIDERGATE_LOG_FORMAT="text")
        gw = subprocess.Popen(proxy_pin + [gw_bin, "--config", cfg, "serve"], env=genv,
                              stdout=open(gw_log, "w"), stderr=subprocess.STDOUT)
        procs.append(gw)
        wait_port(gw_port, "gateway", gw_log)
        body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
        req = urllib.request.Request(f"http://127.0.0.1:{gw_port}/v1/chat/completions", data=body.encode(),
                                     headers={"Authorization": f"Bearer {secret}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            if r.status != 200:
                sys.exit(f"smoke test: the gateway answered {r.status}")

        def load(seconds, out_path):
            with open(out_path, "w") as o:
                subprocess.run(load_pin + [client, "--addr", f"127.0.0.1:{gw_port}",
                                           "--header", f"Authorization: Bearer {secret}", "--body", body,
                                           "--connections", str(args.connections),
                                           "--duration-s", str(seconds)], stdout=o, check=True)

        load(2, os.path.join(tmp, "warmup.txt"))
        log_from = os.path.getsize(gw_log)
        cpu0 = cpu_seconds(gw.pid)
        load1 = os.getloadavg()[0]
        reqs_path = args.tsv or os.path.join(tmp, "requests.txt")
        load(args.duration, reqs_path)
        cpu1 = cpu_seconds(gw.pid)
        time.sleep(0.3)  # the last commit's line
        with open(gw_log) as f:
            f.seek(log_from)
            log_text = f.read()
        commits = []  # (start_us, end_us, requests, traces)
        for m in COMMIT_RE.finditer(log_text):
            n, traces, us, end = (int(x) for x in m.groups())
            commits.append((end - us, end, n, traces))
        reqs = []
        with open(reqs_path) as f:
            for line in f:
                s, lat, st = line.split()
                reqs.append((int(s), int(lat), int(st)))
        interval = args.flush_interval_ms
        if interval is None:
            interval = 50
            m = re.search(r"flush_interval_ms[^0-9]*(\d+)", log_text)
            if m:
                interval = int(m.group(1))
        report(args, reqs, commits, cpu1 - cpu0, load1, interval, gw_bin)
    finally:
        cleanup()


def report(args, reqs, commits, cpu_s, load1, interval_ms, gw_bin):
    bad = sum(1 for r in reqs if r[2] != 200)
    if not reqs:
        sys.exit("no requests")
    t0 = reqs[0][0]
    t_end = max(s + lat for s, lat, _ in reqs)
    dur_s = (t_end - t0) / 1e6
    lats = sorted(r[1] for r in reqs)
    commits = [c for c in commits if c[1] >= t0 and c[0] <= t_end]
    cstart = [c[0] for c in commits]
    print(f"gateway {gw_bin}")
    print(f"{len(reqs)} requests in {dur_s:.2f} s ({len(reqs) / dur_s:.0f} rps), {bad} not 200, "
          f"gateway CPU {cpu_s * 1e6 / len(reqs):.1f} us/request, load average {load1:.2f} at the start")
    print(f"latency p50 {pct(lats, 50) / 1000:.2f} ms  p99 {pct(lats, 99) / 1000:.2f} ms  "
          f"p99.9 {pct(lats, 99.9) / 1000:.2f} ms  max {lats[-1] / 1000:.2f} ms")
    if commits:
        durs = sorted(c[1] - c[0] for c in commits)
        per = sorted(c[2] for c in commits)
        print(f"{len(commits)} ledger commits ({len(commits) / dur_s:.1f}/s, flush interval {interval_ms} ms): "
              f"duration p50 {pct(durs, 50)} us, p99 {pct(durs, 99)} us, max {durs[-1]} us; "
              f"requests per commit p50 {pct(per, 50)}; writer busy {sum(durs) / (dur_s * 1e4):.1f} % of the run")
    else:
        print("no ledger commits logged (a gateway build without the commit log line?)")

    # Requests that overlapped a commit (its [start, end] intersects a commit's).
    def overlaps(s, lat):
        i = bisect.bisect_right(cstart, s + lat) - 1
        while i >= 0:
            cs, ce = commits[i][0], commits[i][1]
            if ce >= s:
                return True
            if ce < s - 2_000_000:
                break
            i -= 1
        return False

    over = [overlaps(s, lat) for s, lat, _ in reqs]
    lat_over = sorted(r[1] for r, o in zip(reqs, over) if o)
    lat_free = sorted(r[1] for r, o in zip(reqs, over) if not o)
    p99 = pct(lats, 99)
    slow = [o for r, o in zip(reqs, over) if r[1] >= p99]
    share_all = len(lat_over) / len(reqs)
    share_slow = sum(slow) / max(1, len(slow))
    print(f"overlapping a commit: {len(lat_over)} requests ({share_all * 100:.1f} %), p50 "
          f"{pct(lat_over, 50) / 1000:.2f} ms, p99 {pct(lat_over, 99) / 1000:.2f} ms; not overlapping: "
          f"p50 {pct(lat_free, 50) / 1000:.2f} ms, p99 {pct(lat_free, 99) / 1000:.2f} ms")
    print(f"of the requests at or above the p99, {share_slow * 100:.1f} % overlapped a commit "
          f"(against {share_all * 100:.1f} % of all requests)")

    # p99 by phase: start time since the start of the commit before it, in tenths of the interval.
    period = interval_ms * 1000
    phases = [[] for _ in range(10)]
    for s, lat, _ in reqs:
        i = bisect.bisect_right(cstart, s) - 1
        if i < 0:
            continue
        ph = int((s - cstart[i]) / period * 10)
        if 0 <= ph < 10:
            phases[ph].append(lat)
    phase_p99 = [pct(sorted(p), 99) for p in phases]
    print("p99 by start phase after a commit began (tenths of the interval): " +
          " ".join(f"{v / 1000:.2f}" for v in phase_p99) + " ms")

    # Windows.
    w = int(args.window_ms * 1000)
    nwin = int((t_end - t0) // w) + 1
    wins = [[] for _ in range(nwin)]
    for s, lat, _ in reqs:
        wins[(s - t0) // w].append(lat)
    # The last window is partial (the run stops starting requests): dropped.
    win_stats = [(pct(sorted(x), 50), pct(sorted(x), 99), len(x)) for x in wins[:-1] if x]
    p99s = sorted(x[1] for x in win_stats)
    print(f"p99 per {args.window_ms:.0f} ms window: min {p99s[0] / 1000:.2f} ms, median "
          f"{pct(p99s, 50) / 1000:.2f} ms, max {p99s[-1] / 1000:.2f} ms over {len(win_stats)} windows")
    svg(args, reqs, commits, win_stats, t0, phase_p99, interval_ms,
        dict(rps=len(reqs) / dur_s, p50=pct(lats, 50), p99=p99, load=load1,
             share_all=share_all, share_slow=share_slow))
    print(f"plot: {args.svg}")


def svg(args, reqs, commits, win_stats, t0, phase_p99, interval_ms, s):
    W, H = 960, 880
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>']

    def text(x, y, t, anchor="start", size=12, color="#222"):
        t = t.replace("&", "&amp;").replace("<", "&lt;")
        out.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" fill="{color}">{t}</text>')

    def axes(x0, y0, pw, ph, xmax, ymax, xlabel, ylabel, xstep, ystep, xfmt):
        out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        v = 0
        while v <= ymax + 1e-9:
            y = y0 + ph - v / ymax * ph
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#eee"/>')
            text(x0 - 6, y + 4, f"{v:g}", "end", 11)
            v += ystep
        v = 0
        while v <= xmax + 1e-9:
            x = x0 + v / xmax * pw
            text(x, y0 + ph + 15, xfmt(v), "middle", 11)
            v += xstep
        text(x0 + pw / 2, y0 + ph + 32, xlabel, "middle")
        out.append(f'<text transform="translate({x0 - 40},{y0 + ph / 2}) rotate(-90)" text-anchor="middle">{ylabel}</text>')

    def nice_step(span, n=6):
        raw = span / n
        for m in (1, 2, 2.5, 5, 10):
            for e in range(-3, 6):
                st = m * 10 ** e
                if st >= raw:
                    return st
        return raw

    text(W / 2, 22, f"SpiderGate p99 over time next to ledger commits (flush interval {interval_ms} ms)",
         "middle", 15)
    text(W / 2, 40, f"{s['rps']:.0f} rps, p50 {s['p50'] / 1000:.2f} ms, p99 {s['p99'] / 1000:.2f} ms; "
         f"{len(commits)} commits; {args.connections} connections; load average {s['load']:.2f}; "
         f"gateway pinned to one CPU, load on the other", "middle", 11, "#555")

    # Panel 1: p50 and p99 per window, commits as ticks at the bottom.
    x0, y0, pw, ph = 70, 60, 860, 230
    n = len(win_stats)
    tmax = n * args.window_ms / 1000
    ymax = max(x[1] for x in win_stats) / 1000 * 1.1
    axes(x0, y0, pw, ph, tmax, ymax, "time (s)", "latency (ms)", nice_step(tmax), nice_step(ymax, 5),
         lambda v: f"{v:g}")
    for c in commits:
        x = x0 + (c[0] - t0) / 1e6 / tmax * pw
        if x0 <= x <= x0 + pw:
            out.append(f'<line x1="{x:.1f}" y1="{y0 + ph - 14}" x2="{x:.1f}" y2="{y0 + ph}" stroke="#d62728" stroke-width="0.7"/>')
    for idx, color, label in ((1, "#1f77b4", "p99"), (0, "#7f7f7f", "p50")):
        pts = " ".join(f"{x0 + (i + 0.5) / n * pw:.1f},{y0 + ph - ws[idx] / 1000 / ymax * ph:.1f}"
                       for i, ws in enumerate(win_stats))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    text(x0 + 8, y0 + 16, f"p99 (blue) and p50 (grey) per {args.window_ms:.0f} ms window; red ticks: ledger commits",
         size=11)

    # Panel 2: a zoomed stretch, every request a dot, commits as bands.
    x0, y0, pw, ph = 70, 350, 860, 230
    zs = t0 + int((n * args.window_ms * 1000) / 2)
    ze = zs + int(args.zoom_ms * 1000)
    pts = [(r[0], r[1]) for r in reqs if zs <= r[0] < ze]
    zmax = (max(p[1] for p in pts) / 1000 * 1.1) if pts else 1
    axes(x0, y0, pw, ph, args.zoom_ms, zmax, f"time (ms) from {(zs - t0) / 1e6:.2f} s into the run",
         "latency (ms)", nice_step(args.zoom_ms), nice_step(zmax, 5), lambda v: f"{v:g}")
    for c in commits:
        if c[1] < zs or c[0] > ze:
            continue
        a = x0 + max(0, c[0] - zs) / (ze - zs) * pw
        b = x0 + min(ze - zs, c[1] - zs) / (ze - zs) * pw
        out.append(f'<rect x="{a:.1f}" y="{y0}" width="{max(1.0, b - a):.1f}" height="{ph}" fill="#d62728" fill-opacity="0.25"/>')
    for st, lat in pts:
        x = x0 + (st - zs) / (ze - zs) * pw
        y = y0 + ph - lat / 1000 / zmax * ph
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.3" fill="#1f77b4" fill-opacity="0.6"/>')
    text(x0 + 8, y0 + 16, f"{args.zoom_ms:.0f} ms zoom: each dot a request (x: its start, y: its latency); "
         "red bands: ledger commits (writer wake-up to end of transaction)", size=11)

    # Panel 3: p99 by start phase within the commit cycle.
    x0, y0, pw, ph = 70, 640, 860, 190
    pmax = max(phase_p99) / 1000 * 1.1 or 1
    axes(x0, y0, pw, ph, 10, pmax, f"request start, after the start of the commit before it (tenths of {interval_ms} ms)",
         "p99 (ms)", 1, nice_step(pmax, 4), lambda v: f"{v:g}")
    for i, v in enumerate(phase_p99):
        bx = x0 + i / 10 * pw + 4
        bh = v / 1000 / pmax * ph
        out.append(f'<rect x="{bx:.1f}" y="{y0 + ph - bh:.1f}" width="{pw / 10 - 8:.1f}" height="{bh:.1f}" fill="#1f77b4"/>')
        text(bx + (pw / 10 - 8) / 2, y0 + ph - bh - 4, f"{v / 1000:.2f}", "middle", 10)
    text(x0 + 8, y0 + 16, f"p99 by phase; the slowest 1 % overlapped a commit {s['share_slow'] * 100:.0f} % of the time "
         f"(all requests: {s['share_all'] * 100:.0f} %)", size=11)
    out.append("</svg>")
    os.makedirs(os.path.dirname(os.path.abspath(args.svg)), exist_ok=True)
    with open(args.svg, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
