"""Clicks' country, device, os and browser (issue 20): filled after the click is stored,
by the Enricher, from a tiny MaxMind-format database the test builds (tests/mmdb.py)
and ua-parser; and the reports that group by them."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, FakeClock, at, client_for, write_config
from mmdb import write_mmdb

import tinytrack

pytestmark = pytest.mark.anyio

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
D = "2026-11-20"
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1"
)
IPAD = (
    "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1"
)
ANDROID_TABLET = (
    "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
GERMANY = {"country": {"iso_code": "DE", "names": {"en": "Germany"}}}
FRANCE = {"country": {"iso_code": "FR", "names": {"en": "France"}}}
ANYCAST = {"registered_country": {"iso_code": "US", "names": {"en": "United States"}}}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(at(D, 9))


@pytest.fixture
def countries(tmp_path: Path) -> Path:
    path = tmp_path / "countries.mmdb"
    write_mmdb(path, {"203.0.113.0/24": GERMANY, "2001:db8::/32": FRANCE, "192.0.2.0/24": ANYCAST})
    return path


def geo_section(path: Path) -> str:
    return f'\n[geo]\ndatabase = "{path}"\n'


async def click_from(app, address: str, user_agent: str, **params: str) -> str:
    async with client_for(app, address) as http:
        answer = await http.get("/c/spring", params=params, headers={"user-agent": user_agent})
    assert answer.status_code == 302, answer.text
    return answer.headers["location"].split("cid=")[1].split("&")[0]


def stored(app) -> list[tuple]:
    with sqlite3.connect(app.config.storage.path) as con:
        return con.execute(
            """SELECT c.ip, f.country, f.device, f.os, f.browser FROM clicks AS c
               LEFT JOIN click_facts AS f ON f.id = c.id ORDER BY c.id"""
        ).fetchall()


async def test_a_known_address_and_user_agent_are_filled_in_after_the_click(make_app, countries, clock):
    app = await make_app(geo_section(countries))
    await app.enricher.stop()  # so the test sees the clicks before and after it looks
    await click_from(app, "203.0.113.7", IPHONE)
    await click_from(app, "2001:db8::5", WINDOWS)
    await click_from(app, "198.51.100.9", ANDROID_TABLET)  # in no network of the database
    await click_from(app, "192.0.2.1", IPAD)  # only a registered country
    await click_from(app, "203.0.113.8", GOOGLEBOT)
    # the click's path stores none of it: the 302 came before anything was looked up
    assert [row[1:] for row in stored(app)] == [(None, None, None, None)] * 5
    assert await app.enricher.catch_up() == 0  # it stays two seconds behind the newest clicks
    clock.now += 2.5
    assert await app.enricher.catch_up() == 5
    assert stored(app) == [
        ("203.0.113.7", "DE", "mobile", "iOS", "Mobile Safari"),
        ("2001:db8::5", "FR", "desktop", "Windows", "Chrome"),
        ("198.51.100.9", None, "tablet", "Android", "Chrome"),
        ("192.0.2.1", "US", "tablet", "iOS", "Mobile Safari"),
        ("203.0.113.8", "DE", "other", "Other", "Googlebot"),
    ]
    assert await app.enricher.catch_up() == 0  # each click is looked at once


async def test_reports_group_by_country_and_device_with_their_conversions(make_app, countries, clock):
    app = await make_app(geo_section(countries))
    await app.enricher.stop()
    german = [await click_from(app, "203.0.113.7", IPHONE) for _ in range(2)]
    await click_from(app, "203.0.113.9", WINDOWS)
    french = await click_from(app, "2001:db8::5", WINDOWS)
    await click_from(app, "198.51.100.9", WINDOWS)
    async with client_for(app) as http:
        for cid, payout in ((german[0], "2"), (french, "3")):
            answer = await http.get("/postback", params={"click_id": cid, "token": POSTBACK_TOKEN, "payout": payout})
            assert answer.status_code == 200, answer.text
        clock.now += 2.5
        await app.enricher.catch_up()
        answer = await http.get(f"/api/stats?from={D}&to={D}&by=country,device", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["source"] == "raw"
    assert [(r["country"], r["device"], r["clicks"], r["approved"], r["payout"]) for r in body["rows"]] == [
        ("", "desktop", 1, 0, {}),  # an address the database does not know: no country
        ("DE", "desktop", 1, 0, {}),
        ("DE", "mobile", 2, 1, {"USD": "2.00"}),
        ("FR", "desktop", 1, 1, {"USD": "3.00"}),
    ]
    async with client_for(app) as http:
        answer = await http.get(f"/api/stats?from={D}&to={D}&by=os,browser,country", headers=ADMIN)
    assert [(r["os"], r["browser"], r["country"], r["clicks"]) for r in answer.json()["rows"]] == [
        ("Windows", "Chrome", "", 1),
        ("Windows", "Chrome", "DE", 1),
        ("Windows", "Chrome", "FR", 1),
        ("iOS", "Mobile Safari", "DE", 2),
    ]


async def test_without_a_database_country_stays_empty_and_devices_still_come(make_app, clock):
    app = await make_app()
    await click_from(app, "203.0.113.7", IPHONE)
    clock.now += 2.5
    await app.enricher.catch_up()
    assert stored(app) == [("203.0.113.7", None, "mobile", "iOS", "Mobile Safari")]


async def test_user_agents_off_and_no_database_fill_nothing(make_app, clock):
    app = await make_app("\n[geo]\nuser_agents = false\n")
    await click_from(app, "203.0.113.7", IPHONE)
    clock.now += 2.5
    assert await app.enricher.catch_up() == 0
    assert stored(app) == [("203.0.113.7", None, None, None, None)]


def test_a_database_that_cannot_be_read_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.mmdb"
    with pytest.raises(tinytrack.ConfigError, match=r"geo\.database: can't read '.*nope\.mmdb' as a MaxMind database"):
        tinytrack.load_config(write_config(tmp_path, extra=geo_section(missing)))
    junk = tmp_path / "junk.mmdb"
    junk.write_bytes(b"not a database" * 10)
    with pytest.raises(tinytrack.ConfigError, match=r"geo\.database: can't read '.*junk\.mmdb' as a MaxMind database"):
        tinytrack.load_config(write_config(tmp_path, extra=geo_section(junk)))


def test_without_the_geo_extra_the_config_says_what_to_install(tmp_path, countries, monkeypatch):
    monkeypatch.setitem(sys.modules, "maxminddb", None)  # as if it were not installed
    with pytest.raises(tinytrack.ConfigError) as raised:
        tinytrack.load_config(write_config(tmp_path, extra=geo_section(countries)))
    assert (
        str(raised.value)
        == "geo.database: reading a country database needs the geo extra: pip install 'tinytrack[geo]'"
    )
    monkeypatch.setitem(sys.modules, "ua_parser", None)
    geo = tinytrack.Geo(tinytrack.GeoConfig())
    assert not geo and geo("203.0.113.7", IPHONE) == (None, None, None, None)


@pytest.mark.parametrize(
    ("user_agent", "device"),
    [
        (IPHONE, "mobile"),
        (IPAD, "tablet"),
        (ANDROID_TABLET, "tablet"),
        (
            "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36",
            "mobile",
        ),
        (WINDOWS, "desktop"),
        (
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
            "desktop",
        ),
        ("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0", "desktop"),
        (
            "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
            "desktop",
        ),
        (GOOGLEBOT, "other"),
        ("curl/8.5.0", "other"),
        ("", "other"),
    ],
)
def test_device_kinds(user_agent, device):
    assert tinytrack.Geo(tinytrack.GeoConfig())(None, user_agent)[1] == device


async def test_a_clicks_facts_go_with_it(make_app, clock):
    app = await make_app()
    await click_from(app, "203.0.113.7", IPHONE)
    await click_from(app, "203.0.113.8", WINDOWS)
    clock.now += 2.5
    await app.enricher.catch_up()
    with sqlite3.connect(app.config.storage.path) as con:
        assert con.execute("SELECT count(*) FROM click_facts").fetchone() == (2,)
        con.execute("DELETE FROM clicks WHERE ip = '203.0.113.7'")  # as a purge or `forget --ip` does
        assert con.execute("SELECT device FROM click_facts").fetchall() == [("desktop",)]


async def test_a_replaced_country_file_is_read_after_a_reload(make_app, countries, clock, tmp_path):
    app = await make_app(geo_section(countries))
    await app.enricher.stop()
    await click_from(app, "203.0.113.7", IPHONE)
    clock.now += 2.5
    await app.enricher.catch_up()
    newer = tmp_path / "newer.mmdb"
    write_mmdb(newer, {"203.0.113.0/24": FRANCE})  # the range moved to France
    newer.replace(countries)
    assert app.reload(str(tmp_path / "config.toml"))
    await click_from(app, "203.0.113.8", IPHONE)
    clock.now += 2.5
    await app.enricher.catch_up()
    assert [row[1] for row in stored(app)] == ["DE", "FR"]  # each as the file said when it was looked at


async def test_a_country_file_added_later_fills_the_clicks_kept(make_app, countries, clock, tmp_path):
    app = await make_app()
    await app.enricher.stop()
    await click_from(app, "203.0.113.7", IPHONE)
    clock.now += 2.5
    await app.enricher.catch_up()
    assert [row[1:3] for row in stored(app)] == [(None, "mobile")]
    (tmp_path / "config.toml").write_text((tmp_path / "config.toml").read_text() + geo_section(countries))
    assert app.reload(str(tmp_path / "config.toml"))
    assert await app.enricher.catch_up() == 1
    assert [row[1:3] for row in stored(app)] == [("DE", "mobile")]


async def test_one_user_agent_the_parser_chokes_on_is_left_empty(make_app, clock, monkeypatch):
    app = await make_app()
    await app.enricher.stop()
    await click_from(app, "203.0.113.7", "Choke/1.0")
    await click_from(app, "203.0.113.8", IPHONE)
    clock.now += 2.5
    geo = app.enricher.current_geo()
    parse = geo.parse

    def choking(user_agent: str):
        if user_agent.startswith("Choke"):
            raise RuntimeError("a parser's bug")
        return parse(user_agent)

    monkeypatch.setattr(geo, "parse", choking)
    assert await app.enricher.catch_up() == 1
    assert [row[2] for row in stored(app)] == [None, "mobile"]
    assert await app.enricher.catch_up() == 0  # and it went on past it


async def test_looking_again_keeps_what_can_no_longer_be_looked_up(make_app, countries, clock, tmp_path):
    """A [geo] change looks at the kept clicks again; a click whose User-Agent pii_days
    has cut keeps its device, os and browser, and gains its country."""
    app = await make_app()
    await app.enricher.stop()
    await click_from(app, "203.0.113.7", IPHONE)
    clock.now += 2.5
    await app.enricher.catch_up()
    with sqlite3.connect(app.config.storage.path) as con:
        con.execute("UPDATE clicks SET ip = '203.0.113.0', ua = NULL")  # as the pii purge leaves it
    (tmp_path / "config.toml").write_text((tmp_path / "config.toml").read_text() + geo_section(countries))
    assert app.reload(str(tmp_path / "config.toml"))
    await app.enricher.catch_up()
    assert stored(app) == [("203.0.113.0", "DE", "mobile", "iOS", "Mobile Safari")]
