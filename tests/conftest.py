"""Shared fixtures: a config on tmp_path, the app driven in-process through
httpx, and the real `tinytrack serve` process on a free port."""

from __future__ import annotations

import dataclasses
import datetime
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import tinytrack

POSTBACK_TOKEN = "pb-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"

CONFIG_TOML = """
[server]
host = "127.0.0.1"
port = {port}
trusted_proxies = ["127.0.0.1", "::1"]

[storage]
path = "{db}"
reserve_mb = 0  # no 8 MB reserve file per test; test_faults.py tests the reserve

[postback]
tokens = ["{token}"]
status_map = {{ sale = "approved", declined = "rejected", reversed = "rejected" }}

[admin]
token = "{admin}"

[campaigns.spring]
url = "https://offer.example.com/lp?cid={{click_id}}&s1={{sub1}}&x={{ext_id}}"

[campaigns.passing]
url = "https://offer.example.com/go#top"
pass_query = true

[campaigns.windowed]
url = "https://offer.example.com/w?c={{click_id}}"
window_days = 7
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(directory: Path, port: int = 8080, extra: str = "") -> Path:
    path = directory / "config.toml"
    db = directory / "tinytrack.db"
    path.write_text(CONFIG_TOML.format(port=port, db=db, token=POSTBACK_TOKEN, admin=ADMIN_TOKEN) + extra)
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def config(config_file: Path) -> tinytrack.Config:
    return tinytrack.load_config(config_file)


def at(day: str, hour: int = 12, minute: int = 0, second: float = 0) -> float:
    """Unix seconds of a UTC moment: at("2026-11-20", 9, 30)."""
    moment = datetime.datetime.fromisoformat(day).replace(hour=hour, minute=minute, tzinfo=datetime.UTC)
    return moment.timestamp() + second


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


def changed(config: tinytrack.Config, **changes: dict) -> tinytrack.Config:
    """The config with some sections' keys changed: changed(config, retention={"sub1_per_day": 3})."""
    for section, values in changes.items():
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})
    return config


@pytest.fixture
async def make_app(tmp_path: Path, clock: FakeClock):
    """Started apps on tmp_path's config (plus `extra` TOML, or section changes), all
    shut down after the test: ``app = await make_app(retention={"sub1_per_day": 3})``.
    ``config=`` gives a whole config instead; ``clock=None`` the real clock; ``rng=``
    the random source that picks landers and offers."""
    apps: list[tinytrack.TinyTrack] = []

    async def make(extra: str = "", *, config: tinytrack.Config | None = None, clock_=clock, rng=None, **changes: dict):
        base = config or tinytrack.load_config(write_config(tmp_path, extra=extra))
        app = tinytrack.create_app(changed(base, **changes), clock=clock_ or time.time, rng=rng or random.random)
        await app.startup()
        apps.append(app)
        return app

    yield make
    for app in reversed(apps):
        await app.shutdown()


def client_for(app: tinytrack.TinyTrack, address: str = "198.51.100.7") -> httpx.AsyncClient:
    """An in-process client of `app`, from `address`: ``async with client_for(app) as client``."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(address, 40000)), base_url="http://tracker.test"
    )


@pytest.fixture
async def app(make_app, config: tinytrack.Config):
    return await make_app(config=config)


@pytest.fixture
async def client(app: tinytrack.TinyTrack):
    transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://tracker.test") as http:
        yield http


async def new_click(client: httpx.AsyncClient, campaign: str = "spring", **params: str) -> str:
    """Make a click and return its id, read from the redirect."""
    answer = await client.get(f"/c/{campaign}", params=params, headers={"user-agent": "Mozilla/5.0"})
    assert answer.status_code == 302, answer.text
    return answer.headers["location"].split("cid=")[1].split("&")[0]


class Server:
    """A real `tinytrack serve` process."""

    def __init__(
        self, directory: Path, config_path: Path | None, port: int, env: dict | None = None, uds: Path | None = None
    ) -> None:
        self.directory, self.config_path, self.port, self.uds = directory, config_path, port, uds
        self.url = "http://tracker" if uds else f"http://127.0.0.1:{port}"
        self.log_path = directory / f"server-{port}.log"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, *extra: str) -> Server:
        listen = ["--uds", str(self.uds)] if self.uds else ["--port", str(self.port)]
        args = [sys.executable, "-m", "tinytrack", "serve", *listen, *extra]
        if self.config_path:
            args += ["-c", str(self.config_path)]
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            args, cwd=self.directory, stdout=self.log, stderr=subprocess.STDOUT, env=self.env
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}: {self.log_path.read_text()}")
            try:
                with self.client() as http:
                    if http.get("/healthz", timeout=1).status_code == 200:
                        return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log_path.read_text()}")

    def client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.uds)) if self.uds else None
        return httpx.Client(transport=transport, base_url=self.url)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    running = Server(tmp_path, write_config(tmp_path, port), port)
    running.start()
    yield running
    if running.process and running.process.poll() is None:
        running.stop(signal.SIGKILL)
