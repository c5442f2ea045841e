"""Security (issue 4): who may post back, and what hostile input gets.

- property tests (hypothesis) over the pure parts: postback field parsing, query
  decoding, macro expansion, IP/CIDR matching, client address, signatures;
- a table of hostile requests against the app in-process (exact status, JSON
  error, nothing written), plus a hypothesis fuzz of whole requests;
- the allowlist behind a trusted proxy / unix socket, token rotation, signatures;
- the real server's output grepped for every secret sent to it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ipaddress
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode, urlsplit

import httpx
import orjson
import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, Server, free_port, new_click, write_config
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import tinytrack
from tinytrack import FieldError, PostbackConfig

pytestmark = pytest.mark.anyio

NOW = 1_790_000_000.0
CLICK = "0190a6b2-7c1d-7abc-8def-0123456789ab"
PEER = ("198.51.100.7", 40000)
SETTINGS = settings(max_examples=200, deadline=None)

FIELDS = ("click_id", "event", "payout", "currency", "txid", "status", "ts", "token")
KNOWN_NAMES = frozenset(FIELDS) | frozenset(tinytrack.POSTBACK_ALIASES)
C0_AND_DEL = re.compile(r"[\x00-\x1f\x7f]")


def is_clean(text: str) -> bool:
    return C0_AND_DEL.search(text) is None


# --- Helpers: the database and a raw ASGI client ---------------------------------

TABLES = ("clicks", "conversions", "conversion_history", "orphans")


def counts(app: tinytrack.TinyTrack) -> dict[str, int]:
    with sqlite3.connect(app.config.storage.path) as con:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def rows(app: tinytrack.TinyTrack, sql: str) -> list[tuple]:
    with sqlite3.connect(app.config.storage.path) as con:
        return con.execute(sql).fetchall()


@dataclasses.dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    messages_read: int  # how many request messages the app pulled from receive()

    def header(self, name: bytes) -> bytes | None:
        found = [v for k, v in self.headers if k.lower() == name]
        assert len(found) <= 1, f"header {name!r} sent {len(found)} times"
        return found[0] if found else None

    def json(self) -> Any:
        assert self.header(b"content-type") == b"application/json", self.headers
        return orjson.loads(self.body)


async def asgi(
    app,
    method: str,
    target: bytes | str,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    chunks: Iterable[bytes] | None = None,
    client: tuple[str, int] | None = PEER,
) -> Answer:
    """One request, byte for byte as given: no client library normalising it.
    `body` goes in one message with a Content-Length (unless headers give one);
    `chunks` is streamed without Content-Length, as a chunked upload would be."""
    if isinstance(target, str):
        target = target.encode()
    raw_path, _, query = target.partition(b"?")
    headers = [(k.lower(), v) for k, v in headers]
    if chunks is None and body and not any(k == b"content-length" for k, _ in headers):
        headers.append((b"content-length", b"%d" % len(body)))
    if chunks is not None:
        headers.append((b"transfer-encoding", b"chunked"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1"), errors="replace"),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "server": ("tracker.test", 80),
        "client": client,
    }
    stream = iter(chunks) if chunks is not None else iter([body])
    finished = False
    read = 0

    async def receive() -> dict:
        nonlocal finished, read
        read += 1
        if finished:
            return {"type": "http.disconnect"}
        try:
            chunk = next(stream)
        except StopIteration:
            finished = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if chunks is None:
            finished = True
            return {"type": "http.request", "body": chunk, "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    status, answer_headers, parts = None, [], []

    async def send(message: dict) -> None:
        nonlocal status, answer_headers
        if message["type"] == "http.response.start":
            assert status is None, "response started twice"
            status, answer_headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    await app(scope, receive, send)
    assert status is not None, "no answer"
    assert status != 500
    return Answer(status, answer_headers, b"".join(parts), read)


def http(app, client: tuple[str, int] | None = PEER) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client), base_url="http://tracker.test")


OFFER = "https://offer.example.com/lp?cid={click_id}&s1={sub1}&x={ext_id}"


def config_data(tmp_path: Path, **tables: dict) -> dict:
    data: dict[str, Any] = {
        "server": {"trusted_proxies": ["127.0.0.1", "::1"]},
        "storage": {"path": str(tmp_path / "security.db")},
        "postback": {"tokens": [POSTBACK_TOKEN]},
        "admin": {"token": ADMIN_TOKEN},
        "campaigns": {"spring": {"url": OFFER}},
    }
    for name, table in tables.items():
        data[name] = {**data.get(name, {}), **table}
    return data


@asynccontextmanager
async def running(tmp_path: Path, clock, **tables: dict) -> AsyncIterator[tinytrack.TinyTrack]:
    app = tinytrack.create_app(tinytrack.build_config(config_data(tmp_path, **tables)), clock=clock)
    await app.startup()
    try:
        yield app
    finally:
        await app.shutdown()


async def click_id_for(app) -> str:
    async with http(app) as client:
        return await new_click(client)


# === 1. Property tests over the pure parts =======================================

CONF = PostbackConfig(
    tokens=("t" * 10,), status_map={"sale": "approved", "declined": "rejected", "reversed": "rejected"}
)

# Strings a network (or an attacker) would plausibly put in a field, and then anything.
INTERESTING = [
    CLICK,
    CLICK.upper(),
    CLICK + "\x00",
    CLICK[:-1],
    "{clickid}",
    "",
    " ",
    "0",
    "12.5",
    "0.000001",
    "1.2345678",
    "-1",
    "1e3",
    "999999999999.999999",
    "1000000000000",
    "NaN",
    "inf",
    "\u0661\u0662",
    "\uff11",
    "purchase",
    "Sign Up",
    "x" * 33,
    "usd",
    "EUR",
    "\u00e9ur",
    "approved",
    "SALE",
    "declined",
    "paid",
    "pending",
    "1789999000",
    "1790000000000",
    "2026-09-21T14:13:20Z",
    "2026-09-21T14:13:20",
    "12",
    "ord-1:2.3_4",
    "a b",
    "x\r\ny",
    "\x00",
    "t" * 10,
    "\u2028",
    "\ud800",
    "\udfff",
    "t" * 9 + "\udc80",  # lone surrogates: JSON's "\ud800" decodes to these, no UTF-8 holds them
]
any_characters = st.characters(exclude_categories=())  # surrogates (Cs) too, which st.text leaves out by default
texts = (
    st.sampled_from(INTERESTING)
    | st.text(max_size=12)
    | st.text(any_characters, max_size=6)
    | st.text(alphabet="0123456789.-:TZ+e", max_size=24)
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5,
)
names = st.sampled_from(sorted(tinytrack.POSTBACK_ALIASES)) | st.text(max_size=8)


# Per field: values that are right, the same with something wrong around them, or anything.
GOOD = {
    "click_id": [CLICK, CLICK.upper()],
    "event": ["purchase", "ftd", "Sign_Up", "e" * 32, 7],
    "payout": ["0", "12.5", "0.000001", "1000000000.000000", 7, 1.25],
    "currency": ["usd", "EUR"],
    "txid": ["ord-1:2.3_4", "T1", "x" * 64, 42],
    "status": ["approved", "pending", "rejected", "sale", "SALE", "declined"],
    "ts": ["1789999000", "1789999000.5", "2026-09-21T14:13:20Z", "2026-09-21T16:13:20+02:00", 1789999000],
    "token": ["t" * 10],
}
ALIASES_OF = {f: sorted(a for a, g in tinytrack.POSTBACK_ALIASES.items() if g == f) for f in GOOD}
around = st.sampled_from(["", "", "", " ", "x", "!", "\x00", "\n1", "-", ".", "\u00e9", "0", "\u0661", "Z", "\ud800"])


@st.composite
def postback_pairs(draw) -> list[tuple[str, Any]]:
    """Right fields but for one spoiled or arbitrary "victim", so that a validator
    letting something through is reached (build_postback stops at the first error)."""
    victim = draw(st.sampled_from([None, *GOOD]))
    pairs = []
    for field, choices in GOOD.items():
        if field == victim or (field == "click_id" and draw(st.integers(0, 9))) or draw(st.booleans()):
            value = draw(st.sampled_from(choices))
            if field == victim:
                spoiled = st.tuples(around, st.just(str(value)), around).map("".join)
                value = draw(st.one_of(spoiled, spoiled, spoiled, json_values))
            pairs.append((draw(st.sampled_from(ALIASES_OF[field])), value))
    pairs += draw(st.lists(st.tuples(names, json_values), max_size=1))
    pairs += draw(st.lists(st.tuples(st.text(max_size=8), json_values), max_size=2))
    return draw(st.permutations(pairs))


@settings(max_examples=800, deadline=None)  # a pure function; a bypass needs every other field right
@given(pairs=postback_pairs() | st.lists(st.tuples(names, json_values), max_size=8))
@example(pairs=[("click_id", CLICK), ("txid", "a b")])
@example(pairs=[("click_id", CLICK), ("payout", 1e400)])
@example(pairs=[("click_id", CLICK), ("payout", 10**30)])
@example(pairs=[("cid", CLICK), ("payout", {"$gt": 0}), ("txid", ["a"])])
@example(pairs=[("click_id", CLICK), ("amount", True)])
@example(pairs=[("click_id", CLICK), ("sum", "1"), ("revenue", "2")])
def test_postback_fields_give_a_postback_or_a_named_400(pairs):
    try:
        fields = tinytrack.collect_fields(pairs)
        assert tinytrack.token_matches(fields.get("token"), CONF.tokens) in (True, False)  # never raises
        postback = tinytrack.build_postback(fields, CONF, NOW)
    except FieldError as exc:
        assert exc.status == 400
        field, sep, problem = exc.message.partition(": ")
        assert sep and problem, exc.message
        assert field == exc.field
        assert field in KNOWN_NAMES, exc.message
        return
    assert isinstance(postback, tinytrack.Postback)
    if "click_id" in fields:
        assert isinstance(postback.click_id, bytes) and len(postback.click_id) == 16
        assert tinytrack.format_uuid(postback.click_id) == fields["click_id"].lower()
    else:  # a user id alone: credited by the user's touches (see test_attribution.py)
        assert postback.click_id is None
    assert postback.user_id == fields.get("user_id")
    assert postback.user_id is None or re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", postback.user_id, re.ASCII)
    assert re.fullmatch(r"[a-z0-9_]{1,32}", postback.event, re.ASCII)
    assert postback.event == fields.get("event", "conversion").lower()
    assert re.fullmatch(r"[A-Z]{3}", postback.currency, re.ASCII)
    assert postback.txid is None or re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", postback.txid, re.ASCII)
    assert postback.txid == fields.get("txid")
    assert postback.status in tinytrack.STATUSES
    assert isinstance(postback.payout, int) and postback.payout >= 0
    if "payout" in fields:
        assert Decimal(fields["payout"]) * 1_000_000 == postback.payout
    if "currency" in fields:
        assert postback.currency == fields["currency"].upper()
    if "status" in fields:
        word = fields["status"].lower()
        assert postback.status == CONF.status_map.get(word, word)
    assert postback.payout_given == ("payout" in fields)
    assert 946_684_800_000 <= postback.ts_ms <= (NOW + 86400) * 1000


raw_query_pieces = st.sampled_from(
    [
        b"&",
        b"=",
        b"+",
        b"%",
        b"%ff",
        b"%c3%a9",
        b"%C3",
        b"%00",
        b"%0d%0a",
        b"%zz",
        b"%2",
        b"click_id",
        b"token",
        b"\xff",
        b"\x00",
        b"\xc3\xa9",
    ]
) | st.binary(max_size=6)


@SETTINGS
@given(raw=st.binary(max_size=80) | st.lists(raw_query_pieces, max_size=20).map(b"".join))
@example(raw=b"&".join([b"a=1"] * 65))
@example(raw=b"a%0d%0ab=%ff")
def test_parse_pairs_returns_pairs_or_a_named_400(raw: bytes):
    try:
        pairs = tinytrack.parse_pairs(raw, "query")
    except FieldError as exc:
        assert exc.status == 400
        field, sep, problem = exc.message.partition(": ")
        assert sep and field and is_clean(field), exc.message
        assert problem in ("not valid UTF-8", "a field name is not valid UTF-8", "more than 64 fields")
        if problem != "not valid UTF-8":
            assert field == "query"
        return
    assert len(pairs) <= tinytrack.MAX_FIELDS
    assert all(isinstance(name, str) and isinstance(value, str) for name, value in pairs)


@SETTINGS
@given(pairs=st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=10))
def test_parse_pairs_round_trips_what_a_client_encodes(pairs):
    raw = urlencode(pairs, quote_via=quote).encode()
    assert tinytrack.parse_pairs(raw, "body") == pairs
    plus = urlencode(pairs).encode()  # spaces as '+', as HTML forms send them
    assert tinytrack.parse_pairs(plus, "body") == pairs


hostile_text = st.text(max_size=30) | st.lists(
    st.sampled_from(
        [
            "\r",
            "\n",
            "\r\n",
            "\x00",
            "/",
            "@",
            "#",
            "?",
            "&",
            "=",
            "+",
            "%",
            "%0d%0a",
            "..",
            "../",
            "//evil.com",
            "https://evil.com",
            " ",
            "\u00e9",
            "\u2028",
            "\U0001f600",
            "\\",
            ":",
            ";",
            "{sub1}",
            "a",
        ]
    ),
    max_size=8,
).map("".join)


def assert_safe_url(url: str, path: str = "/lp") -> Any:
    assert all(0x21 <= ord(c) < 0x7F for c in url), url  # no CR, LF, NUL, space, nothing outside ASCII
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "offer.example.com", path)
    return parts


@SETTINGS
@given(click_id=hostile_text, sub1=hostile_text, extra=st.lists(st.tuples(hostile_text, hostile_text), max_size=4))
def test_macro_expansion_never_changes_scheme_host_or_path(click_id, sub1, extra):
    template = tinytrack.compile_template(
        "https://offer.example.com/lp?cid={click_id}&s={sub1}", "k", tinytrack.MACROS_CLICK
    )
    url = template.fill({"click_id": click_id, "sub1": sub1})
    parts = assert_safe_url(url)
    assert parts.fragment == ""
    assert parse_qs(parts.query, keep_blank_values=True) == {"cid": [click_id], "s": [sub1]}

    with_extra = template.fill({"click_id": click_id, "sub1": sub1}, extra)
    parts = assert_safe_url(with_extra)
    assert parts.fragment == ""
    assert parse_qsl(parts.query, keep_blank_values=True) == [("cid", click_id), ("s", sub1), *extra]

    # a macro in the path stays one path segment: no '/', '..' or '?' of the value acts as syntax
    in_path = tinytrack.compile_template(
        "https://offer.example.com/p/{sub1}/x?c={click_id}", "k", tinytrack.MACROS_CLICK
    )
    filled = in_path.fill({"click_id": click_id, "sub1": sub1})
    assert all(0x21 <= ord(c) < 0x7F for c in filled), filled
    parts = urlsplit(filled)
    assert (parts.scheme, parts.netloc, parts.fragment) == ("https", "offer.example.com", "")
    assert parts.path.count("/") == 3, parts.path
    _, head, segment, tail = parts.path.split("/")
    assert (head, tail) == ("p", "x") and unquote(segment) == sub1
    assert parse_qs(parts.query, keep_blank_values=True) == {"c": [click_id]}

    passing = tinytrack.compile_template("https://offer.example.com/go#top", "k", tinytrack.MACROS_CLICK)
    parts = assert_safe_url(passing.fill({}, extra), "/go")
    assert parts.fragment == "top"
    assert parse_qsl(parts.query, keep_blank_values=True) == list(extra)


@SETTINGS
@given(
    raw=st.binary(max_size=600)
    | st.lists(raw_query_pieces | st.sampled_from([b"sub1=", b"ext_id=", b"externalid=", b"x" * 300]), max_size=20).map(
        b"".join
    )
)
@example(raw=b"sub1=%0d%0aSet-Cookie:%00x&ext_id=" + b"%e2%80%a8" * 300)
@example(raw=b"&".join([b"u%0a=%0d"] * 100))
def test_parse_click_query_never_raises_and_cleans(raw: bytes):
    values, rest = tinytrack.parse_click_query(raw)
    assert set(values) <= {"sub1", "sub2", "sub3", "sub4", "sub5", "ext_id"}
    assert len(rest) <= tinytrack.MAX_FIELDS
    for text in [*values.values(), *(n for n, _ in rest), *(v for _, v in rest)]:
        assert isinstance(text, str)
        assert len(text) <= 256
        assert is_clean(text), text


@st.composite
def network_and_address(draw, version: int):
    base = draw(st.ip_addresses(v=version))
    prefix = draw(st.integers(0, 32 if version == 4 else 128))
    net = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    addr = draw(st.ip_addresses(network=net) | st.ip_addresses(v=version))
    return net, addr


def oracle_in(addr: tinytrack.Address, net: tinytrack.Network) -> bool:
    """`addr in net` with ::ffff:a.b.c.d (address or network) taken as IPv4."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped and net.prefixlen >= 96:
        net = ipaddress.IPv4Network((net.network_address.ipv4_mapped, net.prefixlen - 96))
    return addr.version == net.version and addr in net


@SETTINGS
@given(case=network_and_address(4) | network_and_address(6), other=st.ip_addresses())
def test_match_networks_agrees_with_ipaddress(case, other):
    net, addr = case
    configured = tinytrack.parse_network(str(net), "postback.allow_ips[0]")
    for candidate in (addr, other):
        expected = oracle_in(candidate, net)
        assert tinytrack.match_networks(tinytrack.parse_address(str(candidate)), [configured]) is expected
        if candidate.version == 6 and not candidate.ipv4_mapped:
            assert expected is (candidate in net)


@SETTINGS
@given(case=network_and_address(4))
def test_ipv4_mapped_addresses_and_networks_match_as_ipv4(case):
    net, addr = case
    mapped_addr = f"::ffff:{addr}"
    assert tinytrack.parse_address(mapped_addr) == addr
    assert tinytrack.match_networks(tinytrack.parse_address(mapped_addr), [net]) is (addr in net)
    mapped_net = tinytrack.parse_network(f"::ffff:{net.network_address}/{net.prefixlen + 96}", "k")
    assert mapped_net == net
    for text in (str(addr), mapped_addr, mapped_addr.upper(), f" {addr} "):
        assert tinytrack.match_networks(tinytrack.parse_address(text), [mapped_net]) is (addr in net)


TRUSTED = tuple(ipaddress.ip_network(n) for n in ("127.0.0.1/32", "::1/128", "10.0.0.0/8"))
HOP_POOL = [
    "127.0.0.1",
    "10.1.2.3",
    "::1",
    "::ffff:10.0.0.5",
    "::ffff:127.0.0.1",
    "203.0.113.9",
    "198.51.100.7",
    "2001:db8::1",
    "::ffff:203.0.113.9",
    "garbage",
    "",
    "203.0.113.9:443",
    "[::1]",
]
hops = st.sampled_from(HOP_POOL) | st.ip_addresses().map(str)


def oracle_trusted(text: str) -> bool:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return False
    return any(oracle_in(addr, net) for net in TRUSTED)


@SETTINGS
@given(peer=st.none() | hops, chain=st.lists(hops, max_size=6), spaces=st.booleans())
@example(peer="127.0.0.1", chain=["203.0.113.9", "198.51.100.7"], spaces=True)
@example(peer=None, chain=["203.0.113.9", "10.0.0.1"], spaces=False)
def test_client_address_is_never_left_of_the_rightmost_untrusted_hop(peer, chain, spaces):
    header = (", " if spaces else ",").join(chain) if chain else None
    result = tinytrack.client_address(peer, header, TRUSTED)
    if peer is not None and not oracle_trusted(peer):
        assert result == peer  # an untrusted peer's header means nothing
        return
    entries = [h.strip() for h in header.split(",")] if header else []
    untrusted = [i for i, h in enumerate(entries) if not oracle_trusted(h)]
    if untrusted:
        assert result == entries[untrusted[-1]]
    elif entries:
        assert result == entries[0] and oracle_trusted(result)  # all proxies: the farthest one
    else:
        assert result == (peer or "")


secrets_st = st.text(min_size=16, max_size=40)


@SETTINGS
@given(
    secrets=st.lists(secrets_st, min_size=1, max_size=3, unique=True),
    which=st.integers(0, 2),
    payload=st.binary(max_size=200),
    skew=st.integers(-300, 300),
    junk=st.lists(st.text(alphabet="0123456789abcdef", min_size=1, max_size=64), max_size=3),
    position=st.integers(0, 3),
)
def test_signature_verification_accepts_what_was_signed(secrets, which, payload, skew, junk, position):
    secret = secrets[which % len(secrets)]
    t = int(NOW) + skew
    good = tinytrack.sign(secret, t, payload)
    v1s = [f"v1={j}" for j in junk]
    v1s.insert(position % (len(v1s) + 1), f"v1={good}")
    assert tinytrack.verify_signature(f"t={t},{','.join(v1s)}", payload, secrets, NOW) is True
    assert tinytrack.verify_signature(f"t={t},v1={good.upper()}", payload, secrets, NOW) is True
    assert tinytrack.verify_signature(f"v1={good}, t={t}", payload, secrets, NOW) is True


@SETTINGS
@given(
    secret=secrets_st,
    other=secrets_st,
    payload=st.binary(min_size=1, max_size=200),
    index=st.integers(0, 199),
    delta=st.integers(1, 255),
    skew=st.integers(301, 10**9) | st.integers(-(10**9), -301),
)
def test_signature_verification_refuses_any_change(secret, other, payload, index, delta, skew):
    assume(other != secret)
    t = int(NOW)
    header = f"t={t},v1={tinytrack.sign(secret, t, payload)}"
    assert tinytrack.verify_signature(header, payload, [secret], NOW) is True
    i = index % len(payload)
    changed = payload[:i] + bytes([(payload[i] + delta) % 256]) + payload[i + 1 :]
    assert tinytrack.verify_signature(header, changed, [secret], NOW) is False
    assert tinytrack.verify_signature(header, payload + b"x", [secret], NOW) is False
    assert tinytrack.verify_signature(header, payload[:-1], [secret], NOW) is False
    assert tinytrack.verify_signature(header, payload, [other], NOW) is False
    assert tinytrack.verify_signature(header, payload, [], NOW) is False
    stale = f"t={t + skew},v1={tinytrack.sign(secret, t + skew, payload)}"
    assert tinytrack.verify_signature(stale, payload, [secret], NOW) is False
    # the signature binds the timestamp: the same v1 with another t fails
    assert (
        tinytrack.verify_signature(f"t={t + 1},v1={tinytrack.sign(secret, t, payload)}", payload, [secret], NOW)
        is False
    )


@SETTINGS
@given(
    header=st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=80)
    | st.lists(
        st.sampled_from(["t=", "v1=", ",", "=", " ", "1790000000", "-1", "abc", "00" * 32, "v0=", "t=1790000000"]),
        max_size=8,
    ).map("".join)
)
def test_signature_garbage_header_is_false_never_an_exception(header):
    assert tinytrack.verify_signature(header, b"body", ["s" * 16], NOW) is False


# === 2. Hostile requests against the app, table-driven ===========================

OTHER_CLICK = "0190a6b2-7c1d-7abc-8def-0123456789ac"
BEARER = (b"authorization", b"Bearer " + POSTBACK_TOKEN.encode())
JSON = (b"content-type", b"application/json")
FORM = (b"content-type", b"application/x-www-form-urlencoded")
Q = "/postback?click_id={cid}&token={tok}&"


def err(message: str) -> dict:
    return {"error": message}


def bad_payout(text: str) -> dict:
    return err(f"payout: must be a decimal >= 0 with at most 6 decimals, got {text!r}")


def bad_txid(text: str) -> dict:
    return err(f"txid: must be 1-64 characters of A-Z a-z 0-9 . _ : -, got {text!r}")


def case(
    id_: str, method: str, target: str, status: int, answer: dict | None, *, headers=(), body: bytes = b"", chunks=None
):
    return pytest.param(method, target, list(headers), body, chunks, status, answer, id=id_)


POSTBACK_CASES = [
    # non-UTF-8 in every postback field name (every alias), query and form: a 400 naming it
    *(
        case(f"query-%ff-{name}", "GET", Q + f"{name}=%ff", 400, err(f"{name}: not valid UTF-8"))
        for name in tinytrack.POSTBACK_ALIASES
    ),
    *(
        case(
            f"form-%ff-{name}",
            "POST",
            "/postback",
            400,
            err(f"{name}: not valid UTF-8"),
            headers=[FORM, BEARER],
            body=f"click_id={{cid}}&{name}=%ff".encode(),
        )
        for name in tinytrack.POSTBACK_ALIASES
    ),
    case("query-%ff-unknown-field", "GET", Q + "utm=%ff", 400, err("utm: not valid UTF-8")),
    case("query-%ff-field-name", "GET", Q + "%ff=1", 400, err("query: a field name is not valid UTF-8")),
    case(
        "form-%ff-field-name",
        "POST",
        "/postback",
        400,
        err("body: a field name is not valid UTF-8"),
        headers=[FORM, BEARER],
        body=b"%ff=1",
    ),
    case("query-crlf-in-name-with-%ff", "GET", Q + "a%0d%0ab=%ff", 400, err("ab: not valid UTF-8")),
    case("query-raw-byte-ff", "GET", Q.replace("{tok}&", "{tok}&payout=\xff"), 400, err("payout: not valid UTF-8")),
    case("query-65-fields", "GET", Q + "&".join(["a=1"] * 63), 400, err("query: more than 64 fields")),
    case(
        "form-65-fields",
        "POST",
        "/postback",
        400,
        err("body: more than 64 fields"),
        headers=[FORM, BEARER],
        body=b"&".join([b"a=1"] * 65),
    ),
    # NUL and CR/LF: refused with the value escaped, never stored
    case("nul-click_id", "GET", "/postback?click_id={cid}%00&token={tok}", 400, None),
    case("nul-payout", "GET", Q + "payout=1%00", 400, bad_payout("1\x00")),
    case("nul-txid", "GET", Q + "txid=a%00b", 400, bad_txid("a\x00b")),
    case("nul-event", "GET", Q + "event=sale%00", 400, err("event: must match [a-z0-9_]{1,32}, got 'sale\\x00'")),
    case(
        "nul-currency",
        "GET",
        Q + "currency=US%00",
        400,
        err("currency: must be a three-letter ISO 4217 code, got 'US\\x00'"),
    ),
    case(
        "nul-status",
        "GET",
        Q + "status=approved%00",
        400,
        err("status: must be one of approved, pending, rejected or a postback.status_map word, got 'approved\\x00'"),
    ),
    case(
        "nul-ts",
        "GET",
        Q + "ts=1790000000%00",
        400,
        err("ts: must be ISO 8601 with an offset or unix seconds, got '1790000000\\x00'"),
    ),
    case("nul-token", "GET", "/postback?click_id={cid}&token={tok}%00", 401, err("unauthorized")),
    case("crlf-txid", "GET", Q + "txid=a%0d%0aSet-Cookie:%20x=1", 400, bad_txid("a\r\nSet-Cookie: x=1")),
    case("crlf-event", "GET", Q + "et=a%0d%0ab", 400, err("event: must match [a-z0-9_]{1,32}, got 'a\\r\\nb'")),
    case("unicode-line-separator-txid", "GET", Q + "txid=a%e2%80%a8b", 400, bad_txid("a\u2028b")),
    case("sql-ish-txid", "GET", Q + "txid=1'%3B%20DROP%20TABLE%20clicks--", 400, bad_txid("1'; DROP TABLE clicks--")),
    # overlong values
    case("txid-65", "GET", Q + "txid=" + "a" * 65, 400, bad_txid("a" * 40 + "...")),
    case(
        "event-33", "GET", Q + "event=" + "e" * 33, 400, err(f"event: must match [a-z0-9_]{{1,32}}, got {'e' * 33!r}")
    ),
    case("payout-13-digits", "GET", Q + "payout=" + "9" * 13, 400, bad_payout("9" * 13)),
    case("payout-7-decimals", "GET", Q + "payout=1.0000001", 400, bad_payout("1.0000001")),
    case("payout-10k-chars", "GET", Q + "payout=" + "1" * 10_000, 400, bad_payout("1" * 40 + "...")),
    case("click_id-too-long", "GET", "/postback?click_id={cid}0&token={tok}", 400, None),
    case("token-10k-chars", "GET", "/postback?click_id={cid}&token=" + "t" * 10_000, 401, err("unauthorized")),
    case(
        "currency-4", "GET", Q + "currency=USDX", 400, err("currency: must be a three-letter ISO 4217 code, got 'USDX'")
    ),
    case(
        "ts-milliseconds",
        "GET",
        Q + "ts=1790000000000",
        400,
        err("ts: is more than a day in the future, got '1790000000000'"),
    ),
    # duplicates with different values: a 400, whichever aliases carry them
    case(
        "dup-payout",
        "GET",
        Q + "payout=1&payout=2",
        400,
        err("payout: given twice (payout and payout) with different values"),
    ),
    case(
        "dup-payout-alias",
        "GET",
        Q + "amount=1&sum=2",
        400,
        err("payout: given twice (amount and sum) with different values"),
    ),
    case(
        "dup-click_id-alias",
        "GET",
        Q + f"cid={OTHER_CLICK}",
        400,
        err("click_id: given twice (click_id and cid) with different values"),
    ),
    case(
        "dup-token-key",
        "GET",
        Q + "key=wrong-token-0000",
        400,
        err("token: given twice (token and key) with different values"),
    ),
    case(
        "dup-query-and-body",
        "POST",
        "/postback?click_id={cid}",
        400,
        err("click_id: given twice (click_id and click_id) with different values"),
        headers=[JSON, BEARER],
        body=orjson.dumps({"click_id": OTHER_CLICK}),
    ),
    # JSON: nested values, booleans, huge numbers -> 400 naming the field
    *(
        case(f"json-{label}", "POST", "/postback", 400, answer, headers=[JSON, BEARER], body=body)
        for label, body, answer in [
            (
                "payout-dict",
                b'{"click_id":"{cid}","payout":{"a":1}}',
                err("payout: must be a string or a number, got an object"),
            ),
            (
                "payout-list",
                b'{"click_id":"{cid}","payout":[1]}',
                err("payout: must be a string or a number, got an array"),
            ),
            (
                "amount-bool",
                b'{"click_id":"{cid}","amount":true}',
                err("amount: must be a string or a number, got a boolean"),
            ),
            ("event-false", b'{"click_id":"{cid}","et":false}', err("et: must be a string or a number, got a boolean")),
            (
                "txid-operator",
                b'{"click_id":"{cid}","txid":{"$ne":null}}',
                err("txid: must be a string or a number, got an object"),
            ),
            ("click_id-list", b'{"click_id":["{cid}"]}', err("click_id: must be a string or a number, got an array")),
            (
                "token-dict",
                b'{"click_id":"{cid}","token":{"a":"b"}}',
                err("token: must be a string or a number, got an object"),
            ),
            ("payout-1e400", b'{"click_id":"{cid}","payout":1e400}', bad_payout("1e400")),
            (
                "payout-10e30",
                b'{"click_id":"{cid}","payout":1000000000000000000000000000000}',
                bad_payout("1000000000000000000000000000000"),
            ),
            ("payout-u64", b'{"click_id":"{cid}","payout":18446744073709551615}', bad_payout("18446744073709551615")),
            ("payout-negative", b'{"click_id":"{cid}","payout":-1}', bad_payout("-1")),
            ("payout-tiny", b'{"click_id":"{cid}","payout":1e-7}', bad_payout("1e-7")),
            (
                "ts-1e300",
                b'{"click_id":"{cid}","ts":1e300}',
                err("ts: must be ISO 8601 with an offset or unix seconds, got '1e300'"),
            ),
            ("nul-escape-txid", b'{"click_id":"{cid}","txid":"a\\u0000"}', bad_txid("a\x00")),
            (
                "lone-surrogate",
                b'{"click_id":"{cid}","txid":"\\ud800"}',
                err("txid: is not valid Unicode (a lone surrogate)"),
            ),
            (
                "lone-surrogate-token",
                b'{"click_id":"{cid}","token":"\\ud800"}',
                err("token: is not valid Unicode (a lone surrogate)"),
            ),
            ("non-utf8", b'{"click_id":"{cid}","txid":"\xff"}', err("body: invalid JSON")),
            ("bom", b'\xef\xbb\xbf{"click_id":"{cid}"}', err("body: invalid JSON")),
            ("truncated", b'{"click_id":"{cid}"', err("body: invalid JSON")),
            ("array", b'["{cid}"]', err("body: must be a JSON object")),
            ("null", b"null", err("body: must be a JSON object")),
            ("string", b'"{cid}"', err("body: must be a JSON object")),
            ("deep-array", b"[" * 500 + b"]" * 500, err("body: must be a JSON object")),
            ("too-deep", b"[" * 1020, err("body: invalid JSON")),
            ("null-click_id", b'{"click_id":null}', err("click_id: is required")),
        ]
    ),
    case(
        "json-wrong-token-in-body-beats-bearer",
        "POST",
        "/postback",
        401,
        err("unauthorized"),
        headers=[JSON, BEARER],
        body=b'{"click_id":"{cid}","token":12345678}',
    ),
    # sizes and lying lengths
    case(
        "body-1025",
        "POST",
        "/postback",
        413,
        err("body: more than 1024 bytes"),
        headers=[JSON, BEARER],
        body=b" " * 1025,
    ),
    case(
        "chunked-2000",
        "POST",
        "/postback",
        413,
        err("body: more than 1024 bytes"),
        headers=[JSON, BEARER],
        chunks=[b" " * 100] * 20,
    ),
    case(
        "chunked-one-big",
        "POST",
        "/postback",
        413,
        err("body: more than 1024 bytes"),
        headers=[JSON, BEARER],
        chunks=[b" " * 5000],
    ),
    case(
        "length-abc",
        "POST",
        "/postback",
        413,
        err("body: more than 1024 bytes"),
        headers=[JSON, BEARER, (b"content-length", b"abc")],
        body=b"{}",
    ),
    case(
        "length-huge",
        "POST",
        "/postback",
        413,
        err("body: more than 1024 bytes"),
        headers=[JSON, BEARER, (b"content-length", b"99999999999999999999999")],
        body=b"{}",
    ),
    case(
        "length-negative",
        "POST",
        "/postback",
        413,
        err("body: more than 1024 bytes"),
        headers=[JSON, BEARER, (b"content-length", b"-1")],
        body=b"{}",
    ),
    case(
        "length-1025-small-body",
        "POST",
        "/postback",
        413,
        err("body: more than 1024 bytes"),
        headers=[JSON, BEARER, (b"content-length", b"1025")],
        body=b"{}",
    ),
    case(
        "length-lies-small",
        "POST",
        "/postback",
        413,
        err("body: more than 1024 bytes"),
        headers=[JSON, BEARER, (b"content-length", b"10")],
        chunks=[b" " * 600] * 4,
    ),
    case(
        "length-twice",
        "POST",
        "/postback",
        413,
        err("body: more than 1024 bytes"),
        headers=[JSON, BEARER, (b"content-length", b"2"), (b"content-length", b"2")],
        body=b"{}",
    ),
    # content types
    *(
        case(
            f"type-{ctype or 'none'}",
            "POST",
            "/postback",
            415,
            err("content-type: must be application/json or application/x-www-form-urlencoded"),
            headers=[BEARER, *([(b"content-type", ctype.encode())] if ctype else [])],
            body=b'{"click_id":"{cid}"}',
        )
        for ctype in [
            "",
            "text/plain",
            "text/xml",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "application/json-patch+json",
            "application/x-www-form-urlencodedx",
            "json",
            "*/*",
        ]
    ),
    case(
        "json-sent-as-form",
        "POST",
        "/postback",
        400,
        err("click_id: is required"),
        headers=[FORM, BEARER],
        body=b'{"click_id":"{cid}"}',
    ),
    # methods
    *(
        case(
            f"method-{m}",
            m,
            Q + "txid=m",
            405,
            err("method not allowed"),
            headers=[JSON, BEARER],
            body=b'{"click_id":"{cid}"}',
        )
        for m in ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "get"]
    ),
    case("method-HEAD", "HEAD", Q + "txid=h", 405, None),
    # paths near /postback go nowhere
    case("path-trailing-slash", "GET", "/postback/?click_id={cid}&token={tok}", 404, err("not found")),
    case("path-nul", "GET", "/postback%00?click_id={cid}&token={tok}", 404, err("not found")),
]


@pytest.mark.parametrize("method, target, headers, body, chunks, status, answer", POSTBACK_CASES)
async def test_hostile_postbacks(app, client, method, target, headers, body, chunks, status, answer):
    cid = await new_click(client)
    before = counts(app)
    fill = {b"{cid}": cid.encode(), b"{tok}": POSTBACK_TOKEN.encode()}
    raw = target.encode("latin-1")
    for hole, value in fill.items():
        raw, body = raw.replace(hole, value), body.replace(hole, value)
    got = await asgi(app, method, raw, headers=headers, body=body, chunks=chunks)
    assert got.status == status, got.body
    if answer is not None:
        assert got.json() == answer
    elif method != "HEAD":
        message = got.json()["error"]
        assert message.split(": ")[0] in KNOWN_NAMES and "\x00" not in message and "\r" not in message
    assert counts(app) == before, "a refused postback wrote to the database"
    assert got.header(b"cache-control") == b"no-store" or status == 404
    for name, value in got.headers:  # nothing from the request reaches a header
        assert b"\r" not in value and b"\n" not in value and b"\x00" not in value
        assert name in (b"content-type", b"cache-control", b"content-length", b"allow", b"www-authenticate")
    if status == 405:
        assert got.header(b"allow") == b"GET, POST"
    if status == 401:
        assert got.header(b"www-authenticate") == b"Bearer"
    if chunks is not None:
        # "stop reading, don't buffer": no more than the limit's worth of messages is pulled
        assert got.messages_read <= 1024 // min(len(c) for c in chunks) + 2


async def test_streams_without_end_are_cut_at_the_limit(app):
    def forever():
        while True:
            yield b"x" * 64

    got = await asyncio.wait_for(asgi(app, "POST", "/postback", headers=[JSON, BEARER], chunks=forever()), 5)
    assert (got.status, got.json()) == (413, err("body: more than 1024 bytes"))
    assert got.messages_read == 1024 // 64 + 1
    assert counts(app)["conversions"] == 0


async def test_body_of_exactly_1024_bytes_is_taken_and_1025_is_not(app, client):
    cid = await new_click(client)

    def padded(size: int, txid: str) -> bytes:
        body = orjson.dumps({"click_id": cid, "txid": txid, "token": POSTBACK_TOKEN, "pad": ""})
        return body[:-2] + b"x" * (size - len(body)) + b'"}'

    exact, over = padded(1024, "AT-LIMIT"), padded(1025, "OVER")
    assert (len(exact), len(over)) == (1024, 1025)
    taken = await asgi(app, "POST", "/postback", headers=[JSON], body=exact)
    assert (taken.status, taken.json()) == (200, {"status": "created", "id": 1})
    chunked = await asgi(app, "POST", "/postback", headers=[JSON], chunks=[exact[:500], exact[500:]])
    assert (chunked.status, chunked.json()) == (200, {"status": "duplicate", "id": 1})
    for refused in (
        await asgi(app, "POST", "/postback", headers=[JSON], body=over),
        await asgi(app, "POST", "/postback", headers=[JSON], chunks=[over[:1000], over[1000:]]),
    ):
        assert (refused.status, refused.json()) == (413, err("body: more than 1024 bytes"))
    assert rows(app, "SELECT txid FROM conversions") == [("AT-LIMIT",)]


async def test_json_duplicate_keys_with_the_same_value_are_fine(app, client):
    cid = await new_click(client)
    body = b'{"click_id":"%s","txid":"D1","txid":"D1"}' % cid.encode()
    got = await asgi(app, "POST", "/postback", headers=[JSON, BEARER], body=body)
    assert (got.status, got.json()) == (200, {"status": "created", "id": 1})


async def test_json_duplicate_keys_with_different_values_are_a_400(app, client):
    cid = await new_click(client)
    body = b'{"click_id":"%s","payout":"1","payout":"1000"}' % cid.encode()
    got = await asgi(app, "POST", "/postback", headers=[JSON, BEARER], body=body)
    assert (got.status, got.json()) == (400, err("payout: given twice (payout and payout) with different values"))
    assert counts(app)["conversions"] == 0


@pytest.mark.parametrize("length", [b"\xb2", b"9" * 5000])
async def test_content_length_that_isdigit_but_not_int_is_413(app, length):
    got = await asgi(app, "POST", "/postback", headers=[JSON, BEARER, (b"content-length", length)], body=b"{}")
    assert (got.status, got.json()) == (413, err("body: more than 1024 bytes"))


ARABIC_DIGITS = str.maketrans("0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669")


@pytest.mark.parametrize(
    "field, value", [("payout", "\u0661\u0662"), ("payout", "\uff11"), ("ts", "1789999000".translate(ARABIC_DIGITS))]
)
def test_numbers_are_ascii_digits_only(field, value):
    with pytest.raises(FieldError) as caught:
        tinytrack.build_postback({"click_id": CLICK, field: value}, CONF, NOW)
    assert caught.value.field == field


CLICK_404_PATHS = [
    "/c/..%2f..",
    "/c/..%2F..%2Fpostback",
    "/c/../spring",
    "/c/%2e%2e",
    "/c/",
    "/c/spring/",
    "/c/spring%00",
    "/c/spring%0d%0aX:%20y",
    "/c/SPRING",
    "/c/spring;x",
    "/c//offer.example.com",
    "/c/spring%2f",
    "/c/%ff",
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", CLICK_404_PATHS)
async def test_click_paths_that_are_not_a_campaign_are_404(app, method, path):
    got = await asgi(app, method, path + "?sub1=x")
    assert got.status == 404
    assert got.header(b"location") is None
    assert got.body == b"unknown campaign\n"
    assert counts(app)["clicks"] == 0


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"])
async def test_click_other_methods_are_405_and_store_nothing(app, method):
    got = await asgi(app, method, "/c/spring?sub1=x", body=b"sub1=y", headers=[FORM])
    assert (got.status, got.body, got.header(b"allow")) == (405, b"method not allowed\n", b"GET, HEAD")
    assert got.header(b"location") is None
    assert counts(app)["clicks"] == 0


HOSTILE_CLICK_QUERIES = [
    b"sub1=%0d%0aSet-Cookie:%20x=1&ext_id=%0aLocation:%20https://evil.com",
    b"sub1=%00&sub2=\x00\r\n&ext_id=%ff%fe",
    b"sub1=//evil.com&sub2=@evil.com&sub3=https://evil.com/&ext_id=%23frag",
    b"sub1=..%2f..%2f&ext_id=\\\\evil.com",
    b"sub1=" + b"%0d" * 400,
    b"a%0d%0ab=1&%23=x&@evil.com=1&redirect=https://evil.com&=&&&url=//evil.com",
    b"sub1=%e2%80%a8%c2%85&ext_id=" + "\u00e9".encode() * 300,
    b"&".join([b"x%0a=%0d"] * 100),
]


@pytest.mark.parametrize("campaign, path", [("spring", "/lp"), ("passing", "/go")])
@pytest.mark.parametrize("query", HOSTILE_CLICK_QUERIES)
async def test_hostile_click_queries_never_reach_a_header_or_the_database_raw(app, campaign, path, query):
    headers = [(b"user-agent", b"Mozilla/5.0\r\nX-Injected: 1\x00"), (b"x-forwarded-for", b"203.0.113.9\r\nX: y")]
    got = await asgi(app, "GET", b"/c/" + campaign.encode() + b"?" + query, headers=headers)
    assert got.status == 302
    assert sorted(name for name, _ in got.headers) == [b"cache-control", b"content-length", b"location"]
    location = got.header(b"location").decode("ascii")
    parts = assert_safe_url(location, path)
    assert parts.fragment == ("top" if campaign == "passing" else "")
    assert "evil.com" not in parts.netloc
    [stored] = rows(app, "SELECT sub1, sub2, sub3, sub4, sub5, ext_id, ip, ua FROM clicks")
    for value in stored:
        assert value is None or (is_clean(value) and len(value) <= 512)
    assert stored[6] == "198.51.100.7"  # the untrusted peer's X-Forwarded-For is ignored
    assert stored[7] == "Mozilla/5.0X-Injected: 1"
    if campaign == "spring":
        query_values = parse_qs(parts.query, keep_blank_values=True)
        assert query_values["s1"] == [stored[0] or ""]
        assert query_values["x"] == [stored[5] or ""]


@pytest.mark.parametrize("path", ["/healthz", "/", "/metrics", "/api/stats", "/nope", "/postback%2f..%2fhealthz"])
@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "TRACE"])
async def test_other_routes_never_500(app, path, method):
    got = await asgi(app, method, path)
    assert got.status in (404, 405)
    assert counts(app) == dict.fromkeys(TABLES, 0)


# A whole-request fuzz: any query, body and content type gives a known answer,
# and whatever gets stored is validated.

fuzz_pieces = st.sampled_from(
    [
        b"&",
        b"=",
        b"click_id=",
        b"cid=",
        b"payout=",
        b"amount=",
        b"txid=",
        b"event=",
        b"status=",
        b"currency=",
        b"ts=",
        b"token=",
        b"key=",
        b"{cid}",
        b"{tok}",
        b"%ff",
        b"%00",
        b"%0d%0a",
        b"1",
        b"1.5",
        b"-1",
        b"sale",
        b"pending",
        b"EUR",
        b"1789999999",
        b"x",
        b"%20",
        b"+",
    ]
) | st.binary(max_size=4)
fuzz_json = st.dictionaries(names, json_values, max_size=6).map(
    lambda d: {k: ("{cid}" if v == CLICK else v) for k, v in d.items()}
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST"]),
    query=st.tuples(
        st.sampled_from([b"", b"click_id={cid}&", b"click_id={cid}&token={tok}&"]),
        st.lists(fuzz_pieces, max_size=14).map(b"".join),
    ).map(b"".join),
    body_kind=st.sampled_from(["none", "json", "form", "raw"]),
    json_body=fuzz_json,
    form_body=st.lists(fuzz_pieces, max_size=14).map(b"".join),
    ctype=st.sampled_from([b"application/json", b"application/x-www-form-urlencoded", b"text/plain", None]),
    bearer=st.booleans(),
)
def test_fuzzed_postbacks_answer_known_codes_and_store_only_valid_rows(
    tmp_path_factory, method, query, body_kind, json_body, form_body, ctype, bearer
):
    loop, app, cid = FUZZ.setup(tmp_path_factory)
    body = {"none": b"", "json": json.dumps(json_body).encode(), "form": form_body, "raw": b"\xff\x00{" + form_body}[
        body_kind
    ]
    fill = {b"{cid}": cid.encode(), b"{tok}": POSTBACK_TOKEN.encode()}
    for hole, value in fill.items():
        query, body = query.replace(hole, value), body.replace(hole, value)
    headers = ([(b"content-type", ctype)] if ctype else []) + ([BEARER] if bearer else [])
    got = loop.run_until_complete(
        asgi(app, method, b"/postback?" + query, headers=headers, body=body if method == "POST" else b"")
    )
    payload = got.json()
    assert got.status in (200, 400, 401, 404, 413, 415), (got.status, payload)
    if got.status == 200:
        assert payload["status"] in ("created", "duplicate", "updated", "rejected")
    else:
        message = payload["error"]
        assert message and is_clean(message)
        if got.status == 400:
            field, sep, problem = message.partition(": ")
            assert sep and field and problem
    for event, txid, status, currency, payout, ip in rows(
        app, "SELECT event, txid, status, currency, payout, ip FROM conversions"
    ):
        assert (
            re.fullmatch(r"[a-z0-9_]{1,32}", event)
            and status in tinytrack.STATUSES
            and re.fullmatch(r"[A-Z]{3}", currency)
        )
        assert txid is None or re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", txid)
        assert isinstance(payout, int) and payout >= 0 and ip == PEER[0]
    for click_id, event, txid in rows(app, "SELECT click_id, event, txid FROM orphans"):
        assert tinytrack.UUID_RE.fullmatch(click_id) and re.fullmatch(r"[a-z0-9_]{1,32}", event)
        assert txid is None or re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", txid)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    query=st.binary(max_size=200) | st.lists(raw_query_pieces | fuzz_pieces, max_size=20).map(b"".join),
    campaign=st.sampled_from(["spring", "passing"]),
)
def test_fuzzed_clicks_redirect_only_to_the_configured_host(tmp_path_factory, query, campaign):
    loop, app, _ = FUZZ.setup(tmp_path_factory)
    got = loop.run_until_complete(
        asgi(app, "GET", b"/c/" + campaign.encode() + b"?" + query, headers=[(b"user-agent", b"Mozilla/5.0")])
    )
    assert got.status == 302
    assert_safe_url(got.header(b"location").decode("ascii"), "/lp" if campaign == "spring" else "/go")


class _Fuzz:
    """One app (and event loop) shared by every example of the fuzz tests."""

    def __init__(self) -> None:
        self.state = None

    def setup(self, tmp_path_factory):
        if self.state is None:
            loop = asyncio.new_event_loop()
            directory = tmp_path_factory.mktemp("fuzz")
            config = tinytrack.load_config(write_config(directory))
            app = tinytrack.create_app(config, clock=lambda: NOW)
            loop.run_until_complete(app.startup())
            got = loop.run_until_complete(asgi(app, "GET", "/c/spring", headers=[(b"user-agent", b"Mozilla/5.0")]))
            cid = got.header(b"location").decode().split("cid=")[1].split("&")[0]
            self.state = (loop, app, cid)
        return self.state

    def close(self) -> None:
        if self.state is not None:
            loop, app, _ = self.state
            loop.run_until_complete(app.shutdown())
            loop.close()
            self.state = None


FUZZ = _Fuzz()


@pytest.fixture(autouse=True, scope="module")
def _close_fuzz_app():
    yield
    FUZZ.close()


# === 3. The allowlist: spoofing X-Forwarded-For, proxies, unix sockets ============

ALLOW = {"allow_ips": ["203.0.113.0/24", "2001:db8:5::/48"]}


@pytest.mark.parametrize(
    "peer, xff, allowed, stored_ip",
    [
        pytest.param("198.51.100.7", None, False, None, id="outsider"),
        pytest.param("198.51.100.7", "203.0.113.9", False, None, id="outsider-spoofs-xff-directly"),
        pytest.param("198.51.100.7", "203.0.113.9, 203.0.113.10", False, None, id="outsider-spoofs-two"),
        pytest.param("127.0.0.1", "203.0.113.9, 198.51.100.7", False, None, id="outsider-spoofs-through-proxy"),
        pytest.param(
            "127.0.0.1", "203.0.113.9,198.51.100.7, 127.0.0.1", False, None, id="outsider-through-two-proxies"
        ),
        pytest.param("127.0.0.1", "203.0.113.9, garbage", False, None, id="garbage-right-most"),
        pytest.param("127.0.0.1", "203.0.113.9:443", False, None, id="address-with-port"),
        pytest.param("127.0.0.1", None, False, None, id="the-proxy-itself"),
        pytest.param("127.0.0.1", "", False, None, id="empty-xff"),
        pytest.param("::ffff:198.51.100.7", None, False, None, id="mapped-outsider"),
        pytest.param("2001:db8:6::1", None, False, None, id="v6-outsider"),
        pytest.param("127.0.0.1", "6.6.6.6, 203.0.113.9", True, "203.0.113.9", id="allowed-through-proxy-with-spoof"),
        pytest.param("127.0.0.1", "203.0.113.9", True, "203.0.113.9", id="allowed-through-proxy"),
        pytest.param("127.0.0.1", "203.0.113.9, 127.0.0.1", True, "203.0.113.9", id="allowed-through-two-proxies"),
        pytest.param("::1", "203.0.113.9", True, "203.0.113.9", id="allowed-through-v6-proxy"),
        pytest.param(
            "::ffff:127.0.0.1", "198.51.100.7, 203.0.113.9", True, "203.0.113.9", id="allowed-through-mapped-proxy"
        ),
        pytest.param("203.0.113.9", None, True, "203.0.113.9", id="allowed-direct"),
        pytest.param("203.0.113.9", "198.51.100.7", True, "203.0.113.9", id="allowed-direct-xff-ignored"),
        pytest.param("::ffff:203.0.113.9", None, True, None, id="allowed-mapped-peer"),
        pytest.param("2001:db8:5::1", None, True, "2001:db8:5::1", id="allowed-v6"),
        pytest.param(None, "203.0.113.9, 198.51.100.7", False, None, id="unix-socket-spoof"),
        pytest.param(None, "198.51.100.7, 203.0.113.9", True, "203.0.113.9", id="unix-socket-right-most"),
        pytest.param(None, "203.0.113.9, 127.0.0.1", True, "203.0.113.9", id="unix-socket-skips-trusted"),
        pytest.param(None, None, False, None, id="unix-socket-no-xff"),
    ],
)
async def test_allowlist_uses_the_right_most_untrusted_address(tmp_path, clock, peer, xff, allowed, stored_ip):
    async with running(tmp_path, clock, postback=ALLOW) as app:
        cid = await click_id_for(app)
        client = (peer, 50000) if peer is not None else None
        headers = {"x-forwarded-for": xff} if xff is not None else {}
        async with http(app, client) as sender:
            got = await sender.get(
                "/postback", params={"click_id": cid, "token": POSTBACK_TOKEN, "txid": "A1"}, headers=headers
            )
            as_post = await sender.post(
                "/postback",
                json={"click_id": cid, "txid": "A1"},
                headers={**headers, "authorization": f"Bearer {POSTBACK_TOKEN}"},
            )
            wrong_token = await sender.get(
                "/postback", params={"click_id": cid, "token": "wrong-token-000"}, headers=headers
            )
        if allowed:
            assert (got.status_code, got.json()) == (200, {"status": "created", "id": 1})
            assert (as_post.status_code, as_post.json()) == (200, {"status": "duplicate", "id": 1})
            assert (wrong_token.status_code, wrong_token.json()) == (
                401,
                err("unauthorized"),
            )  # the allowlist is not a token
            [(ip,)] = rows(app, "SELECT ip FROM conversions")
            assert ip == (stored_ip or peer)
        else:
            for answer in (got, as_post, wrong_token):
                assert (answer.status_code, answer.json()) == (403, err("forbidden"))
            assert {t: n for t, n in counts(app).items() if t != "clicks"} == dict.fromkeys(TABLES[1:], 0)


async def test_allowlist_entry_written_as_ipv4_mapped_matches_ipv4_peers(tmp_path, clock):
    async with running(tmp_path, clock, postback={"allow_ips": ["::ffff:203.0.113.0/120"]}) as app:
        cid = await click_id_for(app)
        answers = {}
        for peer in ("203.0.113.9", "::ffff:203.0.113.10", "203.0.114.1"):
            async with http(app, (peer, 1)) as sender:
                answers[peer] = (
                    await sender.get("/postback", params={"click_id": cid, "txid": peer, "token": POSTBACK_TOKEN})
                ).status_code
    assert answers == {"203.0.113.9": 200, "::ffff:203.0.113.10": 200, "203.0.114.1": 403}


@pytest.mark.parametrize(
    "table, entry, message",
    [
        (
            "postback",
            "2001:db8::1/32",
            "postback.allow_ips[0]: not an IP address or CIDR: '2001:db8::1/32' (2001:db8::1/32 has host bits set)",
        ),
        (
            "postback",
            "203.0.113.0/33",
            "postback.allow_ips[0]: not an IP address or CIDR: '203.0.113.0/33' ('203.0.113.0/33' does not appear to be an IPv4 or IPv6 network)",
        ),
        (
            "postback",
            "",
            "postback.allow_ips[0]: not an IP address or CIDR: '' ('' does not appear to be an IPv4 or IPv6 network)",
        ),
        (
            "server",
            "10.0.0.0/8\n",
            "server.trusted_proxies[0]: not an IP address or CIDR: '10.0.0.0/8\\n' ('10.0.0.0/8\\n' does not appear to be an IPv4 or IPv6 network)",
        ),
    ],
)
def test_bad_allowlist_and_proxy_entries_stop_start_up(tmp_path, table, entry, message):
    key = "allow_ips" if table == "postback" else "trusted_proxies"
    with pytest.raises(tinytrack.ConfigError) as caught:
        tinytrack.build_config(config_data(tmp_path, **{table: {key: ["203.0.113.7", entry]}}))
    assert str(caught.value) == message.replace("[0]", "[1]")


# === 4. Token rotation and signatures through the app ============================

ROTATION = {"tokens": ["old-token-1234", "new-token-5678"]}


async def test_several_tokens_are_valid_at_once(tmp_path, clock):
    async with running(tmp_path, clock, postback=ROTATION) as app:
        cid = await click_id_for(app)
        async with http(app) as sender:
            accepted = []
            for i, token in enumerate(["old-token-1234", "new-token-5678"]):
                accepted += [
                    await sender.get("/postback", params={"click_id": cid, "txid": f"q{i}", "token": token}),
                    await sender.get("/postback", params={"click_id": cid, "txid": f"k{i}", "key": token}),
                    await sender.get(
                        "/postback",
                        params={"click_id": cid, "txid": f"b{i}"},
                        headers={"authorization": f"Bearer {token}"},
                    ),
                    await sender.post("/postback", json={"click_id": cid, "txid": f"j{i}", "token": token}),
                    await sender.post("/postback", data={"click_id": cid, "txid": f"f{i}", "key": token}),
                ]
            assert [a.json()["status"] for a in accepted] == ["created"] * 10
            refused = [
                await sender.get("/postback", params={"click_id": cid, "txid": "r", **auth}, headers=headers)
                for auth, headers in [
                    ({}, {}),
                    ({"token": "old-token-123"}, {}),
                    ({"token": "old-token-12345"}, {}),
                    ({"token": "OLD-TOKEN-1234"}, {}),
                    ({"token": "old-token-1234,new-token-5678"}, {}),
                    ({"token": "change-me"}, {}),
                    ({"token": ADMIN_TOKEN}, {}),  # admin and postback tokens are separate
                    ({}, {"authorization": f"Bearer {ADMIN_TOKEN}"}),
                    ({}, {"authorization": basic("x", "old-token-1234")}),
                    ({}, {"authorization": "old-token-1234"}),
                    ({}, {"authorization": "Bearer"}),
                    ({"token": "new-token-5678\u00e9"}, {}),
                    ({"Token": "new-token-5678"}, {}),
                ]
            ]
            assert [(a.status_code, a.json()) for a in refused] == [(401, err("unauthorized"))] * len(refused)
            assert all(a.headers["www-authenticate"] == "Bearer" for a in refused)
        assert counts(app)["conversions"] == 10 and counts(app)["orphans"] == 0


SECRET_OLD, SECRET_NEW = "hmac-secret-old-0001", "hmac-secret-new-0002"


async def test_signed_postbacks(tmp_path, clock):
    async with running(tmp_path, clock, postback={"hmac_secrets": [SECRET_OLD, SECRET_NEW]}) as app:
        cid = await click_id_for(app)
        t = int(clock.now)

        def header(secret: str, payload: bytes, when: int = t) -> tuple[bytes, bytes]:
            return (b"x-tinytrack-signature", f"t={when},v1={tinytrack.sign(secret, when, payload)}".encode())

        query = f"click_id={cid}&txid=G1&token={POSTBACK_TOKEN}".encode()
        body = orjson.dumps({"click_id": cid, "txid": "P1", "token": POSTBACK_TOKEN})
        form = f"click_id={cid}&txid=F1".encode()
        accepted = [
            await asgi(app, "GET", b"/postback?" + query, headers=[header(SECRET_NEW, query)]),
            await asgi(
                app, "GET", b"/postback?" + query, headers=[header(SECRET_OLD, query)]
            ),  # rotation: either secret
            await asgi(app, "POST", "/postback", headers=[JSON, header(SECRET_OLD, body, t - 299)], body=body),
            await asgi(app, "POST", "/postback", headers=[FORM, BEARER, header(SECRET_NEW, form, t + 299)], body=form),
            await asgi(
                app, "POST", "/postback?key=" + POSTBACK_TOKEN, headers=[FORM, header(SECRET_NEW, form)], body=form
            ),
            await asgi(
                app,
                "GET",
                b"/postback?" + query,
                headers=[
                    (
                        b"x-tinytrack-signature",
                        f"t={t},v1=00ff,v1={tinytrack.sign(SECRET_NEW, t, query)},v1=zz".encode(),
                    )
                ],
            ),
        ]
        assert [(a.status, a.json()["status"]) for a in accepted] == [
            (200, "created"),
            (200, "duplicate"),
            (200, "created"),
            (200, "created"),
            (200, "duplicate"),
            (200, "duplicate"),
        ]
        # A signature covers a POST's body only: a captured body replayed with postback
        # fields in the query string would make new conversions, or rewrite one (SPEC).
        signed = b"click_id=%s" % cid.encode()
        for query_fields, field in (
            (b"txid=R1", "txid"),
            (b"status=approved&payout=99999", "status"),
            (b"tid=R2", "txid"),
            (b"cid=" + cid.encode(), "click_id"),
        ):
            replay = await asgi(
                app,
                "POST",
                b"/postback?" + query_fields,
                headers=[FORM, BEARER, header(SECRET_NEW, signed)],
                body=signed,
            )
            assert (replay.status, replay.json()) == (
                400,
                {"error": f"{field}: must be in the signed body, not the query string (the signature covers the body)"},
            )
        before = counts(app)
        other = f"click_id={cid}&txid=G2&token={POSTBACK_TOKEN}".encode()
        refused = [
            await asgi(app, "GET", b"/postback?" + other),  # unsigned
            await asgi(app, "GET", b"/postback?" + other, headers=[header(SECRET_NEW, query)]),  # signed another query
            await asgi(app, "GET", b"/postback?" + other + b"&x=1", headers=[header(SECRET_NEW, other)]),  # appended to
            await asgi(app, "GET", b"/postback?" + other, headers=[header("hmac-secret-wrong-003", other)]),
            await asgi(app, "GET", b"/postback?" + other, headers=[header(SECRET_NEW, other, t - 301)]),  # stale
            await asgi(app, "GET", b"/postback?" + other, headers=[header(SECRET_NEW, other, t + 301)]),  # future
            await asgi(app, "GET", b"/postback?" + other, headers=[(b"x-tinytrack-signature", b"t=%d,v1=" % t)]),
            await asgi(
                app,
                "GET",
                b"/postback?" + other,
                headers=[(b"x-tinytrack-signature", b"v1=" + tinytrack.sign(SECRET_NEW, t, other).encode())],
            ),
            await asgi(
                app,
                "GET",
                b"/postback?" + other,
                headers=[
                    (
                        b"x-tinytrack-signature",
                        f"t={t * 1000},v1={tinytrack.sign(SECRET_NEW, t * 1000, other)}".encode(),
                    )
                ],
            ),
            await asgi(
                app,
                "GET",
                f"/postback?click_id={cid}&txid=G2".encode(),
                headers=[header(SECRET_NEW, f"click_id={cid}&txid=G2".encode())],
            ),  # no token
            await asgi(
                app,
                "POST",
                "/postback",
                headers=[JSON, BEARER, header(SECRET_NEW, other)],
                body=b'{"click_id":"%s","txid":"G2"}' % cid.encode(),
            ),
            await asgi(
                app, "POST", b"/postback?" + other, headers=[JSON, header(SECRET_NEW, other)], body=b"{}"
            ),  # POST signs the body
        ]
        assert [(a.status, a.json()) for a in refused] == [(401, err("unauthorized"))] * len(refused)
        assert counts(app) == before


async def test_signature_timestamp_that_isdigit_but_not_int_is_401(tmp_path, clock):
    async with running(tmp_path, clock, postback={"hmac_secrets": [SECRET_NEW]}) as app:
        query = f"click_id={CLICK}&token={POSTBACK_TOKEN}".encode()
        got = await asgi(app, "GET", b"/postback?" + query, headers=[(b"x-tinytrack-signature", b"t=\xb2,v1=00")])
        assert (got.status, got.json()) == (401, err("unauthorized"))


# Admin endpoints: admin.token as Bearer or as the HTTP Basic password, never a postback token.

ADMIN_PATHS = ["/api/conversions", "/api/orphans"]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("path", ADMIN_PATHS)
@pytest.mark.parametrize(
    "authorization, ok",
    [
        (f"Bearer {ADMIN_TOKEN}", True),
        (f"bearer  {ADMIN_TOKEN} ", True),
        (basic("admin", ADMIN_TOKEN), True),
        (basic("", ADMIN_TOKEN), True),
        (None, False),
        (f"Bearer {POSTBACK_TOKEN}", False),  # a network's token reads nothing
        (basic("admin", POSTBACK_TOKEN), False),
        (basic(ADMIN_TOKEN, ""), False),  # the token as the user name is not the password
        (f"Bearer {ADMIN_TOKEN[:-1]}", False),
        (f"Bearer {ADMIN_TOKEN}x", False),
        (f"Bearer {ADMIN_TOKEN.upper()}", False),
        (ADMIN_TOKEN, False),
        ("Basic %%%", False),
        ("Basic " + base64.b64encode(b"x:\xff").decode(), False),
        (f"Token {ADMIN_TOKEN}", False),
    ],
)
async def test_admin_endpoints_take_only_the_admin_token(app, path, authorization, ok):
    headers = [(b"authorization", authorization.encode())] if authorization is not None else []
    got = await asgi(app, "GET", path, headers=headers)
    if ok:
        assert (got.status, got.json()) == (200, {"rows": [], "next": None})
    else:
        assert (got.status, got.json()) == (401, err("unauthorized"))
    query_token = await asgi(app, "GET", f"{path}?token={ADMIN_TOKEN}&key={ADMIN_TOKEN}")
    assert query_token.status == 401  # admin credentials only in a header, never in a URL that lands in logs


@pytest.mark.parametrize(
    "query", ["after=%C2%B2", "limit=%C2%B2", "after=99999999999999999999999", "after=" + "9" * 5000]
)
@pytest.mark.parametrize("path", ADMIN_PATHS)
async def test_admin_listing_cursor_garbage_is_400(app, path, query):
    got = await asgi(app, "GET", f"{path}?{query}", headers=[(b"authorization", f"Bearer {ADMIN_TOKEN}".encode())])
    assert got.status == 400
    assert got.json()["error"].split(": ")[0] == query.split("=")[0]


# === 5. Logs: no token, no signature, no full client address =====================

WRONG_TOKENS = [
    "wrong-token-Q7x9Zk2m",
    "wrong-key-Hh3Lp0Vv",
    "wrong-bearer-Tn5Rw8Yc",
    "wrong-json-Jd2Kc6Fs",
    "wrong-form-Pm4Bx1Ge",
]
SIGNATURE_HEX = "5e1f" * 16
BASIC_PASSWORD = "basic-password-Zu8Wq3"


@pytest.mark.parametrize("access_log", [False, True], ids=["default", "access-log"])
def test_server_output_has_no_secret_and_no_full_client_ip(tmp_path, access_log):
    port = free_port()
    config_path = write_config(tmp_path, port)
    if access_log:
        text = config_path.read_text()
        config_path.write_text(text.replace("[server]\n", "[server]\naccess_log = true\n", 1))
    server = Server(tmp_path, config_path, port).start()
    outsider = {"x-forwarded-for": "6.6.6.6, 198.51.100.77"}  # through the loopback proxy: the client is 198.51.100.77
    v6 = {"x-forwarded-for": "2001:db8:1:2::77"}
    statuses = []
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http_:
            click = http_.get(
                "/c/spring",
                params={"sub1": "s", "token": POSTBACK_TOKEN},
                headers={"user-agent": "Mozilla/5.0", **outsider},
            )
            cid = click.headers["location"].split("cid=")[1].split("&")[0]
            signature = {"x-tinytrack-signature": f"t={int(time.time())},v1={SIGNATURE_HEX}"}

            def send(method: str, url: str, **kw) -> None:
                statuses.append(http_.request(method, url, **kw).status_code)

            send("GET", f"/postback?click_id={cid}&txid=Q&token={POSTBACK_TOKEN}", headers=outsider)
            send("GET", f"/postback?click_id={cid}&txid=K&key={POSTBACK_TOKEN}", headers={**v6, **signature})
            send(
                "GET",
                f"/postback?click_id={cid}&txid=B",
                headers={"authorization": f"Bearer {POSTBACK_TOKEN}", **outsider},
            )
            send("POST", "/postback", json={"click_id": cid, "txid": "J", "token": POSTBACK_TOKEN}, headers=outsider)
            send("POST", "/postback", data={"click_id": cid, "txid": "F", "key": POSTBACK_TOKEN})
            send(
                "GET",
                f"/postback?click_id={cid}&Token={POSTBACK_TOKEN}&%74oken={POSTBACK_TOKEN}&TOKEN={POSTBACK_TOKEN}",
            )
            send("GET", f"/postback?click_id={cid}&token={WRONG_TOKENS[0]}", headers=outsider)
            send("GET", f"/postback?click_id={cid}&key={WRONG_TOKENS[1]}")
            send("GET", f"/postback?click_id={cid}", headers={"authorization": f"Bearer {WRONG_TOKENS[2]}", **v6})
            send("POST", "/postback", json={"click_id": cid, "token": WRONG_TOKENS[3]})
            send("POST", "/postback", data={"click_id": cid, "key": WRONG_TOKENS[4]}, headers=outsider)
            send("GET", f"/postback?click_id={cid}&payout=-1&token={POSTBACK_TOKEN}", headers=outsider)  # 400
            send("GET", f"/postback?click_id={cid}&txid=x%0d%0aINJECTED%20line&token={POSTBACK_TOKEN}")  # 400, CR/LF
            send("GET", f"/postback?click_id={cid}&token=%ff{POSTBACK_TOKEN}")  # 400 on the token field itself
            send("GET", f"/postback?click_id={OTHER_CLICK}&token={POSTBACK_TOKEN}", headers=outsider)  # 404 orphan
            send("PUT", f"/postback?token={POSTBACK_TOKEN}")  # 405
            send(
                "POST",
                f"/postback?token={POSTBACK_TOKEN}",
                content=b"x" * 2000,
                headers={"content-type": "application/json"},
            )  # 413
            send(
                "POST", f"/postback?key={POSTBACK_TOKEN}", content=b"<a/>", headers={"content-type": "text/xml"}
            )  # 415
            send("GET", "/api/conversions", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
            send("GET", "/api/orphans?format=csv", auth=("admin", ADMIN_TOKEN))
            send("GET", "/api/conversions", auth=("admin", BASIC_PASSWORD))
            send("GET", "/api/stats", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
            send("GET", "/metrics", auth=("admin", BASIC_PASSWORD))
            send("GET", f"/metrics?token={ADMIN_TOKEN}")
            send("GET", f"/c/nope?key={POSTBACK_TOKEN}")
    finally:
        code = server.stop()
    assert code == 0
    assert statuses[:5] == [200] * 5 and statuses[6:11] == [401] * 5
    assert statuses[11:21] == [400, 400, 400, 404, 405, 413, 415, 200, 200, 401]
    output = server.output()
    assert output.strip(), "the server logged nothing at all"
    for secret in [POSTBACK_TOKEN, ADMIN_TOKEN, SIGNATURE_HEX, BASIC_PASSWORD, *WRONG_TOKENS]:
        assert secret not in output, f"{secret} is in the server output:\n{output}"
    for full_ip in ["198.51.100.77", "6.6.6.6", "2001:db8:1:2::77"]:
        assert full_ip not in output, f"{full_ip} is in the server output:\n{output}"
    postback_lines = [line for line in output.splitlines() if "postback" in line]
    assert postback_lines, output
    assert not [line for line in postback_lines if "127.0.0.1" in line], output
    assert not [line for line in output.splitlines() if line.startswith("INJECTED")], output
    if access_log:
        assert "198.51.100.0" in output and "127.0.0.0" in output
