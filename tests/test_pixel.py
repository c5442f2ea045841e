"""The browser pixel (SPEC "Beyond the S2S postback", issue 18): GET /pixel and
/pixel.gif, off by default; always the same 43-byte GIF; pending conversions a
postback confirms (its status wins, the history keeps both); pixel_only in stats."""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from pathlib import Path

import browser
import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, FakeClock, Server, at, client_for, free_port, new_click, write_config

import tinytrack

pytestmark = pytest.mark.anyio

D = "2026-11-20"
ROOT = Path(__file__).resolve().parent.parent
GIF = tinytrack.PIXEL_GIF
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
PIXEL_ON = """
[pixel]
enabled = true
"""
PIXEL_CAMPAIGN = """
[campaigns.tagged]
url = "https://offer.example.com/t?cid={click_id}"
pixel = true
"""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(at(D))


def rows(app: tinytrack.TinyTrack, sql: str, *args: object) -> list[tuple]:
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        return con.execute(sql, args).fetchall()


async def pixel(app: tinytrack.TinyTrack, path: str = "/pixel", method: str = "GET", **params: str) -> None:
    """A hit from a browser; whatever it was sent, the answer is the GIF."""
    async with client_for(app, "203.0.113.9") as http:
        answer = await http.request(method, path, params=params, headers={"user-agent": "Mozilla/5.0"})
    assert answer.status_code == 200
    assert answer.content == GIF and len(answer.content) == 43
    assert answer.headers["content-type"] == "image/gif"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["content-length"] == "43"


async def postback(app: tinytrack.TinyTrack, **fields: str) -> dict:
    async with client_for(app, "192.0.2.50") as http:
        answer = await http.get("/postback", params={"token": POSTBACK_TOKEN, **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


async def conversion(app: tinytrack.TinyTrack, conversion_id: int) -> dict:
    async with client_for(app) as http:
        answer = await http.get(f"/api/conversions/{conversion_id}", headers=ADMIN)
    assert answer.status_code == 200
    return answer.json()


async def stats_row(app: tinytrack.TinyTrack, campaign: str = "spring") -> dict:
    async with client_for(app) as http:
        answer = await http.get(f"/api/stats?from={D}&to={D}&campaign={campaign}", headers=ADMIN)
    [row] = answer.json()["rows"]
    return row


async def click(app: tinytrack.TinyTrack, campaign: str = "spring") -> str:
    async with client_for(app) as http:
        return await new_click(http, campaign)


def test_the_gif_is_a_transparent_1x1_gif89a():
    assert len(GIF) == 43 and GIF.startswith(b"GIF89a\x01\x00\x01\x00") and GIF.endswith(b";")


async def test_off_by_default_it_answers_the_gif_and_stores_nothing(make_app):
    app = await make_app()
    cid = await click(app)
    await pixel(app, cid=cid, txid="T1", payout="5")
    await pixel(app, "/pixel.gif", cid=cid, txid="T1", payout="5")
    assert rows(app, "SELECT count(*) FROM conversions") == [(0,)]
    assert app.pixels["off"] == 2


async def test_whatever_it_is_sent_the_browser_gets_the_gif(make_app):
    app = await make_app(PIXEL_ON)
    cid = await click(app)
    await pixel(app)  # no click id
    await pixel(app, cid="not-a-click-id")
    await pixel(app, cid="01234567-89ab-7def-8123-456789abcdef")  # no such click: no orphan either
    await pixel(app, cid=cid, payout="1,50")
    await pixel(app, cid=cid, currency="dollars")
    await pixel(app, cid=cid, event="Bad Event!")
    await pixel(app, cid=cid, txid="x" * 500)
    async with client_for(app) as http:  # a field twice with two values
        other = cid[:-1] + ("1" if cid.endswith("0") else "0")
        answer = await http.get(f"/pixel?cid={cid}&cid={other}")
    assert answer.content == GIF
    assert rows(app, "SELECT count(*) FROM conversions") == [(0,)]
    assert rows(app, "SELECT count(*) FROM orphans") == [(0,)]
    assert app.pixels["invalid"] == 7 and app.pixels["ignored"] == 1
    # A POST (navigator.sendBeacon) is read as a GET is: its query.
    await pixel(app, method="POST", cid=cid)
    assert rows(app, "SELECT count(*) FROM conversions") == [(1,)]
    assert app.pixels["created"] == 1


async def test_an_unexpected_error_still_answers_the_gif(make_app, monkeypatch):
    app = await make_app(PIXEL_ON)
    cid = await click(app)

    async def broken(postback):
        raise RuntimeError("boom")

    monkeypatch.setattr(app.store, "record_postback", broken)
    await pixel(app, cid=cid)
    assert app.pixels["error"] == 1


async def test_a_pixel_conversion_is_pending_from_the_page_and_counted_pixel_only(make_app):
    app = await make_app(PIXEL_ON)
    cid = await click(app)
    # status, ts and token are the page's to say nothing about: a browser is nobody's word
    await pixel(app, cid=cid, txid="ORDER-1", payout="12.50", currency="eur", status="approved", ts="1", token="x")
    [(status, payout, currency, source, ip)] = rows(app, "SELECT status, payout, currency, source, ip FROM conversions")
    assert (status, payout, currency, source, ip) == ("pending", 12_500_000, "EUR", "pixel", "203.0.113.9")
    row = await stats_row(app)
    assert (row["conversions"], row["pending"], row["approved"], row["pixel_only"]) == (1, 1, 0, 1)
    view = await conversion(app, 1)
    assert view["source"] == "pixel"
    assert [(h["status"], h["source"]) for h in view["history"]] == [("pending", "pixel")]


async def test_a_postback_after_the_pixel_confirms_it_and_its_status_wins(make_app, clock):
    app = await make_app(PIXEL_ON)
    cid = await click(app)
    await pixel(app, cid=cid, txid="ORDER-1", payout="12.50")
    clock.now += 60
    answer = await postback(app, click_id=cid, txid="ORDER-1", payout="10.00")  # the network's amount
    assert answer == {"status": "updated", "id": 1}
    [(status, payout, source)] = rows(app, "SELECT status, payout, source FROM conversions")
    assert (status, payout, source) == ("approved", 10_000_000, None)
    view = await conversion(app, 1)
    assert view["source"] == "postback"
    assert [(h["status"], h["payout"], h["source"]) for h in view["history"]] == [
        ("pending", "12.50", "pixel"),
        ("approved", "10.00", "postback"),
    ]
    row = await stats_row(app)
    assert (row["conversions"], row["approved"], row["pending"], row["pixel_only"]) == (1, 1, 0, 0)
    assert row["payout"] == {"USD": "10.00"}
    # the network again: a duplicate as ever; the pixel again: changes nothing
    assert (await postback(app, click_id=cid, txid="ORDER-1"))["status"] == "duplicate"
    await pixel(app, cid=cid, txid="ORDER-1", payout="99")
    assert rows(app, "SELECT count(*), sum(payout) FROM conversions") == [(1, 10_000_000)]
    assert app.pixels["duplicate"] == 1


async def test_a_pixel_after_the_postback_is_a_duplicate(make_app):
    app = await make_app(PIXEL_ON)
    cid = await click(app)
    assert (await postback(app, click_id=cid, txid="ORDER-2", status="rejected"))["status"] == "created"
    await pixel(app, cid=cid, txid="ORDER-2", payout="50")
    assert rows(app, "SELECT status, payout, source FROM conversions") == [("rejected", 0, None)]
    view = await conversion(app, 1)
    assert [(h["status"], h["source"]) for h in view["history"]] == [("rejected", "postback")]
    assert app.pixels["duplicate"] == 1
    row = await stats_row(app)
    assert (row["rejected"], row["pixel_only"]) == (1, 0)


async def test_a_postback_confirming_the_same_status_is_kept_in_the_history(make_app, clock):
    app = await make_app(PIXEL_ON)
    cid = await click(app)
    await pixel(app, cid=cid, event="signup")  # no txid: the key is (click, event)
    clock.now += 5
    assert await postback(app, click_id=cid, event="signup", status="pending") == {"status": "updated", "id": 1}
    view = await conversion(app, 1)
    assert [(h["status"], h["source"]) for h in view["history"]] == [("pending", "pixel"), ("pending", "postback")]
    assert (await stats_row(app))["pixel_only"] == 0
    # once confirmed, the same status again is a duplicate
    assert (await postback(app, click_id=cid, event="signup", status="pending"))["status"] == "duplicate"


async def test_only_campaigns_with_the_pixel_take_it_when_it_is_not_on_everywhere(make_app):
    app = await make_app(PIXEL_CAMPAIGN)
    tagged, plain = await click(app, "tagged"), await click(app)
    await pixel(app, cid=tagged, txid="A")
    await pixel(app, cid=plain, txid="B")
    assert rows(app, "SELECT campaign, source FROM conversions") == [("tagged", "pixel")]
    assert (app.pixels["created"], app.pixels["ignored"]) == (1, 1)


APPROVED_PIXEL = """
[pixel]
enabled = true
status = "approved"

[forward]
allow_private = true
delay_seconds = 3600  # not tried during the test

[campaigns.fwd]
url = "https://offer.example.com/f?cid={click_id}"
postback_url = "http://127.0.0.1:9/pb?cid={click_id}&s={status}&p={payout}&e={event}"
"""


async def test_status_approved_forwards_and_the_confirmation_replaces_what_was_not_yet_sent(make_app):
    app = await make_app(APPROVED_PIXEL)
    cid = await click(app, "fwd")
    await pixel(app, cid=cid, txid="Z", payout="999")  # the page's claim
    assert rows(app, "SELECT status, source FROM conversions") == [("approved", "pixel")]
    [(url,)] = rows(app, "SELECT url FROM outbox")
    assert url.endswith("&s=approved&p=999.00&e=conversion")
    # The network's word replaces the unsent forward: its payout and event, not the page's.
    assert (await postback(app, click_id=cid, txid="Z", payout="2.50", event="purchase"))["status"] == "updated"
    assert rows(app, "SELECT event, payout FROM conversions") == [("purchase", 2_500_000)]
    got = rows(app, "SELECT state, url FROM outbox ORDER BY id")
    assert [(state, url.split("&p=")[1]) for state, url in got] == [
        ("canceled", "999.00&e=conversion"),
        ("pending", "2.50&e=purchase"),
    ]
    # its reversal before anything was sent cancels that too: the source never hears of it
    assert (await postback(app, click_id=cid, txid="Z", status="rejected"))["status"] == "updated"
    assert rows(app, "SELECT state FROM outbox ORDER BY id") == [("canceled",), ("canceled",)]


async def test_a_confirmation_after_the_pixels_forward_was_sent_sends_only_news(make_app):
    app = await make_app(APPROVED_PIXEL)
    cid = await click(app, "fwd")
    await pixel(app, cid=cid, txid="Y", payout="3")
    with closing(sqlite3.connect(app.config.storage.path)) as con, con:
        con.execute("UPDATE outbox SET attempts = 1, state = 'done'")  # the source heard "approved"
    assert (await postback(app, click_id=cid, txid="Y", payout="3"))["status"] == "updated"
    assert rows(app, "SELECT count(*) FROM outbox") == [(1,)]  # the same status: no news
    assert (await postback(app, click_id=cid, txid="Y", status="rejected"))["status"] == "updated"
    assert rows(app, "SELECT status FROM outbox ORDER BY id") == [("approved",), ("rejected",)]


async def test_a_postback_without_payout_confirms_with_its_own_zero_not_the_pages_amount(make_app):
    app = await make_app(PIXEL_ON)
    cid = await click(app)
    await pixel(app, cid=cid, txid="P", payout="999999", currency="EUR", event="purchase")
    assert (await postback(app, click_id=cid, txid="P"))["status"] == "updated"
    # as if the pixel had never come: the postback's event, no payout, the default currency
    assert rows(app, "SELECT event, status, payout, currency FROM conversions") == [
        ("conversion", "approved", 0, "USD")
    ]
    row = await stats_row(app)
    assert (row["approved"], row["payout"]) == (1, {"USD": "0.00"})


async def test_pixel_only_per_offer_and_by_status(make_app):
    app = await make_app(
        PIXEL_ON
        + """
[campaigns.rot]
offers = [{ name = "a", url = "https://a.example/?cid={click_id}" }]
"""
    )
    first, second = await click(app, "rot"), await click(app, "rot")
    await pixel(app, cid=first, txid="1")
    await pixel(app, cid=second, txid="2")
    await postback(app, click_id=second, txid="2")
    async with client_for(app) as http:
        by_offer = (await http.get(f"/api/stats?from={D}&to={D}&by=offer", headers=ADMIN)).json()["rows"]
        by_status = (await http.get(f"/api/stats?from={D}&to={D}&by=status", headers=ADMIN)).json()["rows"]
        raw = (await http.get(f"/api/stats?from={D}&to={D}&by=sub2", headers=ADMIN)).json()["rows"]
    assert [(r["offer"], r["pending"], r["approved"], r["pixel_only"]) for r in by_offer] == [("a", 1, 1, 1)]
    assert {r["status"]: r["pixel_only"] for r in by_status} == {"approved": 0, "pending": 1}
    assert [r["pixel_only"] for r in raw] == [1]


async def test_bad_pixel_config_names_the_key(tmp_path):
    for extra, message in (
        ('[pixel]\nstatus = "rejected"\n', "pixel.status: must be pending or approved, got 'rejected'"),
        ("[pixel]\nenabled = 1\n", "pixel.enabled: must be true or false, got '1'"),
        ("[pixel]\nenable = true\n", "pixel.enable: unknown key"),
        (
            '[campaigns.x]\nurl = "https://o.example/"\npixel = "yes"\n',
            "campaigns.x.pixel: must be true or false, got 'yes'",
        ),
    ):
        with pytest.raises(tinytrack.ConfigError) as caught:
            tinytrack.load_config(write_config(tmp_path, extra=extra))
        assert str(caught.value) == message


@pytest.mark.skipif(
    browser.CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); CI installs it"
)
def test_the_readme_img_tag_in_headless_chromium_stores_a_pending_conversion(tmp_path: Path):
    """The tag the README tells an advertiser to paste, on a page Chromium opens: the
    GIF loads as a 1x1 image and the conversion is stored, pending, from the pixel."""
    [tag] = [
        block for block in re.findall(r"```html\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if "/pixel" in block
    ]
    port = free_port()
    server = Server(tmp_path, write_config(tmp_path, port, PIXEL_ON), port).start()
    try:
        with server.client() as http:
            cid = http.get("/c/spring", headers={"user-agent": "Mozilla/5.0"}).headers["location"].split("cid=")[1]
            cid = cid.split("&")[0]
        page = tmp_path / "thanks.html"
        tag = tag.replace("https://tracker.example.com", server.url).replace("CLICK_ID", cid)
        page.write_text(
            "<!doctype html><html><body><h1>Thank you</h1>"
            + tag.replace("ORDER_ID", "ORD-77")
            + "<script>window.onload = () => { document.body.dataset.loaded = document.images[0].naturalWidth"
            " + 'x' + document.images[0].naturalHeight; };</script></body></html>"
        )
        dom = browser.render(page.as_uri())
    finally:
        assert server.stop() == 0, server.output()
    assert 'data-loaded="1x1"' in dom  # the GIF decoded as an image
    with closing(sqlite3.connect(tmp_path / "tinytrack.db")) as con:
        assert con.execute("SELECT event, txid, status, payout, currency, source FROM conversions").fetchall() == [
            ("purchase", "ORD-77", "pending", 49_900_000, "USD", "pixel")
        ]


async def test_a_held_pixel_conversion_keeps_the_networks_word_and_its_confirmation_in_the_history(make_app, clock):
    app = await make_app(
        PIXEL_ON
        + """
[campaigns.spring.fraud]
min_ctit_seconds = 3600
action = "hold"
"""
    )
    cid = await click(app)
    await pixel(app, cid=cid, txid="H", payout="50")  # seconds after its click: ctit_fast, held
    assert rows(app, "SELECT status, reason, network_status, source FROM conversions") == [
        ("pending", "held", None, "pixel")  # no network has said anything yet
    ]
    clock.now += 60
    assert (await postback(app, click_id=cid, txid="H", payout="40", status="approved"))["status"] == "updated"
    assert rows(app, "SELECT status, reason, network_status, payout, source FROM conversions") == [
        ("pending", "held", "approved", 40_000_000, None)
    ]
    view = await conversion(app, 1)
    assert [(h["status"], h["source"]) for h in view["history"]] == [("pending", "pixel"), ("pending", "postback")]
    status, ok = await app.store.write(lambda db, now_ms: db.review(1, "approve", now_ms, app.store._policy))
    assert (status, ok) == ("approved", True)


async def test_reviewing_a_held_conversion_only_the_pixel_reported_leaves_it_pending(make_app):
    app = await make_app(PIXEL_ON + '\n[campaigns.spring.fraud]\nmin_ctit_seconds = 3600\naction = "hold"\n')
    await pixel(app, cid=await click(app), txid="H2")
    status, ok = await app.store.write(lambda db, now_ms: db.review(1, "approve", now_ms, app.store._policy))
    assert (status, ok) == ("pending", True)  # the flag is cleared; a network still has to confirm the sale
    assert rows(app, "SELECT status, reason, source FROM conversions") == [("pending", None, "pixel")]


async def test_a_pixel_outside_the_window_confirmed_by_a_postback_is_in_its_history(make_app, clock):
    app = await make_app(PIXEL_ON + '\n[campaigns.week]\nurl = "https://o.example/?cid={click_id}"\nwindow_days = 7\n')
    cid = await click(app, "week")
    clock.now += 8 * 86400  # window_days = 7
    await pixel(app, cid=cid, txid="W")
    assert (await postback(app, click_id=cid, txid="W"))["status"] == "rejected"
    view = await conversion(app, 1)
    assert (view["status"], view["reason"], view["source"]) == ("rejected", "outside_window", "postback")
    assert [(h["status"], h["source"]) for h in view["history"]] == [("rejected", "pixel"), ("rejected", "postback")]


async def test_under_priority_the_pixel_stores_nothing_for_a_campaign_it_is_off_for(make_app):
    app = await make_app(
        PIXEL_CAMPAIGN.replace("pixel = true", 'pixel = true\nchannel = "paid"')
        + """
[campaigns.aff]
url = "https://offer.example.com/a?cid={click_id}"
channel = "affiliate"

[attribution]
mode = "priority"
"""
    )
    async with client_for(app) as http:
        tagged = await new_click(http, "tagged", uid="u-9")
        await new_click(http, "aff", uid="u-9")  # the matrix credits the affiliate, whose pixel is off
    await pixel(app, cid=tagged, txid="PR")
    assert rows(app, "SELECT count(*) FROM conversions") == [(0,)]
    assert app.pixels["ignored"] == 1
