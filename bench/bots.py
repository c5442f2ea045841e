#!/usr/bin/env python3
"""tinytrack's bot regex (`BOT_RE` / `is_bot`) against crawlerdetect, on labelled real User-Agents.

Prints a markdown report: for `tinytrack.is_bot` and crawlerdetect's `CrawlerDetect().isCrawler`
(and the two together), the bots each catches and the browsers each wrongly flags, per set of
User-Agents and pooled; the UAs one catches that the other misses (counts and examples); which
crawlerdetect patterns matched the bots tinytrack misses; the cost of one call without a cache
(timeit) and with one; and the import time, first-call (regex compile) time and RSS that importing
crawlerdetect adds to a process that has already imported tinytrack.

Standalone, not imported by the tests. Needs tinytrack's own dependencies, and crawlerdetect for
its half (without it only tinytrack's column is filled). The labelled sets are plain text files,
one User-Agent a line (blank lines skipped, duplicates counted once): `--bots FILE` holds UAs that
should be flagged, `--browsers FILE` UAs that should not; each may be repeated. `--write-sets DIR`
builds them from packages on PyPI instead of measuring, reproducibly for pinned versions:

    python3 -m venv /tmp/botcmp
    /tmp/botcmp/bin/pip install crawlerdetect==0.4.2 crawler-user-agents==1.67.0 fake-useragent==2.2.0 \\
        'starlette>=0.40' 'uvicorn[standard]>=0.45' 'orjson>=3.9' 'h11>=0.14'
    /tmp/botcmp/bin/pip download --no-deps --no-binary :all: -d /tmp/botcmp/dl crawlerdetect==0.4.2
    /tmp/botcmp/bin/python bench/bots.py --write-sets /tmp/botcmp/sets \\
        --crawlerdetect-sdist /tmp/botcmp/dl/crawlerdetect-0.4.2.tar.gz
    /tmp/botcmp/bin/python bench/bots.py \\
        --bots /tmp/botcmp/sets/bots-crawler-user-agents.txt \\
        --bots /tmp/botcmp/sets/bots-crawlerdetect-fixtures.txt \\
        --browsers /tmp/botcmp/sets/browsers-fake-useragent.txt \\
        --browsers /tmp/botcmp/sets/browsers-crawlerdetect-fixtures.txt

The sets written:
- bots-crawler-user-agents.txt: every `instances` entry of crawler-user-agents' JSON (monperrus/
  crawler-user-agents: real crawler, previewer, monitor and HTTP-library UAs, curated apart from
  crawlerdetect);
- browsers-fake-useragent.txt: every `useragent` of fake-useragent's data/browsers.jsonl (real
  browser UAs collected from traffic);
- bots-/browsers-crawlerdetect-fixtures.txt (only with --crawlerdetect-sdist): crawlerdetect's own
  test fixtures (tests/fixtures/user_agent/crawlers.txt and devices.txt, from JayBizzle/Crawler-Detect),
  which crawlerdetect passes by construction: a home game for it, a fair test for tinytrack.

`--repo DIR` imports tinytrack from DIR (default: this repository), e.g. a patched copy in /tmp.
`--skip-crawlerdetect` leaves crawlerdetect out (its pass over 165,000 UAs takes about a minute).
`--time-sample N` (default 2000) caps how many UAs of each set the timings run over (the first N).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import json
import subprocess
import sys
import tarfile
import time
import timeit
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = 10

IMPORT_PROBE = r"""
import sys, time
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
sys.path.insert(0, sys.argv[1])
import tinytrack
base = rss_kb()
t0 = time.perf_counter()
from crawlerdetect import CrawlerDetect
t1 = time.perf_counter()
CrawlerDetect().isCrawler("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0")
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, base, rss_kb())
"""


def read_set(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines())
    return list(dict.fromkeys(line for line in lines if line))


def write_sets(out: Path, sdist: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads((importlib.resources.files("crawleruseragents") / "crawler-user-agents.json").read_text())
    written = {"bots-crawler-user-agents.txt": [ua for entry in data for ua in entry.get("instances", [])]}
    jsonl = (importlib.resources.files("fake_useragent") / "data" / "browsers.jsonl").read_text()
    written["browsers-fake-useragent.txt"] = [json.loads(line)["useragent"] for line in jsonl.splitlines() if line]
    if sdist:
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                for name, kind in (("crawlers.txt", "bots"), ("devices.txt", "browsers")):
                    if member.name.endswith(f"tests/fixtures/user_agent/{name}"):
                        text = tar.extractfile(member).read().decode("utf-8", "replace")
                        written[f"{kind}-crawlerdetect-fixtures.txt"] = text.splitlines()
    for name, uas in written.items():
        uas = list(dict.fromkeys(ua.strip() for ua in uas if ua.strip() and "\n" not in ua))
        (out / name).write_text("".join(f"{ua}\n" for ua in uas), encoding="utf-8")
        print(f"{out / name}: {len(uas)} distinct User-Agents")


def pct(n: int, total: int) -> str:
    return f"{n:,} ({100 * n / total:.1f}%)" if total else "-"


def code(ua: str) -> str:
    shown = ua if len(ua) <= 160 else ua[:157] + "..."
    return "`" + shown.replace("`", "'") + "`"


def per_call_us(fn, uas: list[str]) -> float:
    """Best of 5 timed passes over `uas`, in µs per call."""
    if not uas:
        return float("nan")
    best = min(timeit.repeat(lambda: [fn(ua) for ua in uas], number=1, repeat=5))
    return best * 1e6 / len(uas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bots", type=Path, action="append", default=[], help="UAs that should be flagged")
    parser.add_argument("--browsers", type=Path, action="append", default=[], help="UAs that should not be")
    parser.add_argument("--repo", type=Path, default=HERE.parent, help="where tinytrack.py is imported from")
    parser.add_argument("--time-sample", type=int, default=2000, help="UAs per set the timings run over")
    parser.add_argument("--skip-crawlerdetect", action="store_true", help="time and count tinytrack alone")
    parser.add_argument("--write-sets", type=Path, metavar="DIR", help="write the labelled sets and stop")
    parser.add_argument("--crawlerdetect-sdist", type=Path, help="with --write-sets: also its test fixtures")
    args = parser.parse_args()
    if args.write_sets:
        write_sets(args.write_sets, args.crawlerdetect_sdist)
        return
    if not args.bots and not args.browsers:
        parser.error("give --bots and/or --browsers files (or --write-sets DIR to make them)")

    repo = str(args.repo.resolve())
    sys.path.insert(0, repo)
    import tinytrack

    tt_uncached = tinytrack.is_bot.__wrapped__
    detectors = {"tinytrack is_bot": tt_uncached}
    cd_version = None
    try:
        from crawlerdetect import CrawlerDetect
    except ImportError:
        CrawlerDetect = None
    if CrawlerDetect is None or args.skip_crawlerdetect:
        print("(crawlerdetect skipped or not installed: its column is left out)\n")
    else:

        class UncachedCrawlerDetect(CrawlerDetect):
            CACHE_SIZE = 0  # isCrawler keeps its own lru_cache per instance: off, to time a miss

        cd_version = importlib.metadata.version("crawlerdetect")
        cd = UncachedCrawlerDetect()
        cd_cached = CrawlerDetect()
        detectors["crawlerdetect isCrawler"] = cd.isCrawler

    sets = [(path, "bots", read_set(path)) for path in args.bots]
    sets += [(path, "browsers", read_set(path)) for path in args.browsers]
    names = list(detectors)
    # One pass of every detector over every set; crawlerdetect's is the slow part.
    flagged: dict[tuple[str, str], set[str]] = {}
    for name, fn in detectors.items():
        for _path, kind, uas in sets:
            flagged.setdefault((name, kind), set()).update(ua for ua in uas if fn(ua))
    pooled = {
        kind: list(dict.fromkeys(ua for _p, k, uas in sets if k == kind for ua in uas)) for kind in ("bots", "browsers")
    }
    both_labels = set(pooled["bots"]) & set(pooled["browsers"])

    print(f"# tinytrack `is_bot` vs crawlerdetect {cd_version or '(left out)'}\n")
    print(f"tinytrack from {repo}/tinytrack.py; Python {sys.version.split()[0]}.\n")
    header = "| set | kind | UAs | " + " | ".join(names) + (" | either |" if len(names) > 1 else " |")
    print("## Detection\n")
    print("bots: caught (more is better); browsers: wrongly flagged (fewer is better).\n")
    print(header)
    print("|---|---|---:|" + "---:|" * (len(names) + (len(names) > 1)))
    rows = [(path.name, kind, uas) for path, kind, uas in sets]
    rows += [(f"**all {kind}**", kind, uas) for kind, uas in pooled.items() if uas]
    for label, kind, uas in rows:
        hits = [sum(ua in flagged[(name, kind)] for ua in uas) for name in names]
        if len(names) > 1:
            hits.append(sum(any(ua in flagged[(name, kind)] for name in names) for ua in uas))
        print(f"| {label} | {kind} | {len(uas):,} | " + " | ".join(pct(h, len(uas)) for h in hits) + " |")
    if both_labels:
        print(f"\n{len(both_labels)} UAs are in both a bots and a browsers set (counted in each).")

    if len(names) > 1:
        tt_name, cd_name = names
        print("\n## Disagreements\n")
        for kind, verb in (("bots", "catches"), ("browsers", "wrongly flags")):
            for this, other in ((cd_name, tt_name), (tt_name, cd_name)):
                only = [ua for ua in pooled[kind] if ua in flagged[(this, kind)] and ua not in flagged[(other, kind)]]
                print(f"- {kind}: {this} {verb} {len(only):,} that {other} does not" + (":" if only else ""))
                for ua in only[:EXAMPLES]:
                    print(f"  - {code(ua)}")
        missed = [
            ua for ua in pooled["bots"] if ua in flagged[(cd_name, "bots")] and ua not in flagged[(tt_name, "bots")]
        ]
        matches = Counter()
        for ua in missed:
            cd_cached.isCrawler(ua)
            matches[cd_cached.getMatches()] += 1
        if matches:
            print(f"\nThe crawlerdetect matches among the {len(missed):,} bots only it catches (top 40):\n")
            print(", ".join(f"{code(str(m))} {n}" for m, n in matches.most_common(40)))

    print("\n## Cost\n")
    n = args.time_sample
    print(f"µs per call, no cache (best of 5 passes over the first {n:,} UAs of each pooled set); a hit in")
    print("tinytrack's lru_cache costs the same whatever the detector behind it.\n")
    long_ua = pooled["browsers"][0] if pooled["browsers"] else "Mozilla/5.0"
    long_ua = (long_ua + " ") * (4096 // (len(long_ua) + 1))
    print("| detector | bots µs/call | browsers µs/call | one 4 KB UA µs |")
    print("|---|---:|---:|---:|")
    for name, fn in detectors.items():
        cols = [per_call_us(fn, pooled[kind][:n]) for kind in ("bots", "browsers")]
        cols.append(per_call_us(fn, [long_ua] * 20))
        print(f"| {name} (miss) | " + " | ".join(f"{c:.2f}" for c in cols) + " |")
    hit = per_call_us(tinytrack.is_bot, [long_ua] * 1000)  # the same UA again and again: all hits
    print(f"| tinytrack is_bot, lru_cache hit | - | - | {hit:.2f} |")

    if cd_version:
        probe = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE, repo], capture_output=True, text=True, check=True
        ).stdout.split()
        imp, first, base, after = float(probe[0]), float(probe[1]), int(probe[2]), int(probe[3])
        print(f"\nImporting crawlerdetect after tinytrack (fresh process): import {imp * 1e3:.1f} ms, first call")
        print(f"(compiles its two regexes) {first * 1e3:.1f} ms, RSS {base / 1024:.1f} -> {after / 1024:.1f} MB")
        print(f"(+{(after - base) / 1024:.1f} MB).")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\n(took {time.perf_counter() - t0:.0f} s)")
