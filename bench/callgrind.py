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
            dumps = [p for p in set(glob.glob(out_file + "*")) - before if os.path.getsize(p)]
            time.sleep(0.1)
        if not dumps:
            sys.exit("callgrind did not write the dump")
        time.sleep(0.5)  # the dump file is written in one go; let it finish
        dump = sorted(dumps)[-1]
        instructions = totals(dump)
        per_request = instructions / args.requests
        annotate = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", f"--threshold=99", dump],
            capture_output=True, text=True).stdout
        self_cost = subprocess.run(
            ["callgrind_annotate", "--inclusive=no", f"--threshold=99", dump],
            capture_output=True, text=True).stdout
    finally:
        bench.stop_all()

    print(f"fulcrum ({args.algorithm}, workers = 1) under callgrind: {args.requests} requests "
          f"({elapsed:.1f} s) after {args.warmup} warm-up")
    print(f"instructions per proxied request: {per_request:,.0f}")
    for title, text in (("inclusive", annotate), ("self", self_cost)):
        print(f"\ntop functions ({title}, share of all instructions):")
        rows = 0
        for line in text.splitlines():
            m = re.match(r"\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(.*)", line)
            if m and rows < args.top:
                name = re.sub(r"^\S+:", "", m.group(3)).strip()
                print(f"  {m.group(2):>6}%  {int(m.group(1).replace(',', '')) / args.requests:>10,.0f}"
                      f" /req  {name[:140]}")
                rows += 1
    print(f"\ndump kept in {dump}")
    if args.max is not None and per_request > args.max:
        print(f"FAIL: {per_request:,.0f} instructions per request > --max {args.max:,}")
        sys.exit(1)


if __name__ == "__main__":
    main()
