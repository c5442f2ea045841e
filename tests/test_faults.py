"""Faults (issue 12): a full disk that must recover by itself, /healthz that tells
the truth about writes, one log line for a failing disk, a read-only database at
start-up, a clock that steps back, and a WAL that stays small.

The disk-full test mounts a real 24 MB tmpfs (root, as CI runs); where mounting is
not allowed it skips and says why."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from contextlib import closing, suppress
from pathlib import Path

import httpx
import pytest
from conftest import POSTBACK_TOKEN, Server, client_for, free_port, new_click, write_config
from test_cli import run  # the `tinytrack` command in a folder

import tinytrack

UA = {"user-agent": "Mozilla/5.0"}


# --- /healthz and the log while writes fail (simulated) --------------------------------


@pytest.fixture
async def failing(app, monkeypatch):
    """Make every write fail as a full disk does, until the test clears the event.
    The background purge is stopped first: its writes would race the test's."""
    await app.purger.stop()  # and nothing it queued runs after this (Store.run)
    broken = threading.Event()
    broken.set()
    writer = app.store._db
    real_begin = writer.begin

    def begin(*args, **kw):  # every write (batches, jobs, the recovery probe) starts here
        if broken.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return real_begin(*args, **kw)

    monkeypatch.setattr(writer, "begin", begin)
    monkeypatch.setattr(tinytrack, "WRITE_RETRY_SECONDS", 0.05)
    monkeypatch.setattr(tinytrack, "WRITE_QUIET_SECONDS", 0.2)
    return broken


@pytest.mark.anyio
async def test_health_says_503_while_writes_fail_and_recovers_on_its_own(app, client, failing, caplog):
    healthy = await client.get("/healthz")
    assert healthy.status_code == 200 and healthy.json()["writes"] == "ok"
    with caplog.at_level(logging.INFO, logger="tinytrack"):
        answers = [await client.get("/c/spring", headers=UA) for _ in range(50)]
        assert [a.status_code for a in answers] == [503] * 50  # never a redirect for a click not stored
        assert answers[0].headers["retry-after"] == "1" and answers[0].text == "try again\n"
        cid_answer = await client.get(
            "/postback", params={"click_id": "00000000-0000-7000-8000-000000000000", "token": POSTBACK_TOKEN}
        )
        assert cid_answer.status_code == 503
        health = await client.get("/healthz")
        assert health.status_code == 503
        body = health.json()
        assert (body["ok"], body["writes"], body["error"]) == (False, "failing", "database or disk is full")
        assert body["failed_batches"] >= 51 and body["failing_since"]
        assert health.headers["cache-control"] == "no-store"
        failing.clear()  # space is freed; no request comes: the writer finds out by itself
        for _ in range(100):
            if (await client.get("/healthz")).status_code == 200:
                break
            await asyncio.sleep(0.02)
        assert (await client.get("/healthz")).json()["writes"] == "ok"
        assert (await client.get("/c/spring", headers=UA)).status_code == 302
        await asyncio.sleep(0.25)  # quiet for WRITE_QUIET_SECONDS: the next commit ends the episode in the log
        assert (await client.get("/c/spring", headers=UA)).status_code == 302
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.getMessage().startswith("postback 503")]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["writes are failing, answering 503 until one commits again: database or disk is full"]
    recovered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("writes recovered")]
    assert len(recovered) == 1 and re.fullmatch(
        r"writes recovered: 5[1-9] batches failed in [0-9.]+ s, none since 0 s", recovered[0]
    )


# --- A read-only or missing database at start-up ------------------------------------------


def test_a_database_that_cannot_be_opened_is_one_line_and_exit_1(tmp_path: Path):
    config = write_config(tmp_path, free_port())
    config.write_text(
        config.read_text().replace(str(tmp_path / "tinytrack.db"), str(tmp_path / "no-such-folder" / "t.db"))
    )
    done = run("serve", "-c", str(config), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == f"tinytrack: {tmp_path / 'no-such-folder' / 't.db'}: unable to open database file\n"


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A real small filesystem: a 24 MB tmpfs, unmounted afterwards."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(where)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN; CI runs as root): {mounted.stderr.strip()}"
        )
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_read_only_database_at_start_up_is_one_line_and_exit_1(tmp_path: Path, tmpfs: Path):
    db = tmpfs / "t.db"
    tinytrack.open_database(str(db)).close()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    config = write_config(tmp_path, free_port())
    config.write_text(config.read_text().replace(str(tmp_path / "tinytrack.db"), str(db)))
    done = run("serve", "-c", str(config), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"tinytrack: {db}: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr


# --- A full disk, for real -----------------------------------------------------------------


class ClickLoad:
    """Clicks in a thread at about `rate` a second, each with long sub ids (big rows),
    keeping every click id a 302 acknowledged."""

    def __init__(self, url: str, rate: float = 160) -> None:
        self.url, self.rate = url, rate
        self.acknowledged: list[str] = []
        self.answers: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            n = 0
            while not self._stop.is_set():
                n += 1
                try:
                    answer = http.get(
                        "/c/spring", params={"sub1": f"{n:08d}" + "s" * 240, "sub2": "t" * 250}, headers=UA
                    )
                except httpx.TransportError:
                    self.answers.append((time.monotonic(), 0))
                    time.sleep(0.05)
                    continue
                self.answers.append((time.monotonic(), answer.status_code))
                if answer.status_code == 302:
                    self.acknowledged.append(answer.headers["location"].split("cid=")[1].split("&")[0])
                time.sleep(1 / self.rate)

    def __enter__(self) -> ClickLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def wait_for(self, status: int, timeout: float, after: float | None = None) -> float | None:
        """When (monotonic) the first answer with `status` came after `after`."""
        after = time.monotonic() if after is None else after
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, code in list(self.answers):
                if at >= after and code == status:
                    return at
            time.sleep(0.05)
        return None


def fill(where: Path, name: str = "filler") -> Path:
    """Fill the filesystem to the last byte with one file."""
    filler = where / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 14, 1 << 10, 1):
            with suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def health(server: Server) -> tuple[int, dict]:
    with server.client() as http:
        answer = http.get("/healthz", timeout=5)
        return answer.status_code, answer.json()


def wait_health(server: Server, status: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, body = health(server)
        if code == status or time.monotonic() > deadline:
            assert code == status, body
            return body
        time.sleep(0.1)


def test_a_full_disk_recovers_by_itself_under_load_and_after_a_restart(tmp_path: Path, tmpfs: Path):
    port = free_port()
    config = write_config(tmp_path, port)
    db = tmpfs / "tinytrack.db"
    config.write_text(
        config.read_text().replace(str(tmp_path / "tinytrack.db"), str(db)).replace("reserve_mb = 0", "reserve_mb = 2")
    )
    server = Server(tmp_path, config, port).start()
    acknowledged: list[str] = []
    wal_sizes: list[int] = []
    try:
        assert (tmpfs / "tinytrack.db-reserve").stat().st_size == 2 << 20
        with ClickLoad(server.url) as load:
            time.sleep(1)
            # 1. The disk fills: answers turn to 503 (nothing unstored is acknowledged).
            filler = fill(tmpfs)
            assert load.wait_for(503, timeout=15), "the disk filled but clicks still got 302s"
            # The reserve is given back (and the WAL cut), so writes go on a while; fill that too.
            deadline = time.monotonic() + 5
            while (tmpfs / "tinytrack.db-reserve").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not (tmpfs / "tinytrack.db-reserve").exists()
            fill(tmpfs, "filler-b")
            body = wait_health(server, 503, timeout=15)
            assert body["writes"] == "failing"
            time.sleep(1)
            # 2. Space is freed (2 MB, less than the WAL once was): clicks come back by
            # themselves, and the WAL does not eat the space again.
            freed_at = time.monotonic()
            (tmpfs / "filler-b").unlink()
            with open(filler, "r+b") as f:
                f.truncate(filler.stat().st_size - (2 << 20))
            back = load.wait_for(302, timeout=10, after=freed_at)
            assert back, "clicks still failed 10 s after space was freed"
            wait_health(server, 200, timeout=5)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                with suppress(FileNotFoundError):
                    wal_sizes.append(os.stat(f"{db}-wal").st_size)
                time.sleep(0.1)
            recent = [code for at, code in load.answers if at > time.monotonic() - 1.5]
            assert recent and recent.count(302) / len(recent) > 0.9, recent[-20:]
            # 3. Full again, then killed while full; the filesystem grows by 40 MB; restarted under load.
            filler2 = fill(tmpfs, "filler2")
            assert load.wait_for(503, timeout=15)
            server.stop(signal.SIGKILL)
            subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)
            restarted_at = time.monotonic()
            server.start()
            assert load.wait_for(302, timeout=10, after=restarted_at), "no click stored after the restart"
            wait_health(server, 200, timeout=5)
            time.sleep(1)
            filler.unlink()
            filler2.unlink()
        acknowledged = load.acknowledged
        assert server.stop() == 0
    finally:
        if server.process and server.process.poll() is None:
            server.stop(signal.SIGKILL)
    # Every click answered 302 is in the database.
    with closing(sqlite3.connect(db)) as con:
        stored = {tinytrack.format_uuid(row[0]) for row in con.execute("SELECT id FROM clicks")}
    missing = [cid for cid in acknowledged if cid not in stored]
    assert not missing, f"{len(missing)} acknowledged clicks are not stored"
    assert max(wal_sizes) <= tinytrack.WAL_LIMIT_BYTES + (1 << 20), wal_sizes
    output = server.output()
    assert output.count("writes are failing") <= 3, output[-3000:]  # once per episode, not once per batch
    assert "Traceback" not in output


# --- The WAL stays small --------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_wal_stays_small_after_5000_large_clicks(make_app):
    app = await make_app(clock_=None)
    wal, largest = f"{app.config.storage.path}-wal", 0
    big = {f"sub{i}": "x" * 256 for i in range(1, 6)} | {"ext_id": "e" * 256}
    async with client_for(app) as client:
        for n in range(5000):  # one at a time: light load, a commit (and whole pages) per click
            answer = await client.get("/c/spring", params=big, headers={"user-agent": "M" * 512})
            assert answer.status_code == 302
            if n % 50 == 0:
                largest = max(largest, os.stat(wal).st_size)
    assert largest <= tinytrack.WAL_LIMIT_BYTES + (1 << 20), f"the WAL reached {largest / 1e6:.1f} MB"


# --- A clock that steps back ------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_clock_step_back_keeps_ids_in_order_and_conversions_after_their_click(make_app, clock):
    app = await make_app()
    async with client_for(app) as client:
        first = await new_click(client)
    await app.shutdown()
    clock.now -= 1800  # NTP steps the clock back half an hour; the server restarts meanwhile
    app = await make_app()
    async with client_for(app) as client:
        second = await new_click(client)
        answer = await client.get("/postback", params={"click_id": second, "token": POSTBACK_TOKEN})
        assert answer.json()["status"] == "created"
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        (first_ts,), (second_ts,) = con.execute("SELECT ts FROM clicks ORDER BY id").fetchall()
        [(conversion_ts, click_ts)] = con.execute("SELECT ts, click_ts FROM conversions").fetchall()
    assert second > first  # ids still sort in the order clicks came
    assert second_ts == first_ts  # the click's time holds at the last one seen until the clock catches up
    assert conversion_ts >= click_ts  # never dated before its click


def test_click_ids_resume_from_the_newest_stored():
    ids = tinytrack.ClickIds(clock=lambda: 1_800_000_000.0)
    later, _ = tinytrack.ClickIds(clock=lambda: 1_800_001_800.0).new()  # half an hour ahead: a small step back since
    ids.resume(later)
    following = [ids.new()[0] for _ in range(100)]
    assert following == sorted(following) and following[0] > later
    assert all(int.from_bytes(i[:6]) == 1_800_001_800_000 for i in following)
    # A stored id older than the clock changes nothing.
    fresh = tinytrack.ClickIds(clock=lambda: 1_900_000_000.0)
    fresh.resume(later)
    assert int.from_bytes(fresh.new()[0][:6]) == 1_900_000_000_000


def test_a_clock_that_was_ahead_is_not_followed_after_it_is_fixed():
    """One click stored while the clock read a year ahead (a VM before NTP) must not
    date every later click in the future, nor make correct postbacks 'before their click'."""
    now = 1_800_000_000.0
    ahead, _ = tinytrack.ClickIds(clock=lambda: now + 365 * 86400).new()
    ids = tinytrack.ClickIds(clock=lambda: now)
    ids.resume(ahead)  # a restart after the clock was fixed
    assert int.from_bytes(ids.new()[0][:6]) == int(now * 1000)
    # In one process: the clock jumps back two hours (it was wrong): ids follow it.
    clock = [now]
    moving = tinytrack.ClickIds(clock=lambda: clock[0])
    moving.new()
    clock[0] -= 7200
    assert int.from_bytes(moving.new()[0][:6]) == int(clock[0] * 1000)
    # A small step back is waited out: ids keep growing, at the last millisecond.
    clock[0] += 7200
    last, _ = moving.new()
    clock[0] -= 60
    assert moving.new()[0] > last and int.from_bytes(moving.new()[0][:6]) == int.from_bytes(last[:6])


@pytest.mark.anyio
async def test_a_reader_holding_the_wal_at_start_up_is_not_a_full_disk(make_app, caplog):
    app = await make_app()
    async with client_for(app) as client:
        for _ in range(20):
            await new_click(client)
    await app.shutdown()
    path = app.config.storage.path
    with closing(sqlite3.connect(path)) as writer, closing(sqlite3.connect(path)) as reader:
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("INSERT INTO meta VALUES ('x', 'y')")
        writer.commit()
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM clicks").fetchone()  # a backup or a report, mid-read
        writer.execute("INSERT INTO meta VALUES ('z', 'y')")  # WAL frames the reader pins
        writer.commit()
        with caplog.at_level(logging.INFO, logger="tinytrack"):
            app = await make_app()
        async with client_for(app) as client:
            health = await client.get("/healthz")
            assert (health.status_code, health.json()["writes"]) == (200, "ok")
        reader.rollback()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.anyio
async def test_the_reserve_is_given_back_whatever_filled_the_disk(make_app, monkeypatch):
    """The WAL is checkpointed every second, so at a full disk the checkpoint itself
    usually succeeds: the failing write is what gives the reserve back."""
    app = await make_app(storage={"reserve_mb": 1})
    reserve = Path(f"{app.config.storage.path}-reserve")
    assert reserve.stat().st_size == 1 << 20

    def full(*args, **kw):
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise error

    monkeypatch.setattr(app.store._db, "begin", full)
    async with client_for(app) as client:
        assert (await client.get("/c/spring", headers=UA)).status_code == 503
    assert not reserve.exists()
    monkeypatch.undo()


@pytest.mark.anyio
async def test_a_cancelled_callers_write_still_happens_unless_it_may_be_dropped(make_app):
    """A forward's result must be written even if its task is cut off at shutdown (the
    source has it); a stopped purge's batch not yet begun must not run."""
    app = await make_app()
    await app.purger.stop()
    release = threading.Event()
    ran: list[str] = []
    blocker = asyncio.ensure_future(app.store.write(lambda db, now_ms: release.wait(5)))  # the writer is busy
    await asyncio.sleep(0.05)
    kept = asyncio.ensure_future(app.store.write(lambda db, now_ms: ran.append("result")))
    dropped = asyncio.ensure_future(app.store.write(lambda db, now_ms: ran.append("purge"), droppable=True))
    await asyncio.sleep(0.05)
    kept.cancel()
    dropped.cancel()
    release.set()
    await blocker
    await app.store.write(lambda db, now_ms: None)  # everything queued before this is done
    assert ran == ["result"]
    for task in (kept, dropped):
        with pytest.raises(asyncio.CancelledError):
            await task
