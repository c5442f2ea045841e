"""Trusting the numbers (SPEC "Reconciliation and checks", issue 19): a network's
report diffed against what is stored (tinytrack reconcile), --apply through the
postback path, POST /api/conversions/import, and the quarantine that keeps postbacks
refused for what they said."""

from __future__ import annotations

import csv
import io
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, FakeClock, at, client_for, new_click
from test_cli import run

import tinytrack

pytestmark = pytest.mark.anyio

D = "2026-11-20"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
FWD = """
[forward]
allow_private = true
delay_seconds = 3600  # queued, not sent, during the test

[campaigns.net]
url = "https://offer.example.com/n?cid={click_id}"
postback_url = "http://127.0.0.1:9/pb?cid={click_id}&s={status}&p={payout}"

[campaigns.late]
url = "https://offer.example.com/l?cid={click_id}"
window_days = 1
"""
MAP = "click_id=Sub ID,txid=Transaction,payout=Payout,status=Status,ts=Date"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(at(D))


def rows(db: Path | str, sql: str, *args: object) -> list[tuple]:
    with closing(sqlite3.connect(db)) as con:
        return con.execute(sql, args).fetchall()


async def postback(http, expect: int = 200, **fields: str) -> dict:
    answer = await http.get("/postback", params={"token": POSTBACK_TOKEN, **fields})
    assert answer.status_code == expect, answer.text
    return answer.json()


async def seed(app, clock) -> dict[str, str]:
    """Clicks and postbacks so that the report below has a row in every category."""
    ids = {}
    async with client_for(app) as http:
        for name in ("matched", "payout", "status", "missing", "refused", "only", "two", "single", "reversed"):
            ids[name] = await new_click(http, "net")
        ids["late"] = await new_click(http, "late")
        await postback(http, click_id=ids["matched"], txid="T1", payout="10.00")
        await postback(http, click_id=ids["payout"], txid="T2", payout="10.00")
        await postback(http, click_id=ids["status"], txid="T3", payout="5", status="pending")
        refused = await postback(http, 400, click_id=ids["refused"], txid="T5", payout="1,50")
        assert refused == {"error": "payout: must be a decimal >= 0 with at most 6 decimals, got '1,50'"}
        ids["orphan"] = "01900000-0000-7000-8000-000000000007"
        await postback(http, 404, click_id=ids["orphan"], txid="T6", payout="3")
        await postback(http, click_id=ids["only"], txid="T7", payout="2")
        await postback(http, click_id=ids["two"], txid="T10", payout="1")
        await postback(http, click_id=ids["two"], txid="T11", payout="1")
        await postback(http, click_id=ids["single"], txid="T12", payout="6")
        await postback(http, click_id=ids["reversed"], txid="T13", payout="4")
        await postback(http, click_id=ids["reversed"], txid="T13", payout="4", status="rejected")
        clock.now += 3 * 86400  # past the late campaign's window
        assert (await postback(http, click_id=ids["late"], txid="T14", payout="9"))["status"] == "rejected"
    return ids


def report(ids: dict[str, str]) -> str:
    """A CPA network's export, semicolon separated, its own column names and status words."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=";")
    writer.writerow(["Date", "Offer", "Sub ID", "Transaction", "Payout", "Status"])
    day = f"{D} 12:30:00+00:00"
    writer.writerows(
        [
            [day, "Offer A", ids["matched"], "T1", "10.00", "declined"],  # repeated: the row below decides
            [day, "Offer A", ids["matched"], "T1", "10.00", "sale"],
            [day, "Offer A", ids["payout"], "T2", "12.50", "sale"],
            [day, "Offer A", ids["status"], "T3", "5.00", "approved"],
            [day, "Offer A", ids["missing"], "T4", "7.00", "sale"],
            [day, "Offer A", ids["refused"], "T5", "1.50", "sale"],
            [day, "Offer A", ids["orphan"], "T6", "3.00", "sale"],
            [day, "Offer A", "01900000-0000-7000-8000-000000000099", "T8", "4.00", "sale"],
            [day, "Offer A", ids["matched"], "T9", "abc", "sale"],
            [day, "Offer A", ids["two"], "", "1.00", "sale"],  # no txid, two conversions: ambiguous
            [day, "Offer A", ids["single"], "", "6.00", "sale"],  # no txid, one conversion: that one
            [day, "Offer A", ids["reversed"], "T13", "4.00", ""],  # no status said: not re-approved
            [day, "Offer A", ids["late"], "T14", "9.00", "sale"],  # rejected here (outside its window)
        ]
    )
    return out.getvalue()


def counts(stdout: str) -> dict[str, int]:
    found = {}
    for label in tinytrack.RECONCILE_CATEGORIES.values():
        for line in stdout.splitlines():
            if line.startswith(f"  {label} ") and line.split()[-1].isdigit():
                found[label] = int(line.split()[-1])
    return found


async def test_reconcile_finds_every_category_and_apply_twice_changes_nothing_the_second_time(
    make_app, clock, tmp_path, config_file
):
    config_file.write_text(config_file.read_text() + FWD)
    app = await make_app(FWD)
    ids = await seed(app, clock)
    db = app.config.storage.path
    path = tmp_path / "network.csv"
    path.write_text(report(ids))
    before = rows(db, "SELECT id, status, payout FROM conversions ORDER BY id")
    queued = rows(db, "SELECT id FROM outbox")

    read = run(
        "reconcile", str(path), "--map", MAP, "--csv", str(tmp_path / "all.csv"), "-c", str(config_file), cwd=tmp_path
    )
    assert read.returncode == 0, read.stderr
    assert counts(read.stdout) == {
        "matched": 3,
        "payout differs": 1,
        "status differs": 1,
        "missing here (its click is known)": 1,
        "missing here: its postback was refused (quarantined)": 1,
        "an orphan the file explains (we had the postback, not the click)": 1,
        "unknown click (purged, or not ours)": 1,
        "only here (not in the file)": 1,
        "held or rejected here (fraud, window): not applied": 1,
        "no txid, and its click has several conversions: not applied": 1,
        "repeated in the file (a later row for it decides)": 1,
        "unreadable rows": 1,
    }, read.stdout
    assert "refused: payout: must be a decimal >= 0 with at most 6 decimals, got '1,50'" in read.stdout
    assert "line 10: click - txid -   payout: must be a decimal >= 0 with at most 6 decimals, got 'abc'" in read.stdout
    assert "file 12.50 USD here 10.00 USD" in read.stdout and "here: rejected, outside_window" in read.stdout
    assert "read only: nothing was written (4 rows --apply would store or correct)" in read.stdout
    assert rows(db, "SELECT id, status, payout FROM conversions ORDER BY id") == before
    every = list(csv.DictReader(io.StringIO((tmp_path / "all.csv").read_text())))
    assert len(every) == 14 and {row["category"] for row in every} == set(tinytrack.RECONCILE_CATEGORIES.values())

    applied = run("reconcile", str(path), "--map", MAP, "--apply", "-c", str(config_file), cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert "applied: 4 changes" in applied.stdout and "not changed" not in applied.stdout, applied.stdout
    got = dict(rows(db, "SELECT txid, status || ' ' || payout FROM conversions"))
    assert got == {
        "T1": "approved 10000000",
        "T2": "approved 12500000",
        "T3": "approved 5000000",
        "T4": "approved 7000000",
        "T5": "approved 1500000",
        "T7": "approved 2000000",
        "T10": "approved 1000000",
        "T11": "approved 1000000",
        "T12": "approved 6000000",
        "T13": "rejected 4000000",  # its empty status cell said nothing
        "T14": "rejected 9000000",
    }
    assert rows(db, "SELECT source FROM conversions WHERE txid IN ('T2', 'T4') ORDER BY txid") == [
        ("import",),
        ("import",),
    ]
    history = rows(
        db,
        """SELECT h.status, h.payout, coalesce(h.source, 'postback') FROM conversion_history AS h
           JOIN conversions AS c ON c.id = h.conversion_id WHERE c.txid = 'T3' ORDER BY h.rowid""",
    )
    assert history == [("pending", 5000000, "postback"), ("approved", 5000000, "import")]
    # what changed is forwarded as a postback's would be; T2's unsent 10.00 is replaced by 12.50
    new = rows(db, f"SELECT url FROM outbox WHERE id > {max(i for (i,) in queued)} ORDER BY id")
    assert sorted(url.split("&p=")[1] for (url,) in new) == ["1.50", "12.50", "5.00", "7.00"]
    assert rows(db, "SELECT state FROM outbox WHERE url LIKE ?", f"%{ids['payout']}%") == [("canceled",), ("pending",)]
    again = run("reconcile", str(path), "--map", MAP, "--apply", "-c", str(config_file), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "applied: 0 changes" in again.stdout
    assert counts(again.stdout)["matched"] == 7
    assert rows(db, "SELECT count(*) FROM outbox") == [(len(queued) + 4,)]  # nothing more


async def test_reconcile_names_a_bad_map_and_a_missing_column(make_app, tmp_path, config_file):
    await make_app()
    path = tmp_path / "r.csv"
    path.write_text("a,b\n1,2\n")
    for mapping, message in (
        ("txid=a", "--map: click_id=COLUMN is required (how a row names its click)"),
        (
            "click_id=a,amount=b",
            "--map: 'amount' is no field; known: click_id, txid, event, payout, currency, status, ts",
        ),
        ("click_id=Sub", "--map: no column 'Sub' in the report; it has: a, b"),
        ("click_id", "--map: 'click_id' is not FIELD=COLUMN"),
    ):
        done = run("reconcile", str(path), "--map", mapping, "-c", str(config_file), cwd=tmp_path)
        assert (done.returncode, done.stderr.strip()) == (1, f"tinytrack: {message}")


async def test_import_api_answers_per_row_and_is_idempotent(make_app):
    app = await make_app(FWD)
    async with client_for(app) as http:
        known = await new_click(http, "net")
        body = {
            "rows": [
                {"click_id": known, "txid": "A1", "payout": "9.99", "status": "sale", "ts": f"{D}T12:30:00Z"},
                {"cid": known, "tid": "A2", "amount": 3},  # postback aliases, a number
                {"click_id": "01900000-0000-7000-8000-000000000005", "txid": "A3"},
                {"click_id": known, "payout": "1,5"},
                "nope",
            ]
        }
        first = await http.post("/api/conversions/import", json=body, headers=ADMIN)
        second = await http.post("/api/conversions/import", json=body, headers=ADMIN)
        unauthorized = await http.post("/api/conversions/import", json=body)
        empty = await http.post("/api/conversions/import", json={"rows": []}, headers=ADMIN)
    assert first.status_code == 200, first.text
    assert first.json()["rows"] == [
        {"row": 0, "status": "created", "id": 1},
        {"row": 1, "status": "created", "id": 2},
        {"row": 2, "status": "unknown_click"},
        {"row": 3, "status": "invalid", "error": "payout: must be a decimal >= 0 with at most 6 decimals, got '1,5'"},
        {"row": 4, "status": "invalid", "error": "rows[4]: must be an object of postback fields"},
    ]
    assert [row["status"] for row in second.json()["rows"][:3]] == ["duplicate", "duplicate", "unknown_click"]
    assert unauthorized.status_code == 401
    assert (empty.status_code, empty.json()) == (
        400,
        {"error": "rows: must be a list of 1-1000 objects in a JSON body"},
    )
    db = app.config.storage.path
    assert rows(db, "SELECT txid, payout, source FROM conversions ORDER BY id") == [
        ("A1", 9_990_000, "import"),
        ("A2", 3_000_000, "import"),
    ]
    assert rows(db, "SELECT count(*) FROM orphans") == [(0,)]  # a report's unknown click is no orphan


async def test_a_refused_postback_with_a_valid_token_is_quarantined_and_listed(make_app):
    app = await make_app()
    async with client_for(app, "192.0.2.50") as http:
        cid = await new_click(http)
        await postback(http, 400, click_id=cid, txid="Q1", payout="1,50", status="sold", extra="kept")
        await postback(http, 400, click_id=cid, status="weird")
        unauthorized = await http.get("/postback", params={"click_id": cid, "payout": "1,50", "token": "wrong-token"})
        assert unauthorized.status_code == 401
        listed = (await http.get("/api/quarantine?since=2000-01-01", headers=ADMIN)).json()["rows"]
        page = (await http.get("/admin", headers=ADMIN)).text
    assert [(row["reason"], row["fields"], row["ip"]) for row in listed] == [
        (
            "payout: must be a decimal >= 0 with at most 6 decimals, got '1,50'",
            {"click_id": cid, "txid": "Q1", "payout": "1,50", "status": "sold"},  # no token; unknown fields not kept
            "192.0.2.50",
        ),
        (
            "status: must be one of approved, pending, rejected or a postback.status_map word, got 'weird'",
            {"click_id": cid, "status": "weird"},
            "192.0.2.50",
        ),
    ]
    assert "Refused postbacks" in page and "got &#x27;weird&#x27;" in page
    assert POSTBACK_TOKEN not in str(listed)


async def test_quarantine_keeps_what_collecting_refused_cuts_long_values_and_forget_reaches_it(make_app, tmp_path):
    app = await make_app()
    async with client_for(app, "192.0.2.50") as http:
        cid = await new_click(http)
        twice = await http.get(
            "/postback", params=[("click_id", cid), ("payout", "1"), ("amount", "2"), ("token", POSTBACK_TOKEN)]
        )
        assert twice.status_code == 400
        stranger = await http.get("/postback", params=[("click_id", cid), ("payout", "1"), ("amount", "2")])
        assert stranger.status_code == 400  # no token: refused, not kept
        long = await postback(http, 400, click_id=cid, txid="x" * 5000, user_id="alice-1")
        assert long["error"].startswith("txid: must be 1-64 characters")
    db = app.config.storage.path
    kept = [
        (reason, json_fields) for reason, json_fields in rows(db, "SELECT reason, fields FROM quarantine ORDER BY id")
    ]
    assert kept[0][0] == "payout: given twice (payout and amount) with different values"
    assert '"payout":"1","amount":"2"' in kept[0][1] and POSTBACK_TOKEN not in kept[0][1]
    assert len(kept) == 2 and len(kept[1][1]) < 400  # the 5,000-character txid cut to 256
    forgot = run("forget", "--user-id", "alice-1", "-c", str(app_config(tmp_path)), cwd=tmp_path)
    assert forgot.returncode == 0, forgot.stderr
    assert "forgot user id alice-1: 1 refused postbacks deleted" in forgot.stdout, forgot.stdout
    assert rows(db, "SELECT count(*) FROM quarantine") == [(1,)]


def app_config(tmp_path: Path) -> Path:
    return tmp_path / "config.toml"


async def test_an_import_larger_than_one_transaction_answers_every_row_in_order(make_app):
    app = await make_app()
    async with client_for(app) as http:
        clicks = [await new_click(http) for _ in range(250)]
        body = {"rows": [{"click_id": cid, "txid": f"B{i}", "payout": "1"} for i, cid in enumerate(clicks)]}
        answer = await http.post("/api/conversions/import", json=body, headers=ADMIN)
    assert answer.status_code == 200
    assert answer.json()["rows"] == [{"row": i, "status": "created", "id": i + 1} for i in range(250)]
    assert answer.json()["counts"] == {"created": 250}
    assert rows(app.config.storage.path, "SELECT count(*), sum(payout) FROM conversions") == [(250, 250_000_000)]


async def test_an_unreadable_rows_conversion_is_not_also_only_here(make_app, tmp_path, config_file):
    app = await make_app()
    async with client_for(app) as http:
        cid = await new_click(http)
        await postback(http, click_id=cid, txid="U1", payout="2")
    path = tmp_path / "r.csv"
    path.write_text(f"Date,Sub ID,Transaction,Payout,Status\n{D}T12:30:00Z,{cid},U1,2;00,sale\n")
    done = run("reconcile", str(path), "--map", MAP, "--since", D, "--until", D, "-c", str(config_file), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = counts(done.stdout)
    assert (found["unreadable rows"], found["only here (not in the file)"]) == (1, 0), done.stdout
