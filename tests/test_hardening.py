"""What a review found (issue 12), one test per finding: each failed before its fix.

Data loss (a reload during a purge), security (signed POSTs, surrogates, money
overflow, unbounded totals, secrets in errors, the demo page, CSV, SSRF, nginx's
log, slow clients, WebSockets), forwarding fairness, and a new user's traps. The
disk-full and clock faults are in test_faults.py."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import ipaddress
import logging
import re
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, Server, changed, client_for, free_port, new_click, write_config
from test_cli import run  # the `tinytrack` command in a folder
from test_retention import DAY, count, rows, seed_clicks, set_ms, start_ms, with_retention

import tinytrack

BEARER = {"authorization": f"Bearer {ADMIN_TOKEN}"}
UA = {"user-agent": "Mozilla/5.0"}
REPO = Path(__file__).resolve().parent.parent


async def postback(client: httpx.AsyncClient, **params: str) -> httpx.Response:
    return await client.get("/postback", params={"token": POSTBACK_TOKEN, **params})


# --- 1. A reload during a purge ----------------------------------------------------


@pytest.mark.anyio
async def test_a_reload_to_clicks_days_0_during_a_purge_deletes_nothing_more(app, client, clock):
    await app.purger.stop()
    now_ms = int(clock() * 1000)
    seed_clicks(app.config.storage.path, now_ms - 200 * DAY, 3000)  # expired (clicks_days = 90)
    for _ in range(10):
        await new_click(client)  # fresh
    clock.now += 1  # the purge runs a second later
    real_run, batches = app.store.write, []

    async def run_then_reload(func, rows: int = 1, **kw):
        result = await real_run(func, rows, **kw)
        batches.append(result)
        if len(batches) == 1:  # SIGHUP after the first batch: the operator sets 0 to stop the purge
            with_retention(app, clicks_days=0)
        return result

    app.store.write = run_then_reload
    done = await app.purger.run_once()
    assert count(app, "clicks") == 10, "the reload turned the cutoff into now"
    assert done["clicks"] == 3000  # the run finished on the config it started with
    # And the next run takes the new config: clicks_days = 0 keeps everything.
    app.store.write = real_run
    assert (await app.purger.run_once()).get("clicks") is None
    assert count(app, "clicks") == 10


def test_a_rule_whose_days_are_0_deletes_nothing_whoever_calls_it(tmp_path: Path):
    path = str(tmp_path / "t.db")
    with closing(tinytrack.open_database(path)) as con:
        seed_clicks(path, 1_700_000_000_000, 50)
        clicks_rule = next(rule for rule in tinytrack.PURGE_RULES if rule.name == "clicks")
        off = tinytrack.RetentionConfig(clicks_days=0)
        with con:
            con.execute("BEGIN IMMEDIATE")
            assert tinytrack.Database(con).purge_batch(clicks_rule, off, 1000, 1_800_000_000_000) == 0
    assert count(path, "clicks") == 50


# --- 2. A signed POST replayed with new query fields: see test_security's test_signed_postbacks.
# --- 3. Lone surrogates: see test_security's hostile table and its properties.


@pytest.mark.anyio
async def test_a_lone_surrogate_token_is_a_400_not_a_500(client):
    cid = await new_click(client)
    for body in (b'{"click_id":"%s","token":"\\ud800"}', b'{"click_id":"%s","token":"x\\udfffy","txid":"a"}'):
        answer = await client.post(
            "/postback", content=body % cid.encode(), headers={"content-type": "application/json"}
        )
        assert (answer.status_code, answer.json()) == (400, {"error": "token: is not valid Unicode (a lone surrogate)"})


# --- 4. Money overflow -----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_payout_above_the_cap_is_a_400(app, client):
    cid = await new_click(client)
    answer = await postback(client, click_id=cid, payout="999999999999.999999")
    assert (answer.status_code, answer.json()) == (
        400,
        {"error": "payout: must be at most 1000000000.00, got '999999999999.999999'"},
    )
    ok = await postback(client, click_id=cid, payout="1000000000")
    assert ok.json()["status"] == "created"
    assert rows(app, "SELECT payout FROM conversions") == [(10**15,)]


@pytest.mark.anyio
async def test_ten_max_payouts_then_reports_still_answer_exactly(app, client):
    cid = await new_click(client, sub1="z")
    for i in range(10):
        answer = await postback(client, click_id=cid, txid=f"T{i}", payout="1000000000")
        assert answer.json()["status"] == "created", answer.text
    stats = await client.get("/api/stats?by=sub1", headers=BEARER)
    assert stats.status_code == 200
    assert stats.json()["rows"][0]["payout"] == {"USD": "10000000000.00"}


@pytest.mark.anyio
async def test_a_daily_total_that_would_pass_64_bits_refuses_the_postback_that_would_do_it(app, client):
    cid = await new_click(client, sub1="z")
    day = int(app.clock() // 86400)
    # As if 9,223 max-payout conversions had come today: the total is 1e15 short of the limit.
    with closing(sqlite3.connect(app.config.storage.path)) as con, con:
        con.execute("UPDATE daily_conversions SET payout = 0")
        con.execute(
            "INSERT INTO daily_conversions (day, campaign, sub1, status, currency, conversions, payout) VALUES (?, 'spring', 'z', 'approved', 'USD', 9223, ?)",
            (day, 2**63 - 1 - 10**15 + 1),
        )
    answer = await postback(client, click_id=cid, txid="over", payout="1000000000")
    assert answer.status_code == 400
    assert answer.json() == {
        "error": f"payout: would take the {tinytrack.day_text(day)} total of campaign spring past 9223372036854.775807"
    }
    assert rows(app, "SELECT count(*) FROM conversions") == [(0,)]  # nothing stored
    assert (await postback(client, click_id=cid, txid="fits", payout="999999999.999999")).json()["status"] == "created"
    assert rows(app, "SELECT typeof(payout) FROM daily_conversions WHERE sub1 = 'z'") == [("integer",)]


@pytest.mark.anyio
async def test_reports_survive_totals_that_overflowed_before_the_cap(app, client, config_file, tmp_path):
    await new_click(client, sub1="z")
    day = int(app.clock() // 86400)
    with closing(sqlite3.connect(app.config.storage.path)) as con, con:
        # What ten 999999999999.999999 payouts left: sums past 2**63 (a REAL), and two
        # integer rows whose plain sum() raises "integer overflow".
        con.executemany(
            "INSERT INTO daily_conversions (day, campaign, sub1, status, currency, conversions, payout) VALUES (?, 'spring', ?, 'approved', ?, 10, ?)",
            [
                (day, "z", "USD", 9.999999999999999e18),
                (day, "y", "EUR", 9_000_000_000_000_000_000),
                (day - 1, "y", "EUR", 9_000_000_000_000_000_000),
            ],
        )
        con.executemany(  # and the quarter-hour totals, which by=campaign reads
            """INSERT INTO slot_conversions (slot, campaign, status, currency, conversions, payout, flagged, pixel_only)
               VALUES (?, 'spring', 'approved', ?, 10, ?, 0, 0)""",
            [
                (day * 96, "USD", 9.999999999999999e18),
                (day * 96 + 1, "EUR", 9_000_000_000_000_000_000),
                (day * 96 - 1, "EUR", 9_000_000_000_000_000_000),
            ],
        )
    stats = await client.get("/api/stats?by=campaign", headers=BEARER)
    assert stats.status_code == 200, stats.text
    [row] = stats.json()["rows"]
    assert row["payout"]["EUR"] == "18000000000000.00"  # exact: past 64 bits, summed in Python
    assert abs(Decimal(row["payout"]["USD"]) - Decimal("9999999999999.999999")) < Decimal(
        "0.01"
    )  # a REAL: as near as it holds
    assert (await client.get("/api/stats?by=sub1&format=csv", headers=BEARER)).status_code == 200
    by_sub1 = (await client.get("/api/stats?by=campaign,sub1", headers=BEARER)).json()["rows"]  # the daily totals
    assert [(r["sub1"], r["payout"].get("EUR")) for r in by_sub1] == [("y", "18000000000000.00"), ("z", None)]
    assert (await client.get("/admin", headers=BEARER)).status_code == 200
    done = run("stats", "-c", str(config_file), "--by", "day", cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


# --- 5. Unbounded totals from unauthenticated clicks ------------------------------------


CAPPED = {"retention": {"sub1_per_day": 3}}


@pytest.mark.anyio
async def test_sub1_beyond_sub1_per_day_are_totalled_as_other(make_app, clock):
    app = await make_app(**CAPPED)
    t = start_ms(clock, days_ago=2)
    set_ms(clock, t)
    ids = {}
    async with client_for(app) as client:
        for sub1 in ("a", "b", "a", "c", "d", "e", "d", "b"):
            ids[sub1] = await new_click(client, sub1=sub1)
        other_campaign = await client.get("/c/passing", params={"sub1": "x"}, headers=UA)
        assert other_campaign.status_code == 302  # counted apart
        day = t // DAY
        assert rows(app, "SELECT campaign, sub1, clicks FROM daily_clicks WHERE day = ? ORDER BY 1, 2", (day,)) == [
            ("passing", "x", 1),
            ("spring", "(other)", 3),
            ("spring", "a", 2),
            ("spring", "b", 2),
            ("spring", "c", 1),
        ]
        assert count(app, "clicks") == 9  # the raw clicks keep their own sub1
        # A conversion on a folded click is totalled under (other) too, on any day.
        set_ms(clock, t + DAY)
        for click, params, status in [
            ("d", {"payout": "2"}, "created"),
            ("a", {"payout": "1"}, "created"),
            ("e", {"payout": "3", "status": "pending"}, "created"),
            ("e", {"status": "approved"}, "updated"),
        ]:
            assert (await postback(client, click_id=ids[click], **params)).json()["status"] == status
        report = await client.get(f"/api/stats?by=sub1&from={tinytrack.day_text(day)}", headers=BEARER)
        by_sub1 = {r["sub1"]: (r["clicks"], r["approved"], r["payout"]) for r in report.json()["rows"]}
        assert by_sub1 == {
            "(other)": (3, 2, {"USD": "5.00"}),
            "a": (2, 1, {"USD": "1.00"}),
            "b": (2, 0, {}),
            "c": (1, 0, {}),
            "x": (1, 0, {}),
        }
        # A new day starts a new count; a restart reads the day's rows again.
        set_ms(clock, t + DAY + 1000)
        await new_click(client, sub1="e")
    spring_day2 = "SELECT sub1, clicks FROM daily_clicks WHERE day = ? AND campaign = 'spring' ORDER BY 1"
    assert rows(app, spring_day2, (day + 1,)) == [("e", 1)]
    await app.shutdown()
    app = await make_app(**CAPPED)
    set_ms(clock, t + DAY + 2000)
    async with client_for(app) as client:
        for sub1 in ("f", "g", "h", "e", "a"):
            await new_click(client, sub1=sub1)
    assert rows(app, spring_day2, (day + 1,)) == [("(other)", 2), ("e", 2), ("f", 1), ("g", 1)]


@pytest.mark.anyio
async def test_a_conversion_follows_its_clicks_other_after_the_cap_is_raised(make_app):
    app = await make_app(**CAPPED)
    async with client_for(app) as client:
        for sub1 in ("s0", "s1", "s2"):
            await new_click(client, sub1=sub1)
        folded = await new_click(client, sub1="s3")  # past the cap of 3: (other)
        app.apply_config(changed(app.config, retention={"sub1_per_day": 10}))
        await new_click(client, sub1="s3")  # now s3 has a row of its own
        assert (await postback(client, click_id=folded, payout="5")).json()["status"] == "created"
    assert rows(app, "SELECT sub1, clicks FROM daily_clicks ORDER BY 1") == [
        ("(other)", 1),
        ("s0", 1),
        ("s1", 1),
        ("s2", 1),
        ("s3", 1),
    ]
    assert rows(app, "SELECT sub1, payout FROM daily_conversions") == [("(other)", 5_000_000)]


def test_sub1_per_day_is_a_retention_key():
    config = tinytrack.build_config({"postback": {"tokens": [POSTBACK_TOKEN]}, "retention": {"sub1_per_day": 50}})
    assert config.retention.sub1_per_day == 50
    assert tinytrack.RetentionConfig().sub1_per_day == 1000
    with pytest.raises(tinytrack.ConfigError, match=r"^retention.sub1_per_day: must be between 1 and"):
        tinytrack.build_config({"postback": {"tokens": [POSTBACK_TOKEN]}, "retention": {"sub1_per_day": 0}})


# --- 6. Secrets in config errors --------------------------------------------------------

SECRET = "SECRET-value-123456"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"postback": {"tokens": SECRET}}, "postback.tokens: must be a list, got a string"),
        (
            {"postback": {"tokens": [POSTBACK_TOKEN], "hmac_secrets": SECRET}},
            "postback.hmac_secrets: must be a list, got a string",
        ),
        (
            {"postback": {"tokens": [POSTBACK_TOKEN], "hmac_secrets": [7, SECRET]}},
            "postback.hmac_secrets[0]: must be a string, got an integer",
        ),
        (
            {"postback": {"tokens": [POSTBACK_TOKEN]}, "admin": {"token": [SECRET]}},
            "admin.token: must be a string, got a list",
        ),
        (
            {"postback": {"tokens": [SECRET + " x"]}},
            "postback.tokens[0]: must be 8-128 characters of A-Z a-z 0-9 . _ ~ -",
        ),
    ],
)
def test_a_config_error_about_a_secret_never_shows_it(data, message):
    with pytest.raises(tinytrack.ConfigError) as caught:
        tinytrack.build_config(data)
    assert str(caught.value) == message
    assert SECRET not in str(caught.value)


def test_check_and_a_refused_reload_never_print_a_secret(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text(f'[postback]\ntokens = "{SECRET}"\n')
    done = run("check", "-c", str(path), cwd=tmp_path)
    assert (done.returncode, done.stderr) == (1, "tinytrack: postback.tokens: must be a list, got a string\n")
    app = tinytrack.create_app(tinytrack.load_config(write_config(tmp_path)))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tinytrack.log.addHandler(handler)
    try:
        assert app.reload(str(path)) is False
    finally:
        tinytrack.log.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "reload refused, keeping the running config: postback.tokens: must be a list, got a string"
    ]


# --- 7. The demo page and DNS rebinding --------------------------------------------------


@pytest.fixture
async def demo_app(make_app, tmp_path: Path):
    config = tinytrack.embedded_config("127.0.0.1", 8080, POSTBACK_TOKEN, ADMIN_TOKEN)
    return await make_app(
        config=dataclasses.replace(config, storage=tinytrack.StorageConfig(path=str(tmp_path / "demo.db")))
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    "host, shown",
    [
        ("127.0.0.1:8080", True),
        ("localhost:8080", True),
        ("[::1]:8080", True),
        ("LOCALHOST", True),
        ("rebind.evil.example:8080", False),
        ("127.0.0.1.evil.example", False),
        ("10.0.0.7:8080", False),
    ],
)
async def test_the_demo_shows_the_token_only_to_a_loopback_host(demo_app, host, shown):
    transport = httpx.ASGITransport(app=demo_app, client=("127.0.0.1", 40000))  # a loopback peer, whatever the name
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        cid = (await client.get("/c/demo")).headers["location"].split("click_id=")[1]
        page = await client.get(f"/demo?click_id={cid}", headers={"host": host})
    assert page.status_code == 200
    assert (POSTBACK_TOKEN in page.text) is shown
    assert ("YOUR_POSTBACK_TOKEN" in page.text) is not shown


@pytest.mark.anyio
async def test_the_demo_quotes_the_host_for_the_shell(demo_app):
    transport = httpx.ASGITransport(app=demo_app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        cid = (await client.get("/c/demo")).headers["location"].split("click_id=")[1]
        page = await client.get(f"/demo?click_id={cid}", headers={"host": "x';touch /tmp/pwned;'"})
    assert page.status_code == 200
    import html as html_

    text = html_.unescape(page.text)
    assert "touch /tmp/pwned" not in text
    assert "curl 'http://YOUR_TRACKER/postback?click_id=" in text


# --- 8. CSV: formulas after a separator --------------------------------------------------


@pytest.mark.parametrize(
    "cell, written",
    [
        ("zone7;=1+2", "'zone7;=1+2"),
        ("a|@SUM(1)", "'a|@SUM(1)"),
        ("x\t+1", "'x\t+1"),
        ("=1", "'=1"),
        ("-2", "'-2"),
        ("zone7", "zone7"),
        ("a=b", "a=b"),
        ("5-3", "5-3"),
        ("me@example.com", "me@example.com"),
    ],
)
def test_csv_defuses_formulas_after_any_separator_and_quotes_text(cell, written):
    text = tinytrack.csv_text(["sub1", "n"], [[cell, 3]])
    assert list(csv.reader(io.StringIO(text))) == [["sub1", "n"], [written, "3"]]
    line = text.splitlines()[1]
    assert line.startswith('"')  # quoted: a spreadsheet splitting on ; keeps the cell whole
    for delimiter in ";|\t":  # as a spreadsheet set to another delimiter reads it
        for cell_seen in next(csv.reader(io.StringIO(line), delimiter=delimiter)):
            assert not re.match(r"\s*[=+\-@]", cell_seen), (delimiter, cell_seen)


# --- 9. Smaller findings -----------------------------------------------------------------


@pytest.mark.parametrize("address", ["::ffff:0:7f00:1", "::ffff:0:a00:1", "::ffff:0:0:0", "fec0::1", "feff::1"])
def test_siit_and_site_local_addresses_are_not_public(address):
    assert not tinytrack.is_public(ipaddress.ip_address(address))


def test_nginx_logs_no_query_but_for_clicks_whatever_the_case():
    conf = (REPO / "nginx" / "tinytrack.conf").read_text()
    block = conf[conf.index("map $uri $tinytrack_logged_args") :]
    block = block[: block.index("}")]
    entries = re.findall(r"^\s+(\S+)\s+(\S+);", block, re.M)
    assert entries == [("~^/c/", "$is_args$args"), ("default", '""')]


def test_the_unit_raises_the_open_files_limit():
    unit = (REPO / "systemd" / "tinytrack.service").read_text()
    limits = re.findall(r"^LimitNOFILE=(\d+)$", unit, re.M)
    assert limits and int(limits[0]) >= 8192


@pytest.fixture
def slow_server(tmp_path: Path):
    port = free_port()
    path = write_config(tmp_path, port)
    path.write_text(path.read_text().replace("[server]\n", "[server]\nread_timeout_seconds = 1\n", 1))
    server = Server(tmp_path, path, port).start()
    yield server
    server.stop()


def test_slow_headers_are_cut_off_without_nginx(slow_server: Server):
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /c/spring HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for _ in range(12):  # a header byte every 0.4 s: each arrives well inside any idle timeout
            time.sleep(0.4)
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
                break
            sock.settimeout(0.01)
            try:
                if sock.recv(100) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        took = time.monotonic() - started
    assert closed and took < 3, f"still open after {took:.1f} s"
    with slow_server.client() as http:  # and the server still serves
        assert http.get("/c/spring").status_code == 302


def test_a_slow_body_is_a_408(slow_server: Server):
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=5) as sock:
        sock.sendall(
            b'POST /postback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n{"click'
        )
        started = time.monotonic()
        answer = b""
        while not answer.endswith(b"}") and time.monotonic() - started < 5:
            chunk = sock.recv(1000)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'{"error":"body: not received within 1 s"}' in answer
    assert time.monotonic() - started < 3


def test_websocket_attempts_and_pipelined_closes_log_no_secret_and_no_traceback(tmp_path: Path):
    port = free_port()
    server = Server(tmp_path, write_config(tmp_path, port), port).start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"GET /postback?key=WS-SECRET-0123456789 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            assert sock.recv(1000).startswith(b"HTTP/1.1 401 ")  # an HTTP postback with a wrong key, not a WebSocket
        for _ in range(5):  # twenty pipelined clicks, and the client goes away at once
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /c/spring HTTP/1.1\r\nHost: x\r\nUser-Agent: Mozilla/5.0\r\n\r\n" * 20)
        time.sleep(0.5)
        with server.client() as http:
            assert http.get("/c/spring").status_code == 302
    finally:
        assert server.stop() == 0
    output = server.output()
    assert "WS-SECRET" not in output
    assert "Unsupported upgrade" not in output and "WebSocket library" not in output  # lines anyone could make
    assert "Traceback" not in output and "RuntimeError" not in output, output


# --- 12. One hanging forward target ------------------------------------------------------


@pytest.mark.anyio
async def test_a_hanging_target_cannot_hold_every_delivery_slot(make_app):
    extra = """
[forward]
allow_private = true
[campaigns.hangs]
url = "https://offer.example.com/h?cid={click_id}"
postback_url = "http://hangs.example/pb?c={click_id}"
[campaigns.healthy]
url = "https://offer.example.com/k?cid={click_id}"
postback_url = "http://healthy.example/pb?c={click_id}"
"""
    app = await make_app(extra, clock_=None)
    hanging, delivered = asyncio.Event(), []

    async def send(url: str, key: str, timeout: float, allow_private: bool) -> tinytrack.Attempt:
        if "hangs.example" in url:
            await hanging.wait()  # until the test ends: a source that never answers
        delivered.append(url)
        return tinytrack.Attempt(200)

    app.forwarder.send = send
    async with client_for(app) as client:
        for campaign, n in (("hangs", 40), ("healthy", 5)):
            for _ in range(n):
                assert (await postback(client, click_id=await new_click(client, campaign))).json()[
                    "status"
                ] == "created"
    for _ in range(200):
        if len(delivered) == 5:
            break
        await asyncio.sleep(0.02)
    assert len(delivered) == 5, "healthy deliveries waited behind a hanging target"
    for _ in range(200):  # a delivered one leaves the slots once its try is recorded (a write)
        if len(app.forwarder._inflight) <= tinytrack.FORWARD_PER_HOST:
            break
        await asyncio.sleep(0.02)
    assert len(app.forwarder._inflight) == tinytrack.FORWARD_PER_HOST  # the hanging host holds only its share
    hanging.set()


# --- 14, 17, 18. A new user's traps: the config file found, one-line errors, tokens --------


def test_serve_and_the_commands_use_config_toml_in_the_folder(tmp_path: Path):
    port = free_port()
    write_config(tmp_path, port)  # ./config.toml, naming ./tinytrack.db
    checked = run("check", cwd=tmp_path)
    assert checked.returncode == 0
    assert checked.stderr == "tinytrack: using ./config.toml (-c FILE chooses another)\n"
    assert checked.stdout.startswith("ok: config.toml: 3 campaigns")
    server = Server(tmp_path, None, port).start()  # no -c
    try:
        with server.client() as http:
            assert http.get("/c/spring", headers=UA).status_code == 302  # a real campaign, not the demo
            assert http.get("/c/demo").status_code == 404
    finally:
        server.stop()
    assert "using ./config.toml" in server.output()
    assert "postback token" not in server.output()
    stats = run("stats", "--json", cwd=tmp_path)
    assert stats.returncode == 0 and '"campaign": "spring"' in stats.stdout, stats.stderr


def test_the_demo_refuses_a_database_that_holds_other_campaigns(tmp_path: Path):
    with closing(tinytrack.open_database(str(tmp_path / "tinytrack.db"))) as con, con:
        tinytrack.Database(con).insert_clicks(
            [
                tinytrack.ClickRow(
                    bytes(16), 1_790_000_000_000, "spring", None, None, None, None, None, None, "", "", 0, None, None
                )
            ]
        )
    done = run("serve", "--port", str(free_port()), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == (
        "tinytrack: ./tinytrack.db holds clicks of campaigns other than the demo (spring): "
        "give its config with -c FILE\n"
    )
    assert "token" not in done.stdout


def test_tokens_shows_the_embedded_defaults_tokens_again(tmp_path: Path):
    with closing(tinytrack.open_database(str(tmp_path / "tinytrack.db"))) as con, con:
        postback_token, _ = tinytrack.Database(con).meta_token("postback_token")
        admin_token, _ = tinytrack.Database(con).meta_token("admin_token")
    done = run("tokens", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, f"postback token:  {postback_token}\nadmin token:     {admin_token}\n")
    (tmp_path / "config.toml").write_text(f'[postback]\ntokens = ["{POSTBACK_TOKEN}"]\n')
    with_config = run("tokens", cwd=tmp_path)
    assert with_config.returncode == 0 and POSTBACK_TOKEN not in with_config.stdout
    assert "config.toml: the tokens are in that file" in with_config.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run("tokens", cwd=empty)
    assert (missing.returncode, missing.stderr) == (
        1,
        "tinytrack: ./tinytrack.db: no database here yet (`tinytrack serve` makes it and its tokens)\n",
    )


def test_every_address_the_host_names_is_listened_on():
    port = free_port()
    sockets = tinytrack.bind_tcp_sockets("localhost", port)
    try:
        names = {info[4][:2] for info in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)}
        assert {sock.getsockname()[:2] for sock in sockets} == names
        for address in names:  # each one takes connections
            with socket.create_connection(address, timeout=2):
                pass
    finally:
        for sock in sockets:
            sock.close()


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run("serve", "-c", str(write_config(tmp_path, port)), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == f"tinytrack: 127.0.0.1:{port}: Address already in use\n"
    assert " ready on " not in done.stdout + done.stderr


def test_outbox_list_into_a_closed_pipe_is_quiet(tmp_path: Path):
    path = write_config(tmp_path)
    db = str(tmp_path / "tinytrack.db")
    with closing(tinytrack.open_database(db)) as con, con:
        con.executemany(
            "INSERT INTO outbox (conversion_id, campaign, status, url, idempotency_key, state, created_at, next_at, deadline)"
            " VALUES (?, 'spring', 'approved', 'https://x.example/', ?, 'done', 0, 0, 0)",
            [(i, f"k{i}") for i in range(3000)],
        )
    listing = subprocess.Popen(
        [sys.executable, "-m", "tinytrack", "outbox", "list", "--limit", "3000", "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    head = subprocess.run(["head", "-3"], stdin=listing.stdout, capture_output=True, timeout=30)
    listing.stdout.close()
    stderr = listing.stderr.read().decode()
    assert listing.wait(30) == 0
    assert len(head.stdout.splitlines()) == 3
    assert stderr == ""


def test_a_misspelt_section_is_reported_before_what_it_left_out():
    with pytest.raises(tinytrack.ConfigError) as caught:
        tinytrack.build_config({"postbacks": {"tokens": [POSTBACK_TOKEN]}})
    assert (
        str(caught.value)
        == "postbacks: unknown section; known: server, storage, postback, admin, retention, forward, money, fraud, attribution, pixel, alerts, geo, campaigns"
    )


# --- 15. A log line per postback -----------------------------------------------------------


@pytest.mark.anyio
async def test_every_postback_is_logged_once_without_its_token(app, client, caplog):
    cid = await new_click(client)
    with caplog.at_level(logging.INFO, logger="tinytrack"):
        await postback(client, click_id=cid, txid="A", payout="1")
        await postback(client, click_id=cid, txid="A", payout="1")
        await postback(client, click_id=cid, txid="A", status="rejected")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("postback ")]
    assert [line.split(" click=")[0] for line in lines] == [
        "postback created id=1 campaign=spring",
        "postback duplicate id=1 campaign=spring",
        "postback updated id=1 campaign=spring",
    ]
    assert all(POSTBACK_TOKEN not in line and "198.51.100.7" not in line for line in lines)


@pytest.mark.anyio
async def test_log_postbacks_false_keeps_only_what_was_not_counted(app, client, caplog):
    app.apply_config(
        dataclasses.replace(app.config, server=dataclasses.replace(app.config.server, log_postbacks=False))
    )
    cid = await new_click(client)
    with caplog.at_level(logging.INFO, logger="tinytrack"):
        await postback(client, click_id=cid, txid="A")
        await postback(client, click_id="0" * 8 + cid[8:], txid="A")
    assert [r.getMessage().split(" click=")[0] for r in caplog.records if r.getMessage().startswith("postback ")] == [
        "postback orphan id=None campaign=None"
    ]


# --- 16. /admin: retrying deliveries and revenue ----------------------------------------------


@pytest.mark.anyio
async def test_admin_shows_retrying_deliveries_and_revenue(app, client):
    cid = await new_click(client)
    await postback(client, click_id=cid, txid="A", payout="12.5")
    await postback(client, click_id=cid, txid="B", payout="0.25", currency="EUR")
    with closing(sqlite3.connect(app.config.storage.path)) as con, con:
        con.execute("""INSERT INTO outbox (conversion_id, campaign, status, url, idempotency_key, state, attempts, created_at,
                       next_at, deadline, last_at, last_code, last_error)
                       VALUES (1, 'spring', 'approved', 'https://x.example/', 'k', 'pending', 2, 0, 0, 0, 0, 502, 'HTTP 502')""")
    page = (await client.get("/admin", headers=BEARER)).text
    assert "Nothing failed" not in page
    assert '<td data-label="state">retrying</td><td data-label="tries">2</td>' in page and "HTTP 502" in page
    assert "<div><span>Revenue</span><b><span>0.25 EUR</span> <span>12.50 USD</span></b></div>" in page


# --- 19. A postback dated before its click -------------------------------------------------


@pytest.mark.anyio
async def test_a_postback_dated_before_its_click(app, client, clock):
    cid = await new_click(client)
    click_ms = rows(app, "SELECT ts FROM clicks")[0][0]
    long_before = (click_ms - 3 * DAY) // 1000
    answer = await postback(client, click_id=cid, txid="old", ts=str(long_before))
    assert answer.status_code == 400
    assert answer.json() == {
        "error": f"ts: is before its click ({tinytrack.iso_ms(click_ms)}), got {tinytrack.iso_ms(long_before * 1000)}"
    }
    assert count(app, "conversions") == 0
    # Minutes before is clock skew: dated at the click, never before it.
    skewed = await postback(client, click_id=cid, txid="skew", ts=str(click_ms // 1000 - 120))
    assert skewed.json()["status"] == "created"
    assert rows(app, "SELECT ts FROM conversions") == [(click_ms,)]


# --- 20. no-store on every answer -----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/api/stats"),
        ("GET", "/api/conversions"),
        ("GET", "/metrics"),
        ("GET", "/admin"),
        ("GET", "/nope"),
        ("POST", "/healthz"),
        ("GET", "/"),
        ("GET", "/healthz"),
        ("GET", "/c/nope"),
        ("GET", "/postback"),
    ],
)
async def test_every_answer_says_no_store(client, method, path):
    answer = await client.request(method, path)
    assert answer.headers.get("cache-control") == "no-store", (answer.status_code, dict(answer.headers))


def test_the_embedded_default_with_its_port_taken_makes_and_prints_nothing(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run("serve", "--port", str(port), cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"tinytrack: 127.0.0.1:{port}: Address already in use\n"
    assert not (tmp_path / "tinytrack.db").exists()
