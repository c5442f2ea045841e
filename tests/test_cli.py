"""The `tinytrack` command, including real `tinytrack serve` processes over TCP."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import POSTBACK_TOKEN, Server, free_port, write_config

import tinytrack


def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinytrack", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=30,
    )


def test_init_writes_a_private_valid_config_and_never_overwrites(tmp_path: Path):
    done = run("init", "my.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "my.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = tinytrack.load_config(path)
    assert len(config.postback.tokens[0]) >= 32
    before = path.read_text()
    again = run("init", "my.toml", cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr == "tinytrack: my.toml: already exists, not overwritten\n"
    assert path.read_text() == before


def test_check_ok_and_bad(tmp_path: Path):
    good = write_config(tmp_path)
    done = run("check", "-c", str(good), cwd=tmp_path)
    assert done.returncode == 0
    assert "3 campaigns" in done.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[postback]\ntokens = ["token-123456"]\n[campaigns.x]\nurl = "ftp://nope"\n')
    failed = run("check", "-c", str(bad), cwd=tmp_path)
    assert failed.returncode == 1
    assert failed.stderr == "tinytrack: campaigns.x.url: must be an http(s) URL, got 'ftp://nope'\n"
    assert "Traceback" not in failed.stderr


def test_check_reads_tinytrack_config(tmp_path: Path):
    bad = tmp_path / "env.toml"
    bad.write_text("[server]\nport = 0\n")
    failed = run("check", cwd=tmp_path, env={"TINYTRACK_CONFIG": str(bad)})
    assert failed.returncode == 1
    assert failed.stderr == "tinytrack: server.port: must be between 1 and 65535, got 0\n"


def test_serve_with_a_bad_config_exits_1_with_one_line(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[postback]\ntokens = ["token-123456"]\n[campaigns.x]\nurl = "https://{sub1}.evil.com/"\n')
    failed = run("serve", "-c", str(bad), cwd=tmp_path)
    assert failed.returncode == 1
    assert (
        failed.stderr
        == "tinytrack: campaigns.x.url: macros are only allowed after the host, got 'https://{sub1}.evil.com/'\n"
    )


def test_real_server_click_then_postback_then_sigterm_exits_0(server: Server):
    with httpx.Client(base_url=server.url) as http:
        click = http.get("/c/spring", params={"sub1": "fb"}, headers={"user-agent": "Mozilla/5.0"})
        assert click.status_code == 302
        cid = re.search(r"cid=([0-9a-f-]{36})", click.headers["location"]).group(1)
        answer = http.get("/postback", params={"click_id": cid, "payout": "2.5", "token": POSTBACK_TOKEN})
        assert answer.json() == {"status": "created", "id": 1}
        posted = http.post(
            "/postback", json={"clickid": cid, "amount": "2.5"}, headers={"authorization": f"Bearer {POSTBACK_TOKEN}"}
        )
        assert posted.json() == {"status": "duplicate", "id": 1}
    assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in server.output()
    assert POSTBACK_TOKEN not in server.output()


def test_embedded_default_serves_the_demo_and_prints_tokens_once(tmp_path: Path):
    port = free_port()
    first = Server(tmp_path, None, port).start()
    try:
        with httpx.Client(base_url=first.url) as http:
            click = http.get("/c/demo")
            assert click.status_code == 302
            page = http.get(click.headers["location"])
            assert page.status_code == 200
            cid = click.headers["location"].split("click_id=")[1]
            assert cid in page.text
            token = re.search(r"token=([A-Za-z0-9_-]+)", page.text).group(1)
            answer = http.get("/postback", params={"click_id": cid, "payout": "1.50", "token": token})
            assert answer.json() == {"status": "created", "id": 1}
    finally:
        assert first.stop() == 0
    assert (tmp_path / "tinytrack.db").exists()
    assert f"postback token:    {token}" in first.output()
    second = Server(tmp_path, None, port)
    second.log_path = tmp_path / "second.log"
    second.start()
    assert second.stop() == 0
    assert token not in second.output()


def test_access_log_redacts_tokens_and_masks_addresses(tmp_path: Path):
    port = free_port()
    config = write_config(tmp_path, port)
    config.write_text(
        config.read_text().replace(
            'trusted_proxies = ["127.0.0.1", "::1"]', 'trusted_proxies = ["127.0.0.1", "::1"]\naccess_log = true'
        )
    )
    server = Server(tmp_path, config, port).start()
    with httpx.Client(base_url=server.url) as http:
        click = http.get("/c/spring?sub1=fb", headers={"user-agent": "Mozilla/5.0", "x-forwarded-for": "203.0.113.77"})
        cid = re.search(r"cid=([0-9a-f-]{36})", click.headers["location"]).group(1)
        http.get(f"/postback?click_id={cid}&token={POSTBACK_TOKEN}")
        http.get(f"/postback?click_id={cid}&key=wrong-guess-123")
        http.post("/postback", json={"click_id": cid}, headers={"authorization": f"Bearer {POSTBACK_TOKEN}"})
    assert server.stop() == 0
    log = server.output()
    assert '203.0.113.0 "GET /c/spring?sub1=fb" 302' in log
    assert f'127.0.0.0 "GET /postback?click_id={cid}&token=***" 200' in log
    assert f'"GET /postback?click_id={cid}&key=***" 401' in log
    assert '"POST /postback" 200' in log
    for secret in (POSTBACK_TOKEN, "wrong-guess-123", "203.0.113.77"):
        assert secret not in log
