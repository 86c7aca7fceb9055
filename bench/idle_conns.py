#!/usr/bin/env python3
"""Opens N keep-alive connections to ADDRESS, sends one complete GET on each, reads each answer,
then prints `holding N` and keeps them all open and idle until it is terminated.

Usage: idle_conns.py HOST:PORT N   (raises its own descriptor limit; run as a child of bench.py)
"""

import resource
import signal
import socket
import sys
import time

BATCH = 250


def response_complete(data):
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return body.endswith(b"0\r\n\r\n")  # chunked


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    count = int(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 100
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    held, failed = [], 0
    deadline = time.monotonic() + 100
    while len(held) + failed < count and time.monotonic() < deadline:
        batch = []
        for _ in range(min(BATCH, count - len(held) - failed)):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(request)
            batch.append(s)
        for s in batch:
            data = b""
            try:
                while not response_complete(data):
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed")
                    data += chunk
                if not data.startswith(b"HTTP/1.1 200"):
                    raise ConnectionError(data[:40])
                held.append(s)
            except (OSError, ConnectionError) as error:
                failed += 1
                if failed <= 3:
                    print(f"connection failed: {error}", file=sys.stderr, flush=True)
                s.close()
    print(f"holding {len(held)} failed {failed}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
