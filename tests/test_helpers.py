"""The pure parts, table-driven: ids, parsing, macros, money, addresses, signatures."""

from __future__ import annotations

import ipaddress
import uuid

import pytest

import tinytrack
from tinytrack import FieldError, PostbackConfig

NOW = 1_790_000_000.0
CLICK = "0190a6b2-7c1d-7abc-8def-0123456789ab"


def test_click_ids_are_uuid7_time_ordered_and_unique():
    clock_values = iter([NOW] * 500 + [NOW + 0.001] * 500)
    ids = tinytrack.ClickIds(lambda: next(clock_values))
    made = [ids.new()[0] for _ in range(1000)]
    assert made == sorted(made)
    assert len(set(made)) == 1000
    for raw in made:
        parsed = uuid.UUID(bytes=raw)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == tinytrack.format_uuid(raw)
    assert int.from_bytes(made[0][:6]) == NOW * 1000  # the first 48 bits: unix milliseconds
    assert int.from_bytes(made[-1][:6]) == NOW * 1000 + 1


def test_click_ids_stay_ordered_when_the_clock_steps_back():
    times = iter([NOW, NOW - 5, NOW - 5])
    ids = tinytrack.ClickIds(lambda: next(times))
    a, b, c = ids.new()[0], ids.new()[0], ids.new()[0]
    assert a < b < c


@pytest.mark.parametrize(
    "query, values, rest",
    [
        (b"", {}, []),
        (b"sub1=a&sub2=b&sub5=e", {"sub1": "a", "sub2": "b", "sub5": "e"}, []),
        (b"externalid=X1", {"ext_id": "X1"}, []),
        (b"external_id=X2&ext_id=X3", {"ext_id": "X2"}, []),
        (b"sub1=first&sub1=second", {"sub1": "first"}, []),
        (b"sub1=a%20b+c", {"sub1": "a b c"}, []),
        (b"sub1=%0d%0aSet-Cookie:%00x", {"sub1": "Set-Cookie:x"}, []),
        (b"sub1=%ff%fe", {"sub1": "\ufffd\ufffd"}, []),
        (b"utm_source=fb&sub1=z", {"sub1": "z"}, [("utm_source", "fb")]),
        (b"sub1=" + b"x" * 300, {"sub1": "x" * 256}, []),
    ],
)
def test_parse_click_query(query: bytes, values: dict, rest: list):
    assert tinytrack.parse_click_query(query) == (values, rest)


@pytest.mark.parametrize(
    "source, values, extra, expected",
    [
        (
            "https://o.com/lp?cid={click_id}&s={sub1}",
            {"click_id": "abc", "sub1": "a b&c=d"},
            [],
            "https://o.com/lp?cid=abc&s=a%20b%26c%3Dd",
        ),
        ("https://o.com/lp?s={sub1}", {}, [], "https://o.com/lp?s="),
        ("https://o.com/{sub1}/x", {"sub1": "../../evil.com/\r\n"}, [], "https://o.com/..%2F..%2Fevil.com%2F%0D%0A/x"),
        ("https://o.com/lp?a=1#frag", {}, [("u", "v w")], "https://o.com/lp?a=1&u=v%20w#frag"),
        ("https://o.com/lp#frag", {}, [("u", "1")], "https://o.com/lp?u=1#frag"),
        ("https://o.com", {}, [], "https://o.com"),
    ],
)
def test_template_fill(source: str, values: dict, extra: list, expected: str):
    template = tinytrack.compile_template(source, "k", tinytrack.MACROS_CLICK)
    assert template.fill(values, extra) == expected


@pytest.mark.parametrize(
    "text, units, shown",
    [
        ("0", 0, "0.00"),
        ("12.5", 12_500_000, "12.50"),
        ("0.000001", 1, "0.000001"),
        ("1000000000", 1_000_000_000_000_000, "1000000000.00"),  # the cap: tinytrack.MAX_PAYOUT
        ("999999999.999999", 999_999_999_999_999, "999999999.999999"),
        ("007.10", 7_100_000, "7.10"),
    ],
)
def test_payout_is_exact(text: str, units: int, shown: str):
    assert tinytrack.parse_payout(text) == units
    assert tinytrack.format_money(units) == shown


@pytest.mark.parametrize(
    "text", ["-1", "1e3", "1.2345678", ".5", "5.", "1,50", "abc", "{payout}", "1000000000000", "NaN"]
)
def test_bad_payout(text: str):
    with pytest.raises(FieldError) as caught:
        tinytrack.parse_payout(text)
    assert caught.value.message == f"payout: must be a decimal >= 0 with at most 6 decimals, got {text!r}"


def test_money_sums_do_not_drift():
    total = sum(tinytrack.parse_payout(t) for t in ["0.1", "0.1", "0.1", "0.2"])
    assert tinytrack.format_money(total) == "0.50"


@pytest.mark.parametrize(
    "raw, text",
    [(None, None), ("", None), ("  ", None), (" a ", "a"), (5, "5"), (0.1, "0.1"), (49.0, "49"), (1.25, "1.25")],
)
def test_field_text(raw, text):
    assert tinytrack.field_text("payout", raw) == text


@pytest.mark.parametrize(
    "raw, message",
    [
        (True, "payout: must be a string or a number, got a boolean"),
        ([1], "payout: must be a string or a number, got an array"),
        ({"a": 1}, "payout: must be a string or a number, got an object"),
        (float("nan"), "payout: must be a finite number"),
    ],
)
def test_field_text_refuses(raw, message):
    with pytest.raises(FieldError) as caught:
        tinytrack.field_text("payout", raw)
    assert caught.value.message == message


@pytest.mark.parametrize(
    "text, expected_ms",
    [
        ("1789999000", 1_789_999_000_000),
        ("1789999000.5", 1_789_999_000_500),
        ("2026-09-21T14:13:20Z", 1_790_000_000_000),
        ("2026-09-21T16:13:20+02:00", 1_790_000_000_000),
    ],
)
def test_parse_ts(text: str, expected_ms: int):
    assert tinytrack.parse_ts(text, NOW) == expected_ms


@pytest.mark.parametrize(
    "text, problem",
    [
        ("2026-09-21T14:13:20", "needs a UTC offset (like 2026-01-06T14:03:22Z), got '2026-09-21T14:13:20'"),
        ("yesterday", "must be ISO 8601 with an offset or unix seconds, got 'yesterday'"),
        ("1790000000000", "is more than a day in the future, got '1790000000000'"),
        ("12", "is before the year 2000, got '12'"),
    ],
)
def test_bad_ts(text: str, problem: str):
    with pytest.raises(FieldError) as caught:
        tinytrack.parse_ts(text, NOW)
    assert caught.value.message == f"ts: {problem}"


CONF = PostbackConfig(tokens=("t" * 10,), status_map={"sale": "approved", "declined": "rejected"})


@pytest.mark.parametrize(
    "pairs, expected",
    [
        (
            [("click_id", CLICK)],
            {"event": "conversion", "payout": 0, "currency": "USD", "txid": None, "status": "approved"},
        ),
        ([("cid", CLICK.upper()), ("et", "Purchase"), ("amount", "9.99")], {"event": "purchase", "payout": 9_990_000}),
        (
            [("subid", CLICK), ("type", "ftd"), ("revenue", 12.5), ("currency", "eur")],
            {"event": "ftd", "payout": 12_500_000, "currency": "EUR"},
        ),
        ([("sub_id", CLICK), ("sum", "1"), ("tid", "ord-1:2.3_4")], {"payout": 1_000_000, "txid": "ord-1:2.3_4"}),
        ([("cnv_id", CLICK), ("transaction_id", "T1")], {"txid": "T1"}),
        ([("clickid", CLICK), ("order_id", "O1"), ("status", "SALE")], {"txid": "O1", "status": "approved"}),
        ([("click_id", CLICK), ("status", "declined")], {"status": "rejected"}),
        ([("click_id", CLICK), ("status", "pending")], {"status": "pending"}),
        ([("click_id", CLICK), ("timestamp", "1789999000")], {"ts_ms": 1_789_999_000_000}),
        ([("click_id", CLICK), ("ts", "2026-09-21T14:13:20Z")], {"ts_ms": 1_790_000_000_000}),
        ([("click_id", CLICK), ("cid", CLICK)], {"click_id": bytes.fromhex(CLICK.replace("-", ""))}),
        ([("click_id", CLICK), ("txid", ""), ("payout", "")], {"txid": None, "payout": 0, "payout_given": False}),
        ([("click_id", CLICK), ("unknown", "whatever")], {"event": "conversion"}),
    ],
)
def test_postback_fields_and_aliases(pairs: list, expected: dict):
    postback = tinytrack.build_postback(tinytrack.collect_fields(pairs), CONF, NOW)
    for name, value in expected.items():
        assert getattr(postback, name) == value, name
    if "ts_ms" not in expected:
        assert postback.ts_ms == int(NOW * 1000)


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([], "click_id: is required"),
        ([("click_id", "")], "click_id: is required"),
        ([("click_id", "{clickid}")], "click_id: must be a click id issued by this server (a UUID), got '{clickid}'"),
        (
            [("click_id", CLICK), ("cid", "0190a6b2-7c1d-7abc-8def-0123456789ac")],
            "click_id: given twice (click_id and cid) with different values",
        ),
        ([("click_id", CLICK), ("event", "sign up")], "event: must match [a-z0-9_]{1,32}, got 'sign up'"),
        (
            [("click_id", CLICK), ("event", "x" * 33)],
            "event: must match [a-z0-9_]{1,32}, got 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'",
        ),
        ([("click_id", CLICK), ("payout", "-5")], "payout: must be a decimal >= 0 with at most 6 decimals, got '-5'"),
        ([("click_id", CLICK), ("currency", "US")], "currency: must be a three-letter ISO 4217 code, got 'US'"),
        ([("click_id", CLICK), ("txid", "a b")], "txid: must be 1-64 characters of A-Z a-z 0-9 . _ : -, got 'a b'"),
        (
            [("click_id", CLICK), ("txid", "x\r\ny")],
            "txid: must be 1-64 characters of A-Z a-z 0-9 . _ : -, got 'x\\r\\ny'",
        ),
        (
            [("click_id", CLICK), ("status", "paid")],
            "status: must be one of approved, pending, rejected or a postback.status_map word, got 'paid'",
        ),
        ([("click_id", CLICK), ("ts", "soon")], "ts: must be ISO 8601 with an offset or unix seconds, got 'soon'"),
    ],
)
def test_postback_field_errors(pairs: list, message: str):
    with pytest.raises(FieldError) as caught:
        tinytrack.build_postback(tinytrack.collect_fields(pairs), CONF, NOW)
    assert caught.value.message == message
    assert caught.value.status == 400


def test_events_allowlist():
    conf = PostbackConfig(tokens=("t" * 10,), events=("signup", "ftd"))
    assert tinytrack.build_postback({"click_id": CLICK, "event": "ftd"}, conf, NOW).event == "ftd"
    with pytest.raises(FieldError) as caught:
        tinytrack.build_postback({"click_id": CLICK}, conf, NOW)
    assert caught.value.message == "event: must be one of signup, ftd, got 'conversion'"


@pytest.mark.parametrize(
    "txid, event, key",
    [("T1", "purchase", "t:T1"), (None, "purchase", "e:purchase"), (None, "conversion", "e:conversion")],
)
def test_dedupe_key(txid, event, key):
    assert tinytrack.Postback(click_id=b"x" * 16, txid=txid, event=event).dedupe_key == key


@pytest.mark.parametrize(
    "raw, where, pairs",
    [
        (b"a=1&b=2", "query", [("a", "1"), ("b", "2")]),
        (b"a=x+y&b=%C3%A9", "query", [("a", "x y"), ("b", "é")]),
        (b"a&&b=", "query", [("a", ""), ("b", "")]),
    ],
)
def test_parse_pairs(raw, where, pairs):
    assert tinytrack.parse_pairs(raw, where) == pairs


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"payout=%ff", "payout: not valid UTF-8"),
        (b"%ff=1", "query: a field name is not valid UTF-8"),
        (b"&".join([b"a=1"] * 65), "query: more than 64 fields"),
    ],
)
def test_parse_pairs_refuses(raw, message):
    with pytest.raises(FieldError) as caught:
        tinytrack.parse_pairs(raw, "query")
    assert caught.value.message == message


@pytest.mark.parametrize(
    "candidate, ok",
    [
        ("alpha-token-1", True),
        ("beta-token-22", True),
        ("alpha-token-", False),
        ("", False),
        (None, False),
        ("ALPHA-TOKEN-1", False),
    ],
)
def test_token_matches_any_of_several(candidate, ok):
    assert tinytrack.token_matches(candidate, ("alpha-token-1", "beta-token-22")) is ok


SECRET_OLD, SECRET_NEW = "old-secret-0123456789", "new-secret-0123456789"


@pytest.mark.parametrize(
    "header, ok",
    [
        (f"t={int(NOW)},v1={tinytrack.sign(SECRET_NEW, int(NOW), b'body')}", True),
        (f"t={int(NOW)},v1={tinytrack.sign(SECRET_OLD, int(NOW), b'body')}", True),
        (f"t={int(NOW)},v1=deadbeef,v1={tinytrack.sign(SECRET_NEW, int(NOW), b'body')}", True),
        (f"t={int(NOW) - 300},v1={tinytrack.sign(SECRET_NEW, int(NOW) - 300, b'body')}", True),
        (f"t={int(NOW) + 300},v1={tinytrack.sign(SECRET_NEW, int(NOW) + 300, b'body')}", True),
        (f"t={int(NOW) - 301},v1={tinytrack.sign(SECRET_NEW, int(NOW) - 301, b'body')}", False),
        (f"t={int(NOW) + 301},v1={tinytrack.sign(SECRET_NEW, int(NOW) + 301, b'body')}", False),
        (f"t={int(NOW)},v1={tinytrack.sign('other-secret-0123456', int(NOW), b'body')}", False),
        (f"t={int(NOW)},v1={tinytrack.sign(SECRET_NEW, int(NOW), b'bodx')}", False),
        (f"v1={tinytrack.sign(SECRET_NEW, int(NOW), b'body')}", False),
        (f"t={int(NOW)}", False),
        ("", False),
        (None, False),
        ("garbage", False),
    ],
)
def test_verify_signature(header, ok):
    assert tinytrack.verify_signature(header, b"body", (SECRET_OLD, SECRET_NEW), NOW) is ok


TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    "peer, xff, client",
    [
        ("203.0.113.9", None, "203.0.113.9"),
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # untrusted peer: its header means nothing
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),
        ("127.0.0.1", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # the client wrote 6.6.6.6
        ("127.0.0.1", "198.51.100.1, 10.1.2.3", "198.51.100.1"),  # skip trusted hops
        ("127.0.0.1", "10.1.2.3, 10.9.9.9", "10.1.2.3"),
        ("127.0.0.1", None, "127.0.0.1"),
        (None, "198.51.100.1", "198.51.100.1"),  # unix socket: the peer is the proxy
        (None, None, ""),
    ],
)
def test_client_address(peer, xff, client):
    assert tinytrack.client_address(peer, xff, TRUSTED) == client


@pytest.mark.parametrize(
    "text, masked",
    [
        ("203.0.113.77", "203.0.113.0"),
        ("2001:db8:1:2::5", "2001:db8:1::"),
        ("::ffff:198.51.100.9", "198.51.100.0"),
        ("", "-"),
        ("x", "invalid"),
    ],
)
def test_mask_ip(text, masked):
    assert tinytrack.mask_ip(text) == masked


@pytest.mark.parametrize(
    "user_agent, bot",
    [
        ("", True),
        ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148", False),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36", False),
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", True),
        ("facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)", True),
        ("Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", True),
        ("TelegramBot (like TwitterBot)", True),
        ("WhatsApp/2.23.20.0", True),
        ("curl/8.5.0", True),
        ("python-requests/2.31", True),
        # Caught since the comparison with crawlerdetect (bench/bots.py): real bots it missed.
        ("Mediapartners-Google", True),
        ("APIs-Google (+https://developers.google.com/webmasters/APIs-Google.html)", True),
        ("FeedFetcher-Google; (+http://www.google.com/feedfetcher.html)", True),
        ("Mozilla/5.0 (compatible; Google-InspectionTool/1.0)", True),
        ("GoogleOther", True),
        ("Python/3.9 aiohttp/3.7.3", True),
        ("Mozilla/5.0 (compatible; heritrix/3.4.0 +https://example.org)", True),
        ("Pingdom.com_bot_version_1.4_(http://www.pingdom.com/)", True),
        ("Mozilla/5.0 (compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)", True),
        ("Scrapy/2.11.0 (+https://scrapy.org)", True),
        ("axios/1.6.2", True),
        ("W3C_Validator/1.3 http://validator.w3.org/services", True),
        # and browsers it must not flag
        ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_2) AppleWebKit/605.1.15 Version/17.2 Safari/605.1.15", False),
        ("Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 Chrome/120.0 Mobile Safari/537.36", False),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0", False),
    ],
)
def test_is_bot(user_agent, bot):
    assert tinytrack.is_bot(user_agent) is bot


@pytest.mark.parametrize(
    "raw, logged",
    [
        (b"click_id=abc&token=s3cret-value&payout=1", "click_id=abc&token=***&payout=1"),
        (b"KEY=s3cret&Token=x&%74oken=y", "KEY=***&Token=***&%74oken=***"),
        (b"a=%0d%0a", "a=%0d%0a"),
        (b"a=\xff\x00", "a=\\\\xff\\x00"),
    ],
)
def test_redact_query(raw, logged):
    assert tinytrack.redact_query(raw) == logged
