#!/bin/bash
# Copy of /work/notes/idle.sh: PORT (18091) and WAIT (3 s: parking takes 1-2 s) settable.
# RSS per idle keep-alive connection (10k by default) for fulcrum (release build).
BIN=${BIN:-/work/main/target/release/fulcrum}; N=${N:-10000}; P=${PORT:-18091}
T=$(mktemp -d); pids=(); addrs=()
for i in 1 2 3; do $BIN backend --listen 127.0.0.1:0 --name b$i > $T/b$i.out 2>/dev/null & pids+=($!); done
sleep 0.5
for i in 1 2 3; do addrs+=($(grep -o 'http://[^ ]*' $T/b$i.out | head -1 | sed 's#http://##')); done
printf '[server]\nworkers = 1\n[listeners.web]\nlisten = "127.0.0.1:'$P'"\npool = "app"\nmax_connections = 20000\n[pools.app]\nalgorithm = "round_robin"\nbackends = ["%s", "%s", "%s"]\n' ${addrs[@]} > $T/f.toml
ulimit -n 65536
$EXTRA $BIN run --config $T/f.toml >/dev/null 2>${ERR:-/dev/null} & fp=$!
sleep 0.5
r0=$(awk '/VmRSS/{print $2}' /proc/$fp/status)
python3 $(dirname "$0")/idle_conns.py 127.0.0.1:$P $N > $T/idle.out 2>&1 & ip=$!
for i in $(seq 1 200); do grep -q holding $T/idle.out && break; sleep 0.25; done
sleep ${WAIT:-3}
r1=$(awk '/VmRSS/{print $2}' /proc/$fp/status)
cat $T/idle.out | head -2
echo "rss before $r0 KiB after $r1 KiB: $(( (r1-r0)*1024/N )) bytes/conn"
kill $ip $fp ${pids[@]}
