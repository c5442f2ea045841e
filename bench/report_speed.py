#!/usr/bin/env python3
"""How long reports take at 10M clicks (issue 20): from the daily totals, from the
quarter-hour totals in another zone, and from the raw rows.

    bench/report_speed.py [--clicks 10000000] [--days 60] [--campaigns 5] [--sub1 1000] [--keep DIR]

Seeds a database in a temporary folder (or DIR, reused if it is already there) with
Database.insert_clicks in batches of 1,000, as the server writes clicks (daily and
quarter-hour totals with them), 2% bots, one click in 50 converting, then times
Database.stats over the last 30 days, each query the median of 5 (3 from the raw
rows), after one to warm the page cache.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tinytrack as tt  # noqa: E402

REPORTS = [  # (what it reads, by, tz): UTC by campaign or day read the quarter hours where they are whole
    ("daily", "campaign", "UTC"),
    ("daily", "day", "UTC"),
    ("slots", "campaign", "UTC"),
    ("slots", "day", "UTC"),
    ("daily", "campaign,sub1", "UTC"),
    ("daily", "day,campaign,sub1", "UTC"),
    ("slots", "day", "America/New_York"),
    ("slots", "campaign,day", "Asia/Kolkata"),
    ("slots", "day,hour", "Europe/Berlin"),
    ("raw", "sub2", "UTC"),
    ("raw", "country,device", "UTC"),
    ("raw", "campaign,sub1", "America/New_York"),
]


def seed(db: tt.Database, clicks: int, days: int, campaigns: int, sub1s: int) -> float:
    rng = random.Random(1)
    end = time.time() - 120
    start = end - days * 86400
    now = [start]
    ids = tt.ClickIds(clock=lambda: now[0])
    step = (end - start) / clicks
    started = time.monotonic()
    batch: list[tt.ClickRow] = []
    conversions: list[tuple] = []
    ua = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
    for i in range(clicks):
        now[0] = start + i * step
        cid, ms = ids.new()
        campaign, sub1 = f"c{i % campaigns}", f"zone{rng.randrange(sub1s)}"
        bot = 1 if rng.random() < 0.02 else 0
        ip = f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"
        batch.append(
            tt.ClickRow(
                bytearray(cid),
                ms,
                campaign,
                sub1,
                f"ad{rng.randrange(50)}",
                *[tt.NO_TEXT] * 3,
                tt.NO_TEXT,
                ip,
                ua,
                bot,
                -1,
                "",
            )
        )
        if not bot and rng.random() < 0.02:
            at = ms + rng.randrange(3_600_000)
            conversions.append((bytes(cid), f"t:{i}", ms, campaign, sub1, str(i), 1_500_000, at, at, at))
        if len(batch) == 1000:
            with db.transaction():
                db.insert_clicks(batch, 1000)
                db.con.executemany(
                    """INSERT INTO conversions (click_id, dedupe_key, click_ts, campaign, sub1, event, txid, status,
                           payout, currency, ts, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, 'conversion', ?, 'approved', ?, 'USD', ?, ?, ?)""",
                    conversions,
                )
            batch.clear()
            conversions.clear()
        if (i + 1) % 1_000_000 == 0:
            print(f"  {(i + 1) / 1e6:.0f}M clicks, {time.monotonic() - started:.0f} s", flush=True)
    if batch:
        with db.transaction():
            db.insert_clicks(batch, 1000)
    db.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--campaigns", type=int, default=5)
    parser.add_argument("--sub1", type=int, default=1000, help="sub1 values (default 1000)")
    parser.add_argument("--keep", help="a folder for the database, kept (and reused if seeded already)")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="tinytrack-report-speed-")
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "t.db")
    fresh = not os.path.exists(path)
    db = tt.Database.open(path)
    if fresh:
        print(f"seeding {args.clicks:,} clicks over {args.days} days ...", flush=True)
        took = seed(db, args.clicks, args.days, args.campaigns, args.sub1)
        print(f"  {took:.0f} s", flush=True)
    counts = {
        table: db.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        for table in ("clicks", "daily_clicks", "slot_clicks", "slot_conversions")
    }
    size = sum(os.path.getsize(f) for f in (path, path + "-wal") if os.path.exists(f))
    print(", ".join(f"{table} {n:,}" for table, n in counts.items()) + f"; {size / 2**20:.0f} MB")
    today = int(time.time() // 86400)
    print(f"\n{'read':6} {'by':22} {'tz':18} {'rows':>6} {'median ms':>10} {'max ms':>8}")
    for source, by, tz in REPORTS:
        q = tt.StatsQuery(today - 29, today, by, tz=tz, slots_since=0 if source == "slots" else None)
        assert q.source == source, (by, tz, q.source)
        db.stats(q)  # the page cache
        times = []
        for _ in range(5 if source != "raw" else 3):  # a raw report over 5M clicks takes seconds
            t0 = time.perf_counter()
            rows = db.stats(q)
            times.append((time.perf_counter() - t0) * 1000)
        print(f"{source:6} {by:22} {tz:18} {len(rows):6} {statistics.median(times):10.1f} {max(times):8.1f}")
    db.close()
    if not args.keep:
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
