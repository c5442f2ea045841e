"""Beyond the S2S postback (SPEC, issue 18), the parts built so far: ad platforms'
click ids kept on the click and its conversions, as forward macros (with Meta's
{fbc}), purged with the click; and the Google Ads offline conversion export."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from conftest import POSTBACK_TOKEN, FakeClock, at, client_for
from test_cli import run

import tinytrack

pytestmark = pytest.mark.anyio

HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
D = "2026-11-20"
ADS = """
[campaigns.ads]
url = "https://offer.example.com/a?cid={click_id}"
postback_url = "https://source.example/pb?g={gclid}&fbc={fbc}&fb={fbclid}&m={msclkid}&s={status}"
forward_statuses = ["approved", "rejected"]
"""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(at(D))


@pytest.fixture
async def app(make_app):
    return await make_app(ADS)


def db_rows(app: tinytrack.TinyTrack, sql: str, *args: object) -> list[tuple]:
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        return con.execute(sql, args).fetchall()


async def click(app: tinytrack.TinyTrack, campaign: str = "ads", **params: str) -> tuple[str, str]:
    async with client_for(app) as http:
        answer = await http.get(f"/c/{campaign}", params=params, headers={"user-agent": HUMAN})
    assert answer.status_code == 302, answer.text
    location = answer.headers["location"]
    return location.split("cid=")[1].split("&")[0] if "cid=" in location else "", location


async def postback(app: tinytrack.TinyTrack, expect: str = "created", **fields: str) -> dict:
    async with client_for(app, "192.0.2.50") as http:
        answer = await http.get("/postback", params={"token": POSTBACK_TOKEN, **fields})
    assert (answer.status_code, answer.json().get("status")) == (200, expect), answer.text
    return answer.json()


async def test_a_click_keeps_its_ad_click_ids_and_metas_fbc(app, clock):
    cid, _ = await click(app, gclid="Cj0KCQ-abc_1", fbclid="IwAR2xyz", ttclid="tt.9", sub1="s")
    plain, _ = await click(app, sub1="s")
    blank, _ = await click(app, gclid="")  # a platform's empty macro: nothing kept
    ids = dict(db_rows(app, "SELECT hex(id), ad_ids FROM clicks"))
    key = {c: c.replace("-", "").upper() for c in (cid, plain, blank)}
    ms = int(at(D) * 1000)
    assert json.loads(ids[key[cid]]) == {
        "fbclid": "IwAR2xyz",
        "gclid": "Cj0KCQ-abc_1",
        "ttclid": "tt.9",
        "fbc": f"fb.1.{ms}.IwAR2xyz",  # Meta's format: fb.1.<creation ms>.<fbclid>
    }
    assert (ids[key[plain]], ids[key[blank]]) == (None, None)


async def test_pass_query_still_passes_ad_click_ids_to_the_offer(app):
    _, location = await click(app, "passing", gclid="G-1", wbraid="W2", other="x")
    assert location == "https://offer.example.com/go?gclid=G-1&wbraid=W2&other=x#top"
    assert [json.loads(ids) for (ids,) in db_rows(app, "SELECT ad_ids FROM clicks")] == [
        {"gclid": "G-1", "wbraid": "W2"}
    ]


async def test_forwards_fill_ad_click_id_macros_and_fbc_on_every_status(app, clock, tmp_path: Path):
    cid, _ = await click(app, gclid="G-77", fbclid="FB-1", msclkid="MS-3")
    clock.now += 60
    await postback(app, click_id=cid, txid="o-1", payout="5")
    await postback(app, "updated", click_id=cid, txid="o-1", status="rejected")
    plain, _ = await click(app)
    await postback(app, click_id=plain, txid="o-2", payout="1")
    fbc = f"fb.1.{int(at(D) * 1000)}.FB-1"
    with closing(sqlite3.connect(app.config.storage.path)) as con:  # the clicks purged: conversions keep a copy
        con.execute("DELETE FROM clicks")
        con.commit()
    replay = run(
        "outbox", "replay", "--since", D, "--campaign", "ads", "-c", str(tmp_path / "config.toml"), cwd=tmp_path
    )
    assert replay.returncode == 0, replay.stderr
    urls = [url for (url,) in db_rows(app, "SELECT url FROM outbox ORDER BY id")]
    assert urls == [
        f"https://source.example/pb?g=G-77&fbc={fbc}&fb=FB-1&m=MS-3&s=approved",
        f"https://source.example/pb?g=G-77&fbc={fbc}&fb=FB-1&m=MS-3&s=rejected",
        "https://source.example/pb?g=&fbc=&fb=&m=&s=approved",  # none: empty, as any macro without a value
        f"https://source.example/pb?g=G-77&fbc={fbc}&fb=FB-1&m=MS-3&s=rejected",  # replayed, from the conversion
        "https://source.example/pb?g=&fbc=&fb=&m=&s=approved",
    ]


async def test_ad_click_ids_go_with_the_click_and_from_the_conversion_after_clicks_days(make_app, clock):
    app = await make_app(ADS + "\n[retention]\nclicks_days = 30\n")
    await app.purger.stop()
    cid, _ = await click(app, gclid="G-1")
    await postback(app, click_id=cid, payout="1")
    clock.now += 31 * 86400
    done = await app.purger.run_once()
    assert (done["clicks"], done["conversion_ad_ids"]) == (1, 1)
    assert db_rows(app, "SELECT ad_ids FROM conversions") == [(None,)]


async def test_google_ads_export_lists_approved_conversions_with_a_gclid(app, clock, tmp_path: Path):
    first, _ = await click(app, gclid="Cj0-first")
    second, _ = await click(app, gclid="-starts-with-a-dash")
    rejected, _ = await click(app, gclid="Cj0-rejected")
    none, _ = await click(app)
    clock.now = at(D, 23, 30)  # 00:30 the next day in Berlin
    await postback(app, click_id=first, txid="o-1", payout="49.90", currency="EUR")
    clock.now = at(D, 23, 45, 5)
    await postback(app, click_id=second, txid="o-2", payout="10")
    await postback(app, click_id=rejected, txid="o-3", payout="10", status="rejected")
    await postback(app, click_id=none, txid="o-4", payout="10")
    config = str(tmp_path / "config.toml")
    done = run(
        "export",
        "google-ads",
        "--since",
        D,
        "--conversion-name",
        "Purchase",
        "--tz",
        "Europe/Berlin",
        "-c",
        config,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "Parameters:TimeZone=Europe/Berlin",
        "Google Click ID,Conversion Name,Conversion Time,Conversion Value,Conversion Currency",
        "Cj0-first,Purchase,2026-11-21 00:30:00,49.90,EUR",
        "-starts-with-a-dash,Purchase,2026-11-21 00:45:05,10.00,USD",  # no ' prefix: it is an id, not a formula
    ]
    assert done.stderr == "2 conversions\n"
    utc = run(
        "export", "google-ads", "--since", "2026-11-21", "--conversion-name", "Purchase", "-c", config, cwd=tmp_path
    )
    assert utc.stdout.splitlines() == [
        "Parameters:TimeZone=+0000",
        "Google Click ID,Conversion Name,Conversion Time,Conversion Value,Conversion Currency",
    ]  # created the day before: none since
    for args, message in (
        (
            ["--tz", "Mars/Base"],
            "tinytrack: --tz: must be an IANA time zone like Europe/Berlin or UTC, got 'Mars/Base'",
        ),
        (
            ["--since", "yesterday"],
            "tinytrack: --since: must be YYYY-MM-DD or ISO 8601 with an offset, got 'yesterday'",
        ),
    ):
        bad = run(
            "export", "google-ads", "--since", D, "--conversion-name", "Purchase", *args, "-c", config, cwd=tmp_path
        )
        assert (bad.returncode, bad.stderr.strip()) == (1, message)
