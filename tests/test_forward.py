"""Forwarding conversions to traffic sources (issue 5).

Deliveries go to a real scripted HTTP receiver on loopback (tests/receiver.py),
so ``forward.allow_private = true`` everywhere except where the SSRF guard is
the point. Most tests run the app in-process on the real clock (the forwarder's
idle poll is shortened to 50 ms so retry timings can be measured), with the
``tinytrack outbox`` commands run beside it as processes; the kill -9 and SIGTERM
cases use the real ``tinytrack serve`` (conftest's Server, its real 1 s poll).
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import email.utils
import io
import ipaddress
import json
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import asynccontextmanager, closing
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, Server, free_port, new_click, write_config
from receiver import Receiver, Step

import tinytrack

pytestmark = pytest.mark.anyio

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
UA = {"user-agent": "Mozilla/5.0"}
# Every macro, in the query; the path is {sub2}, so each conversion can pick its own script.
EVERY_MACRO = (
    "click_id={click_id}&ext_id={ext_id}&campaign={campaign}&sub1={sub1}&sub2={sub2}&sub3={sub3}"
    "&sub4={sub4}&sub5={sub5}&event={event}&payout={payout}&currency={currency}&txid={txid}"
    "&status={status}&id={id}"
)


# --- set-up -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch):
    """The in-process forwarder looks at the outbox every 50 ms when idle, not every
    second, so a retry's timing is the backoff's, not the poll's. (Server
    subprocesses keep the real 1 s.)"""
    monkeypatch.setattr(tinytrack, "FORWARD_POLL_SECONDS", 0.05)


@pytest.fixture
def receiver():
    running = Receiver([200]).start()
    yield running
    running.stop()


def toml(value: object) -> str:
    return json.dumps(value)  # strings, booleans, integers and lists of strings are the same in TOML


def forward_toml(port: int, *, campaigns: dict[str, dict] | None = None, **forward: object) -> str:
    """The [forward] table (fast settings, private targets allowed unless told) and
    campaigns (default: one, `fwd`) whose postback_url is the receiver's."""
    settings = {"allow_private": True, "first_retry_seconds": 1, "timeout_seconds": 1, **forward}
    lines = ["", "[forward]", *(f"{key} = {toml(value)}" for key, value in settings.items())]
    for name, extra in (campaigns or {"fwd": {}}).items():
        entry = {
            "url": "https://offer.example.com/lp?cid={click_id}",
            "postback_url": f"http://127.0.0.1:{port}/{{sub2}}?{EVERY_MACRO}",
            **extra,
        }
        lines += ["", f"[campaigns.{name}]", *(f"{key} = {toml(value)}" for key, value in entry.items())]
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def tracker(tmp_path: Path, extra: str):
    """The app in-process on the real clock, its forwarder running, and a client."""
    app = tinytrack.create_app(tinytrack.load_config(write_config(tmp_path, extra=extra)))
    await app.startup()
    try:
        transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://tracker.test") as http:
            yield app, http
    finally:
        await app.shutdown()


async def convert(http: httpx.AsyncClient, click_id: str, expect: str | None = None, **params: str) -> dict:
    answer = await http.get("/postback", params={"click_id": click_id, "token": POSTBACK_TOKEN, **params})
    assert answer.status_code == 200, answer.text
    if expect:
        assert answer.json()["status"] == expect, answer.json()
    return answer.json()


async def click_and_convert(http: httpx.AsyncClient, route: str, campaign: str = "fwd", **params: str) -> str:
    """A click on `campaign` whose deliveries go to /<route>, and its conversion."""
    cid = await new_click(http, campaign, sub2=route)
    await convert(http, cid, expect="created", **params)
    return cid


def outbox(db: str | os.PathLike) -> list[dict]:
    with closing(sqlite3.connect(db)) as con:
        con.row_factory = sqlite3.Row
        return [dict(row) for row in con.execute("SELECT * FROM outbox ORDER BY id")]


def attempts(db: str | os.PathLike, outbox_id: int) -> list[tuple]:
    with closing(sqlite3.connect(db)) as con:
        return con.execute(
            "SELECT code, error FROM outbox_attempts WHERE outbox_id = ? ORDER BY rowid", (outbox_id,)
        ).fetchall()


def settled(db: str | os.PathLike, count: int) -> list[dict] | None:
    """The outbox once it holds `count` rows and none is pending."""
    rows = outbox(db)
    return rows if len(rows) == count and all(row["state"] != "pending" for row in rows) else None


async def until(check, timeout: float = 10, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)
    return value


def wait_until(check, timeout: float = 15, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return value


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinytrack", *args], cwd=cwd, capture_output=True, text=True, timeout=30
    )


# --- delivery -------------------------------------------------------------------


async def test_one_200_is_one_hit_with_every_macro_percent_encoded(tmp_path, receiver):
    sub1 = "a b&c=d/é€ +%"
    async with tracker(tmp_path, forward_toml(receiver.port)) as (app, http):
        cid = await new_click(http, "fwd", sub1=sub1, sub2="pb", sub3="x", sub4="", sub5="five", ext_id="E 1")
        await convert(http, cid, expect="created", event="purchase", payout="12.5", currency="eur", txid="T-1")
        [row] = await until(lambda: settled(app.config.storage.path, 1), what="the delivery")
        await asyncio.sleep(0.3)  # time for a (wrong) second try
    [hit] = receiver.hits
    assert (hit.method, hit.path) == ("GET", "/pb")
    assert hit.query == (
        f"click_id={cid}&ext_id=E%201&campaign=fwd&sub1=a%20b%26c%3Dd%2F%C3%A9%E2%82%AC%20%2B%25&sub2=pb&sub3=x"
        "&sub4=&sub5=five&event=purchase&payout=12.50&currency=EUR&txid=T-1&status=approved&id=1"
    )
    assert hit.params["sub1"] == sub1
    assert re.fullmatch(r"[0-9a-f]{32}", hit.key), hit.headers
    assert (row["state"], row["attempts"], row["last_code"], row["status"]) == ("done", 1, 200, "approved")
    assert row["idempotency_key"] == hit.key
    assert row["url"] == receiver.url(f"/pb?{hit.query}")


async def test_500_503_200_is_three_hits_with_one_key_and_growing_backoff(tmp_path):
    with Receiver([500, 503, 200]) as receiver:
        async with tracker(tmp_path, forward_toml(receiver.port)) as (app, http):
            await click_and_convert(http, "pb")
            hits = await receiver.wait_for_async(3, timeout=10)
            [row] = await until(lambda: settled(app.config.storage.path, 1), what="the delivery")
            await asyncio.sleep(0.3)
    assert [hit.status for hit in receiver.hits] == [500, 503, 200]
    assert len({hit.key for hit in hits}) == 1 and hits[0].key == row["idempotency_key"]
    assert (row["state"], row["attempts"], row["last_code"]) == ("done", 3, 200)
    assert [code for code, _ in attempts(app.config.storage.path, row["id"])] == [500, 503, 200]
    # first_retry_seconds = 1, doubling, +-20 % jitter: ~1 s, then ~2 s
    first, second = hits[1].at - hits[0].at, hits[2].at - hits[1].at
    assert 0.75 <= first <= 1.8, first
    assert 1.55 <= second <= 3.0, second


async def test_after_three_failed_tries_a_delivery_goes_to_the_fallback_url(tmp_path):
    with Receiver({"/pb": [500, 503, 500, 500], "/fallback": [200]}) as receiver:
        fallback = f"http://127.0.0.1:{receiver.port}/fallback?c={{click_id}}&s={{status}}"
        extra = forward_toml(receiver.port) + f"\n[campaigns.fwd.forward]\nfallback_url = {toml(fallback)}\n"
        async with tracker(tmp_path, extra) as (app, http):
            cid = await click_and_convert(http, "pb")
            hits = await receiver.wait_for_async(4, timeout=15)
            [row] = await until(lambda: settled(app.config.storage.path, 1), timeout=15, what="the delivery")
            shown = await app.store.read(tinytrack.Database.attempts, row["id"])
    assert [(hit.path, hit.status) for hit in hits] == [("/pb", 500), ("/pb", 503), ("/pb", 500), ("/fallback", 200)]
    assert hits[3].query == f"c={cid}&s=approved" and len({hit.key for hit in hits}) == 1  # one key, both URLs
    assert (row["state"], row["attempts"], row["last_code"]) == ("done", 4, 200)
    primary = f"http://127.0.0.1:{receiver.port}/pb?"
    assert [(a["code"], a["url"].startswith(primary)) for a in shown] == [
        (500, True),
        (503, True),
        (500, True),
        (200, False),
    ]
    assert shown[3]["url"] == f"http://127.0.0.1:{receiver.port}/fallback?c={cid}&s=approved"  # the log says which


async def test_410_404_400_and_302_are_final_and_a_redirect_is_not_followed(tmp_path):
    script = {
        "/gone": [410, 200],
        "/missing": [404, 200],
        "/bad": [400, 200],
        "/followed": [200],
        "/moved": [Step(302, {"Location": "/followed"}), 200],
    }
    with Receiver(script) as receiver:
        async with tracker(tmp_path, forward_toml(receiver.port)) as (app, http):
            for route in ("gone", "missing", "bad", "moved"):
                await click_and_convert(http, route)
            rows = await until(lambda: settled(app.config.storage.path, 4), what="four final answers")
            await asyncio.sleep(1.5)  # past the first retry (0.8-1.2 s after a retryable answer)
            assert outbox(app.config.storage.path) == rows
    by_route = {row["url"].split("?")[0].rsplit("/", 1)[1]: row for row in rows}
    for route, code in (("gone", 410), ("missing", 404), ("bad", 400), ("moved", 302)):
        assert len(receiver.hits_to(f"/{route}")) == 1, route
        row = by_route[route]
        assert (row["state"], row["attempts"], row["last_code"]) == ("failed", 1, code), row
    assert receiver.hits_to("/followed") == []
    assert "410" in by_route["gone"]["last_error"]
    assert "redirect" in by_route["moved"]["last_error"] and "/followed" in by_route["moved"]["last_error"]


async def test_429_and_503_honour_retry_after(tmp_path):
    # first_retry_seconds = 5: a backoff retry would come after 4-6 s, Retry-After says ~1-2 s
    date = email.utils.formatdate(time.time() + 2, usegmt=True)
    script = {
        "/busy": [Step(429, {"Retry-After": "1"}), 200],
        "/down": [Step(503, {"Retry-After": "1"}), 200],
        "/dated": [Step(503, {"Retry-After": date}), 200],
    }
    with Receiver(script) as receiver:
        async with tracker(tmp_path, forward_toml(receiver.port, first_retry_seconds=5)) as (app, http):
            for route in ("busy", "down", "dated"):
                await click_and_convert(http, route)
            rows = await until(lambda: settled(app.config.storage.path, 3), timeout=8, what="three deliveries")
    for route, low, high in (("busy", 0.9, 1.8), ("down", 0.9, 1.8), ("dated", 0.9, 3.0)):
        hits = receiver.hits_to(f"/{route}")
        assert [hit.status for hit in hits] == [int(script[f"/{route}"][0].status), 200], (route, hits)
        first, second = hits
        assert low <= second.at - first.at <= high, (route, second.at - first.at)
        assert first.key == second.key
    assert [(row["state"], row["attempts"], row["last_code"]) for row in rows] == [("done", 2, 200)] * 3


async def test_a_receiver_slower_than_the_timeout_is_retried(tmp_path):
    with Receiver([Step(200, delay=3), 200]) as receiver:
        async with tracker(tmp_path, forward_toml(receiver.port, timeout_seconds=1)) as (app, http):
            await click_and_convert(http, "pb")
            [row] = await until(lambda: settled(app.config.storage.path, 1), what="the delivery")
            tries = attempts(app.config.storage.path, row["id"])
    first, second = receiver.hits
    assert (row["state"], row["attempts"], row["last_code"]) == ("done", 2, 200)
    assert tries[0][0] is None and "1 s" in tries[0][1], tries
    assert tries[1] == (200, None)
    assert first.key == second.key
    assert 1.7 <= second.at - first.at <= 3.0  # the 1 s timeout, then the ~1 s backoff


async def test_a_finished_delivery_is_not_sent_again_from_a_read_made_before_it_finished(tmp_path, receiver):
    """The forwarder reads due rows on the reader connection while deliveries finish
    on the writer. Here, deterministically: a read that still sees the delivery
    pending returns only after its result (200, done) was written. That row must
    not be sent a second time. (Under load this happens by itself: see the final
    answers test, where 4 deliveries finishing together are often sent twice.)"""
    async with tracker(tmp_path, forward_toml(receiver.port)) as (app, http):
        db = app.config.storage.path
        sends: list[str] = []
        release = asyncio.Event()

        async def send(url: str, key: str, timeout: float, allow_private: bool) -> tinytrack.Attempt:
            sends.append(key)
            await release.wait()
            return tinytrack.Attempt(200)

        real_due = app.forwarder.read_due

        async def due_deliveries(now_ms: int, limit: int, offset: int = 0) -> list[tuple]:
            rows = await real_due(now_ms, limit, offset)
            if rows and sends and not release.is_set():
                # This read saw the delivery pending while it was in flight; it answers now...
                release.set()
                await until(lambda: outbox(db)[0]["state"] == "done", what="the result written")
                await asyncio.sleep(0.05)  # ...and its result is written before these rows arrive
            return rows

        app.forwarder.send = send
        app.forwarder.read_due = due_deliveries
        await click_and_convert(http, "pb")
        await until(lambda: release.is_set() and outbox(db)[0]["state"] == "done", what="the delivery")
        await asyncio.sleep(0.3)
        [row] = outbox(db)
    assert len(sends) == 1, f"a delivery answered 200 was sent {len(sends)} times"
    assert (row["state"], row["attempts"]) == ("done", 1)


async def test_deliveries_run_concurrently_but_bounded(tmp_path):
    count = tinytrack.FORWARD_CONCURRENCY + 4
    with Receiver([Step(200, delay=0.5)]) as receiver:
        async with tracker(tmp_path, forward_toml(receiver.port, timeout_seconds=5)) as (app, http):
            for i in range(count):
                await click_and_convert(http, "pb", txid=f"T{i}")
            rows = await until(lambda: settled(app.config.storage.path, count), what="every delivery")
    assert all(row["state"] == "done" for row in rows)
    assert len(receiver.hits) == count
    assert 1 < receiver.max_in_flight <= tinytrack.FORWARD_CONCURRENCY


# --- SSRF guard ---------------------------------------------------------------


async def test_private_targets_are_refused_at_delivery_and_never_contacted(tmp_path, receiver):
    campaigns = {
        "ip": {"postback_url": f"http://127.0.0.1:{receiver.port}/pb?c={{click_id}}"},
        "name": {"postback_url": f"http://localhost:{receiver.port}/pb?c={{click_id}}"},
        "v6": {"postback_url": f"http://[::1]:{receiver.port}/pb?c={{click_id}}"},
    }
    extra = forward_toml(receiver.port, campaigns=campaigns, allow_private=False)
    async with tracker(tmp_path, extra) as (app, http):
        for campaign in campaigns:
            await click_and_convert(http, "pb", campaign=campaign)
        rows = await until(lambda: settled(app.config.storage.path, 3), what="three refusals")
        await asyncio.sleep(1.5)  # a retry would have come by now
        assert outbox(app.config.storage.path) == rows
    assert receiver.hits == [] and receiver.connections == 0
    for row, host in zip(rows, ("127.0.0.1", "localhost", "::1")):
        assert (row["state"], row["attempts"], row["last_code"]) == ("failed", 1, None), row
        assert host in row["last_error"] and "allow_private" in row["last_error"], row["last_error"]


# --- which conversions are forwarded -------------------------------------------


async def test_forward_events_filter(tmp_path, receiver):
    extra = forward_toml(receiver.port, campaigns={"fwd": {"forward_events": ["purchase", "ftd"]}})
    async with tracker(tmp_path, extra) as (app, http):
        cid = await new_click(http, "fwd", sub2="pb")
        await convert(http, cid, expect="created", event="signup")
        await convert(http, cid, expect="created", event="purchase")
        await convert(http, cid, expect="created", event="lead")
        [row] = await until(lambda: settled(app.config.storage.path, 1), what="the purchase")
        await asyncio.sleep(0.3)
    assert [hit.params["event"] for hit in receiver.hits] == ["purchase"]
    assert row["state"] == "done"


async def test_statuses_pending_waits_for_approval_and_duplicates_never_forward_twice(tmp_path, receiver):
    campaigns = {"fwd": {}, "all": {"forward_statuses": ["pending", "approved"]}}
    async with tracker(tmp_path, forward_toml(receiver.port, campaigns=campaigns)) as (app, http):
        db = app.config.storage.path
        default = await new_click(http, "fwd", sub2="default")
        await convert(http, default, expect="created", txid="A", status="pending", payout="3")
        await convert(http, default, expect="duplicate", txid="A", status="pending")
        await asyncio.sleep(0.3)
        assert outbox(db) == [] and receiver.hits == []  # pending is not forwarded by default
        await convert(http, default, expect="updated", txid="A", status="sale")  # status_map: sale = approved
        await convert(http, default, expect="duplicate", txid="A", status="approved")
        await convert(http, default, expect="created", txid="B")
        await asyncio.gather(*(convert(http, default, expect="duplicate", txid="B") for _ in range(5)))
        both = await new_click(http, "all", sub2="all")
        await convert(http, both, expect="created", txid="C", status="pending")
        await convert(http, both, expect="updated", txid="C", status="approved")
        await convert(http, both, expect="duplicate", txid="C", status="approved")
        rows = await until(lambda: settled(db, 4), what="four deliveries")
        await asyncio.sleep(0.3)
        assert len(outbox(db)) == 4
    sent = sorted((hit.path, hit.params["txid"], hit.params["status"], hit.params["payout"]) for hit in receiver.hits)
    assert sent == [
        ("/all", "C", "approved", "0.00"),
        ("/all", "C", "pending", "0.00"),
        ("/default", "A", "approved", "3.00"),
        ("/default", "B", "approved", "0.00"),
    ]
    assert all(row["state"] == "done" for row in rows)
    assert len({row["idempotency_key"] for row in rows}) == 4


async def test_a_reversal_after_delivery_is_forwarded_as_rejected(tmp_path, receiver):
    async with tracker(tmp_path, forward_toml(receiver.port)) as (app, http):
        db = app.config.storage.path
        cid = await click_and_convert(http, "pb", txid="R1", payout="9.99")
        await until(lambda: settled(db, 1), what="the approved delivery")
        await convert(http, cid, expect="updated", txid="R1", status="reversed")  # status_map: reversed = rejected
        await convert(http, cid, expect="duplicate", txid="R1", status="rejected")
        approved, rejected = await until(lambda: settled(db, 2), what="the rejected delivery")
        await asyncio.sleep(0.3)
    assert [(hit.params["status"], hit.params["payout"], hit.params["txid"]) for hit in receiver.hits] == [
        ("approved", "9.99", "R1"),
        ("rejected", "9.99", "R1"),
    ]
    assert (approved["status"], approved["state"], rejected["status"], rejected["state"]) == (
        "approved",
        "done",
        "rejected",
        "done",
    )
    assert receiver.hits[0].key != receiver.hits[1].key


async def test_a_reversal_before_delivery_cancels_it_and_sends_nothing(tmp_path, receiver):
    async with tracker(tmp_path, forward_toml(receiver.port, delay_seconds=1)) as (app, http):
        db = app.config.storage.path
        cid = await click_and_convert(http, "pb", txid="R2")
        [row] = outbox(db)
        assert (row["state"], row["attempts"]) == ("pending", 0)
        assert 900 <= row["next_at"] - row["created_at"] <= 1100  # delay_seconds
        await convert(http, cid, expect="updated", txid="R2", status="rejected")
        await asyncio.sleep(1.5)  # past the delay, and many polls
        rows = outbox(db)
    assert receiver.hits == [] and receiver.connections == 0
    assert [(row["status"], row["state"], row["attempts"]) for row in rows] == [("approved", "canceled", 0)]


async def test_a_reversal_while_the_approval_is_being_retried_is_the_last_word(tmp_path):
    """The source must end up told `rejected`: a retry of the earlier `approved`
    must not arrive (successfully) after the `rejected` did."""
    with Receiver([503, 200]) as receiver:  # the approved's first try fails, every later request succeeds
        async with tracker(tmp_path, forward_toml(receiver.port)) as (app, http):
            db = app.config.storage.path
            cid = await click_and_convert(http, "pb", txid="R3")
            await receiver.wait_for_async(1)
            await until(lambda: outbox(db)[0]["attempts"] == 1, what="the first attempt recorded")
            await convert(http, cid, expect="updated", txid="R3", status="rejected")
            await until(lambda: all(row["state"] != "pending" for row in outbox(db)), what="every delivery settled")
            await asyncio.sleep(0.3)
    told = [hit.params["status"] for hit in receiver.hits if 200 <= hit.status < 300]
    assert told and told[-1] == "rejected", (
        f"the source was told {[(h.params['status'], h.status) for h in receiver.hits]}: "
        "its last accepted word is not the reversal"
    )


# --- durability and shutdown (the real server) ----------------------------------


def serve(tmp_path: Path, extra: str) -> tuple[Server, Path]:
    config_path = write_config(tmp_path, free_port(), extra)
    return Server(tmp_path, config_path, free_port()).start(), config_path


def convert_on(server: Server, route: str, txid: str = "K1") -> str:
    with server.client() as http:
        location = http.get("/c/fwd", params={"sub2": route}, headers=UA).headers["location"]
        cid = location.split("cid=")[1]
        answer = http.get("/postback", params={"click_id": cid, "txid": txid, "token": POSTBACK_TOKEN})
    assert answer.json() == {"status": "created", "id": 1}, answer.text
    return cid


def kill(*servers: Server | None) -> None:
    for server in servers:
        if server and server.process and server.process.poll() is None:
            server.stop(signal.SIGKILL)


@pytest.mark.parametrize("source", ["down", "503", "in-flight"])
def test_an_acknowledged_conversion_is_delivered_after_kill_9(tmp_path: Path, source: str):
    """down: nothing listens until after the restart. 503: a first try failed before
    the kill. in-flight: the kill lands while the source holds the request, so its
    result is never recorded; the restart sends it again, with the same key."""
    port = free_port()
    receiver = Receiver([Step(200, delay=10)] if source == "in-flight" else [503], port=port)
    if source != "down":
        receiver.start()
    first = second = None
    db = tmp_path / "tinytrack.db"
    try:
        first, config_path = serve(tmp_path, forward_toml(port, timeout_seconds=30))
        convert_on(first, "pb")
        if source != "down":
            receiver.wait_for(1)  # a first try reached the source before the kill
        if source == "503":
            wait_until(lambda: outbox(db)[0]["attempts"] == 1, what="the 503 recorded")
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        [row] = outbox(db)  # written with the conversion, so it survived
        assert row["state"] == "pending"
        if source != "down":  # (down: a refused try may or may not have been recorded)
            assert row["attempts"] == {"503": 1, "in-flight": 0}[source]  # in flight: no result written
        tried = len(receiver.hits)

        receiver.set_script([200])
        if source == "down":
            receiver.start()  # the source comes up on the port it was down on
        second = Server(tmp_path, config_path, free_port()).start()
        receiver.wait_for(tried + 1, timeout=15)
        [row] = wait_until(lambda: settled(db, 1), what="the delivery")
        assert second.stop() == 0
    finally:
        kill(first, second)
        receiver.stop()
    assert (row["state"], row["last_code"]) == ("done", 200)
    assert [hit.status for hit in receiver.hits] == {"down": [200], "503": [503, 200], "in-flight": [200, 200]}[source]
    assert {hit.key for hit in receiver.hits} == {row["idempotency_key"]}


def test_sigterm_gives_in_flight_deliveries_bounded_time_then_they_stay_pending(tmp_path: Path):
    receiver = Receiver([Step(200, delay=30)]).start()
    first = second = None
    db = tmp_path / "tinytrack.db"
    try:
        first, config_path = serve(tmp_path, forward_toml(receiver.port, timeout_seconds=60))
        convert_on(first, "pb")
        [hit] = receiver.wait_for(1)  # in flight: the receiver sits on it for 30 s
        started = time.monotonic()
        code = first.stop(signal.SIGTERM, timeout=30)
        took = time.monotonic() - started
        assert code == 0, first.output()
        assert took <= tinytrack.FORWARD_SHUTDOWN_SECONDS + 3, f"SIGTERM took {took:.1f} s"
        [row] = outbox(db)
        assert (row["state"], row["attempts"], row["last_at"]) == ("pending", 0, None)
        assert attempts(db, row["id"]) == []

        receiver.set_script([200])
        second = Server(tmp_path, config_path, free_port()).start()
        receiver.wait_for(2, timeout=10)
        [row] = wait_until(lambda: settled(db, 1), what="the delivery after the restart")
        assert second.stop() == 0
    finally:
        kill(first, second)
        receiver.stop()
    assert (row["state"], row["attempts"], row["last_code"]) == ("done", 1, 200)
    assert [h.key for h in receiver.hits] == [hit.key, hit.key] == [row["idempotency_key"]] * 2


# --- the outbox CLI --------------------------------------------------------------


async def test_outbox_list_show_and_retry(tmp_path):
    # max_age_hours = 1 and a Retry-After of 2 h: dead after its first try.
    script = {"/dead": [Step(503, {"Retry-After": "7200"}), 200], "/gone": [410, 200], "/ok": [200]}
    with Receiver(script) as receiver:
        extra = forward_toml(receiver.port, max_age_hours=1)
        async with tracker(tmp_path, extra) as (app, http):
            db, config = app.config.storage.path, str(tmp_path / "config.toml")
            for route in ("dead", "gone", "ok"):
                await click_and_convert(http, route)
            dead, gone, ok = await until(lambda: settled(db, 3), what="three settled deliveries")
            assert [dead["state"], gone["state"], ok["state"]] == ["dead", "failed", "done"]

            def run(*args: str) -> subprocess.CompletedProcess:
                return cli("outbox", *args, "-c", config, cwd=tmp_path)

            listing = await asyncio.to_thread(run, "list")
            assert listing.returncode == 0, listing.stderr
            lines = listing.stdout.splitlines()
            assert lines[0].split()[:2] == ["id", "state"] and len(lines) == 4
            assert [line.split()[:2] for line in lines[1:]] == [["1", "dead"], ["2", "failed"], ["3", "done"]]
            only_dead = await asyncio.to_thread(run, "list", "--state", "dead")
            assert [line.split()[:2] for line in only_dead.stdout.splitlines()[1:]] == [["1", "dead"]]
            none = await asyncio.to_thread(run, "list", "--state", "canceled")
            assert (none.returncode, none.stdout) == (0, "no canceled deliveries\n")

            show = await asyncio.to_thread(run, "show", "1")
            assert show.returncode == 0, show.stderr
            assert re.search(r"^ +state  dead$", show.stdout, re.M), show.stdout
            assert re.search(r"^ +url  " + re.escape(dead["url"]) + "$", show.stdout, re.M)
            assert re.search(r"^ +last_code  503$", show.stdout, re.M)
            assert re.search(r"^\d{4}-\d\d-\d\dT\S+Z +503 +\d+", show.stdout, re.M), (
                show.stdout
            )  # the attempt: at, code, ms
            missing = await asyncio.to_thread(run, "show", "99")
            assert (missing.returncode, missing.stdout, missing.stderr) == (
                1,
                "",
                "tinytrack: outbox: no delivery 99\n",
            )
            nothing = await asyncio.to_thread(run, "retry")
            assert (
                nothing.returncode == 1 and nothing.stderr.count("\n") == 1 and nothing.stderr.startswith("tinytrack: ")
            )
            no_config = await asyncio.to_thread(cli, "outbox", "list", "-c", str(tmp_path / "nope.toml"), cwd=tmp_path)
            assert (no_config.returncode, no_config.stderr.count("\n")) == (1, 1) and "nope.toml" in no_config.stderr
            unknown = await asyncio.to_thread(run, "retry", "99")
            assert "99" in unknown.stderr and [row["state"] for row in outbox(db)] == ["dead", "failed", "done"]

            again = await asyncio.to_thread(run, "retry", "--all-dead")
            assert (again.returncode, again.stdout) == (0, "1 deliveries pending again\n"), again.stderr
            await receiver.wait_for_async(2, path="/dead")
            by_id = await asyncio.to_thread(run, "retry", "2")
            assert (by_id.returncode, by_id.stdout) == (0, "1 deliveries pending again\n"), by_id.stderr
            await receiver.wait_for_async(2, path="/gone")
            rows = await until(lambda: settled(db, 3), what="the retried deliveries")
    assert [(row["state"], row["attempts"], row["last_code"]) for row in rows] == [
        ("done", 2, 200),
        ("done", 2, 200),
        ("done", 1, 200),
    ]
    for route, row in zip(("dead", "gone"), rows):
        assert {hit.key for hit in receiver.hits_to(f"/{route}")} == {row["idempotency_key"]}
    assert len(receiver.hits_to("/ok")) == 1


async def test_outbox_replay_queues_again_with_the_current_postback_url(tmp_path, receiver):
    campaigns = {"fwd": {}, "other": {}}
    async with tracker(tmp_path, forward_toml(receiver.port, campaigns=campaigns)) as (app, http):
        db, config = app.config.storage.path, tmp_path / "config.toml"
        await click_and_convert(http, "pb", txid="P1")
        await click_and_convert(http, "pb", txid="P2", status="pending")  # not forwarded, nor replayed
        await click_and_convert(http, "pb", campaign="other", txid="P3")
        await until(lambda: settled(db, 2), what="the first deliveries")
        config.write_text(config.read_text().replace(f":{receiver.port}/{{sub2}}?", f":{receiver.port}/v2/{{sub2}}?"))

        def run(*args: str) -> subprocess.CompletedProcess:
            return cli("outbox", "replay", *args, "-c", str(config), cwd=tmp_path)

        today = time.strftime("%Y-%m-%d", time.gmtime())
        dry = await asyncio.to_thread(run, "--since", today, "--dry-run")
        assert (dry.returncode, dry.stdout) == (0, "would queue 2 deliveries\n  fwd: 1\n  other: 1\n"), dry.stderr
        assert len(outbox(db)) == 2
        later = await asyncio.to_thread(run, "--since", "2999-01-01")
        assert (later.returncode, later.stdout) == (0, "queued 0 deliveries\n")
        bad = await asyncio.to_thread(run, "--since", "yesterday")
        assert bad.returncode == 1 and bad.stderr.startswith("tinytrack: --since") and bad.stderr.count("\n") == 1
        unknown = await asyncio.to_thread(run, "--since", today, "--campaign", "nope")
        assert unknown.returncode == 1 and "nope" in unknown.stderr and unknown.stderr.count("\n") == 1

        done = await asyncio.to_thread(run, "--since", today, "--campaign", "fwd")
        assert (done.returncode, done.stdout) == (0, "queued 1 deliveries\n  fwd: 1\n"), done.stderr
        rows = await until(lambda: settled(db, 3), what="the replayed delivery")
        await asyncio.sleep(0.3)
    first, other, replayed = rows
    assert (replayed["campaign"], replayed["conversion_id"], replayed["state"]) == (
        "fwd",
        first["conversion_id"],
        "done",
    )
    assert replayed["url"] == first["url"].replace("/pb?", "/v2/pb?")
    assert replayed["idempotency_key"] not in (first["idempotency_key"], other["idempotency_key"])
    [hit] = receiver.hits_to("/v2/pb")
    assert hit.params["txid"] == "P1" and hit.key == replayed["idempotency_key"]
    assert len(receiver.hits) == 3


# --- /api/outbox ------------------------------------------------------------------


async def test_api_outbox(tmp_path):
    with Receiver({"/ok": [200], "/gone": [410]}) as receiver:
        async with tracker(tmp_path, forward_toml(receiver.port)) as (app, http):
            await click_and_convert(http, "ok", txid="A1")
            await click_and_convert(http, "gone", txid="A2")
            await until(lambda: settled(app.config.storage.path, 2), what="two deliveries")
            unauthenticated = await http.get("/api/outbox")
            as_postback = await http.get("/api/outbox", headers={"authorization": f"Bearer {POSTBACK_TOKEN}"})
            every = (await http.get("/api/outbox", headers=ADMIN)).json()
            done = (await http.get("/api/outbox", params={"state": "done"}, headers=ADMIN)).json()
            failed = (await http.get("/api/outbox", params={"state": "failed"}, headers=ADMIN)).json()
            page = (await http.get("/api/outbox", params={"limit": "1"}, headers=ADMIN)).json()
            rest = (await http.get("/api/outbox", params={"after": page["next"]}, headers=ADMIN)).json()
            later = (await http.get("/api/outbox", params={"since": "2999-01-01"}, headers=ADMIN)).json()
            bad = await http.get("/api/outbox", params={"state": "lost"}, headers=ADMIN)
            as_csv = await http.get("/api/outbox", params={"format": "csv"}, headers=ADMIN)
    assert unauthenticated.status_code == as_postback.status_code == 401
    assert [(r["id"], r["state"], r["last_code"]) for r in every["rows"]] == [(1, "done", 200), (2, "failed", 410)]
    assert set(every["rows"][0]) == set(tinytrack.OUTBOX_COLUMNS)
    assert "idempotency_key" not in every["rows"][0]
    assert [r["id"] for r in done["rows"]] == [1] and [r["id"] for r in failed["rows"]] == [2]
    assert ([r["id"] for r in page["rows"]], page["next"], [r["id"] for r in rest["rows"]]) == ([1], "1", [2])
    assert later["rows"] == []
    assert bad.status_code == 400 and bad.json()["error"].startswith("state: ") and "'lost'" in bad.json()["error"]
    assert as_csv.headers["content-type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(as_csv.text)))
    assert table[0] == list(tinytrack.OUTBOX_COLUMNS)
    assert [(line[0], line[4]) for line in table[1:]] == [("1", "done"), ("2", "failed")]


# --- send_forward against the receiver, and the pure decisions ----------------------


async def test_send_forward_one_try_at_a_time(receiver):
    receiver.set_script(
        {
            "/ok": [204],
            "/moved": [Step(301, {"Location": "http://example.com/"})],
            "/busy": [Step(503, {"Retry-After": "2"})],
            "/slow": [Step(200, delay=2)],
        }
    )
    send = tinytrack.send_forward
    ok = await send(receiver.url("/ok?a=1"), "key-1", 1, True)
    assert (ok.code, ok.error, ok.final) == (204, None, False)
    [hit] = receiver.hits
    assert (hit.path, hit.query, hit.key) == ("/ok", "a=1", "key-1")
    moved = await send(receiver.url("/moved"), "k", 1, True)
    assert moved.code == 301 and "not followed" in moved.error
    busy = await send(receiver.url("/busy"), "k", 1, True)
    assert (busy.code, busy.retry_after) == (503, 2.0)
    slow = await send(receiver.url("/slow"), "k", 1, True)
    assert slow.code is None and "1 s" in slow.error
    refused = await send(receiver.url("/ok"), "k", 1, False)
    assert refused.final and refused.code is None and "127.0.0.1" in refused.error
    assert len(receiver.hits) == 4
    closed = await send(f"http://127.0.0.1:{free_port()}/", "k", 1, True)
    assert closed.code is None and not closed.final and closed.error


async def test_send_forward_a_garbage_answer_is_an_error():
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SPAM SPAM SPAM\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        attempt = await tinytrack.send_forward(f"http://127.0.0.1:{port}/", "k", 2, True)
    assert attempt.code is None and attempt.error and not attempt.final


NOW = 1_790_000_000_000  # ms
CONF = tinytrack.ForwardConfig(first_retry_seconds=10, max_age_hours=72)
FAR = NOW + 72 * 3_600_000
A = tinytrack.Attempt


@pytest.mark.parametrize(
    "attempt, state",
    [
        (A(200), "done"),
        (A(204), "done"),
        (A(299), "done"),
        (A(410), "failed"),
        (A(404), "failed"),
        (A(400), "failed"),
        (A(401), "failed"),
        (A(422), "failed"),
        (A(301, "redirect to 'x' not followed"), "failed"),
        (A(302, "redirect"), "failed"),
        (A(304), "failed"),
        (A(None, "refused: private", final=True), "failed"),
        (A(500), "pending"),
        (A(502), "pending"),
        (A(503), "pending"),
        (A(429), "pending"),
        (A(None, "no answer within 1 s"), "pending"),
        (A(None, "cannot connect: refused"), "pending"),
    ],
)
def test_next_step_states(attempt, state):
    got, due, error = tinytrack.next_step(attempt, 1, FAR, NOW, CONF, rng=lambda: 0.5)
    assert got == state
    if state == "done":
        assert (due, error) == (NOW, None)
    elif state == "failed":
        assert error and due == NOW
        if attempt.code == 410:
            assert "410" in error
        if attempt.error:
            assert attempt.error in error
    else:
        assert due == NOW + 10_000 and error == (attempt.error or f"HTTP {attempt.code}")


def test_next_step_backoff_doubles_and_is_capped():
    delays = [tinytrack.next_step(A(500), n, 10**15, NOW, CONF, rng=lambda: 0.5)[1] - NOW for n in range(1, 8)]
    assert delays == [10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 640_000]
    capped = tinytrack.next_step(A(500), 60, 10**15, NOW, CONF, rng=lambda: 0.5)[1] - NOW
    assert capped == tinytrack.MAX_BACKOFF_SECONDS * 1000


def test_next_step_jitter_stays_within_20_percent():
    rng = random.Random(5)
    delays = [tinytrack.next_step(A(503), 3, FAR, NOW, CONF, rng=rng.random)[1] - NOW for _ in range(2000)]
    assert all(32_000 <= d <= 48_000 for d in delays)  # 40 s +- 20 %
    assert min(delays) < 33_000 and max(delays) > 47_000 and len(set(delays)) > 1000
    edges = [tinytrack.next_step(A(503), 3, FAR, NOW, CONF, rng=lambda v=v: v)[1] - NOW for v in (0.0, 0.999999)]
    assert edges[0] == 32_000 and 47_999 <= edges[1] <= 48_000


def test_next_step_retry_after_for_429_and_503_only():
    assert tinytrack.next_step(A(429, retry_after=3), 1, FAR, NOW, CONF, rng=lambda: 0.9) == (
        "pending",
        NOW + 3000,
        "HTTP 429",
    )
    assert tinytrack.next_step(A(503, retry_after=120), 5, FAR, NOW, CONF, rng=lambda: 0.9)[:2] == (
        "pending",
        NOW + 120_000,
    )
    assert tinytrack.next_step(A(503, retry_after=0), 1, FAR, NOW, CONF)[:2] == ("pending", NOW)
    huge = tinytrack.next_step(A(429, retry_after=10**9), 1, 10**15, NOW, CONF)
    assert huge[:2] == ("pending", NOW + tinytrack.MAX_BACKOFF_SECONDS * 1000)
    # other codes: the backoff, whatever their Retry-After says
    assert tinytrack.next_step(A(500, retry_after=3), 1, FAR, NOW, CONF, rng=lambda: 0.5)[1] == NOW + 10_000


def test_next_step_dead_past_the_deadline():
    state, due, error = tinytrack.next_step(A(500), 4, NOW + 60_000, NOW, CONF, rng=lambda: 0.5)  # next try in 80 s
    assert state == "dead" and due == NOW and "HTTP 500" in error and "4" in error
    assert tinytrack.next_step(A(500), 4, NOW + 100_000, NOW, CONF, rng=lambda: 0.5)[0] == "pending"
    assert tinytrack.next_step(A(429, retry_after=7200), 1, NOW + 3_600_000, NOW, CONF)[0] == "dead"
    assert tinytrack.next_step(A(None, "no answer within 10 s"), 9, NOW, NOW, CONF)[0] == "dead"
    assert tinytrack.next_step(A(200), 99, NOW - 1, NOW, CONF)[0] == "done"  # a late success still counts


@pytest.mark.parametrize(
    "address, public",
    [
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("127.9.9.9", False),
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("239.255.255.250", False),
        ("0.0.0.0", False),
        ("255.255.255.255", False),
        ("100.64.0.1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("fd12:3456::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("64:ff9b::7f00:1", False),
        ("64:ff9b::a00:1", False),
        ("2002:7f00:1::", False),
        ("2002:a00:1::1", False),
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2606:4700::1111", True),
        ("2001:4860:4860::8888", True),
        ("64:ff9b::808:808", True),
    ],
)
def test_is_public(address, public):
    assert tinytrack.is_public(ipaddress.ip_address(address)) is public


def test_is_public_refuses_the_local_use_nat64_prefix():
    """RFC 8215's 64:ff9b:1::/48 is NAT64 too (IANA: not globally reachable); with a
    local translator 64:ff9b:1::a00:1 is 10.0.0.1. Python before 3.12.4 calls it global."""
    assert tinytrack.is_public(ipaddress.ip_address("64:ff9b:1::a00:1")) is False
    assert tinytrack.is_public(ipaddress.ip_address("64:ff9b:1::7f00:1")) is False


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("1", 1.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        (email.utils.formatdate(NOW / 1000 + 30, usegmt=True), 30.0),
        (email.utils.formatdate(NOW / 1000 - 30, usegmt=True), 0.0),  # a date past: now
        (
            email.utils.format_datetime(dt.datetime.fromtimestamp(NOW / 1000 + 90, dt.timezone(dt.timedelta(hours=2)))),
            90.0,
        ),
        ("garbage", None),
        ("", None),
        (None, None),
        ("1.5", None),
        ("-1", None),
        ("Wed, 21 Oct 2015 07:28:00", None),
    ],
)
def test_parse_retry_after(text, seconds):
    assert tinytrack.parse_retry_after(text, NOW / 1000) == seconds


# --- deliveries that can never be sent ------------------------------------------------


@pytest.mark.parametrize(
    "postback_url",
    [
        "http://127.0.0.1:99999/pb?c={click_id}",  # a port urlsplit refuses
        "http://127.0.0.1:{port}/café?c={click_id}",  # a path h11 cannot send (not ASCII)
    ],
)
async def test_an_unsendable_url_is_refused_by_the_config_or_fails_once(tmp_path, receiver, caplog, postback_url):
    """Either `tinytrack check` refuses it, or its delivery fails with a recorded
    attempt. Not: no attempt recorded and retried at once, over and over."""
    caplog.set_level(logging.CRITICAL, "tinytrack")  # else a failure shows a traceback per try, thousands
    url = postback_url.replace("{port}", str(receiver.port))
    extra = forward_toml(receiver.port, campaigns={"fwd": {"postback_url": url}})
    try:
        tinytrack.load_config(write_config(tmp_path, extra=extra))
    except tinytrack.ConfigError as exc:
        assert "campaigns.fwd.postback_url" in str(exc)
        return
    async with tracker(tmp_path, extra) as (app, http):
        calls = 0
        real_send = app.forwarder.send

        async def counting_send(*args):
            nonlocal calls
            calls += 1
            return await real_send(*args)

        app.forwarder.send = counting_send
        await click_and_convert(http, "pb")
        await asyncio.sleep(1.0)
        rows = outbox(app.config.storage.path)
    assert calls <= 3 and receiver.connections <= 3, (
        f"{calls} tries in 1 s, {receiver.connections} connections to the source"
    )
    [row] = rows
    assert row["attempts"] == calls and row["last_error"], row  # each try recorded, with why
    assert row["state"] == "failed", row  # it can never succeed
