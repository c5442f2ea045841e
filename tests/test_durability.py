"""Durability under kill -9 (issue 3).

A real `tinytrack serve` process takes concurrent clicks and postbacks (some of
them duplicated, some sent twice at once) over TCP; at a random moment it is
killed with SIGKILL, in-flight requests just fail. It is restarted on the same
database file, and then:

- every acknowledged click (a 302 that reached us) is known: a postback with a
  fresh txid is ``created``;
- every acknowledged conversion (a 200 that reached us) replays as
  ``{"status": "duplicate", "id": <the same id>}``;
- after a clean stop, ``PRAGMA integrity_check`` is ``ok``.

The kill time and the workload come from a seeded random per round. The seed is
printed (shown by pytest on failure, or with ``-s``), and is in every assertion
message; ``TINYTRACK_DURABILITY_SEED=<n>`` replays a run's choices (not its
timing, which no test controls). The checks never depend on timing: whatever was
acknowledged before the kill, however much that is, must survive it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import re
import secrets
import signal
import sqlite3
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from conftest import POSTBACK_TOKEN, Server, free_port, write_config

ROUNDS = int(os.environ.get("TINYTRACK_DURABILITY_ROUNDS", "6"))
CLICK_WORKERS = 4
POSTBACK_WORKERS = 4
KILL_AFTER = (0.3, 1.5)  # seconds of load, drawn per round
# What fires the kill once that time is up: the timer itself (any moment: mid-commit,
# mid-checkpoint, ...), or the next acknowledgement of a click or a postback, so the kill
# lands microseconds after an answer left the server (an answer sent before its commit
# would be lost). Rounds take them in turn.
KILL_ON = ("timer", "click", "postback")
VERIFY_CONCURRENCY = 16
UA = {"user-agent": "Mozilla/5.0 (X11; Linux x86_64) durability-test"}
CID_RE = re.compile(r"[?&]cid=([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?:&|$)")

Key = tuple[str, str]  # (click_id, txid): the dedupe key of a postback with a txid


def round_seed(round_no: int) -> int:
    base = os.environ.get("TINYTRACK_DURABILITY_SEED")
    return int(base) + round_no if base else secrets.randbits(32)


@dataclasses.dataclass
class Load:
    """What the load generator sent and what the server acknowledged."""

    rng: random.Random
    clicks: list[str] = dataclasses.field(default_factory=list)  # acknowledged click ids
    sent: list[Key] = dataclasses.field(default_factory=list)  # every postback key sent
    acks: dict[Key, list[tuple[str, int]]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    problems: list[str] = dataclasses.field(default_factory=list)  # unexpected answers
    postbacks_sent: int = 0
    pid: int = 0
    armed: str | None = None  # "click" or "postback": the next such acknowledgement kills
    killed: bool = False
    stop: bool = False

    def kill(self) -> None:
        if not self.killed:
            self.killed = True  # before the signal: any failure from now on may be the kill
            os.kill(self.pid, signal.SIGKILL)
            self.stop = True

    @property
    def conversions(self) -> dict[Key, int]:
        """Every acknowledged conversion and the id it was acknowledged with."""
        return {key: answers[0][1] for key, answers in self.acks.items()}


def json_of(answer: httpx.Response) -> object:
    """The JSON body, or the raw text when it is not JSON (shown in a failure)."""
    try:
        return answer.json()
    except ValueError:
        return answer.text


def postback_params(click_id: str, txid: str) -> dict[str, str]:
    return {"click_id": click_id, "txid": txid, "payout": "1.25", "token": POSTBACK_TOKEN}


async def click_worker(http: httpx.AsyncClient, load: Load, worker: int) -> None:
    n = 0
    while not load.stop:
        n += 1
        try:
            answer = await http.get("/c/spring", params={"sub1": f"w{worker}", "sub2": str(n)}, headers=UA)
        except httpx.TransportError as exc:
            if not load.killed:
                load.problems.append(f"click failed before the kill: {exc!r}")
            return
        # A whole answer that reached us is acknowledged, even one read after the kill.
        match = CID_RE.search(answer.headers.get("location", ""))
        if answer.status_code != 302 or not match:
            load.problems.append(
                f"click answered {answer.status_code} {answer.headers.get('location')!r} {answer.text!r}"
            )
            continue
        load.clicks.append(match.group(1))
        if load.armed == "click":
            load.kill()


async def send_postback(http: httpx.AsyncClient, load: Load, key: Key) -> None:
    load.postbacks_sent += 1
    try:
        answer = await http.get("/postback", params=postback_params(*key))
    except httpx.TransportError as exc:
        if not load.killed:
            load.problems.append(f"postback failed before the kill: {exc!r}")
        return
    body = json_of(answer)
    if answer.status_code == 200 and isinstance(body, dict) and body.get("status") in ("created", "duplicate"):
        load.acks[key].append((body["status"], body["id"]))
        if load.armed == "postback":
            load.kill()
    else:
        # Postbacks only go to acknowledged clicks: a 404 here is already a lost click.
        load.problems.append(f"postback {key} answered {answer.status_code} {answer.text!r}")


async def postback_worker(http: httpx.AsyncClient, load: Load, worker: int) -> None:
    rng, n = load.rng, 0
    while not load.stop:
        if not load.clicks:
            await asyncio.sleep(0.002)
            continue
        n += 1
        roll = rng.random()
        if roll < 0.3 and load.sent:
            key = rng.choice(load.sent)  # the network retries: a duplicate
        else:
            # Half convert at once (the newest clicks: is an acknowledged click already
            # committed?), the rest at any time.
            recent = rng.random() < 0.5
            click_id = load.clicks[-rng.randint(1, min(4, len(load.clicks)))] if recent else rng.choice(load.clicks)
            key = (click_id, f"tx-{worker}-{n}")
            load.sent.append(key)
        copies = 2 if roll > 0.85 else 1  # the same postback twice at once
        await asyncio.gather(*(send_postback(http, load, key) for _ in range(copies)))


async def run_load(server: Server, load: Load, kill_after: float, kill_on: str) -> None:
    """Clicks and postbacks until SIGKILL, `kill_after` seconds into the load
    (but not before the first conversion is acknowledged, so the round is never vacuous)."""
    load.pid = server.process.pid
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=CLICK_WORKERS + 2 * POSTBACK_WORKERS + 4)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=20) as http:
        workers = [asyncio.create_task(click_worker(http, load, i)) for i in range(CLICK_WORKERS)]
        workers += [asyncio.create_task(postback_worker(http, load, i)) for i in range(POSTBACK_WORKERS)]
        started = loop.time()
        while loop.time() < started + 20 and not load.acks and not all(w.done() for w in workers):
            await asyncio.sleep(0.005)
        await asyncio.sleep(max(0.0, started + kill_after - loop.time()))
        if kill_on != "timer":
            load.armed = kill_on
            await asyncio.wait(workers, timeout=5)  # an acknowledgement kills; if none comes, the timer does
        load.kill()
        await asyncio.gather(*workers)


async def verify(server: Server, load: Load) -> tuple[list[str], list[str]]:
    """After the restart: postbacks to every acknowledged click, replays of every
    acknowledged conversion. Returns the failures of each."""
    gate = asyncio.Semaphore(VERIFY_CONCURRENCY)
    lost_clicks: list[str] = []
    lost_conversions: list[str] = []

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:

        async def check_click(i: int, click_id: str) -> None:
            async with gate:
                answer = await http.get("/postback", params=postback_params(click_id, f"verify-{i}"))
            body = json_of(answer)
            if answer.status_code != 200 or not isinstance(body, dict) or body.get("status") != "created":
                lost_clicks.append(f"{click_id}: {answer.status_code} {body}")

        async def check_conversion(key: Key, conversion_id: int) -> None:
            async with gate:
                answer = await http.get("/postback", params=postback_params(*key))
            body = json_of(answer)
            if answer.status_code != 200 or body != {"status": "duplicate", "id": conversion_id}:
                lost_conversions.append(f"{key} acknowledged as id {conversion_id}, now {answer.status_code} {body}")

        await asyncio.gather(
            *(check_click(i, click_id) for i, click_id in enumerate(load.clicks)),
            *(check_conversion(key, conversion_id) for key, conversion_id in load.conversions.items()),
        )
    return lost_clicks, lost_conversions


def tail(server: Server, lines: int = 30) -> str:
    return "\n".join(server.output().splitlines()[-lines:])


@pytest.mark.parametrize("round_no", range(ROUNDS))
def test_acknowledged_writes_survive_kill_9(tmp_path: Path, round_no: int) -> None:
    seed = round_seed(round_no)
    rng = random.Random(seed)
    kill_after = rng.uniform(*KILL_AFTER)
    kill_on = KILL_ON[round_no % len(KILL_ON)]
    where = (
        f"round {round_no}, seed {seed} (TINYTRACK_DURABILITY_SEED={seed - round_no}), "
        f"kill after {kill_after:.3f}s on the next {kill_on}"
    )
    print(where)

    config_path = write_config(tmp_path, free_port())
    db = tmp_path / "tinytrack.db"
    load = Load(rng)
    first = Server(tmp_path, config_path, free_port())  # --port overrides the config's port
    second: Server | None = None
    try:
        first.start()
        began = time.monotonic()
        asyncio.run(run_load(first, load, kill_after, kill_on))
        code = first.stop(signal.SIGKILL)
        conversions = load.conversions
        print(
            f"{time.monotonic() - began:.2f}s of load: {len(load.clicks)} clicks and {len(conversions)} conversions "
            f"acknowledged, {load.postbacks_sent} postbacks sent, {sum(map(len, load.acks.values()))} acknowledged"
        )
        assert code == -signal.SIGKILL, (
            f"{where}: the server was not alive until the kill (exit {code}):\n{tail(first)}"
        )
        assert not load.problems, f"{where}: unexpected answers under load: {load.problems[:5]}\n{tail(first)}"
        assert load.clicks, f"{where}: no click was acknowledged before the kill\n{tail(first)}"
        assert conversions, f"{where}: no conversion was acknowledged before the kill\n{tail(first)}"
        # Before the kill too: one key, one conversion; at most one `created` answer for it.
        for key, answers in load.acks.items():
            assert len({conversion_id for _, conversion_id in answers}) == 1, f"{where}: {key} got ids {answers}"
            assert [status for status, _ in answers].count("created") <= 1, f"{where}: {key} created twice: {answers}"
        assert (tmp_path / "tinytrack.db-wal").exists(), f"{where}: no WAL file: not a WAL database?"

        second = Server(tmp_path, config_path, free_port()).start()
        lost_clicks, lost_conversions = asyncio.run(verify(second, load))
        assert not lost_clicks, (
            f"{where}: {len(lost_clicks)} of {len(load.clicks)} acknowledged clicks lost after kill -9, e.g. {lost_clicks[:5]}"
        )
        assert not lost_conversions, (
            f"{where}: {len(lost_conversions)} of {len(conversions)} acknowledged conversions lost or changed "
            f"after kill -9, e.g. {lost_conversions[:5]}"
        )
        code = second.stop()  # SIGTERM: pending writes finish, exit 0
        assert code == 0, f"{where}: SIGTERM after the restart exited {code}:\n{tail(second)}"
    finally:
        for server in (first, second):
            if server and server.process and server.process.poll() is None:
                server.stop(signal.SIGKILL)

    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)], where
        assert con.execute("PRAGMA foreign_key_check").fetchall() == [], where
        # The same, read from the file: each acknowledged conversion under its id and key.
        stored = {
            (bytes(click_id).hex(), dedupe_key): conversion_id
            for conversion_id, click_id, dedupe_key in con.execute("SELECT id, click_id, dedupe_key FROM conversions")
        }
        for (click_id, txid), conversion_id in conversions.items():
            assert stored.get((click_id.replace("-", ""), f"t:{txid}")) == conversion_id, f"{where}: {click_id} {txid}"
        clicks = {bytes(row[0]).hex() for row in con.execute("SELECT id FROM clicks")}
        missing = [c for c in load.clicks if c.replace("-", "") not in clicks]
        assert not missing, f"{where}: acknowledged clicks missing from the file: {missing[:5]}"
    finally:
        con.close()
