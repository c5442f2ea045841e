from __future__ import annotations

import sqlite3
import uuid
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import new_click

pytestmark = pytest.mark.anyio


def stored_clicks(app) -> list[tuple]:
    with sqlite3.connect(app.config.storage.path) as con:
        return con.execute(
            "SELECT id, campaign, sub1, sub2, sub3, sub4, sub5, ext_id, ip, ua, bot FROM clicks ORDER BY id"
        ).fetchall()


async def test_click_is_stored_then_redirected(app, client: httpx.AsyncClient):
    answer = await client.get(
        "/c/spring",
        params={"sub1": "a b&c", "sub2": "2", "sub3": "3", "sub4": "4", "sub5": "5", "externalid": "X9"},
        headers={"user-agent": "Mozilla/5.0 (iPhone)"},
    )
    assert answer.status_code == 302
    assert answer.headers["cache-control"] == "no-store"
    location = urlsplit(answer.headers["location"])
    assert (location.scheme, location.netloc, location.path) == ("https", "offer.example.com", "/lp")
    query = parse_qs(location.query)
    click_id = query["cid"][0]
    assert str(uuid.UUID(click_id)) == click_id and uuid.UUID(click_id).version == 7
    assert query["s1"] == ["a b&c"]
    assert query["x"] == ["X9"]
    assert "sub1=a%20b%26c" not in answer.headers["location"] and "s1=a%20b%26c" in answer.headers["location"]
    [row] = stored_clicks(app)
    assert row == (
        uuid.UUID(click_id).bytes,
        "spring",
        "a b&c",
        "2",
        "3",
        "4",
        "5",
        "X9",
        "198.51.100.7",
        "Mozilla/5.0 (iPhone)",
        0,
    )


async def test_values_are_cut_at_256_characters(app, client):
    await new_click(client, sub1="x" * 1000, ext_id="y" * 300)
    [row] = stored_clicks(app)
    assert row[2] == "x" * 256 and row[7] == "y" * 256


async def test_unknown_campaign_is_404_and_stores_nothing(app, client):
    answer = await client.get("/c/nope?sub1=1")
    assert answer.status_code == 404
    assert "location" not in answer.headers
    assert stored_clicks(app) == []


async def test_head_answers_like_get_but_stores_nothing(app, client):
    answer = await client.head("/c/spring?sub1=preview")
    assert answer.status_code == 302
    assert answer.headers["location"].startswith("https://offer.example.com/lp?cid=")
    assert stored_clicks(app) == []


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_other_methods_are_refused(app, client, method):
    answer = await client.request(method, "/c/spring")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, HEAD"
    assert stored_clicks(app) == []


@pytest.mark.parametrize(
    "user_agent, bot",
    [
        (None, 1),
        ("facebookexternalhit/1.1", 1),
        ("Mozilla/5.0 (compatible; bingbot/2.0)", 1),
        ("Mozilla/5.0 (Windows NT 10.0) Chrome/120", 0),
    ],
)
async def test_bots_are_redirected_and_flagged(app, client, user_agent, bot):
    headers = {"user-agent": user_agent} if user_agent else {}
    request = client.build_request("GET", "/c/spring", headers=headers)
    if user_agent is None:
        del request.headers["user-agent"]
    answer = await client.send(request)
    assert answer.status_code == 302
    [row] = stored_clicks(app)
    assert row[10] == bot


@pytest.mark.parametrize(
    "query",
    [
        "sub1=https://evil.example/",
        "sub1=%0d%0aLocation:%20https://evil.example/",
        "url=https://evil.example/&redirect=//evil.example&next=evil",
        "sub1=@evil.example",
        "sub1=%2F%2Fevil.example",
    ],
)
async def test_nothing_in_the_request_changes_the_destination(app, client, query):
    answer = await client.get(f"/c/spring?{query}")
    assert answer.status_code == 302
    location = answer.headers["location"]
    parts = urlsplit(location)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "offer.example.com", "/lp")
    assert "\r" not in location and "\n" not in location and "evil.example/" not in parts.netloc


async def test_pass_query_appends_other_parameters(app, client):
    answer = await client.get("/c/passing?utm_source=fb&sub1=a&q=x y")
    assert answer.status_code == 302
    assert answer.headers["location"] == "https://offer.example.com/go?utm_source=fb&q=x%20y#top"


async def test_without_pass_query_other_parameters_are_dropped(app, client):
    answer = await client.get("/c/spring?utm_source=fb")
    assert "utm_source" not in answer.headers["location"]


async def test_client_address_behind_a_trusted_proxy(config, clock):
    import tinytrack

    app = tinytrack.create_app(config, clock=clock)
    await app.startup()
    try:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as proxied:
            await proxied.get(
                "/c/spring", headers={"x-forwarded-for": "6.6.6.6, 203.0.113.50", "user-agent": "Mozilla/5.0"}
            )
    finally:
        await app.shutdown()
    [row] = stored_clicks(app)
    assert row[8] == "203.0.113.50"


async def test_many_concurrent_clicks_are_all_stored_with_distinct_ids(app, client):
    import asyncio

    ids = await asyncio.gather(*(new_click(client, sub1=str(i)) for i in range(200)))
    assert len(set(ids)) == 200
    rows = stored_clicks(app)
    assert {str(uuid.UUID(bytes=row[0])) for row in rows} == set(ids)
    assert app.store.batches < 200  # group commit: many clicks shared a transaction


async def test_healthz(client):
    answer = await client.get("/healthz")
    assert answer.status_code == 200
    assert answer.json()["ok"] is True


async def test_unknown_path_is_a_json_404(client):
    answer = await client.get("/nope")
    assert answer.status_code == 404
    assert answer.json() == {"error": "not found"}


async def test_demo_page_is_off_with_a_config_file(client):
    assert (await client.get("/demo?click_id=0190a6b2-7c1d-7abc-8def-0123456789ab")).status_code == 404


async def test_a_click_waits_for_another_writer_then_is_stored(app, client):
    import asyncio

    other = sqlite3.connect(app.config.storage.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # a CLI command holding the write lock
    pending = asyncio.create_task(new_click(client, sub1="waited"))
    await asyncio.sleep(0.3)
    assert not pending.done()  # no 302 before the click is stored
    other.execute("COMMIT")
    other.close()
    click_id = await asyncio.wait_for(pending, 10)
    assert [str(uuid.UUID(bytes=row[0])) for row in stored_clicks(app)] == [click_id]
