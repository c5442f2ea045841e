"""Reports: /api/stats (JSON and CSV), `tinytrack stats`, /admin (also rendered in
headless Chromium) and /metrics, on data made through the real HTTP paths.

The seeded data (see `seed`) is laid over four UTC days by an injected FakeClock;
every expected number below is worked out by hand from it, not by calling the
code under test.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import re
import struct
import subprocess
import sys
import time
import zlib
from functools import partial
from html.parser import HTMLParser
from pathlib import Path

import anyio
import browser
import httpx
import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, FakeClock, Server, at, free_port, write_config

import tinytrack

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
UTC = dt.UTC
BEARER = {"authorization": f"Bearer {ADMIN_TOKEN}"}
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
SUMMER = '\n[campaigns.summer]\nurl = "https://offer.example.com/s?cid={click_id}"\n'
XSS = "<script>alert(1)</script>"

# The seeded days (UTC). 2026-03-03 has nothing.
OLD, A, B, C = "2026-02-27", "2026-03-01", "2026-03-02", "2026-03-04"


ALL_GROUPS = (
    "day, hour, campaign, sub1, sub2, sub3, sub4, sub5, status, offer, lander, channel, country, device, os, browser"
)


def basic(user: str, password: str) -> dict:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path, extra=SUMMER)  # a second campaign, "summer"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(at(C, 15))


async def click(client: httpx.AsyncClient, campaign: str, ua: str = HUMAN, **subs: str) -> str:
    """A click through /c/<campaign>; returns its id (from the redirect)."""
    answer = await client.get(f"/c/{campaign}", params=subs, headers={"user-agent": ua})
    assert answer.status_code == 302, answer.text
    return re.search(r"cid=([0-9a-f-]{36})", answer.headers["location"])[1]


async def postback(client: httpx.AsyncClient, click_id: str, expect: str = "created", **fields: str) -> None:
    answer = await client.get("/postback", params={"click_id": click_id, "token": POSTBACK_TOKEN, **fields})
    if expect == "orphan":
        assert answer.status_code == 404, answer.text
    else:
        assert (answer.status_code, answer.json()["status"]) == (200, expect), answer.text


async def seed(client: httpx.AsyncClient, clock: FakeClock) -> None:
    """Clicks: humans unless a UA says otherwise ("" and Googlebot are bots). Every
    click comes from one address with one User-Agent, so a campaign-day has one
    unique click: its first human click's (its sub1, sub2, sub3 get it).

    day    campaign sub1 sub2  clicks                      postbacks (converted that day unless said)
    02-27  spring   a    -     5 humans                    #1 approved 100 USD
    03-01  spring   a    x     4 humans a1..a4, 1 Googlebot a1..a3 approved 0.1 USD each; a4 pending 7 USD
           spring   b    y     2 humans b1, b2             b1 approved 0.2 USD; b2 "declined" (rejected) 5 USD
           spring   b    -     1 empty UA
           summer   a    x     2 humans s1, s2             s1 approved 3 EUR
    03-02  spring   a    y     3 humans c1..c3             c1 "sale" (approved) 1.25 USD;
                                                           a1 txid T2 approved 2 EUR (a 03-01 click);
                                                           a1 txid T1 again: duplicate
           summer   c    -     1 human d, 1 Googlebot      d pending 4 USD, approved on 03-04 (stays 03-02)
           spring   -    -     1 human f (20:00)           f approved 0.67 USD, sent 03-04 with ts 03-02 23:30Z
    03-04  spring   -    -     2 humans e1, e2             e1 approved 0.33 USD; one orphan postback
    """
    clock.now = at(OLD, 9)
    old = [await click(client, "spring", sub1="a") for _ in range(5)]
    clock.now = at(OLD, 15)
    await postback(client, old[0], payout="100")

    clock.now = at(A, 9)
    a = [await click(client, "spring", sub1="a", sub2="x", sub3="p") for _ in range(4)]
    await click(client, "spring", ua=GOOGLEBOT, sub1="a", sub2="x")
    b = [await click(client, "spring", sub1="b", sub2="y") for _ in range(2)]
    await click(client, "spring", ua="", sub1="b")
    s = [await click(client, "summer", sub1="a", sub2="x") for _ in range(2)]
    clock.now = at(A, 15)
    for cid in a[:3]:
        await postback(client, cid, payout="0.1", txid="T1")
    await postback(client, b[0], payout="0.2")
    await postback(client, a[3], payout="7", status="pending")
    await postback(client, s[0], payout="3", currency="EUR")
    await postback(client, b[1], payout="5", status="declined")  # status_map: declined -> rejected

    clock.now = at(B, 9)
    c = [await click(client, "spring", sub1="a", sub2="y") for _ in range(3)]
    d = await click(client, "summer", sub1="c")
    await click(client, "summer", ua=GOOGLEBOT, sub1="c")
    clock.now = at(B, 15)
    await postback(client, c[0], payout="1.25", status="sale")
    await postback(client, a[0], payout="2", currency="EUR", txid="T2")
    await postback(client, d, payout="4", status="pending", txid="D")
    await postback(client, a[0], expect="duplicate", payout="0.1", txid="T1")
    clock.now = at(B, 20)
    f = await click(client, "spring")

    clock.now = at(C, 9)
    e = [await click(client, "spring") for _ in range(2)]
    clock.now = at(C, 15)
    await postback(client, d, expect="updated", txid="D", status="approved")  # keeps its 4 USD and its day
    await postback(client, e[0], payout="0.33")
    await postback(client, f, payout="0.67", ts="2026-03-03T01:30:00+02:00")  # 2026-03-02 23:30 UTC
    await postback(client, "0190a6b2-7c1d-7abc-8def-0123456789ab", expect="orphan", payout="9")


def row(
    by: str,
    key: str,
    clicks: int,
    bots: int,
    conversions: int,
    approved: int,
    pending: int,
    rejected: int,
    payout: dict,
    cr: str | None,
    epc: dict,
    *,
    unique: int,
) -> dict:
    """A row without costs: profit is the payout, roi null, cpa empty."""
    return {
        by: key,
        "clicks": clicks,
        "unique_clicks": unique,
        "bot_clicks": bots,
        "conversions": conversions,
        "approved": approved,
        "pending": pending,
        "rejected": rejected,
        "payout": payout,
        "cost": {},
        "profit": payout,
        "roi": dict.fromkeys(payout),
        "cr": cr,
        "epc": epc,
        "cpa": {},
        "lp_clicks": 0,  # no landers here: tests/test_funnels.py has them
        "flagged_clicks": 0,  # nor fraud rules
        "flagged_conversions": 0,
        "pixel_only": 0,
        "lp_ctr": None,
    }


BY_DAY = [
    # 03-01: 4+2+2 humans, Googlebot + empty UA; a1..a3 + b1 + s1 approved, a4 pending, b2 rejected.
    # USD 0.1 + 0.1 + 0.1 + 0.2 = 0.50 exactly; cr 6/8; epc 0.50/8 and 3/8.
    row(
        "day",
        A,
        8,
        2,
        6,
        5,
        1,
        1,
        {"EUR": "3.00", "USD": "0.50"},
        "75.00",
        {"EUR": "0.3750", "USD": "0.0625"},
        unique=2,
    ),
    # 03-02: c1..c3 + d + f humans, 1 bot; c1, a1/T2 (EUR), d (now approved), f (by its ts) approved.
    # USD 1.25 + 4 + 0.67 = 5.92; cr 4/5; epc 5.92/5 and 2/5. d's pending is gone from this day.
    row(
        "day",
        B,
        5,
        1,
        4,
        4,
        0,
        0,
        {"EUR": "2.00", "USD": "5.92"},
        "80.00",
        {"EUR": "0.4000", "USD": "1.1840"},
        unique=2,
    ),
    # 03-04: e1, e2; e1 approved. f converted on 03-02, so it is not here.
    row("day", C, 2, 0, 1, 1, 0, 0, {"USD": "0.33"}, "50.00", {"USD": "0.1650"}, unique=1),
]

BY_CAMPAIGN = [
    # spring: 6 + 4 + 2 humans; approved a1..a3, b1, c1, T2, e1, f; pending a4; rejected b2.
    # USD 0.3 + 0.2 + 1.25 + 0.33 + 0.67 = 2.75; cr 9/12; epc 2.75/12 = 0.22916.. and 2/12.
    row(
        "campaign",
        "spring",
        12,
        2,
        9,
        8,
        1,
        1,
        {"EUR": "2.00", "USD": "2.75"},
        "75.00",
        {"EUR": "0.1667", "USD": "0.2292"},
        unique=3,  # one a day: a1 on 03-01, c1 on 03-02, e1 on 03-04
    ),
    # summer: s1, s2, d humans + 1 bot; s1 (EUR) and d (USD) approved. cr 2/3.
    row(
        "campaign",
        "summer",
        3,
        1,
        2,
        2,
        0,
        0,
        {"EUR": "3.00", "USD": "4.00"},
        "66.67",
        {"EUR": "1.0000", "USD": "1.3333"},
        unique=2,  # s1 on 03-01, d on 03-02
    ),
]

BY_SUB1 = [
    row("sub1", "", 3, 0, 2, 2, 0, 0, {"USD": "1.00"}, "66.67", {"USD": "0.3333"}, unique=1),  # f, e1, e2
    # a1..a4, s1, s2, c1..c3 + Googlebot; USD 0.3 + 1.25, EUR 3 + 2; cr 7/9; epc 1.55/9, 5/9.
    row(
        "sub1",
        "a",
        9,
        1,
        7,
        6,
        1,
        0,
        {"EUR": "5.00", "USD": "1.55"},
        "77.78",
        {"EUR": "0.5556", "USD": "0.1722"},
        unique=3,
    ),
    row("sub1", "b", 2, 1, 1, 1, 0, 1, {"USD": "0.20"}, "50.00", {"USD": "0.1000"}, unique=0),
    row("sub1", "c", 1, 1, 1, 1, 0, 0, {"USD": "4.00"}, "100.00", {"USD": "4.0000"}, unique=1),
]

BY_SUB2 = [  # read from the raw rows
    # d, f, e1, e2 + the empty-UA and summer Googlebot clicks; d, e1, f approved: 4 + 0.33 + 0.67.
    row("sub2", "", 4, 2, 3, 3, 0, 0, {"USD": "5.00"}, "75.00", {"USD": "1.2500"}, unique=2),
    # a1..a4, s1, s2 + spring Googlebot; a1..a3, s1, a1/T2 approved, a4 pending. cr 6/6.
    row(
        "sub2",
        "x",
        6,
        1,
        6,
        5,
        1,
        0,
        {"EUR": "5.00", "USD": "0.30"},
        "100.00",
        {"EUR": "0.8333", "USD": "0.0500"},
        unique=2,
    ),
    # b1, b2, c1..c3; b1, c1 approved, b2 rejected. cr 2/5; epc 1.45/5.
    row("sub2", "y", 5, 0, 2, 2, 0, 1, {"USD": "1.45"}, "40.00", {"USD": "0.2900"}, unique=1),
]

BY_STATUS = [  # every status row against all 15 human (3 bot) clicks of the range; each its own payout
    row(
        "status",
        "approved",
        15,
        3,
        10,
        10,
        0,
        0,
        {"EUR": "5.00", "USD": "6.75"},
        "66.67",
        {"EUR": "0.3333", "USD": "0.4500"},
        unique=5,  # the range's, as its clicks: spring 3 days + summer 2
    ),
    row("status", "pending", 15, 3, 1, 0, 1, 0, {"USD": "7.00"}, "6.67", {"USD": "0.4667"}, unique=5),
    row("status", "rejected", 15, 3, 0, 0, 0, 1, {"USD": "5.00"}, "0.00", {"USD": "0.3333"}, unique=5),
]

OLD_DAY = row("day", OLD, 5, 0, 1, 1, 0, 0, {"USD": "100.00"}, "20.00", {"USD": "20.0000"}, unique=1)


async def stats(client: httpx.AsyncClient, query: str) -> list[dict]:
    answer = await client.get(f"/api/stats?{query}", headers=BEARER)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["cache-control"] == "no-store"
    return answer.json()["rows"]


# --- /api/stats: exact numbers ---------------------------------------------------


@pytest.mark.anyio
async def test_stats_exact_per_group(client, clock):
    await seed(client, clock)
    span = f"from={A}&to={C}"
    by_day = await stats(client, f"{span}&by=day")
    assert by_day == BY_DAY
    assert list(by_day[0]) == ["day", *tinytrack.STATS_COLUMNS]  # the group first, under its own name
    assert await stats(client, f"{span}&by=campaign") == BY_CAMPAIGN
    assert await stats(client, span) == BY_CAMPAIGN  # by=campaign is the default
    assert await stats(client, f"{span}&by=sub1") == BY_SUB1
    assert await stats(client, f"{span}&by=sub2") == BY_SUB2
    assert await stats(client, f"{span}&by=status") == BY_STATUS
    # sub3 was only set on a1..a4 (raw rows too): a1's T2 (EUR, 03-02) counts for it.
    assert await stats(client, f"{span}&by=sub3") == [
        row(
            "sub3",
            "",
            11,
            3,
            6,
            6,
            0,
            1,
            {"EUR": "3.00", "USD": "6.45"},
            "54.55",
            {"EUR": "0.2727", "USD": "0.5864"},
            unique=4,
        ),
        row(
            "sub3",
            "p",
            4,
            0,
            5,
            4,
            1,
            0,
            {"EUR": "2.00", "USD": "0.30"},
            "125.00",
            {"EUR": "0.5000", "USD": "0.0750"},
            unique=1,  # a1, spring's first on 03-01
        ),
    ]


@pytest.mark.anyio
async def test_stats_campaign_filter_bots_and_tz(client, clock):
    await seed(client, clock)
    span = f"from={A}&to={C}"
    assert await stats(client, f"{span}&by=day&campaign=summer") == [
        row("day", A, 2, 0, 1, 1, 0, 0, {"EUR": "3.00"}, "50.00", {"EUR": "1.5000"}, unique=1),
        row("day", B, 1, 1, 1, 1, 0, 0, {"USD": "4.00"}, "100.00", {"USD": "4.0000"}, unique=1),
    ]
    assert await stats(client, f"{span}&campaign=summer") == [BY_CAMPAIGN[1]]
    # sub2 (raw rows) with the filter too: f, e1, e2 and the empty-UA bot have no sub2.
    assert (await stats(client, f"{span}&by=sub2&campaign=spring"))[0] == row(
        "sub2", "", 3, 1, 2, 2, 0, 0, {"USD": "1.00"}, "66.67", {"USD": "0.3333"}, unique=1
    )
    assert await stats(client, f"{span}&campaign=nope") == []
    # bots=1: bot clicks are in clicks, cr and epc; bot_clicks is unchanged.
    assert await stats(client, f"{span}&by=day&bots=1") == [
        row(
            "day",
            A,
            10,
            2,
            6,
            5,
            1,
            1,
            {"EUR": "3.00", "USD": "0.50"},
            "60.00",
            {"EUR": "0.3000", "USD": "0.0500"},
            unique=2,
        ),
        row(
            "day",
            B,
            6,
            1,
            4,
            4,
            0,
            0,
            {"EUR": "2.00", "USD": "5.92"},
            "66.67",
            {"EUR": "0.3333", "USD": "0.9867"},
            unique=2,
        ),
        row("day", C, 2, 0, 1, 1, 0, 0, {"USD": "0.33"}, "50.00", {"USD": "0.1650"}, unique=1),
    ]
    assert await stats(client, f"{span}&by=day&bots=0") == BY_DAY
    assert await stats(client, f"{span}&by=day&tz=UTC") == BY_DAY


@pytest.mark.anyio
async def test_stats_date_bounds_are_inclusive_and_default_to_30_days(client, clock):
    await seed(client, clock)
    assert await stats(client, f"from={B}&to={B}&by=day") == [BY_DAY[1]]
    assert await stats(client, f"from={C}&to={C}&by=day") == [BY_DAY[2]]
    assert await stats(client, f"from={OLD}&to={A}&by=day") == [OLD_DAY, BY_DAY[0]]
    assert await stats(client, "from=2026-02-28&to=2026-03-03&by=day") == BY_DAY[:2]
    assert await stats(client, "from=2026-03-03&to=2026-03-03&by=day") == []
    # The same bounds on the raw-row path: 03-01 alone.
    assert await stats(client, f"from={A}&to={A}&by=sub2") == [
        row("sub2", "", 0, 1, 0, 0, 0, 0, {}, None, {}, unique=0),  # the empty-UA bot alone: no human clicks, cr null
        row(
            "sub2",
            "x",
            6,
            1,
            5,
            4,
            1,
            0,
            {"EUR": "3.00", "USD": "0.30"},
            "83.33",
            {"EUR": "0.5000", "USD": "0.0500"},
            unique=2,
        ),
        row("sub2", "y", 2, 0, 1, 1, 0, 1, {"USD": "0.20"}, "50.00", {"USD": "0.1000"}, unique=0),
    ]
    # Default: the 30 days to today (UTC) inclusive. Today is 03-04: 02-03..03-04.
    assert await stats(client, "by=day") == [OLD_DAY, *BY_DAY]
    assert await stats(client, "to=2026-03-28&by=day") == [OLD_DAY, *BY_DAY]  # from = to - 29 = 02-27
    clock.now = at("2026-03-28", 23, 59)
    assert await stats(client, "by=day") == [OLD_DAY, *BY_DAY]
    clock.now = at("2026-03-29", 0, 0)
    assert await stats(client, "by=day") == BY_DAY  # 02-27 just fell out
    assert await stats(client, "from=2026-02-27&by=day") == [OLD_DAY, *BY_DAY]  # to defaults to today


@pytest.mark.anyio
async def test_a_day_with_conversions_and_no_clicks_has_null_cr(client, clock):
    clock.now = at(A, 23, 59)
    cid = await click(client, "spring", sub1="late")
    clock.now = at(B, 0, 30)
    await postback(client, cid, payout="1.005")  # micro-units: 1.005 is kept, not rounded
    await postback(client, cid, payout="0.000001", txid="tiny")
    assert await stats(client, f"from={A}&to={B}&by=day") == [
        row("day", A, 1, 0, 0, 0, 0, 0, {}, "0.00", {}, unique=1),
        row("day", B, 0, 0, 2, 2, 0, 0, {"USD": "1.005001"}, None, {}, unique=0),
    ]
    # the same conversions against their click's sub1 over both days
    assert await stats(client, f"from={A}&to={B}&by=sub1") == [
        row("sub1", "late", 1, 0, 2, 2, 0, 0, {"USD": "1.005001"}, "200.00", {"USD": "1.0050"}, unique=1),
    ]


async def change_statuses(client: httpx.AsyncClient, clock: FakeClock) -> None:
    """Two conversions on 03-01 that changed status: pending 4 USD -> approved,
    approved 5 EUR -> reversed."""
    clock.now = at(A, 9)
    first = await click(client, "spring")
    second = await click(client, "spring")
    clock.now = at(A, 15)
    await postback(client, first, payout="4", status="pending")
    await postback(client, second, payout="5", currency="EUR")
    clock.now = at(A, 16)
    await postback(client, first, expect="updated", status="approved")  # keeps its 4 USD
    await postback(client, second, expect="updated", status="reversed")  # status_map: rejected


@pytest.mark.anyio
async def test_after_a_status_change_totals_and_raw_rows_agree(client, clock):
    """The daily totals (by=sub1) say what the raw rows (by=sub2) say about the same
    conversions: no zero payout for a currency nothing is approved in."""
    await change_statuses(client, clock)
    want = {
        "clicks": 2,
        "unique_clicks": 1,  # one address, one User-Agent
        "bot_clicks": 0,
        "conversions": 1,
        "approved": 1,
        "pending": 0,
        "rejected": 1,
        "payout": {"USD": "4.00"},
        "cost": {},
        "profit": {"USD": "4.00"},
        "roi": {"USD": None},
        "cr": "50.00",
        "epc": {"USD": "2.0000"},
        "cpa": {},
        "lp_clicks": 0,
        "flagged_clicks": 0,
        "flagged_conversions": 0,
        "pixel_only": 0,
        "lp_ctr": None,
    }
    assert await stats(client, f"from={A}&to={A}&by=sub2") == [{"sub2": "", **want}]  # raw rows
    assert await stats(client, f"from={A}&to={A}&by=sub1") == [{"sub1": "", **want}]  # daily totals


@pytest.mark.anyio
async def test_after_a_status_change_by_status_has_no_empty_status_row(client, clock):
    """Nothing is pending any more: by=status has no "pending" row of zeros."""
    await change_statuses(client, clock)
    assert await stats(client, f"from={A}&to={A}&by=status") == [
        row("status", "approved", 2, 0, 1, 1, 0, 0, {"USD": "4.00"}, "50.00", {"USD": "2.0000"}, unique=1),
        row("status", "rejected", 2, 0, 0, 0, 0, 1, {"EUR": "5.00"}, "0.00", {"EUR": "2.5000"}, unique=1),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "query, message",
    [
        ("from=2026-3-1", "from: must be a date as YYYY-MM-DD, got '2026-3-1'"),
        ("from=2026-02-30", "from: must be a date as YYYY-MM-DD, got '2026-02-30'"),
        ("to=yesterday", "to: must be a date as YYYY-MM-DD, got 'yesterday'"),
        ("to=2026-03-04T00:00", "to: must be a date as YYYY-MM-DD, got '2026-03-04T00:00'"),
        ("from=2026-03-05&to=2026-03-01", "from: must not be after to (2026-03-01), got 2026-03-05"),
        ("from=2000-01-01&to=2026-03-01", "from: the range is at most 3660 days"),
        (
            "by=sub6",
            "by: must be up to 3 of day, hour, campaign, sub1, sub2, sub3, sub4, sub5, status, offer, lander, channel, country, device, os, browser, got 'sub6'",
        ),
        (
            "by=ts",
            "by: must be up to 3 of day, hour, campaign, sub1, sub2, sub3, sub4, sub5, status, offer, lander, channel, country, device, os, browser, got 'ts'",
        ),
        ("bots=yes", "bots: must be 0 or 1, got 'yes'"),
        ("format=xml", "format: must be json or csv, got 'xml'"),
        ("tz=Europe/Pariss", "tz: must be an IANA time zone like Europe/Berlin or UTC, got 'Europe/Pariss'"),
        ("tz=%2B02:00", "tz: must be an IANA time zone like Europe/Berlin or UTC, got '+02:00'"),
        ("by=day,sub1,sub2,sub3", "by: at most 3 fields, got 4"),
        ("by=sub1,sub1", "by: names a field twice: 'sub1,sub1'"),
        ("by=day,", f"by: must be up to 3 of {ALL_GROUPS}, got ''"),
        ("from=1969-12-31&to=1970-01-05", "from: must be from 1970-01-01 to 9998-12-31"),
        ("from=9999-01-01&to=9999-01-05", "to: must be from 1970-01-01 to 9998-12-31"),
    ],
)
async def test_stats_bad_parameters_are_a_400_naming_the_field(client, query, message):
    answer = await client.get(f"/api/stats?{query}", headers=BEARER)
    assert (answer.status_code, answer.json()) == (400, {"error": message})


# --- /api/stats?format=csv -----------------------------------------------------------


def csv_rows(text: str) -> tuple[list[str], list[dict]]:
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames), list(reader)


def assert_csv_matches(by: str, text: str, rows: list[dict]) -> None:
    """The CSV, parsed back, says what the JSON says: one payout_/cost_/profit_/roi_/
    epc_/cpa_ column per currency (0.00 / 0.0000 where a row has none, roi and cpa
    empty), null as an empty cell, and a cell a spreadsheet would run as a formula
    prefixed with '."""
    currencies = sorted({cur for r in rows for cur in (*r["payout"], *r["cost"])})
    header, parsed = csv_rows(text)
    assert header == [
        by,
        "clicks",
        "unique_clicks",
        "bot_clicks",
        "conversions",
        "approved",
        "pending",
        "rejected",
        "lp_clicks",
        "flagged_clicks",
        "flagged_conversions",
        "pixel_only",
        *(f"{column}_{c}" for column in ("payout", "cost", "profit", "roi") for c in currencies),
        "cr",
        *(f"epc_{c}" for c in currencies),
        *(f"cpa_{c}" for c in currencies),
        "lp_ctr",
    ]
    assert len(parsed) == len(rows)
    for got, want in zip(parsed, rows):
        key = want[by]
        assert got[by] == ("'" + key if key[:1] in ("=", "+", "-", "@") else key)
        for column in tinytrack.COUNT_COLUMNS:
            assert int(got[column]) == want[column], column
        assert got["cr"] == (want["cr"] or "")
        assert got["lp_ctr"] == (want["lp_ctr"] or "")
        for cur in currencies:
            for column in ("payout", "cost", "profit"):
                assert got[f"{column}_{cur}"] == want[column].get(cur, "0.00")
            assert got[f"roi_{cur}"] == (want["roi"].get(cur) or "")
            assert got[f"epc_{cur}"] == want["epc"].get(cur, "0.0000" if want["clicks"] else "")
            assert got[f"cpa_{cur}"] == ((want["cpa"].get(cur) or "") if want["conversions"] else "")


@pytest.mark.anyio
async def test_stats_csv_is_the_json(client, clock):
    await seed(client, clock)
    clock.now = at(C, 16)
    formula = await click(client, "spring", sub1='=HYPERLINK("http://evil.example")')
    await postback(client, formula, payout="1.5", currency="GBP")
    for query in (
        f"from={OLD}&to={C}&by=day",
        f"from={A}&to={C}&by=sub1",
        f"from={A}&to={C}&by=status",
        f"from={A}&to={C}&by=sub2&campaign=spring",
        "from=2026-03-03&to=2026-03-03",
    ):
        rows = await stats(client, query)
        answer = await client.get(f"/api/stats?{query}&format=csv", headers=BEARER)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "text/csv; charset=utf-8"
        by = re.search(r"by=(\w+)", query)[1] if "by=" in query else "campaign"
        assert_csv_matches(by, answer.text, rows)
    # Spelled out once: three currencies, and the formula neutralised.
    answer = await client.get(f"/api/stats?from={A}&to={C}&by=sub1&format=csv", headers=BEARER)
    # Every text cell is quoted (a spreadsheet splitting on ; keeps it whole), numbers are not.
    assert answer.text.splitlines() == [
        '"sub1","clicks","unique_clicks","bot_clicks","conversions","approved","pending","rejected","lp_clicks",'
        '"flagged_clicks","flagged_conversions","pixel_only",'
        '"payout_EUR","payout_GBP","payout_USD","cost_EUR","cost_GBP","cost_USD","profit_EUR","profit_GBP","profit_USD",'
        '"roi_EUR","roi_GBP","roi_USD","cr","epc_EUR","epc_GBP","epc_USD","cpa_EUR","cpa_GBP","cpa_USD","lp_ctr"',
        '"",3,1,0,2,2,0,0,0,0,0,0,"0.00","0.00","1.00","0.00","0.00","0.00","0.00","0.00","1.00","","","",'
        '"66.67","0.0000","0.0000","0.3333","","","",""',
        '"\'=HYPERLINK(""http://evil.example"")",1,0,0,1,1,0,0,0,0,0,0,"0.00","1.50","0.00","0.00","0.00","0.00",'
        '"0.00","1.50","0.00","","","","100.00","0.0000","1.5000","0.0000","","","",""',
        '"a",9,3,1,7,6,1,0,0,0,0,0,"5.00","0.00","1.55","0.00","0.00","0.00","5.00","0.00","1.55","","","",'
        '"77.78","0.5556","0.0000","0.1722","","","",""',
        '"b",2,0,1,1,1,0,1,0,0,0,0,"0.00","0.00","0.20","0.00","0.00","0.00","0.00","0.00","0.20","","","",'
        '"50.00","0.0000","0.0000","0.1000","","","",""',
        '"c",1,1,1,1,1,0,0,0,0,0,0,"0.00","0.00","4.00","0.00","0.00","0.00","0.00","0.00","4.00","","","",'
        '"100.00","0.0000","0.0000","4.0000","","","",""',
    ]


# --- Auth ----------------------------------------------------------------------------


# Every route behind the admin token, and what a good answer starts with.
PROTECTED = {
    "/api/stats": '{"from":"',
    "/api/stats?by=nonsense": '{"error":"by: ',  # authorized first, then validated
    "/api/conversions": '{"rows":[],"next":null}',
    "/api/orphans": '{"rows":[],"next":null}',
    "/api/outbox": '{"rows":[],"next":null}',
    "/metrics": "# HELP tinytrack_clicks_total ",
    "/admin": "<!doctype html>",
}
# Every form a credential may take, and whether it is the admin's.
CREDENTIALS = {
    "none": ({}, False),
    "bearer": (BEARER, True),
    "basic": (basic("admin", ADMIN_TOKEN), True),
    "basic-no-user": (basic("", ADMIN_TOKEN), True),
    "bearer-postback-token": ({"authorization": f"Bearer {POSTBACK_TOKEN}"}, False),  # not an admin token
    "basic-postback-token": (basic("admin", POSTBACK_TOKEN), False),
    "basic-token-as-user": (basic(ADMIN_TOKEN, ""), False),  # the token as the user name is not the password
    "bearer-longer": ({"authorization": f"Bearer {ADMIN_TOKEN}x"}, False),
    "bearer-empty": ({"authorization": "Bearer "}, False),
    "basic-not-base64": ({"authorization": "Basic !!notbase64"}, False),
    "other-scheme": ({"authorization": f"Token {ADMIN_TOKEN}"}, False),
    "bare-token": ({"authorization": ADMIN_TOKEN}, False),
    "query-token": ({"query": f"token={ADMIN_TOKEN}"}, False),
    "query-key": ({"query": f"key={ADMIN_TOKEN}"}, False),
}


@pytest.mark.anyio
@pytest.mark.parametrize("path", list(PROTECTED))
@pytest.mark.parametrize("credential", list(CREDENTIALS))
async def test_every_protected_route_against_every_credential_form(client, path, credential):
    headers, admitted = CREDENTIALS[credential]
    headers = dict(headers)
    if query := headers.pop("query", None):
        path += ("&" if "?" in path else "?") + query
    answer = await client.get(path, headers=headers)
    assert answer.headers["cache-control"] == "no-store"
    if not admitted:
        assert answer.status_code == 401, answer.text
        assert answer.json() == {"error": "unauthorized"}  # no data, no hint
        assert answer.headers["www-authenticate"] == 'Basic realm="tinytrack"'
        return
    start = PROTECTED[path.split("&")[0]] if "&" in path else PROTECTED[path]
    assert answer.status_code == (400 if "nonsense" in path else 200), answer.text
    assert answer.text.startswith(start)  # the real thing, not an empty 200


# --- tinytrack stats -----------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinytrack", *args], cwd=cwd, capture_output=True, text=True, timeout=30
    )


@pytest.mark.anyio
async def test_cli_stats_table_csv_json_beside_the_running_app(client, clock, config_file, tmp_path):
    await seed(client, clock)  # the app stays up: the command reads its database beside it

    async def cli(*args: str) -> subprocess.CompletedProcess:
        return await anyio.to_thread.run_sync(lambda: run_cli("stats", "-c", str(config_file), *args, cwd=tmp_path))

    table = await cli("--from", A, "--to", C)
    assert (table.returncode, table.stderr) == (0, "")
    assert table.stdout.splitlines() == [
        "2026-03-01 to 2026-03-04 (UTC), by campaign",
        "campaign  clicks  unique_clicks  bot_clicks  conversions  approved  pending  rejected  payout_EUR  payout_USD"
        "     cr  epc_EUR  epc_USD",  # no costs: no cost, profit, roi or cpa columns
        "spring        12              3           2            9         8        1         1        2.00        2.75"
        "  75.00   0.1667   0.2292",
        "summer         3              2           1            2         2        0         0        3.00        4.00"
        "  66.67   1.0000   1.3333",
    ]
    by_sub1 = await cli("--from", A, "--to", C, "--by", "sub1", "--bots")
    lines = by_sub1.stdout.splitlines()
    assert lines[0] == "2026-03-01 to 2026-03-04 (UTC), by sub1"
    # Aligned: every line of the table is as long as the header, each numeric column
    # ends where its header does, and the text column starts where its header does.
    header, cells = lines[1], lines[2:]
    assert [line.split() for line in [header, *cells[1:]]] == [
        [
            "sub1",
            "clicks",
            "unique_clicks",
            "bot_clicks",
            "conversions",
            "approved",
            "pending",
            "rejected",
            "payout_EUR",
            "payout_USD",
            "cr",
            "epc_EUR",
            "epc_USD",
        ],
        ["a", "10", "3", "1", "7", "6", "1", "0", "5.00", "1.55", "70.00", "0.5000", "0.1550"],
        ["b", "3", "0", "1", "1", "1", "0", "1", "0.00", "0.20", "33.33", "0.0000", "0.0667"],
        ["c", "2", "1", "1", "1", "1", "0", "0", "0.00", "4.00", "50.00", "0.0000", "2.0000"],
    ]
    assert cells[0].split() == [
        "3",
        "1",
        "0",
        "2",
        "2",
        "0",
        "0",
        "0.00",
        "1.00",
        "66.67",
        "0.0000",
        "0.3333",
    ]  # sub1 ""
    assert {len(line) for line in [header, *cells]} == {len(header)}
    for name in header.split()[1:]:
        end = header.index(name) + len(name)
        assert all(line[end - 1] != " " and (end == len(line) or line[end] == " ") for line in cells), name

    as_json = await cli("--from", A, "--to", C, "--by", "day", "--json")
    assert json.loads(as_json.stdout) == {
        "from": A,
        "to": C,
        "tz": "UTC",
        "by": ["day"],
        "source": "slots",
        "rows": BY_DAY,
    }
    api = await client.get(f"/api/stats?from={A}&to={C}&by=day", headers=BEARER)
    assert json.loads(as_json.stdout) == api.json()
    for args, query in [
        ((), "by=campaign"),
        (("--by", "status", "--bots"), "by=status&bots=1"),
        (("--by", "sub2", "--campaign", "summer"), "by=sub2&campaign=summer"),
    ]:
        got = json.loads((await cli("--from", A, "--to", C, *args, "--json")).stdout)
        # The command's clock is the real one: to it these 2026-03 days are past clicks_days, so
        # a report from the raw rows says from when it is whole; the app's clock is on 03-04.
        complete = got.pop("complete_from", None)
        assert (complete is not None) == ("sub2" in query), complete
        assert got == (await client.get(f"/api/stats?from={A}&to={C}&{query}", headers=BEARER)).json()
        as_csv = await cli("--from", A, "--to", C, *args, "--csv")
        api_csv = await client.get(f"/api/stats?from={A}&to={C}&{query}&format=csv", headers=BEARER)
        assert as_csv.stdout == api_csv.text

    empty = await cli("--from", "2026-03-03", "--to", "2026-03-03", "--by", "day")
    assert empty.stdout == "2026-03-03 to 2026-03-03 (UTC), by day\nnothing in that range\n"

    bad = await cli("--from", "2026-13-01")
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr == "tinytrack: --from: must be a date as YYYY-MM-DD, got '2026-13-01'\n"
    backwards = await cli("--from", C, "--to", A)
    assert (backwards.returncode, backwards.stderr) == (
        1,
        "tinytrack: --from: must not be after to (2026-03-01), got 2026-03-04\n",
    )


# --- /admin ---------------------------------------------------------------------------


class Page(HTMLParser):
    """What a person sees on /admin: each h2's tables (rows of cell text) and the
    chart's bars (rect attributes and their <title>)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.section = ""
        self.tables: dict[str, list[list[str]]] = {}
        self.bars: list[dict] = []
        self.svg_ids: list[str] = []
        self.ticks: dict[str, list[str]] = {}  # each chart's tick labels
        self.kpis: dict[str, str] = {}
        self.links: dict[str, str] = {}  # a link's text -> its href
        self.inputs: dict[str, str] = {}  # the form's inputs' values
        self.selected: dict[str, list[str]] = {}  # each select's chosen option, per select of that name
        self.scripts = 0
        self._href: str | None = None
        self._link_text: list[str] = []
        self._select: str | None = None
        self._kpi: list[str] | None = None
        self._text: list[str] | None = None
        self._in_h2 = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "script":
            self.scripts += 1
        elif tag == "h2":
            self._in_h2, self.section = True, ""
        elif tag == "svg":
            self.svg_ids.append(attrs.get("id"))
        elif tag == "text":
            self._text = []
        elif tag == "a":
            self._href, self._link_text = attrs.get("href"), []
        elif tag == "input":
            self.inputs[attrs.get("name")] = attrs.get("value")
        elif tag == "select":
            self._select = attrs.get("name")
            self.selected.setdefault(self._select, []).append("")
        elif tag == "option" and "selected" in attrs and self._select:
            self.selected[self._select][-1] = attrs.get("value", "<text>")
        elif tag == "div" and attrs.get("class") == "kpis":
            self._kpi = []
        elif tag == "div" and attrs.get("class") == "charts":  # the tiles are over
            self._kpi = None
        elif tag in ("span", "b") and self._kpi is not None and (tag == "b" or self._text is None):
            self._text = []  # a tile's label (span), then its value (b, which may hold spans)
        elif tag == "rect":
            self.bars.append({**attrs, "title": ""})
        elif tag == "tr":
            self.tables.setdefault(self.section, []).append([])
        elif tag in ("td", "th", "title"):
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False
        elif tag == "text" and self._text is not None:
            self.ticks.setdefault(self.svg_ids[-1], []).append("".join(self._text))
            self._text = None
        elif tag == "a" and self._href is not None:
            self.links.setdefault("".join(self._link_text), self._href)  # the first of a text
            self._href = None
        elif tag == "select":
            self._select = None
        elif self._kpi is not None and self._text is not None and (tag == "b" or (tag == "span" and not self._kpi)):
            self._kpi.append("".join(self._text))
            self._text = None
            if len(self._kpi) == 2:
                self.kpis[self._kpi[0]] = self._kpi[1]
                self._kpi = []
        elif tag in ("td", "th") and self._text is not None:
            self.tables[self.section][-1].append("".join(self._text))
            self._text = None
        elif tag == "title" and self._text is not None:
            if self.bars:
                self.bars[-1]["title"] = "".join(self._text)
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.section += data
        if self._text is not None:
            self._text.append(data)
        if self._href is not None:
            self._link_text.append(data)


def bar_heights(page: Page) -> dict[str, float]:
    return {bar["title"].split(":")[0]: float(bar["height"]) for bar in page.bars}


@pytest.mark.anyio
async def test_admin_page_in_process(client, clock):
    await seed(client, clock)
    clock.now = at(C, 16)
    evil = await click(client, "spring", sub1=XSS, sub2='"><img src=x onerror=alert(2)>')
    clock.now = at(C, 17)
    await postback(client, evil, payout="2")
    answer = await client.get("/admin", headers=basic("admin", ADMIN_TOKEN))
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert answer.headers["content-security-policy"] == "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["cache-control"] == "no-store"
    text = answer.text
    assert "<script" not in text.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    page = Page(text)
    assert page.scripts == 0 and page.svg_ids == ["clicks", "conversions"]
    clicks = [bar for bar in page.bars if bar["title"].endswith(" clicks")]
    assert len(clicks) == 30  # 02-03 .. 03-04
    assert [bar["title"] for bar in clicks][::10] == [
        "2026-02-03: 0 clicks",
        "2026-02-13: 0 clicks",
        "2026-02-23: 0 clicks",
    ]
    # one scale from 0 to a round top (8 human clicks on 03-01: ticks 0, 2 ... 8), 168 px high
    assert page.ticks["clicks"][:5] == ["0", "2", "4", "6", "8"]
    heights = {bar["title"].split(":")[0]: float(bar["height"]) for bar in clicks}
    assert {day: h for day, h in heights.items() if h} == {OLD: 168 * 5 / 8, A: 168, B: 168 * 5 / 8, C: 168 * 3 / 8}
    conversions = [bar["title"] for bar in page.bars if bar["title"].endswith(" conversions")]
    assert conversions[-1] == "2026-03-04: 2 conversions"
    assert page.kpis == {
        "Clicks": "21",
        "Unique clicks": "6",
        "Conversions": "13",
        "Revenue": "5.00 EUR 108.75 USD",
        "Cost": "-",
        "Profit": "5.00 EUR 108.75 USD",
        "ROI": "-",
        "CR": "61.90%",
        "EPC": "0.2381 EUR 5.1786 USD",
    }
    assert page.tables["By campaign"] == [
        [
            "campaign",
            "clicks",
            "unique",
            "conv.",
            "approved",
            "pending",
            "rejected",
            "CR %",
            "revenue",
            "cost",
            "profit",
            "ROI %",
            "EPC",
            "CPA",
        ],
        # 02-27's 5 clicks and 100 USD are in the 30 days; so is the XSS click's 2 USD (not unique:
        # the same address and browser as e1 that day). No costs: profit is the payout, no ROI or CPA.
        [
            "spring",
            "18",
            "4",
            "11",
            "10",
            "1",
            "1",
            "61.11",
            "2.00 EUR 104.75 USD",
            "-",
            "2.00 EUR 104.75 USD",
            "-",
            "0.1111 EUR 5.8194 USD",
            "-",
        ],
        ["summer", "3", "2", "2", "2", "0", "0", "66.67", "3.00 EUR 4.00 USD", "-", "3.00 EUR 4.00 USD", "-"]
        + ["1.0000 EUR 1.3333 USD", "-"],
    ]
    # each campaign drills down to its sub1, in the same range and zone
    assert page.links["spring"] == "/admin?from=2026-02-03&to=2026-03-04&tz=UTC&by=sub1&campaign=spring"
    assert page.links["CSV of this table"] == "/api/stats?from=2026-02-03&to=2026-03-04&tz=UTC&by=campaign&format=csv"
    latest = page.tables["Latest conversions"]
    assert latest[0] == ["id", "when", "campaign", "sub1", "event", "status", "payout", "why", "credited by"]
    assert latest[1][1:] == [
        "2026-03-04 17:00:00",
        "spring",
        XSS,
        "conversion",
        "approved",
        "2.00 USD",
        "",
        "its click",
    ]
    assert latest[2][1:] == ["2026-03-04 15:00:00", "spring", "", "conversion", "approved", "0.67 USD", "", "its click"]
    assert int(latest[1][0]) > int(latest[2][0])  # each links to its page (/admin/conversions/<id>)
    assert len(latest) == 1 + 14  # every conversion, newest first (fewer than 20)
    assert [
        "2026-03-04 15:00:00",
        "0190a6b2-7c1d-7abc-8def-0123456789ab",
        "conversion",
        "9.00 USD",
        "1",
    ] in page.tables["Orphans"]
    assert "pending <b>0</b> · failed <b>0</b> · dead <b>0</b> · done <b>0</b>" in text


@pytest.mark.anyio
async def test_admin_form_picks_range_zone_grouping_and_drills_down(client, clock):
    await seed(client, clock)
    auth = basic("admin", ADMIN_TOKEN)
    # New York's 03-01 runs 05:00Z on 03-01 to 05:00Z on 03-02: the 03-01 clicks (09:00Z) are in it
    query = f"from={A}&to={A}&tz=America/New_York&by=campaign&by=sub1&by=&campaign="
    answer = await client.get(f"/admin?{query}", headers=auth)
    assert answer.status_code == 200, answer.text
    page = Page(answer.text)
    assert page.selected == {"by": ["campaign", "sub1", ""], "campaign": [""]}
    assert page.inputs["tz"] == "America/New_York" and page.inputs["from"] == A
    table = page.tables["By campaign, sub1"]
    assert [row[:4] for row in table[1:]] == [
        ["spring", "a", "4", "1"],  # 4 humans (the Googlebot is not counted), 1 unique
        ["spring", "b", "2", "0"],  # b1, b2 (the empty-UA bot is not counted)
        ["summer", "a", "2", "1"],
    ]
    assert "read from the raw rows" in answer.text  # sub1 in another zone than UTC
    # the drill-down link narrows to the row's campaign and sub1 and groups by the next field
    link = page.links["spring"]
    assert link == f"/admin?from={A}&to={A}&tz=America%2FNew_York&by=sub2&campaign=spring&sub1=a"
    deeper = Page((await client.get(link, headers=auth)).text)
    assert [row[:2] for row in deeper.tables["By sub2"][1:]] == [["x", "4"]]
    assert deeper.inputs["sub1"] == "a"  # the filter stays when the form is sent again
    # a mistake is said on the page, over the form as it was sent; the default report below it
    wrong = await client.get("/admin?tz=Mars/Base&by=campaign", headers=auth)
    assert wrong.status_code == 400
    assert "tz: must be an IANA time zone like Europe/Berlin or UTC, got &#x27;Mars/Base&#x27;" in wrong.text
    assert Page(wrong.text).inputs["tz"] == "Mars/Base"
    # what the form has no field for is sent again: the filters (also after a mistake), bots=1,
    # and a campaign no longer in the config stays chosen
    kept = Page((await client.get("/admin?sub1=a&tz=Mars/Base&bots=1", headers=auth)).text)
    assert (kept.inputs["sub1"], kept.inputs["bots"]) == ("a", "1")
    gone = Page((await client.get("/admin?campaign=retired&sub2=x&bots=1", headers=auth)).text)
    assert gone.selected["campaign"] == ["retired"]
    assert (gone.inputs["sub2"], gone.inputs["bots"]) == ("x", "1")


# A sub id as long as a click keeps (256 characters), with no place to break a line.
LONG = "utm_" + "x" * 252
# What test_admin_page_in_headless_chromium measures in Chromium's layout (tests/browser.py's inspect).
LAYOUT = """(() => {
  const shown = (el) => el.getClientRects().length > 0;
  const where = (el) => (el.closest('table')?.previousElementSibling?.textContent || '').slice(0, 40);
  return {
    cut: [...document.querySelectorAll('td, th')].filter(c => shown(c) && c.scrollWidth > c.clientWidth + 1)
      .map(c => where(c) + ' | ' + c.textContent.slice(0, 60) + ' | ' + c.scrollWidth + ' > ' + c.clientWidth),
    wide_tables: [...document.querySelectorAll('table')].filter(t => t.getBoundingClientRect().right > innerWidth + 1)
      .map(t => where(t) + ' ' + Math.round(t.getBoundingClientRect().right)),
    page_width: document.documentElement.scrollWidth,
    window: innerWidth,
    html: document.documentElement.outerHTML,
  };
})()"""


def png_facts(path: Path) -> tuple[int, int, int]:
    """Width, height and how many distinct byte values the image data holds (a blank
    page has two or three)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


@pytest.mark.anyio
@pytest.mark.skipif(
    browser.CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); CI installs it"
)
async def test_admin_page_in_headless_chromium(tmp_path):
    """A real `tinytrack serve`, the data written beforehand by the app on the same
    file at three earlier moments, the page rendered by Chromium."""
    port = free_port()
    config_path = write_config(tmp_path, port, extra=SUMMER)
    now = time.time()
    today = int(now // 86400)
    day = lambda n: tinytrack.day_text(today - n)  # noqa: E731
    moment = lambda n, hour: (today - n) * 86400 + hour * 3600  # noqa: E731
    clock = FakeClock(moment(5, 10))
    app = tinytrack.create_app(tinytrack.load_config(config_path), clock=clock)
    await app.startup()
    try:
        transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://tracker.test") as http:
            alpha = [await click(http, "spring", sub1="alpha") for _ in range(3)]
            clock.now = moment(5, 15)
            await postback(http, alpha[0], payout="2.50")
            clock.now = moment(2, 10)
            beta = [await click(http, "spring", sub1="beta") for _ in range(6)]
            await click(http, "spring", ua=GOOGLEBOT, sub1="beta")
            summer = [await click(http, "summer") for _ in range(2)]
            await postback(http, summer[1], payout="1", currency="EUR")
            clock.now = max(now - 2, today * 86400.0)  # today, a moment ago
            evil = await click(http, "spring", sub1=XSS)
            long = await click(http, "spring", sub1=LONG)
            clock.now += 1
            await postback(http, long, payout="0.10")
            clock.now += 1
            await postback(http, evil, payout="1.25")
            await postback(http, beta[0], payout="9", status="pending")
            await postback(http, "0190a6b2-7c1d-7abc-8def-0123456789ab", expect="orphan", payout="3")
    finally:
        await app.shutdown()

    server = Server(tmp_path, config_path, port).start()
    try:
        with server.client() as http:
            refused = http.get("/admin")
            assert refused.status_code == 401
            assert (
                refused.headers["www-authenticate"] == 'Basic realm="tinytrack"'
            )  # what makes Chromium send the URL's credentials
            served = http.get("/admin", auth=("admin", ADMIN_TOKEN))
            assert (
                served.headers["content-security-policy"]
                == "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
            )
        ARTIFACTS.mkdir(exist_ok=True)
        auth = {"authorization": basic("admin", ADMIN_TOKEN)["authorization"]}
        seen = {}
        for view, query in (("", ""), ("-drilldown", "?by=campaign&by=sub1&by=sub2&tz=America/New_York")):
            for size, (width, height) in (("", (1280, 900)), ("-phone", (390, 844))):
                name = f"admin{view}{size}.png"
                look = partial(
                    browser.inspect,
                    f"{server.url}/admin{query}",
                    LAYOUT,
                    width=width,
                    height=height,
                    headers=auth,
                    screenshot=ARTIFACTS / name,
                )
                seen[name] = await anyio.to_thread.run_sync(look)
    finally:
        code = server.stop()
    assert code == 0, server.output()

    for name, measured in seen.items():
        # Nothing is cut off: no cell's content is wider than its cell, no table wider than the
        # window, and the page needs no sideways scrolling (measured in Chromium's layout).
        assert measured["cut"] == [], (name, measured["cut"])
        assert measured["wide_tables"] == [], (name, measured["wide_tables"])
        assert measured["page_width"] <= measured["window"], name
        assert measured["window"] == (390 if "phone" in name else 1280)
        dom = measured["html"]
        page = Page(dom)
        assert page.scripts == 0 and page.svg_ids == ["clicks", "conversions"]
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
        clicks = [bar["title"] for bar in page.bars if bar["title"].endswith(" clicks")]
        assert len(clicks) == 30
        latest = [cells[2:] for cells in page.tables["Latest conversions"][1:]]
        assert latest == [
            ["spring", "beta", "conversion", "pending", "9.00 USD", "", "its click"],
            ["spring", XSS, "conversion", "approved", "1.25 USD", "", "its click"],
            ["spring", LONG, "conversion", "approved", "0.10 USD", "", "its click"],
            ["summer", "", "conversion", "approved", "1.00 EUR", "", "its click"],
            ["spring", "alpha", "conversion", "approved", "2.50 USD", "", "its click"],
        ]
        if "drilldown" in name:
            table = page.tables["By campaign, sub1, sub2"]
            assert [row[:4] for row in table[1:]] == [
                ["spring", XSS, "(none)", "1"],
                ["spring", "alpha", "(none)", "3"],
                ["spring", "beta", "(none)", "6"],
                ["spring", LONG, "(none)", "1"],
                ["summer", "(none)", "(none)", "2"],
            ]
            continue
        assert {bar["title"] for bar in page.bars} >= {
            f"{day(5)}: 3 clicks",
            f"{day(2)}: 8 clicks",
            f"{day(0)}: 2 clicks",
        }
        assert page.kpis["Clicks"] == "13" and page.kpis["Revenue"] == "1.00 EUR 3.85 USD"
        assert page.tables["By campaign"][1][:8] == ["spring", "11", "3", "4", "3", "1", "0", "36.36"]
        assert page.tables["Orphans"][1][1:] == ["0190a6b2-7c1d-7abc-8def-0123456789ab", "conversion", "3.00 USD", "1"]
    for name in seen:
        width, height, values = png_facts(ARTIFACTS / name)
        assert width == (390 if "phone" in name else 1280) and height >= 844
        assert values > 20, f"{name} looks blank"


# --- /metrics ------------------------------------------------------------------------


def parse_metrics(text: str) -> tuple[list[tuple[str, dict, float]], dict[str, str]]:
    """Samples in order, and each family's TYPE."""
    samples, types = [], {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:\w+="[^"\\\n]*",?)*)\})? (\S+)', line)
        assert match, f"not Prometheus text: {line!r}"
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        samples.append((match[1], labels, float(match[3])))
    return samples, types


def value(samples: list, name: str, **labels: str) -> float:
    found = [v for n, got, v in samples if n == name and got == labels]
    assert len(found) <= 1
    return found[0] if found else 0.0


def histograms(samples: list, name: str) -> dict[tuple, dict]:
    """Per label set (le aside): buckets in order, sum and count; checks the shape."""
    series: dict[tuple, dict] = {}
    for n, labels, v in samples:
        rest = tuple(sorted((k, x) for k, x in labels.items() if k != "le"))
        entry = series.setdefault(rest, {"buckets": [], "sum": None, "count": None})
        if n == f"{name}_bucket":
            entry["buckets"].append((labels["le"], v))
        elif n == f"{name}_sum":
            entry["sum"] = v
        elif n == f"{name}_count":
            entry["count"] = v
    series = {k: e for k, e in series.items() if e["buckets"]}
    for entry in series.values():
        bounds = [le for le, _ in entry["buckets"]]
        counts = [c for _, c in entry["buckets"]]
        assert bounds[-1] == "+Inf"
        assert [float(b) for b in bounds[:-1]] == sorted({float(b) for b in bounds[:-1]})  # strictly rising
        assert counts == sorted(counts)  # cumulative
        assert counts[-1] == entry["count"]
        assert entry["sum"] is not None and entry["sum"] >= 0
    return series


@pytest.mark.anyio
async def test_metrics_counters_and_histograms(client, config):
    def scrape_text(answer: httpx.Response) -> tuple[list, dict]:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse_metrics(answer.text)

    before, types = scrape_text(await client.get("/metrics", headers=BEARER))
    assert types == {
        "tinytrack_clicks_total": "counter",
        "tinytrack_click_cost_invalid_total": "counter",
        "tinytrack_click_uid_invalid_total": "counter",
        "tinytrack_touches_total": "counter",
        "tinytrack_pixel_total": "counter",
        "tinytrack_postback_match_rate": "gauge",
        "tinytrack_postback_refused_rate": "gauge",
        "tinytrack_quarantined_total": "counter",
        "tinytrack_lp_clicks_total": "counter",
        "tinytrack_flags_total": "counter",
        "tinytrack_postbacks_total": "counter",
        "tinytrack_forwards_total": "counter",
        "tinytrack_outbox": "gauge",
        "tinytrack_write_queue": "gauge",
        "tinytrack_database_bytes": "gauge",
        "tinytrack_purged_rows": "gauge",
        "tinytrack_commit_batch_size": "histogram",
        "tinytrack_request_seconds": "histogram",
    }
    humans = [await click(client, "spring", sub1="m") for _ in range(2)]
    await click(client, "spring", ua="")
    await click(client, "spring", ua="Googlebot")
    await click(client, "spring", sub1="m", cost="abc")  # redirected all the same, stored without a cost
    await click(client, "spring", sub1="m", cost="0.05")
    await postback(client, humans[0], payout="1")
    await postback(client, humans[0], expect="duplicate", payout="1")
    await postback(client, humans[1], status="pending")
    await postback(client, humans[1], expect="updated", status="approved")
    await postback(client, "0190a6b2-7c1d-7abc-8def-0123456789ab", expect="orphan")
    assert (
        await client.get("/postback", params={"click_id": humans[1], "token": "wrong-token-123"})
    ).status_code == 401
    assert (
        await client.get("/postback", params={"click_id": humans[1], "token": POSTBACK_TOKEN, "payout": "-1"})
    ).status_code == 400
    after, _ = scrape_text(await client.get("/metrics", headers=basic("prometheus", ADMIN_TOKEN)))

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert (delta("tinytrack_clicks_total", bot="0"), delta("tinytrack_clicks_total", bot="1")) == (4, 2)
    assert delta("tinytrack_click_cost_invalid_total") == 1
    assert {
        r: delta("tinytrack_postbacks_total", result=r)
        for r in ("created", "duplicate", "updated", "orphan", "http_401", "http_400")
    } == {"created": 2, "duplicate": 1, "updated": 1, "orphan": 1, "http_401": 1, "http_400": 1}
    for state in tinytrack.OUTBOX_STATES:  # no campaign forwards here
        assert value(after, "tinytrack_outbox", state=state) == 0
    assert {labels["outcome"] for n, labels, _ in after if n == "tinytrack_forwards_total"} == {
        "done",
        "pending",
        "failed",
        "dead",
    }
    db = Path(config.storage.path)
    assert value(after, "tinytrack_database_bytes") >= db.stat().st_size > 0

    latency_before, latency = (
        histograms(before, "tinytrack_request_seconds"),
        histograms(after, "tinytrack_request_seconds"),
    )
    assert set(latency) == {(("route", "click"),), (("route", "lp_click"),), (("route", "postback"),)}
    assert latency[(("route", "click"),)]["count"] - latency_before[(("route", "click"),)]["count"] == 6
    assert latency[(("route", "postback"),)]["count"] - latency_before[(("route", "postback"),)]["count"] == 7
    assert latency[(("route", "click"),)]["sum"] > 0
    batches_before, batches = (
        histograms(before, "tinytrack_commit_batch_size")[()],
        histograms(after, "tinytrack_commit_batch_size")[()],
    )
    # One request at a time: every commit since held one write (4 clicks, 5 stored postbacks, maybe a purge job).
    written = batches["count"] - batches_before["count"]
    assert written >= 9
    assert batches["sum"] - batches_before["sum"] == written
    assert batches["buckets"][0] == ("1", batches["count"]) and batches_before["buckets"][0][0] == "1"
