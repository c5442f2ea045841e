from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import sqlite3

import httpx
import orjson
import pytest
from conftest import POSTBACK_TOKEN, new_click

import tinytrack

pytestmark = pytest.mark.anyio


def rows(app, sql: str) -> list[tuple]:
    with sqlite3.connect(app.config.storage.path) as con:
        return con.execute(sql).fetchall()


def counts(app) -> tuple[int, int, int]:
    return tuple(rows(app, f"SELECT count(*) FROM {t}")[0][0] for t in ("conversions", "conversion_history", "orphans"))


async def postback(client: httpx.AsyncClient, **params) -> httpx.Response:
    params.setdefault("token", POSTBACK_TOKEN)
    return await client.get("/postback", params=params)


async def test_created_duplicate_and_the_conversion_keeps_its_click(app, client):
    cid = await new_click(client, sub1="s1", sub3="s3", ext_id="E1")
    first = await postback(client, click_id=cid, payout="12.50", currency="eur", txid="T-1")
    assert (first.status_code, first.json()) == (200, {"status": "created", "id": 1})
    again = await postback(client, click_id=cid, payout="12.50", currency="eur", txid="T-1")
    assert (again.status_code, again.json()) == (200, {"status": "duplicate", "id": 1})
    [row] = rows(app, "SELECT campaign, sub1, sub3, ext_id, event, txid, status, payout, currency FROM conversions")
    assert row == ("spring", "s1", "s3", "E1", "conversion", "T-1", "approved", 12_500_000, "EUR")
    assert counts(app) == (1, 1, 0)


async def test_dedupe_by_txid_then_by_event(app, client):
    cid = await new_click(client)
    answers = [
        await postback(client, click_id=cid, txid="A"),
        await postback(client, click_id=cid, txid="B"),  # another txid: another conversion
        await postback(client, click_id=cid, txid="A"),
        await postback(client, click_id=cid, event="signup"),  # no txid: keyed by event
        await postback(client, click_id=cid, event="signup"),
        await postback(client, click_id=cid, event="ftd"),
    ]
    assert [a.json() for a in answers] == [
        {"status": "created", "id": 1},
        {"status": "created", "id": 2},
        {"status": "duplicate", "id": 1},
        {"status": "created", "id": 3},
        {"status": "duplicate", "id": 3},
        {"status": "created", "id": 4},
    ]


async def test_pending_approved_rejected_is_kept_with_history(app, client):
    cid = await new_click(client)
    steps = [
        ("pending", "5.00", "created"),
        ("pending", None, "duplicate"),
        ("sale", None, "updated"),
        ("approved", None, "duplicate"),
        ("reversed", None, "updated"),
    ]
    for status, payout, expected in steps:
        params = {"click_id": cid, "txid": "ORDER-7", "status": status}
        if payout:
            params["payout"] = payout
        answer = await postback(client, **params)
        assert answer.json() == {"status": expected, "id": 1}, status
    assert rows(app, "SELECT status, payout FROM conversions") == [("rejected", 5_000_000)]
    history = rows(app, "SELECT status, payout FROM conversion_history WHERE conversion_id = 1 ORDER BY rowid")
    assert history == [("pending", 5_000_000), ("approved", 5_000_000), ("rejected", 5_000_000)]


async def test_status_change_with_a_new_payout_updates_it(app, client):
    cid = await new_click(client)
    await postback(client, click_id=cid, txid="X", status="pending", payout="1")
    answer = await postback(client, click_id=cid, txid="X", status="approved", payout="2.25")
    assert answer.json() == {"status": "updated", "id": 1}
    assert rows(app, "SELECT status, payout FROM conversions") == [("approved", 2_250_000)]


async def test_sixty_four_identical_concurrent_postbacks_count_once(app, client):
    cid = await new_click(client)
    answers = await asyncio.gather(*(postback(client, click_id=cid, txid="SAME", payout="3") for _ in range(64)))
    bodies = [a.json() for a in answers]
    assert all(a.status_code == 200 for a in answers)
    assert bodies.count({"status": "created", "id": 1}) == 1
    assert bodies.count({"status": "duplicate", "id": 1}) == 63
    assert counts(app) == (1, 1, 0)


async def test_post_json_and_form_with_aliases(app, client):
    cid = await new_click(client)
    as_json = await client.post(
        "/postback",
        content=orjson.dumps({"cid": cid, "et": "purchase", "amount": 49.0, "tid": "J1", "token": POSTBACK_TOKEN}),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert as_json.json() == {"status": "created", "id": 1}
    as_form = await client.post(
        "/postback",
        data={"subid": cid, "type": "purchase", "revenue": "1.5", "order_id": "F1"},
        headers={"authorization": f"Bearer {POSTBACK_TOKEN}"},
    )
    assert as_form.json() == {"status": "created", "id": 2}
    assert rows(app, "SELECT event, txid, payout FROM conversions ORDER BY id") == [
        ("purchase", "J1", 49_000_000),
        ("purchase", "F1", 1_500_000),
    ]


async def test_get_postback_fits_in_200_bytes(app, client):
    cid = await new_click(client)
    ts = int(app.clock())  # unix seconds: ten digits, as 1790000000
    line = f"GET /postback?cid={cid}&et=purchase&sum=123.45&currency=USD&tid=ORD-123456&status=approved&ts={ts}&key={POSTBACK_TOKEN} HTTP/1.1"
    assert len(line) < 200
    answer = await client.get(line.split(" ")[1])
    assert answer.json()["status"] == "created"


async def test_unknown_click_is_404_and_kept_as_an_orphan(app, client):
    orphan = "0190a6b2-7c1d-7abc-8def-0123456789ab"
    for _ in range(3):
        answer = await postback(client, click_id=orphan, payout="7", txid="O-1")
        assert (answer.status_code, answer.json()) == (404, {"error": "unknown click_id"})
    assert rows(app, "SELECT click_id, txid, payout, hits FROM orphans") == [(orphan, "O-1", 7_000_000, 3)]
    assert counts(app)[0] == 0


async def test_outside_the_attribution_window_is_rejected_and_stored(app, client, clock):
    answer = await client.get("/c/windowed", headers={"user-agent": "Mozilla/5.0"})
    cid = answer.headers["location"].split("c=")[1]
    clock.now += 8 * 86400
    late = await postback(client, click_id=cid, txid="L1")
    assert (late.status_code, late.json()) == (200, {"status": "rejected", "reason": "outside_window"})
    assert (await postback(client, click_id=cid, txid="L1")).json() == {
        "status": "rejected",
        "reason": "outside_window",
    }
    assert rows(app, "SELECT status, reason FROM conversions") == [("rejected", "outside_window")]
    in_time = await postback(client, click_id=cid, txid="L2", ts=str(int(clock.now - 7 * 86400)))
    assert in_time.json()["status"] == "created"


@pytest.mark.parametrize(
    "params, message",
    [
        ({}, "click_id: is required"),
        ({"click_id": "{clickid}"}, "click_id: must be a click id issued by this server (a UUID), got '{clickid}'"),
        ({"payout": "1,5"}, "payout: must be a decimal >= 0 with at most 6 decimals, got '1,5'"),
        (
            {"status": "paid"},
            "status: must be one of approved, pending, rejected or a postback.status_map word, got 'paid'",
        ),
        ({"currency": "EURO"}, "currency: must be a three-letter ISO 4217 code, got 'EURO'"),
        ({"event": "Sign Up!"}, "event: must match [a-z0-9_]{1,32}, got 'sign up!'"),
        ({"txid": "has space"}, "txid: must be 1-64 characters of A-Z a-z 0-9 . _ : -, got 'has space'"),
        (
            {"ts": "2026-01-01T00:00:00"},
            "ts: needs a UTC offset (like 2026-01-06T14:03:22Z), got '2026-01-01T00:00:00'",
        ),
    ],
)
async def test_bad_fields_are_400_naming_the_field_and_store_nothing(app, client, params, message):
    cid = await new_click(client)
    params = {"click_id": cid, **params} if "click_id" not in params and params else params
    answer = await postback(client, **params)
    assert (answer.status_code, answer.json()) == (400, {"error": message})
    assert counts(app) == (0, 0, 0)


@pytest.mark.parametrize(
    "body, content_type, status, message",
    [
        (b"{not json", "application/json", 400, "body: invalid JSON"),
        (b"[1, 2]", "application/json", 400, "body: must be a JSON object"),
        (b'{"click_id": true}', "application/json", 400, "click_id: must be a string or a number, got a boolean"),
        (b"click_id=%ff", "application/x-www-form-urlencoded", 400, "click_id: not valid UTF-8"),
        (b"<xml/>", "text/xml", 415, "content-type: must be application/json or application/x-www-form-urlencoded"),
        (b"a=1", None, 415, "content-type: must be application/json or application/x-www-form-urlencoded"),
        (b"x" * 1025, "application/json", 413, "body: more than 1024 bytes"),
    ],
)
async def test_bad_bodies(app, client, body, content_type, status, message):
    headers = {"authorization": f"Bearer {POSTBACK_TOKEN}"}
    if content_type:
        headers["content-type"] = content_type
    answer = await client.post("/postback", content=body, headers=headers)
    assert (answer.status_code, answer.json()) == (status, {"error": message})
    assert counts(app) == (0, 0, 0)


async def test_chunked_body_over_the_limit_is_413(app, client):
    async def chunks():
        for _ in range(20):
            yield b"x" * 100

    answer = await client.post("/postback", content=chunks(), headers={"content-type": "application/json"})
    assert (answer.status_code, answer.json()) == (413, {"error": "body: more than 1024 bytes"})


@pytest.mark.parametrize("auth", [{}, {"token": "wrong-token-000"}, {"key": POSTBACK_TOKEN[:-1]}])
async def test_missing_or_wrong_token_is_401(app, client, auth):
    cid = await new_click(client)
    answer = await client.get("/postback", params={"click_id": cid, **auth})
    assert (answer.status_code, answer.json()) == (401, {"error": "unauthorized"})
    assert counts(app) == (0, 0, 0)


async def test_token_as_key_or_bearer(app, client):
    cid = await new_click(client)
    by_key = await client.get("/postback", params={"click_id": cid, "key": POSTBACK_TOKEN, "txid": "k"})
    by_bearer = await client.get(
        "/postback", params={"click_id": cid, "txid": "b"}, headers={"authorization": f"bearer {POSTBACK_TOKEN}"}
    )
    assert by_key.json()["status"] == by_bearer.json()["status"] == "created"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD"])
async def test_other_methods_are_405(app, client, method):
    answer = await client.request(method, "/postback")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, POST"


async def test_allowlist_403(config, clock):
    allowed = dataclasses.replace(config.postback, allow_ips=(ipaddress.ip_network("203.0.113.0/24"),))
    app = tinytrack.create_app(dataclasses.replace(config, postback=allowed), clock=clock)
    await app.startup()
    try:

        async def client_from(address: str) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 1)), base_url="http://t")

        async with await client_from("198.51.100.7") as outsider, await client_from("203.0.113.9") as network:
            cid = await new_click(outsider)
            refused = await postback(outsider, click_id=cid, txid="1")
            spoofed = await outsider.get(
                "/postback",
                params={"click_id": cid, "token": POSTBACK_TOKEN},
                headers={"x-forwarded-for": "203.0.113.9"},
            )
            accepted = await postback(network, click_id=cid, txid="2")
    finally:
        await app.shutdown()
    assert (refused.status_code, refused.json()) == (403, {"error": "forbidden"})
    assert spoofed.status_code == 403
    assert accepted.json() == {"status": "created", "id": 1}


async def test_storage_failure_is_503_never_200(app, client):
    cid = await new_click(client)
    with sqlite3.connect(app.config.storage.path) as con:
        con.execute("CREATE TRIGGER boom BEFORE INSERT ON conversions BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
    answer = await postback(client, click_id=cid)
    assert answer.status_code == 503
    assert answer.json() == {"error": "storage unavailable, retry"}
    assert counts(app) == (0, 0, 0)
