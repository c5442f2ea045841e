"""Money (issue 14): what clicks cost, cost models, uploaded spend, unique clicks,
profit, ROI and CPA, currencies and rates, and the {cost} forward macro.

Every expected figure is worked out by hand in the comments next to it, from the
clicks and postbacks the test makes through the real HTTP paths.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, FakeClock, at, client_for, write_config
from test_cli import run

import tinytrack

pytestmark = pytest.mark.anyio

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
OTHER_BROWSER = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Safari/604.1"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
D, NEXT = "2026-11-20", "2026-11-21"  # winter: Berlin is UTC+1, New York UTC-5

CAMPAIGNS = """
[campaigns.cpc]
url = "https://offer.example.com/a?cid={click_id}"
cost_model = "cpc"
cost_value = "0.05"

[campaigns.cpm]
url = "https://offer.example.com/b?cid={click_id}"
cost_model = "cpm"
cost_value = "2.5"

[campaigns.cpa]
url = "https://offer.example.com/c?cid={click_id}"
cost_model = "cpa"
cost_value = "4"

[campaigns.rev]
url = "https://offer.example.com/d?cid={click_id}"
cost_model = "revshare"
cost_value = "40"

[campaigns.botpaid]
url = "https://offer.example.com/e?cid={click_id}"
cost_model = "cpc"
cost_value = "0.10"
bot_cost = true

[campaigns.eur]
url = "https://offer.example.com/f?cid={click_id}"
cost_model = "cpc"
cost_value = "0.10"
cost_currency = "EUR"

[campaigns.capped]
url = "https://offer.example.com/g?cid={click_id}"
max_click_cost = "1"
"""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(at(D))


@pytest.fixture
async def app(make_app):
    return await make_app(CAMPAIGNS)


@pytest.fixture
async def client(app):
    async with client_for(app) as http:
        yield http


async def click(client: httpx.AsyncClient, campaign: str, ua: str = HUMAN, **params: str) -> str:
    answer = await client.get(f"/c/{campaign}", params=params, headers={"user-agent": ua})
    assert answer.status_code == 302, answer.text
    return answer.headers["location"].split("cid=")[1].split("&")[0]


async def postback(client: httpx.AsyncClient, click_id: str, expect: str = "created", **fields: str) -> None:
    answer = await client.get("/postback", params={"click_id": click_id, "token": POSTBACK_TOKEN, **fields})
    assert (answer.status_code, answer.json().get("status")) == (200, expect), answer.text


async def stats(client: httpx.AsyncClient, query: str) -> list[dict]:
    answer = await client.get(f"/api/stats?{query}", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return answer.json()["rows"]


async def figures(client: httpx.AsyncClient, campaign: str, query: str = f"from={D}&to={NEXT}") -> dict:
    """The campaign's row of a by=campaign report, its money figures only."""
    rows = await stats(client, f"{query}&campaign={campaign}")
    assert len(rows) == 1, rows
    return {k: rows[0][k] for k in ("clicks", "conversions", "payout", "cost", "profit", "roi", "cpa")}


def stored_costs(app: tinytrack.TinyTrack) -> list[tuple]:
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        return con.execute("SELECT campaign, cost, cost_currency FROM clicks ORDER BY id").fetchall()


# --- cost models, each with exact profit and ROI -----------------------------------


async def test_cpc_a_clicks_own_cost_wins_and_bots_cost_nothing(client):
    ids = [await click(client, "cpc") for _ in range(6)]  # 6 x 0.05 (the model)
    ids.append(await click(client, "cpc", cost="0.2"))  # its own cost wins: 0.20
    await click(client, "cpc", ua=GOOGLEBOT)  # bots cost nothing
    await click(client, "cpc", ua="")
    await postback(client, ids[0], payout="1.50")
    await postback(client, ids[1], payout="0.75")
    await postback(client, ids[2], payout="3", status="pending")
    # cost 0.30 + 0.20 = 0.50; approved payout 2.25; profit 1.75; ROI 1.75 / 0.50 = 350%;
    # CPA 0.50 / 3 conversions (approved + pending) = 0.1666.. -> 0.1667.
    assert await figures(client, "cpc") == {
        "clicks": 7,
        "conversions": 3,
        "payout": {"USD": "2.25"},
        "cost": {"USD": "0.50"},
        "profit": {"USD": "1.75"},
        "roi": {"USD": "350.00"},
        "cpa": {"USD": "0.1667"},
    }


async def test_cpm_is_a_thousandth_per_click_exactly(client):
    ids = [await click(client, "cpm") for _ in range(8)]  # 2.5 per 1,000: 0.0025 each, 0.02
    await postback(client, ids[0], payout="0.01")
    # profit 0.01 - 0.02 = -0.01; ROI -0.01 / 0.02 = -50%; CPA 0.02 / 1.
    assert await figures(client, "cpm") == {
        "clicks": 8,
        "conversions": 1,
        "payout": {"USD": "0.01"},
        "cost": {"USD": "0.02"},
        "profit": {"USD": "-0.01"},
        "roi": {"USD": "-50.00"},
        "cpa": {"USD": "0.0200"},
    }


async def test_cpa_costs_each_approved_conversion_while_it_is_approved(client):
    ids = [await click(client, "cpa") for _ in range(3)]
    await postback(client, ids[0], payout="10")  # approved: 4
    await postback(client, ids[1], payout="10", status="pending")  # pending: nothing yet
    await postback(client, ids[2], payout="10")  # approved: 4
    assert (await figures(client, "cpa"))["cost"] == {"USD": "8.00"}
    await postback(client, ids[1], expect="updated", status="approved")  # now 4 more
    await postback(client, ids[2], expect="updated", status="reversed")  # and 4 less
    # cost 8; approved payout 20; profit 12; ROI 150%; CPA 8 / 2.
    assert await figures(client, "cpa") == {
        "clicks": 3,
        "conversions": 2,
        "payout": {"USD": "20.00"},
        "cost": {"USD": "8.00"},
        "profit": {"USD": "12.00"},
        "roi": {"USD": "150.00"},
        "cpa": {"USD": "4.0000"},
    }


async def test_revshare_is_a_share_of_the_approved_payout_rounded_half_even(client):
    ids = [await click(client, "rev") for _ in range(4)]
    await postback(client, ids[0], payout="12.34")  # 40%: 4.936
    await postback(client, ids[1], payout="0.000003")  # 0.0000012 -> 0.000001
    await postback(client, ids[2], payout="5", status="pending")
    await postback(client, ids[2], expect="updated", status="approved", payout="6")  # its new payout: 2.40
    await postback(client, ids[3], payout="0.000005", currency="EUR")  # 0.000002 EUR, in the payout's currency
    # USD cost 4.936 + 0.000001 + 2.4 = 7.336001; payout 12.34 + 0.000003 + 6 = 18.340003;
    # profit 11.004002; ROI 11.004002 / 7.336001 = 150.0000... -> 150.00; CPA 7.336001 / 4.
    # EUR: payout 0.000005, cost 0.000002, profit 0.000003, ROI 150.00.
    assert await figures(client, "rev") == {
        "clicks": 4,
        "conversions": 4,
        "payout": {"EUR": "0.000005", "USD": "18.340003"},
        "cost": {"EUR": "0.000002", "USD": "7.336001"},
        "profit": {"EUR": "0.000003", "USD": "11.004002"},
        "roi": {"EUR": "150.00", "USD": "150.00"},
        "cpa": {"EUR": "0.0000", "USD": "1.8340"},
    }


async def test_bot_cost_makes_bot_clicks_cost_too(client):
    await click(client, "botpaid")
    await click(client, "botpaid")
    await click(client, "botpaid", ua=GOOGLEBOT)
    # 3 x 0.10; nothing converted: profit -0.30, ROI -100%, no CPA (no conversions).
    assert await figures(client, "botpaid") == {
        "clicks": 2,
        "conversions": 0,
        "payout": {},
        "cost": {"USD": "0.30"},
        "profit": {"USD": "-0.30"},
        "roi": {"USD": "-100.00"},
        "cpa": {"USD": None},
    }


# --- a click's own cost ---------------------------------------------------------------


@pytest.mark.parametrize("bad", ["abc", "-1", "1e3", "0.1234567", "1,50", "{cost}", "１"])
async def test_a_bad_cost_is_redirected_and_stored_without_it(app, client, bad):
    answer = await client.get("/c/spring", params={"cost": bad, "sub1": "z"}, headers={"user-agent": HUMAN})
    assert answer.status_code == 302
    assert answer.headers["location"].startswith("https://offer.example.com/lp?cid=")
    assert "cost" not in answer.headers["location"]  # never passed on to the offer
    assert stored_costs(app) == [("spring", None, None)]
    assert app.bad_costs == 1
    assert (await figures(client, "spring"))["cost"] == {}


async def test_cost_aliases_and_blank_and_cap(app, client):
    await click(client, "spring", cpc="0.125")
    await click(client, "spring", bid="2")
    await click(client, "spring", cost="")  # the source left its macro blank: no cost, not an error
    await click(client, "capped", cost="1")  # max_click_cost = 1: kept
    await click(client, "capped", cost="1.000001")  # over it: dropped, counted
    await click(client, "eur", cost="0.5")  # an EUR campaign's own cost is in EUR
    assert stored_costs(app) == [
        ("spring", 125_000, "USD"),
        ("spring", 2_000_000, "USD"),
        ("spring", None, None),
        ("capped", 1_000_000, "USD"),
        ("capped", None, None),
        ("eur", 500_000, "EUR"),
    ]
    assert app.bad_costs == 1
    assert (await figures(client, "spring"))["cost"] == {"USD": "2.125"}


# --- unique clicks ----------------------------------------------------------------


async def test_unique_clicks_exact_over_a_day_boundary_and_a_restart(make_app, clock):
    """(address, User-Agent, campaign) -> unique that UTC day or not, worked out by hand."""
    app = await make_app(CAMPAIGNS)
    table = [
        # day, address, user agent, campaign, sub1, unique?
        (D, "198.51.100.1", HUMAN, "spring", "a", True),
        (D, "198.51.100.1", HUMAN, "spring", "b", False),  # the same visitor again
        (D, "198.51.100.1", OTHER_BROWSER, "spring", "b", True),  # another browser
        (D, "198.51.100.2", HUMAN, "spring", "b", True),  # another address
        (D, "198.51.100.3", GOOGLEBOT, "spring", "b", False),  # a bot is never a unique click
        (D, "198.51.100.1", HUMAN, "cpc", "a", True),  # another campaign
        (NEXT, "198.51.100.1", HUMAN, "spring", "b", True),  # a new UTC day
        (NEXT, "198.51.100.1", HUMAN, "spring", "a", False),
        (NEXT, "198.51.100.2", HUMAN, "spring", "a", True),
    ]
    minute = 0
    for day, address, ua, campaign, sub1, _ in table:
        clock.now = at(day, 0, minute) if day == NEXT else at(day, 23, 50 + minute)
        minute += 1
        async with client_for(app, address) as http:
            await click(http, campaign, ua, sub1=sub1)
    want_by_sub1 = {}
    for day, _, _, campaign, sub1, unique in table:
        if campaign == "spring":
            want_by_sub1[day, sub1] = want_by_sub1.get((day, sub1), 0) + unique
    assert want_by_sub1 == {(D, "a"): 1, (D, "b"): 2, (NEXT, "b"): 1, (NEXT, "a"): 1}

    async def by_sub1(app: tinytrack.TinyTrack) -> dict:
        async with client_for(app) as http:
            got = {}
            for day in (D, NEXT):
                for row in await stats(http, f"from={day}&to={day}&by=sub1&campaign=spring"):
                    got[day, row["sub1"]] = row["unique_clicks"]
            return got

    assert await by_sub1(app) == want_by_sub1
    async with client_for(app) as http:
        assert [r["unique_clicks"] for r in await stats(http, f"from={D}&to={NEXT}&by=day")] == [4, 2]
        assert [r["unique_clicks"] for r in await stats(http, f"from={D}&to={NEXT}&by=campaign")] == [1, 5]
        # sub2 reads the raw rows: the same first clicks
        assert (await stats(http, f"from={D}&to={D}&by=sub2&campaign=spring"))[0]["unique_clicks"] == 3

    # A restart: the new process knows today's visitors from the stored clicks.
    await app.shutdown()
    again = await make_app(CAMPAIGNS)
    clock.now = at(NEXT, 1)
    async with client_for(again, "198.51.100.1") as http:
        await click(http, "spring", HUMAN, sub1="a")  # seen at 00:06: not unique
    async with client_for(again, "198.51.100.9") as http:
        await click(http, "spring", HUMAN, sub1="a")  # new: unique
    assert await by_sub1(again) == {**want_by_sub1, (NEXT, "a"): 2}


async def test_unique_clicks_past_the_memory_cap_go_through_the_table(make_app, clock, monkeypatch):
    """The same answers when the day's keys outgrow memory (here after 2 keys)."""
    monkeypatch.setattr(tinytrack, "UNIQUE_MEMORY_KEYS", 2)
    app = await make_app(CAMPAIGNS)
    visits = ["1", "2", "1", "3", "4", "3", "2", "5", "4"]  # 5 distinct addresses
    for i, last in enumerate(visits):
        clock.now = at(D, 10, i)
        async with client_for(app, f"198.51.100.{last}") as http:
            await click(http, "spring")
    async with client_for(app) as http:
        assert (await stats(http, f"from={D}&to={D}"))[0]["unique_clicks"] == 5
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        assert con.execute("SELECT count(*) FROM click_uniques").fetchone() == (3,)  # 3, 4 and 5
    await app.shutdown()
    again = await make_app(CAMPAIGNS)  # memory rebuilt with 1 and 2; the table kept the rest
    for last in ("1", "4", "6"):
        async with client_for(again, f"198.51.100.{last}") as http:
            await click(http, "spring")
    async with client_for(again) as http:
        assert (await stats(http, f"from={D}&to={D}"))[0]["unique_clicks"] == 6  # only 6 was new


async def test_the_migration_backfills_unique_clicks_from_the_kept_clicks(tmp_path: Path):
    """A version 3 file (before money): its days' unique clicks come from its raw clicks."""
    path = str(tmp_path / "old.db")
    with closing(sqlite3.connect(path, isolation_level=None)) as con:
        for number, script in enumerate(tinytrack.SCHEMA[:3], start=1):
            con.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
        day_ms = 20_000 * 86_400_000
        clicks = [  # (ms, sub1, ip, ua, bot)
            (day_ms + 1, "a", "203.0.113.1", "UA1", 0),  # unique, under a
            (day_ms + 2, "b", "203.0.113.1", "UA1", 0),  # seen
            (day_ms + 3, "b", "203.0.113.1", "UA2", 0),  # unique, under b
            (day_ms + 4, "b", "203.0.113.9", "bot", 1),  # a bot
            (day_ms + 86_400_000, "b", "203.0.113.1", "UA1", 0),  # the next day: unique, under b
        ]
        for i, (ms, sub1, ip, ua, bot) in enumerate(clicks):
            con.execute(
                "INSERT INTO clicks (id, ts, campaign, sub1, ip, ua, bot) VALUES (?, ?, 'spring', ?, ?, ?, ?)",
                (ms.to_bytes(6, "big") + bytes([0x70, i]) + bytes(8), ms, sub1, ip, ua, bot),
            )
        con.execute(
            """INSERT INTO daily_clicks SELECT ts / 86400000, campaign, sub1, sum(bot = 0), sum(bot)
               FROM clicks GROUP BY 1, 2, 3"""
        )
        con.execute("INSERT INTO daily_clicks VALUES (19990, 'spring', 'gone', 5, 0)")  # purged raw clicks
    with closing(tinytrack.open_database(path)) as con:
        got = con.execute("SELECT day, sub1, clicks, unique_clicks FROM daily_clicks ORDER BY 1, 2").fetchall()
    assert got == [(19990, "gone", 5, 0), (20000, "a", 1, 1), (20000, "b", 2, 1), (20001, "b", 1, 1)]


# --- uploaded costs -----------------------------------------------------------------


async def put_costs(client: httpx.AsyncClient, rows: list[dict], query: str = "") -> httpx.Response:
    return await client.put(f"/api/costs{query}", json={"rows": rows}, headers=ADMIN)


async def sub1_costs(client: httpx.AsyncClient, day: str, campaign: str = "cpc") -> dict:
    rows = await stats(client, f"from={day}&to={day}&by=sub1&campaign={campaign}")
    return {row["sub1"]: row["cost"] for row in rows}


async def test_an_upload_replaces_a_keys_click_costs_and_is_idempotent(client):
    for sub1, n in (("z1", 3), ("z2", 1)):
        for _ in range(n):
            await click(client, "cpc", sub1=sub1)
    assert await sub1_costs(client, D) == {"z1": {"USD": "0.15"}, "z2": {"USD": "0.05"}}
    row = {"day": D, "campaign": "cpc", "sub1": "z1", "cost": "1.00"}
    first = await put_costs(client, [row])
    assert (first.status_code, first.json()) == (200, {"rows": 1, "replaced": 0})
    assert await sub1_costs(client, D) == {"z1": {"USD": "1.00"}, "z2": {"USD": "0.05"}}  # z2 keeps its clicks'
    again = await put_costs(client, [row])
    assert again.json() == {"rows": 1, "replaced": 1}
    assert await sub1_costs(client, D) == {"z1": {"USD": "1.00"}, "z2": {"USD": "0.05"}}  # the same totals
    # Clicks after the upload don't change an uploaded key's cost.
    await click(client, "cpc", sub1="z1")
    assert await sub1_costs(client, D) == {"z1": {"USD": "1.00"}, "z2": {"USD": "0.05"}}
    # A new value for the key replaces the old one.
    await put_costs(client, [{**row, "cost": "0.40"}])
    assert (await figures(client, "cpc", f"from={D}&to={D}"))["cost"] == {"USD": "0.45"}


async def test_a_whole_day_row_is_spread_by_clicks_exactly(client):
    for sub1, n in (("z1", 3), ("z2", 1), ("z3", 0)):
        for _ in range(n):
            await click(client, "cpc", sub1=sub1)
    await click(client, "cpc", ua=GOOGLEBOT, sub1="z3")  # bots don't weigh while humans clicked
    await put_costs(client, [{"day": D, "campaign": "cpc", "sub1": "z1", "cost": "9"}])
    # 0.00001 over clicks 3 : 1 : 0 = 7.5 : 2.5 : 0 micro-units -> 7 and 2, the unit left
    # goes to the larger remainder, a tie (0.5 each) to the first: z1 8, z2 2, z3 0.
    answer = await put_costs(client, [{"day": D, "campaign": "cpc", "cost": "0.00001"}])
    assert answer.json() == {"rows": 1, "replaced": 1}  # it replaced the day's z1 upload
    want = {"z1": {"USD": "0.000008"}, "z2": {"USD": "0.000002"}, "z3": {"USD": "0.00"}}
    assert await sub1_costs(client, D) == want
    assert (await put_costs(client, [{"day": D, "campaign": "cpc", "cost": "0.00001"}])).json()["replaced"] == 1
    assert await sub1_costs(client, D) == want  # sent twice: the same
    assert (await figures(client, "cpc", f"from={D}&to={D}"))["cost"] == {"USD": "0.00001"}


async def test_a_whole_day_row_with_no_clicks_lands_on_sub1_blank(client):
    await put_costs(client, [{"day": D, "campaign": "cpa", "cost": "7.5", "currency": "eur"}])
    assert await sub1_costs(client, D, "cpa") == {"": {"EUR": "7.50"}}


async def test_an_upload_in_a_time_zone_lands_on_the_utc_days_it_covers(client):
    # Berlin (UTC+1): its 2026-11-20 is 11-19 23:00Z to 11-20 23:00Z: 1 h and 23 h of 24.
    await put_costs(client, [{"day": D, "campaign": "cpc", "sub1": "z", "cost": "24"}], "?tz=Europe/Berlin")
    assert await sub1_costs(client, "2026-11-19") == {"z": {"USD": "1.00"}}
    assert await sub1_costs(client, D) == {"z": {"USD": "23.00"}}
    # New York (UTC-5): its 11-21 is 11-21 05:00Z to 11-22 05:00Z: 19 h and 5 h.
    await put_costs(client, [{"day": NEXT, "campaign": "cpc", "sub1": "z", "cost": "24"}], "?tz=America/New_York")
    assert await sub1_costs(client, NEXT) == {"z": {"USD": "19.00"}}
    assert await sub1_costs(client, "2026-11-22") == {"z": {"USD": "5.00"}}
    # Re-sent in UTC, the key's Berlin upload is replaced: 11-19 loses its hour.
    answer = await put_costs(client, [{"day": D, "campaign": "cpc", "sub1": "z", "cost": "24"}])
    assert answer.json() == {"rows": 1, "replaced": 1}
    assert await sub1_costs(client, "2026-11-19") == {}
    assert await sub1_costs(client, D) == {"z": {"USD": "24.00"}}


async def test_a_daylight_saving_day_has_23_hours(make_app, clock):
    clock.now = at("2026-03-29")
    app = await make_app(CAMPAIGNS)
    async with client_for(app) as http:
        # Berlin's 2026-03-29: 03-28 23:00Z to 03-29 22:00Z (clocks go forward): 1 h and 22 h of 23.
        await put_costs(
            http, [{"day": "2026-03-29", "campaign": "cpc", "sub1": "z", "cost": "23"}], "?tz=Europe/Berlin"
        )
        assert await sub1_costs(http, "2026-03-28") == {"z": {"USD": "1.00"}}
        assert await sub1_costs(http, "2026-03-29") == {"z": {"USD": "22.00"}}


@pytest.mark.parametrize(
    ("rows", "query", "message"),
    [
        (
            [{"day": D, "campaign": "cpc", "cost": "1"}, {"day": D, "campaign": "cpc", "cost": "x"}],
            "",
            "rows[1].cost: must be a decimal >= 0 with at most 6 decimals, got 'x'",
        ),
        ([{"day": D, "campaign": "nope", "cost": "1"}], "", "rows[0].campaign: no campaign 'nope' in the config"),
        (
            [{"day": "20-11-2026", "campaign": "cpc", "cost": "1"}],
            "",
            "rows[0].day: must be a date as YYYY-MM-DD, got '20-11-2026'",
        ),
        (
            [{"day": "2026-11-22", "campaign": "cpc", "cost": "1"}],
            "",
            "rows[0].day: must be from 2000-01-01 to 2026-11-21, got 2026-11-22",
        ),
        ([{"campaign": "cpc", "cost": "1"}], "", "rows[0].day: is required"),
        (
            [{"day": D, "campaign": "cpc", "cost": "1", "clicks": 3}],
            "",
            "rows[0].clicks: unknown field; known: day, campaign, sub1, cost, currency",
        ),
        (
            [{"day": D, "campaign": "cpc", "cost": "1", "currency": "dollars"}],
            "",
            "rows[0].currency: must be a three-letter ISO 4217 code, got 'dollars'",
        ),
        (
            [{"day": D, "campaign": "cpc", "cost": True}],
            "",
            "rows[0].cost: must be a string or a number, got a boolean",
        ),
        (["x"], "", "rows[0]: must be an object with day, campaign, cost (sub1, currency optional)"),
        (
            [{"day": D, "campaign": "cpc", "cost": "1"}, {"day": D, "campaign": "cpc", "sub1": "z", "cost": "1"}],
            "",
            "rows[1].sub1: campaign cpc on 2026-11-20 has rows with and without sub1: a row without sub1 is the whole day's cost, so send either that or one row per sub1",
        ),
        (
            [
                {"day": D, "campaign": "cpc", "sub1": "z", "cost": "1"},
                {"day": D, "campaign": "cpc", "sub1": "z", "cost": "1", "currency": "EUR"},
            ],
            "",
            "rows[1].currency: EUR, but an earlier row of the same key said USD",
        ),
        (
            [{"day": D, "campaign": "cpc", "cost": "1"}],
            "?tz=Mars/Olympus",
            "tz: must be an IANA time zone like Europe/Berlin or UTC, got 'Mars/Olympus'",
        ),
        (
            [{"day": D, "campaign": "cpc", "cost": "1"}],
            "?tz=../../etc/passwd",
            "tz: must be an IANA time zone like Europe/Berlin or UTC, got '../../etc/passwd'",
        ),
    ],
)
async def test_a_bad_upload_names_the_row_and_field_and_writes_nothing(client, rows, query, message):
    await click(client, "cpc", sub1="z")
    before = await stats(client, f"from=2026-11-19&to={NEXT}&by=sub1")
    answer = await put_costs(client, rows, query)
    assert (answer.status_code, answer.json()) == (400, {"error": message})
    assert await stats(client, f"from=2026-11-19&to={NEXT}&by=sub1") == before


async def test_the_upload_endpoint_wants_the_admin_token_and_json_or_csv(client):
    body = {"rows": [{"day": D, "campaign": "cpc", "cost": "1"}]}
    assert (await client.put("/api/costs", json=body)).status_code == 401
    assert (await client.get("/api/costs", headers=ADMIN)).status_code == 405
    wrong = await client.put("/api/costs", content=b"x", headers={**ADMIN, "content-type": "text/plain"})
    assert (wrong.status_code, wrong.json()) == (415, {"error": "content-type: must be application/json or text/csv"})
    bad_json = await client.put("/api/costs", content=b"{", headers={**ADMIN, "content-type": "application/json"})
    assert (bad_json.status_code, bad_json.json()) == (400, {"error": "body: invalid JSON"})
    shape = await client.put("/api/costs", json=[1], headers=ADMIN)
    assert shape.json() == {"error": 'body: must be {"rows": [...]}'}
    big = await client.put(
        "/api/costs", content=b"x", headers={**ADMIN, "content-type": "text/csv", "content-length": str(2**30)}
    )
    assert big.status_code == 413
    csv_body = f"day,campaign,sub1,cost\n{D},cpc,z,2.5\n{D},cpc,y,0.5\n".encode()
    answer = await client.put("/api/costs", content=csv_body, headers={**ADMIN, "content-type": "text/csv"})
    assert answer.json() == {"rows": 2, "replaced": 0}
    assert await sub1_costs(client, D) == {"y": {"USD": "0.50"}, "z": {"USD": "2.50"}}
    bad_csv = await client.put(
        "/api/costs",
        content=f"day,campaign,cost\n{D},cpc,1\n{D},cpc,-2\n".encode(),
        headers={**ADMIN, "content-type": "text/csv"},
    )
    assert bad_csv.json() == {"error": "line 3, cost: must be a decimal >= 0 with at most 6 decimals, got '-2'"}


async def test_costs_import_command_beside_the_running_app(app, client, tmp_path: Path):
    for _ in range(2):
        await click(client, "cpc", sub1="z")
    config = str(tmp_path / "config.toml")
    report = tmp_path / "spend.csv"
    report.write_text(f"\ufeffday,campaign,sub1,cost,currency\n{D},cpc,z,3.00,USD\n\n{D},eur,,1.10,EUR\n")
    dry = run("costs", "import", str(report), "-c", config, "--dry-run", cwd=tmp_path)
    assert (dry.returncode, dry.stdout) == (0, f"{report}: 2 rows are valid (2 keys); nothing written (--dry-run)\n")
    assert await sub1_costs(client, D) == {"z": {"USD": "0.10"}}
    done = run("costs", "import", str(report), "-c", config, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"{report}: 2 rows stored (2 keys, days in UTC); 0 replaced an earlier upload\n"
    assert await sub1_costs(client, D) == {"z": {"USD": "3.00"}}
    assert await sub1_costs(client, D, "eur") == {"": {"EUR": "1.10"}}
    berlin = run("costs", "import", str(report), "-c", config, "--tz", "Europe/Berlin", cwd=tmp_path)
    assert berlin.stdout.endswith("2 rows stored (2 keys, days in Europe/Berlin); 2 replaced an earlier upload\n")
    assert await sub1_costs(client, "2026-11-19") == {"z": {"USD": "0.125"}}  # 3.00 / 24
    bad = tmp_path / "bad.csv"
    bad.write_text(f"day,campaign,cost\n{D},cpc,1\n{D},nope,1\n")
    refused = run("costs", "import", str(bad), "-c", config, cwd=tmp_path)
    assert (refused.returncode, refused.stderr) == (
        1,
        f"tinytrack: {bad}: line 3, campaign: no campaign 'nope' in the config\n",
    )
    header = tmp_path / "header.csv"
    header.write_text("day,campaign,spend\n")
    refused = run("costs", "import", str(header), "-c", config, cwd=tmp_path)
    assert (
        refused.stderr
        == f"tinytrack: {header}: line 1, column 'spend': unknown; the header is day,campaign,sub1,cost,currency\n"
    )
    assert await sub1_costs(client, D) == {"z": {"USD": "2.875"}}  # nothing of the bad files: 3 - 0.125


# --- reports: currencies, rates, purged days --------------------------------------------


async def test_currencies_are_kept_apart_and_rates_convert_exactly(make_app, tmp_path: Path, clock):
    app = await make_app(CAMPAIGNS)
    async with client_for(app) as http:
        ids = [await click(http, "eur") for _ in range(3)]  # 3 x 0.10 EUR
        await postback(http, ids[0], payout="2")  # USD
        await postback(http, ids[1], payout="1", currency="EUR")
        await postback(http, ids[2], payout="5", currency="GBP")
        # Apart: USD profit 2, EUR 1 - 0.30 = 0.70 (ROI 233.33..%), GBP 5.
        assert await figures(http, "eur") == {
            "clicks": 3,
            "conversions": 3,
            "payout": {"EUR": "1.00", "GBP": "5.00", "USD": "2.00"},
            "cost": {"EUR": "0.30"},
            "profit": {"EUR": "0.70", "GBP": "5.00", "USD": "2.00"},
            "roi": {"EUR": "233.33", "GBP": None, "USD": None},
            "cpa": {"EUR": "0.1000"},
        }
    await app.shutdown()
    converted = await make_app(CAMPAIGNS + '\n[money]\nrates = { EUR = "1.08", JPY = "0.0066" }\n')
    async with client_for(converted) as http:
        answer = (await http.get(f"/api/stats?from={D}&to={D}&campaign=eur", headers=ADMIN)).json()
        # USD: payout 2 + 1 x 1.08 = 3.08; cost 0.30 x 1.08 = 0.324; profit 2.756; ROI 850.62%
        # (2.756 / 0.324 = 8.50617..); GBP has no rate: apart, and named.
        assert answer["currency"] == "USD" and answer["rates"] == {"EUR": "1.08", "JPY": "0.0066"}
        assert answer["unconverted"] == ["GBP"]
        row = answer["rows"][0]
        assert {k: row[k] for k in ("payout", "cost", "profit", "roi")} == {
            "payout": {"GBP": "5.00", "USD": "3.08"},
            "cost": {"USD": "0.324"},
            "profit": {"GBP": "5.00", "USD": "2.756"},
            "roi": {"GBP": None, "USD": "850.62"},
        }
        apart = (await http.get(f"/api/stats?from={D}&to={D}&campaign=eur&convert=0", headers=ADMIN)).json()
        assert apart["rows"][0]["cost"] == {"EUR": "0.30"} and "currency" not in apart
    table = run("stats", "-c", str(tmp_path / "config.toml"), "--from", D, "--to", D, "--campaign", "eur", cwd=tmp_path)
    assert table.stdout.splitlines()[-2:] == [
        "money in USD (1 EUR = 1.08 USD, 1 JPY = 0.0066 USD)",
        "not converted, no rate in [money] rates: GBP",
    ]


async def test_money_survives_the_purge_of_raw_rows(make_app, clock):
    app = await make_app(CAMPAIGNS, retention={"clicks_days": 1, "conversions_days": 1})
    async with client_for(app) as http:
        ids = [await click(http, "cpc", sub1="z") for _ in range(4)]  # 0.20
        await click(http, "cpc", sub1="y", cost="0.3")
        cpa = [await click(http, "cpa") for _ in range(2)]
        await postback(http, ids[0], payout="1.25")
        await postback(http, cpa[0], payout="10")  # costs 4
        await postback(http, cpa[1], payout="10", status="pending")
        await put_costs(http, [{"day": D, "campaign": "cpc", "sub1": "y", "cost": "0.45"}])
        want = {
            # cpc: 0.20 (z's clicks) + 0.45 (y uploaded); 1.25 - 0.65 = 0.60; ROI 92.31% (0.6 / 0.65)
            "cpc": {
                "payout": {"USD": "1.25"},
                "cost": {"USD": "0.65"},
                "profit": {"USD": "0.60"},
                "roi": {"USD": "92.31"},
            },
            # cpa: 10 - 4 = 6; ROI 150%
            "cpa": {
                "payout": {"USD": "10.00"},
                "cost": {"USD": "4.00"},
                "profit": {"USD": "6.00"},
                "roi": {"USD": "150.00"},
            },
        }

        async def money() -> dict:
            rows = await stats(http, f"from={D}&to={D}")
            return {r["campaign"]: {k: r[k] for k in ("payout", "cost", "profit", "roi")} for r in rows}

        assert await money() == want
        await app.purger.stop()  # its start-up pass must not run on into the moved clock
        clock.now = at("2026-11-23")
        done = await app.purger.run_once()
        assert done["clicks"] == 7 and done["conversions"] == 3
        assert await money() == want  # from the daily totals


# --- the {cost} forward macro, config, /admin -------------------------------------------


async def test_the_cost_macro_tells_the_source_what_the_conversion_cost(make_app, clock):
    extra = CAMPAIGNS.replace(
        'cost_value = "0.05"',
        'cost_value = "0.05"\npostback_url = "https://source.example/pb?cost={cost}&p={payout}"',
        1,
    ).replace('cost_value = "4"', 'cost_value = "4"\npostback_url = "https://source.example/pb?cost={cost}"', 1)
    app = await make_app(extra)
    async with client_for(app) as http:
        own = await click(http, "cpc", cost="0.0125")
        model = await click(http, "cpc")
        per_conversion = await click(http, "cpa", cost="0.5")  # cpa: the conversion's cost is its 4
        await postback(http, own, payout="2")
        await postback(http, model, payout="2")
        await postback(http, per_conversion, payout="9")
        outbox = (await http.get("/api/outbox", headers=ADMIN)).json()["rows"]
    assert [row["url"] for row in outbox] == [
        "https://source.example/pb?cost=0.0125&p=2.00",
        "https://source.example/pb?cost=0.05&p=2.00",
        "https://source.example/pb?cost=4.00",
    ]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            'cost_model = "cpx"\ncost_value = "1"',
            "campaigns.m.cost_model: must be one of cpc, cpm, cpa, revshare, got 'cpx'",
        ),
        ('cost_model = "cpc"', "campaigns.m.cost_value: is required with cost_model = 'cpc'"),
        ('cost_value = "1"', "campaigns.m.cost_value: needs a cost_model (cpc, cpm, cpa or revshare)"),
        (
            'cost_model = "cpc"\ncost_value = "-1"',
            "campaigns.m.cost_value: must be a decimal >= 0 with at most 6 decimals, got '-1'",
        ),
        (
            'cost_model = "cpm"\ncost_value = "1.2345"',
            "campaigns.m.cost_value: must be a decimal >= 0 with at most 3 decimals, got '1.2345'",
        ),
        (
            'cost_model = "revshare"\ncost_value = "101"',
            "campaigns.m.cost_value: is a percent of the payout: at most 100",
        ),
        (
            'cost_model = "cpc"\ncost_value = true',
            "campaigns.m.cost_value: must be a decimal, like \"0.05\", got 'True'",
        ),
        ('cost_currency = "euro"', "campaigns.m.cost_currency: must be a three-letter ISO 4217 code, got 'euro'"),
        (
            'max_click_cost = "2000000"',
            "campaigns.m.max_click_cost: must be a decimal >= 0 with at most 6 decimals, got '2000000'",
        ),
        ('bot_cost = "yes"', "campaigns.m.bot_cost: must be true or false, got 'yes'"),
        # At most 1,000,000 a click or a conversion: no real traffic takes a day's total past 64 bits.
        (
            'cost_model = "cpa"\ncost_value = "1000000.01"',
            "campaigns.m.cost_value: must be a decimal >= 0 with at most 6 decimals, got '1000000.01'",
        ),
    ],
)
def test_bad_cost_keys_name_the_key(tmp_path: Path, toml: str, message: str):
    path = write_config(tmp_path, extra=f'\n[campaigns.m]\nurl = "https://offer.example.com/"\n{toml}\n')
    with pytest.raises(tinytrack.ConfigError) as caught:
        tinytrack.load_config(path)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            'rates = { EUR = "x" }',
            "money.rates.EUR: must be a decimal > 0 with at most 12 decimals, like \"1.08\", got 'x'",
        ),
        (
            'rates = { EUR = "0" }',
            "money.rates.EUR: must be a decimal > 0 with at most 12 decimals, like \"1.08\", got '0'",
        ),
        ('rates = { EURO = "1" }', "money.rates.EURO: must be named by a three-letter ISO 4217 code"),
        (
            'report_currency = "EUR"\nrates = { EUR = "2" }',
            "money.rates.EUR: is the report currency: its rate is 1, got 2",
        ),
        ('report_currency = "12"', "money.report_currency: must be a three-letter ISO 4217 code, got '12'"),
        ("rate = 1", "money.rate: unknown key"),
    ],
)
def test_bad_money_keys_name_the_key(tmp_path: Path, toml: str, message: str):
    path = write_config(tmp_path, extra=f"\n[money]\n{toml}\n")
    with pytest.raises(tinytrack.ConfigError) as caught:
        tinytrack.load_config(path)
    assert str(caught.value) == message


def test_money_config_reads_floats_exactly_and_defaults_the_report_currency(tmp_path: Path):
    path = write_config(tmp_path, extra='\n[money]\nrates = { eur = 1.08, GBP = "1.27" }\n' + CAMPAIGNS)
    config = tinytrack.load_config(path)
    assert config.money.rates == {"EUR": tinytrack.Decimal("1.08"), "GBP": tinytrack.Decimal("1.27")}
    assert config.money.report_currency == "USD"  # postback.currency
    cpm = config.campaigns["cpm"]
    assert (cpm.cost_model, cpm.cost_value, cpm.cost_currency) == ("cpm", 2_500_000, "USD")
    assert config.campaigns["rev"].cost_value == 40_000_000
    assert config.campaigns["eur"].cost_currency == "EUR"


async def test_admin_shows_cost_profit_and_roi(client):
    ids = [await click(client, "cpc") for _ in range(4)]  # 0.20
    await postback(client, ids[0], payout="0.50")
    page = (await client.get("/admin", headers=ADMIN)).text
    # revenue 0.50, cost 0.20, profit 0.30, ROI 150%: the tiles over the report
    tiles = dict(re.findall(r"<div><span>([^<]+)</span><b>(.*?)</b></div>", page))
    assert {name: re.sub("<[^>]+>", "", tiles[name]) for name in ("Revenue", "Cost", "Profit", "ROI")} == {
        "Revenue": "0.50 USD",
        "Cost": "0.20 USD",
        "Profit": "0.30 USD",
        "ROI": "150.00% USD",
    }


def test_share_rounds_half_to_even_and_spread_adds_up_exactly():
    half = 50_000_000  # 50%, as revshare keeps it (micro-percent) over 100%
    assert [tinytrack.share(units, half, 100_000_000) for units in (1, 3, 5, 7, 9)] == [0, 2, 2, 4, 4]
    assert tinytrack.share(12_340_000, 40_000_000, 100_000_000) == 4_936_000
    assert tinytrack.spread(10, [3, 1, 0]) == [8, 2, 0]  # 7.5, 2.5: the tie goes to the first
    assert tinytrack.spread(10, [1, 3]) == [3, 7]  # 2.5, 7.5: remainders tie again, the first gets the unit
    assert tinytrack.spread(100, [1, 1, 1]) == [34, 33, 33]
    for amount in (0, 1, 999_999, 10**15):
        for weights in ([1], [5, 0, 7], [1] * 13, [10**9, 1]):
            parts = tinytrack.spread(amount, weights)
            assert sum(parts) == amount and all(p >= 0 for p in parts)
    # A Berlin day is 1 h of one UTC day and 23 h of the next; the shares add up.
    day = (dt.date(2026, 11, 20) - dt.date(1970, 1, 1)).days
    assert tinytrack.utc_parts(day, "Europe/Berlin", 24_000_001) == [(day - 1, 1_000_000), (day, 23_000_001)]
    assert tinytrack.utc_parts(day, "UTC", 5) == [(day, 5)]


# --- found in review: each failed before its fix -----------------------------------------


async def test_an_upload_for_a_sub1_counted_as_other_replaces_others_costs(make_app):
    app = await make_app(CAMPAIGNS, retention={"sub1_per_day": 1})
    async with client_for(app) as http:
        await click(http, "cpc", sub1="a")  # 0.05
        await click(http, "cpc", sub1="b")  # past the cap: totalled under (other), 0.05
        await put_costs(http, [{"day": D, "campaign": "cpc", "sub1": "b", "cost": "1.00"}])
        # b's upload is (other)'s cost now (not b's beside (other)'s clicks): 0.05 + 1.00
        assert await sub1_costs(http, D) == {"(other)": {"USD": "1.00"}, "a": {"USD": "0.05"}}
        assert (await figures(http, "cpc", f"from={D}&to={D}"))["cost"] == {"USD": "1.05"}


async def test_a_whole_day_upload_stays_the_whole_days_cost(client, clock):
    await click(client, "cpc", sub1="z1")
    clock.now = at("2026-11-19")
    yesterday = await click(client, "cpa", sub1="z3")
    clock.now = at(D)
    await click(client, "cpa", sub1="z1")
    await put_costs(client, [{"day": D, "campaign": "cpc", "cost": "10"}, {"day": D, "campaign": "cpa", "cost": "10"}])
    clock.now = at(D, 13)
    await click(client, "cpc", sub1="z2")  # a new sub1 after the upload: its 0.05 is in the 10
    await postback(client, yesterday, ts=f"{D}T18:00:00Z")  # a cpa conversion dated that day: its 4 too
    assert (await figures(client, "cpc", f"from={D}&to={D}"))["cost"] == {"USD": "10.00"}
    assert (await figures(client, "cpa", f"from={D}&to={D}"))["cost"] == {"USD": "10.00"}
    assert (await figures(client, "cpa", "from=2026-11-19&to=2026-11-19"))["cost"] == {}  # not uploaded: its own


async def test_a_day_the_zone_skipped_is_refused_by_name(make_app, clock):
    clock.now = at("2012-01-05")
    app = await make_app(CAMPAIGNS)
    async with client_for(app) as http:
        answer = await put_costs(http, [{"day": "2011-12-30", "campaign": "cpc", "cost": "1"}], "?tz=Pacific/Apia")
        assert (answer.status_code, answer.json()) == (
            400,
            {"error": "rows[0].day: 2011-12-30 did not happen in Pacific/Apia (the zone skipped it)"},
        )
        assert (await http.get("/healthz")).json()["writes"] == "ok"  # the writer never saw it


async def test_any_line_ending_and_a_bad_csv_is_a_400_naming_the_line(client):
    mac = f"day,campaign,sub1,cost\r{D},cpc,z,1.5\r".encode()  # bare CR: a Mac spreadsheet
    answer = await client.put("/api/costs", content=mac, headers={**ADMIN, "content-type": "text/csv"})
    assert answer.json() == {"rows": 1, "replaced": 0}
    huge = f"day,campaign,sub1,cost\n{D},cpc,{'z' * 200_000},1\n".encode()
    answer = await client.put("/api/costs", content=huge, headers={**ADMIN, "content-type": "text/csv"})
    assert (answer.status_code, answer.json()) == (
        400,
        {"error": "line 2: not CSV: field larger than field limit (131072)"},
    )


async def test_a_model_change_keeps_what_stored_conversions_cost(make_app, tmp_path: Path):
    app = await make_app(CAMPAIGNS)
    async with client_for(app) as http:
        cid = await click(http, "cpa")
        await postback(http, cid, payout="10", status="pending")
        await postback(http, cid, expect="updated", status="approved")  # cpa: 4
    switched = CAMPAIGNS.replace('cost_model = "cpa"\ncost_value = "4"', 'cost_model = "revshare"\ncost_value = "50"')
    write_config(tmp_path, extra=switched)
    assert app.reload(str(tmp_path / "config.toml"))
    async with client_for(app) as http:
        await postback(http, cid, expect="updated", status="rejected", payout="12")
        await postback(http, cid, expect="updated", status="approved", payout="12")
        assert (await figures(http, "cpa", f"from={D}&to={D}"))["cost"] == {"USD": "4.00"}  # not 50% of 12


async def test_under_cpa_a_clicks_own_cost_is_not_counted(app, client):
    cid = await click(client, "cpa", cost="0.5")
    await postback(client, cid, payout="9")
    assert (await figures(client, "cpa"))["cost"] == {"USD": "4.00"}  # the conversion, not also its click
    assert stored_costs(app) == [("cpa", None, None)]


async def test_rates_convert_huge_sums_exactly(make_app, clock):
    app = await make_app(CAMPAIGNS + '\n[money]\nreport_currency = "IDR"\nrates = { USD = "16234.567891234567" }\n')
    async with client_for(app) as http:
        cid = await click(http, "spring")
        await postback(http, cid, payout="2877495.205485")
        # 2877495.205485 x 16234.567891234567 = 46714891270.14819349... -> 46714891270.148193
        assert (await figures(http, "spring", f"from={D}&to={D}"))["payout"] == {"IDR": "46714891270.148193"}


def test_the_migration_counts_no_unique_clicks_on_days_whose_addresses_were_cut(tmp_path: Path):
    path = str(tmp_path / "old.db")
    with closing(sqlite3.connect(path, isolation_level=None)) as con:
        for number, script in enumerate(tinytrack.SCHEMA[:3], start=1):
            con.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
        day_ms = 20_000 * 86_400_000
        for i, ip in enumerate(("203.0.113.0", "203.0.113.0", "203.0.113.0")):  # three visitors, cut to /24
            con.execute(
                "INSERT INTO clicks (id, ts, campaign, sub1, ip, ua, bot) VALUES (?, ?, 'spring', 'a', ?, NULL, 0)",
                ((day_ms + i).to_bytes(6, "big") + bytes(10), day_ms + i, ip),
            )
        con.execute("INSERT INTO daily_clicks VALUES (20000, 'spring', 'a', 3, 0)")
    with closing(tinytrack.open_database(path)) as con:
        assert con.execute("SELECT clicks, unique_clicks FROM daily_clicks").fetchall() == [(3, 0)]  # unknown, not 1


async def test_an_upload_in_many_writes_is_the_same_upload(client, monkeypatch):
    monkeypatch.setattr(tinytrack, "COST_ROWS_PER_WRITE", 2)
    rows = [{"day": D, "campaign": "cpc", "sub1": f"z{i}", "cost": f"0.{i}"} for i in range(1, 6)]
    assert (await put_costs(client, rows)).json() == {"rows": 5, "replaced": 0}
    assert (await put_costs(client, rows)).json() == {"rows": 5, "replaced": 5}
    assert (await figures(client, "cpc", f"from={D}&to={D}"))["cost"] == {"USD": "1.50"}  # 0.1 + .. + 0.5


async def test_too_many_rows_are_refused_before_they_are_parsed(client, monkeypatch):
    monkeypatch.setattr(tinytrack, "MAX_COST_ROWS", 3)
    rows = [{"day": D, "campaign": "cpc", "sub1": f"z{i}", "cost": "1"} for i in range(4)]
    assert (await put_costs(client, rows)).json() == {"error": "rows: at most 3 rows in one upload"}
    csv_body = "day,campaign,sub1,cost\n" + "".join(f"{D},cpc,z{i},1\n" for i in range(4))
    answer = await client.put("/api/costs", content=csv_body.encode(), headers={**ADMIN, "content-type": "text/csv"})
    assert answer.json() == {"error": "rows: at most 3 rows in one upload"}


async def test_a_loss_too_small_to_show_is_roi_zero(client):
    await click(client, "spring", cost="0.999999")
    cid = await click(client, "spring", cost="0")
    await postback(client, cid, payout="0.999998")
    # profit -0.000001 over cost 0.999999: -0.0001% -> 0.00, not -0.00
    assert (await figures(client, "spring"))["roi"] == {"USD": "0.00"}


async def test_an_upload_named_other_keeps_the_sub1s_folded_into_it(make_app, monkeypatch):
    app = await make_app(CAMPAIGNS, retention={"sub1_per_day": 1})
    async with client_for(app) as http:
        await click(http, "cpc", sub1="a")
        await click(http, "cpc", sub1="b")  # counted as (other)
        row_b = {"day": D, "campaign": "cpc", "sub1": "b", "cost": "1.00"}
        await put_costs(http, [row_b])
        await put_costs(http, [{"day": D, "campaign": "cpc", "sub1": "(other)", "cost": "2.00"}])
        # (other) holds b's upload and the one named (other): 3.00, and sending b again changes nothing
        assert (await sub1_costs(http, D))["(other)"] == {"USD": "3.00"}
        await put_costs(http, [row_b])
        assert (await sub1_costs(http, D))["(other)"] == {"USD": "3.00"}
        monkeypatch.setattr(tinytrack, "COST_ROWS_PER_WRITE", 1)  # the same, a row a transaction
        await put_costs(http, [row_b, {"day": D, "campaign": "cpc", "sub1": "(other)", "cost": "2.00"}])
        assert (await sub1_costs(http, D))["(other)"] == {"USD": "3.00"}


async def test_an_empty_sub_is_kept_empty_and_a_missing_one_null(client):
    given = await click(client, "spring", sub1="", sub2="", ext_id="")
    await postback(client, given, txid="E")
    missing = await click(client, "spring")
    await postback(client, missing, txid="M")
    rows = (await client.get("/api/conversions", headers=ADMIN)).json()["rows"]
    assert [(r["sub1"], r["sub2"], r["sub3"], r["ext_id"]) for r in rows] == [
        ("", "", None, ""),
        (None, None, None, None),
    ]


async def test_braces_in_values_dont_count_as_rows(client, monkeypatch):
    monkeypatch.setattr(tinytrack, "MAX_COST_ROWS", 3)
    rows = [
        {"day": D, "campaign": "cpc", "sub1": "{zoneid}{x}", "cost": "1"},
        {"day": D, "campaign": "cpc", "sub1": "{y}", "cost": "2"},
    ]
    assert (await put_costs(client, rows)).json() == {"rows": 2, "replaced": 0}
