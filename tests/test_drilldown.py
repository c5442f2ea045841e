"""Reports, part two: by= up to three fields and tz= any IANA zone (issue 20).

Every expected number is worked out by hand from the clicks and postbacks each test
makes, at UTC instants an injected clock sets; the zone arithmetic is written out
beside each instant (America/New_York: EST is UTC-5, EDT UTC-4; 2026's changes are
on 03-08 at 07:00Z and 11-01 at 06:00Z).
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing

import anyio
import httpx
import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, FakeClock, at, client_for

import tinytrack

pytestmark = pytest.mark.anyio

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
D = "2026-11-20"
CPC = '\n[campaigns.cpc]\nurl = "https://offer.example.com/a?cid={click_id}"\ncost_model = "cpc"\ncost_value = "0.05"\n'
NY = "America/New_York"
DAY_MS = 86_400_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(at(D, 9))


@pytest.fixture
async def app(make_app):
    return await make_app(CPC)


@pytest.fixture
async def client(app):
    async with client_for(app) as http:
        yield http


async def click(client: httpx.AsyncClient, campaign: str = "spring", **subs: str) -> str:
    answer = await client.get(f"/c/{campaign}", params=subs, headers={"user-agent": HUMAN})
    assert answer.status_code == 302, answer.text
    return answer.headers["location"].split("cid=")[1].split("&")[0]


async def postback(client: httpx.AsyncClient, click_id: str, **fields: str) -> None:
    answer = await client.get("/postback", params={"click_id": click_id, "token": POSTBACK_TOKEN, **fields})
    assert (answer.status_code, answer.json()["status"]) == (200, "created"), answer.text


async def report(client: httpx.AsyncClient, query: str) -> dict:
    answer = await client.get(f"/api/stats?{query}", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return answer.json()


def brief(rows: list[dict], *fields: str) -> list[tuple]:
    """Each row's fields, then clicks, unique, approved, pending, rejected, payout, cost."""
    return [
        (
            *(row[f] for f in fields),
            row["clicks"],
            row["unique_clicks"],
            row["approved"],
            row["pending"],
            row["rejected"],
            row["payout"],
            row["cost"],
        )
        for row in rows
    ]


async def seed_subs(client: httpx.AsyncClient) -> None:
    """One UTC day (D), one visitor (so each campaign-day has one unique click: its first):

    campaign sub1 sub2  clicks  postbacks
    spring   a    x     3       the first: approved 1.00 USD
    spring   a    y     1       pending 2.00 USD
    spring   b    x     2       the first: "declined" (rejected) 3.00 USD
    cpc      a    x     2       the first: approved 0.50 USD   (cpc 0.05 a click)
    """
    ax = [await click(client, sub1="a", sub2="x") for _ in range(3)]
    ay = await click(client, sub1="a", sub2="y")
    bx = [await click(client, sub1="b", sub2="x") for _ in range(2)]
    cx = [await click(client, "cpc", sub1="a", sub2="x") for _ in range(2)]
    await postback(client, ax[0], payout="1")
    await postback(client, ay, payout="2", status="pending")
    await postback(client, bx[0], payout="3", status="declined")
    await postback(client, cx[0], payout="0.5")


async def test_one_field_from_the_daily_totals(client):
    await seed_subs(client)
    answer = await report(client, f"from={D}&to={D}&by=campaign")
    assert (answer["by"], answer["source"], answer["tz"]) == (["campaign"], "slots", "UTC")  # fewer rows than daily
    assert brief(answer["rows"], "campaign") == [
        ("cpc", 2, 1, 1, 0, 0, {"USD": "0.50"}, {"USD": "0.10"}),
        ("spring", 6, 1, 1, 1, 1, {"USD": "1.00"}, {}),
    ]
    cpc = answer["rows"][0]
    assert (cpc["profit"], cpc["roi"]) == ({"USD": "0.40"}, {"USD": "400.00"})


async def test_two_fields_name_both_in_every_row(client):
    await seed_subs(client)
    answer = await report(client, f"from={D}&to={D}&by=campaign,sub1")
    assert answer["source"] == "daily"
    assert brief(answer["rows"], "campaign", "sub1") == [
        ("cpc", "a", 2, 1, 1, 0, 0, {"USD": "0.50"}, {"USD": "0.10"}),
        ("spring", "a", 4, 1, 1, 1, 0, {"USD": "1.00"}, {}),
        ("spring", "b", 2, 0, 0, 0, 1, {}, {}),
    ]
    flipped = await report(client, f"from={D}&to={D}&by=sub1,campaign")
    assert [(r["sub1"], r["campaign"], r["clicks"]) for r in flipped["rows"]] == [
        ("a", "cpc", 2),
        ("a", "spring", 4),
        ("b", "spring", 2),
    ]


async def test_three_fields_beyond_the_totals_read_the_raw_rows(client):
    await seed_subs(client)
    answer = await report(client, f"from={D}&to={D}&by=campaign,sub1,sub2")
    assert answer["source"] == "raw"
    assert brief(answer["rows"], "campaign", "sub1", "sub2") == [
        ("cpc", "a", "x", 2, 1, 1, 0, 0, {"USD": "0.50"}, {"USD": "0.10"}),
        ("spring", "a", "x", 3, 1, 1, 0, 0, {"USD": "1.00"}, {}),
        ("spring", "a", "y", 1, 0, 0, 1, 0, {}, {}),
        ("spring", "b", "x", 2, 0, 0, 0, 1, {}, {}),
    ]
    # the same three levels as CSV: a column per field, then the figures
    csv_answer = await client.get(f"/api/stats?from={D}&to={D}&by=campaign,sub1,sub2&format=csv", headers=ADMIN)
    lines = list(csv.reader(io.StringIO(csv_answer.text)))
    assert lines[0][:4] == ["campaign", "sub1", "sub2", "clicks"]
    assert [line[:4] for line in lines[1:]] == [
        ["cpc", "a", "x", "2"],
        ["spring", "a", "x", "3"],
        ["spring", "a", "y", "1"],
        ["spring", "b", "x", "2"],
    ]


async def test_three_fields_with_status_set_each_row_against_its_clicks(client):
    await seed_subs(client)
    answer = await report(client, f"from={D}&to={D}&by=campaign,sub1,status")
    assert answer["source"] == "daily"
    # status rows: the key's clicks and cost, and the payout of that status
    assert brief(answer["rows"], "campaign", "sub1", "status") == [
        ("cpc", "a", "approved", 2, 1, 1, 0, 0, {"USD": "0.50"}, {"USD": "0.10"}),
        ("spring", "a", "approved", 4, 1, 1, 0, 0, {"USD": "1.00"}, {}),
        ("spring", "a", "pending", 4, 1, 0, 1, 0, {"USD": "2.00"}, {}),
        ("spring", "b", "rejected", 2, 0, 0, 0, 1, {"USD": "3.00"}, {}),
    ]


async def test_the_cli_takes_fields_and_a_zone(client, tmp_path):
    await seed_subs(client)
    config = tmp_path / "config.toml"
    table = subprocess.run(
        [sys.executable, "-m", "tinytrack", "stats", "-c", str(config), "--from", D, "--to", D]
        + ["--by", "campaign,sub1,sub2", "--tz", NY],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"{D} to {D} ({NY}), by campaign, sub1, sub2; from the raw rows")
    assert lines[1].split()[:4] == ["campaign", "sub1", "sub2", "clicks"]
    assert [line.split()[:4] for line in lines[2:]] == [
        ["cpc", "a", "x", "2"],
        ["spring", "a", "x", "3"],
        ["spring", "a", "y", "1"],
        ["spring", "b", "x", "2"],
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "tinytrack", "stats", "-c", str(config), "--by", "day,nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert bad.returncode != 0
    assert "--by: must be up to 3 of" in bad.stderr and "got 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr


# -- time zones --

# (UTC instant, what it is in New York) around 2026-03-08, when 02:00 EST became 03:00 EDT
SPRING_CLICKS = [
    (("2026-03-08", 4, 59), "03-07 23:59 EST"),
    (("2026-03-08", 5, 0), "03-08 00:00 EST"),
    (("2026-03-08", 6, 59), "03-08 01:59 EST"),
    (("2026-03-08", 7, 0), "03-08 03:00 EDT: 02:xx never happened"),
    (("2026-03-09", 3, 59), "03-08 23:59 EDT: the 23-hour day's last minute"),
    (("2026-03-09", 4, 0), "03-09 00:00 EDT"),
]


async def test_new_york_days_and_hours_around_the_spring_change(make_app, clock):
    clock.now = at("2026-03-08", 4, 59)
    app = await make_app(CPC)
    async with client_for(app) as client:
        ids = []
        for (day, hour, minute), _ in SPRING_CLICKS:
            clock.now = at(day, hour, minute)
            ids.append(await click(client, "cpc", sub1="s", sub2="t"))
        clock.now = at("2026-03-09", 3, 30)  # 03-08 23:30 EDT: converted on the 8th in New York, the 9th in UTC
        await postback(client, ids[1], payout="5")
        clock.now = at("2026-03-10", 12)
        span = "from=2026-03-07&to=2026-03-09"
        ny = await report(client, f"{span}&by=day&tz={NY}")
        assert ny["source"] == "slots"
        assert [(r["day"], r["clicks"], r["approved"], r["payout"], r["cost"]) for r in ny["rows"]] == [
            ("2026-03-07", 1, 0, {}, {"USD": "0.05"}),
            ("2026-03-08", 4, 1, {"USD": "5.00"}, {"USD": "0.20"}),
            ("2026-03-09", 1, 0, {}, {"USD": "0.05"}),
        ]
        utc = await report(client, f"{span}&by=day")
        assert [(r["day"], r["clicks"], r["approved"]) for r in utc["rows"]] == [
            ("2026-03-08", 4, 0),
            ("2026-03-09", 2, 1),
        ]
        hours = await report(client, f"from=2026-03-08&to=2026-03-08&by=hour&tz={NY}")
        assert [(r["hour"], r["clicks"], r["approved"]) for r in hours["rows"]] == [
            (0, 1, 0),
            (1, 1, 0),
            (3, 1, 0),
            (23, 1, 1),
        ]
        # the raw rows (sub2 is in no totals) put the same clicks in the same days
        raw = await report(client, f"{span}&by=day,sub2&tz={NY}")
        assert raw["source"] == "raw"
        assert [(r["day"], r["sub2"], r["clicks"], r["approved"], r["cost"]) for r in raw["rows"]] == [
            ("2026-03-07", "t", 1, 0, {"USD": "0.05"}),
            ("2026-03-08", "t", 4, 1, {"USD": "0.20"}),
            ("2026-03-09", "t", 1, 0, {"USD": "0.05"}),
        ]
        raw_hours = await report(client, f"from=2026-03-08&to=2026-03-08&by=hour,sub2&tz={NY}")
        assert [(r["hour"], r["clicks"]) for r in raw_hours["rows"]] == [(0, 1), (1, 1), (3, 1), (23, 1)]
        # one field from the totals, one not: by=campaign,day is totals; with sub1 and a zone, raw
        mixed = await report(client, f"{span}&by=campaign,day&tz={NY}")
        assert [(r["campaign"], r["day"], r["clicks"]) for r in mixed["rows"]] == [
            ("cpc", "2026-03-07", 1),
            ("cpc", "2026-03-08", 4),
            ("cpc", "2026-03-09", 1),
        ]
        assert (await report(client, f"{span}&by=day,sub1&tz={NY}"))["source"] == "raw"


# around 2026-11-01, when 02:00 EDT became 01:00 EST again
AUTUMN_CLICKS = [
    (("2026-11-01", 3, 59), "10-31 23:59 EDT"),
    (("2026-11-01", 4, 0), "11-01 00:00 EDT"),
    (("2026-11-01", 5, 30), "11-01 01:30 EDT"),
    (("2026-11-01", 6, 30), "11-01 01:30 EST: the same hour again"),
    (("2026-11-02", 4, 59), "11-01 23:59 EST: the 25-hour day's last minute"),
    (("2026-11-02", 5, 0), "11-02 00:00 EST"),
]


async def test_new_york_days_and_hours_around_the_autumn_change(make_app, clock):
    clock.now = at("2026-11-01", 3, 59)
    app = await make_app(CPC)
    async with client_for(app) as client:
        for (day, hour, minute), _ in AUTUMN_CLICKS:
            clock.now = at(day, hour, minute)
            await click(client, "cpc", sub2="t")
        clock.now = at("2026-11-03", 12)
        for by, source in (("day", "slots"), ("day,sub2", "raw")):
            answer = await report(client, f"from=2026-10-31&to=2026-11-02&by={by}&tz={NY}")
            assert answer["source"] == source
            assert [(r["day"], r["clicks"]) for r in answer["rows"]] == [
                ("2026-10-31", 1),
                ("2026-11-01", 4),
                ("2026-11-02", 1),
            ]
        hours = await report(client, f"from=2026-11-01&to=2026-11-01&by=hour&tz={NY}")
        assert [(r["hour"], r["clicks"]) for r in hours["rows"]] == [(0, 1), (1, 2), (23, 1)]


@pytest.mark.parametrize(
    ("tz", "before", "after"),
    [
        ("Asia/Kolkata", (18, 29), (18, 30)),  # +5:30: 03-08 00:00 IST is 03-07 18:30Z
        ("Asia/Kathmandu", (18, 14), (18, 15)),  # +5:45: 03-08 00:00 is 03-07 18:15Z
        ("Australia/Eucla", (15, 14), (15, 15)),  # +8:45
    ],
)
async def test_half_and_quarter_hour_zones_are_exact_from_the_totals(make_app, clock, tz, before, after):
    clock.now = at("2026-03-07", 12)
    app = await make_app(CPC)
    async with client_for(app) as client:
        for hour, minute in (before, after):
            clock.now = at("2026-03-07", hour, minute, 59.9 if (hour, minute) == before else 0)
            await click(client, "cpc")
        clock.now = at("2026-03-09", 12)
        answer = await report(client, f"from=2026-03-07&to=2026-03-08&by=day&tz={tz}")
        assert answer["source"] == "slots"
        assert [(r["day"], r["clicks"], r["cost"]) for r in answer["rows"]] == [
            ("2026-03-07", 1, {"USD": "0.05"}),
            ("2026-03-08", 1, {"USD": "0.05"}),
        ]


async def test_a_cost_uploaded_in_new_york_is_whole_in_a_new_york_report(make_app, clock):
    clock.now = at("2026-03-08", 4, 59)
    app = await make_app(CPC)
    async with client_for(app) as client:
        for (day, hour, minute), _ in SPRING_CLICKS:
            clock.now = at(day, hour, minute)
            await click(client, "cpc")
        clock.now = at("2026-03-10", 12)
        # 03-08 in New York is 23 hours: 19 of them on UTC 03-08 (05:00Z on), 4 on UTC 03-09
        upload = await client.put(
            f"/api/costs?tz={NY}",
            json={"rows": [{"day": "2026-03-08", "campaign": "cpc", "cost": "23"}]},
            headers=ADMIN,
        )
        assert upload.status_code == 200, upload.text
        span = "from=2026-03-07&to=2026-03-09&by=day"
        ny = await report(client, f"{span}&tz={NY}")
        # An upload is its campaign's whole cost of the UTC days it touches (03-08, 03-09), so the
        # click costs of those days are replaced: 03-07 in New York keeps none of its one click
        # (04:59Z on 03-08), 03-09 in New York keeps none of its (04:00Z on 03-09).
        assert [(r["day"], r["cost"]) for r in ny["rows"]] == [
            ("2026-03-07", {}),
            ("2026-03-08", {"USD": "23.00"}),
            ("2026-03-09", {}),
        ]
        utc = await report(client, span)
        assert [(r["day"], r["cost"]) for r in utc["rows"]] == [
            ("2026-03-08", {"USD": "19.00"}),
            ("2026-03-09", {"USD": "4.00"}),
        ]


async def test_days_a_zone_does_not_start_on_a_quarter_hour_read_the_raw_rows(client):
    # Liberia was UTC-0:44:30 until 1972: its midnights then were on no quarter hour
    answer = await report(client, "from=1971-06-01&to=1971-06-02&by=day&tz=Africa/Monrovia")
    assert (answer["source"], answer["rows"]) == ("raw", [])
    today = await report(client, f"from={D}&to={D}&by=day&tz=Africa/Monrovia")
    assert today["source"] == "slots"


async def test_filters_narrow_a_report_to_one_value_each(client):
    await seed_subs(client)
    one = await report(client, f"from={D}&to={D}&by=campaign&sub1=b")
    assert one["source"] == "daily"
    assert brief(one["rows"], "campaign") == [("spring", 2, 0, 0, 0, 1, {}, {})]
    deeper = await report(client, f"from={D}&to={D}&by=sub2&campaign=spring&sub1=a")
    assert deeper["source"] == "raw"
    assert brief(deeper["rows"], "sub2") == [
        ("x", 3, 1, 1, 0, 0, {"USD": "1.00"}, {}),
        ("y", 1, 0, 0, 1, 0, {}, {}),
    ]
    by_sub2 = await report(client, f"from={D}&to={D}&by=campaign&sub2=x")
    assert [(r["campaign"], r["clicks"], r["approved"], r["rejected"]) for r in by_sub2["rows"]] == [
        ("cpc", 2, 1, 0),
        ("spring", 5, 1, 1),
    ]
    nothing = await report(client, f"from={D}&to={D}&by=campaign&sub3=")  # '' is "none given"
    assert [(r["campaign"], r["clicks"]) for r in nothing["rows"]] == [("cpc", 2), ("spring", 6)]
    long = await client.get(f"/api/stats?sub1={'x' * 300}", headers=ADMIN)
    assert (long.status_code, long.json()) == (400, {"error": "sub1: must be at most 256 printable characters"})


async def test_the_quarter_hour_totals_give_the_daily_totals_numbers_in_utc(app, client, clock):
    """By day, campaign, status and channel in UTC a report reads the quarter-hour totals
    (fewer rows); on the same data the daily totals must say exactly the same."""
    await seed_subs(client)
    ids = [await click(client, "cpc", sub1="b") for _ in range(3)]
    await postback(client, ids[0], payout="4", status="pending")
    clock.now = at(D, 23, 50)
    answer = await client.get("/postback", params={"click_id": ids[0], "token": POSTBACK_TOKEN, "status": "approved"})
    assert answer.json()["status"] == "updated"
    upload = await client.put(
        f"/api/costs?tz={NY}", json={"rows": [{"day": D, "campaign": "cpc", "sub1": "b", "cost": "7"}]}, headers=ADMIN
    )
    assert upload.status_code == 200, upload.text
    day = (await report(client, f"from={D}&to={D}&by=day"))["rows"][0]["day"]
    assert day == D
    first = int(at(D) // 86400)
    for by in ("day", "campaign", "status", "channel", "campaign,status", "day,campaign", "channel,day,status"):
        daily = tinytrack.StatsQuery(first - 1, first + 1, by)
        slots = tinytrack.StatsQuery(first - 1, first + 1, by, slots_since=0)
        assert (daily.source, slots.source) == ("daily", "slots")
        read = app.store.read
        assert await read(tinytrack.Database.stats, daily) == await read(tinytrack.Database.stats, slots), by


async def test_raw_unique_clicks_are_first_of_their_utc_day_whatever_the_range_and_filters(make_app, clock):
    """A unique click is the first of its (campaign, UTC day, address, User-Agent): a zone's
    day that starts mid-UTC-day, or a filter, must not make a later click the first."""
    clock.now = at(D, 3)  # 11-19 22:00 in New York
    app = await make_app()
    async with client_for(app) as client:
        await click(client, sub2="x")
        clock.now = at(D, 6)  # 11-20 01:00 in New York: the same UTC day, not unique
        await click(client, sub2="y")
        clock.now = at(D, 12)
        for query in (f"from={D}&to={D}&tz={NY}&by=day", f"from={D}&to={D}&tz={NY}&by=day,sub2"):
            rows = (await report(client, query))["rows"]
            assert [(r["clicks"], r["unique_clicks"]) for r in rows] == [(1, 0)], query
        by_sub2 = (await report(client, f"from={D}&to={D}&by=sub2"))["rows"]
        assert [(r["sub2"], r["unique_clicks"]) for r in by_sub2] == [("x", 1), ("y", 0)]
        only_y = (await report(client, f"from={D}&to={D}&by=sub2&sub2=y"))["rows"]
        assert [(r["sub2"], r["unique_clicks"]) for r in only_y] == [("y", 0)]


async def test_a_day_a_zone_skipped_has_no_hours_and_the_day_before_keeps_its_own(make_app, clock):
    # Samoa went from 2011-12-29 24:00 (UTC-10) to 12-31 00:00 (UTC+14): there was no 12-30
    clock.now = at("2011-12-29", 20)  # 12-29 10:00 in Samoa
    app = await make_app()
    async with client_for(app) as client:
        await click(client, sub2="x")
        clock.now = at("2011-12-31", 12)
        for by in ("day", "day,sub2"):
            rows = (await report(client, f"from=2011-12-29&to=2011-12-29&tz=Pacific/Apia&by={by}"))["rows"]
            assert [(r["day"], r["clicks"]) for r in rows] == [("2011-12-29", 1)], by
            assert (await report(client, f"from=2011-12-30&to=2011-12-30&tz=Pacific/Apia&by={by}"))["rows"] == []


@pytest.mark.parametrize("tz", ["+00:00", "Z", "utc", "Etc/UTC", "GMT", "Etc/Zulu", "Universal"])
async def test_names_of_utc_are_utc(client, tz):
    answer = await client.get("/api/stats", params={"tz": tz, "by": "sub1"}, headers=ADMIN)
    assert (answer.status_code, answer.json()["tz"], answer.json()["source"]) == (200, "UTC", "daily")
    rows = {"rows": [{"day": D, "campaign": "cpc", "cost": "1"}]}
    upload = await client.put("/api/costs", params={"tz": tz}, json=rows, headers=ADMIN)
    assert upload.status_code == 200, upload.text


@pytest.mark.parametrize("tz", ["localtime", "posixrules", "Factory", "right/UTC", "posix/Europe/Berlin"])
async def test_names_that_are_no_zone_are_refused(client, tz):
    answer = await client.get("/api/stats", params={"tz": tz}, headers=ADMIN)
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("tz: must be an IANA time zone")


async def test_the_last_day_is_9998_12_31(client):
    answer = await client.get("/api/stats?from=9998-12-01&to=9998-12-31", headers=ADMIN)
    assert answer.status_code == 200, answer.text


def test_the_migration_fills_the_quarter_hours_from_what_is_kept_and_says_from_when(tmp_path):
    """A schema-10 database: two days of clicks, the first day's User-Agents already cut
    (pii_days), a conversion. Schema 11 backfills the quarter-hour totals from the kept
    rows; they are whole only from the day after the last cut User-Agent, so UTC
    reports before that read the daily totals and zone reports say from when they are whole."""
    path = str(tmp_path / "old.db")
    day = 20_000  # 2024-10-04
    with closing(sqlite3.connect(path, isolation_level=None)) as con:
        for number, script in enumerate(tinytrack.SCHEMA[:10], start=1):
            con.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
        rows = [  # (ms, ua): the first day's cut, the second day's kept (one visitor twice)
            (day * DAY_MS + 3_600_000, None),
            (day * DAY_MS + 7_200_000, None),
            ((day + 1) * DAY_MS + 3_600_000, "Mozilla/5.0"),
            ((day + 1) * DAY_MS + 4_500_000, "Mozilla/5.0"),
            ((day + 1) * DAY_MS + 80_000_000, "Other/1.0"),
        ]
        for i, (ms, ua) in enumerate(rows):
            con.execute(
                "INSERT INTO clicks (id, ts, campaign, sub1, ip, ua, bot) VALUES (?, ?, 'spring', 'a', ?, ?, 0)",
                (ms.to_bytes(6, "big") + bytes([0x70, i]) + bytes(8), ms, "203.0.113.0", ua),
            )
        con.execute(
            "INSERT INTO daily_clicks (day, campaign, sub1, clicks, bot_clicks, unique_clicks) VALUES "
            f"({day}, 'spring', 'a', 2, 0, 2), ({day + 1}, 'spring', 'a', 3, 0, 2)"
        )
        con.execute(
            """INSERT INTO conversions (click_id, dedupe_key, click_ts, campaign, event, status, payout, currency, ts,
                   created_at, updated_at) VALUES (?, 'e:conversion', ?, 'spring', 'conversion', 'approved', 2000000,
                   'USD', ?, ?, ?)""",
            (b"x" * 16, rows[2][0], rows[2][0] + 60_000, 0, 0),
        )
    with closing(tinytrack.open_database(path)) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'slots_since'").fetchone() == (str((day + 1) * DAY_MS),)
        slots = con.execute("SELECT slot, clicks, unique_clicks FROM slot_clicks ORDER BY slot").fetchall()
        assert slots == [
            (day * 96 + 4, 1, 0),
            (day * 96 + 8, 1, 0),
            ((day + 1) * 96 + 4, 1, 1),
            ((day + 1) * 96 + 5, 1, 0),  # the same visitor again that day
            ((day + 1) * 96 + 88, 1, 1),
        ]
        assert con.execute("SELECT slot, conversions, payout FROM slot_conversions").fetchall() == [
            ((day + 1) * 96 + 4, 1, 2_000_000)
        ]
    db = tinytrack.Database.open(path)
    try:
        since = db.slots_since()
        both = tinytrack.StatsQuery(day, day + 1, "day", slots_since=since)
        second = tinytrack.StatsQuery(day + 1, day + 1, "day", slots_since=since)
        assert (both.source, second.source) == ("daily", "slots")
        assert [(r["day"], r["clicks"], r["unique_clicks"]) for r in db.stats(both)] == [
            ("2024-10-04", 2, 2),  # the daily totals' own count, from before the cut
            ("2024-10-05", 3, 2),
        ]
        assert [(r["clicks"], r["unique_clicks"], r["approved"]) for r in db.stats(second)] == [(3, 2, 1)]
        zoned = tinytrack.StatsQuery(day, day + 1, "day", tz="Europe/Berlin", slots_since=since)
        answer = tinytrack.stats_answer(zoned, db.stats(zoned), {"slots_since": since})
        assert answer["source"] == "slots" and answer["complete_from"] == "2024-10-05T00:00:00.000Z"
    finally:
        db.close()


async def test_reports_run_in_a_process_of_their_own_that_comes_back(app, client, monkeypatch):
    """Reports run in a lower-priority process (a long one must not pause clicks through
    the GIL); one killed is started again, and where none can start the server's
    reader thread answers."""
    await seed_subs(client)
    query = f"from={D}&to={D}&by=campaign,sub1,sub2"
    first = await report(client, query)
    pids = [process.pid for process in app.reports._pool._processes.values()]
    assert len(pids) == 1 and pids[0] != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, pids[0]) >= tinytrack.READER_NICE
    # an error in the process is the same error here, and the process stays
    with pytest.raises(tinytrack.FieldError, match="tz: must be an IANA time zone"):
        await app.reports.stats(tinytrack.StatsQuery(0, 1, "day", tz="Mars/Base"))
    assert [process.pid for process in app.reports._pool._processes.values()] == pids
    # one killed between reports is replaced at the next, which is answered
    os.kill(pids[0], signal.SIGKILL)
    for _ in range(100):
        if app.reports._pool._broken:
            break
        await anyio.sleep(0.05)
    assert (await report(client, query))["rows"] == first["rows"]
    assert [process.pid for process in app.reports._pool._processes.values()] != pids
    # one killed during a report: that report is a 503 (not run again: it may be what killed it)
    slow = tinytrack.StatsQuery(0, 2932531 - 1, "sub2", tz="Europe/Berlin")  # 8,000 years of offsets: seconds
    pending = asyncio.ensure_future(app.reports.stats(slow))
    await anyio.sleep(0.3)
    for process in app.reports._pool._processes.values():
        os.kill(process.pid, signal.SIGKILL)
    with pytest.raises(tinytrack.HTTPError) as stopped:
        await pending
    assert stopped.value.status == 503
    assert (await report(client, query))["rows"] == first["rows"]

    def refused(*args, **kwargs):
        raise OSError("no processes here")

    app.reports.close()
    monkeypatch.setattr(tinytrack, "ProcessPoolExecutor", refused)
    assert (await report(client, query))["rows"] == first["rows"]
    assert not app.reports.in_process


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_the_report_process_ends_with_the_server(server):
    """A real `tinytrack serve`: a raw report starts the report process; SIGTERM stops
    the server and it, with no traceback at exit."""
    with server.client() as http:
        assert http.get("/c/spring", params={"sub2": "x"}).status_code == 302
        answer = http.get("/api/stats?by=sub2", headers=ADMIN)
        assert answer.status_code == 200 and answer.json()["source"] == "raw"
    spawned = children(server.process.pid)
    assert spawned  # the report process (and multiprocessing's resource tracker)
    with server.client() as http:  # written after the report process opened the file
        assert all(http.get("/c/spring").status_code == 302 for _ in range(20))
    assert server.stop() == 0
    wal = server.directory / "tinytrack.db-wal"  # the last connection's close checkpointed it all
    assert not wal.exists() or wal.stat().st_size == 0
    for pid in spawned:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]
    output = server.output()
    assert "Traceback" not in output and "Exception ignored" not in output, output[-2000:]
