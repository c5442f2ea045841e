"""Forward kinds beyond a GET (SPEC "Beyond the S2S postback", issue 18): `json`, a
POST of the conversion with configured headers, and `meta_capi`, Meta's Conversions
API, checked field by field by a local fake of Meta (fake_meta.py). Both go through the
durable outbox: retries, Idempotency-Key, the address guard, replay, kill -9. No secret
reaches a log, an answer, a page or the database."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, Server, free_port, new_click, write_config
from fake_meta import FakeMeta
from receiver import Receiver
from test_forward import attempts, cli, convert, kill, outbox, settled, tracker, until, wait_until

import tinytrack

pytestmark = pytest.mark.anyio

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
META_TOKEN = "EAAGm0PX4ZCpsBAMetaSecretToken42"
HOOK_SECRET = "hook-secret-value-9f8e7d"
GET_SECRET = "get-secret-value-1a2b3c"
FORWARD = """
[forward]
allow_private = true
first_retry_seconds = 1
timeout_seconds = 2
"""


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch):
    monkeypatch.setattr(tinytrack, "FORWARD_POLL_SECONDS", 0.05)


@pytest.fixture
def meta():
    fake = FakeMeta(META_TOKEN).start()
    yield fake
    fake.stop()


@pytest.fixture
def hook():
    running = Receiver([200]).start()
    yield running
    running.stop()


def meta_toml(endpoint: str, name: str = "fb", statuses: str = '["approved"]', **extra: str) -> str:
    """A campaign whose forward is Meta's (`extra`: more keys of its forward table)."""
    lines = [
        f"[campaigns.{name}]",
        'url = "https://shop.example.com/offer/spring?cid={click_id}"',
        f"forward_statuses = {statuses}",
        f"[campaigns.{name}.forward]",
        'kind = "meta_capi"',
        'pixel_id = "1234567890"',
        f'access_token = "{META_TOKEN}"',
        'event_map = { purchase = "Purchase", signup = "Lead" }',
        f'endpoint = "{endpoint}"',
        *(f"{key} = {value}" for key, value in extra.items()),
    ]
    return "\n" + "\n".join(lines) + "\n"


def json_toml(url: str, name: str = "crm") -> str:
    return f"""
[campaigns.{name}]
url = "https://offer.example.com/c?cid={{click_id}}"
forward_statuses = ["pending", "approved", "rejected"]
[campaigns.{name}.forward]
kind = "json"
url = "{url}"
headers = {{ Authorization = "Bearer {HOOK_SECRET}", X-Source = "tinytrack" }}
"""


async def arrived(receiver: Receiver, count: int, timeout: float = 10) -> list:
    """The receiver's hits once there are `count` (the in-process forwarder runs meanwhile)."""
    return await until(lambda: receiver.hits[:] if len(receiver.hits) >= count else None, timeout, "the hits")


def db_dump(path: Path) -> str:
    with closing(sqlite3.connect(path)) as con:
        return "\n".join(con.iterdump())


# --- json -----------------------------------------------------------------------


async def test_json_posts_the_conversion_as_the_api_shows_it_with_its_headers(tmp_path, hook):
    async with tracker(tmp_path, FORWARD + json_toml(hook.url("/hooks/conversion"))) as (app, http):
        cid = await new_click(http, "crm", sub1="s1")
        await convert(http, cid, expect="created", txid="T-1", payout="4.20", status="pending", event="purchase")
        [hit] = await arrived(hook, 1)
        [row] = await until(lambda: settled(app.config.storage.path, 1), what="the delivery")
        listed = (await http.get("/api/conversions?since=2000-01-01", headers=ADMIN)).json()["rows"]
    assert (hit.method, hit.path, hit.headers["content-type"]) == ("POST", "/hooks/conversion", "application/json")
    assert hit.headers["authorization"] == f"Bearer {HOOK_SECRET}" and hit.headers["x-source"] == "tinytrack"
    body = json.loads(hit.body)
    assert body == {**listed[0], "idempotency_key": hit.key}  # the conversion as /api/conversions shows it
    assert (body["status"], body["payout"], body["txid"], body["sub1"]) == ("pending", "4.20", "T-1", "s1")
    assert (row["state"], row["kind"], row["idempotency_key"]) == ("done", "json", hit.key)


async def test_json_retries_send_the_same_body_and_key_and_a_status_change_is_a_new_delivery(tmp_path):
    hook = Receiver([500, 503, 200]).start()
    try:
        async with tracker(tmp_path, FORWARD + json_toml(hook.url("/h"))) as (app, http):
            cid = await new_click(http, "crm")
            await convert(http, cid, expect="created", txid="T-2", status="pending")
            await arrived(hook, 3, timeout=15)
            await until(lambda: settled(app.config.storage.path, 1), timeout=15, what="the retries")
            hook.set_script([200])
            await convert(http, cid, expect="updated", txid="T-2", status="approved")
            await arrived(hook, 4)
            await until(lambda: settled(app.config.storage.path, 2), what="the second delivery")
    finally:
        hook.stop()
    first, second = hook.hits[:3], hook.hits[3]
    assert len({hit.body for hit in first}) == 1 and len({hit.key for hit in first}) == 1
    assert [json.loads(hit.body)["status"] for hit in (first[0], second)] == ["pending", "approved"]
    assert second.key != first[0].key


async def test_json_to_a_private_address_is_refused_unless_allowed(tmp_path, hook):
    forward = FORWARD.replace("allow_private = true", "allow_private = false")
    async with tracker(tmp_path, forward + json_toml(hook.url("/h"))) as (app, http):
        await convert(http, await new_click(http, "crm"), expect="created")
        [row] = await until(lambda: settled(app.config.storage.path, 1), what="the refusal")
    assert row["state"] == "failed" and "not a public address" in row["last_error"]
    assert hook.hits == []


# --- meta_capi ------------------------------------------------------------------


async def test_meta_gets_its_documented_body_field_by_field(tmp_path, meta):
    extra = FORWARD + meta_toml(meta.endpoint, test_event_code='"TEST4242"')
    async with tracker(tmp_path, extra) as (app, http):
        answer = await http.get(
            "/c/fb", params={"fbclid": "IwAR-fb-1", "uid": "user-7"}, headers={"user-agent": "Mozilla/5.0 (Meta test)"}
        )
        cid = answer.headers["location"].split("cid=")[1]
        await convert(http, cid, expect="created", txid="ORDER-9", payout="12.50", currency="EUR", event="purchase")
        await until(lambda: settled(app.config.storage.path, 1), what="the delivery")
        [row] = outbox(app.config.storage.path)
        [(ts, click_ms)] = sqlite3.connect(app.config.storage.path).execute("SELECT ts, click_ts FROM conversions")
    assert meta.problems == []
    [hit] = meta.hits
    assert (hit.method, hit.path, hit.query) == ("POST", "/v21.0/1234567890/events", "")  # no token in the URL
    [body] = meta.bodies
    assert body["access_token"] == META_TOKEN and body["test_event_code"] == "TEST4242"
    [event] = body["data"]
    assert event == {
        "event_name": "Purchase",
        "event_time": ts // 1000,
        "event_id": "ORDER-9",
        "action_source": "website",
        "event_source_url": "https://shop.example.com/offer/spring",  # the offer's page, no click id
        "user_data": {
            "fbc": f"fb.1.{click_ms}.IwAR-fb-1",
            "client_ip_address": "198.51.100.7",
            "client_user_agent": "Mozilla/5.0 (Meta test)",
            "external_id": hashlib.sha256(b"user-7").hexdigest(),
        },
        "custom_data": {"value": 12.5, "currency": "EUR"},
    }
    assert (row["state"], row["kind"], row["last_code"]) == ("done", "meta_capi", 200)
    assert hit.key == row["idempotency_key"]
    stored = json.loads(row["body"])
    # nothing secret nor personal waits in the outbox: the token, user_data and the test code are added per try
    assert set(stored) == {"data"} and stored["data"][0]["user_data"] == {}


async def test_meta_hears_mapped_events_once_never_a_rejection(tmp_path, meta):
    extra = FORWARD + meta_toml(meta.endpoint, statuses='["pending", "approved", "rejected"]')
    async with tracker(tmp_path, extra) as (app, http):
        cid = await new_click(http, "fb")
        await convert(http, cid, expect="created", event="signup")  # no txid: <click id>:<event>
        await convert(http, cid, expect="created", event="pageview")  # not in event_map: Meta never hears it
        await convert(http, cid, expect="created", txid="O-1", event="purchase", status="pending")
        await until(lambda: settled(app.config.storage.path, 2), what="two deliveries")
        await convert(http, cid, expect="updated", txid="O-1", event="purchase", status="approved")
        await until(lambda: settled(app.config.storage.path, 3), what="the approval")
        await convert(http, cid, expect="updated", txid="O-1", event="purchase", status="rejected")
        assert len(outbox(app.config.storage.path)) == 3  # no event for a rejection
    assert meta.problems == []
    assert [(e["event_name"], e["event_id"]) for e in meta.events] == [
        ("Lead", f"{cid}:signup"),
        ("Purchase", "O-1"),
        ("Purchase", "O-1"),  # pending, then approved: one event_id, so Meta counts it once
    ]


@pytest.mark.parametrize(
    ("mode", "state", "error"),
    [
        ("zero", "pending", "Meta answered 200 with events_received 0"),
        ("error", "failed", "Meta: Invalid parameter The event_time is too far in the past (code 100, error_subcode"),
        ("transient", "pending", "Meta: Please reduce the amount of data"),
        ("500", "pending", "Meta: An unknown error occurred (code 1"),
    ],
)
async def test_meta_success_is_events_received_and_its_error_is_kept(tmp_path, meta, mode, state, error):
    meta.mode = mode
    extra = FORWARD.replace("first_retry_seconds = 1", "first_retry_seconds = 60") + meta_toml(meta.endpoint)
    async with tracker(tmp_path, extra) as (app, http):
        await convert(http, await new_click(http, "fb"), expect="created", txid="Z-1", event="purchase")
        db = app.config.storage.path
        await until(lambda: outbox(db) and outbox(db)[0]["attempts"] == 1, what="the first try")
        [row] = outbox(db)
        [(code, kept)] = attempts(db, row["id"])
    assert row["state"] == state
    assert kept.startswith(error) and row["last_error"].startswith(error)
    assert code == (500 if mode == "500" else 400 if mode in ("error", "transient") else 200)
    assert "fbtrace_id" in kept or mode == "zero"


async def test_metas_answer_without_events_received_is_no_success():
    attempt = tinytrack.meta_answer(tinytrack.Attempt(200, body=b'{"fbtrace_id": "x"}'))
    assert tinytrack.next_step(attempt, 1, 10**15, 0, tinytrack.ForwardConfig())[0] == "pending"
    assert tinytrack.meta_answer(tinytrack.Attempt(200, body=b"not json")).error.startswith("Meta answered 200")
    done = tinytrack.meta_answer(tinytrack.Attempt(200, body=b'{"events_received": 1}'))
    assert tinytrack.next_step(done, 1, 10**15, 0, tinytrack.ForwardConfig())[0] == "done"
    for body in (b'{"events_received": true}', b'{"events_received": "1"}', b'{"events_received": 0}'):
        assert tinytrack.meta_answer(tinytrack.Attempt(200, body=body)).error is not None, body


async def test_a_wrong_token_is_failed_with_metas_message_and_no_secret_anywhere(tmp_path, meta, hook, caplog):
    """Every secret kind at once (a GET's token=, a json header, Meta's token), a
    failure of each kind, then every surface grepped: logs, /api/outbox, /admin,
    outbox list/show, and the database itself (a GET's URL aside: it is sent as is)."""
    caplog.set_level(logging.DEBUG, logger="tinytrack")
    meta.token = "another-token"  # Meta refuses ours: code 190
    get_hook = Receiver([500]).start()
    extra = (
        FORWARD
        + meta_toml(meta.endpoint)
        + json_toml(hook.url("/h"))
        + f"""
[campaigns.net]
url = "https://offer.example.com/n?cid={{click_id}}"
postback_url = "{get_hook.url("/pb")}?cid={{click_id}}&token={GET_SECRET}&api_key={GET_SECRET}"
"""
    )
    hook.set_script([401])
    config_path = write_config(tmp_path, extra=extra)
    try:
        async with tracker(tmp_path, extra) as (app, http):
            for campaign in ("fb", "crm", "net"):
                await convert(http, await new_click(http, campaign), expect="created", event="purchase")
            db = app.config.storage.path
            await until(lambda: len(outbox(db)) == 3 and all(r["attempts"] for r in outbox(db)), what="three tries")
            api = (await http.get("/api/outbox?since=2000-01-01", headers=ADMIN)).text
            page = (await http.get("/admin", headers=ADMIN)).text
    finally:
        get_hook.stop()
    rows = {row["kind"]: row for row in outbox(db)}
    assert rows["meta_capi"]["state"] == "failed"
    assert rows["meta_capi"]["last_error"].startswith("Meta: Invalid OAuth access token")
    assert rows["json"]["last_code"] == 401
    surfaces = {"log": caplog.text, "api": api, "admin": page, "db": db_dump(db)}
    for args in (("list",), *(("show", str(row["id"])) for row in rows.values())):
        done = cli("outbox", *args, "-c", str(config_path), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        surfaces[f"outbox {' '.join(args)}"] = done.stdout + done.stderr
    assert "token=***" in surfaces["outbox show 3"] and "api_key=***" in surfaces["api"]
    for name, text in surfaces.items():
        assert META_TOKEN not in text, name
        assert HOOK_SECRET not in text, name
        if name != "db":  # the outbox row keeps the URL it sends
            assert GET_SECRET not in text, name


async def test_replay_queues_json_and_meta_again_with_the_current_config(tmp_path, meta, hook):
    extra = FORWARD + meta_toml(meta.endpoint) + json_toml(hook.url("/h"))
    config_path = write_config(tmp_path, extra=extra)
    async with tracker(tmp_path, extra) as (app, http):
        await convert(http, await new_click(http, "fb"), expect="created", txid="R-1", event="purchase")
        await convert(http, await new_click(http, "crm"), expect="created", txid="R-2")
        await until(lambda: settled(app.config.storage.path, 2), what="two deliveries")
    replayed = cli("outbox", "replay", "--since", "2000-01-01", "-c", str(config_path), cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert "queued 2 deliveries" in replayed.stdout
    async with tracker(tmp_path, extra) as (app, http):
        await until(lambda: settled(app.config.storage.path, 4), what="the replays")
    assert [e["event_id"] for e in meta.events] == ["R-1", "R-1"]  # the same event: Meta dedupes it
    assert len(hook.hits) == 2 and hook.hits[0].body != hook.hits[1].body  # a new idempotency key


def test_capi_deliveries_pending_at_kill_9_are_each_delivered_once_with_their_event_id(tmp_path: Path):
    """Meta is down (500) for the first tries; the server is killed; after a restart
    with Meta up, each event arrives exactly once, with the event_id every try had."""
    meta = FakeMeta(META_TOKEN).start()
    meta.mode = "500"
    first = second = None
    db = tmp_path / "tinytrack.db"
    try:
        config_path = write_config(tmp_path, free_port(), FORWARD + meta_toml(meta.endpoint))
        first = Server(tmp_path, config_path, free_port()).start()
        with first.client() as http:
            for n in range(3):
                location = http.get("/c/fb", headers={"user-agent": "Mozilla/5.0"}).headers["location"]
                cid = location.split("cid=")[1]
                answer = http.get(
                    "/postback",
                    params={"click_id": cid, "txid": f"K-{n}", "event": "purchase", "token": POSTBACK_TOKEN},
                )
                assert answer.json()["status"] == "created", answer.text
        wait_until(lambda: len(meta.hits) >= 3, what="a failed first try of each")
        wait_until(lambda: all(row["attempts"] for row in outbox(db)), what="the tries recorded (and logged)")
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        logged = first.output()  # the failed tries are logged, Meta's error and all; never the token
        assert "Meta: An unknown error occurred" in logged and META_TOKEN not in logged
        assert {row["state"] for row in outbox(db)} == {"pending"}
        meta.mode = "ok"
        second = Server(tmp_path, config_path, free_port()).start()
        rows = wait_until(lambda: settled(db, 3), what="the deliveries after the restart")
        assert second.stop() == 0
    finally:
        kill(first, second)
        meta.stop()
    assert {row["state"] for row in rows} == {"done"}
    assert sorted(e["event_id"] for e in meta.events) == ["K-0", "K-1", "K-2"]  # each once
    tried = {}
    for body in meta.bodies:
        tried.setdefault(body["data"][0]["event_id"], set()).add(body["data"][0]["event_time"])
    assert set(tried) == {"K-0", "K-1", "K-2"} and all(len(times) == 1 for times in tried.values())
    assert meta.problems == []


def test_json_deliveries_pending_at_kill_9_are_each_delivered_once_with_their_key_and_body(tmp_path: Path):
    hook = Receiver([500]).start()
    first = second = None
    db = tmp_path / "tinytrack.db"
    try:
        config_path = write_config(tmp_path, free_port(), FORWARD + json_toml(hook.url("/h")))
        first = Server(tmp_path, config_path, free_port()).start()
        with first.client() as http:
            for n in range(2):
                cid = http.get("/c/crm", headers={"user-agent": "Mozilla/5.0"}).headers["location"].split("cid=")[1]
                answer = http.get("/postback", params={"click_id": cid, "txid": f"J-{n}", "token": POSTBACK_TOKEN})
                assert answer.json()["status"] == "created", answer.text
        hook.wait_for(2)
        wait_until(lambda: all(row["attempts"] for row in outbox(db)), what="the tries recorded (and logged)")
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        logged = first.output()
        assert "HTTP 500" in logged and HOOK_SECRET not in logged
        assert {row["state"] for row in outbox(db)} == {"pending"}
        hook.set_script([200])
        second = Server(tmp_path, config_path, free_port()).start()
        rows = wait_until(lambda: settled(db, 2), what="the deliveries after the restart")
        assert second.stop() == 0
    finally:
        kill(first, second)
        hook.stop()
    assert {row["state"] for row in rows} == {"done"}
    delivered = [hit for hit in hook.hits if hit.status == 200]
    assert sorted(json.loads(hit.body)["txid"] for hit in delivered) == ["J-0", "J-1"]  # each once
    for row in rows:  # every try of a delivery: its key, and the same body
        tries = [hit for hit in hook.hits if hit.key == row["idempotency_key"]]
        assert len(tries) >= 2 and len({hit.body for hit in tries}) == 1
        assert json.loads(tries[0].body)["idempotency_key"] == row["idempotency_key"]


# --- config ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("forward", "message"),
    [
        ('kind = "post"', "campaigns.x.forward.kind: must be one of get, json, meta_capi, got 'post'"),
        ('kind = "json"', "campaigns.x.forward.url: is required for kind json"),
        (
            'kind = "json"\nurl = "ftp://h.example/"',
            "campaigns.x.forward.url: must be an http(s) URL, got 'ftp://h.example/'",
        ),
        (
            'kind = "json"\nurl = "https://h.example/"\nheaders = { Host = "x" }',
            "campaigns.x.forward.headers.Host: is set by tinytrack itself",
        ),
        (
            'kind = "json"\nurl = "https://h.example/"\nheaders = { "Bad Name" = "x" }',
            "campaigns.x.forward.headers.Bad Name: is no HTTP header name (letters, digits and !#$%&'*+.^_`|~-)",
        ),
        *(
            (
                f'kind = "json"\nurl = "https://h.example/"\nheaders = {{ Authorization = "{value}" }}',
                "campaigns.x.forward.headers.Authorization: must be printable ASCII, not blank, no space at "
                "either end (its value is not shown)",
            )
            for value in ("Bearer s3cr3t\\r\\nX: y", "Bearer s3cr3t ", " Bearer s3cr3t", "Bearer s3cr3t\u00e9", "")
        ),
        (
            'kind = "json"\nurl = "https://h.example/"\nfallback_url = "https://f.example/"',
            "campaigns.x.forward.fallback_url: needs postback_url: it is where that one's deliveries go next",
        ),
        (
            'kind = "meta_capi"\npixel_id = "12ab"',
            "campaigns.x.forward.pixel_id: must be the pixel's (dataset's) id, digits, got '12ab'",
        ),
        (
            'kind = "meta_capi"\npixel_id = "123"\naccess_token = "has space s3cr3t"',
            "campaigns.x.forward.access_token: is required: the token of a system user (its value is not shown)",
        ),
        (
            'kind = "meta_capi"\npixel_id = "123"\naccess_token = "s3cr3t"',
            'campaigns.x.forward.event_map: is required: which events Meta hears, e.g. { purchase = "Purchase" }',
        ),
        (
            'kind = "meta_capi"\npixel_id = "123"\naccess_token = "s3cr3t"\nevent_map = { Purchase = "Purchase" }',
            "campaigns.x.forward.event_map.Purchase: must be an event as postbacks name it: [a-z0-9_]{1,32}",
        ),
        (
            'kind = "meta_capi"\npixel_id = "123"\naccess_token = "s3cr3t"\nevent_map = { a = "A" }\n'
            'endpoint = "https://graph.example/v21.0?x=1"',
            "campaigns.x.forward.endpoint: must be a base URL without a query, got 'https://graph.example/v21.0?x=1'",
        ),
        (
            'kind = "meta_capi"\npixel_id = "123"\naccess_token = "s3cr3t"\nevent_map = { a = "A" }\n'
            'action_source = "web"',
            "campaigns.x.forward.action_source: must be one of website, app, email, phone_call, chat, "
            "physical_store, system_generated, business_messaging, other",
        ),
        (
            'kind = "meta_capi"\npixel_id = "123"\naccess_token = 42',
            "campaigns.x.forward.access_token: must be a string, got an integer",
        ),
    ],
)
def test_bad_forward_kinds_name_the_key_and_never_a_secret(tmp_path, forward, message):
    extra = f'\n[campaigns.x]\nurl = "https://o.example/"\n[campaigns.x.forward]\n{forward}\n'
    with pytest.raises(tinytrack.ConfigError) as caught:
        tinytrack.load_config(write_config(tmp_path, extra=extra))
    assert str(caught.value) == message
    assert "s3cr3t" not in str(caught.value)


def test_the_config_example_and_readme_campaigns_load(tmp_path):
    extra = meta_toml("https://graph.facebook.com/v21.0") + json_toml("https://crm.example/hooks/conversion")
    config = tinytrack.load_config(write_config(tmp_path, extra=extra))
    fb, crm = config.campaigns["fb"].target, config.campaigns["crm"].target
    assert fb.url == "https://graph.facebook.com/v21.0/1234567890/events"
    assert crm.headers == (("Authorization", f"Bearer {HOOK_SECRET}"), ("X-Source", "tinytrack"))
    assert META_TOKEN in fb.secrets() and f"Bearer {HOOK_SECRET}" in crm.secrets()


# --- from review ----------------------------------------------------------------


async def test_a_reload_moves_pending_deliveries_to_the_new_url_with_the_new_secret(tmp_path):
    old_hook, new_hook = Receiver([500]).start(), Receiver([200]).start()
    extra = FORWARD + json_toml(old_hook.url("/h"))
    try:
        async with tracker(tmp_path, extra) as (app, http):
            await convert(http, await new_click(http, "crm"), expect="created")
            await arrived(old_hook, 1)
            path = write_config(
                tmp_path, extra=FORWARD + json_toml(new_hook.url("/moved")).replace(HOOK_SECRET, "rotated-secret-77")
            )
            assert app.reload(str(path))
            tried = len(old_hook.hits)
            [hit] = await arrived(new_hook, 1, timeout=15)
            [row] = await until(lambda: settled(app.config.storage.path, 1), what="the delivery")
            log = [
                url
                for (url,) in sqlite3.connect(path.parent / "tinytrack.db").execute("SELECT url FROM outbox_attempts")
            ]
    finally:
        old_hook.stop()
        new_hook.stop()
    assert hit.headers["authorization"] == "Bearer rotated-secret-77" and hit.path == "/moved"
    assert len(old_hook.hits) == tried and all(
        h.headers["authorization"] == f"Bearer {HOOK_SECRET}" for h in old_hook.hits
    )
    assert row["state"] == "done" and log[-1] == new_hook.url("/moved")


async def test_an_error_quoting_a_secret_is_stored_and_logged_without_it(tmp_path, hook, caplog):
    caplog.set_level(logging.DEBUG, logger="tinytrack")
    async with tracker(tmp_path, FORWARD + json_toml(hook.url("/h"))) as (app, http):

        async def send(url, key, timeout, allow_private, **request):
            raise tinytrack.h11.LocalProtocolError(f"Illegal header value {request['headers'][0][1]!r}")

        app.forwarder.send = send
        await convert(http, await new_click(http, "crm"), expect="created")
        [row] = await until(lambda: settled(app.config.storage.path, 1), what="the failure")
        dump = db_dump(app.config.storage.path)
    assert row["state"] == "failed" and "Illegal header value '***'" in row["last_error"]
    assert HOOK_SECRET not in dump and HOOK_SECRET not in caplog.text


async def test_forget_reaches_what_meta_is_sent_next(tmp_path, meta):
    meta.mode = "500"
    extra = FORWARD.replace("first_retry_seconds = 1", "first_retry_seconds = 2") + meta_toml(meta.endpoint)
    config_path = write_config(tmp_path, extra=extra)
    async with tracker(tmp_path, extra) as (app, http):
        answer = await http.get("/c/fb", params={"fbclid": "IwAR-gone", "uid": "alice"}, headers={"user-agent": "UA/1"})
        cid = answer.headers["location"].split("cid=")[1]
        await convert(http, cid, expect="created", txid="F-1", event="purchase")
        await until(lambda: len(meta.bodies) >= 1, what="a first try")
        forgot = cli("forget", "--user-id", "alice", "-c", str(config_path), cwd=tmp_path)
        assert forgot.returncode == 0, forgot.stderr
        meta.mode = "ok"
        await until(lambda: settled(app.config.storage.path, 1), timeout=15, what="the next try")
    first, last = meta.bodies[0]["data"][0]["user_data"], meta.bodies[-1]["data"][0]["user_data"]
    assert first["fbc"].endswith(".IwAR-gone") and first["client_user_agent"] == "UA/1" and "external_id" in first
    assert last == {}  # the click and its ids are gone: nothing of alice is sent
    assert "IwAR-gone" not in db_dump(app.config.storage.path)


async def test_replay_never_forwards_a_conversion_credited_to_a_touch(tmp_path, meta):
    extra = FORWARD + meta_toml(meta.endpoint) + '\n[attribution]\nmode = "priority"\n'
    config_path = write_config(tmp_path, extra=extra)
    async with tracker(tmp_path, extra) as (app, http):
        for user in ("u1", "u2"):
            touched = await http.post(
                "/touch",
                data={"user_id": user, "campaign": "fb"},
                headers={"authorization": f"Bearer {POSTBACK_TOKEN}"},
            )
            assert touched.status_code == 200, touched.text
            answer = await http.get("/postback", params={"user_id": user, "token": POSTBACK_TOKEN, "event": "purchase"})
            assert answer.json()["status"] == "created", answer.text
        assert outbox(app.config.storage.path) == []
    for flags in (("--dry-run",), ()):
        replayed = cli("outbox", "replay", "--since", "2000-01-01", *flags, "-c", str(config_path), cwd=tmp_path)
        assert replayed.returncode == 0, replayed.stderr
        assert "0 deliveries" in replayed.stdout
    assert outbox(tmp_path / "tinytrack.db") == []


def test_a_campaign_may_have_a_get_fallback_and_a_json_target(tmp_path):
    extra = json_toml("https://crm.example/h").replace(
        "[campaigns.crm.forward]",
        'postback_url = "https://source.example/pb?c={ext_id}"\n[campaigns.crm.forward]\n'
        'fallback_url = "https://backup.source.example/pb?c={ext_id}"',
    )
    campaign = tinytrack.load_config(write_config(tmp_path, extra=extra)).campaigns["crm"]
    assert campaign.fallback_url.source == "https://backup.source.example/pb?c={ext_id}"
    assert campaign.target.kind == "json"


def test_secret_looking_query_values_are_hidden_and_sub_ids_are_not():
    url = "https://s.example/pb?cid=1&token=T&api_key=K&access_token=A&X-Auth=H&keyword=shoes&author=me&design=blue"
    assert tinytrack.redact_url(url) == (
        "https://s.example/pb?cid=1&token=***&api_key=***&access_token=***&X-Auth=***&keyword=shoes&author=me&design=blue"
    )
    assert tinytrack.redact_query(b"sub1=fb&keyword=running+shoes&key=k") == "sub1=fb&keyword=running+shoes&key=***"
