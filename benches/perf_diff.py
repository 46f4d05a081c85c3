#!/usr/bin/env python3
"""Where the wall clock goes apart: two `perf record` profiles, function by function, in
nanoseconds per request.

`benches/wrk_compare.sh --profile DIR` samples each proxy's every round (cpu-clock, all
threads) into DIR/VARIANT.PROXY.ROUND.data and prints each round's CPU per request
(`cpu_us/req`). Give this two of those files, each with its CPU per request: every
function's share of the samples, times that CPU, is its time per request; the difference
says which functions (user space `U`, kernel `K`) the second proxy spends its extra time
in. Set beside `benches/instr.py`'s counted instructions, a function far above its share of
instructions stalls (cache misses, a lock's cache line, a clock read in a VM).

  benches/perf_diff.py DIR/plain.bare.2.data 31.0 DIR/plain.gateway.2.data 43.8 [--top 40]

Reads the files with `perf report` (nothing is run or written). Per-request figures are as
good as the CPU per request given and the samples' count: a function with a few dozen
samples moves by its own noise from round to round, so compare rounds of one run.
"""
import argparse
import re
import subprocess
import sys

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("base", help="perf.data of the baseline (e.g. the bare proxy's round)")
ap.add_argument("base_us", type=float, help="its CPU per request, microseconds")
ap.add_argument("other", help="perf.data of the proxy compared (e.g. the gateway's round)")
ap.add_argument("other_us", type=float, help="its CPU per request, microseconds")
ap.add_argument("--top", type=int, default=40, help="functions listed (largest differences)")
args = ap.parse_args()

ROW = re.compile(r"^\s+([\d.]+)%\s+\S+\s+\[(.)\]\s+(.*)$")


def per_request(path, us):
    """{'U name' or 'K name': ns per request} of one profile."""
    out = subprocess.run(
        ["perf", "report", "--no-children", "--sort", "dso,symbol", "--stdio", "-i", path],
        capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"perf report -i {path}: {out.stderr.strip()}")
    ns = {}
    for line in out.stdout.splitlines():
        m = ROW.match(line)
        if not m:
            continue
        # perf pads the symbol column; a long run of spaces ends the name.
        name = m.group(3).split("   ")[0].strip()
        key = ("K " if m.group(2) == "k" else "U ") + name
        ns[key] = ns.get(key, 0.0) + float(m.group(1)) / 100 * us * 1000
    return ns


base = per_request(args.base, args.base_us)
other = per_request(args.other, args.other_us)
rows = sorted(((other.get(k, 0) - base.get(k, 0), base.get(k, 0), other.get(k, 0), k)
               for k in set(base) | set(other)), reverse=True)
user = sum(r[0] for r in rows if r[3].startswith("U"))
kernel = sum(r[0] for r in rows if r[3].startswith("K"))
print(f"per request: {args.other_us - args.base_us:+.2f} us in all; by function, user space "
      f"{user:+.0f} ns, kernel {kernel:+.0f} ns")
print(f"{'diff ns':>8} {'base':>7} {'other':>7}  function")
for d, b, o, k in rows[:args.top]:
    print(f"{d:+8.0f} {b:7.0f} {o:7.0f}  {k[:110]}")
print("... and the largest the other spends less in:")
for d, b, o, k in rows[-min(8, len(rows)):]:
    print(f"{d:+8.0f} {b:7.0f} {o:7.0f}  {k[:110]}")
