#!/usr/bin/env bash
# Instructions per proxied request under callgrind (hot-path regression guard). See bench/README.md.
#   bench/callgrind.sh [--requests N] [--max INSTRUCTIONS] [--no-build]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 "$here/callgrind.py" "$@"
