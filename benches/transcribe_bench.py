#!/usr/bin/env python3
"""A 10 MB transcription upload through the gateway against the same upload through the bare
Pingora proxy (examples/bare_proxy.rs), both in front of the same mock, in one run.

    benches/transcribe_bench.py [--rounds 8] [--uploads 60] [--block 10] [--warm 200] [--size-mb 10]
                                [--no-build] [--no-pin] [--file mp3|noise] [--upstream-id same|renamed]
                                [--profile release|debug]

Each round starts a fresh mock, bare proxy and gateway (fresh database, one key), then
uploads the same multipart body (`model`, `response_format=json`, then a `file` part of
--size-mb: MPEG audio frames by default, so the gateway walks their headers for the duration
bound; `noise` is bytes no container claims) once to each proxy to warm up, and then
--uploads times to each, one after the other on one keep-alive connection per proxy, in
blocks of --block that alternate between the two proxies (which goes first alternates by
round). Interleaving puts both proxies under the same load from the rest of this shared box
at nearly the same time: timed one proxy after the other, the bare proxy alone moved by 45%
between rounds. As ops run it, both proxy processes (all their threads) are pinned to CPU 0;
the mock and this script are pinned to CPU 1 (--no-pin: no pinning). From /proc/<pid> of
each proxy process it reads:

  - CPU: time on CPU of all its threads (the first field of /proc/<pid>/task/*/schedstat,
    in ns; utime + stime of /proc/<pid>/stat, in 10 ms ticks, where schedstat is missing)
    summed over its timed blocks, per upload;
  - peak memory: the process's VmHWM (/proc/<pid>/status; startup and warm-up included),
    and that peak minus the idle RSS before the first upload, over the body's size: how
    many bodies' worth of memory the upload path took at its peak;
  - the upload's memory: before each timed block, VmHWM is reset to the current RSS
    (/proc/<pid>/clear_refs, "5"); the block's peak minus the RSS after --warm small (4 KB)
    uploads is what large uploads themselves cost in a process that has served requests.
    The median block's figure is the one compared (one block's timing can leave an extra
    piece in flight in either proxy), the highest block's is printed too. A fresh gateway's
    memory grows over its first few hundred requests whatever their size (SQLite's page
    cache takes the ledger's pages, the trace tables' first leaves), which a warm one
    already holds; so the figure after one small upload (also printed) counts that growth
    as the upload's.

CPU is also split into user and system time (utime and stime of /proc/<pid>/stat, in ticks):
the user part is each proxy's own work (for the gateway, the boundary search over the whole
body above all), the system part the kernel's copies in and out of the sockets, the same
syscalls for both. The system part moves with the process, not the code: in one run of eight
rounds the bare proxy alone took 5.9 to 10.5 ms per upload, and a round's gateway/bare ratio
went from 1.02x to 1.36x while the system time of the pair stayed 1.00-1.04x pooled. So the
run's ratio pools its rounds (total CPU of each proxy over all of them; many short rounds of
fresh processes rather than a few long ones), and every round's ratio is printed beside it.

It prints each round and the range (min-max) of every figure over the rounds, with the
gateway / bare ratios, then the run's pooled ratios; the goal is <= 1.2x for CPU and the
upload's memory, for the run (PASS/FAIL for every round too).
The whole-process peak is printed against 1.2x too, though most of it is the idle process
(the gateway's larger binary), not the upload. Every upload is checked:
200, the mock's text names the file's SHA-256 and size, and the gateway's spend grows.
--upstream-id renamed gives the gateway's model an `upstream_id` unlike its id, so the
forwarded body has its `model` part replaced (the byte-for-byte rewrite of SPEC §3).
Both proxies run one Pingora worker thread; the mock runs one thread. Linux only.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
TICK = os.sysconf("SC_CLK_TCK")
BOUNDARY = "benchBoundary7MA4YWxkTrZu0gW"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, name: str, log: Path) -> None:
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port} ({name}); log:\n{log.read_text()[-2000:]}")


def user_sys_ticks(pid: int) -> tuple[int, int]:
    """utime and stime of the process (all its threads), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]), int(fields[12])


def cpu_ns(pid: int) -> int:
    """Time on CPU of all the process's threads, in ns."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass  # a thread that ended meanwhile
        return total
    except FileNotFoundError:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // TICK  # utime, stime


class SyscallCount:
    """Syscalls and context switches of one process (all its threads) while it is alive:
    `perf stat` attached to it (the raw_syscalls tracepoint), stopped with SIGINT."""

    def __init__(self, pid: int):
        self.perf = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter,context-switches", "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.2)  # perf attaches asynchronously

    def stop(self) -> tuple[int, int]:
        self.perf.send_signal(signal.SIGINT)
        _, err = self.perf.communicate(timeout=10)
        counts = {}
        for line in err.splitlines():
            f = line.split(",")
            if len(f) > 2 and f[0].strip().isdigit():
                counts[f[2]] = int(f[0])
        return counts.get("raw_syscalls:sys_enter", 0), counts.get("context-switches", 0)


def reset_peak(pid: int) -> bool:
    """Sets the process's VmHWM back to its current RSS (/proc/<pid>/clear_refs, "5"), so the
    next read of VmHWM is the peak of what ran since; False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def mp3_file(size: int) -> bytes:
    """MPEG-1 Layer III frames, 128 kbit/s at 44.1 kHz (417 bytes each), to `size` bytes."""
    frame = bytes([0xFF, 0xFB, 0x90, 0x00]) + bytes((i * 37) & 0xFF for i in range(413))
    n = size // len(frame)
    return frame * n


def noise_file(size: int) -> bytes:
    return hashlib.shake_256(b"spidergate").digest(size)


def form(model: str, file: bytes) -> bytes:
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\njson\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"speech.mp3\"\r\n"
            f"Content-Type: audio/mpeg\r\n\r\n").encode()
    return head + file + f"\r\n--{BOUNDARY}--\r\n".encode()


def upload(conn: http.client.HTTPConnection, body: bytes, secret: str, want_text: str) -> None:
    conn.request("POST", "/v1/audio/transcriptions", body=body, headers={
        "Authorization": f"Bearer {secret}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
    })
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        sys.exit(f"upload: status {r.status}: {data[:300]!r}")
    if json.loads(data).get("text") != want_text:
        sys.exit(f"upload: the mock heard something else: {data[:300]!r}")


def spend(port: int, secret: str) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("GET", "/v1/usage", headers={"Authorization": f"Bearer {secret}"})
    return json.loads(c.getresponse().read())["spend_nanodollars"]


def rng(xs, fmt="{:.2f}") -> str:
    lo, hi = fmt.format(min(xs)), fmt.format(max(xs))
    return lo if lo == hi else f"{lo}–{hi}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8,
                    help="fresh process pairs (the kernel's share of CPU moves by process, see above)")
    ap.add_argument("--uploads", type=int, default=60,
                    help="large uploads timed per proxy and round (fewer: the CPU figure moves more)")
    ap.add_argument("--block", type=int, default=10,
                    help="uploads to one proxy before the other's turn (the timed uploads interleave)")
    ap.add_argument("--no-pin", action="store_true",
                    help="leave the processes unpinned (default: proxies on CPU 0, mock and script on CPU 1)")
    ap.add_argument("--syscalls", action="store_true",
                    help="also count each proxy's syscalls and context switches per upload (perf stat)")
    ap.add_argument("--warm", type=int, default=200,
                    help="small uploads before the large ones (their RSS is the baseline)")
    ap.add_argument("--size-mb", type=float, default=10)
    ap.add_argument("--file", choices=["mp3", "noise"], default="mp3")
    ap.add_argument("--upstream-id", choices=["same", "renamed"], default="same")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--profile", choices=["release", "debug"], default="release",
                    help="which build to run (debug: only to try the script)")
    args = ap.parse_args()

    if not args.no_build:
        profile = ["--release"] if args.profile == "release" else []
        subprocess.run(["cargo", "build", *profile, "--workspace", "--bins", "--examples"],
                       cwd=ROOT, check=True)
    tmp = Path(tempfile.mkdtemp(prefix="spidergate-transcribe-"))
    bins = {}
    for name, rel in (("gw", "spidergate"), ("bare", "examples/bare_proxy"),
                      ("mock", "spidergate-mock")):
        src = TARGET / args.profile / rel
        if not src.exists():
            sys.exit(f"missing {src} (build first)")
        bins[name] = tmp / src.name
        shutil.copy(src, bins[name])  # a rebuild cannot change them mid-run

    procs: list[subprocess.Popen] = []

    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    proxy_cpus, other_cpus = ({0}, {1}) if pin else (None, None)
    if pin:
        os.sched_setaffinity(0, other_cpus)

    def start(cmd, log, env=None, cpus=None):
        # Pinned before exec, so every thread the process starts inherits it.
        pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                             preexec_fn=pre)
        procs.append(p)
        return p

    def stop_all():
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        procs.clear()

    def start_all(rd: Path):
        """Fresh mock, bare proxy and gateway (a fresh database and key) for one round."""
        rd.mkdir()
        mock_port, bare_port, gw_port = free_port(), free_port(), free_port()
        start([bins["mock"], "--listen", f"127.0.0.1:{mock_port}", "--threads", "1"], rd / "mock.log",
              cpus=other_cpus)
        bare = start([bins["bare"], "--listen", f"127.0.0.1:{bare_port}",
                      "--upstream", f"127.0.0.1:{mock_port}", "--threads", "1"], rd / "bare.log",
                     cpus=proxy_cpus)
        upstream = "whisper-1" if args.upstream_id == "same" else "whisper-1-upstream-renamed"
        (rd / "gw.yaml").write_text(f"""\
listen: "127.0.0.1:{gw_port}"
database: "{rd}/gw.db"
providers:
  - name: mock
    kind: openai
    base_url: "http://127.0.0.1:{mock_port}/v1"
    api_key_env: SPIDERGATE_BENCH_MOCK_KEY
models:
  - id: whisper-1
    provider: mock
    upstream_id: {upstream}
    endpoint: transcriptions
    usd_per_minute: 0.006
server:
  threads: 1
""")
        env = dict(os.environ, SPIDERGATE_BENCH_MOCK_KEY="sk-bench", RUST_LOG="warn")
        out = subprocess.run([bins["gw"], "--config", rd / "gw.yaml", "keys", "create", "--name", "bench",
                              "--json", "--rpm", "100000000", "--rpd", "1000000000"],
                             env=env, check=True, capture_output=True, text=True).stdout
        secret = json.loads(out)["secret"]
        gw = start([bins["gw"], "--config", rd / "gw.yaml", "serve"], rd / "gateway.log", env,
                   cpus=proxy_cpus)
        wait_port(mock_port, "mock", rd / "mock.log")
        wait_port(bare_port, "bare proxy", rd / "bare.log")
        wait_port(gw_port, "gateway", rd / "gateway.log")
        return {"bare": (bare.pid, bare_port), "gateway": (gw.pid, gw_port)}, gw_port, secret

    try:
        size = int(args.size_mb * 1_000_000)
        file = mp3_file(size) if args.file == "mp3" else noise_file(size)
        body = form("whisper-1", file)
        want = f"sha256:{hashlib.sha256(file).hexdigest()} bytes:{len(file)}"
        small_file = mp3_file(4_170)
        small = form("whisper-1", small_file)
        small_want = f"sha256:{hashlib.sha256(small_file).hexdigest()} bytes:{len(small_file)}"
        print(f"{args.rounds} rounds x {args.uploads} uploads of a {len(body) / 1e6:.1f} MB form "
              f"({args.file} file, upstream_id {args.upstream_id}) per proxy, in alternating blocks of "
              f"{args.block}; fresh processes each round; "
              + ("proxies pinned to CPU 0, mock and client to CPU 1" if pin else "unpinned"))
        rows = []
        for rnd in range(args.rounds):
            targets, gw_port, secret = start_all(tmp / f"round{rnd + 1}")
            time.sleep(1)
            idle = {name: status_kb(pid, "VmRSS") for name, (pid, _) in targets.items()}
            order = ["bare", "gateway"] if rnd % 2 == 0 else ["gateway", "bare"]
            conns, warm, fresh, start_peak = {}, {}, {}, {}
            block_peaks = {name: [] for name in order}
            for name in order:
                pid, port = targets[name]
                conn = conns[name] = http.client.HTTPConnection("127.0.0.1", port)
                # A small upload first: what any first request sets up once (connection
                # pools, thread-local state, the key's first use, the ledger's first page)
                # is in the "warm" idle RSS, so peak minus it is what a large upload costs.
                upload(conn, small, secret, small_want)
                time.sleep(0.3)
                fresh[name] = status_kb(pid, "VmRSS")
                for _ in range(args.warm):
                    upload(conn, small, secret, small_want)
                time.sleep(0.3)
                warm[name] = status_kb(pid, "VmRSS")
                # One warm-up upload of the real size (in the peak, not in the CPU): the
                # allocator's first large block.
                upload(conn, body, secret, want)
                start_peak[name] = status_kb(pid, "VmHWM")
            spent0 = spend(gw_port, secret)
            cpu = {name: 0 for name in order}
            ticks = {name: [0, 0] for name in order}
            calls = {name: [0, 0] for name in order}
            done = {name: 0 for name in order}
            while any(done[name] < args.uploads for name in order):
                for name in order:
                    n = min(args.block, args.uploads - done[name])
                    if n <= 0:
                        continue
                    pid = targets[name][0]
                    counter = SyscallCount(pid) if args.syscalls else None
                    per_block = reset_peak(pid)
                    t0, (u0, s0) = cpu_ns(pid), user_sys_ticks(pid)
                    for _ in range(n):
                        upload(conns[name], body, secret, want)
                    cpu[name] += cpu_ns(pid) - t0
                    u1, s1 = user_sys_ticks(pid)
                    ticks[name][0] += u1 - u0
                    ticks[name][1] += s1 - s0
                    if per_block:
                        block_peaks[name].append(status_kb(pid, "VmHWM"))
                    if counter:
                        sc, cs = counter.stop()
                        calls[name][0] += sc
                        calls[name][1] += cs
                    done[name] += n
            if spend(gw_port, secret) <= spent0:
                sys.exit("the gateway's spend did not grow")
            fig = {}
            for name in order:
                pid = targets[name][0]
                peaks = sorted(block_peaks[name]) or [status_kb(pid, "VmHWM")]
                hwm = max(start_peak[name], peaks[-1], status_kb(pid, "VmHWM"))
                typical = peaks[len(peaks) // 2]
                conns[name].close()
                fig[name] = {
                    "cpu_ms": cpu[name] / 1e6 / args.uploads,
                    "user_ms": ticks[name][0] * 1000 / TICK / args.uploads,
                    "sys_ms": ticks[name][1] * 1000 / TICK / args.uploads,
                    "syscalls": calls[name][0] / args.uploads,
                    "switches": calls[name][1] / args.uploads,
                    "hwm_mb": hwm / 1024,
                    "idle_mb": idle[name] / 1024,
                    "copies": (hwm - idle[name]) * 1024 / len(body),
                    "upload_mb": (typical - warm[name]) / 1024,
                    "upload_max_mb": (peaks[-1] - warm[name]) / 1024,
                    "fresh_mb": (hwm - fresh[name]) / 1024,
                }
            stop_all()
            fig["cpu_ratio"] = fig["gateway"]["cpu_ms"] / max(fig["bare"]["cpu_ms"], 1e-9)
            fig["hwm_ratio"] = fig["gateway"]["hwm_mb"] / fig["bare"]["hwm_mb"]
            fig["upload_ratio"] = fig["gateway"]["upload_mb"] / max(fig["bare"]["upload_mb"], 1e-9)
            fig["fresh_ratio"] = fig["gateway"]["fresh_mb"] / max(fig["bare"]["fresh_mb"], 1e-9)
            rows.append(fig)
            g, b = fig["gateway"], fig["bare"]
            print(f"round {rnd + 1}: CPU per upload gateway {g['cpu_ms']:.2f} ms, bare {b['cpu_ms']:.2f} ms "
                  f"({fig['cpu_ratio']:.2f}x; user {g['user_ms']:.2f} / {b['user_ms']:.2f} ms, "
                  f"system {g['sys_ms']:.2f} / {b['sys_ms']:.2f} ms); "
                  + (f"syscalls / context switches per upload: gateway {g['syscalls']:.0f} / {g['switches']:.0f}, "
                     f"bare {b['syscalls']:.0f} / {b['switches']:.0f}; " if args.syscalls else "")
                  + f"peak (VmHWM) gateway {g['hwm_mb']:.1f} MB, bare {b['hwm_mb']:.1f} MB "
                  f"({fig['hwm_ratio']:.2f}x); peak over idle RSS: gateway {g['copies']:.2f} bodies "
                  f"(idle {g['idle_mb']:.1f} MB), bare {b['copies']:.2f} (idle {b['idle_mb']:.1f} MB); "
                  f"the upload's memory (median block's peak over warm RSS): gateway {g['upload_mb']:.2f} MB, "
                  f"bare {b['upload_mb']:.2f} MB ({fig['upload_ratio']:.2f}x), highest block: gateway "
                  f"{g['upload_max_mb']:.2f} MB, bare {b['upload_max_mb']:.2f} MB; over the RSS after one "
                  f"small upload: {g['fresh_mb']:.2f} MB, {b['fresh_mb']:.2f} MB ({fig['fresh_ratio']:.2f}x)")
        v = lambda *k: [r[k[0]][k[1]] if len(k) == 2 else r[k[0]] for r in rows]
        print(f"\nrange over {args.rounds} rounds (min–max):")
        print(f"  CPU per upload (ms): gateway {rng(v('gateway', 'cpu_ms'))}, bare {rng(v('bare', 'cpu_ms'))}, "
              f"ratio {rng(v('cpu_ratio'))}x")
        print(f"  peak memory VmHWM (MB): gateway {rng(v('gateway', 'hwm_mb'), '{:.1f}')}, bare {rng(v('bare', 'hwm_mb'), '{:.1f}')}, "
              f"ratio {rng(v('hwm_ratio'))}x")
        print(f"  peak over idle RSS, in bodies: gateway {rng(v('gateway', 'copies'))}, bare {rng(v('bare', 'copies'))}")
        print(f"  the upload's memory, median block's peak over warm RSS (MB): gateway {rng(v('gateway', 'upload_mb'))}, "
              f"bare {rng(v('bare', 'upload_mb'))}, ratio {rng(v('upload_ratio'))}x")
        print(f"  the highest block's peak over warm RSS (MB): gateway {rng(v('gateway', 'upload_max_mb'))}, "
              f"bare {rng(v('bare', 'upload_max_mb'))}")
        print(f"  peak over the RSS after one small upload (MB): gateway {rng(v('gateway', 'fresh_mb'))}, "
              f"bare {rng(v('bare', 'fresh_mb'))}, ratio {rng(v('fresh_ratio'))}x")
        pooled = lambda k: sum(v("gateway", k)) / max(sum(v("bare", k)), 1e-9)
        print(f"  the run's CPU per upload, all rounds pooled: gateway {sum(v('gateway', 'cpu_ms')) / len(rows):.2f} ms, "
              f"bare {sum(v('bare', 'cpu_ms')) / len(rows):.2f} ms, ratio {pooled('cpu_ms'):.2f}x "
              f"(user {pooled('user_ms'):.2f}x, system {pooled('sys_ms'):.2f}x)")
        print(f"  the run's upload memory, all rounds pooled: gateway {sum(v('gateway', 'upload_mb')) / len(rows):.2f} MB, "
              f"bare {sum(v('bare', 'upload_mb')) / len(rows):.2f} MB, ratio {pooled('upload_mb'):.2f}x")
        ok = lambda x: "PASS" if x else "FAIL"
        print(f"goal: CPU <= 1.2x: the run {ok(pooled('cpu_ms') <= 1.2)}, every round "
              f"{ok(max(v('cpu_ratio')) <= 1.2)}; the upload's memory <= 1.2x: the run "
              f"{ok(pooled('upload_mb') <= 1.2)}, every round "
              f"{ok(max(v('upload_ratio')) <= 1.2)}; whole-process peak (mostly the idle process) <= 1.2x: "
              f"{ok(max(v('hwm_ratio')) <= 1.2)}")
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
