#!/usr/bin/env bash
# Fulcrum vs HAProxy vs nginx benchmark: one command. See bench/README.md.
#   bench/run.sh            # full run: 3 interleaved rounds of 10 s per balancer and scenario
#   bench/run.sh --quick    # 3 s x 1 round, for a first look
#   bench/run.sh --help     # every option
# Installs nothing; says how to install nginx, haproxy, wrk and oha when they are missing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 "$here/bench.py" "$@"
