#!/usr/bin/env python3
"""Fulcrum vs HAProxy vs nginx, side by side on loopback (python3 standard library only).

Run through bench/run.sh; `--help` lists the options. Installs nothing: missing tools are
reported with the command that installs them, and the rows that need them are skipped.

Layout (see bench/README.md): each balancer pinned to ONE core with ONE worker, the load
generator (wrk) on the other core(s), the three `fulcrum backend` processes on a core set of
their own when the machine has one (on 2 cores they share the load generator's core, so the
balancer's core is the balancer's alone). Runs are interleaved (fulcrum, haproxy, nginx,
repeat) and every figure is the median over the rounds.
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALANCERS = ("fulcrum", "haproxy", "nginx")
BASELINE = "fulcrum, all healthy"  # the slow scenario's baseline row
SCENARIOS = ("healthy", "slow", "idle", "scaling", "openloop", "tcp", "bulk", "https")
CHILDREN = []  # every process we started, stopped by pid at exit


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


def die_with_parent():
    """In the child: SIGTERM when the harness dies, even by SIGKILL (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def start(argv, cpus=None, stdout=subprocess.PIPE, stderr=None, env=None):
    """Starts `argv` (pinned to `cpus` with taskset when given) and records it for cleanup."""
    if cpus is not None:
        argv = ["taskset", "-c", cpus] + argv
    proc = subprocess.Popen(
        argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env, text=True,
        preexec_fn=die_with_parent,
    )
    CHILDREN.append(proc)
    return proc


def stop(proc, timeout=10):
    """SIGTERM, bounded wait, then SIGKILL: always by the process's own pid."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
    if proc in CHILDREN:
        CHILDREN.remove(proc)


def stop_all(*_):
    for proc in list(reversed(CHILDREN)):
        try:
            stop(proc, timeout=5)
        except Exception as error:  # keep stopping the others
            log(f"warning: cannot stop pid {proc.pid}: {error}")


def read_line_matching(proc, pattern, what, timeout=20):
    """Reads the process's stdout until a line matches `pattern`; bounded by `timeout`."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            continue
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(pattern, line)
        if match:
            sel.close()
            return match
    sel.close()
    raise RuntimeError(f"{what} did not become ready (exit status {proc.poll()})")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(address, path="/", timeout=2.0, scheme="http"):
    handlers = [urllib.request.ProxyHandler({})]
    if scheme == "https":  # the bench's self-signed certificate
        handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
    with urllib.request.build_opener(*handlers).open(
        f"{scheme}://{address}{path}", timeout=timeout
    ) as response:
        return response.status, response.read()


def wait_http(address, what, timeout=20, scheme="http"):
    """Waits until a GET through `address` answers 200 (readiness, bounded)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, _ = http_get(address, scheme=scheme)
            if status == 200:
                return
            last = f"status {status}"
        except Exception as error:
            last = error
        time.sleep(0.05)
    raise RuntimeError(f"{what} on {address} not answering 200: {last}")


def process_tree(pid):
    """`pid` and all its descendants (nginx: master + workers)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError):
            continue
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_split(pids):
    """(utime, stime) of the processes (all their threads), in seconds: user space, and the
    kernel working for them (syscalls, and on loopback the peer's TCP receive path)."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])  # field 14 of stat(5)
            system += int(fields[12])  # field 15
        except OSError:
            pass
    return user / TICKS, system / TICKS


def cpu_seconds(pids):
    """utime + stime of the processes (all their threads), in seconds."""
    return sum(cpu_split(pids))


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


# ---------------------------------------------------------------- backends


class Backends:
    """Three `fulcrum backend` processes on 127.0.0.1:0, pinned to the backend core set."""

    def __init__(self, binary, cpus, delays):
        self.procs, self.addresses = [], []
        for i, delay in enumerate(delays):
            argv = [binary, "backend", "--listen", "127.0.0.1:0", "--name", f"b{i + 1}",
                    "--workers", "1"]
            if delay:
                argv += ["--delay-ms", str(delay)]
            proc = start(argv, cpus=cpus, stderr=subprocess.DEVNULL)
            match = read_line_matching(proc, r"listening backend http://(\S+)", f"backend b{i + 1}")
            self.procs.append(proc)
            self.addresses.append(match.group(1))
        for address in self.addresses:
            wait_http(address, "backend")

    def stats(self):
        """Per backend (connections accepted, requests answered); None if not supported."""
        out = []
        for address in self.addresses:
            try:
                _, body = http_get(address, "/stats")
                data = json.loads(body)
                out.append((data["connections"], data["requests"]))
            except Exception:
                return None
        return out

    def stop(self):
        for proc in self.procs:
            stop(proc)


# ---------------------------------------------------------------- balancers


class Balancer:
    def __init__(self, kind, proc, address, algorithm, scheme="http"):
        self.kind, self.proc, self.address, self.algorithm = kind, proc, address, algorithm
        self.scheme = scheme  # what wrk speaks to it: http (also through TCP mode) or https

    def pids(self):
        return process_tree(self.proc.pid)

    def stop(self):
        stop(self.proc)


ALGORITHMS = {
    # scenario name -> balancer -> algorithm name in its own config language
    "rr": {"fulcrum": "round_robin", "haproxy": "roundrobin", "nginx": "round_robin"},
    "lc": {"fulcrum": "p2c", "haproxy": "leastconn", "nginx": "least_conn"},
}


def fulcrum_config(backends, algorithm, workers, max_connections, protocol="http", tls=None,
                   runtime=None):
    """`protocol`: "http", "tcp" (L4 mode) or "https" (TLS termination with `tls` =
    (cert PEM path, key PEM path)). `runtime`: the `[server] runtime` shape, when not the
    default."""
    listed = ", ".join(f'"{a}"' for a in backends)
    shape = f'runtime = "{runtime}"\n' if runtime else ""
    config = (
        f"[server]\nworkers = {workers}\n{shape}\n"
        f'[admin]\nlisten = "127.0.0.1:0"\n\n'
        f'[listeners.web]\nlisten = "127.0.0.1:0"\nprotocol = "{protocol}"\npool = "app"\n'
        f"max_connections = {max_connections}\n\n"
    )
    if protocol == "https":
        config += f'[[listeners.web.tls.certs]]\ncert = "{tls[0]}"\nkey = "{tls[1]}"\n\n'
    return config + f'[pools.app]\nalgorithm = "{algorithm}"\nbackends = [{listed}]\n'


def start_fulcrum(ctx, backends, algorithm, workers=1, cpus=None, max_connections=20000,
                  protocol="http", runtime=None):
    path = os.path.join(ctx.tmp, f"fulcrum-{protocol}-{algorithm}-{workers}-{runtime}.toml")
    with open(path, "w") as f:
        f.write(fulcrum_config(backends, algorithm, workers, max_connections, protocol,
                               getattr(ctx, "cert", None), runtime))
    err = open(os.path.join(ctx.tmp, "fulcrum.log"), "a")
    proc = start([ctx.binary, "run", "--config", path], cpus=cpus or ctx.balancer_cpu, stderr=err)
    # The scheme printed for a tcp listener differs between versions: accept any.
    match = read_line_matching(proc, r"listening web \w+://(\S+)", "fulcrum")
    scheme = "https" if protocol == "https" else "http"
    if protocol == "tcp":
        wait_ready(ctx, match.group(1), backends, "fulcrum tcp")
    else:
        wait_http(match.group(1), "fulcrum", scheme=scheme)
    return Balancer("fulcrum", proc, match.group(1), algorithm, scheme)


def fulcrum_check(ctx, algorithm="round_robin", protocol="http"):
    """None when `fulcrum check` accepts the config, else its first error line (peak_ewma,
    `tcp` and `https` listeners may not exist in the binary under test)."""
    path = os.path.join(ctx.tmp, f"check-{protocol}-{algorithm}.toml")
    with open(path, "w") as f:
        f.write(fulcrum_config(["127.0.0.1:1"], algorithm, 1, 10000, protocol,
                               getattr(ctx, "cert", None)))
    result = subprocess.run([ctx.binary, "check", "--config", path], capture_output=True,
                            text=True)
    if result.returncode == 0:
        return None
    lines = (result.stderr + result.stdout).strip().splitlines()
    if not lines:
        return f"exit status {result.returncode}"
    return re.sub(r"^(error: )?\S+\.toml:\d+:\d+: ", "", lines[0])  # the temporary file name


def fulcrum_accepts(ctx, algorithm):
    """Whether `fulcrum check` accepts `algorithm` (peak_ewma may not exist yet)."""
    return fulcrum_check(ctx, algorithm) is None


def start_haproxy(ctx, backends, algorithm, protocol="http"):
    port = free_port()
    tls = protocol == "https"
    bind = f" ssl crt {ctx.cert_bundle}" if tls else ""
    servers = "\n".join(f"    server b{i + 1} {a}" for i, a in enumerate(backends))
    # HAProxy reserves 2 descriptors per maxconn and refuses to start when it cannot raise the
    # limit that far (on a machine without CAP_SYS_RESOURCE the hard limit may be 20 000);
    # `no strict-limits` makes that a warning: idle client connections need only one each.
    maxconn = ctx.idle_connections + 500
    config = f"""global
    nbthread 1
    maxconn {maxconn}
    no strict-limits

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    option http-keep-alive
    http-reuse always

frontend web
    bind 127.0.0.1:{port}{bind}
    default_backend app

backend app
    balance {algorithm}
    option forwardfor
    http-request set-header X-Forwarded-Proto {"https" if tls else "http"}
{servers}
"""
    path = os.path.join(ctx.tmp, f"haproxy-{protocol}-{algorithm}.cfg")
    with open(path, "w") as f:
        f.write(config)
    err = open(os.path.join(ctx.tmp, "haproxy.log"), "a")
    proc = start(["haproxy", "-db", "-f", path], cpus=ctx.balancer_cpu, stdout=err, stderr=err)
    address = f"127.0.0.1:{port}"
    wait_http(address, "haproxy", scheme=protocol)
    return Balancer("haproxy", proc, address, algorithm, protocol)


def start_nginx(ctx, backends, algorithm, protocol="http"):
    port = free_port()
    tls = protocol == "https"
    listen = (f"{port} ssl;\n        ssl_certificate {ctx.cert[0]};\n"
              f"        ssl_certificate_key {ctx.cert[1]}") if tls else f"{port}"
    prefix = tempfile.mkdtemp(prefix="nginx-", dir=ctx.tmp)
    servers = "\n".join(f"        server {a};" for a in backends)
    method = "" if algorithm == "round_robin" else f"        {algorithm};\n"
    config = f"""worker_processes 1;
worker_rlimit_nofile {resource.getrlimit(resource.RLIMIT_NOFILE)[0]};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log error;
events {{
    worker_connections {resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100};
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream app {{
{method}{servers}
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}
}}
"""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(config)
    proc = start(["nginx", "-p", prefix, "-e", f"{prefix}/error.log", "-c", path], cpus=ctx.balancer_cpu,
                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(prefix, "stderr.log"), "w"))
    address = f"127.0.0.1:{port}"
    wait_http(address, "nginx", scheme=protocol)
    return Balancer("nginx", proc, address, algorithm, protocol)


# TCP (L4) mode: the balancer relays bytes; wrk still speaks HTTP to the HTTP backends behind
# it (one backend per client connection, for the connection's life), and the bulk scenario
# puts a `fulcrum backend --tcp-echo` behind it.


def backends_speak_http(ctx, backends):
    return not any(a in getattr(ctx, "echo_addresses", ()) for a in backends)


def wait_ready(ctx, address, backends, what):
    if backends_speak_http(ctx, backends):
        wait_http(address, what)
    else:
        wait_echo(address, what)


def wait_echo(address, what, timeout=20):
    """Waits until a few bytes sent through `address` come back (TCP echo; bounded)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=2) as s:
                s.sendall(b"ping")
                s.shutdown(socket.SHUT_WR)
                got = b""
                while len(got) < 4:
                    chunk = s.recv(4 - len(got))
                    if not chunk:
                        break
                    got += chunk
                if got == b"ping":
                    return
                last = f"echoed {got!r}"
        except OSError as error:
            last = error
        time.sleep(0.05)
    raise RuntimeError(f"{what} on {address} does not echo: {last}")


def start_fulcrum_tcp(ctx, backends, algorithm):
    return start_fulcrum(ctx, backends, algorithm, protocol="tcp")


def start_haproxy_tcp(ctx, backends, algorithm):
    port = free_port()
    servers = "\n".join(f"    server b{i + 1} {a}" for i, a in enumerate(backends))
    config = f"""global
    nbthread 1
    maxconn 20000
    no strict-limits

defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s

frontend l4
    bind 127.0.0.1:{port}
    default_backend app

backend app
    balance {algorithm}
{servers}
"""
    path = os.path.join(ctx.tmp, f"haproxy-tcp-{algorithm}-{port}.cfg")
    with open(path, "w") as f:
        f.write(config)
    err = open(os.path.join(ctx.tmp, "haproxy.log"), "a")
    proc = start(["haproxy", "-db", "-f", path], cpus=ctx.balancer_cpu, stdout=err, stderr=err)
    address = f"127.0.0.1:{port}"
    wait_ready(ctx, address, backends, "haproxy mode tcp")
    return Balancer("haproxy", proc, address, algorithm)


def nginx_stream():
    """How this nginx gets its `stream {}` module: ("", None) when built in, ("load_module
    ...;", None) when the dynamic module is installed, (None, reason) when it is missing."""
    if shutil.which("nginx") is None:
        return None, "nginx not installed"
    flags = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    if re.search(r"--with-stream(\s|$)", flags):
        return "", None
    if "--with-stream=dynamic" in flags:
        for directory in ("/usr/lib/nginx/modules", "/usr/share/nginx/modules"):
            module = os.path.join(directory, "ngx_stream_module.so")
            if os.path.exists(module):
                return f"load_module {module};\n", None
    return None, ("no stream module in this nginx (nginx-light); "
                  "apt-get install libnginx-mod-stream")


def start_nginx_stream(ctx, backends, algorithm):
    port = free_port()
    prefix = tempfile.mkdtemp(prefix="nginx-stream-", dir=ctx.tmp)
    load, _ = nginx_stream()
    servers = "\n".join(f"        server {a};" for a in backends)
    method = "" if algorithm == "round_robin" else f"        {algorithm};\n"
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    config = f"""{load}worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log error;
events {{
    worker_connections {nofile - 100};
}}
stream {{
    upstream app {{
{method}{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        proxy_pass app;
        proxy_timeout 60s;
        # Keep relaying the other way after one side half-closes (the echo checks and the
        # bulk client shut down their sending side first); nginx ≥ 1.21.4, off by default.
        proxy_half_close on;
    }}
}}
"""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(config)
    proc = start(["nginx", "-p", prefix, "-e", f"{prefix}/error.log", "-c", path], cpus=ctx.balancer_cpu,
                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(prefix, "stderr.log"), "w"))
    address = f"127.0.0.1:{port}"
    wait_ready(ctx, address, backends, "nginx stream")
    return Balancer("nginx", proc, address, algorithm)


def start_balancer(ctx, kind, backends, algorithm, protocol="http"):
    """`protocol`: "http" (L7), "https" (TLS termination, then HTTP) or "tcp" (L4 relay)."""
    if protocol == "tcp":
        starter = {"fulcrum": start_fulcrum_tcp, "haproxy": start_haproxy_tcp,
                   "nginx": start_nginx_stream}[kind]
        return starter(ctx, backends, algorithm)
    starter = {"fulcrum": start_fulcrum, "haproxy": start_haproxy, "nginx": start_nginx}[kind]
    return starter(ctx, backends, algorithm, protocol=protocol)


# ---------------------------------------------------------------- load generator


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_ms(text):
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(match.group(1)) * UNITS[match.group(2)]


def run_wrk(ctx, address, connections, seconds, path="/", scheme="http"):
    argv = ["taskset", "-c", ctx.client_cpus, "wrk", f"-t{ctx.client_threads}",
            f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s",
            f"{scheme}://{address}{path}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    out = done.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"wrk against {address} failed: {out}{done.stderr}")
    result = {"rps": float(rps.group(1))}
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        result[f"p{pct}"] = parse_ms(m.group(1)) if m else None
    total = re.search(r"(\d+) requests in", out)
    result["requests"] = int(total.group(1)) if total else 0
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    result["errors"] = errors
    return result


def run_oha(ctx, address, connections, seconds, scheme="http", extra=()):
    """One oha run: req/s and p50/p90/p99 in ms. Closed loop unless `extra` sets a rate; its
    percentiles are of the latencies as measured (wrk 4 adds synthetic samples after each slow
    request, its coordinated-omission correction, which dominates the slow scenario's p99)."""
    argv = ["taskset", "-c", ctx.client_cpus, "oha", "--no-tui", "--output-format", "json",
            "-z", f"{seconds}s", "-c", str(connections), *extra, f"{scheme}://{address}/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    try:
        data = json.loads(done.stdout)
    except json.JSONDecodeError as error:
        raise RuntimeError(f"oha against {address} failed: {done.stdout[:300]}{done.stderr[:300]}") from error
    latency = data["latencyPercentiles"]
    return {"rps": data["summary"]["requestsPerSec"],
            **{f"p{p}": latency[f"p{p}"] * 1000.0 for p in ("50", "90", "99")}}


def measure(ctx, balancer, backends, connections, seconds):
    """One wrk run through `balancer`: req/s, latency, CPU µs/request, upstream reuse, shares."""
    pids = balancer.pids()
    before_stats = backends.stats()
    user0, system0 = cpu_split(pids)
    result = run_wrk(ctx, balancer.address, connections, seconds, scheme=balancer.scheme)
    user1, system1 = cpu_split(pids)
    cpu0, cpu1 = user0 + system0, user1 + system1
    after_stats = backends.stats()
    served = max(result["requests"], 1)
    result["cpu_us"] = (cpu1 - cpu0) * 1e6 / served
    result["user_us"] = (user1 - user0) * 1e6 / served
    result["sys_us"] = (system1 - system0) * 1e6 / served
    result["cpu_util"] = (cpu1 - cpu0) / seconds
    if before_stats and after_stats:
        # Each /stats read opens one connection: the "after" read is inside the delta.
        conns = sum(a[0] - b[0] - 1 for a, b in zip(after_stats, before_stats))
        reqs = [a[1] - b[1] for a, b in zip(after_stats, before_stats)]
        total = max(sum(reqs), 1)
        result["reuse"] = 100.0 * max(total - conns, 0) / total
        result["new_conns"] = conns
        result["shares"] = [100.0 * r / total for r in reqs]
    return result


def median_of(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- scenarios


def available(ctx):
    return [b for b in BALANCERS if b in ctx.balancers]


def interleaved(ctx, backends, algorithms, connections, label, extra=(), protocol="http",
                kinds=None, with_oha=False):
    """Starts the balancers, warms each up, runs them interleaved; returns name -> medians.

    `extra`: more entries `(name, kind, backends, algorithm)` run in the same rounds (e.g. a
    baseline on other backends). `protocol`: how the balancers listen (see start_balancer);
    `kinds`: the balancers to run (default: all installed); `with_oha`: also one closed-loop
    oha run per round (keys oha_p50, oha_p90, oha_p99)."""
    entries = [(kind, kind, backends, algorithms[kind])
               for kind in (available(ctx) if kinds is None else kinds)]
    entries += list(extra)
    started = {}
    try:
        for name, kind, their_backends, algorithm in entries:
            balancer = start_balancer(ctx, kind, their_backends.addresses, algorithm, protocol)
            started[name] = (balancer, their_backends)
            # warm-up: connections, caches (and TLS handshakes)
            run_wrk(ctx, balancer.address, connections, 1, scheme=balancer.scheme)
        runs = {name: [] for name in started}
        for round_no in range(ctx.rounds):
            for name, (balancer, their_backends) in started.items():
                r = measure(ctx, balancer, their_backends, connections, ctx.duration)
                if with_oha:
                    o = run_oha(ctx, balancer.address, connections, ctx.duration,
                                scheme=balancer.scheme)
                    r.update({f"oha_{k}": v for k, v in o.items()})
                    log(f"  [{label}] round {round_no + 1}/{ctx.rounds} {name:8} oha "
                        f"{o['rps']:9.0f} req/s p50 {o['p50']:.2f} ms p90 {o['p90']:.2f} ms "
                        f"p99 {o['p99']:.2f} ms")
                log(f"  [{label}] round {round_no + 1}/{ctx.rounds} {name:8} "
                    f"{r['rps']:9.0f} req/s p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms "
                    f"cpu {r['cpu_us']:.1f} us/req (user {r['user_us']:.1f} sys {r['sys_us']:.1f}; "
                    f"{100 * r['cpu_util']:.0f}% of a core)"
                    + (f" reuse {r['reuse']:.2f}%" if "reuse" in r and protocol != "tcp" else "")
                    + (f" errors {r['errors']}" if r["errors"] else ""))
                runs[name].append(r)
    finally:
        for balancer, _ in started.values():
            balancer.stop()
    medians = {}
    for name, rs in runs.items():
        m = {key: median_of(rs, key) for key in
             ("rps", "p50", "p90", "p99", "cpu_us", "user_us", "sys_us", "cpu_util", "reuse",
              "oha_p50", "oha_p90", "oha_p99")}
        m["errors"] = sum(r["errors"] for r in rs)
        if all("shares" in r for r in rs):
            m["shares"] = [statistics.median(r["shares"][i] for r in rs) for i in range(3)]
        m["algorithm"] = started[name][0].algorithm
        medians[name] = m
    return medians


def established(address):
    """Established connections on the listening side of `address` (ss), or None without ss."""
    if shutil.which("ss") is None:
        return None
    port = address.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    return len(out.splitlines())


def idle_rss(ctx, backends, count):
    """RSS of each balancer holding `count` idle keep-alive client connections."""
    results = {}
    for kind in available(ctx):
        balancer = start_balancer(ctx, kind, backends.addresses, ALGORITHMS["rr"][kind])
        try:
            before = rss_kib(balancer.pids())
            holder = start([sys.executable, os.path.join(ROOT, "bench", "idle_conns.py"),
                            balancer.address, str(count)], cpus=ctx.client_cpus)
            match = read_line_matching(holder, r"^holding (\d+)", "idle connection holder",
                                       timeout=120)
            # Let the connections be idle for a moment, as idle connections are: 3 s covers
            # Fulcrum's default park_after (1 s) and the peers' buffer release.
            time.sleep(3)
            after = rss_kib(balancer.pids())
            held = established(balancer.address)
            if held is None:
                held = int(match.group(1))
            elif held < int(match.group(1)):
                log(f"  [idle] {kind}: only {held} of {match.group(1)} connections still open "
                    f"when RSS was read (the balancer closed idle ones)")
            stop(holder)
            results[kind] = {"rss_before": before, "rss": after, "held": held,
                             "per_conn": (after - before) / max(held, 1)}
            log(f"  [idle] {kind:8} {held} connections: RSS {before} -> {after} KiB "
                f"({results[kind]['per_conn']:.2f} KiB/connection)")
        finally:
            balancer.stop()
    return results


def tcp_unsupported(ctx, kind):
    """Why `kind` cannot run in TCP (L4) mode here, or None."""
    if kind == "fulcrum":
        error = fulcrum_check(ctx, protocol="tcp")
        return None if error is None else f"this Fulcrum has no TCP mode (fulcrum check: {error})"
    if kind == "nginx":
        return nginx_stream()[1]
    return None


def tcp_mode(ctx, backends):
    """TCP mode, same load as `healthy`: wrk -c64 keep-alive HTTP through an L4 relay (each
    client connection is one session on one backend). Fulcrum `protocol = "tcp"`, HAProxy
    `mode tcp`, nginx `stream {}`."""
    kinds, skipped = [], {}
    for kind in available(ctx):
        why = tcp_unsupported(ctx, kind)
        if why:
            skipped[kind] = why
            log(f"  [tcp] {kind}: skipped: {why}")
        else:
            kinds.append(kind)
    medians = interleaved(ctx, backends, ALGORITHMS["rr"], 64, "tcp", protocol="tcp",
                          kinds=kinds)
    medians["skipped"] = skipped
    return medians


GIB = 1 << 30


def run_bulk(ctx, address, size, verify=False):
    argv = [sys.executable, os.path.join(ROOT, "bench", "bulk.py"), address, str(size)]
    if verify:
        argv.append("--verify")
    done = subprocess.run(["taskset", "-c", ctx.client_cpus] + argv, capture_output=True,
                          text=True, timeout=600)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"bulk.py through {address} failed: {done.stdout}{done.stderr}")
    if not result["ok"]:
        raise RuntimeError(f"bulk transfer through {address}: {result['error']}")
    return result


def bulk(ctx, size):
    """TCP mode, bulk: `size` bytes echoed back by a `fulcrum backend --tcp-echo`, direct and
    through each balancer in TCP mode; throughput = size / time (the bytes also travel back:
    2 × size cross the balancer)."""
    if ctx.no_tcp_echo:
        return {"skipped_all": ctx.no_tcp_echo}
    echo = start([ctx.binary, "backend", "--listen", "127.0.0.1:0", "--name", "echo",
                  "--workers", "1", "--tcp-echo"], cpus=ctx.backend_cpus,
                 stderr=subprocess.DEVNULL)
    address = read_line_matching(echo, r"listening backend tcp://(\S+)", "tcp echo").group(1)
    ctx.echo_addresses = [address]
    wait_echo(address, "tcp echo backend")
    started, skipped = {"direct": None}, {}
    out = {}
    try:
        for kind in available(ctx):
            why = tcp_unsupported(ctx, kind)
            if why:
                skipped[kind] = why
                log(f"  [bulk] {kind}: skipped: {why}")
                continue
            try:
                started[kind] = start_balancer(ctx, kind, [address], "roundrobin" if kind ==
                                               "haproxy" else "round_robin", "tcp")
            except RuntimeError as error:
                skipped[kind] = f"did not start: {error}"
                log(f"  [bulk] {kind}: skipped: {skipped[kind]}")
        for name, balancer in started.items():  # warm-up, and the bytes are checked
            run_bulk(ctx, balancer.address if balancer else address, 64 << 20, verify=True)
        runs = {name: [] for name in started}
        for round_no in range(ctx.rounds):
            for name, balancer in started.items():
                pids = balancer.pids() if balancer else []
                cpu0 = cpu_seconds(pids)
                r = run_bulk(ctx, balancer.address if balancer else address, size)
                cpu = cpu_seconds(pids) - cpu0
                gib = r["bytes"] / GIB
                r["gib_s"] = gib / r["seconds"]
                r["cpu_s_per_gib"] = cpu / gib if balancer else None
                log(f"  [bulk] round {round_no + 1}/{ctx.rounds} {name:8} {r['gib_s']:.2f} GiB/s"
                    f" ({r['seconds']:.2f} s)" + (f", balancer CPU {cpu:.2f} s" if balancer
                                                   else ""))
                runs[name].append(r)
        for name, rs in runs.items():
            out[name] = {key: median_of(rs, key) for key in ("gib_s", "seconds", "cpu_s_per_gib")}
    finally:
        for balancer in started.values():
            if balancer:
                balancer.stop()
        stop(echo)
        ctx.echo_addresses = []
    out["skipped"] = skipped
    out["size"] = size
    return out


def make_cert(ctx):
    """A self-signed ECDSA P-256 certificate for localhost / 127.0.0.1 (openssl CLI), or None
    with the reason."""
    if shutil.which("openssl") is None:
        return "openssl CLI not installed (only the bench needs it): apt-get install openssl"
    cert, key = os.path.join(ctx.tmp, "cert.pem"), os.path.join(ctx.tmp, "key.pem")
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "7", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        capture_output=True, text=True)
    if done.returncode != 0:
        return f"openssl could not make a certificate: {done.stderr.strip()}"
    ctx.cert = (cert, key)
    ctx.cert_bundle = os.path.join(ctx.tmp, "cert+key.pem")  # HAProxy wants both in one file
    with open(ctx.cert_bundle, "w") as f:
        f.write(open(cert).read() + open(key).read())
    return None


def https(ctx):
    """TLS termination, same load as `healthy`: wrk -c64 over HTTPS (keep-alive, so the
    handshakes happen in the warm-up; the rounds measure record encryption + proxying)."""
    why = make_cert(ctx)
    if why:
        log(f"scenario https: skipped: {why}")
        return {"skipped_all": why}
    kinds, skipped = [], {}
    for kind in available(ctx):
        error = fulcrum_check(ctx, protocol="https") if kind == "fulcrum" else None
        if error:
            # An unknown `https` variant (or `tls` key) means TLS termination is not built in.
            why = ("this Fulcrum has no TLS listener yet" if re.search(r"https|`tls`", error)
                   else "fulcrum check refused the https config")
            skipped[kind] = f"{why} (fulcrum check: {error})"
            log(f"  [https] fulcrum: skipped: {why}")
        else:
            kinds.append(kind)
    backends = Backends(ctx.binary, ctx.backend_cpus, [0, 0, 0])
    try:
        medians = interleaved(ctx, backends, ALGORITHMS["rr"], 64, "https", protocol="https",
                              kinds=kinds)
    finally:
        backends.stop()
    medians["skipped"] = skipped
    return medians


# ---------------------------------------------------------------- output


def fmt(value, spec=".0f", suffix=""):
    return "—" if value is None else f"{value:{spec}}{suffix}"


def ratio(a, b):
    return "—" if a is None or not b else f"{a / b:.2f}×"


def print_main_table(title, medians, cols):
    print(f"\n### {title}\n")
    header = ["balancer", "algorithm"] + [c[0] for c in cols]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    skipped = medians.get("skipped", {})
    for kind in BALANCERS + (BASELINE,):
        if kind not in medians:
            if kind != BASELINE:
                why = skipped.get(kind, f"{kind} not installed")
                print(f"| {kind} | skipped: {why} |" + " |" * (len(header) - 2))
            continue
        m = medians[kind]
        print(f"| {kind} | {m['algorithm']} | "
              + " | ".join(fmt(m.get(key), spec, suffix) for _, key, spec, suffix in cols) + " |")
    f = medians.get("fulcrum")
    for peer in ("haproxy", "nginx"):
        if f and peer in medians:
            p = medians[peer]
            print(f"| Fulcrum ÷ {peer} | | "
                  + " | ".join(ratio(f.get(key), p.get(key)) for _, key, _, _ in cols) + " |")


def machine_line():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
            f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


# ---------------------------------------------------------------- main


INSTALL = {
    "wrk": "apt-get install wrk",
    "haproxy": "apt-get install haproxy",
    "nginx": "apt-get install nginx-light",
    "oha": "cargo install oha   (takes several minutes to build)",
    "taskset": "apt-get install util-linux",
    "openssl": "apt-get install openssl   (the CLI makes the https scenario's certificate)",
}


def check_tools():
    missing = {}
    for tool in ("wrk", "haproxy", "nginx", "oha", "taskset", "openssl"):
        if shutil.which(tool) is None:
            missing[tool] = INSTALL[tool]
    for tool, how in missing.items():
        log(f"missing: {tool} — install with: {how}")
    if "nginx" not in missing:
        _, why = nginx_stream()
        if why:
            log(f"missing: nginx stream module (TCP-mode rows) — {why}")
    return missing


def cpu_layout(args):
    """(balancer CPU, wrk CPUs, backend CPUs, wrk threads). CPUs 0 and 1 are kept for the
    balancer (1 only for the `workers = 2` scaling row) when there are ≥ 4 of them."""
    n = os.cpu_count() or 1
    if n < 2:
        sys.exit("need at least 2 CPUs: one for the balancer, one for the load generator")
    balancer = args.balancer_cpu or "0"
    if n >= 6:
        client, backend, threads = f"4-{n - 1}", "2-3", min(n - 4, 4)
    elif n >= 4:
        client, backend, threads = "3" if n == 4 else "3-4", "2", 1 if n == 4 else 2
    else:
        client, backend, threads = "1", "1", 1
    return (balancer, args.client_cpus or client, args.backend_cpus or backend,
            args.client_threads or threads)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per run, 1 round")
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma list of: {', '.join(SCENARIOS)}")
    parser.add_argument("--idle-connections", type=int, default=10000)
    parser.add_argument("--bulk-bytes", type=int, default=GIB,
                        help="bytes echoed in the TCP bulk scenario (1 GiB)")
    parser.add_argument("--no-build", action="store_true", help="use the existing release binary")
    parser.add_argument("--fulcrum-bin", metavar="PATH",
                        help="run this fulcrum binary (for the balancer and the backends) "
                             "instead of building target/release/fulcrum")
    parser.add_argument("--balancer-cpu", help="core of the balancer (0)")
    parser.add_argument("--client-cpus", help="cores of wrk (1 on 2 CPUs)")
    parser.add_argument("--backend-cpus", help="cores of the 3 backends (1)")
    parser.add_argument("--client-threads", type=int, help="wrk threads")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 3, 1
    scenarios = set(args.scenarios.split(","))
    known = set(SCENARIOS)
    if not scenarios <= known:
        parser.error(f"unknown scenario(s) {', '.join(sorted(scenarios - known))}; "
                     f"known: {', '.join(sorted(known))}")

    missing = check_tools()
    if "wrk" in missing or "taskset" in missing:
        sys.exit("wrk and taskset are required; see above")

    binary = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                          "release", "fulcrum")
    if args.fulcrum_bin:
        binary = os.path.abspath(args.fulcrum_bin)
        if not os.access(binary, os.X_OK):
            sys.exit(f"--fulcrum-bin {binary}: not an executable file")
    elif not args.no_build:
        log("building fulcrum (release)...")
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "fulcrum"], cwd=ROOT,
                       check=True)

    # Enough descriptors for 10 000 idle connections (balancers inherit the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, 4 * args.idle_connections + 1000)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass

    class Ctx:
        pass

    ctx = Ctx()
    ctx.binary = binary
    ctx.tmp = tempfile.mkdtemp(prefix="fulcrum-bench-")
    ctx.duration, ctx.rounds = args.duration, args.rounds
    ctx.idle_connections = args.idle_connections
    (ctx.balancer_cpu, ctx.client_cpus, ctx.backend_cpus, ctx.client_threads) = cpu_layout(args)
    ctx.balancers = [b for b in BALANCERS if b not in missing]
    ctx.echo_addresses = []
    backend_help = subprocess.run([binary, "backend", "--help"], capture_output=True,
                                  text=True).stdout
    ctx.no_tcp_echo = (None if "--tcp-echo" in backend_help
                       else "this Fulcrum's demo backend has no --tcp-echo (no TCP mode)")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = {}
    try:
        log(f"machine: {machine_line()}")
        log(f"pinning: balancer on CPU {ctx.balancer_cpu}, wrk (-t{ctx.client_threads}) on CPUs "
            f"{ctx.client_cpus}, backends on CPUs {ctx.backend_cpus}; configs in {ctx.tmp}")
        if "healthy" in scenarios:
            backends = Backends(binary, ctx.backend_cpus, [0, 0, 0])
            try:
                log("scenario healthy: 3 backends, wrk -c64, round robin")
                results["healthy"] = interleaved(ctx, backends, ALGORITHMS["rr"], 64, "healthy")
            finally:
                backends.stop()
        if "slow" in scenarios:
            algorithms = dict(ALGORITHMS["lc"])
            algorithms["fulcrum"] = "peak_ewma" if fulcrum_accepts(ctx, "peak_ewma") else "p2c"
            log(f"scenario slow: backend b3 +50 ms, wrk -c32; fulcrum uses "
                f"{algorithms['fulcrum']}"
                + ("" if algorithms["fulcrum"] == "peak_ewma"
                   else " (peak_ewma not accepted by `fulcrum check` yet)"))
            backends = Backends(binary, ctx.backend_cpus, [0, 0, 50])
            healthy = Backends(binary, ctx.backend_cpus, [0, 0, 0])
            try:
                # Fulcrum on all-healthy backends at the same -c32: the p99 baseline of the
                # "≤ 3 × all-healthy p99" target, in the same rounds.
                baseline = [(BASELINE, "fulcrum", healthy, algorithms["fulcrum"])]
                results["slow"] = interleaved(ctx, backends, algorithms, 32, "slow", baseline,
                                              with_oha="oha" not in missing)
            finally:
                backends.stop()
                healthy.stop()
        if "idle" in scenarios:
            backends = Backends(binary, ctx.backend_cpus, [0, 0, 0])
            try:
                log(f"scenario idle: {args.idle_connections} idle keep-alive connections")
                results["idle"] = idle_rss(ctx, backends, args.idle_connections)
            finally:
                backends.stop()
        if "scaling" in scenarios:
            results["scaling"] = scaling(ctx)
        if "openloop" in scenarios:
            results["openloop"] = openloop(ctx, results.get("healthy"), missing)
        if "tcp" in scenarios:
            backends = Backends(binary, ctx.backend_cpus, [0, 0, 0])
            try:
                log("scenario tcp: TCP (L4) mode, 3 HTTP backends, wrk -c64, round robin")
                results["tcp"] = tcp_mode(ctx, backends)
            finally:
                backends.stop()
        if "bulk" in scenarios:
            log(f"scenario bulk: {args.bulk_bytes} bytes echoed through TCP mode vs direct")
            results["bulk"] = bulk(ctx, args.bulk_bytes)
        if "https" in scenarios:
            log("scenario https: TLS termination, 3 backends, wrk -c64, round robin")
            results["https"] = https(ctx)
    finally:
        stop_all()

    report(ctx, args, results, started_at)


# label, workers, runtime shape, balancer CPUs
SHAPES = (("1 worker", 1, "per_core", "0"),
          ("2 workers, per_core", 2, "per_core", "0,1"),
          ("2 workers, work_stealing", 2, "work_stealing", "0,1"))


def scaling(ctx):
    """Fulcrum's runtime shapes, interleaved: 1 worker on CPU 0, and 2 workers on CPUs 0,1 as
    per-core runtimes (SO_REUSEPORT) and as one work-stealing runtime. With ≥ 4 CPUs wrk and
    the backends have other CPUs; with fewer, the second worker shares CPU 1 with them, so the
    req/s ratio cannot show the scaling target, but CPU µs/request still compares the shapes."""
    n = os.cpu_count() or 1
    backends = Backends(ctx.binary, ctx.backend_cpus, [0, 0, 0])
    runs = {label: [] for label, *_ in SHAPES}
    try:
        for _ in range(ctx.rounds):
            for label, workers, shape, cpus in SHAPES:
                b = start_fulcrum(ctx, backends.addresses, "round_robin", workers, cpus,
                                  runtime=shape)
                try:
                    run_wrk(ctx, b.address, 64, 1)
                    runs[label].append(measure(ctx, b, backends, 64, ctx.duration))
                finally:
                    b.stop()
    finally:
        backends.stop()
    out = {"shared_cpus": n < 4, "shapes": {}}
    for label, workers, shape, cpus in SHAPES:
        medians = {k: median_of(runs[label], k) for k in ("rps", "cpu_us", "cpu_util")}
        out["shapes"][label] = medians
        log(f"  [scaling] {label} on CPUs {cpus}: {medians['rps']:.0f} req/s, "
            f"{medians['cpu_us']:.1f} µs/req, {medians['cpu_util']:.2f} CPUs busy")
    return out


def openloop(ctx, healthy, missing):
    """p99 at 70% of HAProxy's peak with oha's latency correction (open loop)."""
    if "oha" in missing:
        return {"skipped": "oha not installed"}
    if not healthy or "haproxy" not in healthy:
        return {"skipped": "needs the healthy scenario's HAProxy peak"}
    rate = int(0.7 * healthy["haproxy"]["rps"])
    backends = Backends(ctx.binary, ctx.backend_cpus, [0, 0, 0])
    out = {"rate": rate}
    try:
        for kind in available(ctx):
            b = start_balancer(ctx, kind, backends.addresses, ALGORITHMS["rr"][kind])
            try:
                p99s = []
                for _ in range(ctx.rounds):
                    argv = ["taskset", "-c", ctx.client_cpus, "oha", "--no-tui",
                            "--output-format", "json",
                            "-z", f"{ctx.duration}s", "-c", "64", "-q", str(rate),
                            "--latency-correction", f"http://{b.address}/"]
                    data = json.loads(subprocess.run(argv, capture_output=True, text=True,
                                                     timeout=ctx.duration + 60).stdout)
                    p99s.append(data["latencyPercentiles"]["p99"] * 1000.0)
                out[kind] = statistics.median(p99s)
                log(f"  [openloop] {kind:8} p99 {out[kind]:.2f} ms at {rate} req/s")
            finally:
                b.stop()
    finally:
        backends.stop()
    return out


def report(ctx, args, results, started_at):
    print(f"\n## Fulcrum vs HAProxy vs nginx — {started_at}\n")
    rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    if args.fulcrum_bin:
        print(f"- fulcrum: {ctx.binary} (--fulcrum-bin)")
    else:
        print(f"- fulcrum: {rev or 'unknown revision'} (release build)")
    print(f"- machine: {machine_line()}")
    print(f"- pinning: balancer on CPU {ctx.balancer_cpu} (one worker), wrk -t{ctx.client_threads} "
          f"on CPUs {ctx.client_cpus}, 3 `fulcrum backend` on CPUs {ctx.backend_cpus}")
    print(f"- {args.rounds} interleaved round(s) of {args.duration} s per balancer; medians; "
          f"~100-byte JSON responses, HTTP/1.1 keep-alive")
    versions = []
    for argv in (["haproxy", "-v"], ["nginx", "-v"]):
        if shutil.which(argv[0]):
            r = subprocess.run(argv, capture_output=True, text=True)
            versions.append((r.stdout + r.stderr).splitlines()[0].strip())
    if versions:
        print(f"- peers: {'; '.join(versions)}")

    cols_healthy = [("req/s", "rps", ".0f", ""), ("p50 ms", "p50", ".2f", ""),
                    ("p99 ms", "p99", ".2f", ""), ("CPU µs/req", "cpu_us", ".1f", ""),
                    ("user µs", "user_us", ".1f", ""), ("sys µs", "sys_us", ".1f", ""),
                    ("core busy", "cpu_util", ".0%", ""),
                    ("upstream reuse", "reuse", ".2f", "%")]
    if "healthy" in results:
        print_main_table("(a) all healthy: 3 backends, wrk -c64", results["healthy"],
                         cols_healthy)
    cols_slow = [("req/s", "rps", ".0f", ""), ("p50 ms", "p50", ".2f", ""),
                 ("p90 ms", "p90", ".2f", ""), ("p99 ms", "p99", ".2f", ""),
                 ("oha p50 ms", "oha_p50", ".2f", ""), ("oha p90 ms", "oha_p90", ".2f", ""),
                 ("oha p99 ms", "oha_p99", ".2f", "")]
    if "slow" in results:
        print_main_table("(b) one of 3 backends +50 ms, wrk -c32 (and oha -c32)", results["slow"],
                         cols_slow)
        print("\nwrk's percentiles include its coordinated-omission correction: after each "
              "request slower than twice the mean interval it adds synthetic samples, so one "
              "50 ms request weighs like ~100 fast ones. oha's are the latencies as measured.")
        if results["slow"].get("fulcrum", {}).get("algorithm") not in (None, "peak_ewma"):
            print("\nFulcrum ran `p2c`: this build's `fulcrum check` refuses `peak_ewma`.")
        shares = {k: v.get("shares") for k, v in results["slow"].items() if k != BASELINE}
        if any(shares.values()):
            print("\nShare of requests sent to the slow backend: " + ", ".join(
                f"{k} {s[2]:.3f}%" for k, s in shares.items() if s))
    if "idle" in results:
        print(f"\n### (d) {args.idle_connections} idle keep-alive client connections\n")
        print("| balancer | RSS before | RSS holding them | KiB per connection |")
        print("|---|---|---|---|")
        for kind in BALANCERS:
            r = results["idle"].get(kind)
            if r is None:
                print(f"| {kind} | skipped: {kind} not installed | | |")
            else:
                print(f"| {kind} | {r['rss_before'] / 1024:.1f} MiB | {r['rss'] / 1024:.1f} MiB"
                      f" ({r['held']} held) | {r['per_conn']:.2f} |")
    if results.get("scaling", {}).get("shapes"):
        sc = results["scaling"]
        print("\n### (h) Fulcrum runtime shapes: round robin, 3 backends, wrk -c64\n")
        print("| shape | balancer CPUs | req/s | CPU µs/req | CPUs busy |")
        print("|---|---|---|---|---|")
        for label, _, _, cpus in SHAPES:
            r = sc["shapes"][label]
            print(f"| {label} | {cpus} | {r['rps']:.0f} | {r['cpu_us']:.1f} | "
                  f"{r['cpu_util']:.2f} |")
        if sc["shared_cpus"]:
            print("\nOn this machine the second worker's CPU also runs wrk and the backends.")
    cols_l4 = [("req/s", "rps", ".0f", ""), ("p50 ms", "p50", ".2f", ""),
               ("p99 ms", "p99", ".2f", ""), ("CPU µs/req", "cpu_us", ".1f", ""),
                    ("user µs", "user_us", ".1f", ""), ("sys µs", "sys_us", ".1f", ""),
               ("core busy", "cpu_util", ".0%", "")]
    if "tcp" in results:
        print_main_table("(e) TCP (L4) mode, 3 HTTP backends, wrk -c64 keep-alive "
                         "(Fulcrum `protocol = \"tcp\"`, HAProxy `mode tcp`, nginx `stream`)",
                         results["tcp"], cols_l4)
    if "bulk" in results:
        b = results["bulk"]
        if "skipped_all" in b:
            print(f"\n### (f) TCP mode, bulk transfer\n\nskipped: {b['skipped_all']}")
        else:
            print(f"\n### (f) TCP mode, {b['size'] / GIB:g} GiB echoed back (one connection; "
                  f"`fulcrum backend --tcp-echo`, `bench/bulk.py`)\n")
            print("| path | GiB/s (payload, each way) | ÷ direct | balancer CPU s/GiB |")
            print("|---|---|---|---|")
            direct = b.get("direct", {}).get("gib_s")
            for name in ("direct",) + BALANCERS:
                if name in b:
                    r = b[name]
                    print(f"| {name} | {fmt(r['gib_s'], '.2f')} | {ratio(r['gib_s'], direct)} | "
                          f"{fmt(r['cpu_s_per_gib'], '.2f')} |")
                elif name in b["skipped"]:
                    print(f"| {name} | skipped: {b['skipped'][name]} | | |")
    if "https" in results:
        if "skipped_all" in results["https"]:
            print(f"\n### (g) HTTPS\n\nskipped: {results['https']['skipped_all']}")
        else:
            print_main_table("(g) HTTPS (TLS termination, ECDSA P-256 self-signed), 3 backends, "
                             "wrk -c64 keep-alive", results["https"], cols_healthy)
    targets(results)


def targets(results):
    """The issue 7 target table, filled with what this run measured."""
    h, s, i = results.get("healthy", {}), results.get("slow", {}), results.get("idle", {})
    f = h.get("fulcrum")

    def cpu_row():
        if not f:
            return "—", "not run"
        parts, ok = [], True
        for peer in ("haproxy", "nginx"):
            if peer in h:
                r = f["cpu_us"] / h[peer]["cpu_us"]
                parts.append(f"{r:.2f}× {peer}")
                ok &= r <= 0.85
        return ", ".join(parts), "met" if ok and parts else "not met"

    def rps_row():
        if not f:
            return "—", "not run"
        peers = [h[p]["rps"] for p in ("haproxy", "nginx") if p in h]
        if not peers:
            return "—", "no peer"
        r = f["rps"] / max(peers)
        return f"{r:.2f}× the better peer", "met" if r >= 1.1 else "not met"

    def openloop_row():
        o = results.get("openloop")
        if not o:
            return "—", "not run"
        if "skipped" in o:
            return "—", f"skipped: {o['skipped']}"
        if "fulcrum" in o and "haproxy" in o:
            return (f"{o['fulcrum']:.2f} ms vs HAProxy {o['haproxy']:.2f} ms at {o['rate']} req/s",
                    "met" if o["fulcrum"] <= o["haproxy"] else "not met")
        return "—", "incomplete"

    def rss_row():
        if "fulcrum" not in i:
            return "—", "not run"
        fr = i["fulcrum"]
        text = f"{fr['rss'] / 1024:.1f} MiB, {fr['per_conn']:.2f} KiB/conn"
        ok = fr["per_conn"] <= 10
        if "haproxy" in i:
            text += f" (HAProxy {i['haproxy']['rss'] / 1024:.1f} MiB)"
            ok &= fr["rss"] <= i["haproxy"]["rss"]
        return text, "met" if ok else "not met"

    def reuse_row():
        if not f:
            return "—", "not run"
        if f.get("reuse") is None:
            return "—", "not measured (backend /stats missing)"
        return f"{f['reuse']:.3f}%", "met" if f["reuse"] >= 99.9 else "not met"

    def slow_row():
        sf, base = s.get("fulcrum"), s.get(BASELINE)
        if not sf or not base:
            return "—", "needs the slow scenario"
        r = sf["p99"] / base["p99"]
        text = (f"wrk: p99 {sf['p99']:.2f} ms = {r:.1f}× all-healthy {base['p99']:.2f} ms "
                f"({sf['algorithm']}, -c32)")
        met = r <= 3
        if sf.get("oha_p99") and base.get("oha_p99"):
            text += (f"; oha (latencies as measured): p99 {sf['oha_p99']:.2f} ms = "
                     f"{sf['oha_p99'] / base['oha_p99']:.1f}× all-healthy {base['oha_p99']:.2f} ms")
        return text, "met" if met else "not met (by wrk; the oha figures are context)"

    def scaling_row():
        sc = results.get("scaling")
        if not sc:
            return "—", "not run"
        if "skipped" in sc:
            return "—", f"skipped: {sc['skipped']}"
        shapes = sc["shapes"]
        one, two = shapes["1 worker"]["rps"], shapes["2 workers, per_core"]["rps"]
        text = f"{two / one:.2f}× ({two / 1000:.1f}k vs {one / 1000:.1f}k req/s)"
        if sc["shared_cpus"]:
            return text, "not measurable here: the 2nd worker shares CPU 1 with wrk and backends"
        return text, "met" if two / one >= 1.7 else "not met"

    def tcp_row():
        t = results.get("tcp")
        if not t:
            return "—", "not run"
        if "fulcrum" not in t:
            return "—", "skipped: " + t["skipped"].get("fulcrum", "fulcrum not run")
        if "haproxy" not in t:
            return f"{t['fulcrum']['cpu_us']:.1f} µs", "no HAProxy to compare"
        r = t["fulcrum"]["cpu_us"] / t["haproxy"]["cpu_us"]
        text = f"{r:.2f}× HAProxy mode tcp ({t['fulcrum']['cpu_us']:.1f} vs " \
               f"{t['haproxy']['cpu_us']:.1f} µs)"
        return text, "met" if r <= 1.0 else "not met"

    def bulk_row():
        b = results.get("bulk")
        if not b:
            return "—", "not run"
        if "skipped_all" in b:
            return "—", f"skipped: {b['skipped_all']}"
        if "fulcrum" not in b:
            return "—", "skipped: " + b["skipped"].get("fulcrum", "fulcrum not run")
        r = b["fulcrum"]["gib_s"] / b["direct"]["gib_s"]
        text = f"{r:.2f}× direct ({b['fulcrum']['gib_s']:.2f} vs {b['direct']['gib_s']:.2f} GiB/s)"
        if "haproxy" in b:
            text += f"; HAProxy {b['haproxy']['gib_s'] / b['direct']['gib_s']:.2f}×"
        return text, "met" if r >= 0.9 else "not met"

    def https_row():
        t = results.get("https")
        if not t:
            return "—", "not run"
        if "skipped_all" in t:
            return "—", f"skipped: {t['skipped_all']}"
        if "fulcrum" not in t:
            return "—", "skipped: " + t["skipped"].get("fulcrum", "fulcrum not run").split(" (")[0]
        parts = [f"{t['fulcrum']['cpu_us'] / t[p]['cpu_us']:.2f}× {p}"
                 for p in ("haproxy", "nginx") if p in t]
        return f"{t['fulcrum']['cpu_us']:.1f} µs ({', '.join(parts)})", "reported"

    def issue3_row():
        sf = s.get("fulcrum")
        if not sf:
            return "—", "not run"
        peers = ", ".join(f"{p} {s[p]['p99']:.2f} ms" for p in ("haproxy", "nginx") if p in s)
        text = f"wrk: {sf['p99']:.2f} ms ({sf['algorithm']}; {peers})"
        if sf.get("oha_p99"):
            peers = ", ".join(f"{p} {s[p]['oha_p99']:.2f} ms" for p in ("haproxy", "nginx")
                              if s.get(p, {}).get("oha_p99"))
            text += f"; oha (latencies as measured): {sf['oha_p99']:.2f} ms ({peers})"
        return text, "met" if sf["p99"] < 5 else "not met (by wrk; the oha figures are context)"

    rows = [
        ("HTTP keep-alive, 3 backends, wrk -c64: CPU µs/req", "≤ 0.85 × each peer", cpu_row()),
        ("same: req/s", "≥ 1.1 × better peer", rps_row()),
        ("same, open loop at 70% of HAProxy's peak: p99", "≤ HAProxy's", openloop_row()),
        ("TCP mode, same load: CPU µs/req", "≤ HAProxy mode tcp", tcp_row()),
        ("TCP mode, 1 GiB bulk: throughput", "≥ 0.9 × direct", bulk_row()),
        ("10 000 idle keep-alive connections: RSS", "≤ HAProxy, ≤ 10 KiB/conn", rss_row()),
        ("upstream reuse under load", "≥ 99.9%", reuse_row()),
        ("1 of 3 backends +50 ms: p99", "≤ 3 × healthy p99", slow_row()),
        ("workers 2 vs 1: req/s", "≥ 1.7×", scaling_row()),
        ("issue 3: 1 of 3 backends +50 ms, -c32: p99", "< 5 ms (peers ≈ 50 ms)",
         issue3_row()),
        ("issue 8: HTTPS keep-alive, wrk -c64: CPU µs/req", "side by side (no target)",
         https_row()),
    ]
    print("\n### Targets (issue 7; then issues 3 and 8)\n")
    print("| scenario | target | measured | status |")
    print("|---|---|---|---|")
    for name, target, (measured, status) in rows:
        print(f"| {name} | {target} | {measured} | {status} |")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
    finally:
        stop_all()
