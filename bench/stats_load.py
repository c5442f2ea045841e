#!/usr/bin/env python3
"""Click latency with reports running beside the load (issue 7: "measure click p99
with a stats query looping beside the load").

Starts a real `python -m tinytrack serve` on a temporary config and database,
seeds --clicks clicks spread over the last --days days straight into the file
(clicks and their daily totals, as the server writes them, plus ~2% conversions),
then runs wrk against /c/<campaign> for --duration seconds twice:

  1. alone;
  2. while --readers Python threads loop on /api/stats with the admin token,
     alternating by=day (daily totals) and by=sub2 (raw clicks of the last 30 days;
     choose others with --by).

Prints req/s and latency percentiles for both runs, and how many reports ran and
how long they took. With two or more CPUs the server gets CPU 0 and wrk and the
report loop the others (taskset), so the load generator does not steal the
server's core. Loopback only; everything started is stopped on exit.

    python bench/stats_load.py [--clicks 200000] [--days 60] [--duration 10] [--by day --by sub2]
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import tinytrack  # noqa: E402

UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
CAMPAIGN = "bench"
CONFIG = """
[server]
host = "127.0.0.1"
port = {port}

[storage]
path = "{db}"

[postback]
tokens = ["{postback}"]

[admin]
token = "{admin}"

[retention]
clicks_days = 0
pii_days = 0
orphans_days = 0
outbox_days = 0

[campaigns.{campaign}]
url = "https://offer.example.com/lp?cid={{click_id}}&s1={{sub1}}"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed(db: Path, clicks: int, days: int) -> float:
    """`clicks` clicks over the last `days` days (20 sub1, 50 sub2 values, 2% bots)
    with their daily totals, and a conversion for one click in 50. Returns seconds."""
    started = time.monotonic()
    con = tinytrack.open_database(str(db))
    rng = random.Random(7)
    end = time.time() - 60
    start = end - days * 86400
    now = [start]
    ids = tinytrack.ClickIds(clock=lambda: now[0])
    step = (end - start) / max(clicks, 1)
    batch: list[tuple] = []
    conversions: list[tuple] = []

    def flush() -> None:
        con.execute("BEGIN")
        tinytrack.Database(con).insert_clicks(
            [tinytrack.ClickRow(*row) for row in batch]
        )  # the clicks and their daily_clicks rows, as the server does
        con.executemany(
            """INSERT INTO conversions (click_id, dedupe_key, click_ts, campaign, sub1, sub2, event, txid, status,
                   payout, currency, ts, created_at, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, 'conversion', ?, ?, ?, 'USD', ?, ?, ?)""",
            conversions,
        )  # the conversions_daily_insert trigger keeps daily_conversions
        con.execute("COMMIT")
        batch.clear()
        conversions.clear()

    for i in range(clicks):
        now[0] = start + i * step
        cid, ms = ids.new()
        sub1, sub2 = f"zone{rng.randrange(20)}", f"ad{rng.randrange(50)}"
        bot = rng.random() < 0.02
        batch.append((cid, ms, CAMPAIGN, sub1, sub2, None, None, None, None, "203.0.113.7", UA, bot, None, None))
        if not bot and rng.random() < 0.02:
            at = ms + rng.randrange(3_600_000)
            status = "approved" if rng.random() < 0.8 else "pending"
            conversions.append((cid, f"t:{i}", ms, CAMPAIGN, sub1, sub2, str(i), status, 1_500_000, at, at, at))
        if len(batch) == 50_000:
            flush()
    if batch:
        flush()
    # As if the Enricher had looked at these already (the steady state, not an upgrade's backlog).
    last = con.execute("SELECT id FROM clicks ORDER BY id DESC LIMIT 1").fetchone()[0]
    geo = tinytrack.GeoConfig()
    con.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        [("enriched_upto", bytes(last).hex()), ("enriched_with", f"{geo.database}|{geo.user_agents}")],
    )
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return time.monotonic() - started


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        return float("nan")
    return float(match[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[match[2]]


def run_wrk(url: str, seconds: float, threads: int, connections: int, cpus: str | None) -> dict:
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "--timeout",
        "5s",
        "-H",
        f"User-Agent: {UA}",
        url,
    ]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    if "Requests/sec" not in out:
        raise SystemExit(f"stats_load: wrk failed:\n{out}")

    def find(pattern: str, default: str = "nan") -> str:
        match = re.search(pattern, out, re.M)
        return match[1] if match else default

    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(find(r"^Requests/sec:\s+([\d.]+)")),
        "requests": int(find(r"^\s*(\d+) requests in", "0")),
        "p50": to_ms(find(r"^\s+50%\s+(\S+)")),
        "p90": to_ms(find(r"^\s+90%\s+(\S+)")),
        "p99": to_ms(find(r"^\s+99%\s+(\S+)")),
        "max": to_ms(find(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)")),
        "non_3xx": int(find(r"Non-2xx or 3xx responses:\s+(\d+)", "0")),
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
    }


class StatsLoop:
    """Threads asking /api/stats over keep-alive connections until stopped."""

    def __init__(self, port: int, token: str, readers: int, queries: list[str]) -> None:
        self.port, self.token, self.queries = port, token, queries
        self.stop = threading.Event()
        self.times: dict[str, list[float]] = {q: [] for q in queries}
        self.errors = 0
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(readers)]

    def run(self, n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {self.token}"}
        i = n
        while not self.stop.is_set():
            query = self.queries[i % len(self.queries)]
            i += 1
            t0 = time.perf_counter()
            try:
                conn.request("GET", query, headers=headers)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or b'"rows":[{' not in body:
                    self.errors += 1
                    continue
            except OSError:
                self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            self.times[query].append(time.perf_counter() - t0)
        conn.close()

    def __enter__(self) -> StatsLoop:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=200_000, help="clicks to seed (default 200000)")
    parser.add_argument("--days", type=int, default=60, help="spread over this many days (default 60)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--readers", type=int, default=1, help="threads looping on /api/stats (default 1)")
    parser.add_argument(
        "--by",
        action="append",
        help="the reports the loop asks for, in turn: a by= value and any more parameters, e.g. "
        "'day', 'country,device' or 'day&tz=America/New_York' (default: --by day --by sub2)",
    )
    parser.add_argument("--python", default=sys.executable, help="Python that runs the server")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (database, server log)")
    args = parser.parse_args()
    queries = [f"/api/stats?by={by}" for by in (args.by or ["day", "sub2"])]
    if not shutil.which("wrk"):
        raise SystemExit("stats_load: wrk not found (apt-get install -y wrk)")

    cpus = os.cpu_count() or 1
    pin = cpus >= 2 and shutil.which("taskset") is not None
    server_cpu, load_cpus = ("0", f"1-{cpus - 1}") if pin else (None, None)
    workdir = Path(tempfile.mkdtemp(prefix="tinytrack-stats-load-"))
    db, port = workdir / "tinytrack.db", free_port()
    admin = secrets.token_urlsafe(24)
    config = workdir / "config.toml"
    config.write_text(
        CONFIG.format(port=port, db=db, postback=secrets.token_urlsafe(24), admin=admin, campaign=CAMPAIGN)
    )

    print(f"seeding {args.clicks:,} clicks over {args.days} days ...", flush=True)
    took = seed(db, args.clicks, args.days)
    print(f"  {took:.1f} s, database {db.stat().st_size / 2**20:.1f} MB", flush=True)

    cmd = [args.python, "-m", "tinytrack", "serve", "-c", str(config)]
    if server_cpu:
        cmd = ["taskset", "-c", server_cpu, *cmd]
    log = open(workdir / "server.log", "wb")
    server = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"stats_load: server did not start:\n{(workdir / 'server.log').read_text()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        # What each report costs on its own, before any load.
        alone: dict[str, float] = {}
        for query in queries:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            samples = []
            for _ in range(5):
                t0 = time.perf_counter()
                conn.request("GET", query, headers={"Authorization": f"Bearer {admin}"})
                response = conn.getresponse()
                response.read()
                assert response.status == 200, response.status
                samples.append(time.perf_counter() - t0)
            alone[query] = statistics.median(samples) * 1000
            conn.close()

        url = f"http://127.0.0.1:{port}/c/{CAMPAIGN}?sub1=zone1&sub2=ad1"
        run_wrk(url, 2, args.threads, args.connections, load_cpus)  # warm-up
        results = {"clicks alone": run_wrk(url, args.duration, args.threads, args.connections, load_cpus)}
        with StatsLoop(port, admin, args.readers, queries) as loop:
            results["clicks + stats loop"] = run_wrk(url, args.duration, args.threads, args.connections, load_cpus)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(35)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        stored = con.execute("SELECT count(*) FROM clicks").fetchone()[0]
    print()
    print(
        f"tinytrack {tinytrack.__version__}, {cpus} CPUs"
        + (f", server on CPU {server_cpu}, wrk + reports on {load_cpus}" if pin else "")
    )
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s on /c/{CAMPAIGN}; "
        f"{args.clicks:,} seeded clicks over {args.days} days, {stored:,} stored at the end"
    )
    print("reports alone (median of 5): " + ", ".join(f"{q.split('?')[1]} {ms:.1f} ms" for q, ms in alone.items()))
    print()
    print(f"{'run':22} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7}")
    for name, r in results.items():
        errors = r["non_3xx"] + r["socket_errors"]
        print(f"{name:22} {r['rps']:9.0f} {r['p50']:8.2f} {r['p90']:8.2f} {r['p99']:8.2f} {r['max']:8.2f} {errors:7d}")
    base, loaded = results["clicks alone"], results["clicks + stats loop"]
    print()
    print(f"with the stats loop: req/s x{loaded['rps'] / base['rps']:.2f}, p99 x{loaded['p99'] / base['p99']:.2f}")
    for query, times in loop.times.items():
        if times:
            times = sorted(times)
            print(
                f"  {query}: {len(times)} answered, median {statistics.median(times) * 1000:.1f} ms, "
                f"max {times[-1] * 1000:.1f} ms"
            )
    if loop.errors:
        print(f"  report errors: {loop.errors}")
    if args.keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
