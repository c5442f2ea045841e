"""Health (SPEC "Reconciliation and checks", issue 19): the match rate and the refused
share over the last 5 minutes in /metrics, and [alerts]: a JSON POST through the
outbox when a condition starts to hold (at most once an hour) and when it clears,
driven here by an injected clock."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, FakeClock, at, client_for, new_click, write_config
from receiver import Receiver

import tinytrack

pytestmark = pytest.mark.anyio

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
ORPHAN = "01900000-0000-7000-8000-000000000001"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(at("2026-11-20"))


@pytest.fixture
def hook():
    running = Receiver([200]).start()
    yield running
    running.stop()


async def alerting(make_app, hook: Receiver, **extra: str) -> tinytrack.TinyTrack:
    lines = "".join(f"{key} = {value}\n" for key, value in extra.items())
    return await make_app(
        f'\n[alerts]\nwebhook_url = "{hook.url("/alert")}"\n{lines}\n[forward]\nallow_private = true\n'
    )


async def send(app: tinytrack.TinyTrack, good: int = 0, refused: int = 0, orphaned: int = 0) -> None:
    async with client_for(app, "192.0.2.50") as http:
        cid = await new_click(http)
        for _ in range(good):
            assert (await http.get("/postback", params={"click_id": cid, "token": POSTBACK_TOKEN})).status_code == 200
        for _ in range(refused):
            assert (await http.get("/postback", params={"click_id": cid, "token": "wrong-token"})).status_code == 401
        for _ in range(orphaned):
            answer = await http.get("/postback", params={"click_id": ORPHAN, "token": POSTBACK_TOKEN})
            assert answer.status_code == 404


def said(alerts: list[dict]) -> list[tuple[str, str]]:
    return [(alert["alert"], alert["state"]) for alert in alerts]


async def test_an_alert_fires_once_and_clears_once_and_reaches_the_webhook(make_app, clock, hook):
    app = await alerting(make_app, hook)
    await send(app, good=9, refused=1)  # 10%: over the default 1%
    assert said(await app.alerter.check()) == [("refused", "firing")]
    clock.now += 60
    await send(app, refused=3)
    assert await app.alerter.check() == []  # still holds: said once
    clock.now += 6 * 60  # the window moves past every refusal
    await send(app, good=10)
    assert said(await app.alerter.check()) == [("refused", "resolved")]
    assert await app.alerter.check() == []
    clock.now += 60
    await send(app, refused=20)  # again within the hour: not announced (nor, later, its clearing)
    assert await app.alerter.check() == []
    clock.now += 6 * 60
    assert await app.alerter.check() == []
    clock.now += 3600
    await send(app, good=10, refused=10)  # an hour after the first: announced again
    assert said(await app.alerter.check()) == [("refused", "firing")]

    for _ in range(200):  # through the outbox, as any delivery (the forwarder was woken for each)
        if len(hook.hits) == 3:
            break
        await app.forwarder.deliver_due()
        await asyncio.sleep(0.02)
    bodies = [json.loads(hit.body) for hit in hook.hits]
    assert [(b["alert"], b["state"]) for b in bodies] == [
        ("refused", "firing"),
        ("refused", "resolved"),
        ("refused", "firing"),
    ]
    assert bodies[0]["text"] == "1 of 10 postbacks refused in 5 min (10.0%; alerts.max_refused_pct 1)"
    assert {hit.method for hit in hook.hits} == {"POST"} and all(hit.key for hit in hook.hits)
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        assert con.execute("SELECT campaign, kind, state FROM outbox").fetchall() == [("(alerts)", "alert", "done")] * 3


async def test_few_postbacks_are_not_judged_and_orphans_lower_the_match_rate(make_app, clock, hook):
    app = await alerting(make_app, hook, min_match_pct="80")
    await send(app, refused=5)  # under min_postbacks (10)
    assert await app.alerter.check() == []
    await send(app, good=7, orphaned=3)  # 70% matched
    assert said(await app.alerter.check()) == [("refused", "firing"), ("match", "firing")]
    async with client_for(app) as http:
        metrics = (await http.get("/metrics", headers=ADMIN)).text
    assert "tinytrack_postback_match_rate 0.7\n" in metrics
    assert "tinytrack_postback_refused_rate 0.333333\n" in metrics  # 5 of 15


async def test_a_dead_delivery_alerts_until_it_is_dealt_with(make_app, clock, hook):
    app = await alerting(make_app, hook)
    with closing(sqlite3.connect(app.config.storage.path)) as con, con:
        con.execute(
            """INSERT INTO outbox (conversion_id, campaign, status, url, idempotency_key, state, created_at, next_at,
                                   deadline) VALUES (1, 'spring', 'approved', 'http://x.example/', 'k1', 'dead', ?, ?, ?)""",
            [int(clock.now * 1000)] * 3,  # today's: not a finished delivery old enough for the purge
        )
    [alert] = await app.alerter.check()
    assert (alert["alert"], alert["state"], alert["text"]) == (
        "dead",
        "firing",
        "1 deliveries dead (tinytrack outbox list --state dead)",
    )
    with closing(sqlite3.connect(app.config.storage.path)) as con, con:
        con.execute("UPDATE outbox SET state = 'pending' WHERE idempotency_key = 'k1'")  # outbox retry
    assert said(await app.alerter.check()) == [("dead", "resolved")]


async def test_metrics_without_postbacks_say_nan(make_app):
    app = await make_app()
    async with client_for(app) as http:
        metrics = (await http.get("/metrics", headers=ADMIN)).text
    assert "tinytrack_postback_match_rate NaN\n" in metrics and "tinytrack_postback_refused_rate NaN\n" in metrics
    assert await app.alerter.check() == []  # no [alerts]: nothing


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("max_refused_pct = 150", "alerts.max_refused_pct: must be a percentage, 0 to 100, got '150'"),
        ('min_match_pct = "90"', "alerts.min_match_pct: must be another type, got '90'"),
        ('webhook_url = "ftp://x.example/"', "alerts.webhook_url: must be an http(s) URL, got 'ftp://x.example/'"),
        ("min_postbacks = 0", "alerts.min_postbacks: must be between 1 and 1000000000, got 0"),
        ("max_refused = 1", "alerts.max_refused: unknown key"),
    ],
)
def test_bad_alerts_config_names_the_key(tmp_path, toml, message):
    with pytest.raises(tinytrack.ConfigError) as caught:
        tinytrack.load_config(write_config(tmp_path, extra=f"\n[alerts]\n{toml}\n"))
    assert str(caught.value) == message


PROMTOOL = shutil.which("promtool")
RULE_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: tinytrack_postback_refused_rate
        values: 0.05x10
      - series: tinytrack_postback_match_rate
        values: 0.95x4 0.5x6
      - series: 'tinytrack_outbox{state="dead"}'
        values: 0x10
    alert_rule_test:
      - eval_time: 6m
        alertname: TinytrackPostbacksRefused
        exp_alerts:
          - exp_annotations:
              summary: "More than 1% of postbacks refused over 5 minutes (see /admin's refused postbacks)"
      - eval_time: 6m
        alertname: TinytrackMatchRateLow
        exp_alerts: []
      - eval_time: 10m
        alertname: TinytrackMatchRateLow
        exp_alerts:
          - exp_annotations:
              summary: "Under 90% of postbacks match a click: check the network's click id macro"
      - eval_time: 10m
        alertname: TinytrackDeliveriesDead
        exp_alerts: []
"""


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus); CI installs it")
async def test_the_readme_prometheus_rules_and_the_metrics_pass_promtool(make_app, tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    [rules] = re.findall(r"```yaml\n(groups:.*?)```", readme, re.S)
    (tmp_path / "rules.yml").write_text(rules)
    (tmp_path / "tests.yml").write_text(RULE_TESTS)
    checked = subprocess.run([PROMTOOL, "check", "rules", "rules.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    app = await make_app()
    await send(app, good=3, refused=1, orphaned=1)
    async with client_for(app) as http:
        metrics = (await http.get("/metrics", headers=ADMIN)).text
    linted = subprocess.run([PROMTOOL, "check", "metrics"], input=metrics, capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr


async def test_alert_state_outlives_a_restart_and_a_resolution_cancels_an_unsent_firing(
    make_app, clock, hook, tmp_path
):
    app = await alerting(make_app, hook)
    app.forwarder.send = None  # nothing is sent in this test: the outbox is what is looked at
    await app.forwarder.stop(0)
    with closing(sqlite3.connect(app.config.storage.path)) as con, con:
        con.execute(
            """INSERT INTO outbox (conversion_id, campaign, status, url, idempotency_key, state, created_at, next_at,
                                   deadline) VALUES (1, 'spring', 'approved', 'http://x.example/', 'k1', 'dead', ?, ?, ?)""",
            [int(clock.now * 1000)] * 3,  # today's: not a finished delivery old enough for the purge
        )
    assert said(await app.alerter.check()) == [("dead", "firing")]
    restarted = await alerting(make_app, hook)  # a new process on the same database
    await restarted.forwarder.stop(0)
    assert await restarted.alerter.check() == []  # already announced: not again
    with closing(sqlite3.connect(app.config.storage.path)) as con, con:
        con.execute("UPDATE outbox SET state = 'canceled' WHERE idempotency_key = 'k1'")
    assert said(await restarted.alerter.check()) == [("dead", "resolved")]
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        alerts = con.execute("SELECT status, state, url FROM outbox WHERE campaign = '(alerts)' ORDER BY id").fetchall()
    assert alerts == [("dead firing", "canceled", hook.url("/alert")), ("dead resolved", "pending", hook.url("/alert"))]
    async with client_for(restarted) as http:
        listed = (await http.get("/api/outbox?since=2000-01-01", headers=ADMIN)).json()["rows"]
    assert {row["url"] for row in listed if row["campaign"] == "(alerts)"} == {f"http://127.0.0.1:{hook.port}/..."}


async def test_a_reload_moves_pending_alerts_to_the_new_webhook(make_app, clock, hook):
    app = await alerting(make_app, hook)
    await app.forwarder.stop(0)  # queued, not sent, until the reload
    await send(app, good=5, refused=5)
    assert said(await app.alerter.check()) == [("refused", "firing")]
    moved = Receiver([200]).start()
    try:
        alerts = dataclasses.replace(app.config.alerts, webhook_url=moved.url("/moved"))
        app.apply_config(dataclasses.replace(app.config, alerts=alerts))
        for _ in range(200):
            if moved.hits:
                break
            await app.forwarder.deliver_due()
            await asyncio.sleep(0.02)
    finally:
        moved.stop()
    assert [hit.path for hit in moved.hits] == ["/moved"] and hook.hits == []
