#!/usr/bin/env python3
"""Instructions per click, counted by valgrind (callgrind): a figure that doesn't move
with a noisy machine, for comparing two versions of tinytrack.py when bench/run's
requests per second can't (a VM whose neighbours take its CPU).

    bench/instructions.py [--python PY] [REPO ...]      # default: this repository

Each REPO's tinytrack.py takes N clicks through the ASGI app in-process (parsing,
the store's batching, the INSERT and commit; no HTTP server, no network), at two
values of N; the difference over the difference in N is what one click costs, with
start-up and shutdown cancelled out. Scenarios: postbacks (each for a click stored
just before it, not through /c/; both counted), plain clicks (one visitor), clicks
each from a new address (each a unique click), and clicks carrying &cost= on a
campaign with a cost model (versions without costs ignore the parameter), clicks on a
campaign with two landers and two offers, and LP clicks (/go/, each the first for a
click stored just before it, both counted); "-" for a version without funnels; and
clicks and postbacks with every fraud rule on ("-" for a version without them).
Needs valgrind (Debian: apt-get install valgrind); takes about a minute per REPO.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

DRIVER = r"""
import asyncio, os, sys, tempfile
repo, n, query, unique = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4] == "1"
sys.path.insert(0, repo)
import tinytrack as tt
UA = b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
CAMPAIGN = 'url = "https://offer.example.com/lp?cid={click_id}&s1={sub1}"'
funnel = query.startswith(b"funnel:") or query == b"lp"
if funnel:  # two landers, two offers
    if not hasattr(tt, "Rotation"):
        sys.exit(3)  # a version before funnels
    query = query.removeprefix(b"funnel:")
    CAMPAIGN = ('offers = [{ name = "a", url = "https://a.example/?cid={click_id}", weight = 70 },'
                ' { name = "b", url = "https://b.example/?cid={click_id}", weight = 30 }]\n'
                'landers = [{ name = "lp1", url = "https://lp.example/1?cid={click_id}", weight = 50 },'
                ' { name = "lp2", url = "https://lp.example/2?cid={click_id}", weight = 50 }]')
COST = 'cost_model = "cpc"\ncost_value = "0.01"' if b"cost=" in query else ""
FRAUD = ""
if query.startswith(b"fraud:"):  # every rule on (one address: past 120 a minute, every click is ip_flood)
    if not hasattr(tt, "FraudConfig"):
        sys.exit(3)  # a version before fraud flags
    query = query.removeprefix(b"fraud:")
    FRAUD = ('[fraud]\nmin_ctit_seconds = 10\nip_clicks_per_minute = 120\nip_conversions_per_hour = 3\n'
             'listed_ips = ["192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32"]\n')

async def main():
    work = tempfile.mkdtemp()
    db = os.path.join(work, "t.db")
    for cost in (COST, ""):  # a version without costs doesn't know the keys
        with open(db + ".toml", "w") as f:
            f.write(f'[storage]\npath = "{db}"\n[postback]\ntokens = ["bench-0123456789"]\n{FRAUD}'
                    f'[campaigns.bench]\n{CAMPAIGN}\n{cost}\n')
        try:
            config = tt.load_config(db + ".toml")
            break
        except tt.ConfigError:
            continue
    if hasattr(config.storage, "reserve_mb"):
        import dataclasses
        config = dataclasses.replace(config, storage=dataclasses.replace(config.storage, reserve_mb=0))
    app = tt.create_app(config)
    await app.startup()
    async def receive():
        return {"type": "http.request"}
    async def send(message):
        pass
    postbacks = query == b"postbacks"
    lp = query == b"lp"
    for start in range(0, n, 500):  # 500 at a time, batched by the store as under load
        count = min(n, start + 500) - start
        if postbacks:  # a click stored (not through /c/), then its postback
            ids = [app.ids.new()[0] for _ in range(count)]
            await asyncio.gather(*(app.store.record_click(row) for row in click_rows(tt, ids)))
            await asyncio.gather(*(app({"type": "http", "method": "GET", "path": "/postback", "headers": [],
                                        "query_string": f"click_id={tt.format_uuid(cid)}&payout=1.5&token=bench-0123456789".encode(),
                                        "client": ("127.0.0.1", 4000)}, receive, send) for cid in ids))
            continue
        if lp:  # a click stored (not through /c/), then its first LP click
            ids = [app.ids.new()[0] for _ in range(count)]
            await asyncio.gather(*(app.store.record_click(row) for row in click_rows(tt, ids)))
            await asyncio.gather(*(app({"type": "http", "method": "GET", "path": "/go/bench", "headers": [(b"user-agent", UA)],
                                        "query_string": f"cid={tt.format_uuid(cid)}".encode(),
                                        "client": ("203.0.113.7", 4000)}, receive, send) for cid in ids))
            continue
        scopes = [{"type": "http", "method": "GET", "path": "/c/bench", "query_string": query,
                   "headers": [(b"user-agent", UA)],
                   "client": (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" if unique else "203.0.113.7", 4000)}
                  for i in range(start, start + count)]
        await asyncio.gather(*(app(scope, receive, send) for scope in scopes))
    await app.shutdown()


def click_rows(tt, ids):
    # Whatever this version's ClickRow requires beyond the first 12 fields: none (None).
    required = len(tt.ClickRow._fields) - len(tt.ClickRow._field_defaults)
    return [tt.ClickRow(cid, int.from_bytes(cid[:6]), "bench", "abc", None, None, None, None, None, "203.0.113.7",
                        "x", 0, *(None,) * (required - 12)) for cid in ids]

asyncio.run(main())
"""

SCENARIOS = (
    ("postbacks (each with its click, stored directly)", "postbacks", False),
    ("clicks, one visitor", "sub1=abc&sub2=xyz", False),
    ("clicks, each a new visitor", "sub1=abc&sub2=xyz", True),
    ("clicks with &cost= (cpc campaign)", "sub1=abc&sub2=xyz&cost=0.0125", False),
    ("clicks, 2 landers x 2 offers", "funnel:sub1=abc&sub2=xyz", False),
    ("LP clicks (each with its click, stored directly)", "lp", False),
    ("clicks with &uid= (attribution)", "sub1=abc&sub2=xyz&uid=u-1001", False),
    ("clicks, every fraud rule on (each one ip_flood)", "fraud:sub1=abc&sub2=xyz", False),
    ("postbacks, every fraud rule on (each ctit_fast)", "fraud:postbacks", False),
)


def instructions(python: str, driver: Path, repo: Path, n: int, query: str, unique: bool) -> int | None:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", python, str(driver), str(repo)]
            + [str(n), query, "1" if unique else "0"],
            capture_output=True,
            text=True,
        )
    if done.returncode == 3:
        return None  # the scenario is newer than that version
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or not found:
        raise SystemExit(f"instructions: the run under valgrind failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repos", nargs="*", type=Path, default=[HERE.parent], help="checkouts to compare")
    parser.add_argument("--python", default=sys.executable, help="interpreter with tinytrack's dependencies")
    parser.add_argument("--small", type=int, default=500, help="clicks in the short run (default 500)")
    parser.add_argument("--large", type=int, default=4500, help="clicks in the long run (default 4500)")
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("instructions: needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        driver = Path(tmp) / "driver.py"
        driver.write_text(DRIVER)
        print(f"| scenario | {' | '.join(str(repo) for repo in args.repos)} |")
        print(f"|---|{'---:|' * len(args.repos)}")
        for name, query, unique in SCENARIOS:
            cells = []
            for repo in args.repos:
                small = instructions(args.python, driver, repo, args.small, query, unique)
                large = small and instructions(args.python, driver, repo, args.large, query, unique)
                cells.append("-" if large is None else f"{(large - small) / (args.large - args.small):,.0f}")
            print(f"| {name} (instructions/click) | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
