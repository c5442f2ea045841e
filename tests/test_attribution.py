"""Attribution across channels (SPEC "Attribution across channels"): the priority
matrix as a pure function, uids on clicks, POST /touch, postbacks credited by a user
id, the stored explanation, by=channel, forgetting a person, and retention."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, FakeClock, Server, at, client_for, free_port, write_config
from test_cli import run

import tinytrack
from tinytrack import AttributionConfig, ConfigError, Touch, attribute, build_config

pytestmark = pytest.mark.anyio

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
BEARER = {"authorization": f"Bearer {POSTBACK_TOKEN}"}
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
D = "2026-11-20"
HOUR = 3_600_000
DAY = 24 * HOUR

CHANNELS = """
[campaigns.partner]
channel = "affiliate"
url = "https://offer.example.com/a?cid={click_id}&s1={sub1}"
postback_url = "https://partner.example/pb?c={click_id}&s={status}&p={payout}"

[campaigns.facebook]
url = "https://offer.example.com/f?cid={click_id}"
postback_url = "https://facebook.example/pb?c={click_id}&s={status}"

[campaigns.newsletter]
channel = "email"
url = "https://offer.example.com/n?cid={click_id}"
postback_url = "https://mail.example/pb?c={click_id}"

[campaigns.seo]
channel = "organic"
url = "https://offer.example.com/o?cid={click_id}"
"""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(at(D))


@pytest.fixture
async def app(make_app):
    return await make_app(CHANNELS)


# --- the matrix, as a pure function -------------------------------------------------

T0 = 1_790_000_000_000  # the conversion's time
CONF = AttributionConfig()


def touch(kind: str, channel: str, hours_before: float, ident: str = "", campaign: str = "") -> Touch:
    ident = ident or f"{channel}-{hours_before}"
    return Touch(kind, ident, channel, campaign or channel, int(T0 - hours_before * HOUR))


AFF, AFF_LATER = touch("click", "affiliate", 48, "aff-1"), touch("click", "affiliate", 5, "aff-2")
PAID, PAID_LATEST = touch("click", "paid", 30, "paid-1"), touch("click", "paid", 1, "paid-2")
EMAIL = touch("touch", "email", 20, "7")
ORGANIC = touch("touch", "organic", 2, "8")


@pytest.mark.parametrize(
    ("touches", "winner", "campaign", "rule"),
    [
        # Each row of the seed's table.
        ([PAID, EMAIL, AFF], AFF, "affiliate", "affiliate: the last affiliate touch in the 30-day window"),
        ([AFF, AFF_LATER, PAID], AFF_LATER, "affiliate", "affiliate: the last affiliate touch"),
        ([AFF, PAID_LATEST], AFF, "affiliate", "affiliate:"),  # a later paid click doesn't take an affiliate's sale
        (
            [PAID, PAID_LATEST, EMAIL],
            PAID_LATEST,
            "paid",
            "paid: the last paid touch in the 30-day window; no affiliate touch",
        ),
        (
            [EMAIL, ORGANIC],
            EMAIL,
            "email",
            "email: the last email touch in the 30-day window; no affiliate or paid touch",
        ),
        # Organic is never credited, but kept with the decision.
        ([ORGANIC], None, "(organic)", "organic: only organic touches, never credited"),
        ([], None, "(none)", "none: no touch in the 30-day window"),
        # Touches after the conversion are ignored.
        ([PAID, touch("click", "affiliate", -0.01, "after")], PAID, "paid", "paid:"),
        # The window: 30 days before, inclusive; a millisecond more is outside.
        (
            [touch("click", "affiliate", 30 * 24, "edge"), PAID],
            touch("click", "affiliate", 30 * 24, "edge"),
            "affiliate",
            "affiliate:",
        ),
        ([Touch("click", "old", "affiliate", "affiliate", T0 - 30 * DAY - 1), PAID], PAID, "paid", "paid:"),
        # Ties in time: a click over a touch; then the later stored (touch 10 after touch 9).
        (
            [touch("touch", "paid", 3, "9"), touch("click", "paid", 3, "c-1")],
            touch("click", "paid", 3, "c-1"),
            "paid",
            "paid:",
        ),
        (
            [touch("touch", "email", 3, "10"), touch("touch", "email", 3, "9")],
            touch("touch", "email", 3, "10"),
            "email",
            "email:",
        ),
    ],
)
def test_the_priority_matrix(touches, winner, campaign, rule):
    decision = attribute(touches, T0, CONF)
    assert decision.winner == winner
    assert decision.campaign == campaign
    assert decision.rule.startswith(rule), decision.rule
    assert set(decision.candidates) == {t for t in touches if T0 - 30 * DAY <= t.ts <= T0}  # all weighed, no other
    assert [t.ts for t in decision.candidates] == sorted(t.ts for t in decision.candidates)  # oldest first


def test_priority_order_and_channels_left_out_come_from_the_config():
    paid_first = AttributionConfig(priority=("paid", "affiliate"))
    assert attribute([AFF, PAID], T0, paid_first).winner == PAID
    no_email = AttributionConfig(priority=("affiliate", "paid"))
    decision = attribute([EMAIL], T0, no_email)
    assert (decision.winner, decision.campaign) == (None, "(none)")
    assert decision.rule == "none: only email touches, never credited"
    short = AttributionConfig(window_days=1)
    assert attribute([AFF, PAID_LATEST], T0, short).winner == PAID_LATEST  # the affiliate click is 2 days old


@pytest.mark.parametrize(
    ("attribution", "campaign", "message"),
    [
        ({"priority": ["affiliate", "organic"]}, {}, "attribution.priority[1]: organic is never credited"),
        (
            {"priority": ["affiliate", "tv"]},
            {},
            "attribution.priority[1]: must be one of affiliate, paid, email, got 'tv'",
        ),
        ({"priority": ["paid", "paid"]}, {}, "attribution.priority[1]: 'paid' is listed twice"),
        ({"priority": []}, {}, "attribution.priority: must list at least one channel"),
        ({"mode": "last"}, {}, "attribution.mode: must be one of click, priority, got 'last'"),
        ({"window_days": 0}, {}, "attribution.window_days: must be between 1 and 3650, got 0"),
        ({"windows": 3}, {}, "attribution.windows"),
        ({}, {"channel": "radio"}, "campaigns.x.channel: must be one of affiliate, paid, email, organic, got 'radio'"),
    ],
)
def test_attribution_config_errors_name_the_key(attribution, campaign, message):
    data = {
        "postback": {"tokens": ["t" * 16]},
        "attribution": attribution,
        "campaigns": {"x": {"url": "https://o.example/", **campaign}},
    }
    with pytest.raises(ConfigError) as caught:
        build_config(data)
    assert str(caught.value).startswith(message), str(caught.value)


def test_uid_is_kept_for_the_window_when_pii_days_is_shorter():
    base = {"postback": {"tokens": ["t" * 16]}, "campaigns": {"x": {"url": "https://o.example/"}}}
    assert build_config(base).retention.uid_days == 30
    assert build_config({**base, "retention": {"pii_days": 7}}).retention.uid_days == 30
    assert build_config({**base, "retention": {"pii_days": 60}}).retention.uid_days == 60
    assert build_config({**base, "retention": {"pii_days": 0}}).retention.uid_days == 0  # nothing is cut


# --- clicks and touches ------------------------------------------------------------


def db_rows(app: tinytrack.TinyTrack, sql: str, *args: object) -> list[tuple]:
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        return con.execute(sql, args).fetchall()


async def click(app: tinytrack.TinyTrack, campaign: str, ip: str = "198.51.100.7", **params: str) -> str:
    async with client_for(app, ip) as http:
        answer = await http.get(f"/c/{campaign}", params=params, headers={"user-agent": HUMAN})
    assert answer.status_code == 302, answer.text
    return answer.headers["location"].split("cid=")[1].split("&")[0]


async def send_touch(app: tinytrack.TinyTrack, expect: int = 200, headers: dict | None = None, **fields: str) -> dict:
    async with client_for(app, "192.0.2.50") as http:
        answer = await http.post("/touch", data=fields, headers=BEARER if headers is None else headers)
    assert answer.status_code == expect, answer.text
    return answer.json()


async def postback(app: tinytrack.TinyTrack, expect: str = "created", **fields: str) -> dict:
    async with client_for(app, "192.0.2.50") as http:
        answer = await http.get("/postback", params={"token": POSTBACK_TOKEN, **fields})
    assert (answer.status_code, answer.json().get("status")) == (200, expect), answer.text
    return answer.json()


async def conversion(app: tinytrack.TinyTrack, conversion_id: int) -> dict:
    async with client_for(app) as http:
        answer = await http.get(f"/api/conversions/{conversion_id}", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_a_click_keeps_its_uid_and_a_bad_one_is_dropped_not_refused(app):
    good = await click(app, "partner", uid="u-1.a:b_c")
    alias = await click(app, "partner", user_id="u-2")
    bad = await click(app, "partner", uid="not valid!")
    none = await click(app, "partner")
    uids = dict(db_rows(app, "SELECT id, uid FROM clicks"))
    as_bytes = {cid: bytes.fromhex(cid.replace("-", "")) for cid in (good, alias, bad, none)}
    assert [uids[as_bytes[c]] for c in (good, alias, bad, none)] == ["u-1.a:b_c", "u-2", None, None]
    assert db_rows(app, "SELECT flags FROM clicks WHERE uid IS NOT NULL") == [(None,), (None,)]  # no flags
    async with client_for(app) as http:
        metrics = (await http.get("/metrics", headers=ADMIN)).text
    assert "tinytrack_click_uid_invalid_total 1" in metrics


async def test_a_touch_is_stored_once_per_user_campaign_and_second(app, clock):
    first = await send_touch(app, user_id="u-1", campaign="newsletter")
    assert first["status"] == "created"
    clock.now += 0.4  # the same second
    assert await send_touch(app, user_id="u-1", campaign="newsletter") == {"status": "duplicate", "id": first["id"]}
    clock.now += 1
    assert (await send_touch(app, user_id="u-1", campaign="newsletter", channel="email"))["status"] == "created"
    given = await send_touch(app, user_id="u-1", campaign="seo", ts="2026-11-19T08:00:00Z")
    assert given["status"] == "created"
    async with client_for(app, "192.0.2.50") as http:  # JSON as well as a form
        answer = await http.post("/touch", json={"uid": "u-2", "campaign": "partner"}, headers=BEARER)
    assert answer.json()["status"] == "created"
    rows = db_rows(app, "SELECT uid, channel, campaign, ts FROM touches ORDER BY id")
    assert rows == [
        ("u-1", "email", "newsletter", int(at(D) * 1000)),
        ("u-1", "email", "newsletter", int(at(D, second=1.4) * 1000)),
        ("u-1", "organic", "seo", int(at("2026-11-19", 8) * 1000)),
        ("u-2", "affiliate", "partner", int(at(D, second=1.4) * 1000)),
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"campaign": "newsletter"}, "user_id: is required"),
        ({"user_id": "u-1"}, "campaign: is required"),
        ({"user_id": "a b", "campaign": "newsletter"}, "user_id: must be 1-64 characters"),
        ({"user_id": "u" * 65, "campaign": "newsletter"}, "user_id: must be 1-64 characters"),
        ({"user_id": "u-1", "campaign": "nope"}, "campaign: must be a campaign of the config, got 'nope'"),
        ({"user_id": "u-1", "campaign": "newsletter", "channel": "tv"}, "channel: must be one of affiliate"),
        ({"user_id": "u-1", "campaign": "newsletter", "channel": "paid"}, "channel: campaign newsletter is email"),
        ({"user_id": "u-1", "campaign": "newsletter", "ts": "yesterday"}, "ts: must be ISO 8601"),
        (
            {"user_id": "u-1", "campaign": "newsletter", "ts": "2099-01-01T00:00:00Z"},
            "ts: is more than a day in the future",
        ),
    ],
)
async def test_a_bad_touch_is_a_400_naming_the_field_and_stores_nothing(app, fields, message):
    answer = await send_touch(app, 400, **fields)
    assert answer["error"].startswith(message), answer
    assert db_rows(app, "SELECT count(*) FROM touches") == [(0,)]


async def test_a_touch_needs_the_postback_token_and_a_post(app):
    await send_touch(app, 401, headers={}, user_id="u-1", campaign="newsletter")
    await send_touch(
        app, 401, headers={"authorization": "Bearer wrong-token-123"}, user_id="u-1", campaign="newsletter"
    )
    async with client_for(app) as http:
        got = await http.get("/touch", params={"user_id": "u-1", "campaign": "newsletter", "token": POSTBACK_TOKEN})
    assert (got.status_code, got.headers["allow"]) == (405, "POST")
    assert (await send_touch(app, headers={}, user_id="u-1", campaign="newsletter", token=POSTBACK_TOKEN))[
        "status"
    ] == "created"
    assert db_rows(app, "SELECT count(*) FROM touches") == [(1,)]


# --- postbacks credited by a user id ------------------------------------------------------


def outbox(app: tinytrack.TinyTrack) -> list[tuple]:
    return db_rows(app, "SELECT conversion_id, campaign, status, url FROM outbox ORDER BY id")


async def test_a_user_id_postback_credits_the_affiliate_and_forwards_with_its_click(app, clock):
    await send_touch(app, user_id="u-9", campaign="newsletter")
    clock.now += 60
    paid = await click(app, "facebook", uid="u-9")
    clock.now += 60
    aff = await click(app, "partner", uid="u-9", sub1="aff-7")
    clock.now += 60
    await click(app, "facebook", uid="u-9")  # a later paid click: the affiliate keeps the sale
    clock.now += 60
    answer = await postback(app, user_id="u-9", txid="order-1", payout="49.90")
    (row,) = db_rows(app, "SELECT campaign, sub1, status, payout, uid, length(click_id) FROM conversions")
    assert row == ("partner", "aff-7", "approved", 49_900_000, "u-9", 21)
    assert outbox(app) == [
        (answer["id"], "partner", "approved", f"https://partner.example/pb?c={aff}&s=approved&p=49.90")
    ]
    view = await conversion(app, answer["id"])
    assert view["click_id"] is None and view["user_id"] == "u-9" and view["campaign"] == "partner"
    decision = view["attribution"]
    assert decision["rule"] == "affiliate: the last affiliate touch in the 30-day window"
    assert decision["winner"] == {
        "kind": "click",
        "id": aff,
        "channel": "affiliate",
        "campaign": "partner",
        "ts": decision["winner"]["ts"],
    }
    assert [(c["kind"], c["channel"]) for c in decision["candidates"]] == [
        ("touch", "email"),
        ("click", "paid"),
        ("click", "affiliate"),
        ("click", "paid"),
    ]
    assert decision["candidates"][1]["id"] == paid
    assert [h["status"] for h in view["history"]] == ["approved"]


async def test_a_user_id_conversion_is_deduplicated_on_the_user_and_txid_whoever_would_win_later(app, clock):
    await click(app, "facebook", uid="u-3")
    clock.now += 60
    first = await postback(app, user_id="u-3", txid="o-1", payout="10")
    clock.now += 60
    await click(app, "partner", uid="u-3")  # an affiliate click after it: the retry must not move the credit
    again = await postback(app, "duplicate", uid="u-3", txid="o-1", payout="10")
    assert again["id"] == first["id"]
    other = await postback(app, user_id="u-3", txid="o-2", payout="5")  # another order: credited now
    assert db_rows(app, "SELECT id, campaign FROM conversions ORDER BY id") == [
        (first["id"], "facebook"),
        (other["id"], "partner"),
    ]
    event_keyed = await postback(app, user_id="u-3", event="signup")
    await postback(app, "duplicate", user_id="u-3", event="signup")
    assert (await postback(app, user_id="u-4", event="signup"))["id"] != event_keyed["id"]  # another user


async def test_a_later_status_of_a_user_conversion_is_forwarded_with_the_credited_click(app, clock):
    aff = await click(app, "partner", uid="u-5")
    clock.now += 60
    created = await postback(app, user_id="u-5", txid="o-9", payout="20", status="pending")
    assert outbox(app) == []  # pending is not forwarded (forward_statuses: approved)
    await postback(app, "updated", user_id="u-5", txid="o-9", status="approved")
    assert outbox(app) == [
        (created["id"], "partner", "approved", f"https://partner.example/pb?c={aff}&s=approved&p=20.00")
    ]
    view = await conversion(app, created["id"])
    assert [h["status"] for h in view["history"]] == ["pending", "approved"]


async def test_only_organic_or_nothing_is_stored_uncredited_counted_and_never_forwarded(app, clock):
    await send_touch(app, user_id="u-6", campaign="seo")
    clock.now += 60
    organic = await postback(app, user_id="u-6", txid="o-1", payout="3")
    nobody = await postback(app, user_id="u-7", txid="o-1", payout="4")
    assert db_rows(app, "SELECT id, campaign, status FROM conversions ORDER BY id") == [
        (organic["id"], "(organic)", "approved"),
        (nobody["id"], "(none)", "approved"),
    ]
    assert outbox(app) == []
    assert (await conversion(app, organic["id"]))["attribution"][
        "rule"
    ] == "organic: only organic touches, never credited"
    async with client_for(app) as http:
        rows = (await http.get(f"/api/stats?from={D}&to={D}&by=channel", headers=ADMIN)).json()["rows"]
    by = {row["channel"]: row for row in rows}
    assert (by["organic"]["approved"], by["organic"]["payout"]) == (1, {"USD": "3.00"})
    assert (by["(none)"]["approved"], by["(none)"]["payout"]) == (1, {"USD": "4.00"})


async def test_stats_by_channel_gather_each_campaigns_totals(app, clock):
    a = await click(app, "partner")
    await click(app, "partner", ip="198.51.100.8")
    f = await click(app, "facebook")
    await postback(app, click_id=a, payout="10")
    await postback(app, click_id=f, payout="2.5")
    async with client_for(app) as http:
        rows = (await http.get(f"/api/stats?from={D}&to={D}&by=channel", headers=ADMIN)).json()["rows"]
    by = {row["channel"]: row for row in rows}
    assert set(by) == {"affiliate", "paid"}
    assert (by["affiliate"]["clicks"], by["affiliate"]["approved"], by["affiliate"]["payout"]) == (
        2,
        1,
        {"USD": "10.00"},
    )
    assert (by["paid"]["clicks"], by["paid"]["approved"], by["paid"]["payout"]) == (1, 1, {"USD": "2.50"})
    # The spring campaign (the test config's own, channel left out) is paid by default.
    s = await click(app, "spring")
    await postback(app, click_id=s, payout="1")
    async with client_for(app) as http:
        rows = (await http.get(f"/api/stats?from={D}&to={D}&by=channel", headers=ADMIN)).json()["rows"]
    assert {row["channel"]: row["clicks"] for row in rows} == {"affiliate": 2, "paid": 2}


async def test_mode_click_keeps_the_click_ids_credit_even_with_a_user_id(app, clock):
    await click(app, "partner", uid="u-8")
    clock.now += 60
    paid = await click(app, "facebook", uid="u-8")
    clock.now += 60
    answer = await postback(app, click_id=paid, user_id="u-8", payout="7")
    assert db_rows(app, "SELECT campaign, attribution, uid FROM conversions") == [("facebook", None, None)]
    assert (await conversion(app, answer["id"]))["attribution"] is None


async def test_mode_priority_lets_the_rules_credit_a_postback_with_a_click_id(make_app, clock):
    app = await make_app(CHANNELS + '\n[attribution]\nmode = "priority"\n')
    aff = await click(app, "partner", uid="u-8")
    clock.now += 60
    paid = await click(app, "facebook", uid="u-8")
    clock.now += 60
    answer = await postback(app, click_id=paid, payout="7", txid="t-1")  # the click's own uid names the user
    assert db_rows(app, "SELECT campaign, uid FROM conversions") == [("partner", "u-8")]
    assert outbox(app) == [
        (answer["id"], "partner", "approved", f"https://partner.example/pb?c={aff}&s=approved&p=7.00")
    ]
    await postback(app, "duplicate", click_id=paid, payout="7", txid="t-1")  # keyed by its click id
    plain = await click(app, "facebook")  # no uid anywhere: its click decides, as in mode click
    await postback(app, click_id=plain, payout="1")
    assert db_rows(app, "SELECT campaign, attribution IS NULL FROM conversions ORDER BY id") == [
        ("partner", 0),
        ("facebook", 1),
    ]


async def test_a_postback_needs_a_click_id_or_a_valid_user_id(app):
    async with client_for(app, "192.0.2.50") as http:
        neither = await http.get("/postback", params={"token": POSTBACK_TOKEN, "payout": "1"})
        bad = await http.get("/postback", params={"token": POSTBACK_TOKEN, "user_id": "a b"})
    assert neither.status_code == 400 and neither.json()["error"] == "click_id: is required"
    assert bad.status_code == 400 and bad.json()["error"].startswith("user_id: must be 1-64 characters")


async def test_admin_shows_how_a_conversion_was_credited(app, clock):
    await send_touch(app, user_id="u-1", campaign="newsletter")
    clock.now += 60
    answer = await postback(app, user_id="u-1", payout="1")
    async with client_for(app) as http:
        page = await http.get("/admin", headers=ADMIN)
        detail = await http.get(f"/admin/conversions/{answer['id']}", headers=ADMIN)
        missing = await http.get("/admin/conversions/999", headers=ADMIN)
        api_missing = await http.get("/api/conversions/99999999999999999999", headers=ADMIN)
        anonymous = await http.get(f"/admin/conversions/{answer['id']}")
    assert f'<a href="/admin/conversions/{answer["id"]}">' in page.text
    assert "email: the last email touch in the 30-day window; no affiliate or paid touch" in page.text
    assert detail.status_code == 200 and "default-src 'none'" in detail.headers["content-security-policy"]
    assert "<b>email: the last email touch" in detail.text and ">newsletter</td>" in detail.text
    assert (missing.status_code, api_missing.status_code, anonymous.status_code) == (404, 404, 401)


# --- forgetting a person ------------------------------------------------------------------


def dump(path: Path) -> str:
    with closing(sqlite3.connect(path)) as con:
        return "\n".join(con.iterdump())


async def test_forget_a_user_leaves_no_trace_and_the_totals_stand(make_app, clock, tmp_path):
    app = await make_app(CHANNELS)
    await send_touch(app, user_id="person-42", campaign="newsletter")
    aff = await click(app, "partner", ip="203.0.113.99", uid="person-42", gclid="GCLID-of-person-42")
    await click(app, "facebook", ip="203.0.113.99", uid="person-42")
    keep = await click(app, "facebook", ip="198.51.100.1", uid="someone-else")
    clock.now += 60
    await postback(app, user_id="person-42", txid="o-1", payout="12")
    await postback(app, click_id=aff, payout="3")  # credited by its click, which carried the uid
    await postback(app, click_id=keep, payout="5")
    async with client_for(app) as http:
        before = (await http.get(f"/api/stats?from={D}&to={D}&by=campaign", headers=ADMIN)).json()["rows"]
    path = Path(app.config.storage.path)
    config = tmp_path / "config.toml"  # make_app wrote it
    dry = run("forget", "--user-id", "person-42", "--dry-run", "-c", str(config), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == (
        "would forget user id person-42: 2 clicks deleted, 2 conversions blanked, 1 touches deleted"
    )
    assert "person-42" in dump(path)  # a dry run changes nothing
    done = run("forget", "--user-id", "person-42", "-c", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.splitlines()[0]
        == "forgot user id person-42: 2 clicks deleted, 2 conversions blanked, 1 touches deleted"
    )
    text = dump(path)
    assert "person-42" not in text and "203.0.113.99" not in text
    with closing(sqlite3.connect(path)) as con:
        key = tinytrack.Database(con).user_key("person-42")
    assert key.hex() not in text.lower()  # the key made of the uid is gone too
    (decision,) = db_rows(app, "SELECT attribution FROM conversions WHERE attribution IS NOT NULL")[0]
    assert json.loads(decision) == {  # the credit stands; the person's touches are gone
        "rule": "affiliate: the last affiliate touch in the 30-day window",
        "winner": {"kind": "click", "channel": "affiliate", "campaign": "partner"},
        "candidates": [],
        "candidates_total": 3,
        "forgotten": True,
    }
    assert db_rows(app, "SELECT count(*) FROM clicks") == [(1,)] and db_rows(app, "SELECT count(*) FROM touches") == [
        (0,)
    ]
    assert db_rows(app, "SELECT campaign, payout, status FROM conversions ORDER BY id") == [
        ("partner", 12_000_000, "approved"),
        ("partner", 3_000_000, "approved"),
        ("facebook", 5_000_000, "approved"),
    ]
    async with client_for(app) as http:
        after = (await http.get(f"/api/stats?from={D}&to={D}&by=campaign", headers=ADMIN)).json()["rows"]
    assert after == before
    by_channel = run("stats", "--by", "channel", "--from", D, "--to", D, "--json", "-c", str(config), cwd=tmp_path)
    assert by_channel.returncode == 0, by_channel.stderr
    rows = {row["channel"]: row for row in json.loads(by_channel.stdout)["rows"]}
    assert (rows["affiliate"]["approved"], rows["paid"]["approved"]) == (2, 1)  # the CLI groups as the API does
    again = run("forget", "--user-id", "person-42", "-c", str(config), cwd=tmp_path)
    assert again.stdout.splitlines()[0] == "forgot user id person-42: nothing found"


async def test_forget_an_address(make_app, clock, tmp_path):
    app = await make_app(CHANNELS)
    gone = [await click(app, "partner", ip="2001:db8::7") for _ in range(3)]
    kept = await click(app, "partner", ip="2001:db8::8")
    await postback(app, click_id=gone[0], payout="1")
    path = Path(app.config.storage.path)
    dry = run("forget", "--ip", "2001:db8::7", "--dry-run", "-c", str(tmp_path / "config.toml"), cwd=tmp_path)
    assert dry.stdout.splitlines()[0] == "would forget address 2001:db8::7: 3 clicks deleted, 1 conversions blanked"
    done = run("forget", "--ip", "2001:DB8:0::7", "-c", str(tmp_path / "config.toml"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "forgot address 2001:DB8:0::7: 3 clicks deleted, 1 conversions blanked"
    assert "2001:db8::7" not in dump(path)
    assert db_rows(app, "SELECT hex(id) FROM clicks") == [(kept.replace("-", "").upper(),)]
    bad = run("forget", "--ip", "nope", "-c", str(tmp_path / "config.toml"), cwd=tmp_path)
    assert bad.returncode != 0 and "--ip: not an IP address, got 'nope'" in bad.stderr
    neither = run("forget", "-c", str(tmp_path / "config.toml"), cwd=tmp_path)
    assert neither.returncode == 2


# --- retention -------------------------------------------------------------------------------


async def test_uids_are_cut_after_the_window_touches_deleted_and_conversions_lose_theirs(make_app, clock):
    app = await make_app(CHANNELS + "\n[retention]\npii_days = 7\n")
    await app.purger.stop()  # the test purges when it says
    assert app.config.retention.uid_days == 30
    await send_touch(app, user_id="u-old", campaign="newsletter")
    old = await click(app, "partner", uid="u-old")
    await postback(app, user_id="u-old", payout="1")
    clock.now += 10 * 86400  # past pii_days, inside the window
    await app.purger.run_once()
    assert db_rows(app, "SELECT uid FROM clicks") == [("u-old",)]  # the window still needs it
    assert db_rows(app, "SELECT count(*) FROM touches") == [(1,)]
    assert db_rows(app, "SELECT uid FROM conversions") == [(None,)]  # pii_days: the decision is made
    new = await click(app, "partner", uid="u-new")
    clock.now += 21 * 86400  # the first ones past the window
    await app.purger.run_once()
    uids = dict(db_rows(app, "SELECT hex(id), uid FROM clicks"))
    assert uids == {old.replace("-", "").upper(): None, new.replace("-", "").upper(): "u-new"}
    assert db_rows(app, "SELECT count(*) FROM touches") == [(0,)]


# --- the README's worked example, as a user runs it ---------------------------------------------


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading: str, language: str) -> str:
    """The first ```language block after `heading` in the README."""
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_the_readme_worked_example_credits_the_affiliate(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port, extra="\n" + readme_block("### A worked example", "toml"))
    server = Server(tmp_path, config, port).start()
    try:
        script = readme_block("### A worked example", "sh")
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            env={"PATH": "/usr/bin:/bin", "TT": server.url, "TOKEN": POSTBACK_TOKEN, "ADMIN": ADMIN_TOKEN},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[-1] == "affiliate: the last affiliate touch in the 30-day window -> partner", done.stdout
        with server.client() as http:
            (row,) = http.get("/api/conversions", headers=ADMIN).json()["rows"]
            assert (row["campaign"], row["sub1"], row["payout"]) == ("partner", "aff-7", "49.90")
            rows = http.get("/api/stats?by=channel", headers=ADMIN).json()["rows"]
        assert {r["channel"]: r["clicks"] for r in rows} == {"affiliate": 1, "paid": 1}
    finally:
        server.stop()


async def test_a_user_id_postback_reads_each_source_once_by_its_index(app, clock):
    """The speed contract: one indexed read per candidate source (clicks by uid, touches
    by uid), besides the dedupe lookup and the winner's row; never a scan."""
    await send_touch(app, user_id="u-1", campaign="newsletter")
    await click(app, "partner", uid="u-1")
    clock.now += 60
    statements: list[str] = []
    con = app.store._db.con
    con.set_trace_callback(statements.append)
    try:
        await postback(app, user_id="u-1", txid="o-1", payout="1")
    finally:
        con.set_trace_callback(None)
    clicks_sql = "SELECT id, campaign, ts, NULL FROM clicks WHERE uid = ? AND ts >= ? AND ts <= ? AND bot = 0"
    touches_sql = "SELECT id, campaign, ts, channel FROM touches WHERE uid = ? AND ts >= ? AND ts <= ?"
    for sql, index in ((clicks_sql, "clicks_uid"), (touches_sql, "touches_key")):
        ran = [s for s in statements if " ".join(s.split()).startswith(sql.split("?")[0])]
        assert len(ran) == 1, statements  # once per source
        with closing(sqlite3.connect(app.config.storage.path)) as db:
            plan = " ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql} ORDER BY ts DESC", ("u-1", 0, 1)))
        assert f"USING INDEX {index}" in plan or f"USING COVERING INDEX {index}" in plan, plan


# --- found by review: each failed before its fix -------------------------------------------

PRIORITY = CHANNELS + '\n[attribution]\nmode = "priority"\n'


async def test_priority_mode_one_order_is_one_conversion_whatever_each_postback_names(make_app, clock):
    app = await make_app(PRIORITY)
    aff = await click(app, "partner", uid="u-1")
    clock.now += 60
    paid = await click(app, "facebook", uid="u-1")
    clock.now += 60
    first = await postback(app, click_id=paid, txid="order-1", payout="10")  # the paid network's
    assert (await postback(app, "duplicate", user_id="u-1", txid="order-1", payout="10"))["id"] == first["id"]
    assert (await postback(app, "duplicate", click_id=aff, txid="order-1", payout="10"))["id"] == first["id"]
    assert db_rows(app, "SELECT campaign FROM conversions") == [("partner",)]
    assert len(outbox(app)) == 1


async def test_an_order_first_told_by_user_id_is_updated_by_a_postback_naming_its_click(app, clock):
    aff = await click(app, "partner", uid="u-2")
    clock.now += 60
    first = await postback(app, user_id="u-2", txid="o-9", payout="10", status="pending")
    later = await postback(app, "updated", click_id=aff, user_id="u-2", txid="o-9", status="approved")
    assert later["id"] == first["id"]
    assert db_rows(app, "SELECT campaign, status FROM conversions") == [("partner", "approved")]


async def test_pass_query_still_passes_the_sites_user_id_on(app):
    async with client_for(app) as http:
        answer = await http.get("/c/passing", params={"user_id": "cust-77", "visitor_id": "v1", "aff": "x"})
    assert answer.headers["location"] == "https://offer.example.com/go?user_id=cust-77&visitor_id=v1&aff=x#top"
    assert db_rows(app, "SELECT uid FROM clicks") == [("cust-77",)]  # the first of the aliases


async def test_a_conversion_credited_to_a_touch_is_not_forwarded(app, clock):
    await send_touch(app, user_id="u-1", campaign="newsletter")
    clock.now += 60
    answer = await postback(app, user_id="u-1", txid="o-1", payout="5")
    await postback(app, "updated", user_id="u-1", txid="o-1", payout="5", status="rejected")
    assert db_rows(app, "SELECT id, campaign FROM conversions") == [(answer["id"], "newsletter")]
    assert outbox(app) == []  # no click the newsletter's source could match


async def test_priority_mode_keeps_the_clock_skew_allowance_of_a_named_click(make_app, clock):
    app = await make_app(PRIORITY)
    paid = await click(app, "facebook", uid="u-2")
    await postback(app, click_id=paid, txid="o-2", payout="5", ts=str(int(clock.now - 30)))
    assert db_rows(app, "SELECT campaign, status, reason FROM conversions") == [("facebook", "approved", None)]


async def test_bot_clicks_and_clicks_past_their_campaigns_window_are_no_candidates(make_app, clock):
    extra = '[campaigns.partner7]\nchannel = "affiliate"\nwindow_days = 7\nurl = "https://o.example/?cid={click_id}"\n'
    app = await make_app(CHANNELS + extra)
    await click(app, "partner7", uid="u-3")  # 10 days before: outside its campaign's own window
    clock.now += 10 * 86400
    async with client_for(app, "198.51.100.9") as http:  # a crawler that followed a link with the uid
        assert (
            await http.get("/c/partner", params={"uid": "u-3"}, headers={"user-agent": "Googlebot/2.1"})
        ).is_redirect
    await click(app, "facebook", uid="u-3")
    clock.now += 60
    answer = await postback(app, user_id="u-3", txid="o-3", payout="5")
    assert db_rows(app, "SELECT campaign, reason FROM conversions") == [("facebook", None)]
    assert [c["channel"] for c in (await conversion(app, answer["id"]))["attribution"]["candidates"]] == ["paid"]


async def test_flags_recompute_judges_the_credited_click_not_the_key(make_app, clock, tmp_path):
    fraud = "\n[fraud]\nmin_ctit_seconds = 10\n"
    app = await make_app(CHANNELS + fraud)
    await send_touch(app, user_id="u-1", campaign="newsletter")
    clock.now += 1  # a second after the email: no click, so no ctit_fast
    await postback(app, user_id="u-1", txid="o-1", payout="5")
    await click(app, "partner", uid="u-2")
    clock.now += 3  # three seconds after the affiliate click: ctit_fast
    await postback(app, user_id="u-2", txid="o-2", payout="5")
    assert [json.loads(f) if f else None for (f,) in db_rows(app, "SELECT flags FROM conversions ORDER BY id")] == [
        None,
        {"ctit_fast": "3.0 s < 10 s"},
    ]
    same = run("flags", "recompute", "--since", D, "--dry-run", "-c", str(tmp_path / "config.toml"), cwd=tmp_path)
    assert same.stdout.splitlines() == ["0 of 2 conversions would change"], same.stdout


async def test_a_decision_keeps_the_latest_candidates_and_the_winner(app, clock):
    await click(app, "partner", uid="u-5")  # the winner, older than all the rest
    for _ in range(60):
        clock.now += 1
        await click(app, "facebook", uid="u-5")
    answer = await postback(app, user_id="u-5", payout="1")
    decision = (await conversion(app, answer["id"]))["attribution"]
    assert decision["candidates_total"] == 61
    assert len(decision["candidates"]) == 51 and decision["candidates"][0] == decision["winner"]


async def test_a_users_key_is_no_plain_hash_of_the_uid(tmp_path):
    keys = []
    for name in ("a.db", "b.db"):
        with closing(tinytrack.Database.open(str(tmp_path / name))) as db:
            keys.append(db.user_key("u-1"))
    assert keys[0] != keys[1] and all(len(key) == 21 and key.startswith(b"user:") for key in keys)


async def test_switching_back_to_mode_click_keeps_finding_what_the_matrix_credited(make_app, clock, tmp_path):
    app = await make_app(PRIORITY)
    aff = await click(app, "partner", uid="u-6")
    clock.now += 60
    paid = await click(app, "facebook", uid="u-6")
    clock.now += 60
    first = await postback(app, click_id=paid, txid="o-6", payout="8", status="pending")
    assert app.reload(str(write_config(tmp_path, extra=CHANNELS)))  # mode "click" again
    later = await postback(app, "updated", click_id=paid, txid="o-6", status="approved")
    assert later["id"] == first["id"]
    assert db_rows(app, "SELECT campaign, status FROM conversions") == [("partner", "approved")]
    assert [url for *_, url in outbox(app)] == [f"https://partner.example/pb?c={aff}&s=approved&p=8.00"]


async def test_switching_to_mode_priority_keeps_finding_what_a_click_was_credited(make_app, clock, tmp_path):
    app = await make_app(CHANNELS)
    await click(app, "partner", uid="u-7")
    clock.now += 60
    paid = await click(app, "facebook", uid="u-7")
    clock.now += 60
    first = await postback(app, click_id=paid, txid="o-7", payout="8", status="pending")  # credited to its click
    assert app.reload(str(write_config(tmp_path, extra=PRIORITY)))
    later = await postback(app, "updated", click_id=paid, txid="o-7", status="approved")
    assert later["id"] == first["id"]
    assert db_rows(app, "SELECT campaign, status FROM conversions") == [("facebook", "approved")]


# --- found by a second review: each failed before its fix ------------------------------------


async def test_click_mode_a_new_clicks_sale_without_txid_is_its_own(app, clock):
    await send_touch(app, user_id="u-1", campaign="newsletter")
    clock.now += 60
    old = await postback(app, user_id="u-1", payout="5")  # keyed (user, event)
    clock.now += 20 * 86400
    aff = await click(app, "partner", uid="u-1")
    clock.now += 60
    new = await postback(app, click_id=aff, payout="9")  # no txid: the click's own (click, event)
    rejected = await postback(app, "updated", click_id=aff, status="rejected")
    assert new["id"] != old["id"] and rejected["id"] == new["id"]
    assert db_rows(app, "SELECT id, campaign, status FROM conversions ORDER BY id") == [
        (old["id"], "newsletter", "approved"),
        (new["id"], "partner", "rejected"),
    ]


async def test_priority_mode_a_later_status_naming_only_the_click_updates_the_order(make_app, clock):
    app = await make_app(PRIORITY)
    paid = await click(app, "facebook")  # the click carries no uid; the first postback names the user
    clock.now += 60
    first = await postback(app, click_id=paid, user_id="u-2", txid="o-1", payout="10", status="pending")
    later = await postback(app, "updated", click_id=paid, txid="o-1", status="approved")
    assert later["id"] == first["id"]


async def test_click_mode_an_order_told_by_click_then_by_user_id_is_one_conversion(app, clock):
    aff = await click(app, "partner", uid="u-3")
    clock.now += 60
    first = await postback(app, click_id=aff, txid="o-3", payout="10")
    assert (await postback(app, "duplicate", user_id="u-3", txid="o-3", payout="10"))["id"] == first["id"]


async def test_a_posted_touch_past_its_campaigns_window_is_no_candidate(make_app, clock):
    extra = '[campaigns.partner7]\nchannel = "affiliate"\nwindow_days = 7\nurl = "https://o.example/?cid={click_id}"\n'
    app = await make_app(CHANNELS + extra)
    await send_touch(app, user_id="u-4", campaign="partner7")
    clock.now += 10 * 86400
    await click(app, "facebook", uid="u-4")
    clock.now += 60
    await postback(app, user_id="u-4", txid="o-4", payout="5")
    assert db_rows(app, "SELECT campaign, reason FROM conversions") == [("facebook", None)]


async def test_the_conversion_page_after_forget_and_forget_ip_in_any_written_form(make_app, clock, tmp_path):
    app = await make_app(CHANNELS)
    async with client_for(app, "127.0.0.1") as http:  # behind the trusted proxy: the address as it was sent
        sent = {"user-agent": HUMAN, "x-forwarded-for": "::ffff:203.0.113.5"}
        assert (await http.get("/c/partner", params={"uid": "p-1"}, headers=sent)).is_redirect
    clock.now += 60
    answer = await postback(app, user_id="p-1", txid="o-1", payout="1")
    config = str(tmp_path / "config.toml")
    assert run("forget", "--user-id", "p-1", "-c", config, cwd=tmp_path).returncode == 0
    async with client_for(app) as http:
        page = await http.get(f"/admin/conversions/{answer['id']}", headers=ADMIN)
    assert page.status_code == 200 and "click  (affiliate, partner)" in page.text
    async with client_for(app, "127.0.0.1") as http:
        assert (await http.get("/c/partner", headers=sent)).is_redirect
    done = run("forget", "--ip", "203.0.113.5", "-c", config, cwd=tmp_path)
    assert done.stdout.splitlines()[0] == "forgot address 203.0.113.5: 1 clicks deleted"
    assert db_rows(app, "SELECT count(*) FROM clicks") == [(0,)]


async def test_a_database_without_the_user_key_secret_makes_one(tmp_path):
    path = str(tmp_path / "t.db")
    with closing(tinytrack.Database.open(path)) as db, db.transaction():
        db.con.execute("DELETE FROM meta WHERE key = 'user_key_secret'")  # a copy made before the secret
    with closing(tinytrack.Database.open(path)) as db, db.transaction():
        first = db.user_key("u-1")  # made, and kept with the caller's transaction
    with closing(tinytrack.Database.open(path)) as db:
        assert db.user_key("u-1") == first
