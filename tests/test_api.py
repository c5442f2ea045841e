"""The admin API: auth, reconciliation listings, cursors, CSV."""

from __future__ import annotations

import base64
import csv
import io

import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, new_click

import tinytrack

pytestmark = pytest.mark.anyio

BEARER = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def basic(user: str, password: str) -> dict:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# Who may read these: test_reports.py, test_every_protected_route_against_every_credential_form.


async def test_conversions_listing_pages_with_a_cursor(client):
    cid = await new_click(client, sub1="=HYPERLINK(1)", sub2="z")
    for n in range(5):
        await client.get(
            "/postback", params={"click_id": cid, "txid": f"T{n}", "payout": "0.1", "token": POSTBACK_TOKEN}
        )
    first = (await client.get("/api/conversions?limit=2", headers=BEARER)).json()
    assert [row["txid"] for row in first["rows"]] == ["T0", "T1"]
    assert first["next"] == str(first["rows"][-1]["id"])
    second = (await client.get(f"/api/conversions?limit=2&after={first['next']}", headers=BEARER)).json()
    assert [row["txid"] for row in second["rows"]] == ["T2", "T3"]
    last = (await client.get(f"/api/conversions?limit=2&after={second['next']}", headers=BEARER)).json()
    assert ([row["txid"] for row in last["rows"]], last["next"]) == (["T4"], None)
    row = first["rows"][0]
    assert (row["click_id"], row["campaign"], row["sub1"], row["payout"], row["currency"], row["status"]) == (
        cid,
        "spring",
        "=HYPERLINK(1)",
        "0.10",
        "USD",
        "approved",
    )


async def test_conversions_csv_and_filters(client):
    cid = await new_click(client, sub1="=cmd|' /C calc'!A0")
    await client.get("/postback", params={"click_id": cid, "txid": "A", "status": "pending", "token": POSTBACK_TOKEN})
    await client.get("/postback", params={"click_id": cid, "txid": "B", "payout": "2.5", "token": POSTBACK_TOKEN})
    answer = await client.get("/api/conversions?format=csv&status=approved", headers=BEARER)
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert [(r["txid"], r["payout"], r["sub1"]) for r in rows] == [("B", "2.50", "'=cmd|' /C calc'!A0")]
    none = await client.get("/api/conversions?format=csv&campaign=other", headers=BEARER)
    assert none.text.splitlines() == [",".join(f'"{column}"' for column in tinytrack.CONVERSION_COLUMNS)]
    future = await client.get("/api/conversions?since=2999-01-01", headers=BEARER)
    assert future.json() == {"rows": [], "next": None}


async def test_orphans_listing(client):
    orphan = "0190a6b2-7c1d-7abc-8def-0123456789ab"
    await client.get("/postback", params={"click_id": orphan, "payout": "3", "token": POSTBACK_TOKEN})
    await client.get("/postback", params={"click_id": orphan, "payout": "3", "token": POSTBACK_TOKEN})
    rows = (await client.get("/api/orphans", headers=BEARER)).json()["rows"]
    assert [(r["click_id"], r["payout"], r["hits"]) for r in rows] == [(orphan, "3.00", 2)]


@pytest.mark.parametrize(
    "query, message",
    [
        ("since=yesterday", "since: must be YYYY-MM-DD or ISO 8601 with an offset, got 'yesterday'"),
        ("since=2026-01-01T00:00:00", "since: needs a UTC offset, got '2026-01-01T00:00:00'"),
        ("limit=0", "limit: must be 1-1000, got '0'"),
        ("limit=5000", "limit: must be 1-1000, got '5000'"),
        ("after=-1", "after: must be the cursor from a previous page, got '-1'"),
        ("format=xml", "format: must be json or csv, got 'xml'"),
        ("status=paid", "status: must be one of approved, pending, rejected, got 'paid'"),
    ],
)
async def test_bad_listing_parameters(client, query, message):
    answer = await client.get(f"/api/conversions?{query}", headers=BEARER)
    assert (answer.status_code, answer.json()) == (400, {"error": message})
