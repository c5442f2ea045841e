#!/usr/bin/env python3
"""Instructions per click through the whole server, counted by valgrind: what
bench/run's ratios measure (uvicorn, httptools, the app, SQLite), as a figure a
noisy machine doesn't move. bench/instructions.py counts the app alone, in-process.

    bench/http_instructions.py [--python PY] [--fraud] [--connections N] REPO [REPO ...]

Each REPO's `tinytrack serve` runs under callgrind; one keep-alive connection from
this process (not counted) sends N clicks (one visitor, as wrk sends them), then
SIGTERM; at two values of N, the difference in the server's instructions over the
difference in N is one click's cost, start-up and shutdown cancelled out. By default
clicks go one after the other, so each is a batch (and a commit) of its own, as at
light load; --connections 16 sends them over 16 connections at once, so they are
written in batches, as under bench/run's load.
An idle server still runs (uvicorn ticks ten times a second), so each run's time up,
times the idle rate (measured too: two idle runs of different lengths), is taken out
first; a slower machine then changes nothing. --fraud turns every [fraud] rule on (as
bench/run --with-fraud: past 120 clicks a minute from the one address, every click is
ip_flood). Postbacks are left to bench/instructions.py: under valgrind the server
stalled after some hundreds of postbacks handed to the writer thread. Needs valgrind;
a few minutes per REPO.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

TOKEN = "bench-0123456789"
UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
FRAUD = """[fraud]
min_ctit_seconds = 10
ip_clicks_per_minute = 120
ip_conversions_per_hour = 3
listed_ips = ["192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32"]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_server(
    python: str, repo: Path, n: int, fraud: bool, idle: float = 0, connections: int = 1
) -> tuple[int, float]:
    """The server's instructions, and the seconds it was up and serving (from its first
    answer to SIGTERM), for `n` clicks over `connections` connections at once (or none
    and `idle` seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = Path(tmp) / "config.toml"
        config.write_text(
            f'[server]\nport = {port}\n[storage]\npath = "{tmp}/t.db"\nreserve_mb = 0\n'
            f'[postback]\ntokens = ["{TOKEN}"]\n[admin]\ntoken = "admin-0123456789"\n'
            + (FRAUD if fraud else "")
            + '[campaigns.bench]\nurl = "https://offer.example.com/lp?cid={click_id}&s1={sub1}"\n'
        )
        out = Path(tmp) / "callgrind.out"
        server = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--fair-sched=yes",
                f"--callgrind-out-file={out}",
                python,
                "-m",
                "tinytrack",
                "serve",
            ]
            + ["-c", str(config)],
            cwd=tmp,
            env={**os.environ, "PYTHONPATH": str(repo)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            connect(port, server).close()
            up = time.monotonic()
            time.sleep(idle)
            with ThreadPoolExecutor(connections) as pool:  # each thread its own keep-alive connection
                list(pool.map(partial(send_clicks, port), [n // connections] * connections))
        finally:
            up = time.monotonic() - up if "up" in locals() else 0.0
            server.send_signal(signal.SIGTERM)
            _, stderr = server.communicate(timeout=600)
        found = re.search(r"Collected : (\d+)", stderr)
        if server.returncode or not found:
            raise SystemExit(f"http_instructions: the server under valgrind failed:\n{stderr[-2000:]}")
        return int(found.group(1)), up


def send_clicks(port: int, n: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    for _ in range(n):
        connection.request("GET", "/c/bench?sub1=abc&sub2=xyz", headers={"user-agent": UA})
        answer = connection.getresponse()
        answer.read()
        assert answer.status == 302, answer.status
    connection.close()


def connect(port: int, server: subprocess.Popen) -> http.client.HTTPConnection:
    deadline = time.monotonic() + 120  # start-up under valgrind is slow
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"http_instructions: the server exited:\n{server.stderr.read()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            return connection
        except OSError:
            time.sleep(0.2)
    raise SystemExit("http_instructions: the server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repos", nargs="+", type=Path, help="checkouts to compare")
    parser.add_argument("--python", default=sys.executable, help="interpreter with tinytrack's dependencies")
    parser.add_argument("--fraud", action="store_true", help="every [fraud] rule on")
    parser.add_argument("--small", type=int, default=500, help="requests in the short run (default 500)")
    parser.add_argument("--large", type=int, default=2500, help="requests in the long run (default 2500)")
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="at once (default 1: each click its own batch; 16: batches, as under load)",
    )
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("http_instructions: needs valgrind (apt-get install valgrind)")
    print(f"| scenario{' (every fraud rule on)' if args.fraud else ''} | {' | '.join(map(str, args.repos))} |")
    print(f"|---|{'---:|' * len(args.repos)}")
    rates = {}
    for repo in args.repos:  # instructions per second of an idle server
        short = run_server(args.python, repo.resolve(), 0, args.fraud, idle=5)
        long = run_server(args.python, repo.resolve(), 0, args.fraud, idle=25)
        rates[repo] = (long[0] - short[0]) / (long[1] - short[1])
    print(f"| idle (instructions/second) | {' | '.join(f'{rates[repo]:,.0f}' for repo in args.repos)} |")
    cells = []
    for repo in args.repos:
        small = run_server(args.python, repo.resolve(), args.small, args.fraud, connections=args.connections)
        large = run_server(args.python, repo.resolve(), args.large, args.fraud, connections=args.connections)
        busy = (large[0] - small[0]) - rates[repo] * (large[1] - small[1])
        cells.append(f"{busy / (args.large - args.small):,.0f}")
    at_once = "one at a time" if args.connections == 1 else f"{args.connections} at once"
    print(f"| clicks, one visitor, {at_once} (instructions/click) | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
