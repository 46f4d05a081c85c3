#!/usr/bin/env python3
"""Deterministic cost per request: user-space instructions counted by valgrind's callgrind,
for P (bare Pingora pass-through: examples/bare_proxy, or PASS_CMD) and G (SpiderGate, a key with rpm, rpd
and a hard budget), same nginx mock, same request. Wall-clock CPU on this shared 2-vCPU box
swings 30% from run to run; instruction counts do not. Kernel work (the same syscalls for
both) is not counted, so the ratio here is the user-space part of the CPU ratio.

Each proxy runs under callgrind; after a warm-up the counters are zeroed, N requests are
sent on keep-alive connections, the counters are dumped, and totals/N is Ir per request.
The dumps stay in OUT (default /tmp/sginstr) for callgrind_annotate.

Needs valgrind (apt-get install valgrind) and nginx (the mock), and release builds of the
gateway and the bare proxy (cargo build --release --bins --examples).
Usage (from the project checkout): benches/instr.py [--n 3000] [--conns 8] [--stream] [--fleet] [--redis]
                                                  [--redis-ir] [--atomics]
It ends with a per-phase table for G: the proxy hooks, the ledger writer thread and the
allocator, inclusive instructions per request (callgrind_annotate --inclusive=yes), so a
change can be steered phase by phase. Full detail: callgrind_annotate --inclusive=yes OUT/G.out.<pid>.1
"""
import argparse
import glob
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PASS_BIN = os.environ.get("PASS_BIN", os.path.join(HERE, "passthrough/target/release/passthrough"))
# in the project: the bare proxy of examples/bare_proxy.rs (cargo build --release --example bare_proxy)
DEFAULT_PASS_CMD = "target/release/examples/bare_proxy --listen {listen} --upstream {upstream} --threads 1"
GATE_BIN = os.path.abspath(os.environ.get("SPIDERGATE_BIN", "target/release/spidergate"))
BODY = '{"id":"chatcmpl-x","object":"chat.completion","created":1,"model":"up-paid-a","choices":[{"index":0,"message":{"role":"assistant","content":"ok ok ok ok ok "},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}'
REQ = '{"model":"paid-a","messages":[{"role":"user","content":"hello there, how are you today?"}],"max_tokens":10}'
# INSTR_PORT_BASE: another base port (mock, bare proxy, gateway and its admin listener at
# base, base+2, base+3, base+4), so two checkouts can count at once.
BASE = int(os.environ.get("INSTR_PORT_BASE", "18480"))
MOCK, PPORT, GPORT, APORT, RPORT = BASE, BASE + 2, BASE + 3, BASE + 4, BASE + 5

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=3000)
ap.add_argument("--conns", type=int, default=8)
ap.add_argument("--settle", type=float, default=0.5, metavar="S",
                help="seconds to wait after the warm-up before zeroing the counters, and after the "
                     "measured requests before dumping them (default 0.5): the ledger writer commits "
                     "what it holds, so the window counts each measured request's rows once and no "
                     "warm-up row (without it the ledger thread's figure moved by a commit's worth "
                     "of rows between runs); the proxies' idle background in that wait is counted "
                     "too. 0: the counts as before 2026-12-08")
ap.add_argument("--out", default="/tmp/sginstr")
ap.add_argument("--stream", action="store_true",
                help="streamed chat: the request asks for a stream, the mock answers with SSE chunks "
                     "and a usage chunk (which the gateway asked for and strips, as for any client)")
ap.add_argument("--stream-length", action="store_true",
                help="--stream, with the mock sending the stream with a Content-Length (the count "
                     "before 2026-12-06) instead of chunked, as providers stream: the bare proxy "
                     "then forwards it without framing while the gateway, whose body changes, "
                     "frames it in chunks")
ap.add_argument("--stream-events", type=int, default=4, metavar="N",
                help="--stream with N content events (default 4, at most 23) before the finish, usage "
                     "and [DONE] events: a longer stream shows what each event costs (run with two N "
                     "and divide the difference)")
ap.add_argument("--fleet", action="store_true",
                help="also measure F: the same gateway, the request made by a key 3 deep in a tree "
                     "of minted keys (hard budget at the root) inside a hard-budget group (SPEC §7)")
ap.add_argument("--redis", action="store_true",
                help="also measure R: the same gateway with its live limits in Redis (shared_state, "
                     "a private redis-server on port base+5): what a cluster node's Redis client "
                     "costs it. Redis' own work is not counted; batches are smaller than at full "
                     "speed (the node runs slowly under callgrind), so R/G is an upper bound")
ap.add_argument("--redis-ir", action="store_true",
                help="--redis, with redis-server under callgrind too: Redis' own instructions per "
                     "request and per script call, counted over R's measured requests (A/B of a "
                     "change to the Lua scripts without the load's noise). The node under "
                     "callgrind batches less than at full speed, so per request this is an "
                     "upper bound; per call it depends on the batch's size")
ap.add_argument("--atomics", action="store_true",
                help="also count, for P and G, the atomic read-modify-write instructions (lock-prefixed, "
                     "or xchg with memory) each proxy's own binary executes per request, and G's by "
                     "function: callgrind counts one such instruction as one, where natively each costs "
                     "~20 cycles and waits for the stores before it (callgrind runs with --dump-instr=yes)")
ap.add_argument("--cache-sim", action="store_true",
                help="also simulate the caches (callgrind --cache-sim=yes, the host's L1 and last-level "
                     "sizes): L1 instruction and data misses per request for P and G, and the functions "
                     "with the most extra L1 instruction misses. Instructions count what a request "
                     "executes; the misses follow what it costs on the wall clock (a request's code and "
                     "data leave the L1 before the next one)")
args = ap.parse_args()
args.redis = args.redis or args.redis_ir
CONTENT_TYPE = "application/json"
if args.stream:
    CHUNK = ('data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"up-paid-a",'
             '"choices":[{"index":0,"delta":{"content":"ok "},"finish_reason":null}]}\\n\\n')
    BODY = (CHUNK * args.stream_events
            + 'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"up-paid-a",'
              '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\\n\\n'
            + 'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"up-paid-a",'
              '"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}\\n\\n'
            + 'data: [DONE]\\n\\n')
    REQ = REQ[:-1] + ',"stream":true}'
    if len(BODY) > 4000:
        # nginx reads no configuration token longer than 4096 bytes (NGX_CONF_BUFFER).
        ap.error(f"--stream-events {args.stream_events}: the stream does not fit in the mock's "
                 f"configuration (at most {(4000 - len(BODY)) // len(CHUNK) + args.stream_events})")
    CONTENT_TYPE = "text/event-stream"
# A provider streams with Transfer-Encoding: chunked. nginx's `return` sends a Content-Length;
# a sub_filter (which never matches) makes it send the same bytes chunked.
CHUNKED = ("" if not args.stream or args.stream_length
           else " sub_filter_types text/event-stream; sub_filter 'no-such-text' '';")
work = tempfile.mkdtemp(prefix="sginstr-")
os.makedirs(args.out, exist_ok=True)
open(os.path.join(work, "mock.conf"), "w").write(f"""
worker_processes 1; pid {work}/mock.pid; error_log {work}/mock.err warn; daemon off;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 10000000;
  server {{ listen 127.0.0.1:{MOCK}; location / {{ default_type {CONTENT_TYPE};{CHUNKED} return 200 '{BODY}'; }} }} }}
""")


def load(port, n, token):
    """n POSTs over args.conns keep-alive connections; returns the count of 200s."""
    ok = [0]
    lock = threading.Lock()
    per = [n // args.conns + (1 if i < n % args.conns else 0) for i in range(args.conns)]

    def run(k):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        h = {"Content-Type": "application/json", "Authorization": f"Bearer {token or 'none'}"}
        good = 0
        for _ in range(k):
            c.request("POST", "/v1/chat/completions", REQ, h)
            r = c.getresponse()
            r.read()
            good += r.status == 200
        with lock:
            ok[0] += good
    ts = [threading.Thread(target=run, args=(k,)) for k in per]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return ok[0]


def redis_evals():
    """Script calls Redis has run so far (INFO commandstats: eval, evalsha and fcall)."""
    out = subprocess.run(["redis-cli", "-p", str(RPORT), "INFO", "commandstats"],
                         capture_output=True, text=True).stdout
    return sum(int(m) for m in re.findall(r"^cmdstat_(?:eval(?:sha)?|fcall):calls=(\d+)", out, re.M))


def wait_port(port, secs=120):
    end = time.time() + secs
    while time.time() < end:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/")
            c.getresponse().read()
            return True
        except OSError:
            time.sleep(0.5)
    return False


def measure(name, cmd, env, port, token, prepare=None, beside=(), mark=None):
    """`beside`: other processes under callgrind, zeroed and dumped with this one; `mark`
    is called just before the measured requests and just after them."""
    prefix = os.path.join(args.out, f"{name}.out")
    for f in glob.glob(prefix + "*"):
        os.remove(f)
    p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}.%p",
                          f"--dump-instr={'yes' if args.atomics else 'no'}", "--collect-atstart=yes"]
                         + (["--cache-sim=yes"] if args.cache_sim else []) + cmd, env=env,
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"{name}.err"), "w"))
    try:
        if not wait_port(port):
            raise SystemExit(f"{name} did not start; see {work}/{name}.err")
        if prepare:
            token = prepare(port)
        load(port, 300, token)  # warm-up: pools, allocator, lazy statics
        time.sleep(args.settle)
        for pid in [p.pid, *beside]:
            subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True)
        if mark:
            mark()
        t0 = time.time()
        ok = load(port, args.n, token)
        dt = time.time() - t0
        if mark:
            mark()
        time.sleep(args.settle)
        for pid in [p.pid, *beside]:
            subprocess.run(["callgrind_control", "-d", f"{name}-measured", str(pid)], capture_output=True)
        time.sleep(1)
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    dumps = [f for f in glob.glob(prefix + "*") if open(f, errors="replace").read(4000).find("measured") >= 0]
    total = 0
    for f in dumps:
        m = re.search(r"^(?:summary|totals): (\d+)", open(f, errors="replace").read(), re.M)
        total += int(m.group(1)) if m else 0
    return total / max(ok, 1), ok, dt, dumps


# Phases of the gateway, by a symbol that owns each (inclusive counts; a phase's callees
# are inside it; upstream_peer and the body filters are inlined into Pingora's futures and
# cannot be told apart). Patterns match callgrind_annotate's "file:function" column.
PHASES = [
    ("request_filter (auth, body, admission)", r"GateProxy as pingora_proxy::proxy_trait::ProxyHttp>::request_filter::\{\{closure\}\}$"),
    ("upstream_request_filter (header rewrite)", r"GateProxy as pingora_proxy::proxy_trait::ProxyHttp>::upstream_request_filter::\{\{closure\}\}$"),
    ("response_filter (decoration)", r"GateProxy as pingora_proxy::proxy_trait::ProxyHttp>::response_filter::\{\{closure\}\}$"),
    ("logging (settle, record)", r"GateProxy as pingora_proxy::proxy_trait::ProxyHttp>::logging::\{\{closure\}\}$"),
    # The writer thread's entry point is listed once per file its inlined code came from
    # (src/ledger.rs, src/store/...): those entries are summed.
    ("ledger writer thread", r"^\s*[\d,]+ \([^)]*\)\s+src/(ledger\.rs|store/[\w/]*\.rs):std::sys::backtrace::__rust_begin_short_backtrace"),
    ("allocator: alloc", r"__rustc::__rust_alloc \["),
    ("allocator: dealloc", r"__rustc::__rust_dealloc \["),
    # Callgrind counts a `rep movsb` once per byte, and glibc copies anything past a few KiB
    # with one (both proxies copy a ~14 KB request future whole per request): natively a few
    # hundred cycles, here ~14k "instructions", in both counts alike.
    ("memcpy (a copy of a few KiB or more: its bytes)", r"__memcpy_avx_unaligned_erms \["),
]


def print_phases(dumps, n):
    if not dumps or not n:
        return
    out = subprocess.run(["callgrind_annotate", "--show=Ir", "--inclusive=yes", dumps[0]],
                         capture_output=True, text=True).stdout
    print("\nG by phase (inclusive Ir per request; phases overlap where one calls another):")
    for label, pat in PHASES:
        rx = re.compile(pat)
        best = 0
        summed = label.startswith("ledger writer thread")
        for line in out.splitlines():
            m = re.match(r"\s*([\d,]+) \(", line)
            if m and rx.search(line):
                v = int(m.group(1).replace(",", ""))
                best = best + v if summed else max(best, v)
        print(f"  {label:<42} {best / n:>9,.0f}")


def event_totals(dumps):
    """Every event's total over a proxy's measured dumps (callgrind's `events:` and
    `summary:` lines)."""
    totals = {}
    for f in dumps:
        text = open(f, errors="replace").read()
        names = re.search(r"^events: (.+)$", text, re.M)
        values = re.search(r"^(?:summary|totals): (.+)$", text, re.M)
        if names and values:
            for k, v in zip(names.group(1).split(), values.group(1).split()):
                totals[k] = totals.get(k, 0) + int(v)
    return totals


def misses_by_function(dump, event):
    """Exclusive count of one event per function (callgrind_annotate's flat list)."""
    out = subprocess.run(["callgrind_annotate", f"--show={event}", "--sort=" + event, "--inclusive=no",
                          "--threshold=100", "--auto=no", dump], capture_output=True, text=True).stdout
    total = re.search(r"^\s*([\d,]+) \([^)]*\)\s+PROGRAM TOTALS", out, re.M)
    total = int(total.group(1).replace(",", "")) if total else 0
    counts = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(\S.*)", line)
        # The thread entry points come out with the whole program's count: not a function's own.
        if m and "PROGRAM TOTALS" not in line and int(m.group(1).replace(",", "")) <= total // 2:
            name = re.sub(r"\s+\[[^\]]*\]$", "", m.group(2))
            name = name.split(":", 1)[1] if "/" in name.split(":", 1)[0] else name
            counts[name] = counts.get(name, 0) + int(m.group(1).replace(",", ""))
    return counts


def print_cache_misses(res):
    print("\nCache misses per request (callgrind's cache simulation):")
    rows = [("I1mr", "L1 instruction misses"), ("D1mr", "L1 data read misses"),
            ("D1mw", "L1 data write misses"), ("ILmr", "last-level instruction misses"),
            ("DLmr", "last-level data read misses"), ("DLmw", "last-level data write misses")]
    per = {t: event_totals(res[t][3]) for t in ("P", "G")}
    for ev, label in rows:
        p, g = (per[t].get(ev, 0) / max(res[t][1], 1) for t in ("P", "G"))
        print(f"  {label:<32} P {p:>9,.0f}   G {g:>9,.0f}   G/P {g / p if p else 0:.2f}")
    l1 = {t: sum(per[t].get(e, 0) for e in ("I1mr", "D1mr", "D1mw")) / max(res[t][1], 1) for t in ("P", "G")}
    print(f"  {'all L1 misses':<32} P {l1['P']:>9,.0f}   G {l1['G']:>9,.0f}   G/P {l1['G'] / l1['P']:.2f}"
          f"   (instructions: {res['G'][0] / res['P'][0]:.2f})")
    if res["P"][3] and res["G"][3]:
        p = misses_by_function(res["P"][3][0], "I1mr")
        g = misses_by_function(res["G"][3][0], "I1mr")
        extra = sorted(set(p) | set(g), key=lambda k: p.get(k, 0) - g.get(k, 0))[:15]
        print("  most extra L1 instruction misses (G - P per request, by function):")
        for k in extra:
            print(f"    {(g.get(k, 0) - p.get(k, 0)) / res['G'][1]:>+7.1f}  {k[:110]}")


# mimalloc's entry points: calls into them are allocations (and frees), whichever Rust
# function the compiler inlined `__rust_alloc` into. Only the entry named with its binary
# ("prim.h:mi_malloc_aligned [bin]"): the same function is listed again under its source file.
ALLOC_ENTRIES = re.compile(r"\*\s+\S*:(mi_malloc_aligned|mi_zalloc_aligned|mi_realloc_aligned|mi_free) \[")


def allocations(dump, n):
    """Calls per request into each mimalloc entry point, and the allocating side's inclusive
    instructions per request, for one dump."""
    tree = subprocess.run(["callgrind_annotate", "--show=Ir", "--tree=caller", "--auto=no", "--threshold=100", dump],
                          capture_output=True, text=True).stdout
    calls = {}
    for block in tree.split("\n\n"):
        star = next((m for m in map(ALLOC_ENTRIES.search, block.splitlines()) if m), None)
        if not star:
            continue
        for line in block.splitlines():
            m = re.match(r"\s*[\d,]+\s+\([^)]*\)\s+<\s+.*\((\d[\d,]*)x\)", line)
            if m:
                calls[star.group(1)] = calls.get(star.group(1), 0) + int(m.group(1).replace(",", ""))
    incl = subprocess.run(["callgrind_annotate", "--show=Ir", "--inclusive=yes", dump], capture_output=True,
                          text=True).stdout
    ir = max((int(m.group(1).replace(",", "")) for m in
              re.finditer(r"^\s*([\d,]+) \([^)]*\)\s+\S*prim\.h:mi_malloc_aligned \[", incl, re.M)), default=0)
    allocs = sum(v for k, v in calls.items() if k != "mi_free")
    return allocs / n, calls.get("mi_free", 0) / n, ir / n


def atomic_sites(binary):
    """Addresses of the atomic read-modify-write instructions in `binary`: lock-prefixed
    ones, and xchg with a memory operand (locked without the prefix)."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True,
                         check=True).stdout
    sites = set()
    for line in dis.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(lock\b|xchg\S*\s+.*\()", line)
        if m:
            sites.add(int(m.group(1), 16))
    if not sites:
        raise SystemExit(f"--atomics: objdump found no atomic instruction in {binary}")
    return sites


def atomics(dump, binary, n):
    """Executions per request of `binary`'s atomic instructions in a --dump-instr=yes dump,
    in all and by function. Cost lines give an instruction address (absolute, or relative to
    the line before: +N, -N, *), then a source line, then Ir; the line after `calls=` is a
    call's inclusive cost, not an execution of its address."""
    sites = atomic_sites(binary)
    target = os.path.realpath(binary)
    names = {"ob": {}, "fn": {}}
    by_fn = {}
    ob = fn = None
    addr = 0
    call_cost = False

    def named(kind, v):
        m = re.match(r"\((\d+)\)(?: (.*))?", v)
        if not m:
            return v
        if m.group(2):
            names[kind][m.group(1)] = m.group(2)
        return names[kind].get(m.group(1))

    for line in open(dump, errors="replace"):
        if line.startswith(("ob=", "cob=")):
            v = named("ob", line.split("=", 1)[1].strip())
            if line.startswith("ob="):
                ob = v
            continue
        if line.startswith(("fn=", "cfn=")):
            v = named("fn", line.split("=", 1)[1].strip())
            if line.startswith("fn="):
                fn = v
            continue
        if line.startswith("calls="):
            call_cost = True
            continue
        if not line[:1] in ("0", "+", "-", "*"):
            continue
        if call_cost:
            # Written relative to the last cost line, and not a base for the next one.
            call_cost = False
            continue
        parts = line.split()
        pos = parts[0]
        if pos.startswith("0x"):
            addr = int(pos, 16)
        elif pos[0] == "+":
            addr += int(pos[1:])
        elif pos[0] == "-":
            addr -= int(pos[1:])
        if addr in sites and ob and os.path.realpath(ob) == target and len(parts) >= 3:
            by_fn[fn] = by_fn.get(fn, 0) + int(parts[2])
    if not by_fn:
        print(f"--atomics: no atomic instruction of {binary} ran in {dump} (another binary?)")
    return sum(by_fn.values()) / n, {f: c / n for f, c in by_fn.items()}


def print_atomics(res, binaries):
    rows = {t: atomics(res[t][3][0], binaries[t], res[t][1]) for t in ("P", "G") if res[t][3] and res[t][1]}
    if len(rows) < 2:
        return
    print("\nAtomic read-modify-writes per request (each proxy's own binary; libc's not counted):")
    for t, (total, _) in rows.items():
        print(f"  {t}: {total:7.1f}")
    print(f"  G - P: {rows['G'][0] - rows['P'][0]:+.1f}; G's by function, then P's count of the same:")
    for f, c in sorted(rows["G"][1].items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {c:7.2f} {rows['P'][1].get(f, 0.0):7.2f}  {(f or '?')[:110]}")


def print_allocations(res):
    rows = {t: allocations(r[3][0], r[1]) for t, r in res.items() if t in ("P", "G") and r[3] and r[1]}
    if len(rows) < 2:
        return
    print("\nAllocations per request (calls into mimalloc; allocating side's inclusive Ir):")
    for t, (a, f, ir) in rows.items():
        print(f"  {t}: {a:6.2f} allocations, {f:6.2f} frees, {ir:7,.0f} Ir")
    print(f"  G - P: {rows['G'][0] - rows['P'][0]:+.2f} allocations, {rows['G'][2] - rows['P'][2]:+,.0f} Ir")


procs = [subprocess.Popen(["nginx", "-c", f"{work}/mock.conf"])]
try:
    time.sleep(1)
    res = {}
    # PASS_CMD: another bare proxy, e.g. "target/release/examples/bare_proxy --listen {listen}
    # --upstream {upstream} --threads 1"; default: tools/passthrough (LISTEN/UPSTREAM env)
    pcmd = os.environ.get("PASS_CMD") or (DEFAULT_PASS_CMD if not os.path.exists(PASS_BIN) else None)
    pcmd = pcmd.format(listen=f"127.0.0.1:{PPORT}", upstream=f"127.0.0.1:{MOCK}").split() if pcmd else [PASS_BIN]
    res["P"] = measure("P", pcmd, dict(os.environ, LISTEN=f"127.0.0.1:{PPORT}",
                                       UPSTREAM=f"127.0.0.1:{MOCK}"), PPORT, None)
    cfg = os.path.join(work, "gate.yaml")
    open(cfg, "w").write(f"""listen: "127.0.0.1:{GPORT}"
database: "{work}/gate.db"
admin:
  listen: "127.0.0.1:{APORT}"
  token_env: PERF_ADMIN
providers:
  - name: mock
    kind: openai
    base_url: "http://127.0.0.1:{MOCK}/v1"
    api_key_env: PERF_UPSTREAM
models:
  - id: paid-a
    provider: mock
    upstream_id: up-paid-a
    input_usd_per_mtok: 1.0
    output_usd_per_mtok: 2.0
""")
    env = dict(os.environ, PERF_ADMIN="x", PERF_UPSTREAM="sk-up", RUST_LOG="error")
    k = json.loads(subprocess.run([GATE_BIN, "--config", cfg, "keys", "create", "--name", "perf", "--rpm", "100000000",
                                   "--rpd", "1000000000", "--budget", "1000000", "--budget-mode", "hard", "--json"],
                                  capture_output=True, text=True, env=env).stdout)
    res["G"] = measure("G", [GATE_BIN, "--config", cfg, "serve"], env, GPORT, k["secret"])
    if args.fleet:
        def cli(*a):
            return json.loads(subprocess.run([GATE_BIN, "--config", cfg, *a, "--json"],
                                             capture_output=True, text=True, env=env).stdout)
        cli("groups", "create", "perf-group", "--budget", "1000000", "--budget-mode", "hard", "--rpm", "100000000")
        root = cli("keys", "create", "--name", "perf-root", "--rpm", "100000000", "--rpd", "1000000000",
                   "--budget", "1000000", "--budget-mode", "hard", "--group", "perf-group",
                   "--scopes", "gate:chat,gate:keys")

        def mint_tree(port):
            """root -> child -> grandchild through /v1/keys; the grandchild makes the requests."""
            secret = root["secret"]
            for depth in (1, 2):
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                body = json.dumps({"name": f"perf-{depth}", "rpm": 100000000, "rpd": 1000000000,
                                   "scopes": ["gate:chat", "gate:keys"]})
                c.request("POST", "/v1/keys", body, {"Authorization": f"Bearer {secret}",
                                                     "Content-Type": "application/json"})
                r = c.getresponse()
                secret = json.loads(r.read())["secret"]
            return secret
        res["F"] = measure("F", [GATE_BIN, "--config", cfg, "serve"], env, GPORT, None, prepare=mint_tree)
    if args.redis:
        if not shutil.which("redis-server"):
            raise SystemExit("--redis needs redis-server (apt-get install redis-server)")
        rprefix = os.path.join(args.out, "redis.out")
        for f in glob.glob(rprefix + "*"):
            os.remove(f)
        under = (["valgrind", "--tool=callgrind", f"--callgrind-out-file={rprefix}.%p", "--dump-instr=no"]
                 if args.redis_ir else [])
        redis = subprocess.Popen(under + ["redis-server", "--port", str(RPORT), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no", "--dir", work],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redis)
        wait_redis = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", RPORT), timeout=1).close()
                break
            except OSError:
                if time.time() > wait_redis or redis.poll() is not None:
                    raise SystemExit(f"redis-server did not start on port {RPORT}")
                time.sleep(0.3)
        rcfg = os.path.join(work, "gate-redis.yaml")
        open(rcfg, "w").write(open(cfg).read().replace(f'database: "{work}/gate.db"', f'database: "{work}/gate-r.db"')
                              + "shared_state:\n  redis_url_env: PERF_REDIS\n  on_error: closed\n")
        renv = dict(env, PERF_REDIS=f"redis://127.0.0.1:{RPORT}/0")
        rk = json.loads(subprocess.run([GATE_BIN, "--config", rcfg, "keys", "create", "--name", "perf", "--rpm",
                                        "100000000", "--rpd", "1000000000", "--budget", "1000000",
                                        "--budget-mode", "hard", "--json"],
                                       capture_output=True, text=True, env=renv).stdout)
        evals = []
        res["R"] = measure("R", [GATE_BIN, "--config", rcfg, "serve"], renv, GPORT, rk["secret"],
                           beside=[redis.pid] if args.redis_ir else (),
                           mark=(lambda: evals.append(redis_evals())) if args.redis_ir else None)
        calls = evals[-1] - evals[0] if evals else 0
    for t, (ir, ok, dt, dumps) in res.items():
        print(f"{t}: {ir:,.0f} Ir/request over {ok} requests ({dt:.0f} s under callgrind); dumps: {' '.join(dumps)}")
    print(f"G/P user-space instructions per request: {res['G'][0] / res['P'][0]:.3f}")
    if "F" in res:
        print(f"F/G (a 3-deep minted key in a group vs a lone key): {res['F'][0] / res['G'][0]:.3f}")
    if "R" in res:
        print(f"R/G (live limits in Redis vs in-process, the gateway's own instructions): {res['R'][0] / res['G'][0]:.3f}")
    if args.redis_ir:
        dumps = [f for f in glob.glob(rprefix + "*") if open(f, errors="replace").read(4000).find("measured") >= 0]
        total = 0
        for f in dumps:
            m = re.search(r"^(?:summary|totals): (\d+)", open(f, errors="replace").read(), re.M)
            total += int(m.group(1)) if m else 0
        ok = max(res["R"][1], 1)
        print(f"Redis: {total / ok:,.0f} Ir per request, {total / max(calls, 1):,.0f} per script call "
              f"({calls / ok:.3f} calls per request, the node's background included); "
              f"dumps: {' '.join(dumps)}")
    print_phases(res["G"][3], res["G"][1])
    print_allocations(res)
    if args.cache_sim:
        print_cache_misses(res)
    if args.atomics:
        print_atomics(res, {"P": pcmd[0], "G": GATE_BIN})
finally:
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait(5)
    shutil.rmtree(work, ignore_errors=True)
