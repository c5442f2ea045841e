"""tinytrack selftest (SPEC "Reconciliation and checks", issue 19): a real click, LP
click and postback through the running server, each stage checked in the database,
nothing left behind (no row, no total, no forward); exit 1 naming the failed stage."""

from __future__ import annotations

import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from conftest import Server, free_port, write_config
from test_cli import run

SPLIT = """
[forward]
allow_private = true

[campaigns.split]
offers = [{ name = "a", url = "https://a.example/?cid={click_id}" }]
landers = [{ name = "lp1", url = "https://lp.example/?cid={click_id}" }]
postback_url = "http://127.0.0.1:9/pb?cid={click_id}"
"""
TABLES = ("clicks", "conversions", "orphans", "outbox", "daily_clicks", "daily_conversions", "daily_funnel", "selftest")


def counts(db: Path) -> dict[str, int]:
    with closing(sqlite3.connect(db)) as con:
        return {table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}


@pytest.fixture
def served(tmp_path: Path):
    servers = []

    def start(extra: str = SPLIT, postback: str = "") -> tuple[Server, Path]:
        port = free_port()
        config = write_config(tmp_path, port, extra)
        config.write_text(config.read_text().replace("[postback]\n", f"[postback]\n{postback}"))
        servers.append(Server(tmp_path, config, port).start())
        return servers[-1], config

    yield start
    for server in servers:
        if server.process and server.process.poll() is None:
            server.stop(signal.SIGKILL)


def test_selftest_drives_every_stage_and_leaves_nothing_behind(served, tmp_path):
    server, config = served()
    done = run("selftest", "-c", str(config), "--campaign", "split", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
    assert done.stdout.startswith(f"ok: click, LP click, postback stored and checked through {server.url} in ")
    plain = run("selftest", "-c", str(config), "--campaign", "spring", cwd=tmp_path)  # no landers: no LP stage
    assert plain.stdout.startswith("ok: click, postback stored"), plain.stdout + plain.stderr
    assert server.stop() == 0
    assert counts(tmp_path / "tinytrack.db") == dict.fromkeys(TABLES, 0)  # kept out of stats and forwards


def test_selftest_names_the_stage_a_broken_server_drops(served, tmp_path):
    # A deliberately broken config: the server takes postbacks from one address only.
    server, config = served(postback='allow_ips = ["10.9.8.7"]\n')
    done = run("selftest", "-c", str(config), "--campaign", "split", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == 'tinytrack: selftest failed at postback: answered 403 {"error":"forbidden"}'
    assert server.stop() == 0
    assert counts(tmp_path / "tinytrack.db")["selftest"] == 0  # cleaned up even so
    down = run("selftest", "-c", str(config), cwd=tmp_path)
    assert down.returncode == 1 and down.stderr.startswith("tinytrack: selftest failed at healthz: no answer from")
    missing = run("selftest", "-c", str(config), "--campaign", "nope", cwd=tmp_path)
    assert missing.stderr.strip() == "tinytrack: selftest failed at config: no campaign 'nope'"


def test_a_wrong_selftest_key_is_an_ordinary_click(served, tmp_path):
    server, _ = served()
    with server.client() as http:
        answer = http.get(
            "/c/spring", params={"tinytrack_selftest": "guess", "sub1": "x"}, headers={"user-agent": "UA"}
        )
    assert answer.status_code == 302
    assert "tinytrack_selftest" not in answer.headers["location"]
    assert server.stop() == 0
    assert counts(tmp_path / "tinytrack.db")["clicks"] == 1
