#!/usr/bin/env python3
"""How long a report takes from the daily totals when every click carries a cost: the
worst case for the totals (every campaign-day at retention.sub1_per_day sub1), with
and without uploaded spend in the range.

    bench/cost_report.py [--python PY] [--days 60] [--clicks-per-day 20000] [--campaigns 5]

Seeds a database in a temporary folder with Database.insert_clicks, as the server
writes clicks (the daily totals with them), then times Database.stats over the last
30 days by campaign, sub1 and day, before and after two uploads.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tinytrack as tt  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--clicks-per-day", type=int, default=20_000)
    parser.add_argument("--campaigns", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="tinytrack-cost-report-")
    db = tt.Database.open(os.path.join(work, "t.db"))
    rng = random.Random(1)
    first = int(time.time() // 86400) - args.days
    now = [0.0]
    ids = tt.ClickIds(clock=lambda: now[0])
    started = time.monotonic()
    for d in range(args.days):
        rows = []
        for i in range(args.clicks_per_day):
            now[0] = (first + d) * 86400 + i * 86400 / args.clicks_per_day
            cid, ms = ids.new()
            campaign, sub1, ip = (
                f"c{i % args.campaigns}",
                f"zone{rng.randrange(1000)}",
                f"10.0.{i // 256 % 256}.{i % 256}",
            )
            rows.append(
                tt.ClickRow(
                    bytearray(cid), ms, campaign, sub1, "", *[tt.NO_TEXT] * 4, ip, "Mozilla/5.0", 0, 12500, "USD"
                )
            )
        for start in range(0, len(rows), 1000):
            with db.transaction():
                db.insert_clicks(rows[start : start + 1000], 1000)
    totals = db.con.execute("SELECT count(*) FROM daily_costs").fetchone()[0]
    print(
        f"seeded {args.days * args.clicks_per_day:,} clicks in {time.monotonic() - started:.0f} s: {totals:,} cost rows"
    )

    def report(label: str) -> None:
        for by in ("campaign", "sub1", "day"):
            q = tt.StatsQuery(first + args.days - 30, first + args.days - 1, by)
            took = time.perf_counter()
            rows = db.stats(q)
            print(f"{label}: by={by} ({len(rows)} rows) {1000 * (time.perf_counter() - took):.0f} ms")

    report("no uploads")
    with db.transaction():
        day = first + args.days - 10
        uploads = [tt.CostUpload(day, "c1", "", 99_000_000, "USD"), tt.CostUpload(day + 1, "c2", "zone5", 10**6, "USD")]
        db.upload_costs(0, rows=uploads, tz="UTC")
    report("two uploads in the range")
    return 0


if __name__ == "__main__":
    sys.exit(main())
