"""Funnels (issue 15): landers and offers in the config, the weighted pick, the LP
click (GET /go/<campaign>), credit to a click's lander and offer, and the reports
per lander and offer.

The figures in the report tests are worked out by hand in the comments beside them,
from clicks whose lander and offer a scripted random source chose.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import sqlite3
from collections import Counter
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

import anyio
import browser
import httpx
import pytest
from conftest import ADMIN_TOKEN, POSTBACK_TOKEN, FakeClock, Server, at, client_for, free_port, write_config
from test_cli import run
from test_reports import ARTIFACTS, Page

import tinytrack
from tinytrack import Arm, ConfigError, Rotation, build_config, split_template

pytestmark = pytest.mark.anyio

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
HUMAN = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
D = "2026-11-20"

FUNNELS = """
[campaigns.split]
offers = [
  { name = "a", url = "https://offer-a.example/?cid={click_id}&l={lander}&s={sub1}", weight = 70 },
  { name = "b", url = "https://offer-b.example/?cid={click_id}&l={lander}&s={sub1}", weight = 30 },
]
landers = [
  { name = "lp1", url = "https://lp.example/one?cid={click_id}&o={offer}", weight = 50 },
  { name = "lp2", url = "https://lp.example/two?cid={click_id}&o={offer}", weight = 50 },
]
cost_model = "cpc"
cost_value = "0.10"
postback_url = "https://source.example/pb?c={click_id}&o={offer}&l={lander}&p={payout}"

[campaigns.direct]
offers = [
  { name = "a", url = "https://offer-a.example/?cid={click_id}&o={offer}", weight = 1 },
  { name = "b", url = "https://offer-b.example/?cid={click_id}&o={offer}", weight = 1 },
]

[campaigns.plain]
url = "https://offer.example.com/lp?cid={click_id}&o={offer}"
postback_url = "https://source.example/pb?c={click_id}&o={offer}&l={lander}"
"""


class Script:
    """A random source that says what it is told: 0.0 picks the first arm, 0.99 the last
    (weights 70/30: below 0.7 is "a"; 50/50: below 0.5 is "lp1")."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def then(self, *values: float) -> None:
        self.values.extend(values)

    def __call__(self) -> float:
        return self.values.pop(0)


A, B = 0.1, 0.9  # offers a / b (70/30)
LP1, LP2 = 0.1, 0.9  # landers lp1 / lp2 (50/50)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(at(D))


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
async def app(make_app, script: Script):
    return await make_app(FUNNELS, rng=script)


@pytest.fixture
async def client(app):
    async with client_for(app) as http:
        yield http


async def click(
    client: httpx.AsyncClient, script: Script, offer: float | None, lander: float | None = None, **kw
) -> str:
    """A click on `split` (or kw campaign) given the offer and lander the script picks
    (None: nothing is drawn, one offer and no landers); its id."""
    script.then(*(() if offer is None else (offer,)), *(() if lander is None else (lander,)))
    campaign = kw.pop("campaign", "split")
    answer = await client.get(f"/c/{campaign}", params=kw, headers={"user-agent": kw.pop("ua", HUMAN)})
    assert answer.status_code == 302, answer.text
    assert not script.values  # one draw per rotation of more than one arm
    return answer.headers["location"].split("cid=")[1].split("&")[0]


async def lp_click(client: httpx.AsyncClient, script: Script, campaign: str = "split", pick: float = A, **params):
    script.then(pick)  # the pick by weight every LP click draws, used when nothing else decides
    answer = await client.get(f"/go/{campaign}", params=params, headers={"user-agent": HUMAN})
    assert answer.status_code == 302, answer.text
    assert answer.headers["cache-control"] == "no-store"
    script.values.clear()
    return answer.headers["location"]


async def postback(client: httpx.AsyncClient, click_id: str, expect: str = "created", **fields: str) -> None:
    answer = await client.get("/postback", params={"click_id": click_id, "token": POSTBACK_TOKEN, **fields})
    assert (answer.status_code, answer.json().get("status")) == (200, expect), answer.text


async def stats(client: httpx.AsyncClient, query: str) -> list[dict]:
    answer = await client.get(f"/api/stats?{query}", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return answer.json()["rows"]


def db_rows(app: tinytrack.TinyTrack, sql: str, args: Iterable = ()) -> list[tuple]:
    with closing(sqlite3.connect(app.config.storage.path)) as con:
        return con.execute(sql, tuple(args)).fetchall()


def clicks_of(app: tinytrack.TinyTrack, click_id: str) -> tuple:
    """A click's lander, offer, whether it had an LP click, and its flags' names."""
    lander, offer, lp, flags = db_rows(
        app, "SELECT lander, offer, lp_at IS NOT NULL, flags FROM clicks WHERE id = ?", [uuid(click_id)]
    )[0]
    return lander, offer, lp, flags and ", ".join(sorted(json.loads(flags)))


def uuid(text: str) -> bytes:
    return bytes.fromhex(text.replace("-", ""))


# --- the config -------------------------------------------------------------------


def campaign_config(**campaign: object) -> dict:
    return {"postback": {"tokens": ["t" * 16]}, "admin": {"token": "a" * 16}, "campaigns": {"x": campaign}}


def arm(name: str, weight: object = 1, **more: object) -> dict:
    return {"name": name, "url": f"https://{name}.example/?c={{click_id}}", "weight": weight, **more}


def test_a_campaign_reads_its_offers_and_landers():
    campaign = build_config(
        campaign_config(offers=[arm("a", 70), arm("b", 30), arm("c", 0)], landers=[arm("lp1", 1)])
    ).campaigns["x"]
    assert [(o.name, o.weight) for o in campaign.offers.arms] == [("a", 70), ("b", 30), ("c", 0)]
    assert [o.name for o in campaign.offers.live] == ["a", "b"]  # c is paused
    assert [lander.name for lander in campaign.landers.arms] == ["lp1"]
    assert campaign.funnel


def test_a_plain_url_is_one_offer_named_default_and_no_funnel():
    campaign = build_config(campaign_config(url="https://o.example/?c={click_id}&o={offer}")).campaigns["x"]
    assert [(o.name, o.weight) for o in campaign.offers.arms] == [("default", 1)]
    assert campaign.landers is None and not campaign.funnel


def test_a_url_with_landers_is_one_offer_behind_them():
    campaign = build_config(campaign_config(url="https://o.example/?l={lander}", landers=[arm("lp")])).campaigns["x"]
    assert [o.name for o in campaign.offers.arms] == ["default"] and campaign.funnel


@pytest.mark.parametrize(
    "campaign, message",
    [
        (
            {"url": "https://o.example/", "offers": [arm("a")]},
            "campaigns.x.offers: use url (one offer) or offers, not both",
        ),
        ({}, "campaigns.x.url: is required (or offers, a list of them)"),
        ({"offers": []}, "campaigns.x.offers: must list at least one (or leave it out)"),
        ({"offers": "a"}, "campaigns.x.offers: must be a list, got 'a'"),
        (
            {"offers": ["a"]},
            'campaigns.x.offers[0]: must be a table like { name = "a", url = "https://..." }, got \'a\'',
        ),
        ({"offers": [{"url": "https://o.example/"}]}, "campaigns.x.offers[0].name: is required"),
        ({"offers": [arm("A")]}, "campaigns.x.offers[0].name: must be 1-32 characters of a-z 0-9 _ -, got 'A'"),
        (
            {"offers": [arm("a" * 33)]},
            f"campaigns.x.offers[0].name: must be 1-32 characters of a-z 0-9 _ -, got '{'a' * 33}'",
        ),
        ({"offers": [arm("a"), arm("a")]}, "campaigns.x.offers[1].name: 'a' is used twice"),
        ({"offers": [{"name": "a"}]}, "campaigns.x.offers[0].url: is required"),
        ({"offers": [arm("a", -1)]}, "campaigns.x.offers[0].weight: must be between 0 and 1000000, got -1"),
        ({"offers": [arm("a", 1_000_001)]}, "campaigns.x.offers[0].weight: must be between 0 and 1000000, got 1000001"),
        ({"offers": [arm("a", 1.5)]}, "campaigns.x.offers[0].weight: must be an integer, got '1.5'"),
        ({"offers": [arm("a", "1")]}, "campaigns.x.offers[0].weight: must be an integer, got '1'"),
        ({"offers": [arm("a", True)]}, "campaigns.x.offers[0].weight: must be an integer, got 'True'"),
        (
            {"offers": [arm("a", 0), arm("b", 0)]},
            "campaigns.x.offers: every weight is 0: at least one must be above 0 to send visitors anywhere",
        ),
        ({"offers": [arm("a", 1, share=3)]}, "campaigns.x.offers[0].share: unknown key"),
        (
            {"offers": [{"name": "a", "url": "https://o.example/?x={nope}"}]},
            "campaigns.x.offers[0].url: unknown macro {nope}; known: click_id, campaign, sub1, sub2, sub3, sub4, sub5, "
            "ext_id, offer, lander",
        ),
        (
            {"offers": [{"name": "a", "url": "https://{offer}.example/"}]},
            "campaigns.x.offers[0].url: macros are only allowed after the host, got 'https://{offer}.example/'",
        ),
        ({"offers": [arm("a")], "landers": []}, "campaigns.x.landers: must list at least one (or leave it out)"),
        (
            {"offers": [arm("a")], "landers": [arm("lp", 0)]},
            "campaigns.x.landers: every weight is 0: at least one must be above 0 to send visitors anywhere",
        ),
        (
            {"url": "https://o.example/?{x}", "landers": [arm("lp")]},
            "campaigns.x.url: unknown macro {x}; known: click_id, campaign, sub1, sub2, sub3, sub4, sub5, ext_id, offer, lander",
        ),
    ],
)
def test_bad_offers_and_landers_name_the_key(campaign: dict, message: str):
    with pytest.raises(ConfigError) as caught:
        build_config(campaign_config(**campaign))
    assert str(caught.value) == message


def test_check_command_names_a_bad_offer(tmp_path: Path):
    path = write_config(
        tmp_path, extra='[campaigns.bad]\noffers = [{ name = "a", url = "https://a.example/", weight = -5 }]\n'
    )
    done = run("check", "-c", str(path), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == "tinytrack: campaigns.bad.offers[0].weight: must be between 0 and 1000000, got -5\n"


# --- the weighted pick -----------------------------------------------------------


def rotation(*weights: int) -> Rotation:
    template = split_template("https://o.example/", "t", ())
    return Rotation.of(Arm(f"arm{i}", template, w) for i, w in enumerate(weights))


def split(rot: Rotation, rng, n: int = 10_000) -> dict[str, float]:
    picks = Counter(rot.pick(rng).name for _ in range(n))
    return {name: 100 * count / n for name, count in picks.items()}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ten_thousand_seeded_picks_are_within_3_points_of_the_weights(seed: int):
    shares = split(rotation(70, 30), random.Random(seed).random)
    assert abs(shares["arm0"] - 70) <= 3 and abs(shares["arm1"] - 30) <= 3
    shares = split(rotation(50, 0, 30, 20), random.Random(seed).random)
    assert "arm1" not in shares  # paused: never picked
    assert all(abs(shares[f"arm{i}"] - w) <= 3 for i, w in ((0, 50), (2, 30), (3, 20)))


def test_ten_thousand_picks_with_the_real_random_source_are_within_3_points():
    # 10,000 draws at p = 0.7: one standard deviation is 0.46 points, so 3 points is 6.5 of them.
    shares = split(rotation(70, 30), random.random)
    assert abs(shares["arm0"] - 70) <= 3 and abs(shares["arm1"] - 30) <= 3


def test_a_pick_uses_the_running_totals_exactly():
    rot = rotation(70, 30)
    draws = (0.0, 0.6999, 0.7, 0.99999999999)
    assert [rot.pick(lambda x=x: x).name for x in draws] == ["arm0", "arm0", "arm1", "arm1"]
    assert rotation(5).pick(lambda: pytest.fail("one arm draws nothing")).name == "arm0"


async def test_clicks_follow_a_seeded_generator_and_the_report_counts_them(make_app):
    """2,000 clicks through HTTP with random.Random(11): each click's offer and lander are
    the generator's draws, in order (offer, then lander), and by=offer / by=lander count them."""
    app = await make_app(FUNNELS, rng=random.Random(11).random)
    replay = random.Random(11)
    want_offer, want_lander = Counter(), Counter()
    for _ in range(2000):
        want_offer["a" if replay.random() * 100 < 70 else "b"] += 1
        want_lander["lp1" if replay.random() * 100 < 50 else "lp2"] += 1
    async with client_for(app) as http:
        for i in range(2000):
            answer = await http.get("/c/split", headers={"user-agent": f"{HUMAN} {i}"})
            assert answer.status_code == 302
        by_offer = {r["offer"]: r["clicks"] for r in await stats(http, f"from={D}&to={D}&by=offer")}
        by_lander = {r["lander"]: r["clicks"] for r in await stats(http, f"from={D}&to={D}&by=lander")}
    assert by_offer == want_offer and by_lander == want_lander
    assert abs(100 * want_offer["a"] / 2000 - 70) <= 3  # and the split is the weights'
    assert Counter(dict(db_rows(app, "SELECT offer, count(*) FROM clicks GROUP BY 1"))) == want_offer


# --- the click -------------------------------------------------------------------


async def test_a_click_goes_to_its_lander_with_its_offer_named(client, app, script):
    script.then(B, LP2)
    answer = await client.get("/c/split?sub1=zone7", headers={"user-agent": HUMAN})
    assert answer.status_code == 302 and answer.headers["cache-control"] == "no-store"
    location = answer.headers["location"]
    click_id = location.split("cid=")[1].split("&")[0]
    assert location == f"https://lp.example/two?cid={click_id}&o=b"
    assert clicks_of(app, click_id) == ("lp2", "b", 0, None)


async def test_a_click_without_landers_goes_to_its_offer(client, app, script):
    script.then(0.9)  # weights 1 and 1: "b"
    answer = await client.get("/c/direct", headers={"user-agent": HUMAN})
    click_id = answer.headers["location"].split("cid=")[1].split("&")[0]
    assert answer.headers["location"] == f"https://offer-b.example/?cid={click_id}&o=b"
    assert clicks_of(app, click_id) == (None, "b", 0, None)


async def test_a_plain_url_campaign_is_as_before(client, app, script):
    answer = await client.get("/c/plain", headers={"user-agent": HUMAN})  # no draw: the script is empty
    click_id = answer.headers["location"].split("cid=")[1].split("&")[0]
    assert answer.headers["location"] == f"https://offer.example.com/lp?cid={click_id}&o=default"
    assert clicks_of(app, click_id) == (None, None, 0, None)
    assert db_rows(app, "SELECT count(*) FROM daily_funnel") == [(0,)]  # no funnel totals for it


async def test_head_picks_but_stores_nothing(client, app, script):
    script.then(A, LP1)
    answer = await client.head("/c/split")
    assert answer.status_code == 302 and answer.headers["location"].startswith("https://lp.example/one?cid=")
    assert db_rows(app, "SELECT count(*) FROM clicks") == [(0,)]
    script.then(A)
    answer = await client.head("/go/split")
    assert answer.status_code == 302 and answer.headers["location"].startswith("https://offer-a.example/?cid=")
    assert db_rows(app, "SELECT count(*) FROM clicks") == [(0,)]


# --- the LP click ----------------------------------------------------------------


async def test_an_lp_click_goes_to_the_clicks_offer_and_is_counted_once(client, app, script):
    click_id = await click(client, script, B, LP1, sub1="zone7")
    for _ in range(3):  # the lander says a (the pick), but the click was given b: sticky
        location = await lp_click(client, script, cid=click_id, pick=A)
        assert location == f"https://offer-b.example/?cid={click_id}&l=lp1&s=zone7"
    assert clicks_of(app, click_id) == ("lp1", "b", 1, None)
    rows = await stats(client, f"from={D}&to={D}&by=offer")
    assert [(r["offer"], r["clicks"], r["lp_clicks"], r["lp_ctr"]) for r in rows] == [("b", 1, 1, "100.00")]
    assert db_rows(app, "SELECT sum(lp_clicks), sum(lander_clicks) FROM daily_clicks") == [(1, 1)]


async def test_an_lp_click_naming_an_offer_goes_there_and_takes_the_credit(client, app, script):
    click_id = await click(client, script, A, LP1)
    location = await lp_click(client, script, cid=click_id, offer="b")
    assert location.startswith(f"https://offer-b.example/?cid={click_id}")
    assert clicks_of(app, click_id) == ("lp1", "b", 1, None)
    location = await lp_click(client, script, cid=click_id, offer="a")  # the visitor came back and chose a
    assert location.startswith("https://offer-a.example/")
    assert clicks_of(app, click_id) == ("lp1", "a", 1, None)  # still one LP click; the credit follows
    rows = await stats(client, f"from={D}&to={D}&by=offer")
    # The click is counted under the offer it was given (a); its LP click, once, under the
    # offer it went to last (b, then a), as its conversion will be.
    assert [(r["offer"], r["clicks"], r["lp_clicks"]) for r in rows] == [("a", 1, 1)]
    await lp_click(client, script, cid=click_id, offer="b")
    await postback(client, click_id, payout="5")
    rows = await stats(client, f"from={D}&to={D}&by=offer")
    assert [(r["offer"], r["clicks"], r["lp_clicks"], r["approved"], r["payout"]) for r in rows] == [
        ("a", 1, 0, 0, {}),
        ("b", 0, 1, 1, {"USD": "5.00"}),
    ]
    assert db_rows(app, "SELECT lander, offer FROM conversions") == [("lp1", "b")]
    (campaign,) = await stats(client, f"from={D}&to={D}&by=campaign&campaign=split")
    assert (campaign["lp_clicks"], campaign["lp_ctr"]) == (1, "100.00")


@pytest.mark.parametrize(
    "cid",
    [
        None,  # missing
        "",
        "not-a-click-id",
        "0190a6b2-7c1d-7abc-8def-0123456789ab",  # well formed, never issued
        "0190A6B2-7C1D-7ABC-8DEF-0123456789AB' OR 1=1 --",
    ],
)
async def test_an_lp_click_without_a_known_click_is_a_new_click_flagged_no_click_id(client, app, script, cid):
    params = {} if cid is None else {"cid": cid}
    location = await lp_click(client, script, pick=B, sub1="lander-ad", **params)
    new_id = location.split("cid=")[1].split("&")[0]
    assert location == f"https://offer-b.example/?cid={new_id}&l=&s=lander-ad"
    assert new_id != cid
    assert clicks_of(app, new_id) == (None, "b", 1, "no_click_id")
    assert db_rows(app, "SELECT campaign, sub1, cost FROM clicks") == [("split", "lander-ad", None)]
    rows = await stats(client, f"from={D}&to={D}&by=lander")
    assert [(r["lander"], r["clicks"], r["lp_clicks"], r["lp_ctr"]) for r in rows] == [("", 1, 1, None)]
    metrics = (await client.get("/metrics", headers=ADMIN)).text
    assert 'tinytrack_lp_clicks_total{click="no_click_id"} 1' in metrics


async def test_an_lp_click_with_a_click_of_another_campaign_is_a_new_click(client, app, script):
    other = await click(client, script, A, campaign="direct")
    location = await lp_click(client, script, pick=A, cid=other)
    new_id = location.split("cid=")[1].split("&")[0]
    assert new_id != other
    assert clicks_of(app, new_id)[3] == "no_click_id"
    assert clicks_of(app, other) == (None, "a", 0, None)  # the other campaign's click is untouched


async def test_an_lp_click_of_an_unknown_campaign_is_a_404_and_other_methods_a_405(client, app):
    answer = await client.get("/go/nope?cid=x")
    assert answer.status_code == 404 and "location" not in answer.headers
    answer = await client.post("/go/split")
    assert answer.status_code == 405 and answer.headers["allow"] == "GET, HEAD"
    assert db_rows(app, "SELECT count(*) FROM clicks") == [(0,)]


async def test_a_bot_clicks_lp_click_is_redirected_but_not_counted(client, app, script):
    click_id = await click(client, script, A, LP1, ua=GOOGLEBOT)
    await lp_click(client, script, cid=click_id)
    assert clicks_of(app, click_id)[2] == 1
    rows = await stats(client, f"from={D}&to={D}&by=lander&bots=1")
    assert [(r["lander"], r["clicks"], r["bot_clicks"], r["lp_clicks"]) for r in rows] == [("lp1", 1, 1, 0)]


async def test_pass_query_goes_to_the_lander_and_on_to_the_offer(make_app, script):
    extra = FUNNELS.replace("[campaigns.direct]", "pass_query = true\n\n[campaigns.direct]", 1)
    app = await make_app(extra, rng=script)
    async with client_for(app) as http:
        script.then(A, LP1)
        answer = await http.get("/c/split?utm=x", headers={"user-agent": HUMAN})
        assert answer.headers["location"].endswith("&o=a&utm=x")
        click_id = answer.headers["location"].split("cid=")[1].split("&")[0]
        location = await lp_click(http, script, cid=click_id, offer="a", utm="y")
        assert location == f"https://offer-a.example/?cid={click_id}&l=lp1&s=&utm=y"  # cid and offer not passed on


# --- a reload that pauses or removes an offer ---------------------------------------


async def test_a_reload_that_pauses_an_offer(client, app, script, tmp_path):
    sticky_b = await click(client, script, B, LP1)
    path = write_config(tmp_path, extra=FUNNELS.replace("weight = 30 }", "weight = 0 }", 1))
    assert app.reload(str(path))
    # New clicks: b is paused, so the only live offer is a and nothing is drawn for it.
    script.then(LP2)
    answer = await client.get("/c/split", headers={"user-agent": HUMAN})
    new = answer.headers["location"].split("cid=")[1].split("&")[0]
    assert answer.headers["location"] == f"https://lp.example/two?cid={new}&o=a"
    # The click given b before: its LP click goes to a live offer (here the pick, a), and
    # so does an LP click that names the paused one.
    location = await lp_click(client, script, cid=sticky_b, pick=0.9)
    assert location.startswith("https://offer-a.example/")
    assert clicks_of(app, sticky_b) == ("lp1", "a", 1, None)
    location = await lp_click(client, script, cid=new, offer="b")
    assert location.startswith("https://offer-a.example/")


async def test_a_reload_that_removes_an_offer_and_changes_weights(client, app, script, tmp_path):
    sticky_b = await click(client, script, B, LP1)
    removed = FUNNELS.replace(
        '  { name = "b", url = "https://offer-b.example/?cid={click_id}&l={lander}&s={sub1}", weight = 30 },\n',
        '  { name = "c", url = "https://offer-c.example/?cid={click_id}", weight = 30 },\n',
    ).replace("weight = 70 }", "weight = 10 }")
    assert app.reload(str(write_config(tmp_path, extra=removed)))
    # Weights 10 / 30 now: 0.2 x 40 = 8 is a, 0.3 x 40 = 12 is c (it was a under 70/30).
    assert (await click(client, script, 0.2, LP1)) and (await click(client, script, 0.3, LP1))
    assert [row[0] for row in db_rows(app, "SELECT offer FROM clicks ORDER BY id")] == ["b", "a", "c"]
    location = await lp_click(client, script, cid=sticky_b, pick=0.9)  # b is gone: picks again, c
    assert location == f"https://offer-c.example/?cid={sticky_b}"


async def test_a_bad_reload_keeps_the_offers(client, app, script, tmp_path):
    bad = FUNNELS.replace("weight = 70 }", "weight = 0 }").replace("weight = 30 }", "weight = 0 }")
    assert not app.reload(str(write_config(tmp_path, extra=bad)))
    assert await click(client, script, B, LP1)
    assert db_rows(app, "SELECT offer FROM clicks") == [("b",)]


# --- credit and reports, by hand --------------------------------------------------


async def seed_split(client: httpx.AsyncClient, script: Script) -> dict[str, str]:
    """Six clicks on `split` (cpc 0.10 each, bots free), their LP clicks and conversions."""
    ids = {
        "c1": await click(client, script, A, LP1),
        "c2": await click(client, script, A, LP2),
        "c3": await click(client, script, B, LP1),
        "c4": await click(client, script, B, LP2),
        "c5": await click(client, script, A, LP1),
        "c6": await click(client, script, A, LP1, ua=GOOGLEBOT),
    }
    await lp_click(client, script, cid=ids["c1"])
    await lp_click(client, script, cid=ids["c2"])
    await lp_click(client, script, cid=ids["c2"])  # again: counted once
    await lp_click(client, script, cid=ids["c3"])
    await lp_click(client, script, cid=ids["c6"])  # a bot's: not counted
    await postback(client, ids["c1"], payout="2.00")
    await postback(client, ids["c3"], payout="3.00")
    await postback(client, ids["c3"], payout="1.00", event="upsell", status="pending")
    return ids


async def test_stats_per_offer_and_lander_are_the_hand_computed_figures(client, app, script):
    await seed_split(client, script)
    q = f"from={D}&to={D}&campaign=split"
    by_offer = await stats(client, f"{q}&by=offer")
    # a: c1, c2, c5 (c6 a bot) = 3 clicks; LP clicks c1, c2 = 2 of 3 lander visits: 66.67%;
    # 1 approved conversion (c1, 2.00): CR 1/3 = 33.33%, EPC 2.00/3 = 0.6667; cost 3 x 0.10
    # = 0.30, profit 1.70, ROI 1.70/0.30 = 566.67%, CPA 0.30/1 = 0.3000.
    # b: c3, c4 = 2 clicks; LP click c3: 50.00%; c3's approved 3.00 and pending 1.00: 2
    # conversions, CR 100.00%, EPC 3.00/2 = 1.5000; cost 0.20, profit 2.80, ROI 1400.00%,
    # CPA 0.20/2 = 0.1000.
    assert by_offer == [
        {
            "offer": "a",
            "clicks": 3,
            "unique_clicks": 1,  # one address and User-Agent: the first click of the day only
            "bot_clicks": 1,
            "conversions": 1,
            "approved": 1,
            "pending": 0,
            "rejected": 0,
            "lp_clicks": 2,
            "flagged_clicks": 0,
            "flagged_conversions": 0,
            "pixel_only": 0,
            "payout": {"USD": "2.00"},
            "cost": {"USD": "0.30"},
            "profit": {"USD": "1.70"},
            "roi": {"USD": "566.67"},
            "cr": "33.33",
            "epc": {"USD": "0.6667"},
            "cpa": {"USD": "0.3000"},
            "lp_ctr": "66.67",
        },
        {
            "offer": "b",
            "clicks": 2,
            "unique_clicks": 0,
            "bot_clicks": 0,
            "conversions": 2,
            "approved": 1,
            "pending": 1,
            "rejected": 0,
            "lp_clicks": 1,
            "flagged_clicks": 0,
            "flagged_conversions": 0,
            "pixel_only": 0,
            "payout": {"USD": "3.00"},
            "cost": {"USD": "0.20"},
            "profit": {"USD": "2.80"},
            "roi": {"USD": "1400.00"},
            "cr": "100.00",
            "epc": {"USD": "1.5000"},
            "cpa": {"USD": "0.1000"},
            "lp_ctr": "50.00",
        },
    ]
    by_lander = await stats(client, f"{q}&by=lander")
    # lp1: c1, c3, c5 = 3 clicks (c6 a bot); LP clicks c1, c3 = 66.67%; conversions c1
    # (2.00) and c3 (3.00 approved, 1.00 pending) = 3, payout 5.00; CR 100.00%, EPC
    # 5.00/3 = 1.6667; cost 0.30, profit 4.70, ROI 1566.67%, CPA 0.30/3 = 0.1000.
    # lp2: c2, c4 = 2 clicks; LP click c2 (twice, counted once) = 50.00%; nothing
    # converted: cost 0.20, profit -0.20, ROI -100.00%.
    assert [
        (r["lander"], r["clicks"], r["bot_clicks"], r["lp_clicks"], r["lp_ctr"], r["conversions"], r["payout"])
        for r in by_lander
    ] == [("lp1", 3, 1, 2, "66.67", 3, {"USD": "5.00"}), ("lp2", 2, 0, 1, "50.00", 0, {})]
    lp1, lp2 = by_lander
    assert (lp1["cr"], lp1["epc"], lp1["cost"], lp1["profit"], lp1["roi"], lp1["cpa"]) == (
        "100.00",
        {"USD": "1.6667"},
        {"USD": "0.30"},
        {"USD": "4.70"},
        {"USD": "1566.67"},
        {"USD": "0.1000"},
    )
    assert (lp2["cr"], lp2["epc"], lp2["cost"], lp2["profit"], lp2["roi"]) == (
        "0.00",
        {},
        {"USD": "0.20"},
        {"USD": "-0.20"},
        {"USD": "-100.00"},
    )
    # Every report has them: the campaign's 3 LP clicks of 5 lander visits = 60.00%.
    (campaign,) = await stats(client, f"{q}&by=campaign")
    assert (campaign["clicks"], campaign["lp_clicks"], campaign["lp_ctr"]) == (5, 3, "60.00")
    (day,) = await stats(client, f"{q}&by=day")
    assert (day["lp_clicks"], day["lp_ctr"]) == (3, "60.00")
    sub2 = await stats(client, f"{q}&by=sub2")  # from the raw rows: the same
    assert [(r["clicks"], r["lp_clicks"], r["lp_ctr"]) for r in sub2] == [(5, 3, "60.00")]
    # The CSV says the same, and the CLI reads it too.
    csv_answer = await client.get(f"/api/stats?{q}&by=offer&format=csv", headers=ADMIN)
    header, a_row = csv_answer.text.splitlines()[:2]
    cells = dict(zip(header.replace('"', "").split(","), a_row.replace('"', "").split(",")))
    assert (cells["offer"], cells["lp_clicks"], cells["lp_ctr"], cells["roi_USD"]) == ("a", "2", "66.67", "566.67")


async def test_the_cli_reports_by_offer_and_lander(client, app, script, tmp_path):
    await seed_split(client, script)
    path = tmp_path / "config.toml"
    done = run("stats", "-c", str(path), "--by", "lander", "--from", D, "--to", D, "--campaign", "split", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{D} to {D} (UTC), by lander, campaign split"
    header = lines[1].split()
    assert header[0] == "lander" and "lp_clicks" in header and "lp_ctr" in header
    lp1 = dict(zip(header, lines[2].split()))
    assert (lp1["lander"], lp1["clicks"], lp1["lp_clicks"], lp1["lp_ctr"], lp1["roi_USD"]) == (
        "lp1",
        "3",
        "2",
        "66.67",
        "1566.67",
    )


async def test_a_plain_url_campaign_reports_as_offer_default(client, app, script):
    ids = [await click(client, script, None, campaign="plain") for _ in range(2)]  # nothing drawn
    await postback(client, ids[0], payout="1.25")
    rows = await stats(client, f"from={D}&to={D}&campaign=plain&by=offer")
    assert [(r["offer"], r["clicks"], r["approved"], r["payout"], r["lp_ctr"]) for r in rows] == [
        ("default", 2, 1, {"USD": "1.25"}, None)
    ]
    rows = await stats(client, f"from={D}&to={D}&campaign=plain&by=lander")
    assert [(r["lander"], r["clicks"]) for r in rows] == [("", 2)]


async def test_conversions_keep_their_offer_and_lander_after_the_clicks_purge(make_app, script):
    app = await make_app(FUNNELS, rng=script)
    async with client_for(app) as http:
        ids = await seed_split(http, script)
        before = await stats(http, f"from={D}&to={D}&by=offer")
        listed = (await http.get("/api/conversions?since=2026-01-01", headers=ADMIN)).json()["rows"]
        assert [(r["click_id"], r["lander"], r["offer"]) for r in listed] == [
            (ids["c1"], "lp1", "a"),
            (ids["c3"], "lp1", "b"),
            (ids["c3"], "lp1", "b"),
        ]
        with closing(sqlite3.connect(app.config.storage.path)) as con, con:
            con.execute("DELETE FROM clicks")  # as the clicks_days purge does
        assert await stats(http, f"from={D}&to={D}&by=offer") == before


async def test_forward_macros_offer_and_lander(client, app, script):
    click_id = await click(client, script, B, LP2)
    await lp_click(client, script, cid=click_id)
    await postback(client, click_id, payout="4.5")
    plain = await click(client, script, None, campaign="plain")
    await postback(client, plain, payout="1")
    urls = [row[0] for row in db_rows(app, "SELECT url FROM outbox ORDER BY id")]
    assert urls == [
        f"https://source.example/pb?c={click_id}&o=b&l=lp2&p=4.50",
        f"https://source.example/pb?c={plain}&o=default&l=",
    ]


async def test_admin_shows_a_table_per_campaigns_landers_and_offers(client, app, script):
    await seed_split(client, script)
    page = (await client.get("/admin", headers=ADMIN)).text
    assert "<h2>Landers and offers: split</h2>" in page
    assert "<h2>Landers and offers: direct</h2>" in page
    assert "Landers and offers: plain" not in page  # one offer, no landers: nothing to compare
    table = page.split("<h2>Landers and offers: split</h2>")[1].split("</table>")[0]
    cells = [
        [re.sub("<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        for row in table.split("<tr>")[2:]
    ]
    # kind, name, clicks, LP clicks, LP CTR, conv., CR, payout, EPC, cost, profit, ROI
    assert cells == [
        [
            "lander",
            "lp1",
            "3",
            "2",
            "66.67",
            "3",
            "100.00",
            "5.00 USD",
            "1.6667 USD",
            "0.30 USD",
            "4.70 USD",
            "1566.67 USD",
        ],
        ["lander", "lp2", "2", "1", "50.00", "0", "0.00", "-", "-", "0.20 USD", "-0.20 USD", "-100.00 USD"],
        ["offer", "a", "3", "2", "66.67", "1", "33.33", "2.00 USD", "0.6667 USD", "0.30 USD", "1.70 USD", "566.67 USD"],
        [
            "offer",
            "b",
            "2",
            "1",
            "50.00",
            "2",
            "100.00",
            "3.00 USD",
            "1.5000 USD",
            "0.20 USD",
            "2.80 USD",
            "1400.00 USD",
        ],
    ]


# --- durability: kill -9 right after an LP click's 302 ---------------------------


def test_an_lp_click_survives_kill_9_right_after_its_302(tmp_path: Path):
    port = free_port()
    server = Server(tmp_path, write_config(tmp_path, port, extra=FUNNELS), port).start()
    try:
        with server.client() as http:
            answer = http.get("/c/split", headers={"user-agent": HUMAN})
            click_id = answer.headers["location"].split("cid=")[1].split("&")[0]
            answer = http.get(f"/go/split?cid={click_id}", headers={"user-agent": HUMAN})
            assert answer.status_code == 302
            lost = http.get("/go/split?cid=lost", headers={"user-agent": HUMAN})
            assert lost.status_code == 302
        server.stop(signal.SIGKILL)  # no shutdown: only what was committed is there
        new_id = lost.headers["location"].split("cid=")[1].split("&")[0]
        server.start()
        server.stop()
        with closing(sqlite3.connect(tmp_path / "tinytrack.db")) as con:
            rows = dict(con.execute("SELECT id, lp_at IS NOT NULL FROM clicks"))
            assert rows == {uuid(click_id): 1, uuid(new_id): 1}
            assert con.execute("SELECT flags FROM clicks WHERE id = ?", (uuid(new_id),)).fetchone() == (
                '{"no_click_id":"cid: not a click id, got \'lost\'"}',
            )
            assert con.execute("SELECT sum(clicks), sum(lp_clicks) FROM daily_clicks").fetchone() == (2, 2)
    finally:
        if server.process and server.process.poll() is None:
            server.stop(signal.SIGKILL)


# --- upgrades ---------------------------------------------------------------------


def test_a_version_4_database_gains_the_funnel_columns_and_keeps_its_clicks(tmp_path: Path):
    path = str(tmp_path / "old.db")
    with closing(sqlite3.connect(path)) as con:
        for number, script_ in enumerate(tinytrack.SCHEMA[:4], start=1):
            con.executescript(f"BEGIN; {script_}; PRAGMA user_version = {number}; COMMIT;")
        con.execute(
            "INSERT INTO clicks (id, ts, campaign, bot) VALUES (?, ?, 'spring', 0)", (bytes(16), 1_790_000_000_000)
        )
        con.execute(
            "INSERT INTO daily_clicks (day, campaign, sub1, clicks, bot_clicks) VALUES (20717, 'spring', '', 1, 0)"
        )
        con.commit()
    with closing(tinytrack.open_database(path)) as con:
        assert con.execute("PRAGMA user_version").fetchone() == (len(tinytrack.SCHEMA),)
        assert con.execute("SELECT lander, offer, lp_at, flags FROM clicks").fetchall() == [(None, None, None, None)]
        assert con.execute("SELECT lp_clicks, lander_clicks FROM daily_clicks").fetchall() == [(0, 0)]


async def test_a_batch_of_human_and_bot_clicks_counts_each_lander_visit_once(make_app):
    """Clicks that arrive together are written in one transaction (group commit): their
    totals are added up per row there, humans and bots apart."""
    app = await make_app(FUNNELS, rng=random.Random(5).random)
    async with client_for(app) as http:
        uas = [HUMAN, GOOGLEBOT, HUMAN + " 2", GOOGLEBOT, HUMAN + " 3"] * 4
        answers = await asyncio.gather(*(http.get("/c/split", headers={"user-agent": ua}) for ua in uas))
        assert all(answer.status_code == 302 for answer in answers)
        assert app.store.batches < len(uas)  # they were batched
        ids = [answer.headers["location"].split("cid=")[1].split("&")[0] for answer in answers]
        lp = await asyncio.gather(*(http.get(f"/go/split?cid={cid}", headers={"user-agent": HUMAN}) for cid in ids))
        assert all(answer.status_code == 302 for answer in lp)
    # 12 humans (all sent to a lander, all with an LP click), 8 bots (neither counted).
    assert db_rows(
        app, "SELECT sum(clicks), sum(bot_clicks), sum(lander_clicks), sum(lp_clicks) FROM daily_clicks"
    ) == [(12, 8, 12, 12)]
    assert db_rows(app, "SELECT sum(clicks), sum(bot_clicks), sum(lp_clicks) FROM daily_funnel") == [(12, 8, 12)]


async def test_a_bots_lp_click_on_a_humans_click_changes_nothing(client, app, script):
    """A link scanner fetching every button on a lander: redirected, never counted, and
    never moves the visitor's credit."""
    click_id = await click(client, script, A, LP1)
    script.then(A)
    answer = await client.get(f"/go/split?cid={click_id}&offer=b", headers={"user-agent": GOOGLEBOT})
    assert answer.status_code == 302 and answer.headers["location"].startswith(
        f"https://offer-b.example/?cid={click_id}"
    )
    assert clicks_of(app, click_id) == ("lp1", "a", 0, None)
    (row,) = await stats(client, f"from={D}&to={D}&by=campaign&campaign=split")
    assert (row["lp_clicks"], row["lp_ctr"]) == (0, "0.00")


async def test_lp_ctr_counts_only_lp_clicks_of_clicks_sent_to_a_lander(client, app, script):
    click_id = await click(client, script, A, LP1)
    await lp_click(client, script, cid=click_id)
    for _ in range(3):  # a lander opened directly: three new clicks without a lander
        await lp_click(client, script)
    (row,) = await stats(client, f"from={D}&to={D}&by=campaign&campaign=split")
    # 4 clicks, all with an LP click; 1 sent to a lander, with its LP click: 100.00%.
    assert (row["clicks"], row["lp_clicks"], row["lp_ctr"]) == (4, 4, "100.00")
    rows = await stats(client, f"from={D}&to={D}&by=lander&campaign=split")
    assert [(r["lander"], r["clicks"], r["lp_clicks"], r["lp_ctr"]) for r in rows] == [
        ("", 3, 3, None),
        ("lp1", 1, 1, "100.00"),
    ]
    (sub2,) = await stats(client, f"from={D}&to={D}&by=sub2&campaign=split")  # the raw rows agree
    assert (sub2["clicks"], sub2["lp_clicks"], sub2["lp_ctr"]) == (4, 4, "100.00")


REVSHARE = """
[campaigns.rev]
offers = [
  { name = "a", url = "https://a.example/?cid={click_id}" },
  { name = "b", url = "https://b.example/?cid={click_id}" },
]
cost_model = "revshare"
cost_value = "50"
"""


async def test_revshare_and_cpa_costs_are_each_offers_own(make_app, script):
    app = await make_app(REVSHARE, rng=script)
    async with client_for(app) as http:
        a = await click(http, script, 0.1, campaign="rev")
        b = await click(http, script, 0.9, campaign="rev")
        await postback(http, a, payout="100")  # 50% of 100: 50.00
        await postback(http, b, payout="10")  # 5.00
        await postback(http, b, payout="6", event="upsell", status="pending")  # pending: no cost
        rows = {r["offer"]: r for r in await stats(http, f"from={D}&to={D}&by=offer&campaign=rev")}
        assert {k: (r["cost"], r["profit"], r["roi"]) for k, r in rows.items()} == {
            "a": ({"USD": "50.00"}, {"USD": "50.00"}, {"USD": "100.00"}),
            "b": ({"USD": "5.00"}, {"USD": "5.00"}, {"USD": "100.00"}),
        }
        await postback(http, a, expect="updated", status="rejected")  # a reversal takes a's cost back
        rows = {r["offer"]: r for r in await stats(http, f"from={D}&to={D}&by=offer&campaign=rev")}
        assert {k: r["cost"] for k, r in rows.items()} == {"a": {}, "b": {"USD": "5.00"}}


async def test_an_lp_click_after_a_reload_to_a_plain_url_keeps_its_lander(client, app, script, tmp_path):
    click_id = await click(client, script, A, LP1)
    plain = FUNNELS.replace(
        FUNNELS[FUNNELS.index("[campaigns.split]") : FUNNELS.index("[campaigns.direct]")],
        '[campaigns.split]\nurl = "https://offer-x.example/?cid={click_id}"\n\n',
    )
    assert app.reload(str(write_config(tmp_path, extra=plain)))
    location = await lp_click(client, script, cid=click_id)
    assert location == f"https://offer-x.example/?cid={click_id}"
    rows = await stats(client, f"from={D}&to={D}&by=lander&campaign=split")
    assert [(r["lander"], r["clicks"], r["lp_clicks"], r["lp_ctr"]) for r in rows] == [("lp1", 1, 1, "100.00")]


async def test_the_first_cid_that_says_something_and_an_uppercase_offer(client, app, script):
    click_id = await click(client, script, A, LP1)
    location = await lp_click(client, script, pick=B, cid="", click_id=click_id, offer="B")
    assert location.startswith(f"https://offer-b.example/?cid={click_id}")
    assert clicks_of(app, click_id) == ("lp1", "b", 1, None)
    assert db_rows(app, "SELECT count(*) FROM clicks") == [(1,)]


async def test_lp_clicks_of_one_click_in_one_batch_count_once_where_its_credit_ends(client, app, script):
    click_id = await click(client, script, A, LP1)
    script.then(*[A] * 6)
    answers = await asyncio.gather(
        *(
            client.get(f"/go/split?cid={click_id}&offer={offer}", headers={"user-agent": HUMAN})
            for offer in ("b", "a", "b", "a", "b", "b")
        )
    )
    assert [answer.headers["location"][:21] for answer in answers] == ["https://offer-b.examp"] + [
        f"https://offer-{o}.examp" for o in "abab"
    ] + ["https://offer-b.examp"]
    assert clicks_of(app, click_id) == ("lp1", "b", 1, None)
    assert db_rows(app, "SELECT offer, clicks, lp_clicks FROM daily_funnel ORDER BY offer") == [
        ("a", 1, 0),
        ("b", 0, 1),
    ]
    assert db_rows(app, "SELECT lp_clicks, lander_lp_clicks FROM daily_clicks") == [(1, 1)]


@pytest.mark.skipif(
    browser.CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); CI installs it"
)
async def test_the_landers_and_offers_table_in_headless_chromium(tmp_path: Path):
    """The page a person opens: a real `tinytrack serve` on data the app wrote, read by Chromium."""
    port = free_port()
    config_path = write_config(tmp_path, port, extra=FUNNELS)
    script = Script()
    app = tinytrack.create_app(tinytrack.load_config(config_path), rng=script)
    await app.startup()
    try:
        async with client_for(app) as http:
            await seed_split(http, script)
    finally:
        await app.shutdown()
    server = Server(tmp_path, config_path, port).start()
    try:
        url = browser.basic_auth_url(f"{server.url}/admin", "admin", ADMIN_TOKEN)
        ARTIFACTS.mkdir(exist_ok=True)
        desktop = await anyio.to_thread.run_sync(
            lambda: browser.render(url, ARTIFACTS / "admin-funnels.png", 1280, 1000)
        )
        phone = await anyio.to_thread.run_sync(
            lambda: browser.render(url, ARTIFACTS / "admin-funnels-phone.png", 390, 844)
        )
    finally:
        assert server.stop() == 0, server.output()
    for dom in (desktop, phone):
        page = Page(dom)
        assert page.scripts == 0
        table = page.tables["Landers and offers: split"]
        assert table[0] == [
            "",
            "name",
            "clicks",
            "LP clicks",
            "LP CTR %",
            "conv.",
            "CR %",
            "payout",
            "EPC",
            "cost",
            "profit",
            "ROI %",
        ]
        assert [row[:5] + row[-1:] for row in table[1:]] == [
            ["lander", "lp1", "3", "2", "66.67", "1566.67 USD"],
            ["lander", "lp2", "2", "1", "50.00", "-100.00 USD"],
            ["offer", "a", "3", "2", "66.67", "566.67 USD"],
            ["offer", "b", "2", "1", "50.00", "1400.00 USD"],
        ]
        # `direct` had no clicks: its heading and the line that says so, no table.
        assert "Landers and offers: direct" in dom and "Landers and offers: direct" not in page.tables


async def test_a_plain_url_clicks_offer_is_default_in_every_report(client, script):
    await click(client, script, None, campaign="plain", sub1="s")
    for query in ("by=offer", "by=offer,sub1", "by=offer&tz=Asia/Kolkata", "by=offer&offer=default"):
        answer = await client.get(f"/api/stats?from={D}&to={D}&campaign=plain&{query}", headers=ADMIN)
        assert [(r["offer"], r["clicks"]) for r in answer.json()["rows"]] == [("default", 1)], query
