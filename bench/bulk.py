#!/usr/bin/env python3
"""Bulk TCP transfer through an echo server: sends N bytes and reads them back, timed.

    bulk.py HOST:PORT BYTES [--verify]

One connection. A thread sends BYTES (a repeating 1 MiB pattern) and then half-closes; the main
thread reads until the echo server closes and checks that exactly BYTES came back; with
`--verify` also that they are the bytes sent (CRC-32 of the stream: costs client CPU, so the
harness uses it on the warm-up transfer only). Prints one JSON line:
{"bytes": N, "seconds": S, "ok": true|false, "error": "..."}. Python 3 standard library only.
Nothing is allocated per chunk (sendall of a memoryview, recv_into one buffer).
"""

import json
import socket
import sys
import threading
import time
import zlib

CHUNK = 1 << 20


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    total = int(sys.argv[2])
    pattern = bytes(i % 251 for i in range(CHUNK))
    verify = "--verify" in sys.argv[3:]
    expected = 0
    if verify:
        for offset in range(0, total, CHUNK):
            expected = zlib.crc32(pattern[:min(CHUNK, total - offset)], expected)
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    errors = []

    def send():
        try:
            view, left = memoryview(pattern), total
            while left:
                n = min(left, CHUNK)
                sock.sendall(view[:n])
                left -= n
            sock.shutdown(socket.SHUT_WR)
        except OSError as error:
            errors.append(f"send: {error}")

    buf = bytearray(CHUNK)
    view = memoryview(buf)
    received, crc = 0, 0
    started = time.perf_counter()
    sender = threading.Thread(target=send)
    sender.start()
    try:
        while True:
            n = sock.recv_into(view, CHUNK)
            if n == 0:
                break
            if verify:
                crc = zlib.crc32(view[:n], crc)
            received += n
    except OSError as error:
        errors.append(f"receive: {error}")
    elapsed = time.perf_counter() - started
    sender.join()
    sock.close()
    if received != total:
        errors.append(f"received {received} of {total} bytes")
    elif verify and crc != expected:
        errors.append("the bytes received differ from the bytes sent (CRC-32)")
    print(json.dumps({"bytes": received, "seconds": elapsed, "ok": not errors,
                      "error": "; ".join(errors)}), flush=True)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
