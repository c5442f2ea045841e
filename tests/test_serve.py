"""The real `tinytrack serve` process: unix socket, SIGHUP reload."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import POSTBACK_TOKEN, Server, free_port, write_config


def wait_for(predicate, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_unix_socket_mode_0660_and_the_proxy_address(tmp_path: Path):
    sock = tmp_path / "tt.sock"
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("[postback]\n", '[postback]\nallow_ips = ["203.0.113.0/24"]\n'))
    server = Server(tmp_path, config, 0, uds=sock).start()
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    with server.client() as http:
        click = http.get("/c/spring", headers={"x-forwarded-for": "198.51.100.1", "user-agent": "Mozilla/5.0"})
        cid = re.search(r"cid=([0-9a-f-]{36})", click.headers["location"]).group(1)
        # Over a socket the peer is the proxy: the right-most X-Forwarded-For entry is the client.
        spoofed = http.get(
            "/postback",
            params={"click_id": cid, "token": POSTBACK_TOKEN},
            headers={"x-forwarded-for": "203.0.113.5, 198.51.100.1"},
        )
        assert spoofed.status_code == 403
        allowed = http.get(
            "/postback",
            params={"click_id": cid, "token": POSTBACK_TOKEN},
            headers={"x-forwarded-for": "198.51.100.1, 203.0.113.5"},
        )
        assert allowed.json() == {"status": "created", "id": 1}
    assert server.stop() == 0
    assert not sock.exists()


def test_a_second_server_on_the_same_socket_is_refused(tmp_path: Path):
    sock = tmp_path / "tt.sock"
    config = write_config(tmp_path)
    first = Server(tmp_path, config, 0, uds=sock).start()
    second = subprocess.run(
        [sys.executable, "-m", "tinytrack", "serve", "-c", str(config), "--uds", str(sock)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert second.stderr == f"tinytrack: {sock}: another server is listening on it\n"
    with first.client() as http:
        assert http.get("/healthz").status_code == 200
    assert first.stop() == 0


def test_sighup_reloads_and_refuses_a_bad_config(tmp_path: Path):
    port = free_port()
    config = write_config(tmp_path, port)
    server = Server(tmp_path, config, port).start()
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/c/autumn").status_code == 404
        original = config.read_text()
        config.write_text(
            original.replace(f'tokens = ["{POSTBACK_TOKEN}"]', 'tokens = ["rotated-token-9876"]')
            + '\n[campaigns.autumn]\nurl = "https://autumn.example.com/?c={click_id}"\n'
        )
        os.kill(server.process.pid, signal.SIGHUP)
        assert wait_for(lambda: http.get("/c/autumn").status_code == 302)
        cid = re.search(r"c=([0-9a-f-]{36})", http.get("/c/autumn").headers["location"]).group(1)
        assert http.get("/postback", params={"click_id": cid, "token": POSTBACK_TOKEN}).status_code == 401
        assert http.get("/postback", params={"click_id": cid, "token": "rotated-token-9876"}).status_code == 200

        config.write_text('[campaigns.x]\nurl = "ftp://nope"\n')
        os.kill(server.process.pid, signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in server.output())
        assert http.get("/c/autumn").status_code == 302  # the old config still serves
    assert server.stop() == 0
    assert (
        "reload refused, keeping the running config: postback.tokens: must list at least one token" in server.output()
    )
