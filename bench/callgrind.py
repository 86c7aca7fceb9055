#!/usr/bin/env python3
"""Hot-path regression guard: instructions per proxied request, counted by callgrind.

Runs the release `fulcrum run` (workers = 1) under `valgrind --tool=callgrind` in front of 3
native `fulcrum backend` processes, sends warm-up requests, zeroes the counters
(`callgrind_control --zero`), sends N keep-alive requests from one connection, dumps the
counters (`callgrind_control --dump`) and prints instructions per request plus the top functions
(inclusive). Instruction counts do not depend on machine load, so the figure is repeatable on a
busy machine (to a few percent: timers and scheduling still vary a little).

With `--max N` it exits 1 when a request costs more than N instructions: the guard.
"""

import argparse
import glob
import http.client
import os
import re
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (process helpers shared with the benchmark)


def send(address, count):
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    for _ in range(count):
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
    conn.close()


def function_name(text):
    """`file:function [object]` as printed by callgrind_annotate -> `function`."""
    text = re.sub(r"\s+\[[^\]]*\]$", "", text.strip())
    m = re.match(r"(?:\?\?\?|\S*?\.(?:rs|c|S|h|cc|cpp|inc)):(.*)$", text)
    return m.group(1) if m else text


def self_costs(path):
    """Self (exclusive) instructions per function from a callgrind dump, parsed directly
    (callgrind_annotate 3.19 folds every self cost of a mid-run dump into `clone`)."""
    names, costs, edges, current, callee, skip_next = {}, {}, {}, "?", "?", False

    def resolve(value):
        m = re.match(r"\((\d+)\)(?:\s+(.*))?$", value)
        if not m:
            return value
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), value)

    with open(path) as f:
        for line in f:
            if line.startswith("fn="):
                current = resolve(line[3:].strip())
            elif line.startswith("cfn="):
                callee = resolve(line[4:].strip())
            elif line.startswith("calls="):
                skip_next = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                fields = line.split()
                if skip_next:
                    skip_next = False
                    if len(fields) >= 2:
                        edges[(current, callee)] = edges.get((current, callee), 0) + int(fields[1])
                    continue
                if len(fields) >= 2:
                    costs[current] = costs.get(current, 0) + int(fields[1])
    return costs, edges


def totals(path):
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests (2000)")
    parser.add_argument("--warmup", type=int, default=300, help="requests before zeroing (300)")
    parser.add_argument("--algorithm", default="round_robin")
    parser.add_argument("--max", type=int, help="fail when instructions/request exceed this")
    parser.add_argument("--top", type=int, default=25, help="functions listed (25)")
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()

    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if not bench.shutil.which(tool):
            sys.exit(f"missing: {tool} — install with: apt-get install valgrind")
    root = bench.ROOT
    binary = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")),
                          "release", "fulcrum")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "fulcrum"], cwd=root,
                       check=True)

    tmp = tempfile.mkdtemp(prefix="fulcrum-callgrind-")
    out_file = os.path.join(tmp, "callgrind.out")
    try:
        backends = bench.Backends(binary, None, [0, 0, 0])
        config = os.path.join(tmp, "fulcrum.toml")
        with open(config, "w") as f:
            f.write(bench.fulcrum_config(backends.addresses, args.algorithm, 1, 1000))
        proc = bench.start(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
             "--dump-instr=no", "--collect-jumps=no",
             binary, "run", "--config", config],
            stderr=open(os.path.join(tmp, "valgrind.log"), "w"))
        match = bench.read_line_matching(proc, r"listening web http://(\S+)", "fulcrum",
                                         timeout=120)
        address = match.group(1)
        bench.wait_http(address, "fulcrum under callgrind", timeout=60)
        send(address, args.warmup)
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True,
                       capture_output=True)
        started = time.monotonic()
        send(address, args.requests)
        elapsed = time.monotonic() - started
        before = set(glob.glob(out_file + "*"))
        subprocess.run(["callgrind_control", "--dump=measured", str(proc.pid)], check=True,
                       capture_output=True)
        deadline = time.monotonic() + 30
        dumps = []
        while time.monotonic() < deadline and not dumps:
            dumps = [p for p in set(glob.glob(out_file + ".*")) - before if os.path.getsize(p)]
            time.sleep(0.1)
        if not dumps:
            sys.exit("callgrind did not write the dump")
        time.sleep(0.5)  # the dump file is written in one go; let it finish
        dump = sorted(dumps)[-1]
        instructions = totals(dump)
        per_request = instructions / args.requests
        annotate = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", "--auto=no", "--threshold=0.5", dump],
            capture_output=True, text=True).stdout
        costs, edges = self_costs(dump)
        own = sorted(costs.items(), key=lambda kv: -kv[1])
    finally:
        bench.stop_all()

    print(f"fulcrum ({args.algorithm}, workers = 1) under callgrind: {args.requests} requests "
          f"({elapsed:.1f} s) after {args.warmup} warm-up")
    print(f"instructions per proxied request: {per_request:,.0f}")
    print("\ntop functions (self, share of all instructions):")
    for name, cost in own[: args.top]:
        print(f"  {100.0 * cost / instructions:>5.2f}%  {cost / args.requests:>10,.0f} /req  "
              f"{name[:140]}")
    for primitive in ("__memcpy_avx_unaligned_erms", "malloc", "_int_free"):
        callers = sorted(((cost, caller) for (caller, c), cost in edges.items()
                          if c == primitive), reverse=True)[:6]
        if callers:
            print(f"\ncallers of {primitive} (instructions per request spent in it):")
            for cost, caller in callers:
                print(f"  {cost / args.requests:>8,.0f} /req  {caller[:140]}")
    for title, text in (("inclusive", annotate),):
        print(f"\ntop functions ({title}, share of all instructions):")
        rows = 0
        for line in text.splitlines():
            m = re.match(r"\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(.*)", line)
            if m and rows < args.top:
                name = function_name(m.group(3))
                print(f"  {m.group(2):>6}%  {int(m.group(1).replace(',', '')) / args.requests:>10,.0f}"
                      f" /req  {name[:140]}")
                rows += 1
    print(f"\ndump kept in {dump}")
    if args.max is not None and per_request > args.max:
        print(f"FAIL: {per_request:,.0f} instructions per request > --max {args.max:,}")
        sys.exit(1)


if __name__ == "__main__":
    main()
