#!/bin/bash
# Interleaved A/B of fulcrum binaries: CPU µs per request of `fulcrum run` (workers = 1, round
# robin) pinned to CPU 0, wrk -t1 -c64 on CPU 1, three `fulcrum backend`s on CPU 1. Paired
# rounds, so a slow drift of a noisy machine hits every binary alike; compare per round.
#   bench/ab.sh BIN_A BIN_B [...]        ROUNDS=5 SECS=5 PORT=18095 by default
set -u
[ $# -ge 1 ] || { echo "usage: $0 FULCRUM_BINARY..." >&2; exit 2; }
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 2; }
T=$(mktemp -d); pids=(); addrs=(); P=${PORT:-18095}
for i in 1 2 3; do taskset -c 1 "$1" backend --listen 127.0.0.1:0 --name b$i > $T/b$i.out 2>/dev/null & pids+=($!); done
for i in 1 2 3; do
  for _ in $(seq 1 50); do grep -q 'http://' $T/b$i.out && break; sleep 0.1; done
  addrs+=($(grep -o 'http://[^ ]*' $T/b$i.out | head -1 | sed 's#http://##'))
done
printf '[server]\nworkers = 1\n[listeners.web]\nlisten = "127.0.0.1:%s"\npool = "app"\n[pools.app]\nalgorithm = "round_robin"\nbackends = ["%s", "%s", "%s"]\n' $P ${addrs[@]} > $T/f.toml
for round in $(seq 1 ${ROUNDS:-5}); do
  for bin in "$@"; do
    taskset -c 0 $bin run --config $T/f.toml >/dev/null 2>&1 & fp=$!
    for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/$P) 2>/dev/null && break; sleep 0.1; done
    taskset -c 1 wrk -t1 -c64 -d1s http://127.0.0.1:$P/ >/dev/null 2>&1
    c0=$(awk '{print $14+$15}' /proc/$fp/stat)
    out=$(taskset -c 1 wrk -t1 -c64 -d${SECS:-5}s http://127.0.0.1:$P/ 2>&1)
    c1=$(awk '{print $14+$15}' /proc/$fp/stat)
    reqs=$(echo "$out" | awk '/requests in/{print $1}')
    echo "$bin round $round: $reqs req, $(( (c1-c0)*10000000/reqs )) ns CPU/req ($(echo "$out" | awk '/Requests\/sec/{print $2}') req/s)"
    kill $fp; wait $fp 2>/dev/null
  done
done
kill ${pids[@]}; rm -rf $T
