"""Retention (issue 6): the purge rules, daily totals that outlive the rows they
count, the PII cut, incremental auto-vacuum, the v1 -> v2 migration, and the
`tinytrack purge` and `tinytrack backup` commands.

Time is the injected clock: a click's timestamp is the clock's millisecond, and
`app.purger.run_once()` purges as of the clock. Click ids only grow, so each test
makes its clicks oldest first."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager, closing
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, Server, free_port, new_click, write_config

import tinytrack

pytestmark = pytest.mark.anyio

DAY = 86_400_000
UA = {"user-agent": "Mozilla/5.0"}
# What run_once reports, per rule: "clicks", "pii", "conversions", "orphans", "outbox".
(
    CLICKS,
    PII,
    CONVERSION_IPS,
    UIDS,
    TOUCHES,
    CONVERSION_UIDS,
    CONVERSION_AD_IDS,
    CONVERSIONS,
    ORPHANS,
    QUARANTINE,
    OUTBOX,
    UNIQUES,
) = (rule.name for rule in tinytrack.PURGE_RULES)


@pytest.fixture
async def app(config: tinytrack.Config, clock):
    """The app, with its background purge stopped: each test purges when it says."""
    application = tinytrack.create_app(config, clock=clock)
    await application.startup()
    await application.purger.stop()
    yield application
    await application.shutdown()


# --- helpers ------------------------------------------------------------------


def db_path(where) -> str:
    return str(where) if isinstance(where, (str, Path)) else where.config.storage.path


def rows(where, sql: str, args: tuple = ()) -> list[tuple]:
    with closing(sqlite3.connect(db_path(where))) as con:
        return con.execute(sql, args).fetchall()


def count(where, table: str) -> int:
    return rows(where, f"SELECT count(*) FROM {table}")[0][0]


def daily(where) -> tuple[list[tuple], list[tuple]]:
    """Both daily tables, every row (zero rows included), in key order."""
    return (
        rows(where, "SELECT day, campaign, sub1, clicks, bot_clicks FROM daily_clicks ORDER BY 1, 2, 3"),
        rows(
            where,
            "SELECT day, campaign, sub1, status, currency, conversions, payout FROM daily_conversions ORDER BY 1, 2, 3, 4, 5",
        ),
    )


def live_conversions(where) -> list[tuple]:
    """The daily_conversions rows that count anything (a status change can leave a 0 row)."""
    return rows(
        where,
        """SELECT day, campaign, sub1, status, currency, conversions, payout FROM daily_conversions
                          WHERE conversions != 0 OR payout != 0 ORDER BY 1, 2, 3, 4, 5""",
    )


def raw(cid: str) -> bytes:
    return bytes.fromhex(cid.replace("-", ""))


def v7(ms: int, n: int = 0) -> bytes:
    """A UUIDv7 of millisecond `ms` (version 7, RFC variant), `n` keeping ids apart."""
    return ms.to_bytes(6, "big") + b"\x70\x00" + (0x8000_0000_0000_0000 | n).to_bytes(8, "big")


def set_ms(clock, ms: int) -> None:
    """Put the clock on millisecond `ms` exactly (int(clock() * 1000) == ms)."""
    clock.now = (ms + 0.5) / 1000
    assert int(clock() * 1000) == ms


def start_ms(clock, days_ago: int = 300) -> int:
    """Noon UTC `days_ago` days before the clock: a start that makes day keys predictable."""
    return (int(clock() * 1000) // DAY - days_ago) * DAY + DAY // 2


async def click_at(client: httpx.AsyncClient, clock, ms: int, campaign: str = "spring", **params: str) -> str:
    set_ms(clock, ms)
    return await new_click(client, campaign, **params)


async def postback(client: httpx.AsyncClient, **params: str) -> httpx.Response:
    params.setdefault("token", POSTBACK_TOKEN)
    return await client.get("/postback", params=params)


@asynccontextmanager
async def client_from(app, address: str):
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://tracker.test") as http:
        yield http


def with_retention(app, **changes: int) -> None:
    app.apply_config(dataclasses.replace(app.config, retention=dataclasses.replace(app.config.retention, **changes)))


def seed_clicks(
    path: str, first_ms: int, n: int, *, step_ms: int = 1, ua: str = "Mozilla/5.0 (X11; Linux x86_64)"
) -> None:
    """n raw clicks straight into the file (no daily totals), one every step_ms from first_ms."""
    data = (
        (
            v7(first_ms + i * step_ms, i),
            first_ms + i * step_ms,
            "spring",
            f"s{i % 7}",
            None,
            None,
            None,
            None,
            None,
            f"198.51.{i % 250}.{i % 200}",
            ua,
            0,
            None,
            None,
            None,
            None,
        )
        for i in range(n)
    )
    with closing(sqlite3.connect(path)) as con, con:
        con.executemany(tinytrack.INSERT_CLICK, data)


# --- 1. clicks_days -------------------------------------------------------------


async def test_clicks_older_than_clicks_days_go_and_younger_stay_at_the_millisecond(app, client, clock):
    t = start_ms(clock)
    oldest = await click_at(client, clock, t)
    boundary = await click_at(client, clock, t + 1)
    young = await click_at(client, clock, t + 50 * DAY)
    assert rows(app, "SELECT ts FROM clicks ORDER BY id") == [(t,), (t + 1,), (t + 50 * DAY,)]

    set_ms(clock, t + 1 + 90 * DAY)  # `boundary` is exactly 90 days old, `oldest` 1 ms more
    done = await app.purger.run_once()
    assert done[CLICKS] == 1
    assert rows(app, "SELECT id FROM clicks ORDER BY id") == [(raw(boundary),), (raw(young),)]
    assert raw(oldest) not in {r[0] for r in rows(app, "SELECT id FROM clicks")}

    set_ms(clock, t + 2 + 90 * DAY)  # one millisecond later it is older than 90 days
    assert (await app.purger.run_once())[CLICKS] == 1
    assert rows(app, "SELECT id FROM clicks") == [(raw(young),)]


async def test_clicks_days_0_keeps_every_click(app, client, clock):
    t = start_ms(clock, days_ago=2000)
    ids = [await click_at(client, clock, t + i * 100 * DAY) for i in range(5)]
    with_retention(app, clicks_days=0)
    set_ms(clock, t + 1900 * DAY)
    done = await app.purger.run_once()
    assert CLICKS not in done
    assert sorted(r[0] for r in rows(app, "SELECT id FROM clicks")) == sorted(map(raw, ids))


# --- 2. daily totals ------------------------------------------------------------


async def test_daily_totals_are_kept_as_clicks_and_postbacks_arrive(app, client, clock):
    t = start_ms(clock)
    d = t // DAY
    midnight = (d + 1) * DAY
    await click_at(client, clock, midnight - 1, sub1="a")  # the last millisecond of day d
    set_ms(clock, midnight)  # the first of day d + 1
    for sub1 in ("a", "a", None):
        await new_click(client, **({"sub1": sub1} if sub1 else {}))
    bot = await client.get("/c/spring", params={"sub1": "a"}, headers={"user-agent": "curl/8.5.0"})
    preview = await client.get("/c/spring", headers={"user-agent": "WhatsApp/2.23"})
    other = await client.get("/c/passing", params={"sub1": "a"}, headers=UA)
    head = await client.head("/c/spring", params={"sub1": "a"}, headers=UA)  # a link preview: not stored, not counted
    assert [r.status_code for r in (bot, preview, other, head)] == [302] * 4
    assert daily(app)[0] == [
        (d, "spring", "a", 1, 0),
        (d + 1, "passing", "a", 1, 0),
        (d + 1, "spring", "", 1, 1),  # the WhatsApp preview is a bot
        (d + 1, "spring", "a", 2, 1),  # curl is a bot: in bot_clicks, not in clicks
    ]
    assert rows(app, "SELECT sum(bot) FROM clicks") == [(2,)]

    cid = await new_click(client, sub1="x")
    day = d + 1
    totals: list[tuple] = []

    async def step(expected: list[tuple], **params: str) -> None:
        answer = await postback(client, click_id=cid, **params)
        assert answer.status_code == 200, answer.text
        assert [r[1:] for r in live_conversions(app) if r[2] == "x"] == expected, params
        totals.append(expected)

    await step([("spring", "x", "pending", "USD", 1, 5_000_000)], txid="A", status="pending", payout="5")
    await step([("spring", "x", "pending", "USD", 1, 5_000_000)], txid="A", status="pending")  # a duplicate
    await step([("spring", "x", "approved", "USD", 1, 5_000_000)], txid="A", status="approved")
    await step([("spring", "x", "rejected", "USD", 1, 5_000_000)], txid="A", status="rejected")
    # A status change with a new payout (and currency) moves the new amount.
    await step(
        [("spring", "x", "pending", "USD", 1, 1_000_000), ("spring", "x", "rejected", "USD", 1, 5_000_000)],
        txid="B",
        status="pending",
        payout="1",
    )
    await step(
        [("spring", "x", "approved", "EUR", 1, 2_250_000), ("spring", "x", "rejected", "USD", 1, 5_000_000)],
        txid="B",
        status="approved",
        payout="2.25",
        currency="eur",
    )
    # Sums are exact: micro-units, never floats.
    for txid, payout in (("C1", "0.1"), ("C2", "0.1"), ("C3", "0.1"), ("C4", "0.2")):
        answer = await postback(client, click_id=cid, txid=txid, payout=payout, currency="GBP")
        assert answer.json()["status"] == "created"
    assert [r[1:] for r in live_conversions(app) if r[2] == "x"] == [
        ("spring", "x", "approved", "EUR", 1, 2_250_000),
        ("spring", "x", "approved", "GBP", 4, 500_000),
        ("spring", "x", "rejected", "USD", 1, 5_000_000),
    ]
    assert {r[0] for r in live_conversions(app)} == {day}
    # A conversion counts on the day it converted (the network's ts), not the click's
    # (nor the day the postback came: it may come late).
    set_ms(clock, midnight + 2 * DAY)
    answer = await postback(client, click_id=cid, txid="D", payout="7", ts=str((midnight + DAY + 5000) // 1000))
    assert answer.json()["status"] == "created"
    assert (d + 2, "spring", "x", "approved", "USD", 1, 7_000_000) in live_conversions(app)
    # And the totals agree with the raw rows.
    assert live_conversions(app) == rows(
        app,
        """SELECT ts / 86400000, campaign, coalesce(sub1, ''), status, currency,
        count(*), sum(payout) FROM conversions GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5""",
    )


async def test_stats_for_purged_days_stay_exactly_what_they_were(app, client, clock):
    t = start_ms(clock)
    old_ids = []
    for i, (sub1, ua) in enumerate(
        [("a", UA), ("a", UA), ("b", UA), ("a", {"user-agent": "Googlebot/2.1"}), (None, UA)]
    ):
        set_ms(clock, t + i * 3_600_000)  # over several hours of day t // DAY
        answer = await client.get("/c/spring", params={"sub1": sub1} if sub1 else {}, headers=ua)
        assert answer.status_code == 302
        old_ids.append(answer.headers["location"].split("cid=")[1].split("&")[0])
    for cid, txid, status, payout, currency in [
        (old_ids[0], "T1", "approved", "10.5", "USD"),
        (old_ids[1], "T2", "pending", "3", "USD"),
        (old_ids[2], "T3", "approved", "0.000001", "EUR"),
    ]:
        assert (
            await postback(client, click_id=cid, txid=txid, status=status, payout=payout, currency=currency)
        ).status_code == 200
    assert (await postback(client, click_id=old_ids[1], txid="T2", status="rejected")).json()["status"] == "updated"
    young = await click_at(client, clock, t + 80 * DAY, sub1="a")
    assert (await postback(client, click_id=young, txid="Y", payout="1")).json()["status"] == "created"
    before = daily(app)
    reports = await stats_reports(client, t // DAY, t // DAY + 80)
    assert (reports["day"][0]["clicks"], reports["day"][0]["bot_clicks"]) == (5, 1)  # bots=1: 4 humans and a bot
    assert before[0][0] == (t // DAY, "spring", "", 1, 0)
    assert (t // DAY, "spring", "a", 2, 1) in before[0]
    assert (t // DAY, "spring", "a", "rejected", "USD", 1, 3_000_000) in before[1]
    assert (t // DAY, "spring", "b", "approved", "EUR", 1, 1) in before[1]

    with_retention(app, clicks_days=30, conversions_days=30)
    set_ms(clock, t + 90 * DAY)
    done = await app.purger.run_once()
    assert (done[CLICKS], done[CONVERSIONS]) == (5, 3)
    assert count(app, "clicks") == count(app, "conversions") == 1  # only the young ones are left
    assert count(app, "conversion_history") == 1
    assert daily(app) == before  # every total of the purged day, exactly
    assert await stats_reports(client, t // DAY, t // DAY + 80) == reports  # and the reports made from them


async def stats_reports(client: httpx.AsyncClient, first_day: int, last_day: int) -> dict[str, list]:
    """/api/stats by day, sub1 and status (bots included) over a span of days."""
    span = {"from": day_text(first_day), "to": day_text(last_day), "bots": "1"}
    reports = {}
    for by in ("day", "sub1", "status"):
        answer = await client.get(
            "/api/stats", params={**span, "by": by}, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert answer.status_code == 200, answer.text
        reports[by] = answer.json()["rows"]
    assert reports["day"]
    return reports


def day_text(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86400))


# --- 3. conversions outlive their click ------------------------------------------


async def test_conversions_survive_their_clicks_purge_and_a_later_postback_is_an_orphan(app, client, clock):
    t = start_ms(clock)
    subs = {"sub1": "fb", "sub2": "ad7", "sub3": "s3", "sub4": "s4", "sub5": "s5", "ext_id": "EXT-1"}
    cid = await click_at(client, clock, t, **subs)
    assert (await postback(client, click_id=cid, txid="ORD-1", payout="12.5", status="pending")).json()[
        "status"
    ] == "created"
    assert (await postback(client, click_id=cid, txid="ORD-1", status="approved")).json()["status"] == "updated"
    columns = (
        "id, click_id, click_ts, campaign, sub1, sub2, sub3, sub4, sub5, ext_id, event, txid, status, payout, currency"
    )
    conversion = rows(app, f"SELECT {columns} FROM conversions")
    assert conversion == [
        (
            1,
            raw(cid),
            t,
            "spring",
            "fb",
            "ad7",
            "s3",
            "s4",
            "s5",
            "EXT-1",
            "conversion",
            "ORD-1",
            "approved",
            12_500_000,
            "USD",
        )
    ]
    history = rows(app, "SELECT * FROM conversion_history")

    set_ms(clock, t + 91 * DAY)
    assert (await app.purger.run_once())[CLICKS] == 1
    assert count(app, "clicks") == 0
    assert rows(app, f"SELECT {columns} FROM conversions") == conversion
    assert rows(app, "SELECT * FROM conversion_history") == history
    # The reconciliation API still has it, with everything it was for.
    api = await client.get(
        "/api/conversions", params={"since": "2000-01-01"}, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert api.status_code == 200, api.text
    [listed] = api.json()["rows"]
    assert (listed["click_id"], listed["sub1"], listed["ext_id"], listed["status"]) == (cid, "fb", "EXT-1", "approved")

    # The click is gone, so a postback for it is an orphan: 404, kept, the conversion untouched.
    late = await postback(client, click_id=cid, txid="ORD-2", payout="4")
    assert (late.status_code, late.json()) == (404, {"error": "unknown click_id"})
    reversal = await postback(client, click_id=cid, txid="ORD-1", status="rejected")
    assert reversal.status_code == 404
    assert rows(app, "SELECT click_id, txid, status, payout FROM orphans ORDER BY id") == [
        (cid, "ORD-2", "approved", 4_000_000),
        (cid, "ORD-1", "rejected", 0),
    ]
    assert rows(app, f"SELECT {columns} FROM conversions") == conversion


# --- 4. PII -----------------------------------------------------------------------


async def test_pii_is_cut_after_pii_days_once_and_nothing_else_changes(app, client, clock):
    t = start_ms(clock)
    set_ms(clock, t)
    made = [await new_click(client, sub1="v4", ext_id="E")]
    async with client_from(app, "2001:db8:1234:5678::9") as v6:
        made.append(await new_click(v6, sub1="v6"))
    async with client_from(app, "::ffff:192.0.2.33") as mapped:
        made.append(await new_click(mapped, sub1="mapped"))
    async with client_from(app, "127.0.0.1") as proxy:  # behind the trusted proxy: the X-Forwarded-For address
        answer = await proxy.get(
            "/c/spring",
            params={"sub2": "xff"},
            headers={"user-agent": "Googlebot/2.1", "x-forwarded-for": "203.0.113.77"},
        )
        made.append(answer.headers["location"].split("cid=")[1].split("&")[0])
    young = await click_at(client, clock, t + 20 * DAY, sub1="young")
    everything = "SELECT id, ts, campaign, sub1, sub2, sub3, sub4, sub5, ext_id, ip, ua, bot FROM clicks ORDER BY id"
    before = rows(app, everything)
    assert [r[9] for r in before] == [
        "198.51.100.7",
        "2001:db8:1234:5678::9",
        "::ffff:192.0.2.33",
        "203.0.113.77",
        "198.51.100.7",
    ]
    assert all(r[10] for r in before)
    totals = daily(app)

    set_ms(clock, t + 31 * DAY)
    done = await app.purger.run_once()
    assert done[PII] == 4
    after = rows(app, everything)
    assert [r[9] for r in after] == ["198.51.100.0", "2001:db8:1234::", "192.0.2.0", "203.0.113.0", "198.51.100.7"]
    assert [r[10] for r in after] == [None, None, None, None, "Mozilla/5.0"]
    assert [r[:9] + r[11:] for r in after] == [r[:9] + r[11:] for r in before]  # id, ts, campaign, subs, ext_id, bot
    assert after[4] == before[4]  # the young click is untouched
    assert daily(app) == totals
    assert [r[0] for r in after] == [raw(c) for c in made] + [raw(young)]

    again = await app.purger.run_once()  # nothing newly due: nothing redone
    assert again[PII] == 0
    assert rows(app, everything) == after

    set_ms(clock, t + 51 * DAY)  # now the young click is 31 days old too
    assert (await app.purger.run_once())[PII] == 1
    assert rows(app, everything)[4][9:11] == ("198.51.100.0", None)
    assert rows(app, everything)[:4] == after[:4]


# --- 5. conversions_days, orphans_days, outbox_days ------------------------------


def insert_outbox(path: str, rows_: list[tuple[str, int, int | None]], far: int, tag: str) -> list[int]:
    """Outbox rows (state, created_at, last_at), each with two attempts; their ids."""
    ids = []
    with closing(sqlite3.connect(path)) as con, con:
        for i, (state, created, last) in enumerate(rows_):
            (outbox_id,) = con.execute(
                """INSERT INTO outbox (conversion_id, campaign, status, url, idempotency_key, state, attempts,
                       created_at, next_at, last_at, deadline) VALUES (?, 'spring', 'approved', ?, ?, ?, 2, ?, ?, ?, ?) RETURNING id""",
                (1000 + i, f"https://source.example/pb?i={i}", f"key-{tag}-{i}", state, created, far, last, far),
            ).fetchone()  # next_at far ahead: the forwarder never picks these up
            con.executemany(
                "INSERT INTO outbox_attempts (outbox_id, at, code, error, ms) VALUES (?, ?, 500, NULL, 12)",
                [(outbox_id, created), (outbox_id, created + 1)],
            )
            ids.append(outbox_id)
    return ids


async def test_conversions_orphans_and_finished_deliveries_go_after_their_days(app, client, clock):
    t = start_ms(clock)
    cid = await click_at(client, clock, t)
    for txid in ("OLD-1", "OLD-2"):
        assert (await postback(client, click_id=cid, txid=txid, status="pending", payout="2")).json()[
            "status"
        ] == "created"
    await postback(client, click_id=cid, txid="OLD-1", status="approved")
    await postback(client, click_id=cid, txid="OLD-1", status="rejected")
    unknown_old, unknown_again = "0190a6b2-7c1d-7abc-8def-0123456789ab", "0190a6b2-7c1d-7abc-8def-0123456789ac"
    for orphan in (unknown_old, unknown_again):
        assert (await postback(client, click_id=orphan, txid="O")).status_code == 404

    set_ms(clock, t + 40 * DAY)
    assert (await postback(client, click_id=unknown_again, txid="O")).status_code == 404  # seen again: last_seen moves
    young = await new_click(client)
    await postback(client, click_id=young, txid="NEW", status="pending", payout="1")
    await postback(client, click_id=young, txid="NEW", status="approved")
    assert count(app, "conversion_history") == 3 + 1 + 2
    gone_ids = insert_outbox(
        app.config.storage.path,
        [("done", t, t + 1), ("failed", t, t + 1), ("dead", t, t + 1), ("canceled", t, None)],
        far=t + 9999 * DAY,
        tag="gone",
    )
    kept_ids = insert_outbox(
        app.config.storage.path,
        [
            ("pending", t, t + 1),  # pending is never purged, however old
            ("done", t, t + 40 * DAY),  # finished recently: by last_at, not created_at
            ("canceled", t + 40 * DAY, None),
        ],
        far=t + 9999 * DAY,
        tag="kept",
    )
    totals = daily(app)

    with_retention(app, conversions_days=60, orphans_days=30, outbox_days=30)
    set_ms(clock, t + 61 * DAY)
    done = await app.purger.run_once()
    assert (done[CLICKS], done[CONVERSIONS], done[ORPHANS], done[OUTBOX]) == (0, 2, 1, 4)
    assert rows(app, "SELECT txid, status FROM conversions") == [("NEW", "approved")]
    assert rows(
        app,
        "SELECT c.txid, h.status FROM conversion_history h JOIN conversions c ON c.id = h.conversion_id ORDER BY h.rowid",
    ) == [("NEW", "pending"), ("NEW", "approved")]
    assert count(app, "conversion_history") == 2  # the old conversions' history went with them
    assert rows(app, "SELECT click_id FROM orphans") == [(unknown_again,)]
    assert rows(app, "SELECT id FROM outbox ORDER BY id") == [(i,) for i in kept_ids]
    assert rows(app, "SELECT DISTINCT outbox_id FROM outbox_attempts ORDER BY 1") == [(i,) for i in kept_ids]
    assert count(app, "outbox_attempts") == 2 * len(kept_ids)
    assert not set(gone_ids) & {r[0] for r in rows(app, "SELECT outbox_id FROM outbox_attempts")}
    assert count(app, "clicks") == 2  # clicks_days (90) is not due yet
    assert daily(app) == totals

    again = await app.purger.run_once()
    assert (again[CONVERSIONS], again[ORPHANS], again[OUTBOX]) == (0, 0, 0)


async def test_the_app_purges_in_the_background_from_startup(config, clock):
    t = start_ms(clock)
    first = tinytrack.create_app(config, clock=clock)
    await first.startup()  # makes the file
    await first.shutdown()
    seed_clicks(config.storage.path, t, 2500)  # 300 days old: more than two batches
    seed_clicks(config.storage.path, int(clock() * 1000) - DAY, 10)
    running = tinytrack.create_app(config, clock=clock)
    await running.startup()
    try:
        for _ in range(500):
            if running.purger.last:
                break
            await asyncio.sleep(0.01)
        assert running.purger.last[CLICKS] == 2500
    finally:
        await running.shutdown()
    assert count(config.storage.path, "clicks") == 10


# --- 6. a big purge while clicks come in ------------------------------------------


async def test_purging_100k_rows_while_the_app_answers_clicks(app, client, clock):
    now = int(clock() * 1000)
    seed_clicks(app.config.storage.path, now - 200 * DAY, 100_000)
    assert count(app, "clicks") == 100_000
    purge = asyncio.create_task(app.purger.run_once())
    made = []
    while not purge.done():
        answer = await client.get("/c/spring", params={"sub1": "live"}, headers=UA)
        assert answer.status_code == 302, answer.text
        made.append(answer.headers["location"].split("cid=")[1].split("&")[0])
    done = await purge
    assert done[CLICKS] == 100_000
    assert len(made) >= 10  # the purge pauses between its 100 batches: clicks went in between
    stored = {r[0] for r in rows(app, "SELECT id FROM clicks")}
    assert stored == {raw(c) for c in made}  # every click answered is stored; every old one is gone
    assert rows(app, "SELECT clicks FROM daily_clicks WHERE sub1 = 'live'") == [(len(made),)]
    assert rows(app, "PRAGMA freelist_count") == [(0,)]
    # Its effect on click latency is measured by bench/purge_load.py, not here.


# --- 7. the file shrinks -----------------------------------------------------------


async def test_a_purge_gives_the_pages_back_and_the_file_shrinks(config, clock):
    application = tinytrack.create_app(config, clock=clock)
    await application.startup()
    await application.purger.stop()
    path = config.storage.path
    try:
        assert rows(path, "PRAGMA auto_vacuum") == [(2,)]  # INCREMENTAL on a new file
        seed_clicks(path, start_ms(clock), 4000, ua="Mozilla/5.0 " + "x" * 400)  # ~450 pages
        seed_clicks(path, int(clock() * 1000) - DAY, 100)
        with closing(sqlite3.connect(path)) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages_before = rows(path, "PRAGMA page_count")[0][0]
        size_before = os.path.getsize(path)
        done = await application.purger.run_once()
        assert done[CLICKS] == 4000
        assert rows(path, "PRAGMA freelist_count") == [(0,)]
        pages_after = rows(path, "PRAGMA page_count")[0][0]
        assert pages_after < pages_before / 5, (pages_before, pages_after)
    finally:
        await application.shutdown()
    assert os.path.getsize(path) < size_before / 5, (size_before, os.path.getsize(path))
    assert count(path, "clicks") == 100
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]


def test_a_vacuum_step_hands_back_up_to_vacuum_pages_pages(tmp_path: Path):
    con = tinytrack.open_database(str(tmp_path / "t.db"))
    try:
        con.execute("BEGIN IMMEDIATE")
        tinytrack.Database(con).insert_clicks(
            [
                tinytrack.ClickRow(
                    v7(1_700_000_000_000 + i, i),
                    1_700_000_000_000 + i,
                    "spring",
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    "198.51.100.7",
                    "x" * 1000,
                    False,
                    None,
                    None,
                )
                for i in range(3000)
            ]
        )
        con.execute("COMMIT")
        con.execute("DELETE FROM clicks")
        free = con.execute("PRAGMA freelist_count").fetchone()[0]
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        assert free > 2 * tinytrack.VACUUM_PAGES
        left = tinytrack.Database(con).vacuum_step()
        assert left == con.execute("PRAGMA freelist_count").fetchone()[0]
        assert free - left == tinytrack.VACUUM_PAGES  # a step hands back VACUUM_PAGES pages, not one
        assert pages - con.execute("PRAGMA page_count").fetchone()[0] >= tinytrack.VACUUM_PAGES  # the file got shorter
    finally:
        con.close()


# --- 8. migration from schema 1 ----------------------------------------------------


V1_CLICKS = [  # ms offset from the start, campaign, sub1, bot
    (0, "spring", "a", 0),
    (1, "spring", "a", 0),
    (2, "spring", "a", 1),
    (3, "spring", None, 0),
    (4, "passing", "a", 0),
    (DAY, "spring", "a", 0),
    (DAY + 1, "spring", "a", 1),
    (2 * DAY, "windowed", "z", 1),
]
V1_CONVERSIONS = [  # click index, txid, status, payout, currency, ts offset
    (0, "A", "approved", 100_000, "USD", 10),
    (0, "B", "approved", 100_000, "USD", 11),
    (1, "C", "approved", 200_000, "USD", 12),
    (1, "D", "pending", 5_000_000, "USD", DAY),
    (3, "E", "rejected", 1, "EUR", 13),
    (5, "F", "approved", 7, "EUR", DAY + 5),
]


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_a_v1_database_is_migrated_with_backfilled_daily_totals(tmp_path: Path, journal: str):
    path = str(tmp_path / "v1.db")
    t = (int(time.time() * 1000) // DAY - 10) * DAY + 3_600_000
    with closing(sqlite3.connect(path, isolation_level=None)) as con:
        con.execute("PRAGMA auto_vacuum = NONE")
        con.execute(f"PRAGMA journal_mode = {journal}")  # v1 files were WAL; a copied one may not be
        con.executescript(tinytrack.SCHEMA[0])
        con.execute("PRAGMA user_version = 1")
        clicks = [
            (v7(t + off, i), t + off, c, s, "198.51.100.7", "Mozilla/5.0", bot)
            for i, (off, c, s, bot) in enumerate(V1_CLICKS)
        ]
        con.executemany("INSERT INTO clicks (id, ts, campaign, sub1, ip, ua, bot) VALUES (?, ?, ?, ?, ?, ?, ?)", clicks)
        for i, txid, status, payout, currency, off in V1_CONVERSIONS:
            click = clicks[i]
            con.execute(
                """INSERT INTO conversions (click_id, dedupe_key, click_ts, campaign, sub1, event, txid, status, payout, currency,
                       ts, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'conversion', ?, ?, ?, ?, ?, ?, ?)""",
                (
                    click[0],
                    f"t:{txid}",
                    click[1],
                    click[2],
                    click[3],
                    txid,
                    status,
                    payout,
                    currency,
                    t + off,
                    t + off,
                    t + off,
                ),
            )
        assert con.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    v1_columns = "id, click_id, dedupe_key, click_ts, campaign, sub1, sub2, sub3, sub4, sub5, ext_id, event, txid, status, reason, payout, currency, ts, created_at, updated_at, ip"
    v1_clicks = "id, ts, campaign, sub1, sub2, sub3, sub4, sub5, ext_id, ip, ua, bot"
    raw_before = (
        rows(path, f"SELECT {v1_clicks} FROM clicks ORDER BY id"),
        rows(path, f"SELECT {v1_columns} FROM conversions ORDER BY id"),
    )

    con = tinytrack.open_database(path)
    try:
        assert con.execute("PRAGMA user_version").fetchone() == (len(tinytrack.SCHEMA),)
        assert con.execute("PRAGMA auto_vacuum").fetchone() == (2,)
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert (
            rows(path, f"SELECT {v1_clicks} FROM clicks ORDER BY id"),
            rows(path, f"SELECT {v1_columns} FROM conversions ORDER BY id"),
        ) == raw_before
        d = t // DAY
        assert daily(path) == (
            [
                (d, "passing", "a", 1, 0),
                (d, "spring", "", 1, 0),
                (d, "spring", "a", 2, 1),
                (d + 1, "spring", "a", 1, 1),
                (d + 2, "windowed", "z", 0, 1),
            ],
            [
                (d, "spring", "", "rejected", "EUR", 1, 1),
                (d, "spring", "a", "approved", "USD", 3, 400_000),
                (d + 1, "spring", "a", "approved", "EUR", 1, 7),
                (d + 1, "spring", "a", "pending", "USD", 1, 5_000_000),
            ],
        )
        # The new triggers work on the old rows.
        con.execute("UPDATE conversions SET status = 'approved' WHERE txid = 'D'")
        assert (d + 1, "spring", "a", "approved", "USD", 1, 5_000_000) in live_conversions(path)
        assert tinytrack.open_database(path).execute("PRAGMA user_version").fetchone() == (
            len(tinytrack.SCHEMA),
        )  # opening again: nothing to do
        # And the converted file hands freed pages back.
        con.execute("DELETE FROM clicks")
        con.execute("DELETE FROM conversions")
        while tinytrack.Database(con).vacuum_step():
            pass
        assert con.execute("PRAGMA freelist_count").fetchone() == (0,)
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        con.close()


# --- 9. the commands -----------------------------------------------------------------


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinytrack", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def table(output: str) -> list[list[str]]:
    """print_table's output as cells (columns split on two or more spaces)."""
    return [
        re.split(r"\s{2,}", line.strip())
        for line in output.splitlines()
        if line.strip() and not line.startswith("kept")
    ]


def seed_for_cli(path: str, now: int) -> dict[str, bytes]:
    """Rows of every kind, some due under clicks_days 90, pii_days 30, conversions_days 60, orphans_days 30."""
    con = tinytrack.open_database(path)
    ids = {"ancient": v7(now - 100 * DAY, 1), "month_old": v7(now - 40 * DAY, 2), "fresh": v7(now - DAY, 3)}
    try:
        con.execute("BEGIN IMMEDIATE")
        tinytrack.Database(con).insert_clicks(
            [
                tinytrack.ClickRow(
                    ids[name],
                    int.from_bytes(ids[name][:6]),
                    "spring",
                    "fb",
                    None,
                    None,
                    None,
                    None,
                    "E",
                    "203.0.113.77",
                    "Mozilla/5.0",
                    False,
                    None,
                    None,
                )
                for name in ("ancient", "month_old", "fresh")
            ]
        )
        for i, (click, created) in enumerate(
            [("ancient", now - 99 * DAY), ("month_old", now - 39 * DAY), ("fresh", now - DAY)]
        ):
            con.execute(
                """INSERT INTO conversions (click_id, dedupe_key, click_ts, campaign, sub1, event, txid, status, payout, currency,
                       ts, created_at, updated_at) VALUES (?, ?, 0, 'spring', 'fb', 'conversion', ?, 'approved', 1500000, 'USD', ?, ?, ?)""",
                (ids[click], f"t:T{i}", f"T{i}", created, created, created),
            )
        for i, seen in enumerate([now - 31 * DAY, now - 29 * DAY]):
            con.execute(
                """INSERT INTO orphans (click_id, dedupe_key, event, txid, status, payout, currency, ts, first_seen, last_seen)
                           VALUES (?, 't:O', 'conversion', 'O', 'approved', 0, 'USD', ?, ?, ?)""",
                (f"orphan-{i}", seen, seen, seen),
            )
        con.execute(
            """INSERT INTO outbox (conversion_id, campaign, status, url, idempotency_key, state, created_at, next_at, deadline)
                       VALUES (1, 'spring', 'approved', 'https://s.example/', 'k', 'done', ?, 0, 0)""",
            (now - 99 * DAY,),
        )
        con.execute("COMMIT")
    finally:
        con.close()
    return ids


def dump(path: str) -> list[str]:
    with closing(sqlite3.connect(path)) as con:
        return list(con.iterdump())


def test_purge_command_dry_run_changes_nothing_then_purge_removes(tmp_path: Path):
    config = write_config(tmp_path, extra="\n[retention]\nconversions_days = 60\noutbox_days = 0\n")
    db = str(tmp_path / "tinytrack.db")
    ids = seed_for_cli(db, int(time.time() * 1000))
    before, totals = dump(db), daily(db)

    dry = run("purge", "-c", str(config), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert dump(db) == before  # nothing changed
    assert "kept for good (0 in [retention]): outbox_days" in dry.stdout
    would = table(dry.stdout)
    assert would[0] == ["table", "would be", "rows"]
    assert [line[:2] for line in would[1:]] == [
        ["clicks", "deleted"],
        ["clicks", "ip cut to /24 or /48, user agent dropped"],
        ["conversions", "click address kept for ip_cluster dropped"],
        ["clicks", "uid dropped"],
        ["touches", "deleted"],
        ["conversions", "user id dropped"],
        ["conversions", "ad click ids dropped"],
        ["conversions", "deleted, with their history"],
        ["orphans", "deleted"],
        ["quarantine", "refused postbacks deleted"],
        ["click_uniques", "older days' unique-click keys deleted"],
    ]
    assert (would[1][2], would[3][2], would[8][2], would[9][2]) == ("1", "0", "1", "1"), dry.stdout

    done = run("purge", "-c", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    went = table(done.stdout)
    assert went[0] == ["table", "done", "rows"]
    assert went[1:] == [
        ["clicks", "deleted", "1"],
        ["clicks", "ip cut to /24 or /48, user agent dropped", "1"],  # the 100-day-old click was deleted, not cut
        ["conversions", "click address kept for ip_cluster dropped", "0"],  # no ip_cluster rule here
        ["clicks", "uid dropped", "0"],  # no uids here
        ["touches", "deleted", "0"],
        ["conversions", "user id dropped", "0"],
        ["conversions", "ad click ids dropped", "0"],
        ["conversions", "deleted, with their history", "1"],
        ["orphans", "deleted", "1"],
        ["quarantine", "refused postbacks deleted", "0"],
        ["click_uniques", "older days' unique-click keys deleted", "0"],  # used past UNIQUE_MEMORY_KEYS only
    ], done.stdout
    assert rows(db, "SELECT id, ip, ua FROM clicks ORDER BY id") == [
        (ids["month_old"], "203.0.113.0", None),
        (ids["fresh"], "203.0.113.77", "Mozilla/5.0"),
    ]
    assert rows(db, "SELECT txid FROM conversions ORDER BY id") == [("T1",), ("T2",)]
    assert rows(db, "SELECT click_id FROM orphans") == [("orphan-1",)]
    assert count(db, "outbox") == 1  # outbox_days = 0: kept
    assert daily(db) == totals
    assert rows(db, "PRAGMA freelist_count") == [(0,)]

    again = run("purge", "-c", str(config), cwd=tmp_path)
    assert [line[-1] for line in table(again.stdout)[1:]] == ["0"] * 11


def test_purge_dry_run_counts_what_the_purge_then_does(tmp_path: Path):
    config = write_config(tmp_path, extra="\n[retention]\nconversions_days = 60\noutbox_days = 0\n")
    seed_for_cli(str(tmp_path / "tinytrack.db"), int(time.time() * 1000))
    dry = run("purge", "-c", str(config), "--dry-run", cwd=tmp_path)
    done = run("purge", "-c", str(config), cwd=tmp_path)
    assert (dry.returncode, done.returncode) == (0, 0)
    # The click older than clicks_days is deleted by the first rule, so the PII rule never
    # touches it; a dry run that counts it under "ip cut" promises a change that never happens.
    assert table(dry.stdout)[1:] == table(done.stdout)[1:], (dry.stdout, done.stdout)


def test_purge_and_backup_need_an_existing_database(tmp_path: Path):
    config = write_config(tmp_path)
    for command in (["purge", "--dry-run"], ["backup", str(tmp_path / "b.db")]):
        failed = run(command[0], "-c", str(config), *command[1:], cwd=tmp_path)
        assert failed.returncode == 1
        assert failed.stderr == f"tinytrack: {tmp_path / 'tinytrack.db'}: no database here yet (serve creates it)\n"
    assert not (tmp_path / "tinytrack.db").exists()


def make_click(http: httpx.Client) -> str:
    answer = http.get("/c/spring", headers=UA)
    assert answer.status_code == 302
    return answer.headers["location"].split("cid=")[1].split("&")[0]


def test_backup_of_a_running_server_is_a_consistent_snapshot_that_restores(server: Server, tmp_path: Path):
    db = str(tmp_path / "tinytrack.db")
    with server.client() as http:
        first = [make_click(http) for _ in range(20)]
        for i, cid in enumerate(first[:5]):
            answer = http.get(
                "/postback", params={"click_id": cid, "txid": f"T{i}", "payout": "1.5", "token": POSTBACK_TOKEN}
            )
            assert answer.json() == {"status": "created", "id": i + 1}

    made, failures, stop = list(first), [], threading.Event()

    def clicking() -> None:
        with server.client() as http:
            while not stop.is_set():
                try:
                    made.append(make_click(http))
                except Exception as exc:  # noqa: BLE001 - reported below
                    failures.append(repr(exc))
                    return

    worker = threading.Thread(target=clicking)
    worker.start()
    try:
        time.sleep(0.2)
        acknowledged_before = len(made)
        dest = tmp_path / "snapshot.db"
        backup = run("backup", "-c", str(server.config_path), str(dest), cwd=tmp_path)
        acknowledged_after = len(made)
    finally:
        stop.set()
        worker.join(10)
    assert failures == []
    assert backup.returncode == 0, backup.stderr
    assert backup.stderr == ""
    with server.client() as http:
        after_snapshot = make_click(http)  # certainly not in the copy

    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert rows(dest, "PRAGMA integrity_check") == [("ok",)]
    copied = {r[0] for r in rows(dest, "SELECT id FROM clicks")}
    source = {r[0] for r in rows(db, "SELECT id FROM clicks")}
    # One click is in flight at a time: at most one committed (so maybe copied) and not yet counted.
    assert acknowledged_before <= len(copied) <= acknowledged_after + 1, (
        acknowledged_before,
        len(copied),
        acknowledged_after,
    )
    assert {raw(c) for c in made[:acknowledged_before]} <= copied <= source
    assert len(copied) < len(source)
    assert rows(dest, "SELECT id, txid, payout FROM conversions ORDER BY id") == [
        (i + 1, f"T{i}", 1_500_000) for i in range(5)
    ]
    assert rows(dest, "SELECT sum(clicks) FROM daily_clicks") == [(len(copied),)]  # totals from the same instant
    assert f"integrity ok, {len(copied)} clicks, 5 conversions, 0 outbox" in backup.stdout
    assert not list(tmp_path.glob(".*partial*"))

    # Never overwrites.
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    again = run("backup", "-c", str(server.config_path), str(dest), cwd=tmp_path)
    assert (again.returncode, again.stderr) == (1, f"tinytrack: {dest}: already exists, not overwritten\n")
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest

    # Restore: stop the server, put the copy in place of its file, start it again.
    assert server.stop() == 0
    for suffix in ("-wal", "-shm"):
        Path(db + suffix).unlink(missing_ok=True)
    shutil.copyfile(dest, db)
    port = free_port()
    restored = Server(tmp_path, write_config(tmp_path, port), port).start()
    try:
        in_copy = next(c for c in made[5:] if raw(c) in copied)
        with restored.client() as http:
            assert http.get("/c/spring", headers=UA).status_code == 302
            duplicate = http.get("/postback", params={"click_id": first[0], "txid": "T0", "token": POSTBACK_TOKEN})
            assert duplicate.json() == {"status": "duplicate", "id": 1}
            created = http.get("/postback", params={"click_id": in_copy, "txid": "R", "token": POSTBACK_TOKEN})
            assert created.json() == {"status": "created", "id": 6}
            lost = http.get("/postback", params={"click_id": after_snapshot, "txid": "R", "token": POSTBACK_TOKEN})
            assert lost.status_code == 404  # made after the snapshot: not in what was restored
    finally:
        assert restored.stop() == 0
    assert count(db, "clicks") == len(copied) + 1


def test_backup_into_a_folder_keeps_the_newest_n(tmp_path: Path):
    config = write_config(tmp_path)
    db = str(tmp_path / "tinytrack.db")
    now = int(time.time() * 1000)
    con = tinytrack.open_database(db)
    con.close()
    seed_clicks(db, now - DAY, 50)
    folder = tmp_path / "backups"
    folder.mkdir()
    old = [folder / f"tinytrack-2020010{i}-000000.db" for i in (1, 2, 3)]
    for path in old:
        path.write_bytes(b"an older backup")
    (folder / "notes.txt").write_text("not a backup")

    done = run("backup", "-c", str(config), str(folder), "--keep", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    kept = sorted(p.name for p in folder.glob("tinytrack-*.db"))
    assert len(kept) == 2
    assert kept[0] == old[-1].name  # the newest older one, and the new one
    new = folder / kept[1]
    assert new.name.startswith(f"tinytrack-{time.strftime('%Y', time.gmtime())}")
    assert count(new, "clicks") == 50
    assert rows(new, "PRAGMA integrity_check") == [("ok",)]
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    assert (folder / "notes.txt").exists()
    assert "removed 2 older backups (--keep 2)" in done.stdout

    to_a_file = run("backup", "-c", str(config), str(tmp_path / "one.db"), "--keep", "2", cwd=tmp_path)
    assert (to_a_file.returncode, to_a_file.stderr) == (
        1,
        "tinytrack: --keep: needs a folder as DEST and a count of at least 1\n",
    )
    assert not (tmp_path / "one.db").exists()


# --- 10. config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "retention, message",
    [
        ({"outbox_days": -1}, "retention.outbox_days: must be between 0 and 1000000000, got -1"),
        ({"orphans_days": "30"}, "retention.orphans_days: must be an integer, got '30'"),
        ({"pii_days": True}, "retention.pii_days: must be an integer, got 'True'"),
        ({"conversions_days": 1.5}, "retention.conversions_days: must be an integer, got '1.5'"),
        ({"clicks_days": -90}, "retention.clicks_days: must be between 0 and 1000000000, got -90"),
        ({"interval_minutes": 0}, "retention.interval_minutes: must be between 1 and 1000000000, got 0"),
        ({"click_days": 90}, "retention.click_days: unknown key"),
    ],
)
def test_retention_config_errors_name_the_key(retention: dict, message: str):
    with pytest.raises(tinytrack.ConfigError) as caught:
        tinytrack.build_config({"postback": {"tokens": ["token-123456"]}, "retention": retention})
    assert str(caught.value) == message


def test_retention_config_values_and_a_bad_one_on_the_command_line(tmp_path: Path):
    good = tinytrack.build_config(
        {
            "postback": {"tokens": ["token-123456"]},
            "retention": {
                "clicks_days": 0,
                "conversions_days": 365,
                "pii_days": 7,
                "orphans_days": 0,
                "outbox_days": 14,
                "interval_minutes": 5,
            },
        }
    )
    assert good.retention == tinytrack.RetentionConfig(
        clicks_days=0, conversions_days=365, pii_days=7, orphans_days=0, outbox_days=14, interval_minutes=5
    )
    assert tinytrack.build_config({"postback": {"tokens": ["token-123456"]}}).retention == tinytrack.RetentionConfig(
        90, 0, 30, 30, 30, 60
    )
    bad = write_config(tmp_path, extra='\n[retention]\noutbox_days = "never"\n')
    failed = run("check", "-c", str(bad), cwd=tmp_path)
    assert (failed.returncode, failed.stderr) == (
        1,
        "tinytrack: retention.outbox_days: must be an integer, got 'never'\n",
    )


async def test_a_reload_changes_the_purge_rules_and_a_bad_one_is_refused(app, client, clock, tmp_path: Path):
    t = start_ms(clock)
    cid = await click_at(client, clock, t)
    set_ms(clock, t + 10 * DAY)
    path = tmp_path / "reload.toml"
    path.write_text((tmp_path / "config.toml").read_text() + "\n[retention]\nclicks_days = -5\n")
    assert app.reload(str(path)) is False
    assert app.purger.config.clicks_days == 90
    path.write_text((tmp_path / "config.toml").read_text() + "\n[retention]\nclicks_days = 5\n")
    assert app.reload(str(path)) is True
    assert app.purger.config.clicks_days == 5
    assert (await app.purger.run_once())[CLICKS] == 1
    assert (await postback(client, click_id=cid)).status_code == 404
