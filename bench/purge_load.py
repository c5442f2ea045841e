#!/usr/bin/env python3
"""Click latency while tinytrack purges a million expired clicks.

Two servers in turn, each on a database seeded with the same number of clicks:
  baseline: the clicks are recent (10-40 days old): nothing to purge;
  purging:  the clicks are 91-120 days old (clicks_days = 90): the server's
            background purge deletes them all while wrk sends clicks.
The server is pinned to CPU 0 and wrk to CPU 1, as in bench/run. Prints req/s,
p50, p99 and max for both, how long the purge took, and the file size before and
after (incremental auto-vacuum hands freed pages back).

    bench/purge_load.py --python .venv/bin/python [--clicks 1000000] [--duration 20]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the process helpers, wrk runner and parser of bench/run)

DAY = 86400


def seed(db: Path, clicks: int, newest_days: float, oldest_days: float) -> None:
    """`clicks` clicks spread between `oldest_days` and `newest_days` ago, written
    with tinytrack's own schema and ids (daily totals too, as the server keeps them)."""
    tt = bench.import_tinytrack()
    con = tt.open_database(str(db))
    now = time.time()
    start, end = now - oldest_days * DAY, now - newest_days * DAY
    clock = [start]
    ids = tt.ClickIds(clock=lambda: clock[0])
    step = (end - start) / clicks
    batch = []
    for i in range(clicks):
        clock[0] = start + i * step
        batch.append(
            (
                ids.new()[0],
                int(clock[0] * 1000),
                bench.CAMPAIGN,
                f"zone{i % 50}",
                "xyz",
                None,
                None,
                None,
                None,
                "203.0.113.7",
                bench.UA,
                0,
                None,
                None,
            )
        )
        if len(batch) == 100_000 or i == clicks - 1:
            con.execute("BEGIN")
            tt.Database(con).insert_clicks([tt.ClickRow(*row) for row in batch])
            con.execute("COMMIT")
            batch = []
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def run(args: argparse.Namespace, workdir: Path, label: str, newest: float, oldest: float) -> dict:
    db = workdir / f"{label}.db"
    t0 = time.monotonic()
    seed(db, args.clicks, newest, oldest)
    size_before = db.stat().st_size
    print(
        f"{label}: seeded {args.clicks:,} clicks {newest:g}-{oldest:g} days old in {time.monotonic() - t0:.0f} s, "
        f"{size_before / 2**20:.0f} MB",
        flush=True,
    )
    port = bench.free_port()
    conf = workdir / f"{label}.toml"
    conf.write_text(
        f'[server]\nport = {port}\n[storage]\npath = "{db}"\n[postback]\ntokens = ["bench-token-0123"]\n'
        f'[retention]\nclicks_days = 90\n[campaigns.{bench.CAMPAIGN}]\nurl = "{bench.CAMPAIGN_URL}"\n'
    )
    log = workdir / f"{label}.log"
    with open(log, "w") as out:
        proc = bench.spawn(
            bench.pinned(args.server_cpu, [args.python, "-m", "tinytrack", "serve", "-c", str(conf)]),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=dict(os.environ, PYTHONPATH=str(bench.REPO)),
        )
    try:
        bench.wait_ready(port, proc, log)
        result = bench.run_wrk(args, f"http://127.0.0.1:{port}{bench.CLICK_PATH}", args.duration)
        purged = re.search(r"purge: clicks: (\d+) in ([\d.]+) s", log.read_text())
        deadline = time.monotonic() + 120
        while label == "purging" and not purged and time.monotonic() < deadline:
            time.sleep(0.5)  # the purge outlasted the load: wait for its log line
            purged = re.search(r"purge: clicks: (\d+) in ([\d.]+) s", log.read_text())
    finally:
        bench.stop(proc)
    con = sqlite3.connect(db)
    left = con.execute("SELECT count(*) FROM clicks WHERE ts < ?", (int((time.time() - 90 * DAY) * 1000),)).fetchone()[
        0
    ]
    con.close()
    result.update(
        label=label,
        size_before=size_before,
        size_after=db.stat().st_size,
        left=left,
        purged=int(purged.group(1)) if purged else 0,
        purge_s=float(purged.group(2)) if purged else None,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--clicks", type=int, default=1_000_000)
    parser.add_argument("--duration", type=int, default=20, help="seconds of wrk load (default 20)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--user-agent", default=bench.UA)
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--load-cpu", default="1")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="tinytrack-purge-"))
    try:
        rows = [run(args, workdir, "baseline", 10, 40), run(args, workdir, "purging", 91, 120)]
    finally:
        bench.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n| run | req/s | p50 ms | p99 ms | max ms | purged | purge took | file before -> after |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        took = f"{r['purge_s']:.1f} s" if r["purge_s"] is not None else "-"
        print(
            f"| {r['label']} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.1f} | {r['purged']:,} | "
            f"{took} | {r['size_before'] / 2**20:.0f} -> {r['size_after'] / 2**20:.0f} MB |"
        )
    if rows[1]["left"]:
        print(f"NOTE: {rows[1]['left']:,} expired clicks were still there at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
