#!/usr/bin/env bash
# Streaming and memory figures of the gateway, each against its baseline in the same run:
#
#   1. time to first byte / first content chunk and inter-chunk gaps of a stream at
#      concurrency 1 (the mock streams 10 chunks 5 ms apart): gateway vs straight to the mock,
#      and the bare Pingora proxy (examples/bare_proxy.rs) for context; then the TTFB of the
#      same streams without the gaps (no CPU sits idle between requests);
#   2. 1,000 concurrent streams through the gateway: every chunk of every stream arrives, in
#      order, ending with [DONE], and the key's spend (live /v1/usage and the database) equals
#      exactly what the mock reported in the streams' usage chunks;
#   3. RSS idle (after start, one key) and at the peak of 2,000 plain requests in flight (the
#      mock holds each for 1 s), gateway vs bare proxy; then both again with mimalloc's
#      eager arena commit off (MIMALLOC_ARENA_EAGER_COMMIT=0);
#   4. added latency of plain requests at concurrency 1: gateway and bare proxy vs direct.
#
#   benches/stream_mem.sh [--runs 3] [--plain 2000] [--streams 200] [--concurrent 1000]
#                         [--inflight 2000] [--no-build] [--no-pin] [--heap-profile]
#
# Placement as in benches/wrk_compare.sh: the gateway and the bare proxy (all their threads,
# one Pingora worker each) on the last CPU, the clients (Python 3) and the mock on CPU 0.
# The concurrency-1 figures are taken twice: in that placement ("pinned"), where each proxy hop
# also pays for waking the proxy's idle CPU, and with the proxies moved onto CPU 0 for the
# duration ("one core"), where it does not. At concurrency 1 requests go round-robin over
# direct / bare / gateway, one at a time, each on its own keep-alive connection, so machine
# noise hits every target alike. --no-pin: no placement at all (one set of figures).
# Every load is bounded (a fixed number of requests) and on loopback. Each run starts fresh
# processes and a fresh database; with --runs N the summary gives the range over the runs.
# --heap-profile: one more pass of the 2,000-in-flight phase with every allocation of 1 KiB
# or more recorded by call site (perf uprobes on mimalloc's entry points: heaptrack and
# massif see only libc malloc, which the gateway's Rust code does not use). Needs root.
# Goals: <= 200 us p50 added TTFB, 0 bad streams, exact spend, RSS <= 20 MB idle and
# <= 64 MB with 2,000 in flight. Always exits 0 unless the set-up itself fails.
set -euo pipefail

RUNS=1
PLAIN=2000
STREAMS=200
CONCURRENT=1000
INFLIGHT=2000
BUILD=1
PIN=1
HEAP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --plain) PLAIN="$2"; shift 2 ;;
    --streams) STREAMS="$2"; shift 2 ;;
    --concurrent) CONCURRENT="$2"; shift 2 ;;
    --inflight) INFLIGHT="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --no-pin) PIN=0; shift ;;
    --heap-profile) HEAP=1; shift ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/target/release/spidergate"
MOCK="$ROOT/target/release/spidergate-mock"
GW_BIN="${GW_BIN:-$BIN}"
BARE="$ROOT/target/release/examples/bare_proxy"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "python3 is required" >&2; exit 1; }

if [ "$BUILD" = 1 ]; then
  cargo build --release --workspace --bins --examples
fi
[ -x "$BIN" ] && [ -x "$BARE" ] && [ -x "$MOCK" ] || { echo "missing $BIN, $BARE or $MOCK (build first)" >&2; exit 1; }

# Sockets: the client's connections, the proxy's downstream and upstream ones, plus slack.
need_fd=$(( (INFLIGHT > CONCURRENT ? INFLIGHT : CONCURRENT) * 2 + 512 ))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need_fd" ]; then
  ulimit -n "$need_fd" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  [ "$(ulimit -n)" -ge "$need_fd" ] || echo "warning: ulimit -n is $(ulimit -n) (< $need_fd)" >&2
fi

TMP="$(mktemp -d -t spidergate-streammem.XXXXXX)"
# Private copies, so a rebuild of the shared target directory cannot change them mid-run.
mkdir -p "$TMP/bin"
cp "$BIN" "$TMP/bin/spidergate"; cp "$BARE" "$TMP/bin/bare_proxy"; cp "$MOCK" "$TMP/bin/spidergate-mock"
[ "$GW_BIN" = "$BIN" ] && GW_BIN="$TMP/bin/spidergate"
BIN="$TMP/bin/spidergate"; BARE="$TMP/bin/bare_proxy"; MOCK="$TMP/bin/spidergate-mock"
PIDS=()
PROBES=""
stop_all() {
  local p i alive
  for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for i in $(seq 1 50); do
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
}
cleanup() {
  stop_all
  [ -n "$PROBES" ] && perf probe -q -d "$PROBES" >/dev/null 2>&1 || true
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Listening ports below the ephemeral range: thousands of connections are opened and closed
# here, and a port still held by one of them (TIME_WAIT) cannot be bound.
EPH_LOW=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
PORT_BASE=10000; PORT_SPAN=$(( EPH_LOW - PORT_BASE ))
[ "$PORT_SPAN" -ge 1000 ] || { PORT_BASE=20000; PORT_SPAN=30000; }
free_port() {
  local p
  while :; do
    p=$(( PORT_BASE + RANDOM % PORT_SPAN ))
    port_busy "$p" || { echo "$p"; return; }
  done
}
wait_port() {
  local i
  for i in $(seq 1 300); do port_busy "$1" && return 0; sleep 0.1; done
  echo "nothing listens on 127.0.0.1:$1 ($2); log:" >&2; tail -20 "$3" >&2 || true; exit 1
}

PROXY_CPU=$(( $(nproc) - 1 ))
LOAD_CPU=0
PROXY_PIN=(); LOAD_PIN=()
if [ "$PIN" = 1 ] && command -v taskset >/dev/null; then
  PROXY_PIN=(taskset -c "$PROXY_CPU"); LOAD_PIN=(taskset -c "$LOAD_CPU")
else
  PIN=0
fi
# Move a running process, all its threads, to CPU $2.
repin() { [ "$PIN" = 1 ] && taskset -a -p -c "$2" "$1" >/dev/null; }

# ---------------------------------------------------------------------------------------
# The client: one Python file; modes lat, streams, inflight, get.
cat >"$TMP/client.py" <<'PY'
import asyncio, json, socket, sys, time

BODY_PLAIN = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
BODY_STREAM = (b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],'
               b'"stream":true,"stream_options":{"include_usage":true}}')
PRICE_IN, PRICE_OUT = 150, 600   # nano-USD per token (0.15 / 0.60 USD per Mtok)
now = time.perf_counter_ns

def request(port, secret, body, extra, method="POST", path="/v1/chat/completions"):
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {secret}\r\n")
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    for k, v in extra:
        head += f"{k}: {v}\r\n"
    return (head + "\r\n").encode() + body

def pct(xs, p):
    """Nearest-rank percentile."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s), max(1, -(-len(s) * p // 100))) - 1]

class Response:
    """Incremental HTTP/1.1 response parser: head, then a Content-Length or chunked body.
    feed() returns the body bytes decoded from that piece."""
    def __init__(self):
        self.buf = b""; self.head = None; self.status = None; self.clen = None
        self.chunked = False; self.body = b""; self.done = False; self.need = None

    def feed(self, data):
        self.buf += data
        if self.head is None:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return b""
            self.head = self.buf[:i].decode("latin-1"); self.buf = self.buf[i + 4:]
            lines = self.head.split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                k, _, v = line.partition(":"); k = k.strip().lower(); v = v.strip()
                if k == "content-length": self.clen = int(v)
                if k == "transfer-encoding" and "chunked" in v.lower(): self.chunked = True
        out = b""
        if not self.chunked:
            out, self.buf = self.buf, b""
            self.body += out
            if self.clen is not None and len(self.body) >= self.clen:
                self.done = True
            return out
        while True:
            if self.need is None:
                i = self.buf.find(b"\r\n")
                if i < 0: break
                size = int(self.buf[:i].split(b";")[0], 16); self.buf = self.buf[i + 2:]
                self.need = size if size else -1
            if self.need == -1:
                if self.buf.startswith(b"\r\n"):
                    self.done = True; self.buf = self.buf[2:]
                break
            if len(self.buf) < self.need + 2: break
            out += self.buf[:self.need]; self.buf = self.buf[self.need + 2:]; self.need = None
        self.body += out
        return out

def conn(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

def one_plain(s, req):
    p = Response()
    t0 = now()
    s.sendall(req)
    while not p.done:
        d = s.recv(65536)
        if not d: raise RuntimeError("connection closed")
        p.feed(d)
    t1 = now()
    if p.status != 200: raise RuntimeError(f"status {p.status}: {p.body[:200]!r}")
    return (t1 - t0) / 1000

def one_stream(s, req, nchunks):
    """(ttfb_us, first_chunk_us, [gap_us...]): the first response byte, the first content
    event complete, and the gaps between consecutive content events (each event timed by the
    recv() that completed it)."""
    p = Response(); events = []; pending = b""; t_first = None
    t0 = now()
    s.sendall(req)
    while not p.done:
        d = s.recv(65536)
        t = now()
        if not d: raise RuntimeError("connection closed")
        if t_first is None: t_first = t
        pending += p.feed(d)
        while True:
            i = pending.find(b"\n\n")
            if i < 0: break
            events.append((t, pending[:i])); pending = pending[i + 2:]
    if p.status != 200: raise RuntimeError(f"status {p.status}: {p.body[:200]!r}")
    content = [t for t, e in events if b'"content":"tok ' in e]
    if len(content) != nchunks: raise RuntimeError(f"{len(content)} content events, expected {nchunks}")
    gaps = [(b - a) / 1000 for a, b in zip(content, content[1:])]
    return (t_first - t0) / 1000, (content[0] - t0) / 1000, gaps

def mode_lat(a):
    # secret plain_n stream_n chunks chunk_delay_ms name=port ...
    secret, nplain, nstream, chunks, cdelay = a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4])
    targets = [t.split("=") for t in a[5:]]
    socks = {n: conn(int(p)) for n, p in targets}
    reqp = {n: request(int(p), secret, BODY_PLAIN, []) for n, p in targets}
    reqs = {n: request(int(p), secret, BODY_STREAM,
                       [("x-mock-chunks", chunks), ("x-mock-chunk-delay-ms", cdelay)]) for n, p in targets}
    reqs0 = {n: request(int(p), secret, BODY_STREAM, [("x-mock-chunks", chunks)]) for n, p in targets}
    res = {n: {"plain": [], "ttfb": [], "first": [], "gap": [], "ttfb0": []} for n, _ in targets}
    for _ in range(200):                                  # warm-up, not recorded
        for n, _p in targets: one_plain(socks[n], reqp[n])
    for i in range(nplain):
        for n, _p in (targets if i % 2 == 0 else targets[::-1]):
            res[n]["plain"].append(one_plain(socks[n], reqp[n]))
    for i in range(nstream):
        for n, _p in (targets if i % 2 == 0 else targets[::-1]):
            ttfb, first, gaps = one_stream(socks[n], reqs[n], chunks)
            res[n]["ttfb"].append(ttfb); res[n]["first"].append(first); res[n]["gap"] += gaps
    for i in range(nstream):                              # the same streams without the gaps
        for n, _p in (targets if i % 2 == 0 else targets[::-1]):
            res[n]["ttfb0"].append(one_stream(socks[n], reqs0[n], chunks)[0])
    out = {}
    for n, r in res.items():
        for k, xs in r.items():
            out[f"{n}.{k}.p50"] = pct(xs, 50); out[f"{n}.{k}.p99"] = pct(xs, 99); out[f"{k}.n"] = len(xs)
    print(json.dumps(out))

async def aconnect(port, n):
    conns = []
    for i in range(0, n, 100):   # in batches, so the accept queue never overflows
        conns += await asyncio.gather(*[asyncio.open_connection("127.0.0.1", port)
                                        for _ in range(min(100, n - i))])
    for _r, w in conns:
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conns

async def aread_response(r, on_body=None):
    p = Response()
    while not p.done:
        d = await r.read(65536)
        if not d: raise RuntimeError("connection closed mid-response")
        out = p.feed(d)
        if on_body and out: on_body(out)
    return p

def stream_shape(i):
    """Stream i's knobs: its own number of content chunks (10..20) and its own usage."""
    return 10 + i % 11, 100 + i, 1 + i % 50

def mode_streams(a):
    # secret port n: n concurrent streams, each checked event by event
    secret, port, n = a[0], int(a[1]), int(a[2])
    async def one(i, r, w, go):
        chunks, ptok, ctok = stream_shape(i)
        req = request(port, secret, BODY_STREAM, [("x-mock-chunks", chunks), ("x-mock-chunk-delay-ms", 10),
               ("x-mock-prompt-tokens", ptok), ("x-mock-completion-tokens", ctok)])
        pending = [b""]; events = []
        def on_body(b):
            pending[0] += b
            while True:
                j = pending[0].find(b"\n\n")
                if j < 0: break
                events.append(pending[0][:j]); pending[0] = pending[0][j + 2:]
        await go.wait()
        t0 = time.monotonic()
        w.write(req); await w.drain()
        p = await aread_response(r, on_body)
        t1 = time.monotonic()
        w.close()
        if p.status != 200: return (f"status {p.status}", 0, 0, 0, t0, t1)
        err = f"trailing bytes {pending[0][:60]!r}" if pending[0].strip() else None
        # Expected, in this order: `chunks` content events, the finish event, the usage event,
        # [DONE]; one completion id throughout; `created` never going back.
        kinds = []; ids = set(); created = []; usage = None
        for e in events:
            if not e.startswith(b"data: "): err = err or f"not an SSE data line: {e[:60]!r}"; continue
            d = e[6:]
            if d == b"[DONE]": kinds.append("D"); continue
            j = json.loads(d); ids.add(j.get("id")); created.append(j.get("created", 0))
            ch = j.get("choices") or []
            if ch and ch[0].get("delta", {}).get("content") == "tok " and ch[0].get("finish_reason") is None:
                kinds.append("c")
            elif ch and ch[0].get("finish_reason") == "stop":
                kinds.append("s")
            elif not ch and j.get("usage"):
                kinds.append("u"); usage = j["usage"]
            else:
                kinds.append("?")
        want = ["c"] * chunks + ["s", "u", "D"]
        if kinds != want: err = err or f"event sequence {''.join(kinds)} != {''.join(want)}"
        if len(ids) != 1: err = err or f"{len(ids)} completion ids in one stream"
        if created != sorted(created): err = err or "created went backwards"
        if usage and (usage.get("prompt_tokens"), usage.get("completion_tokens")) != (ptok, ctok):
            err = err or f"usage {usage} != {ptok}/{ctok}"
        up = usage.get("prompt_tokens", 0) if usage else 0
        uc = usage.get("completion_tokens", 0) if usage else 0
        return (err, kinds.count("c"), up, uc, t0, t1)
    async def main():
        conns = await aconnect(port, n)
        go = asyncio.Event()
        tasks = [asyncio.create_task(one(i, r, w, go)) for i, (r, w) in enumerate(conns)]
        await asyncio.sleep(0.05); go.set()
        res = await asyncio.gather(*tasks, return_exceptions=True)
        bad = []; got = want = ptok = ctok = 0; spans = []
        for i, x in enumerate(res):
            want += stream_shape(i)[0]
            if isinstance(x, BaseException): bad.append(f"stream {i}: {x!r}"); continue
            err, c, up, uc, t0, t1 = x
            got += c; ptok += up; ctok += uc; spans.append((t0, t1))
            if err: bad.append(f"stream {i}: {err}")
        cur = peak = 0   # most streams open at once
        for _, d in sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans]):
            cur += d; peak = max(peak, cur)
        print(json.dumps({"streams": n, "bad_streams": len(bad), "first_errors": bad[:5],
                          "chunks_want": want, "chunks_got": got,
                          "mock_prompt_tokens": ptok, "mock_completion_tokens": ctok,
                          "mock_cost_nanos": ptok * PRICE_IN + ctok * PRICE_OUT, "peak_open": peak}))
    asyncio.run(main())

def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"): return int(line.split()[1])
    return 0

def rollup(pid):
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB": out[parts[0].rstrip(":")] = int(parts[1])
    return out

def mode_inflight(a):
    # secret port n delay_ms pid poll_usage(0|1): n plain requests in flight at once, RSS of pid
    secret, port, n, delay, pid, poll = a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5] == "1"
    req = request(port, secret, BODY_PLAIN, [("x-mock-delay-ms", delay)])
    st = {"sent": 0, "done": 0, "peak": 0, "anon": 0, "max_client": 0, "max_gw": None}
    async def one(i, r, w, go):
        await go.wait()
        # Sent 25 every 10 ms (2,000 in 0.8 s, inside the mock's 1 s hold, so all are in
        # flight at once): a faster burst of upstream connects overflows the mock's accept
        # queue (backlog 128), and the SYN retries then show up as 502s of the bare proxy.
        await asyncio.sleep(i // 25 * 0.01)
        w.write(req); await w.drain(); st["sent"] += 1
        p = await aread_response(r)
        st["done"] += 1
        w.close()
        return p.status
    async def sampler(stop):
        while not stop.is_set():
            kb = status_kb(pid, "VmRSS")
            st["max_client"] = max(st["max_client"], st["sent"] - st["done"])
            if kb > st["peak"]:
                st["peak"] = kb; st["anon"] = rollup(pid).get("Anonymous", 0)
            await asyncio.sleep(0.01)
    async def gw_poll(stop):
        # The gateway's own count of the key's requests in flight, every 50 ms.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        q = request(port, secret, b"", [], "GET", "/v1/usage")
        while not stop.is_set():
            w.write(q); await w.drain()
            p = await aread_response(r)
            v = json.loads(p.body).get("requests_in_flight")
            if v is not None: st["max_gw"] = max(st["max_gw"] or 0, v)
            await asyncio.sleep(0.05)
        w.close()
    async def main():
        conns = await aconnect(port, n)
        await asyncio.sleep(0.3)
        connected = status_kb(pid, "VmRSS")
        go = asyncio.Event(); stop = asyncio.Event()
        tasks = [asyncio.create_task(one(i, r, w, go)) for i, (r, w) in enumerate(conns)]
        bg = [asyncio.create_task(sampler(stop))] + ([asyncio.create_task(gw_poll(stop))] if poll else [])
        t0 = time.monotonic(); go.set()
        res = await asyncio.gather(*tasks, return_exceptions=True)
        t1 = time.monotonic()
        stop.set(); await asyncio.gather(*bg)
        print(json.dumps({"requests": n, "ok": sum(1 for x in res if x == 200),
                          "errors": [repr(x) for x in res if x != 200][:5], "wall_s": round(t1 - t0, 3),
                          "rss_connected_kb": connected, "peak_rss_kb": st["peak"], "peak_anon_kb": st["anon"],
                          "max_inflight_client": st["max_client"], "max_inflight_gw": st["max_gw"]}))
    asyncio.run(main())

def mode_get(a):
    # port path secret: GET, print the body
    port, path, secret = int(a[0]), a[1], a[2]
    s = conn(port)
    s.sendall(request(port, secret, b"", [], "GET", path))
    p = Response()
    while not p.done:
        d = s.recv(65536)
        if not d: break
        p.feed(d)
    print(p.body.decode())

{"lat": mode_lat, "streams": mode_streams, "inflight": mode_inflight, "get": mode_get}[sys.argv[1]](sys.argv[2:])
PY
client() { "${LOAD_PIN[@]}" "$PY" "$TMP/client.py" "$@"; }
# jget JSON EXPR: evaluate EXPR over the parsed JSON `d`.
jget() { "$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, {"d": d}))' "$1" "$2"; }
kb_of() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }
anon_of() { awk '$1 == "Anonymous:" { print $2 }' "/proc/$1/smaps_rollup"; }
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# ---------------------------------------------------------------------------------------
# start_all DIR [WRAPPER...]: mock, bare proxy and gateway (one key) on fresh ports; the
# gateway runs under WRAPPER if given, both proxies under PROXY_ENV (an `env ...` prefix).
PROXY_ENV=()
start_all() {
  local dir="$1"; shift
  mkdir -p "$dir"
  START_DIR="$dir"
  MOCK_PORT=$(free_port); BARE_PORT=$(free_port); GW_PORT=$(free_port)
  "${LOAD_PIN[@]}" "$MOCK" --listen "127.0.0.1:$MOCK_PORT" --threads 1 >"$dir/mock.log" 2>&1 &
  PIDS+=($!); MOCK_PID=$!
  "${PROXY_PIN[@]}" "${PROXY_ENV[@]}" "$BARE" --listen "127.0.0.1:$BARE_PORT" --upstream "127.0.0.1:$MOCK_PORT" --threads 1 \
    >"$dir/bare.log" 2>&1 &
  PIDS+=($!); BARE_PID=$!
  cat >"$dir/gw.yaml" <<YAML
listen: "127.0.0.1:$GW_PORT"
database: "$dir/gw.db"
providers:
  - name: mock
    kind: openai
    base_url: "http://127.0.0.1:$MOCK_PORT/v1"
    api_key_env: SPIDERGATE_BENCH_MOCK_KEY
models:
  - id: gpt-4o-mini
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 16384
server:
  threads: 1
YAML
  export SPIDERGATE_BENCH_MOCK_KEY="sk-bench"
  "$GW_BIN" --config "$dir/gw.yaml" check-config >/dev/null
  # The key of benches/wrk_compare.sh: rpm, rpd, hard budget, max_inflight (far above the run).
  local inflight=(); "$GW_BIN" keys create --help | grep -q -- --max-inflight && inflight=(--max-inflight 100000)
  SECRET="$("$GW_BIN" --config "$dir/gw.yaml" keys create --name bench --json \
    --rpm 100000000 --rpd 1000000000 --budget 1000000 --budget-mode hard "${inflight[@]}" \
    | tr -d '\n' | sed -n 's/.*"secret"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')"
  [ -n "$SECRET" ] || { echo "could not read the key's secret from keys create --json" >&2; exit 1; }
  RUST_LOG=warn "${PROXY_PIN[@]}" "${PROXY_ENV[@]}" "$@" "$GW_BIN" --config "$dir/gw.yaml" serve >"$dir/gateway.log" 2>&1 &
  PIDS+=($!); GW_PID=$!
  wait_port "$MOCK_PORT" mock "$dir/mock.log"
  wait_port "$BARE_PORT" bare "$dir/bare.log"
  wait_port "$GW_PORT" gateway "$dir/gateway.log"
}

# "spend_nanodollars prompt_tokens completion_tokens requests" of the key: live, from the
# gateway's /v1/usage; or from the database (what the ledger committed), via the CLI.
sum_usage='
import json, sys
d = json.load(sys.stdin)
rows = d if isinstance(d, list) else d.get("keys", [d])
s = p = c = n = 0
for r in rows:
    s += r.get("spend_nanodollars", 0)
    for m in (r.get("by_model") or {}).values():
        p += m.get("prompt_tokens", 0); c += m.get("completion_tokens", 0); n += m.get("requests", 0)
print(s, p, c, n)'
live_usage() { client get "$GW_PORT" /v1/usage "$SECRET" | "$PY" -c "$sum_usage"; }
db_usage() { "$GW_BIN" --config "$1/gw.yaml" usage --json | "$PY" -c "$sum_usage"; }

RESULTS="$TMP/results.tsv"   # run, figure, value
: >"$RESULTS"
rec() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"; }

# lat_phase RUN PLACEMENT: the concurrency-1 figures, printed and recorded.
lat_phase() {
  local run="$1" pl="$2" out t k q
  out=$(client lat "$SECRET" "$PLAIN" "$STREAMS" 10 5 "direct=$MOCK_PORT" "bare=$BARE_PORT" "gateway=$GW_PORT")
  for t in direct bare gateway; do
    for k in plain ttfb first gap ttfb0; do
      for q in p50 p99; do rec "$run" "$pl.$t.$k.$q" "$(jget "$out" "d['$t.$k.$q']")"; done
    done
  done
  "$PY" - "$out" "$pl" <<'PYR'
import json, sys
d = json.loads(sys.argv[1])
print(f"concurrency 1, {sys.argv[2]} (us)    direct     bare  gateway  gw-direct  gw-bare")
names = {"plain": "plain latency", "ttfb": "stream TTFB", "first": "stream 1st chunk", "gap": "gap (5 ms apart)",
         "ttfb0": "TTFB, no gaps"}
for k, label in names.items():
    for q in ("p50", "p99"):
        g = lambda t: d[f"{t}.{k}.{q}"]
        print(f"  {label + ' ' + q:<29}{g('direct'):>7.0f}{g('bare'):>9.0f}{g('gateway'):>9.0f}"
              f"{g('gateway') - g('direct'):>+11.0f}{g('gateway') - g('bare'):>+9.0f}")
print(f"  (samples per target: {d['plain.n']} plain, {d['ttfb.n']} streams, {d['gap.n']} gaps)")
PYR
}

# inflight_phase RUN NAME PID PORT POLL: INFLIGHT plain requests held 1 s by the mock.
inflight_phase() {
  local run="$1" name="$2" pid="$3" port="$4" poll="$5" out after
  out=$(client inflight "$SECRET" "$port" "$INFLIGHT" 1000 "$pid" "$poll")
  sleep 3
  after=$(kb_of "$pid" VmRSS)
  echo "$name, $INFLIGHT in flight: $(jget "$out" "d['ok']") ok in $(jget "$out" "d['wall_s']") s;" \
    "RSS with the connections open $(mb "$(jget "$out" "d['rss_connected_kb']")") MB," \
    "peak $(mb "$(jget "$out" "d['peak_rss_kb']")") MB (anonymous $(mb "$(jget "$out" "d['peak_anon_kb']")") MB)," \
    "3 s later $(mb "$after") MB; most in flight: $(jget "$out" "d['max_inflight_client']") (client)" \
    "$([ "$poll" = 1 ] && echo ", $(jget "$out" "d['max_inflight_gw']") (gateway's count)")"
  if [ "$(jget "$out" "d['ok']")" != "$INFLIGHT" ]; then
    jget "$out" "d['errors']" >&2
    case "$name" in gateway*) grep -v '^$' "$START_DIR/gateway.log" | tail -3 >&2 || true ;; esac
  fi
  rec "$run" "$name.inflight_ok" "$(jget "$out" "d['ok']")"
  rec "$run" "$name.rss_connected_kb" "$(jget "$out" "d['rss_connected_kb']")"
  rec "$run" "$name.rss_peak_kb" "$(jget "$out" "d['peak_rss_kb']")"
  rec "$run" "$name.rss_peak_anon_kb" "$(jget "$out" "d['peak_anon_kb']")"
  rec "$run" "$name.rss_after_kb" "$after"
  [ "$poll" = 1 ] && rec "$run" "$name.max_inflight" "$(jget "$out" "d['max_inflight_gw']")"
  return 0
}

echo "$(nproc) CPUs; $([ "$PIN" = 1 ] && echo "gateway and bare proxy on CPU $PROXY_CPU, clients and mock on CPU $LOAD_CPU" || echo "not pinned")"
echo "$RUNS run(s): concurrency 1: $PLAIN plain + $STREAMS streamed requests per target; $CONCURRENT concurrent streams; $INFLIGHT in flight"
PLACEMENTS=(pinned one_core); [ "$PIN" = 1 ] || PLACEMENTS=(unpinned)

for run in $(seq 1 "$RUNS"); do
  echo
  echo "=== run $run ==="
  RD="$TMP/run$run"
  start_all "$RD"

  # 3. Idle RSS (started, one key, no request yet), then INFLIGHT in flight: bare, gateway.
  sleep 2
  gi=$(kb_of "$GW_PID" VmRSS); bi=$(kb_of "$BARE_PID" VmRSS)
  echo "idle RSS: gateway $(mb "$gi") MB (anonymous $(mb "$(anon_of "$GW_PID")") MB, $(kb_of "$GW_PID" Threads) threads), bare proxy $(mb "$bi") MB (anonymous $(mb "$(anon_of "$BARE_PID")") MB)"
  rec "$run" gateway.rss_idle_kb "$gi"; rec "$run" gateway.rss_idle_anon_kb "$(anon_of "$GW_PID")"
  rec "$run" bare.rss_idle_kb "$bi"
  inflight_phase "$run" bare "$BARE_PID" "$BARE_PORT" 0
  inflight_phase "$run" gateway "$GW_PID" "$GW_PORT" 1

  # 1 + 4. Concurrency 1: in the ops placement, then with the proxies moved to the clients' CPU.
  for pl in "${PLACEMENTS[@]}"; do
    if [ "$pl" = one_core ]; then repin "$GW_PID" "$LOAD_CPU"; repin "$BARE_PID" "$LOAD_CPU"; fi
    lat_phase "$run" "$pl"
    if [ "$pl" = one_core ]; then repin "$GW_PID" "$PROXY_CPU"; repin "$BARE_PID" "$PROXY_CPU"; fi
  done

  # 2. Concurrent streams, checked event by event, and exact spend.
  read -r l0_s l0_p l0_c l0_n < <(live_usage)
  st=$(client streams "$SECRET" "$GW_PORT" "$CONCURRENT")
  read -r l1_s l1_p l1_c l1_n < <(live_usage)
  want=$(jget "$st" "d['mock_cost_nanos']")
  # The ledger commits in batches: wait (at most 10 s) until the database has every request.
  db_ok=0
  for i in $(seq 1 100); do
    read -r d_s d_p d_c d_n < <(db_usage "$RD")
    [ "$d_n" = "$l1_n" ] && [ "$d_s" = "$l1_s" ] && [ "$d_p" = "$l1_p" ] && [ "$d_c" = "$l1_c" ] && { db_ok=1; break; }
    sleep 0.1
  done
  bad=$(jget "$st" "d['bad_streams']")
  missing=$(( $(jget "$st" "d['chunks_want']") - $(jget "$st" "d['chunks_got']") ))
  echo "$CONCURRENT concurrent streams: $bad bad, content chunks $(jget "$st" "d['chunks_got']")/$(jget "$st" "d['chunks_want']"), $(jget "$st" "d['peak_open']") open at once"
  [ "$bad" = 0 ] || jget "$st" "'\n'.join(d['first_errors'])" >&2
  echo "  the mock reported $(jget "$st" "d['mock_prompt_tokens']") prompt + $(jget "$st" "d['mock_completion_tokens']") completion tokens = $want nano-USD;" \
    "/v1/usage grew by $(( l1_s - l0_s )) nano-USD, $(( l1_p - l0_p )) + $(( l1_c - l0_c )) tokens, $(( l1_n - l0_n )) requests"
  echo "  database: $d_s nano-USD, $d_n requests (the whole run); live counters: $l1_s nano-USD, $l1_n requests -> $([ "$db_ok" = 1 ] && echo equal || echo DIFFERENT)"
  rec "$run" streams_bad "$bad"
  rec "$run" streams_missing_chunks "$missing"
  rec "$run" streams_peak_open "$(jget "$st" "d['peak_open']")"
  rec "$run" spend_live_minus_mock "$(( l1_s - l0_s - want ))"
  rec "$run" spend_tokens_minus_mock "$(( l1_p - l0_p - $(jget "$st" "d['mock_prompt_tokens']") + l1_c - l0_c - $(jget "$st" "d['mock_completion_tokens']") ))"
  rec "$run" spend_requests_minus_streams "$(( l1_n - l0_n - CONCURRENT ))"
  rec "$run" spend_db_equals_live "$db_ok"

  ge=$(kb_of "$GW_PID" VmRSS)
  echo "gateway RSS right after the concurrent streams: $(mb "$ge") MB"
  rec "$run" gateway.rss_end_kb "$ge"
  stop_all

  # 3 again, both proxies with mimalloc's eager arena commit off (it is on by default, and
  # most of the idle and in-flight RSS above is memory it committed but nothing wrote).
  PROXY_ENV=(env MIMALLOC_ARENA_EAGER_COMMIT=0)
  start_all "$RD/lazy"
  PROXY_ENV=()
  sleep 2
  gi=$(kb_of "$GW_PID" VmRSS); bi=$(kb_of "$BARE_PID" VmRSS)
  echo "MIMALLOC_ARENA_EAGER_COMMIT=0: idle RSS gateway $(mb "$gi") MB, bare proxy $(mb "$bi") MB"
  rec "$run" gateway_lazy.rss_idle_kb "$gi"; rec "$run" bare_lazy.rss_idle_kb "$bi"
  inflight_phase "$run" bare_lazy "$BARE_PID" "$BARE_PORT" 0
  inflight_phase "$run" gateway_lazy "$GW_PID" "$GW_PORT" 1
  stop_all
done

# ---------------------------------------------------------------------------------------
[ "$RUNS" -gt 0 ] && echo && echo "=== summary: range over $RUNS run(s), min-max ===" &&
"$PY" - "$RESULTS" "$INFLIGHT" "$CONCURRENT" "${PLACEMENTS[*]}" <<'PYS'
import sys, collections
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    run, k, x = line.rstrip("\n").split("\t")
    runs[run][k] = float(x) if x not in ("None", "") else float("nan")
inflight, concurrent, placements = sys.argv[2], sys.argv[3], sys.argv[4].split()
v = lambda k: [r[k] for r in runs.values() if k in r]
def rng(xs, fmt="{:.0f}"):
    if not xs: return "-"
    lo, hi = fmt.format(min(xs)), fmt.format(max(xs))
    return lo if lo == hi else f"{lo}–{hi}"
def diff(pl, a, b, k, q):
    return [r[f"{pl}.{a}.{k}.{q}"] - r[f"{pl}.{b}.{k}.{q}"] for r in runs.values()]
for pl in placements:
    print(f"concurrency 1, {pl} (us)          direct        bare     gateway   gw-direct     gw-bare")
    for k, label in (("plain", "plain latency"), ("ttfb", "stream TTFB"), ("first", "stream 1st chunk"),
                     ("gap", "inter-chunk gap"), ("ttfb0", "TTFB, no gaps")):
        for q in ("p50", "p99"):
            print(f"  {label + ' ' + q:<26}" + "".join(f"{rng(v(f'{pl}.{t}.{k}.{q}')):>12}" for t in ("direct", "bare", "gateway"))
                  + f"{rng(diff(pl, 'gateway', 'direct', k, q), '{:+.0f}'):>12}{rng(diff(pl, 'gateway', 'bare', k, q), '{:+.0f}'):>12}")
MB = lambda k: [x / 1024 for x in v(k)]
print(f"{concurrent} concurrent streams: bad {rng(v('streams_bad'))}, missing chunks {rng(v('streams_missing_chunks'))}, "
      f"open at once {rng(v('streams_peak_open'))}; /v1/usage - mock: {rng(v('spend_live_minus_mock'), '{:+.0f}')} nano-USD, "
      f"tokens {rng(v('spend_tokens_minus_mock'), '{:+.0f}')}, requests {rng(v('spend_requests_minus_streams'), '{:+.0f}')}; "
      f"database = live counters in {int(sum(v('spend_db_equals_live')))}/{len(v('spend_db_equals_live'))} runs")
print(f"RSS idle: gateway {rng(MB('gateway.rss_idle_kb'), '{:.1f}')} MB (anonymous {rng(MB('gateway.rss_idle_anon_kb'), '{:.1f}')}), "
      f"bare {rng(MB('bare.rss_idle_kb'), '{:.1f}')} MB")
print(f"RSS idle, MIMALLOC_ARENA_EAGER_COMMIT=0: gateway {rng(MB('gateway_lazy.rss_idle_kb'), '{:.1f}')} MB, "
      f"bare {rng(MB('bare_lazy.rss_idle_kb'), '{:.1f}')} MB")
for n in ("bare", "gateway", "bare_lazy", "gateway_lazy"):
    extra = f", gateway's count {rng(v(n + '.max_inflight'))}" if n.startswith("gateway") else ""
    print(f"RSS {inflight} in flight, {n}: {rng(v(f'{n}.inflight_ok'))} ok{extra}; connections open {rng(MB(f'{n}.rss_connected_kb'), '{:.0f}')} MB, "
          f"peak {rng(MB(f'{n}.rss_peak_kb'), '{:.0f}')} MB (anonymous {rng(MB(f'{n}.rss_peak_anon_kb'), '{:.0f}')}), 3 s later {rng(MB(f'{n}.rss_after_kb'), '{:.0f}')} MB")
print(f"gateway RSS right after the {concurrent} streams: {rng(MB('gateway.rss_end_kb'), '{:.0f}')} MB")
g = lambda ok: "PASS" if ok else "FAIL"
pl = placements[0]
print()
for p in placements:
    print(f"goal: stream TTFB p50 added <= 200 us ({p}): over direct {g(max(diff(p, 'gateway', 'direct', 'ttfb', 'p50')) <= 200)}"
          f" (no gaps: {g(max(diff(p, 'gateway', 'direct', 'ttfb0', 'p50')) <= 200)}); over the bare proxy"
          f" {g(max(diff(p, 'gateway', 'bare', 'ttfb', 'p50')) <= 200)} (no gaps: {g(max(diff(p, 'gateway', 'bare', 'ttfb0', 'p50')) <= 200)})")
print(f"goal: 0 dropped or reordered chunks: {g(max(v('streams_bad')) == 0 and max(v('streams_missing_chunks')) == 0)}")
print(f"goal: exact spend: {g(all(x == 0 for x in v('spend_live_minus_mock') + v('spend_tokens_minus_mock') + v('spend_requests_minus_streams')) and min(v('spend_db_equals_live')) == 1)}")
print(f"goal: RSS idle <= 20 MB: {g(max(MB('gateway.rss_idle_kb')) <= 20)} "
      f"(MIMALLOC_ARENA_EAGER_COMMIT=0: {g(max(MB('gateway_lazy.rss_idle_kb')) <= 20)})")
print(f"goal: RSS with {inflight} in flight <= 64 MB: {g(max(MB('gateway.rss_peak_kb')) <= 64)} "
      f"(MIMALLOC_ARENA_EAGER_COMMIT=0: {g(max(MB('gateway_lazy.rss_peak_kb')) <= 64)})")
PYS
mkdir -p "$ROOT/target/bench"
cp "$RESULTS" "$ROOT/target/bench/stream_mem.tsv"

# ---------------------------------------------------------------------------------------
# Optional allocation profile of the in-flight phase. heaptrack and massif hook libc malloc;
# the gateway's Rust allocations go to mimalloc (the global allocator) directly, so probe
# mimalloc's entry points instead, on a private copy of the binary.
if [ "$HEAP" = 1 ]; then
  echo
  echo "=== allocation profile: allocations >= 1 KiB while $INFLIGHT requests are in flight ==="
  if ! command -v perf >/dev/null || [ "$(id -u)" != 0 ]; then
    echo "needs perf (with uprobes) and root: skipped" >&2
  else
    cp "$GW_BIN" "$TMP/spidergate-prof"
    PROF="$TMP/spidergate-prof"
    ok=1
    for f in mi_malloc_aligned mi_zalloc_aligned; do
      perf probe -q -x "$PROF" --add "$f size=%di:u64" >/dev/null 2>&1 || ok=0
    done
    perf probe -q -x "$PROF" --add 'mi_realloc_aligned size=%si:u64' >/dev/null 2>&1 || ok=0
    grp=$(perf probe -l 2>/dev/null | awk -v b="$PROF" 'index($0, b) { split($1, a, ":"); print a[1]; exit }')
    [ -n "$grp" ] && PROBES="$grp:*"
    if [ "$ok" = 0 ] || [ -z "$grp" ]; then
      echo "perf probe failed (no uprobes here?): skipped" >&2
    else
      GW_BIN="$PROF" start_all "$TMP/prof"
      sleep 2
      perf record -q -o "$TMP/perf.data" -p "$GW_PID" --call-graph dwarf,8192 \
        -e "$grp:mi_malloc_aligned" --filter 'size >= 1024' -e "$grp:mi_zalloc_aligned" --filter 'size >= 1024' \
        -e "$grp:mi_realloc_aligned" --filter 'size >= 1024' >"$TMP/perf.log" 2>&1 &
      PERF_PID=$!
      sleep 1
      out=$(client inflight "$SECRET" "$GW_PORT" "$INFLIGHT" 1000 "$GW_PID" 0)
      kill -INT "$PERF_PID"; wait "$PERF_PID" || true
      echo "(under perf: $(jget "$out" "d['ok']") ok, peak RSS $(mb "$(jget "$out" "d['peak_rss_kb']")") MB; $(grep -i 'lost' "$TMP/perf.log" | tr '\n' ' ' || true))"
      stop_all
      perf script -i "$TMP/perf.data" -F event,trace,ip,sym 2>/dev/null | "$PY" -c '
import re, sys, collections
n = int(sys.argv[1])
skip = re.compile(r"^(_?mi_|__rust|alloc::|<alloc::|<u8 as alloc::|core::|<core::|bytes::|<bytes::|hashbrown|<hashbrown|std::|<std::|\[unknown\])")
size_by = collections.Counter(); count_by = collections.Counter(); total = 0
for block in sys.stdin.read().split("\n\n"):
    lines = [l.strip() for l in block.strip().split("\n") if l.strip()]
    m = re.search(r"size=(\d+)", lines[0]) if lines else None
    if not m: continue
    size = int(m.group(1)); total += size
    frames = [re.sub(r"::\{\{closure\}\}| \(inlined\)", "", l.split(None, 1)[-1]) for l in lines[1:]]
    site = " <- ".join([f for f in frames if not skip.match(f)][:2])
    size_by[site] += size; count_by[site] += 1
print(f"{total / 2**20:.1f} MiB in {sum(count_by.values())} allocations >= 1 KiB, {total / n / 1024:.1f} KiB per request")
print("   MiB   count     bytes  per request  site (first two frames outside alloc/core/std)")
for site, b in size_by.most_common(15):
    print(f"{b / 2**20:6.1f} {count_by[site]:7d} {b // count_by[site]:9d} {b / n / 1024:8.1f} KiB  {site[:200]}")
' "$INFLIGHT"
      perf probe -q -d "$PROBES" >/dev/null 2>&1 || true; PROBES=""
    fi
  fi
fi
