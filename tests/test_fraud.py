"""Fraud flags (issue 16, the part built so far): [fraud] config, the click rules
(ip_flood, listed_ip, and no_click_id and bot in the same mechanism), a conversion's
flags (its click's, and ctit_fast), the actions (flag, hold, reject), the review, and
where flags show.

Each rule is tested at, just under and just over its threshold.
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, FakeClock, at, client_for, write_config
from hypothesis import given
from hypothesis import strategies as st
from test_cli import run

import tinytrack
from tinytrack import ConfigError, FraudConfig, build_config

pytestmark = pytest.mark.anyio

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
D = "2026-11-20"

FRAUD = """
[fraud]
ip_clicks_per_minute = 3
min_ctit_seconds = 10
listed_ips = ["203.0.113.0/24", "2001:db8::/32"]

[campaigns.strict]
url = "https://offer.example.com/s?cid={click_id}"
postback_url = "https://source.example/pb?c={click_id}"
fraud = { action = "reject", min_ctit_seconds = 60 }

[campaigns.held]
url = "https://offer.example.com/h?cid={click_id}"
postback_url = "https://source.example/pb?c={click_id}&s={status}"
fraud = { action = "hold" }

[campaigns.lenient]
url = "https://offer.example.com/l?cid={click_id}"
fraud = { ip_clicks_per_minute = 0, min_ctit_seconds = 0, listed_ips = [] }
"""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(at(D))


@pytest.fixture
async def app(make_app):
    return await make_app(FRAUD)


async def click(app: tinytrack.TinyTrack, campaign: str = "spring", ip: str = "198.51.100.7", ua: str = HUMAN) -> str:
    async with client_for(app, ip) as http:
        answer = await http.get(f"/c/{campaign}", headers={"user-agent": ua})
    assert answer.status_code == 302, answer.text
    return answer.headers["location"].split("cid=")[1].split("&")[0]


async def postback(app: tinytrack.TinyTrack, click_id: str, expect: str = "created", **fields: str) -> dict:
    async with client_for(app, "192.0.2.50") as http:
        answer = await http.get("/postback", params={"click_id": click_id, "token": POSTBACK_TOKEN, **fields})
    assert (answer.status_code, answer.json().get("status")) == (200, expect), answer.text
    return answer.json()


def flags_of(app: tinytrack.TinyTrack, table: str, key: str, value: object) -> dict | None:
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        (flags,) = con.execute(f"SELECT flags FROM {table} WHERE {key} = ?", (value,)).fetchone()
    return flags and json.loads(flags)


def click_flags(app: tinytrack.TinyTrack, click_id: str) -> dict | None:
    return flags_of(app, "clicks", "id", bytes.fromhex(click_id.replace("-", "")))


async def stats(app: tinytrack.TinyTrack, query: str) -> list[dict]:
    async with client_for(app) as http:
        answer = await http.get(f"/api/stats?{query}", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return answer.json()["rows"]


# --- config -----------------------------------------------------------------------


def config_with(**fraud: object) -> dict:
    return {
        "postback": {"tokens": ["t" * 16]},
        "admin": {"token": "a" * 16},
        "fraud": fraud,
        "campaigns": {"x": {"url": "https://o.example/"}},
    }


def test_campaigns_take_fraud_rules_over_the_global_ones():
    config = build_config(
        {
            **config_with(ip_clicks_per_minute=30, min_ctit_seconds=10, action="flag"),
            "campaigns": {
                "x": {"url": "https://o.example/"},
                "y": {"url": "https://o.example/", "fraud": {"min_ctit_seconds": 0, "action": "reject"}},
            },
        }
    )
    assert config.campaigns["x"].fraud == FraudConfig(ip_clicks_per_minute=30, min_ctit_seconds=10)
    assert config.campaigns["y"].fraud == FraudConfig(ip_clicks_per_minute=30, action="reject")  # 0: off
    assert config.campaigns["x"].fraud.click_rules and not FraudConfig(min_ctit_seconds=5).click_rules


@pytest.mark.parametrize(
    "fraud, message",
    [
        ({"ip_clicks_per_minute": -1}, "fraud.ip_clicks_per_minute: must be between 0 and 1000000, got -1"),
        ({"min_ctit_seconds": "10"}, "fraud.min_ctit_seconds: must be an integer, got '10'"),
        ({"action": "drop"}, "fraud.action: must be one of flag, hold, reject, got 'drop'"),
        (
            {"listed_ips": ["10.0.0.1/8"]},
            "fraud.listed_ips[0]: not an IP address or CIDR: '10.0.0.1/8' (10.0.0.1/8 has host bits set)",
        ),
        (
            {"listed_ips_file": "/nonexistent/list.txt"},
            "fraud.listed_ips_file: cannot read /nonexistent/list.txt: [Errno 2] No such file or directory: '/nonexistent/list.txt'",
        ),
        ({"window": 3}, "fraud.window: unknown key"),
    ],
)
def test_bad_fraud_config_names_the_key(fraud: dict, message: str):
    with pytest.raises(ConfigError) as caught:
        build_config(config_with(**fraud))
    assert str(caught.value) == message


def test_a_listed_ips_file_is_read_with_comments_and_names_a_bad_line(tmp_path: Path):
    listed = tmp_path / "datacenters.txt"
    listed.write_text("# hosting ranges\n192.0.2.0/24\n\n2001:db8:1::/48  # a v6 range\n")
    config = build_config(config_with(listed_ips_file=str(listed)))
    assert [str(net) for net in config.fraud.listed_ips] == ["192.0.2.0/24", "2001:db8:1::/48"]
    listed.write_text("192.0.2.0/24\nnot-an-address\n")
    with pytest.raises(ConfigError) as caught:
        build_config(config_with(listed_ips_file=str(listed)))
    assert str(caught.value).startswith(f"{listed}:2: not an IP address or CIDR: 'not-an-address'")


# --- click rules ------------------------------------------------------------------


async def test_ip_flood_at_under_and_over_the_limit(app, clock):
    """3 a minute is allowed: the 4th click of an address in that minute is flagged, the
    next minute starts over, and other addresses and campaigns count apart."""
    ids = [await click(app, ip="198.51.100.9") for _ in range(4)]
    assert [click_flags(app, cid) for cid in ids[:3]] == [None, None, None]
    assert click_flags(app, ids[3]) == {"ip_flood": "4 clicks from this address this minute > 3"}
    assert click_flags(app, await click(app, ip="198.51.100.10")) is None  # another address
    assert click_flags(app, await click(app, "strict", ip="198.51.100.9")) is None  # another campaign
    clock.now = at(D, 12, 1)  # the next minute
    assert click_flags(app, await click(app, ip="198.51.100.9")) is None
    for _ in range(5):
        assert click_flags(app, await click(app, "lenient", ip="198.51.100.9")) is None  # its rule is off


def test_address_counts_stay_bounded():
    counts = tinytrack.AddressCounts(limit=3)
    assert [counts.add("c", f"10.0.0.{i}", 60_000) for i in range(3)] == [1, 1, 1]
    assert counts.add("c", "10.0.0.0", 60_000) == 2
    assert counts.add("c", "10.0.0.9", 60_000) == 1 and len(counts.counts) == 1  # full: started over
    assert counts.add("c", "10.0.0.9", 120_000) == 1  # a new minute


async def test_listed_ips_v4_v6_and_mapped(app):
    assert click_flags(app, await click(app, ip="203.0.113.77")) == {"listed_ip": "203.0.113.77 in 203.0.113.0/24"}
    assert click_flags(app, await click(app, ip="::ffff:203.0.113.78")) == {
        "listed_ip": "203.0.113.78 in 203.0.113.0/24"
    }
    assert click_flags(app, await click(app, ip="2001:db8::5")) == {"listed_ip": "2001:db8::5 in 2001:db8::/32"}
    assert click_flags(app, await click(app, ip="203.0.114.1")) is None  # just outside
    assert click_flags(app, await click(app, "lenient", ip="203.0.113.77")) is None


async def test_a_reload_reads_the_listed_ips_file_again(make_app, tmp_path):
    listed = tmp_path / "listed.txt"
    listed.write_text("192.0.2.0/24\n")
    extra = f'[fraud]\nlisted_ips_file = "{listed}"\n'
    app = await make_app(extra)
    assert click_flags(app, await click(app, ip="192.0.2.1")) == {"listed_ip": "192.0.2.1 in 192.0.2.0/24"}
    assert click_flags(app, await click(app, ip="198.18.0.1")) is None
    listed.write_text("198.18.0.0/15\n")
    assert app.reload(str(write_config(tmp_path, extra=extra)))
    assert click_flags(app, await click(app, ip="198.18.0.1")) == {"listed_ip": "198.18.0.1 in 198.18.0.0/15"}
    assert click_flags(app, await click(app, ip="192.0.2.1")) is None


async def test_clicks_without_rules_store_no_flags_and_count_nothing(make_app):
    app = await make_app()
    for _ in range(50):
        assert click_flags(app, await click(app, ip="198.51.100.9")) is None
    assert app.address_counts.counts == {}


# --- conversions ------------------------------------------------------------------


async def test_ctit_fast_at_under_and_over_the_threshold(app, clock):
    """min_ctit_seconds = 10: 9.9 s after the click is flagged, 10 s is not."""
    fast, exact = await click(app), await click(app)
    clock.now = at(D, second=9.9)
    await postback(app, fast)
    clock.now = at(D, second=10)
    await postback(app, exact)
    assert flags_of(app, "conversions", "click_id", bytes.fromhex(fast.replace("-", ""))) == {
        "ctit_fast": "9.9 s < 10 s"
    }
    assert flags_of(app, "conversions", "click_id", bytes.fromhex(exact.replace("-", ""))) is None


async def test_a_conversion_inherits_its_clicks_flags_and_bot(app, clock):
    flooded = [await click(app, ip="198.51.100.20") for _ in range(4)][-1]
    bot = await click(app, ua=GOOGLEBOT)
    clock.now = at(D, 13)
    await postback(app, flooded)
    await postback(app, bot)
    assert flags_of(app, "conversions", "click_id", bytes.fromhex(flooded.replace("-", ""))) == {
        "ip_flood": "4 clicks from this address this minute > 3"
    }
    assert flags_of(app, "conversions", "click_id", bytes.fromhex(bot.replace("-", ""))) == {
        "bot": "its click was a bot's (User-Agent)"
    }


async def test_reject_stores_it_rejected_for_fraud_and_never_forwards_it(app, clock):
    """strict: action reject, min_ctit_seconds 60 (its own over the global 10)."""
    quick, slow = await click(app, "strict"), await click(app, "strict")
    clock.now = at(D, second=30)
    answer = await postback(app, quick, expect="rejected", payout="5")
    assert answer == {"status": "rejected", "reason": "fraud"}
    clock.now = at(D, second=61)
    await postback(app, slow, payout="5")
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        rows = con.execute("SELECT status, reason, flags IS NOT NULL FROM conversions ORDER BY id").fetchall()
        outbox = con.execute("SELECT count(*) FROM outbox").fetchone()
    assert rows == [("rejected", "fraud", 1), ("approved", None, 0)]
    assert outbox == (1,)  # only the clean one is forwarded
    await postback(app, quick, expect="rejected", payout="5")  # the network again: the same answer


async def test_flag_counts_the_conversion_as_usual(app, clock):
    cid = await click(app)
    clock.now = at(D, second=1)
    await postback(app, cid, payout="2.50")
    (row,) = await stats(app, f"from={D}&to={D}&campaign=spring")
    assert (row["approved"], row["payout"], row["flagged_conversions"]) == (1, {"USD": "2.50"}, 1)


# --- surfaces -----------------------------------------------------------------------


async def test_stats_api_and_metrics_show_the_flags(app, clock):
    flooded = [await click(app, ip="198.51.100.30") for _ in range(5)]  # the 4th and 5th flagged
    listed = await click(app, ip="203.0.113.9")
    await click(app, ua=GOOGLEBOT, ip="198.51.100.31")  # a bot: bot_clicks, not flagged_clicks
    clock.now = at(D, 14)
    await postback(app, flooded[4], payout="1")  # flagged: ip_flood
    await postback(app, listed, payout="1", status="pending")  # flagged: listed_ip
    await postback(app, flooded[0], payout="1")  # clean
    (row,) = await stats(app, f"from={D}&to={D}&campaign=spring")
    assert (row["clicks"], row["bot_clicks"], row["flagged_clicks"], row["flagged_conversions"]) == (6, 1, 3, 2)
    by_status = {r["status"]: r["flagged_conversions"] for r in await stats(app, f"from={D}&to={D}&by=status")}
    assert by_status == {"approved": 1, "pending": 1}
    (raw,) = await stats(app, f"from={D}&to={D}&campaign=spring&by=sub2")  # the raw rows agree
    assert (raw["flagged_clicks"], raw["flagged_conversions"]) == (3, 2)
    async with client_for(app) as http:
        listing = (await http.get("/api/conversions?since=2026-01-01&flag=listed_ip", headers=ADMIN)).json()
        assert [(r["click_id"], r["flags"]) for r in listing["rows"]] == [
            (listed, {"listed_ip": "203.0.113.9 in 203.0.113.0/24"})
        ]
        every = (await http.get("/api/conversions?since=2026-01-01", headers=ADMIN)).json()["rows"]
        assert [r["flags"] for r in every] == [
            {"ip_flood": "5 clicks from this address this minute > 3"},
            {"listed_ip": "203.0.113.9 in 203.0.113.0/24"},
            None,
        ]
        csv_text = (await http.get("/api/conversions?since=2026-01-01&format=csv", headers=ADMIN)).text
        assert "ip_flood: 5 clicks from this address this minute > 3" in csv_text
        bad = await http.get("/api/conversions?flag=nope", headers=ADMIN)
        assert (bad.status_code, bad.json()) == (
            400,
            {"error": "flag: must be one of bot, no_click_id, ip_flood, listed_ip, ctit_fast, ip_cluster, got 'nope'"},
        )
        metrics = (await http.get("/metrics", headers=ADMIN)).text
    assert 'tinytrack_flags_total{kind="click",flag="ip_flood"} 2' in metrics
    assert 'tinytrack_flags_total{kind="click",flag="listed_ip"} 1' in metrics
    assert 'tinytrack_flags_total{kind="conversion",flag="ip_flood"} 1' in metrics


async def test_an_lp_click_without_a_click_id_says_why(make_app):
    app = await make_app('[campaigns.go]\nurl = "https://o.example/?c={click_id}"\n')
    async with client_for(app) as http:
        answers = [await http.get(f"/go/go{query}", headers={"user-agent": HUMAN}) for query in ("", "?cid=x1")]
    ids = [a.headers["location"].split("c=")[1] for a in answers]
    assert [click_flags(app, cid) for cid in ids] == [
        {"no_click_id": "cid: missing"},
        {"no_click_id": "cid: not a click id, got 'x1'"},
    ]


# --- hold and review --------------------------------------------------------------


def outbox(app: tinytrack.TinyTrack) -> list[tuple]:
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        return con.execute("SELECT conversion_id, status, url FROM outbox ORDER BY id").fetchall()


def history(app: tinytrack.TinyTrack, conversion_id: int) -> list[tuple]:
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        return con.execute(
            "SELECT status, ip FROM conversion_history WHERE conversion_id = ? ORDER BY rowid", (conversion_id,)
        ).fetchall()


async def review(app: tinytrack.TinyTrack, conversion_id: int, body: bytes) -> httpx.Response:
    async with client_for(app) as http:
        return await http.post(
            f"/api/conversions/{conversion_id}/review",
            content=body,
            headers={**ADMIN, "content-type": "application/json"},
        )


async def test_hold_keeps_it_pending_unforwarded_until_approved_then_forwards_it_once(app, clock):
    cid = await click(app, "held")
    clock.now = at(D, second=2)  # ctit_fast (the global 10 s)
    answer = await postback(app, cid, payout="7")  # the network hears the usual answer
    conversion_id = answer["id"]
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        assert con.execute("SELECT status, reason FROM conversions").fetchall() == [("pending", "held")]
    assert outbox(app) == []
    await postback(app, cid, expect="duplicate", payout="7")  # the network again: nothing new
    await postback(app, cid, expect="updated", payout="7", status="pending")  # kept for the review
    await postback(app, cid, expect="updated", payout="7")  # and approved again
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        assert con.execute("SELECT status, reason, network_status FROM conversions").fetchall() == [
            ("pending", "held", "approved")
        ]
    assert outbox(app) == []
    async with client_for(app) as http:
        page = (await http.get("/admin", headers=ADMIN)).text
    assert f'<td data-label="id">{conversion_id}</td>' in page.split("<h2>Held for review</h2>")[1].split("</table>")[0]
    approved = await review(app, conversion_id, b'{"decision": "approve"}')
    assert (approved.status_code, approved.json()) == (200, {"id": conversion_id, "status": "approved"})
    assert outbox(app) == [(conversion_id, "approved", f"https://source.example/pb?c={cid}&s=approved")]
    again = await review(app, conversion_id, b'{"decision": "approve"}')  # once only
    assert (again.status_code, again.json()) == (
        409,
        {"error": f"conversion {conversion_id}: not held for review (it is approved)"},
    )
    assert len(outbox(app)) == 1
    assert history(app, conversion_id) == [("pending", "192.0.2.50"), ("approved", "review:approve")]
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        assert con.execute("SELECT network_status FROM conversions").fetchall() == [(None,)]
    (row,) = await stats(app, f"from={D}&to={D}&campaign=held")
    assert (row["approved"], row["pending"], row["payout"], row["flagged_conversions"]) == (1, 0, {"USD": "7.00"}, 1)


async def test_reject_on_review_and_bad_reviews(app, clock):
    cid = await click(app, "held")
    clock.now = at(D, second=1)
    conversion_id = (await postback(app, cid, payout="3"))["id"]
    for body, code, error in (
        (b'{"decision": "maybe"}', 400, 'decision: must be "approve" or "reject", in a JSON body, got '),
        (b"approve", 400, "decision: must be"),
    ):
        answer = await review(app, conversion_id, body)
        assert answer.status_code == code and answer.json()["error"].startswith(error), answer.text
    missing = await review(app, 999, b'{"decision": "reject"}')
    assert (missing.status_code, missing.json()) == (404, {"error": "conversion 999: no such conversion"})
    rejected = await review(app, conversion_id, b'{"decision": "reject"}')
    assert rejected.json() == {"id": conversion_id, "status": "rejected"}
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        assert con.execute("SELECT status, reason FROM conversions").fetchall() == [("rejected", "fraud")]
    assert outbox(app) == []  # the source never heard of it: nothing to take back
    async with client_for(app) as http:
        unauthorized = await http.post(f"/api/conversions/{conversion_id}/review", json={"decision": "approve"})
    assert unauthorized.status_code == 401


async def test_the_review_command(app, clock, tmp_path):
    ids = []
    for _ in range(3):
        cid = await click(app, "held")
        ids.append((await postback(app, cid, payout="2"))["id"])  # the same second: ctit_fast
    path = str(tmp_path / "config.toml")
    listed = run("review", "list", "-c", path, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:6] == ["id", "created", "campaign", "sub1", "event", "payout"]
    assert [line.split()[0] for line in lines[1:]] == [str(i) for i in ids]
    assert "ctit_fast: 0.0 s < 10 s" in lines[1]
    done = run("review", "approve", str(ids[0]), str(ids[1]), "-c", path, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, f"conversion {ids[0]}: approved\nconversion {ids[1]}: approved\n")
    done = run("review", "reject", str(ids[2]), str(ids[0]), "-c", path, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == f"conversion {ids[2]}: rejected\n"
    assert done.stderr == f"tinytrack: review reject: not reviewed: {ids[0]}: not held for review (it is approved)\n"
    assert [row[:2] for row in outbox(app)] == [(ids[0], "approved"), (ids[1], "approved")]
    assert run("review", "list", "-c", path, cwd=tmp_path).stdout == "nothing held for review\n"


# --- ip_cluster -------------------------------------------------------------------


async def test_ip_cluster_at_under_and_over_the_limit_within_the_hour(make_app, clock):
    """ip_conversions_per_hour = 2: the 3rd conversion within an hour on clicks from one
    address is flagged; one an hour and more later is not; other addresses count apart."""
    app = await make_app(
        '[fraud]\nip_conversions_per_hour = 2\n[campaigns.other]\nurl = "https://o.example/?cid={click_id}"\n'
    )
    ids = [await click(app, ip="198.51.100.40") for _ in range(4)] + [await click(app, "other", ip="198.51.100.40")]
    elsewhere = await click(app, ip="198.51.100.41")
    minutes = (0, 10, 20, 61 + 20)  # the 4th comes 61 minutes after the 2nd's... and after the 1st
    for cid, minute in zip(ids, minutes, strict=False):
        clock.now = at(D, 12, 0) + minute * 60
        await postback(app, cid)
    clock.now = at(D, 13, 25)
    await postback(app, ids[4])  # another campaign, same address: counted too (2nd-4th are within the hour)
    await postback(app, elsewhere)

    def cluster(cid: str) -> dict | None:
        return flags_of(app, "conversions", "click_id", bytes.fromhex(cid.replace("-", "")))

    assert [cluster(cid) for cid in ids[:2]] == [None, None]
    assert cluster(ids[2]) == {"ip_cluster": "3 conversions in an hour on clicks from this address > 2"}
    assert cluster(ids[3]) is None  # 13:21: the hour back to 12:21 holds none of the others
    assert cluster(ids[4]) is None  # 13:25: only 13:21's is within its hour
    assert cluster(elsewhere) is None
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        kept = con.execute("SELECT count(*) FROM conversions WHERE click_ip = '198.51.100.40'").fetchone()
    assert kept == (5,)


async def test_the_click_address_kept_for_ip_cluster_goes_with_pii_days(make_app, clock):
    app = await make_app("[fraud]\nip_conversions_per_hour = 5\n[retention]\npii_days = 30\n")
    await postback(app, await click(app, ip="198.51.100.50"))
    old_day = int(app.clock() // 86400)
    clock.now += 31 * 86400
    db = tinytrack.Database.open(app.config.storage.path)
    with closing(db), db.transaction():  # one purge batch, as the purger runs it
        rule = next(r for r in tinytrack.PURGE_RULES if r.name == "conversion_ips")
        assert db.purge_batch(rule, app.config.retention, 100, int(clock.now * 1000)) == 1
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        assert con.execute("SELECT click_ip, ts / 86400000 FROM conversions").fetchall() == [(None, old_day)]


async def test_without_ip_cluster_no_click_address_is_kept(app, clock):
    await postback(app, await click(app))
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        assert con.execute("SELECT click_ip FROM conversions").fetchall() == [(None,)]


# --- recompute --------------------------------------------------------------------

BEFORE = """
[forward]
delay_seconds = 3600  # nothing is tried during the test but what it marks as delivered

[campaigns.strict]
url = "https://offer.example.com/s?cid={click_id}"
postback_url = "https://source.example/pb?c={click_id}&s={status}"

[campaigns.held]
url = "https://offer.example.com/h?cid={click_id}"
postback_url = "https://source.example/pb?c={click_id}&s={status}"
"""
AFTER = """
[forward]
delay_seconds = 3600

[fraud]
min_ctit_seconds = 10
listed_ips = ["203.0.113.0/24"]

[campaigns.strict]
url = "https://offer.example.com/s?cid={click_id}"
postback_url = "https://source.example/pb?c={click_id}&s={status}"
fraud = { action = "reject" }

[campaigns.held]
url = "https://offer.example.com/h?cid={click_id}"
postback_url = "https://source.example/pb?c={click_id}&s={status}"
fraud = { action = "hold" }
"""


async def test_recompute_applies_todays_rules_to_seeded_history(make_app, clock, tmp_path):
    app = await make_app(BEFORE)  # no rules yet: nothing flagged
    fast, slow, listed = await click(app), await click(app), await click(app, ip="203.0.113.5")
    told, held = await click(app, "strict"), await click(app, "held")
    clock.now = at(D, second=3)
    ids = {
        name: (await postback(app, cid, payout="2"))["id"]
        for name, cid in (("fast", fast), ("told", told), ("held", held))
    }
    clock.now = at(D, second=60)
    ids |= {name: (await postback(app, cid, payout="2"))["id"] for name, cid in (("slow", slow), ("listed", listed))}
    with closing(sqlite3.connect(app.config.storage.path)) as con, con:  # as if `told` reached its source
        con.execute("UPDATE outbox SET state = 'done', attempts = 1 WHERE conversion_id = ?", (ids["told"],))
    path = str(write_config(tmp_path, extra=AFTER))

    dry = run("flags", "recompute", "--since", D, "--dry-run", "-c", path, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        f"conversion {ids['fast']}: +ctit_fast",
        f"conversion {ids['told']}: +ctit_fast",
        f"conversion {ids['held']}: +ctit_fast",
        f"conversion {ids['listed']}: +listed_ip",
        "4 of 5 conversions would change",
    ]
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        assert con.execute("SELECT count(*) FROM conversions WHERE flags IS NOT NULL").fetchone() == (0,)

    done = run("flags", "recompute", "--since", D, "-c", path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"conversion {ids['fast']}: +ctit_fast; flags stored",
        f"conversion {ids['told']}: +ctit_fast; flags stored; left approved: already forwarded "
        "(--reverse-forwarded to reject it)",
        f"conversion {ids['held']}: +ctit_fast; approved -> held",
        f"conversion {ids['listed']}: +listed_ip; flags stored",
        "4 of 5 conversions changed",
    ]
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        states = dict(con.execute("SELECT id, status || '/' || coalesce(reason, '') FROM conversions"))
        deliveries = con.execute("SELECT conversion_id, status, state FROM outbox ORDER BY id").fetchall()
    assert states == {
        ids["fast"]: "approved/",
        ids["slow"]: "approved/",
        ids["listed"]: "approved/",
        ids["told"]: "approved/",
        ids["held"]: "pending/held",
    }
    assert deliveries == [(ids["told"], "approved", "done"), (ids["held"], "approved", "canceled")]
    (row,) = await stats(app, f"from={D}&to={D}&campaign=spring")
    assert row["flagged_conversions"] == 2  # the totals followed

    again = run("flags", "recompute", "--since", D, "--reverse-forwarded", "-c", path, cwd=tmp_path)
    assert again.stdout.splitlines() == ["0 of 5 conversions changed"]  # flags unchanged: nothing to do
    with closing(sqlite3.connect(app.config.storage.path)) as con, con:  # forget told's flags, as before the rules
        con.execute("UPDATE conversions SET flags = NULL WHERE id = ?", (ids["told"],))
    reversed_ = run("flags", "recompute", "--since", D, "--reverse-forwarded", "-c", path, cwd=tmp_path)
    assert reversed_.stdout.splitlines() == [
        f"conversion {ids['told']}: +ctit_fast; approved -> rejected (fraud); the source is told",
        "1 of 5 conversions changed",
    ]
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        assert con.execute(
            "SELECT status, url FROM outbox WHERE conversion_id = ? ORDER BY id", (ids["told"],)
        ).fetchall() == [
            ("approved", f"https://source.example/pb?c={told}&s=approved"),
            ("rejected", f"https://source.example/pb?c={told}&s=rejected"),
        ]
    bad = run("flags", "recompute", "--since", "yesterday", "-c", path, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("tinytrack: --since: ")


async def test_ip_cluster_counts_up_to_one_past_the_limit_and_recompute_agrees(make_app, clock, tmp_path):
    extra = "[fraud]\nip_conversions_per_hour = 1\n"
    app = await make_app(extra)
    ids = [await click(app, ip="198.51.100.60") for _ in range(4)]
    for minute, cid in enumerate(ids):
        clock.now = at(D, 12, minute)
        await postback(app, cid)
    flags = [flags_of(app, "conversions", "click_id", bytes.fromhex(cid.replace("-", ""))) for cid in ids]
    assert flags == [None] + [{"ip_cluster": "2 conversions in an hour on clicks from this address > 1"}] * 3
    same = run(
        "flags", "recompute", "--since", D, "--dry-run", "-c", str(write_config(tmp_path, extra=extra)), cwd=tmp_path
    )
    assert same.stdout.splitlines() == ["0 of 4 conversions would change"]


def test_listed_ips_nested_adjacent_and_many():
    fraud = FraudConfig(
        listed_ips=tuple(
            ipaddress.ip_network(n)
            for n in ("10.1.2.0/24", "10.0.0.0/8", "10.255.0.0/16", "192.0.2.0/25", "192.0.2.128/25", "2001:db8::/48")
        )
    )
    assert tinytrack.click_flags(fraud, "10.1.2.3", 0) == {"listed_ip": "10.1.2.3 in 10.0.0.0/8"}  # the wider one
    assert tinytrack.click_flags(fraud, "192.0.2.200", 0) == {"listed_ip": "192.0.2.200 in 192.0.2.0/24"}  # merged
    assert tinytrack.click_flags(fraud, "2001:db8:0:ffff::1", 0) == {"listed_ip": "2001:db8:0:ffff::1 in 2001:db8::/48"}
    # A range's first and last addresses are in it, the ones either side are not.
    assert tinytrack.click_flags(fraud, "10.0.0.0", 0) == {"listed_ip": "10.0.0.0 in 10.0.0.0/8"}
    assert tinytrack.click_flags(fraud, "10.255.255.255", 0) == {"listed_ip": "10.255.255.255 in 10.0.0.0/8"}
    last = "2001:db8:0:ffff:ffff:ffff:ffff:ffff"
    assert tinytrack.click_flags(fraud, last, 0) == {"listed_ip": f"{last} in 2001:db8::/48"}
    assert tinytrack.click_flags(fraud, "::ffff:10.0.0.1", 0) == {"listed_ip": "10.0.0.1 in 10.0.0.0/8"}
    for outside in ("9.255.255.255", "11.0.0.0", "192.0.3.0", "2001:db8:1::", "2001:db8:1::1", "", "not an address"):
        assert tinytrack.click_flags(fraud, outside, 0) == {}, outside
    # A data-centre list of 50,000 ranges: looked up by bisection, the same answers.
    many = FraudConfig(listed_ips=tuple(ipaddress.ip_network(f"100.{i >> 8}.{i & 255}.0/25") for i in range(50_000)))
    assert len(many.listed[4][2]) == 50_000  # none adjacent: nothing merged
    assert tinytrack.click_flags(many, "100.195.79.9", 0) == {"listed_ip": "100.195.79.9 in 100.195.79.0/25"}
    assert tinytrack.click_flags(many, "100.195.79.200", 0) == {}
    assert tinytrack.click_flags(many, "100.195.80.1", 0) == {}


@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), max_size=12),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20),
)
def test_listed_ip_finds_what_a_scan_of_the_list_finds(ranges, addresses):
    """Against the obvious answer: any network of the list holding the address."""
    nets = [ipaddress.ip_network((start >> (32 - bits) << (32 - bits), bits)) for start, bits in ranges]
    fraud = FraudConfig(listed_ips=tuple(nets))
    for value in addresses + [int(n.network_address) for n in nets] + [int(n.broadcast_address) for n in nets]:
        address = ipaddress.ip_address(value)
        found = tinytrack.click_flags(fraud, str(address), 0)
        assert bool(found) == any(address in net for net in nets), (address, nets)
        if found:  # named by the merged network that holds it
            assert address in ipaddress.ip_network(found["listed_ip"].split(" in ")[1])


async def test_a_held_conversion_the_network_rejects_is_approved_as_rejected(app, clock):
    """The review releases it with the network's last word: a chargeback while it was held
    is not turned into an approval (nor forwarded: the source never heard of it)."""
    cid = await click(app, "held")
    clock.now = at(D, second=2)
    conversion_id = (await postback(app, cid, payout="7"))["id"]
    await postback(app, cid, expect="updated", payout="7", status="rejected")
    async with client_for(app) as http:
        page = (await http.get("/admin", headers=ADMIN)).text
    held = page.split("<h2>Held for review</h2>")[1].split("</table>")[0]
    assert '<td data-label="network says">rejected</td>' in held  # what the network says, beside the flags
    answer = await review(app, conversion_id, b'{"decision": "approve"}')
    assert answer.json() == {"id": conversion_id, "status": "rejected"}
    assert outbox(app) == []
    (row,) = await stats(app, f"from={D}&to={D}&campaign=held")
    assert (row["approved"], row["pending"], row["rejected"], row["payout"]) == (0, 0, 1, {})


async def test_review_refuses_ids_past_sqlites_integers_without_calling_the_disk_failing(app):
    answer = await review(app, 9223372036854775808, b'{"decision": "approve"}')
    assert answer.status_code == 404
    async with client_for(app) as http:
        health = await http.get("/healthz")
    assert health.status_code == 200 and health.json()["writes"] == "ok"


def test_a_listed_ips_file_with_a_bom_is_read(tmp_path: Path):
    listed = tmp_path / "bom.txt"
    listed.write_bytes("\ufeff192.0.2.0/24\r\n198.51.100.0/24\r\n".encode())
    assert [str(n) for n in build_config(config_with(listed_ips_file=str(listed))).fraud.listed_ips] == [
        "192.0.2.0/24",
        "198.51.100.0/24",
    ]


async def test_recompute_reject_cancels_a_queued_approval(make_app, clock, tmp_path):
    app = await make_app(BEFORE)  # delay_seconds: the forward is queued, not yet tried
    cid = await click(app, "strict")
    clock.now = at(D, second=3)
    conversion_id = (await postback(app, cid, payout="2"))["id"]
    done = run("flags", "recompute", "--since", D, "-c", str(write_config(tmp_path, extra=AFTER)), cwd=tmp_path)
    assert done.stdout.splitlines()[0] == f"conversion {conversion_id}: +ctit_fast; approved -> rejected (fraud)"
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        assert con.execute("SELECT status, state FROM outbox").fetchall() == [("approved", "canceled")]


async def test_recompute_does_not_act_again_on_an_evidence_change(make_app, clock, tmp_path):
    """Held for ctit_fast, approved on review; a stricter min_ctit_seconds changes only the
    evidence: the flags are stored, the operator's approval stands."""
    app = await make_app(AFTER)
    cid = await click(app, "held")
    clock.now = at(D, second=2)
    conversion_id = (await postback(app, cid, payout="2"))["id"]
    assert (await review(app, conversion_id, b'{"decision": "approve"}')).status_code == 200
    stricter = AFTER.replace("min_ctit_seconds = 10", "min_ctit_seconds = 11")
    done = run("flags", "recompute", "--since", D, "-c", str(write_config(tmp_path, extra=stricter)), cwd=tmp_path)
    assert done.stdout.splitlines() == [
        f"conversion {conversion_id}: evidence updated; flags stored",
        "1 of 1 conversions changed",
    ]
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        assert con.execute("SELECT status, reason, flags FROM conversions").fetchall() == [
            ("approved", None, '{"ctit_fast":"2.0 s < 11 s"}')
        ]


async def test_recompute_keeps_address_flags_once_the_address_is_cut(make_app, clock, tmp_path):
    extra = '[fraud]\nlisted_ips = ["203.0.113.77/32"]\n[retention]\npii_days = 30\n'
    app = await make_app(extra)
    listed = await click(app, ip="203.0.113.77")
    await postback(app, listed)
    with closing(sqlite3.connect(app.config.storage.path)) as con, con:  # as the pii purge leaves it
        con.execute("UPDATE clicks SET ip = '203.0.113.0', ua = NULL")
    same = run(
        "flags", "recompute", "--since", D, "--dry-run", "-c", str(write_config(tmp_path, extra=extra)), cwd=tmp_path
    )
    assert same.stdout.splitlines() == ["0 of 1 conversions would change"]


def test_a_version_5_database_counts_its_no_click_id_clicks_as_flagged(tmp_path: Path):
    path = str(tmp_path / "v5.db")
    with closing(sqlite3.connect(path)) as con:
        for number, script in enumerate(tinytrack.SCHEMA[:5], start=1):
            con.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
        con.execute(
            "INSERT INTO clicks (id, ts, campaign, bot, offer, flags) VALUES (?, ?, 'split', 0, 'a', 'no_click_id')",
            (bytes(16), 1_790_000_000_000),
        )
        con.execute(
            "INSERT INTO daily_clicks (day, campaign, sub1, clicks, bot_clicks) VALUES (20717, 'split', '', 1, 0)"
        )
        con.execute(
            """INSERT INTO daily_funnel (day, campaign, lander, offer, clicks, bot_clicks, unique_clicks, lp_clicks)
               VALUES (20717, 'split', '', 'a', 1, 0, 0, 1)"""
        )
        con.commit()
    with closing(tinytrack.open_database(path)) as con:
        assert con.execute("SELECT flags FROM clicks").fetchone() == (
            '{"no_click_id":"cid: missing, not a click id, or of no click of this campaign"}',
        )
        assert con.execute("SELECT flagged_clicks FROM daily_clicks").fetchall() == [(1,)]
        assert con.execute("SELECT flagged_clicks FROM daily_funnel").fetchall() == [(1,)]
