"""tinytrack: a self-hosted server-to-server click and postback tracker.

A click on ``/c/<campaign>`` gets a time-ordered UUID, is committed to SQLite and
redirected to the offer; the network's postback to ``/postback`` is matched to the
click, deduplicated and counted. One module, one writer, group commit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import csv
import dataclasses
import datetime as dt
import decimal
import email.utils
import enum
import errno
import gc
import hashlib
import hmac
import html
import http.client
import io
import ipaddress
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import secrets
import shlex
import signal
import socket
import sqlite3
import ssl
import sys
import threading
import time
import tomllib
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager, closing, contextmanager, nullcontext, suppress
from decimal import ROUND_HALF_EVEN, Decimal
from functools import cache, lru_cache, partial
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, unquote_to_bytes, urlencode, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import h11
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

__version__ = "0.1.0"

log = logging.getLogger("tinytrack")


# --- Constants and defaults -----------------------------------------------------------

MAX_VALUE_CHARS = 256  # click query values longer than this are cut, not refused
MAX_UA_CHARS = 512
MAX_FIELDS = 64  # query/form pairs; a postback has ~10, a click a handful
MAX_BODY_BYTES = 1024  # SPEC: a postback body is small; more is 413
MAX_BATCH = 1000  # rows per transaction; keeps one commit's latency bounded
CHECKPOINT_ROWS = 5000  # rows written before the WAL is checkpointed (on the writer thread)
# ...or sooner, when the WAL file passes this size or a second has gone by: at light load
# each small commit writes whole pages (6-7 KiB a click), and on a small disk a big WAL
# is what fills it. journal_size_limit cuts the file back to this after a checkpoint.
WAL_LIMIT_BYTES = 4 * 1024 * 1024
CHECKPOINT_SECONDS = 1.0
WRITE_RETRY_SECONDS = 0.5  # while writes fail (a full disk), how often the writer tries to recover
BUSY_TIMEOUT_MS = 5000  # how long a batch waits for another process's write lock
SIGNATURE_TOLERANCE = 300  # seconds either way, as Stripe-style webhook signatures
FUTURE_TS_TOLERANCE = 86400  # a network clock may be off, a day is not a clock error
EARLY_TS_TOLERANCE_MS = 3_600_000  # a conversion up to an hour "before" its click is clock skew
CLOCK_STEP_MS = 3_600_000  # click ids wait out a clock stepped back this far; further, they follow it
# The largest payout one postback may carry (in any currency: 1e9 covers a big sale in
# VND or IDR). In micro-units that is 1e15, so a daily total needs 9,223 such postbacks
# in one day, campaign and sub1 to near a 64-bit sum, and the writer refuses that one.
MAX_PAYOUT = 10**9 * 1_000_000
MAX_SUM = 2**63 - 1
STATUSES = ("approved", "pending", "rejected")
FORM_TYPES = ("application/x-www-form-urlencoded",)
MACROS_CLICK = ("click_id", "campaign", "sub1", "sub2", "sub3", "sub4", "sub5", "ext_id")
MACROS_FUNNEL = MACROS_CLICK + ("offer", "lander")  # a lander's or offer's URL
# Ad platforms' click ids a click may carry (kept, and passed on by pass_query), and
# {fbc}, Meta's fbc cookie value made of fbclid: fb.1.<click ms>.<fbclid>.
AD_IDS = ("fbclid", "gclid", "gbraid", "wbraid", "ttclid", "msclkid")
MACROS_FORWARD = MACROS_FUNNEL + ("event", "payout", "currency", "txid", "status", "id", "cost", *AD_IDS, "fbc")
SUB_FIELDS = ("sub1", "sub2", "sub3", "sub4", "sub5")
EXT_ID_ALIASES = {"ext_id": "ext_id", "externalid": "ext_id", "external_id": "ext_id"}
COST_ALIASES = frozenset({"cost", "cpc", "bid"})  # what a traffic source's {cost} macro is sent as
# A click's own cost above this (in any currency) is a typo or a forgery: stored without it.
MAX_CLICK_COST = 10**6 * 1_000_000
COST_MODELS = ("cpc", "cpm", "cpa", "revshare")
UID_ALIASES = {"uid": "uid", "user_id": "uid", "visitor_id": "uid"}  # the site's own id for a visitor
UID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# What a click's query may carry besides what it passes on: each name mapped to its field.
CLICK_FIELD_NAMES = {
    **{name: name for name in ("sub1", "sub2", "sub3", "sub4", "sub5")},
    **EXT_ID_ALIASES,
    **dict.fromkeys(COST_ALIASES, "cost"),
    **UID_ALIASES,
    **{name: name for name in AD_IDS},
    "tinytrack_selftest": "selftest",  # tinytrack selftest's click: see Database.selftest_key
}
PASSED_ON_FIELDS = frozenset({"uid", *AD_IDS})  # kept, and still passed on by pass_query: the site's own
CHANNELS = ("affiliate", "paid", "email", "organic")  # a campaign's channel; organic is never credited
ATTRIBUTION_MODES = ("click", "priority")
# Every name a network may use for a postback field, mapped to the field.
POSTBACK_ALIASES = {
    "click_id": "click_id",
    "clickid": "click_id",
    "cid": "click_id",
    "subid": "click_id",
    "sub_id": "click_id",
    "cnv_id": "click_id",
    "event": "event",
    "et": "event",
    "type": "event",
    "payout": "payout",
    "amount": "payout",
    "revenue": "payout",
    "sum": "payout",
    "currency": "currency",
    "txid": "txid",
    "tid": "txid",
    "transaction_id": "txid",
    "order_id": "txid",
    "status": "status",
    "ts": "ts",
    "timestamp": "ts",
    "token": "token",
    "key": "token",
    "user_id": "user_id",
    "uid": "user_id",
}
# A touch (POST /touch): a visit that never passed through /c/ (an email, a CRM, organic).
TOUCH_ALIASES = {
    "user_id": "user_id",
    "uid": "user_id",
    "channel": "channel",
    "campaign": "campaign",
    "ts": "ts",
    "timestamp": "ts",
    "token": "token",
    "key": "token",
}
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
EVENT_RE = re.compile(r"[a-z0-9_]{1,32}")
TXID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CURRENCY_RE = re.compile(r"[A-Za-z]{3}")
PAYOUT_RE = re.compile(r"([0-9]{1,12})(?:\.([0-9]{1,6}))?")  # [0-9], not \d: "١٢" is no payout
RATE_RE = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,12})?")
UNIX_TS_RE = re.compile(r"[0-9]{1,13}(?:\.[0-9]{1,9})?")  # 13 digits: milliseconds, refused as future
SAFE_RE = re.compile(r"[A-Za-z0-9_.~-]*")  # RFC 3986 unreserved: needs no percent-encoding
DIGITS_RE = re.compile(r"[0-9]{1,12}")  # ASCII only: "²".isdigit() is True, int("²") fails
CAMPAIGN_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
ARM_NAME_RE = re.compile(r"[a-z0-9_-]{1,32}")  # a lander's or offer's name
MAX_WEIGHT = 1_000_000
DEFAULT_OFFER = "default"  # the offer a campaign's plain `url` is, and what clicks without one are reported under
TOKEN_RE = re.compile(r"[A-Za-z0-9._~-]{8,128}")  # URL-safe: pasted into query strings
MACRO_RE = re.compile(r"\{([^{}]*)\}")
URL_HEAD_RE = re.compile(r"https?://([^/?#]*)")
HOST_RE = re.compile(r"([A-Za-z0-9-]+\.)*[A-Za-z0-9-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
# C0, DEL, C1 and the Unicode line breaks: deleted from free text (str.translate table).
CONTROL_CHARS = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029])
# Link previewers, crawlers and HTTP libraries: redirected, stored, flagged as bots.
BOT_RE = re.compile(
    r"bot\b|bot/|crawl|spider|slurp|preview|facebookexternalhit|facebookcatalog|"
    r"embedly|whatsapp|telegram|skypeuripreview|headlesschrome|lighthouse|"
    r"curl/|wget/|python-|go-http-client|java/|libwww|httpclient|okhttp/2|"
    # Since bench/bots.py's comparison with crawlerdetect (5,079 real bots, 166,477 real
    # browsers): 50.1% of the bots caught before, 68.2% with these, 1 more browser flagged
    # (K-Meleon 1.1.5, 2008, whose UA carries a "+http://" link as crawlers' do).
    r"\+https?://|bots\b|robot|scanner|heritrix|findlink|google-|-google|googleother|monitor|uptime|"
    r"pingdom|checker|validator|fetch|feed|scrap|archive|aiohttp|axios/|undici",
)  # matched against the lower-cased User-Agent: re.I makes every click ~5x slower here


# --- Errors ---------------------------------------------------------------------------


class TinytrackError(Exception):
    """Base of every error tinytrack reports to a user as one line."""


class ConfigError(TinytrackError):
    """A config key with a bad value: ``campaigns.x.url: must be ...``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


class StorageError(TinytrackError):
    """The database could not take a write; nothing was acknowledged."""


class Refusal(enum.Enum):
    """Why a request is refused: its answer's status and message. The status is its
    code in the log line ("postback 401 unauthorized") and in the metrics label
    (result="http_401"), as the README has always named them."""

    BAD_REQUEST = (400, "bad request")  # a FieldError names the field instead
    UNAUTHORIZED = (401, "unauthorized")
    FORBIDDEN = (403, "forbidden")
    NOT_FOUND = (404, "not found")
    METHOD_NOT_ALLOWED = (405, "method not allowed")
    TIMEOUT = (408, "body: not received in time")
    TOO_LARGE = (413, f"body: more than {MAX_BODY_BYTES} bytes")
    UNSUPPORTED_MEDIA_TYPE = (415, "content-type: must be application/json or application/x-www-form-urlencoded")
    UNAVAILABLE = (503, "storage unavailable, retry")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def code(self) -> str:
        return f"http_{self.value[0]}"


class HTTPError(TinytrackError):
    """A refused request: the answer's status, its message, and any headers it needs."""

    def __init__(
        self, refusal: Refusal, message: str | None = None, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        self.refusal, self.status = refusal, refusal.status
        self.message = message or refusal.value[1]
        self.headers = list(headers)
        super().__init__(self.message)

    def __reduce__(self) -> tuple:  # the same error out of the report process
        return HTTPError, (self.refusal, self.message, self.headers)


class FieldError(HTTPError):
    """Bad input in one named field: always a 400 naming the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(Refusal.BAD_REQUEST, f"{field}: {problem}")
        self.field = field

    def __reduce__(self) -> tuple:
        return FieldError.from_message, (self.message,)

    @classmethod
    def from_message(cls, message: str) -> FieldError:
        """From a "<field>: <problem>" message (the writer's refusals)."""
        field, _, problem = message.partition(": ")
        return cls(field, problem)


def quoted(value: object, limit: int = 40) -> str:
    """A user's value quoted for an error message: escaped, never too long."""
    text = value if isinstance(value, str) else str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --- Config ---------------------------------------------------------------------------


SECRET_KEYS = frozenset({"tokens", "token", "hmac_secrets", "access_token", "headers"})  # values no message shows
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclasses.dataclass(frozen=True)
class Template:
    """A URL with ``{macro}`` holes; values are percent-encoded when filled."""

    source: str
    parts: tuple[tuple[str, str], ...]  # (literal text, macro name or "")
    fragment: str  # kept after anything pass_query appends
    has_query: bool

    def fill(self, values: Mapping[str, str], extra: Iterable[tuple[str, str]] = ()) -> str:
        out = []
        for literal, macro in self.parts:
            out.append(literal)
            if macro:
                value = values.get(macro, "")
                out.append(value if SAFE_RE.fullmatch(value) else quote(value, safe=""))
        if extra:
            out.append("&" if self.has_query else "?")
            out.append(urlencode(list(extra), quote_via=quote))
        out.append(self.fragment)
        return "".join(out)


FRAUD_ACTIONS = ("flag", "hold", "reject")


@dataclasses.dataclass(frozen=True)
class FraudConfig:
    """[fraud], or a campaign's [campaigns.x.fraud] over it: each rule off while None/empty."""

    min_ctit_seconds: int | None = None  # a conversion sooner after its click: ctit_fast
    ip_clicks_per_minute: int | None = None  # more clicks from one address in a minute (per campaign): ip_flood
    ip_conversions_per_hour: int | None = None  # more conversions on one address's clicks in an hour: ip_cluster
    listed_ips: tuple[Network, ...] = ()  # listed_ips and listed_ips_file's lines: listed_ip
    listed_ips_file: str | None = None
    action: str = "flag"  # what a flagged conversion gets: flag | hold | reject
    # Whether a click is looked at at all (else nothing is done for it): a field, not a
    # property, as every click asks.
    click_rules: bool = dataclasses.field(init=False, compare=False, repr=False, default=False)
    # listed_ips merged (collapse_addresses), per IP version: (first addresses, last
    # addresses, networks), sorted, the addresses packed (bytes of one length compare as
    # the numbers do), so a click is looked up by one bisection however long the list is.
    listed: Mapping[int, tuple[list[bytes], list[bytes], list[Network]]] = dataclasses.field(
        init=False, compare=False, repr=False, default_factory=dict
    )  # keyed by IP version

    def __post_init__(self) -> None:
        object.__setattr__(self, "click_rules", self.ip_clicks_per_minute is not None or bool(self.listed_ips))
        listed = {}
        for version in (4, 6):
            nets = list(ipaddress.collapse_addresses(n for n in self.listed_ips if n.version == version))
            listed[version] = (
                [n.network_address.packed for n in nets],
                [n.broadcast_address.packed for n in nets],
                nets,
            )
        object.__setattr__(self, "listed", listed)

    def listed_network(self, ip: str) -> tuple[str, Network] | None:
        """The address (as written for people) and the listed network (as merged) `ip` is
        in, or None. Parsed with inet_pton, ~10x quicker than ipaddress on every click."""
        try:
            packed, version = socket.inet_pton(socket.AF_INET, ip), 4
        except OSError:
            try:
                packed, version = socket.inet_pton(socket.AF_INET6, ip), 6
            except OSError:
                return None
            if packed[:12] == b"\0" * 10 + b"\xff\xff":  # ::ffff:a.b.c.d is a.b.c.d
                packed, version = packed[12:], 4
        starts, ends, nets = self.listed[version]
        i = bisect.bisect_right(starts, packed) - 1
        if i < 0 or packed > ends[i]:
            return None
        return str(ipaddress.ip_address(packed)), nets[i]


NO_FRAUD_RULES = FraudConfig()  # every rule off


class Arm(NamedTuple):
    """One lander or offer of a campaign: its name, where it sends visitors, its share."""

    name: str
    url: Template
    weight: int  # 0: paused


@dataclasses.dataclass(frozen=True)
class Rotation:
    """A campaign's offers (or landers), picked by weight. Build with Rotation.of."""

    arms: tuple[Arm, ...]
    live: tuple[Arm, ...]  # weight > 0
    bounds: tuple[int, ...]  # running totals of the live weights
    by_name: Mapping[str, Arm]  # live arms only: a paused one is never picked, named or sticky

    @classmethod
    def of(cls, arms: Iterable[Arm]) -> Rotation:
        arms = tuple(arms)
        live = tuple(arm for arm in arms if arm.weight > 0)
        bounds = tuple(itertools.accumulate(arm.weight for arm in live))
        return cls(arms, live, bounds, {arm.name: arm for arm in live})

    def pick(self, random: Callable[[], float]) -> Arm:
        """One live arm, each with its weight's share; no random draw when there is one."""
        live = self.live
        if len(live) == 1:
            return live[0]
        # min(): random() * total may round up to total itself for some totals.
        return live[min(bisect.bisect_right(self.bounds, random() * self.bounds[-1]), len(live) - 1)]

    def choose(self, named: str | None, sticky: str | None, pick: Arm) -> Arm:
        """Where an LP click goes: the offer the lander named, else the one its click was
        given (sticky), else `pick` (by weight). A paused or removed offer is passed over:
        it is paused because it no longer pays, and a visitor sent there is a lost sale."""
        return self.by_name.get(named) or self.by_name.get(sticky) or pick


def single_offer(url: Template) -> Rotation:
    """A campaign's `url`: one offer, named "default"."""
    return Rotation.of((Arm(DEFAULT_OFFER, url, 1),))


FORWARD_KINDS = ("get", "json", "meta_capi")
META_ENDPOINT = "https://graph.facebook.com/v21.0"  # Meta's Graph API; its versions live two years or more
META_ACTION_SOURCES = (
    "website",
    "app",
    "email",
    "phone_call",
    "chat",
    "physical_store",
    "system_generated",
    "business_messaging",
    "other",
)
HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")  # an RFC 9110 token
HEADER_VALUE_RE = re.compile(r"[\x20-\x7e]{1,4096}")  # what every server takes (h11 refuses a space at either end)
RESERVED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "idempotency-key", "user-agent"}
)


@dataclasses.dataclass(frozen=True)
class ForwardTarget:
    """[campaigns.x.forward] of kind json or meta_capi: a POST beside (or instead of) the
    campaign's postback_url. Its secrets (headers, access_token) stay here, in memory:
    the outbox keeps only the URL and body, and each try reads them from the config."""

    kind: str  # json | meta_capi
    url: str  # json: where it goes; meta_capi: <endpoint>/<pixel_id>/events
    headers: tuple[tuple[str, str], ...] = ()
    access_token: str = ""
    event_map: Mapping[str, str] = dataclasses.field(default_factory=dict)  # our event -> Meta's event_name
    test_event_code: str | None = None
    action_source: str = "website"
    event_source_url: str | None = None  # None: the conversion's offer page (its URL before the query)

    def secrets(self) -> tuple[str, ...]:
        """Values no log line, answer or stored error may show."""
        return tuple(value for value in (self.access_token, *(v for _, v in self.headers)) if len(value) >= 4)


@dataclasses.dataclass(frozen=True)
class Campaign:
    name: str
    offers: Rotation
    landers: Rotation | None = None  # with landers, a click goes to one, and its LP click (/go/) to an offer
    # True with `offers` or `landers`: clicks store the names they were given and the
    # funnel totals count them. A plain `url` campaign's clicks store none ("default").
    funnel: bool = False
    pass_query: bool = False
    postback_url: Template | None = None
    fallback_url: Template | None = None  # [campaigns.x.forward]: after FALLBACK_AFTER failed tries of postback_url
    target: ForwardTarget | None = None  # [campaigns.x.forward] kind json or meta_capi
    pixel: bool = False  # /pixel reports conversions of this campaign's clicks even if [pixel] enabled is false
    window_days: int | None = None
    forward_events: tuple[str, ...] | None = None
    forward_statuses: tuple[str, ...] = ("approved",)
    # What its traffic costs: a click's own `cost`, else cost_model's. cost_value is in
    # micro-units of cost_currency (per click, per 1,000 clicks, per approved conversion),
    # or for revshare micro-percent of the approved payout (40% is 40_000_000).
    cost_model: str | None = None
    cost_value: int = 0
    cost_currency: str = "USD"
    bot_cost: bool = False  # bot clicks cost nothing unless this is set
    max_click_cost: int = MAX_CLICK_COST  # a click's own cost above this is stored without it
    fraud: FraudConfig = NO_FRAUD_RULES  # [fraud] with the campaign's own [campaigns.x.fraud] over it
    channel: str = "paid"  # affiliate | paid | email | organic: what [attribution] priority ranks

    def forwards(self, event: str, status: str) -> bool:
        """Whether a conversion with this event and status is forwarded (postback_url, target)."""
        return (
            (self.postback_url is not None or self.target is not None)
            and status in self.forward_statuses
            and (self.forward_events is None or event in self.forward_events)
        )

    def target_hears(self, event: str, status: str) -> bool:
        """Whether a forwarded status goes to the json or meta_capi target too: json hears
        every one; Meta the events event_map names, never a rejection (it can't take one back)."""
        target = self.target
        return target is not None and (target.kind == "json" or (status != "rejected" and event in target.event_map))

    def click_cost(self, own: int | None, bot: bool) -> int | None:
        """A click's cost in micro-units of cost_currency: its own, else cpc's or cpm's.
        Under cpa or revshare the conversions are the cost: a click's own is not counted."""
        if (bot and not self.bot_cost) or self.cost_model in ("cpa", "revshare"):
            return None
        if own is not None:
            return own
        if self.cost_model == "cpc":
            return self.cost_value
        if self.cost_model == "cpm":
            return self.cost_value // 1000  # exact: a cpm cost_value has at most 3 decimals
        return None

    def conversion_cost(self, payout: int, currency: str) -> tuple[int, str] | None:
        """What an approved conversion costs under cpa or revshare, and in which currency."""
        if self.cost_model == "cpa":
            return self.cost_value, self.cost_currency
        if self.cost_model == "revshare":  # a share of the payout, in the payout's currency
            return share(payout, self.cost_value, 100_000_000), currency
        return None


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    uds: str | None = None
    # Loopback, where nginx runs. A frozenset: hashed once, it keys a cache per click.
    trusted_proxies: frozenset[Network] = frozenset(map(ipaddress.ip_network, ("127.0.0.1", "::1")))
    access_log: bool = False  # a line per request; postbacks are always logged
    log_postbacks: bool = True  # an INFO line per counted postback; false: only those not counted
    read_timeout_seconds: int = 10  # a request's headers, and its body, must arrive within this


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    path: str = "tinytrack.db"
    reserve_mb: int = 8  # disk kept aside, released when the disk fills so a checkpoint can run


@dataclasses.dataclass(frozen=True)
class PostbackConfig:
    tokens: tuple[str, ...] = ()
    allow_ips: tuple[Network, ...] = ()
    events: tuple[str, ...] | None = None
    currency: str = "USD"
    status_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    hmac_secrets: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AdminConfig:
    token: str | None = None


@dataclasses.dataclass(frozen=True)
class RetentionConfig:
    clicks_days: int = 90
    conversions_days: int = 0
    pii_days: int = 30
    orphans_days: int = 30
    outbox_days: int = 30  # finished deliveries (done, failed, dead, canceled) and their attempts
    interval_minutes: int = 60
    sub1_per_day: int = 1000  # distinct sub1 per campaign and day in the totals; the rest are "(other)"
    # Not a setting: how long a uid is kept on clicks and touches, pii_days or the
    # attribution window if longer (a conversion must find the touches it credits).
    uid_days: int = 30


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    allow_private: bool = False
    first_retry_seconds: int = 30
    max_age_hours: int = 72
    timeout_seconds: int = 10
    delay_seconds: int = 0


@dataclasses.dataclass(frozen=True)
class AlertsConfig:
    """[alerts]: a JSON POST to webhook_url (through the outbox) when, over the last
    HEALTH_WINDOW_MINUTES, postbacks are refused or go unmatched, or a delivery is dead."""

    webhook_url: str | None = None
    max_refused_pct: Decimal = Decimal(1)  # refused postbacks (any 4xx but 404, a 503) above this share
    min_match_pct: Decimal = Decimal(90)  # matched / (matched + orphan) below this
    min_postbacks: int = 10  # a window with fewer postbacks is not judged (1 of 2 refused is no trend)


@dataclasses.dataclass(frozen=True)
class PixelConfig:
    enabled: bool = False  # every campaign's clicks; else only those of campaigns with pixel = true
    status: str = "pending"  # what a pixel's conversion is stored as: no token vouches for it


@dataclasses.dataclass(frozen=True)
class GeoConfig:
    database: str | None = None  # a MaxMind-format country database (GeoLite2, DB-IP Lite): clicks' country
    user_agents: bool = True  # clicks' device, os and browser from their User-Agent (with ua-parser)


@dataclasses.dataclass(frozen=True)
class MoneyConfig:
    # How much one unit of a currency is worth in report_currency: reports convert
    # with these (exact to the micro-unit); a currency without a rate stays apart.
    rates: Mapping[str, Decimal] = dataclasses.field(default_factory=dict)
    report_currency: str | None = None  # None: every currency is reported apart


@dataclasses.dataclass(frozen=True)
class AttributionConfig:
    """[attribution]: who gets the credit when a user's touches compete (see attribute)."""

    window_days: int = 30  # touches this long before a conversion (or less) are candidates
    priority: tuple[str, ...] = ("affiliate", "paid", "email")  # the highest channel with a touch wins
    mode: str = "click"  # "click": a postback's click id decides; "priority": the rules decide


@dataclasses.dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    postback: PostbackConfig = PostbackConfig()
    admin: AdminConfig = AdminConfig()
    retention: RetentionConfig = RetentionConfig()
    forward: ForwardConfig = ForwardConfig()
    money: MoneyConfig = MoneyConfig()
    fraud: FraudConfig = NO_FRAUD_RULES
    attribution: AttributionConfig = AttributionConfig()
    pixel: PixelConfig = PixelConfig()
    alerts: AlertsConfig = AlertsConfig()
    geo: GeoConfig = GeoConfig()
    campaigns: Mapping[str, Campaign] = dataclasses.field(default_factory=dict)
    demo: bool = False  # the embedded default: serves /demo and shows its token there


class _Table:
    """One TOML table being read: typed getters, and unknown keys are errors."""

    def __init__(self, data: object, prefix: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(prefix, f"must be a table, got {quoted(data)}")
        self.data, self.prefix, self.seen = data, prefix, set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is int)
        if not ok:
            want = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table"}.get(
                kind, "another type"
            )
            raise ConfigError(self.key(name), f"must be {want}, got {self.quoted_value(name, value)}")
        return value

    def quoted_value(self, name: str, value: object) -> str:
        """A bad value for a message; a secret's only by its type (the message reaches logs)."""
        if name not in SECRET_KEYS:
            return quoted(value)
        return {
            str: "a string",
            int: "an integer",
            bool: "a boolean",
            float: "a number",
            list: "a list",
            dict: "a table",
        }.get(type(value), "another type")

    def number(self, name: str, default: int, *, low: int, high: int = 10**9) -> int:
        value = self.get(name, int, default)
        if not low <= value <= high:
            raise ConfigError(self.key(name), f"must be between {low} and {high}, got {value}")
        return value

    def strings(self, name: str, default: Any = ()) -> Any:
        value = self.get(name, list, default)
        if value is default:
            return default
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self.key(name)}[{i}]", f"must be a string, got {self.quoted_value(name, item)}")
        return tuple(value)

    def table(self, name: str) -> _Table:
        return _Table(self.get(name, dict, {}), self.key(name))

    def done(self) -> None:
        for name in self.data:
            if name not in self.seen:
                raise ConfigError(self.key(name), "unknown key")


def compile_template(source: str, key: str, macros: tuple[str, ...]) -> Template:
    """Check an offer URL template and split it into literal text and macros."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in source):
        raise ConfigError(key, f"must not contain spaces or control characters, got {quoted(source)}")
    head = URL_HEAD_RE.match(source)
    if not head or not head.group(1):
        raise ConfigError(key, f"must be an http(s) URL, got {quoted(source)}")
    if "{" in head.group(0):
        # A macro in the scheme or host would let a click choose where visitors go.
        raise ConfigError(key, f"macros are only allowed after the host, got {quoted(source)}")
    if not HOST_RE.fullmatch(head.group(1)):
        raise ConfigError(key, f"has no valid host (user:password@ is not allowed), got {quoted(source)}")
    port = head.group(1).rpartition(":")[2] if not head.group(1).endswith("]") and ":" in head.group(1) else None
    if port is not None and not 1 <= int(port) <= 65535:
        raise ConfigError(key, f"port must be 1-65535, got {port}")
    return split_template(source, key, macros)


def split_template(source: str, key: str, macros: tuple[str, ...]) -> Template:
    """Split a URL template into literal text and macros (no checks of the URL itself)."""
    main, hash_, fragment = source.partition("#")
    parts, pos = [], 0
    for match in MACRO_RE.finditer(main):
        name = match.group(1)
        if name not in macros:
            raise ConfigError(key, f"unknown macro {{{name}}}; known: {', '.join(macros)}")
        parts.append((main[pos : match.start()], name))
        pos = match.end()
    tail = main[pos:]
    if "{" in tail or "}" in tail or "{" in fragment or "}" in fragment:
        raise ConfigError(key, f"unbalanced or misplaced brace in {quoted(source)}")
    parts.append((tail, ""))
    return Template(source, tuple(parts), hash_ + fragment, "?" in main)


def parse_network(text: str, key: str) -> Network:
    """An address or CIDR; host bits set is a typo worth stopping for."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(key, f"not an IP address or CIDR: {quoted(text)} ({exc})") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
        mapped = net.network_address.ipv4_mapped
        net = ipaddress.ip_network(f"{mapped}/{max(net.prefixlen - 96, 0)}")
    return net


def _networks(table: _Table, name: str, default: Collection[Network]) -> tuple[Network, ...]:
    items = table.strings(name, None)
    if items is None:
        return tuple(default)
    return tuple(parse_network(item, f"{table.key(name)}[{i}]") for i, item in enumerate(items))


def _tokens(table: _Table, name: str) -> tuple[str, ...]:
    tokens = table.strings(name)
    for i, token in enumerate(tokens):
        if not TOKEN_RE.fullmatch(token):
            raise ConfigError(f"{table.key(name)}[{i}]", "must be 8-128 characters of A-Z a-z 0-9 . _ ~ -")
    return tokens


CONFIG_SECTIONS = (
    "server",
    "storage",
    "postback",
    "admin",
    "retention",
    "forward",
    "money",
    "fraud",
    "attribution",
    "pixel",
    "alerts",
    "geo",
    "campaigns",
)


def build_config(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document into a Config; raises ConfigError."""
    root = _Table(dict(data), "")
    for name in root.data:  # a misspelt section is the first thing to say, before what it left out
        if name not in CONFIG_SECTIONS:
            raise ConfigError(name, f"unknown section; known: {', '.join(CONFIG_SECTIONS)}")
    server, storage = read_server(root.table("server")), read_storage(root.table("storage"))
    postback = read_postback(root.table("postback"))
    admin = read_admin(root.table("admin"), postback.tokens)
    retention, forward = read_retention(root.table("retention")), read_forward(root.table("forward"))
    money = read_money(root.table("money"), postback.currency)
    fraud = read_fraud(root.table("fraud"), NO_FRAUD_RULES)
    attribution = read_attribution(root.table("attribution"))
    pixel = read_pixel(root.table("pixel"))
    alerts = read_alerts(root.table("alerts"))
    geo = read_geo(root.table("geo"))
    if retention.pii_days:
        retention = dataclasses.replace(retention, uid_days=max(retention.pii_days, attribution.window_days))
    else:  # personal data kept: uids too
        retention = dataclasses.replace(retention, uid_days=0)
    campaigns = root.table("campaigns")
    config = Config(
        server=server,
        storage=storage,
        postback=postback,
        admin=admin,
        retention=retention,
        forward=forward,
        money=money,
        fraud=fraud,
        attribution=attribution,
        pixel=pixel,
        alerts=alerts,
        geo=geo,
        campaigns={name: read_campaign(name, campaigns, postback.currency, fraud) for name in campaigns.data},
    )
    campaigns.done()
    root.done()
    return config


# Each section's reader: a key left out takes the dataclass's default, written once, there.


def read_server(s: _Table) -> ServerConfig:
    d = ServerConfig()
    server = ServerConfig(
        host=s.get("host", str, d.host),
        port=s.number("port", d.port, low=1, high=65535),
        uds=s.get("uds", str, d.uds),
        trusted_proxies=frozenset(_networks(s, "trusted_proxies", d.trusted_proxies)),
        access_log=s.get("access_log", bool, d.access_log),
        log_postbacks=s.get("log_postbacks", bool, d.log_postbacks),
        read_timeout_seconds=s.number("read_timeout_seconds", d.read_timeout_seconds, low=1, high=300),
    )
    s.done()
    return server


def read_storage(s: _Table) -> StorageConfig:
    d = StorageConfig()
    storage = StorageConfig(
        path=s.get("path", str, d.path), reserve_mb=s.number("reserve_mb", d.reserve_mb, low=0, high=1024)
    )
    if not storage.path:
        raise ConfigError("storage.path", "must not be empty")
    s.done()
    return storage


def read_postback(p: _Table) -> PostbackConfig:
    d = PostbackConfig()
    tokens = _tokens(p, "tokens")
    if not tokens:
        raise ConfigError("postback.tokens", "must list at least one token (run `tinytrack init`)")
    events = p.strings("events", None)
    for i, event in enumerate(events or ()):
        if not EVENT_RE.fullmatch(event):
            raise ConfigError(f"postback.events[{i}]", f"must match [a-z0-9_]{{1,32}}, got {quoted(event)}")
    currency = p.get("currency", str, d.currency)
    if not CURRENCY_RE.fullmatch(currency):
        raise ConfigError("postback.currency", f"must be a three-letter ISO 4217 code, got {quoted(currency)}")
    status_map = {}
    for word, status in p.get("status_map", dict, {}).items():
        if status not in STATUSES:
            raise ConfigError(
                f"postback.status_map.{word}", f"must be one of {', '.join(STATUSES)}, got {quoted(status)}"
            )
        status_map[word.lower()] = status
    secrets_ = p.strings("hmac_secrets")
    for i, secret in enumerate(secrets_):
        if len(secret) < 16:
            raise ConfigError(f"postback.hmac_secrets[{i}]", "must be at least 16 characters")
    postback = PostbackConfig(
        tokens=tokens,
        allow_ips=_networks(p, "allow_ips", d.allow_ips),
        events=events,
        currency=currency.upper(),
        status_map=status_map,
        hmac_secrets=secrets_,
    )
    p.done()
    return postback


def read_admin(a: _Table, postback_tokens: Collection[str]) -> AdminConfig:
    token = a.get("token", str, None)
    if token is not None:
        if not TOKEN_RE.fullmatch(token):
            raise ConfigError("admin.token", "must be 8-128 characters of A-Z a-z 0-9 . _ ~ -")
        if token in postback_tokens:
            raise ConfigError("admin.token", "must differ from every postback token")
    a.done()
    return AdminConfig(token=token)


def read_retention(r: _Table) -> RetentionConfig:
    d = RetentionConfig()
    retention = RetentionConfig(
        clicks_days=r.number("clicks_days", d.clicks_days, low=0),
        conversions_days=r.number("conversions_days", d.conversions_days, low=0),
        pii_days=r.number("pii_days", d.pii_days, low=0),
        orphans_days=r.number("orphans_days", d.orphans_days, low=0),
        outbox_days=r.number("outbox_days", d.outbox_days, low=0),
        interval_minutes=r.number("interval_minutes", d.interval_minutes, low=1),
        sub1_per_day=r.number("sub1_per_day", d.sub1_per_day, low=1),
    )
    r.done()
    return retention


def read_forward(f: _Table) -> ForwardConfig:
    d = ForwardConfig()
    forward = ForwardConfig(
        allow_private=f.get("allow_private", bool, d.allow_private),
        first_retry_seconds=f.number("first_retry_seconds", d.first_retry_seconds, low=1),
        max_age_hours=f.number("max_age_hours", d.max_age_hours, low=1),
        timeout_seconds=f.number("timeout_seconds", d.timeout_seconds, low=1, high=300),
        delay_seconds=f.number("delay_seconds", d.delay_seconds, low=0),
    )
    f.done()
    return forward


def read_alerts(a: _Table) -> AlertsConfig:
    d = AlertsConfig()

    def percent(name: str, default: Decimal) -> Decimal:
        value = a.get(name, (int, float), default)
        if isinstance(value, bool) or not 0 <= value <= 100:
            raise ConfigError(a.key(name), f"must be a percentage, 0 to 100, got {quoted(value)}")
        return Decimal(str(value))

    url = a.get("webhook_url", str, None)
    alerts = AlertsConfig(
        webhook_url=url and plain_url(url, a.key("webhook_url")),
        max_refused_pct=percent("max_refused_pct", d.max_refused_pct),
        min_match_pct=percent("min_match_pct", d.min_match_pct),
        min_postbacks=a.number("min_postbacks", d.min_postbacks, low=1),
    )
    a.done()
    return alerts


def read_pixel(p: _Table) -> PixelConfig:
    d = PixelConfig()
    status = p.get("status", str, d.status)
    if status not in ("pending", "approved"):
        raise ConfigError(p.key("status"), f"must be pending or approved, got {quoted(status)}")
    pixel = PixelConfig(enabled=p.get("enabled", bool, d.enabled), status=status)
    p.done()
    return pixel


def read_geo(g: _Table) -> GeoConfig:
    d = GeoConfig()
    database = g.get("database", str, d.database) or None
    if database is not None:
        open_country_database(database, g.key("database"))  # a bad path or file fails the config, not the server
    geo = GeoConfig(database=database, user_agents=g.get("user_agents", bool, d.user_agents))
    g.done()
    return geo


def read_fraud(f: _Table, base: FraudConfig) -> FraudConfig:
    """[fraud], or a campaign's fraud table: each key given replaces base's."""
    changes: dict[str, Any] = {}
    for name in ("min_ctit_seconds", "ip_clicks_per_minute", "ip_conversions_per_hour"):
        if name in f.data:  # 0: off (a campaign turning off a rule [fraud] sets)
            changes[name] = f.number(name, 0, low=0, high=10**6) or None
    if "action" in f.data:
        action = f.get("action", str, "flag")
        if action not in FRAUD_ACTIONS:
            raise ConfigError(f.key("action"), f"must be one of {', '.join(FRAUD_ACTIONS)}, got {quoted(action)}")
        changes["action"] = action
    if "listed_ips" in f.data or "listed_ips_file" in f.data:
        listed = list(_networks(f, "listed_ips", ()))
        path = f.get("listed_ips_file", str, None)
        if path is not None:
            listed.extend(read_listed_ips(path, f.key("listed_ips_file")))
        changes["listed_ips"], changes["listed_ips_file"] = tuple(listed), path
    f.done()
    return dataclasses.replace(base, **changes)


def read_attribution(a: _Table) -> AttributionConfig:
    d = AttributionConfig()
    priority = a.strings("priority", d.priority)
    if not priority:
        raise ConfigError("attribution.priority", "must list at least one channel (affiliate, paid, email)")
    for i, channel in enumerate(priority):
        key = f"attribution.priority[{i}]"
        if channel == "organic":
            raise ConfigError(key, "organic is never credited: leave it out")
        if channel not in CHANNELS:
            raise ConfigError(key, f"must be one of affiliate, paid, email, got {quoted(channel)}")
        if channel in priority[:i]:
            raise ConfigError(key, f"{quoted(channel)} is listed twice")
    mode = a.get("mode", str, d.mode)
    if mode not in ATTRIBUTION_MODES:
        raise ConfigError("attribution.mode", f"must be one of {', '.join(ATTRIBUTION_MODES)}, got {quoted(mode)}")
    attribution = AttributionConfig(
        window_days=a.number("window_days", d.window_days, low=1, high=3650), priority=tuple(priority), mode=mode
    )
    a.done()
    return attribution


def read_listed_ips(path: str, key: str) -> list[Network]:
    """A file of addresses and CIDRs, one a line (# comments, blank lines); read at each
    load, so a reload (SIGHUP) takes a new list."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM (an editor's) is not an address
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(key, f"cannot read {path}: {exc}") from None
    networks = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            networks.append(parse_network(line, f"{path}:{number}"))
    return networks


def read_money(m: _Table, default_currency: str) -> MoneyConfig:
    rates = {}
    for code, value in m.get("rates", dict, {}).items():
        key = f"money.rates.{code}"
        if not CURRENCY_RE.fullmatch(code):
            raise ConfigError(key, "must be named by a three-letter ISO 4217 code")
        text = config_decimal(value, key)
        if not RATE_RE.fullmatch(text) or not Decimal(text):
            raise ConfigError(key, f'must be a decimal > 0 with at most 12 decimals, like "1.08", got {quoted(value)}')
        rates[code.upper()] = Decimal(text)
    report = m.get("report_currency", str, None)
    if report is not None and not CURRENCY_RE.fullmatch(report):
        raise ConfigError("money.report_currency", f"must be a three-letter ISO 4217 code, got {quoted(report)}")
    report = report.upper() if report else (default_currency if rates else None)
    if report in rates and rates[report] != 1:
        raise ConfigError(f"money.rates.{report}", f"is the report currency: its rate is 1, got {rates[report]}")
    m.done()
    return MoneyConfig(rates=rates, report_currency=report)


def config_decimal(value: object, key: str) -> str:
    """A decimal from TOML: a string, an integer or a float (its shortest exact text)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    raise ConfigError(key, f'must be a decimal, like "0.05", got {quoted(value)}')


def config_money(c: _Table, name: str, key: str, *, places: int = 6, high: int = MAX_PAYOUT) -> int | None:
    """A config decimal as micro-units, with at most `places` decimals; None when absent."""
    value = c.get(name, (str, int, float), None)
    if value is None:
        return None
    try:
        units = parse_money(config_decimal(value, key), name, high)
    except FieldError:
        units = None
    if units is None or units % 10 ** (6 - places):
        raise ConfigError(key, f"must be a decimal >= 0 with at most {places} decimals, got {quoted(value)}")
    return units


def read_cost(c: _Table, key: str, default_currency: str) -> dict[str, Any]:
    """A campaign's cost keys (see Campaign)."""
    model = c.get("cost_model", str, None)
    if model is not None and model not in COST_MODELS:
        raise ConfigError(f"{key}.cost_model", f"must be one of {', '.join(COST_MODELS)}, got {quoted(model)}")
    # cpm: at most 3 decimals, so each click's share is a whole micro-unit and adds up exactly.
    places = 3 if model == "cpm" else 6
    value = config_money(c, "cost_value", f"{key}.cost_value", places=places, high=MAX_CLICK_COST)
    if model is not None and value is None:
        raise ConfigError(f"{key}.cost_value", f"is required with cost_model = {quoted(model)}")
    if model is None and value is not None:
        raise ConfigError(f"{key}.cost_value", "needs a cost_model (cpc, cpm, cpa or revshare)")
    if model == "revshare" and value > 100 * 1_000_000:
        raise ConfigError(f"{key}.cost_value", "is a percent of the payout: at most 100")
    currency = c.get("cost_currency", str, default_currency)
    if not CURRENCY_RE.fullmatch(currency):
        raise ConfigError(f"{key}.cost_currency", f"must be a three-letter ISO 4217 code, got {quoted(currency)}")
    most = config_money(c, "max_click_cost", f"{key}.max_click_cost", high=MAX_CLICK_COST)
    return {
        "cost_model": model,
        "cost_value": value or 0,
        "cost_currency": currency.upper(),
        "bot_cost": c.get("bot_cost", bool, False),
        "max_click_cost": MAX_CLICK_COST if most is None else most,
    }


def read_funnel(c: _Table, key: str) -> dict[str, Any]:
    """A campaign's `url`, or its `offers` (and `landers`): see Campaign."""
    url = c.get("url", str, None)
    offers = c.get("offers", list, None)
    landers = c.get("landers", list, None)
    if url is not None and offers is not None:
        raise ConfigError(f"{key}.offers", "use url (one offer) or offers, not both")
    if url is None and offers is None:
        raise ConfigError(f"{key}.url", "is required (or offers, a list of them)")
    if landers is None and offers is None:  # as before funnels: nothing more is stored per click
        return {"offers": single_offer(compile_template(url, f"{key}.url", MACROS_FUNNEL))}
    return {
        "offers": (
            read_arms(offers, f"{key}.offers")
            if offers is not None
            else single_offer(compile_template(url, f"{key}.url", MACROS_FUNNEL))  # landers in front of one offer
        ),
        "landers": None if landers is None else read_arms(landers, f"{key}.landers"),
        "funnel": True,
    }


def read_arms(items: list, key: str) -> Rotation:
    """A list of { name, url, weight } (weight defaults to 1), checked in one place."""
    if not items:
        raise ConfigError(key, "must list at least one (or leave it out)")
    arms, names = [], set()
    for i, item in enumerate(items):
        t = _Table(item, f"{key}[{i}]") if isinstance(item, dict) else None
        if t is None:
            raise ConfigError(
                f"{key}[{i}]", f'must be a table like {{ name = "a", url = "https://..." }}, got {quoted(item)}'
            )
        name = t.get("name", str, None)
        if name is None:
            raise ConfigError(t.key("name"), "is required")
        if not ARM_NAME_RE.fullmatch(name):
            raise ConfigError(t.key("name"), f"must be 1-32 characters of a-z 0-9 _ -, got {quoted(name)}")
        if name in names:
            raise ConfigError(t.key("name"), f"{quoted(name)} is used twice")
        names.add(name)
        url = t.get("url", str, None)
        if url is None:
            raise ConfigError(t.key("url"), "is required")
        weight = t.number("weight", 1, low=0, high=MAX_WEIGHT)
        arms.append(Arm(name, compile_template(url, t.key("url"), MACROS_FUNNEL), weight))
        t.done()
    rotation = Rotation.of(arms)
    if not rotation.live:
        raise ConfigError(key, "every weight is 0: at least one must be above 0 to send visitors anywhere")
    return rotation


def read_campaign(
    name: str, campaigns: _Table, default_currency: str = "USD", fraud: FraudConfig = NO_FRAUD_RULES
) -> Campaign:
    key = f"campaigns.{name}"
    if not CAMPAIGN_RE.fullmatch(name):
        raise ConfigError(key, "campaign names are 1-64 characters of A-Z a-z 0-9 _ -")
    c = campaigns.table(name)
    postback_url = c.get("postback_url", str, None)
    if postback_url is not None and not postback_url.isascii():
        # It goes on a request line as it is: other characters must be percent-encoded.
        raise ConfigError(
            f"{key}.postback_url", f"must be ASCII (percent-encode other characters), got {quoted(postback_url)}"
        )
    statuses = c.strings("forward_statuses", ("approved",))
    for i, status in enumerate(statuses):
        if status not in STATUSES:
            raise ConfigError(
                f"{key}.forward_statuses[{i}]", f"must be one of {', '.join(STATUSES)}, got {quoted(status)}"
            )
    forward_events = c.strings("forward_events", None)
    for i, event in enumerate(forward_events or ()):
        if not EVENT_RE.fullmatch(event):
            raise ConfigError(f"{key}.forward_events[{i}]", f"must match [a-z0-9_]{{1,32}}, got {quoted(event)}")
    window = c.get("window_days", int, None)
    if window is not None and window < 1:
        raise ConfigError(f"{key}.window_days", f"must be at least 1, got {window}")
    forward = c.table("forward")
    kind = forward.get("kind", str, "get")
    if kind not in FORWARD_KINDS:
        raise ConfigError(forward.key("kind"), f"must be one of {', '.join(FORWARD_KINDS)}, got {quoted(kind)}")
    fallback_url = forward.get("fallback_url", str, None)  # postback_url's, whatever else the table says
    if fallback_url is not None:
        if postback_url is None:
            raise ConfigError(
                forward.key("fallback_url"), "needs postback_url: it is where that one's deliveries go next"
            )
        if not fallback_url.isascii():
            raise ConfigError(
                forward.key("fallback_url"),
                f"must be ASCII (percent-encode other characters), got {quoted(fallback_url)}",
            )
    target = read_target(forward, kind) if kind != "get" else None
    forward.done()
    channel = c.get("channel", str, "paid")
    if channel not in CHANNELS:
        raise ConfigError(f"{key}.channel", f"must be one of {', '.join(CHANNELS)}, got {quoted(channel)}")
    campaign = Campaign(
        name=name,
        **read_funnel(c, key),
        pass_query=c.get("pass_query", bool, False),
        postback_url=postback_url and compile_template(postback_url, f"{key}.postback_url", MACROS_FORWARD),
        fallback_url=fallback_url and compile_template(fallback_url, f"{key}.forward.fallback_url", MACROS_FORWARD),
        target=target,
        pixel=c.get("pixel", bool, False),
        window_days=window,
        forward_events=forward_events,
        forward_statuses=statuses,
        **read_cost(c, key, default_currency),
        fraud=read_fraud(c.table("fraud"), fraud),
        channel=channel,
    )
    c.done()
    return campaign


def plain_url(text: object, key: str) -> str:
    """A fixed http(s) URL from the config (no macros), as a request line can carry it."""
    if not isinstance(text, str):
        raise ConfigError(key, f"must be a string, got {quoted(text)}")
    if not text.isascii():
        raise ConfigError(key, f"must be ASCII (percent-encode other characters), got {quoted(text)}")
    compile_template(text, key, ())
    return text


def read_target(f: _Table, kind: str) -> ForwardTarget:
    """[campaigns.x.forward] of kind json or meta_capi. No message quotes a secret."""
    if kind == "json":
        url = f.get("url", str, None)
        if url is None:
            raise ConfigError(f.key("url"), "is required for kind json")
        headers = []
        for name, value in f.get("headers", dict, {}).items():
            key = f"{f.key('headers')}.{name}"
            if not HEADER_NAME_RE.fullmatch(name):
                raise ConfigError(key, "is no HTTP header name (letters, digits and !#$%&'*+.^_`|~-)")
            if name.lower() in RESERVED_HEADERS:
                raise ConfigError(key, "is set by tinytrack itself")
            if (
                not isinstance(value, str)
                or not value
                or value != value.strip(" \t")
                or not HEADER_VALUE_RE.fullmatch(value)
            ):
                raise ConfigError(
                    key, "must be printable ASCII, not blank, no space at either end (its value is not shown)"
                )
            headers.append((name, value))
        return ForwardTarget("json", plain_url(url, f.key("url")), headers=tuple(headers))
    pixel_id = f.get("pixel_id", str, None)
    if pixel_id is None or not re.fullmatch(r"[0-9]{1,20}", pixel_id):
        raise ConfigError(f.key("pixel_id"), f"must be the pixel's (dataset's) id, digits, got {quoted(pixel_id)}")
    token = f.get("access_token", str, None)
    if not token or any(ord(ch) <= 0x20 or ord(ch) >= 0x7F for ch in token):
        raise ConfigError(f.key("access_token"), "is required: the token of a system user (its value is not shown)")
    event_map = {}
    for event, name in f.get("event_map", dict, {}).items():
        key = f"{f.key('event_map')}.{event}"
        if not EVENT_RE.fullmatch(event):
            raise ConfigError(key, "must be an event as postbacks name it: [a-z0-9_]{1,32}")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_ -]{1,50}", name):
            raise ConfigError(key, f"must be Meta's event name (Purchase, Lead, ...), got {quoted(name)}")
        event_map[event] = name
    if not event_map:
        raise ConfigError(f.key("event_map"), 'is required: which events Meta hears, e.g. { purchase = "Purchase" }')
    test_code = f.get("test_event_code", str, None)
    if test_code is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", test_code):
        raise ConfigError(f.key("test_event_code"), f"must be Events Manager's test code, got {quoted(test_code)}")
    endpoint = plain_url(f.get("endpoint", str, META_ENDPOINT), f.key("endpoint")).rstrip("/")
    if "?" in endpoint or "#" in endpoint:
        raise ConfigError(f.key("endpoint"), f"must be a base URL without a query, got {quoted(endpoint)}")
    source = f.get("action_source", str, "website")
    if source not in META_ACTION_SOURCES:
        raise ConfigError(f.key("action_source"), f"must be one of {', '.join(META_ACTION_SOURCES)}")
    page = f.get("event_source_url", str, None)
    return ForwardTarget(
        "meta_capi",
        f"{endpoint}/{pixel_id}/events",
        access_token=token,
        event_map=event_map,
        test_event_code=test_code,
        action_source=source,
        event_source_url=page and plain_url(page, f.key("event_source_url")),
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; raises ConfigError naming the key."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from None
    return build_config(data)


def embedded_config(host: str, port: int, postback_token: str, admin_token: str) -> Config:
    """The no-config default: one `demo` campaign landing on the built-in /demo page."""
    # A relative Location keeps the demo working whatever address the server is reached at.
    demo = single_offer(split_template("/demo?click_id={click_id}", "campaigns.demo.url", MACROS_CLICK))
    return Config(
        server=ServerConfig(host=host, port=port),
        postback=PostbackConfig(tokens=(postback_token,)),
        admin=AdminConfig(token=admin_token),
        campaigns={"demo": Campaign(name="demo", offers=demo)},
        demo=True,
    )


# --- Pure helpers ---------------------------------------------------------------------


# -- ids, text, time and addresses --


class ClickIds:
    """UUIDv7 (RFC 9562) click ids, strictly increasing within the process.

    Time-ordered keys append to the right edge of the b-tree: measured flat at
    ~255k inserts/s to 10M rows, where random UUIDv4 keys fell to ~33k/s.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.last_ms = 0
        self.counter = 0

    def resume(self, last: bytes | None) -> None:
        """Go on from the newest id stored, so ids keep growing across a restart when
        the clock now reads a little earlier (ids hold at that millisecond meanwhile).
        One more than CLOCK_STEP_MS ahead was a clock that was wrong: not followed."""
        if last is None or len(last) != 16:
            return
        value = int.from_bytes(last)
        ms, rand = value >> 80, (((value >> 64) & 0xFFF) << 62) | (value & ((1 << 62) - 1))
        if ms - self.clock() * 1000 > CLOCK_STEP_MS:
            log.warning("the newest click is dated %s, ahead of this clock: new clicks follow the clock", iso_ms(ms))
            return
        if ms > self.last_ms or (ms == self.last_ms and rand > self.counter):
            self.last_ms, self.counter = ms, rand

    def new(self) -> tuple[bytes, int]:
        """A new id, and the millisecond inside it (the click's time)."""
        ms = int(self.clock() * 1000)
        if ms > self.last_ms or self.last_ms - ms > CLOCK_STEP_MS:
            # A new millisecond; or the clock stepped back further than ids should wait
            # out (it was wrong before, or is now): follow it, ids sort below the last.
            self.last_ms, self.counter = ms, int.from_bytes(os.urandom(10)) >> 8  # 72 random bits
        else:  # same millisecond (or the clock stepped back a little): count on from the last id
            self.counter += 1 + random.getrandbits(4)  # unpredictable enough: the base is from urandom
        ms, rand = self.last_ms, self.counter & ((1 << 74) - 1)
        value = (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
        return value.to_bytes(16), ms


def format_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def strip_controls(value: str, limit: int) -> str:
    """Free text from a click: control characters out, then cut to `limit`."""
    if value.isprintable():  # nearly always; translate() with a table costs ~10x more
        return value[:limit]
    return value.translate(CONTROL_CHARS)[:limit]


def parse_pairs(raw: bytes, where: str) -> list[tuple[str, str]]:
    """Strictly decode a query string or form body; bad UTF-8 is a named 400."""
    pairs = []
    if not raw:
        return pairs
    parts = raw.split(b"&")
    if len(parts) > MAX_FIELDS:
        raise FieldError(where, f"more than {MAX_FIELDS} fields")
    for part in parts:
        if not part:
            continue
        name, _, value = part.partition(b"=")
        try:
            key = unquote_to_bytes(name.replace(b"+", b" ")).decode()
        except UnicodeDecodeError:
            raise FieldError(where, "a field name is not valid UTF-8") from None
        try:
            pairs.append((key, unquote_to_bytes(value.replace(b"+", b" ")).decode()))
        except UnicodeDecodeError:
            raise FieldError(strip_controls(key, 40) or where, "not valid UTF-8") from None
    return pairs


def parse_click_query(raw: bytes) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Sub ids, ext_id, cost and uid from a click's query, and the rest for pass_query."""
    values: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    text = raw.decode("utf-8", "replace") if raw else ""
    for part in text.split("&")[:MAX_FIELDS]:
        if not part:
            continue
        name, _, value = part.partition("=")
        name, value = _unquote(name), strip_controls(_unquote(value), MAX_VALUE_CHARS)
        field = CLICK_FIELD_NAMES.get(name)
        if field is None:
            rest.append((strip_controls(name, MAX_VALUE_CHARS), value))
        else:
            if field not in values:  # the first of repeated parameters wins
                values[field] = value
            if field in PASSED_ON_FIELDS:  # the site's or an ad platform's: still passed on (pass_query)
                rest.append((strip_controls(name, MAX_VALUE_CHARS), value))
                if field != "uid" and value:
                    values[AD_MARK] = ""  # the click has an ad click id: see ad_ids_of
    return values, rest


AD_MARK = "\x00ad"  # in a click's values: it carries an ad click id (a key no parameter can be)


def ad_ids_of(values: Mapping[str, str], ms: int) -> str:
    """A click's ad click ids as stored (JSON), with fbc where it has an fbclid."""
    ids = {name: values[name] for name in AD_IDS if values.get(name)}
    if "fbclid" in ids:
        ids["fbc"] = f"fb.1.{ms}.{ids['fbclid']}"
    return orjson.dumps(ids).decode()


LP_CID_NAMES = frozenset({"cid", "click_id", "clickid"})


def lp_params(rest: list[tuple[str, str]]) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """An LP click's cid and offer (the first non-empty of each), and the rest of its query."""
    cid = named = None
    others = []
    for name, value in rest:
        if name in LP_CID_NAMES:
            cid = cid or value  # the first that says something: cid=&cid=<id> is <id>
        elif name == "offer":
            named = named or value.lower()  # names are lowercase: "B" can only mean b
        else:
            others.append((name, value))
    return cid, named, others


def parse_click_id(text: str | None) -> bytes | None:
    """A click id's 16 bytes, or None for anything that is not a UUID."""
    if text and len(text) == 36 and UUID_RE.fullmatch(text):
        return bytes.fromhex(text.replace("-", ""))
    return None


def _unquote(text: str) -> str:
    if "%" not in text and "+" not in text:  # most sub ids: nothing to decode
        return text
    return unquote_to_bytes(text.replace("+", " ")).decode("utf-8", "replace")


@lru_cache(maxsize=4096)  # a few browsers' User-Agents make up most clicks
def is_bot(user_agent: str) -> bool:
    return not user_agent or BOT_RE.search(user_agent.lower()) is not None


def click_key(campaign: str, ip: str | None, user_agent: str | None) -> bytes:
    """What makes a click unique in its day, hashed small: campaign, IP and User-Agent."""
    text = f"{campaign}\0{ip or ''}\0{user_agent or ''}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def iso_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_since(text: str, field: str = "since") -> int:
    """``YYYY-MM-DD`` (UTC midnight) or an ISO 8601 time with an offset, as unix ms."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise FieldError(field, f"must be YYYY-MM-DD or ISO 8601 with an offset, got {quoted(text)}") from None
    if moment.tzinfo is None:
        if len(text) != 10:
            raise FieldError(field, f"needs a UTC offset, got {quoted(text)}")
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def day_text(day: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # fromisoformat also takes week dates (2026-W09-7)


def parse_day(text: str, field: str) -> int:
    try:
        if not DATE_RE.fullmatch(text):
            raise ValueError(text)
        return (dt.date.fromisoformat(text) - dt.date(1970, 1, 1)).days
    except ValueError:
        raise FieldError(field, f"must be a date as YYYY-MM-DD, got {quoted(text)}") from None


def parse_address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def match_networks(address: Address | None, networks: Iterable[Network]) -> bool:
    return address is not None and any(address in net for net in networks)


def client_address(peer: str | None, forwarded_for: str | None, trusted: Collection[Network]) -> str:
    """The visitor's address: the peer, or behind trusted proxies the right-most
    X-Forwarded-For entry that is not one of them. ``peer=None`` is a unix socket,
    whose peer is always the proxy."""
    if peer is not None and not _is_trusted(peer, trusted):
        return peer
    hops = forwarded_for.split(",") if forwarded_for else []
    for hop in reversed(hops):
        hop = hop.strip()
        if not _is_trusted(hop, trusted):
            return hop  # left of this the client wrote the header, so nothing there counts
    return hops[0].strip() if hops else (peer or "")


@lru_cache(maxsize=1024)
def _is_trusted(text: str, trusted: Collection[Network]) -> bool:
    return match_networks(parse_address(text), trusted)


@lru_cache(maxsize=1024)  # ipaddress is slow (~10 us) and senders repeat
def mask_ip(text: str) -> str:
    """An address cut to /24 (IPv4) or /48 (IPv6), as logs and old clicks keep it."""
    address = parse_address(text)
    if address is None:
        return "-" if not text else "invalid"
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


def truncate_ip(text: str | None) -> str | None:
    """A click's address once ``pii_days`` have passed: its /24 or /48 network."""
    return mask_ip(text) if text and parse_address(text) else None


SECRET_PARAMS = frozenset({b"token", b"key", b"signature", b"sig", b"secret", b"password"})
# A name that ends in one of these words (api_key, access_token, X-Auth, hmac_sig), or
# has token, secret or passw in it. Not keyword, author or design: sub ids stay readable.
SECRET_NAME_RE = re.compile(
    rb"(?:^|[^a-z])(?:api_?key|apikey|key|auth|sig|signature|session|sessionid|credentials?|pwd)$|token|secret|passw",
    re.I,
)


def is_secret_name(name: bytes) -> bool:
    """Whether a query parameter (its raw name) looks like it carries a secret."""
    name = unquote_to_bytes(name).lower()
    return name in SECRET_PARAMS or SECRET_NAME_RE.search(name) is not None


def log_safe(text: str) -> str:
    """Text for a log line: control characters escaped, so nobody forges a line."""
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def redact_query(raw: bytes) -> str:
    """A query string for a log line, with the values of secret parameters hidden."""
    parts = []
    for part in raw.split(b"&"):
        name = part.partition(b"=")[0]
        parts.append(name + b"=***" if is_secret_name(name) else part)
    return log_safe(b"&".join(parts).decode("ascii", "backslashreplace"))


def redact_url(url: str | None) -> str | None:
    """A forward's URL for people (the API, the CLI, pages): secret-looking query values hidden."""
    if not url or "?" not in url:
        return url
    head, _, query = url.partition("?")
    query, hash_, fragment = query.partition("#")
    return f"{head}?{redact_query(query.encode('latin-1', 'replace'))}{hash_}{fragment}"


def is_loopback_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback: localhost, 127.x or ::1."""
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        name = host.partition(":")[0]
    else:
        name = host
    if name.lower() == "localhost":
        return True
    address = parse_address(name) if name else None
    return address is not None and address.is_loopback


# -- postbacks --


class JSONObject(list):
    """A JSON object as its (key, value) pairs, repeats and all."""


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_body(body: bytes, content_type: str | None) -> list[tuple[str, Any]]:
    """Pairs from a JSON object or a form body; 415 for anything else."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "application/json":
        try:
            # The standard library here, not orjson: orjson keeps the last of repeated
            # keys, which would let {"payout":"1","payout":"1000"} slip past the
            # "given twice" check; and numbers arrive as their exact text, not floats.
            # UTF-8 only, as RFC 8259 asks of JSON between systems.
            data = json.loads(
                body.decode(), object_pairs_hook=JSONObject, parse_float=str, parse_int=str, parse_constant=_no_constant
            )
        except (ValueError, RecursionError):
            raise FieldError("body", "invalid JSON") from None
        if not isinstance(data, JSONObject):
            raise FieldError("body", "must be a JSON object")
        return data
    if media in FORM_TYPES:
        return parse_pairs(body, "body")
    raise HTTPError(Refusal.UNSUPPORTED_MEDIA_TYPE)


PIXEL = "pixel"  # a conversion's source while only the browser pixel has reported it
IMPORT = "import"  # a conversion stored or corrected from a network's report (reconcile, /api/conversions/import)


@dataclasses.dataclass(frozen=True)
class Postback:
    """A validated postback, ready for the writer."""

    click_id: bytes | None  # None: a user_id alone, credited by [attribution]
    event: str = "conversion"
    payout: int = 0  # micro-units: 12.5 is 12_500_000
    payout_given: bool = False
    currency: str = "USD"
    txid: str | None = None
    status: str = "approved"
    ts_ms: int = 0
    ts_given: bool = False  # the sender said when; otherwise ts_ms is when it arrived
    ip: str = ""
    user_id: str | None = None  # the site's id for the visitor (see attribute)
    source: str | None = None  # None: a network's postback; PIXEL: the browser pixel (no token); IMPORT: a report

    @property
    def dedupe_key(self) -> str:
        # SPEC: with a txid the key is (click_id, txid), without it (click_id, event).
        return f"t:{self.txid}" if self.txid else f"e:{self.event}"


def collect_fields(pairs: Iterable[tuple[str, Any]], aliases: Mapping[str, str] = POSTBACK_ALIASES) -> dict[str, str]:
    """Map aliases onto field names; a field given twice with two values is a 400."""
    fields: dict[str, str] = {}
    given_as: dict[str, str] = {}
    for name, raw in pairs:
        field = aliases.get(name)
        if field is None:
            continue
        value = field_text(name, raw)
        if value is None:
            continue
        if field in fields and fields[field] != value:
            raise FieldError(field, f"given twice ({given_as[field]} and {name}) with different values")
        fields[field], given_as[field] = value, name
    return fields


def field_text(name: str, raw: Any) -> str | None:
    """A JSON or form value as text; empty and null mean absent."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise FieldError(name, "must be a string or a number, got a boolean")
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float):
        if raw != raw or raw in (float("inf"), float("-inf")):
            raise FieldError(name, "must be a finite number")
        # repr is the shortest text that round-trips: 0.1 stays "0.1", never 0.1000000000000000055.
        text = repr(raw)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(raw, str):
        if not raw.isascii():
            try:
                raw.encode()
            except UnicodeEncodeError:  # JSON's "\ud800": no UTF-8 can carry it
                raise FieldError(name, "is not valid Unicode (a lone surrogate)") from None
        return raw.strip() or None
    kind = (
        "an object"
        if isinstance(raw, (dict, JSONObject))
        else "an array"
        if isinstance(raw, list)
        else type(raw).__name__
    )
    raise FieldError(name, f"must be a string or a number, got {kind}")


def parse_payout(text: str) -> int:
    return parse_money(text, "payout")


def parse_money(text: str, field: str, high: int = MAX_PAYOUT) -> int:
    """A decimal >= 0 with at most 6 decimals as micro-units; FieldError names `field`."""
    match = PAYOUT_RE.fullmatch(text)
    if not match:
        raise FieldError(field, f"must be a decimal >= 0 with at most 6 decimals, got {quoted(text)}")
    whole, frac = match.group(1), match.group(2) or ""
    units = int(whole) * 1_000_000 + int(frac.ljust(6, "0"))
    if units > high:
        raise FieldError(field, f"must be at most {format_money(high)}, got {quoted(text)}")
    return units


def click_cost_units(text: str, high: int) -> int | None:
    """A click's `cost` as micro-units, or None when it is no such amount (never a 400)."""
    try:
        return parse_money(text, "cost", high)
    except FieldError:
        return None


def share(amount: int, numerator: int, denominator: int) -> int:
    """amount * numerator / denominator rounded half to even, in integers."""
    whole, rest = divmod(amount * numerator, denominator)
    return whole + (2 * rest > denominator or (2 * rest == denominator and whole % 2 == 1))


def spread(amount: int, weights: Sequence[int]) -> list[int]:
    """amount split by weights, exactly: each share rounded down, then what is left
    goes one unit each to the largest remainders (the earlier on a tie)."""
    total = sum(weights)
    if not total:
        raise ValueError("nothing to spread over")
    shares = [amount * w // total for w in weights]
    left = amount - sum(shares)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(amount * weights[i] % total), i))
    for i in by_remainder[:left]:
        shares[i] += 1
    return shares


def format_money(units: int) -> str:
    """Micro-units as an exact decimal string with at least two decimals (a loss signed)."""
    whole, frac = divmod(abs(units), 1_000_000)
    frac_text = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{'-' if units < 0 else ''}{whole}.{frac_text}"


def overflow_problem(campaign: str, day: int) -> str:
    return f"payout: would take the {day_text(day)} total of campaign {campaign} past {format_money(MAX_SUM)}"


def parse_ts(text: str, now: float) -> int:
    """ISO 8601 with an offset, or unix seconds, as unix milliseconds."""
    if len(text) > 40 or not text.isascii() or not text.isprintable():
        raise FieldError("ts", f"must be ISO 8601 with an offset or unix seconds, got {quoted(text)}")
    if UNIX_TS_RE.fullmatch(text):
        seconds = float(text)
    else:
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            raise FieldError("ts", f"must be ISO 8601 with an offset or unix seconds, got {quoted(text)}") from None
        if moment.tzinfo is None:
            raise FieldError("ts", f"needs a UTC offset (like 2026-01-06T14:03:22Z), got {quoted(text)}")
        seconds = moment.timestamp()
    if seconds > now + FUTURE_TS_TOLERANCE:
        raise FieldError("ts", f"is more than a day in the future, got {quoted(text)}")
    if seconds < 946684800:  # 2000-01-01: anything earlier is a unit mix-up
        raise FieldError("ts", f"is before the year 2000, got {quoted(text)}")
    return int(seconds * 1000)


def parse_status(text: str, status_map: Mapping[str, str]) -> str:
    word = text.lower()
    status = status_map.get(word, word)
    if status not in STATUSES:
        raise FieldError(
            "status", f"must be one of {', '.join(STATUSES)} or a postback.status_map word, got {quoted(text)}"
        )
    return status


def build_postback(fields: Mapping[str, str], conf: PostbackConfig, now: float, ip: str = "") -> Postback:
    """Validate collected fields into a Postback; raises FieldError naming the field."""
    click_text, user_id = fields.get("click_id"), fields.get("user_id")
    if click_text is None and user_id is None:
        raise FieldError("click_id", "is required")
    if click_text is not None and not UUID_RE.fullmatch(click_text):
        raise FieldError("click_id", f"must be a click id issued by this server (a UUID), got {quoted(click_text)}")
    if user_id is not None and not UID_RE.fullmatch(user_id):
        raise FieldError("user_id", f"must be 1-64 characters of A-Z a-z 0-9 . _ : -, got {quoted(user_id)}")
    event = fields.get("event", "conversion").lower()
    if not EVENT_RE.fullmatch(event):
        raise FieldError("event", f"must match [a-z0-9_]{{1,32}}, got {quoted(event)}")
    if conf.events is not None and event not in conf.events:
        raise FieldError("event", f"must be one of {', '.join(conf.events)}, got {quoted(event)}")
    payout_text = fields.get("payout")
    currency = fields.get("currency", conf.currency)
    if not CURRENCY_RE.fullmatch(currency):
        raise FieldError("currency", f"must be a three-letter ISO 4217 code, got {quoted(currency)}")
    txid = fields.get("txid")
    if txid is not None and not TXID_RE.fullmatch(txid):
        raise FieldError("txid", f"must be 1-64 characters of A-Z a-z 0-9 . _ : -, got {quoted(txid)}")
    payout = parse_payout(payout_text) if payout_text is not None else 0
    return Postback(
        click_id=click_text and bytes.fromhex(click_text.replace("-", "")),
        event=event,
        payout=payout,
        payout_given=payout_text is not None,
        currency=currency.upper(),
        txid=txid,
        status=parse_status(fields["status"], conf.status_map) if "status" in fields else "approved",
        ts_ms=parse_ts(fields["ts"], now) if "ts" in fields else int(now * 1000),
        ts_given="ts" in fields,
        ip=ip,
        user_id=user_id,
    )


class NewTouch(NamedTuple):
    """A validated touch (POST /touch), ready for the writer."""

    uid: str
    channel: str
    campaign: str
    ts: int  # unix ms


def build_touch(fields: Mapping[str, str], campaigns: Mapping[str, Campaign], now: float) -> NewTouch:
    """Validate a touch's fields; raises FieldError naming the field. Its campaign is a
    configured one, and its channel (which may be left out) the campaign's."""
    for name in ("user_id", "campaign"):
        if name not in fields:
            raise FieldError(name, "is required")
    uid, name = fields["user_id"], fields["campaign"]
    if not UID_RE.fullmatch(uid):
        raise FieldError("user_id", f"must be 1-64 characters of A-Z a-z 0-9 . _ : -, got {quoted(uid)}")
    campaign = campaigns.get(name)
    if campaign is None:
        raise FieldError("campaign", f"must be a campaign of the config, got {quoted(name)}")
    channel = fields.get("channel", campaign.channel).lower()
    if channel not in CHANNELS:
        raise FieldError("channel", f"must be one of {', '.join(CHANNELS)}, got {quoted(channel)}")
    if channel != campaign.channel:
        raise FieldError("channel", f"campaign {name} is {campaign.channel} (its config's channel), got {channel}")
    return NewTouch(uid, channel, name, parse_ts(fields["ts"], now) if "ts" in fields else int(now * 1000))


def refuse_unsigned_fields(pairs: Iterable[tuple[str, Any]], aliases: Mapping[str, str] = POSTBACK_ALIASES) -> None:
    """A signed POST's signature covers its body only: a postback field in its query
    string would let a captured body be replayed with new fields (token/key aside)."""
    for name, _ in pairs:
        field = aliases.get(name)
        if field is not None and field != "token":
            raise FieldError(field, "must be in the signed body, not the query string (the signature covers the body)")


# -- tokens and signatures --


def token_matches(candidate: str | None, tokens: Iterable[str]) -> bool:
    """Constant-time check against every token (no early exit leaks which matched)."""
    if not candidate:
        return False
    given = candidate.encode()
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given, token.encode())
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750), else None."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def admin_authorized(authorization: str | None, token: str | None) -> bool:
    """``Bearer <admin token>``, or HTTP Basic with the admin token as the password."""
    if not token or not authorization:
        return False
    if (bearer := bearer_token(authorization)) is not None:
        return token_matches(bearer, (token,))
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        return token_matches(decoded.partition(":")[2], (token,))
    return False


def sign(secret: str, timestamp: int, payload: bytes) -> str:
    return hmac.new(secret.encode(), b"%d." % timestamp + payload, hashlib.sha256).hexdigest()


def verify_signature(header: str | None, payload: bytes, secrets_: Iterable[str], now: float) -> bool:
    """Check ``t=<unix>,v1=<hex>[,v1=...]`` over ``"<t>.<payload>"`` for any secret."""
    if not header:
        return False
    timestamp, candidates = None, []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and DIGITS_RE.fullmatch(value):
            timestamp = int(value)
        elif name == "v1" and value:
            candidates.append(value.lower().encode())
    if timestamp is None or not candidates or abs(now - timestamp) > SIGNATURE_TOLERANCE:
        return False
    found = False
    for secret in secrets_:
        expected = sign(secret, timestamp, payload).encode()
        for candidate in candidates:
            found |= hmac.compare_digest(expected, candidate)
    return found


# -- forwarding rules --


FORWARD_CONCURRENCY = 8  # deliveries in flight at once; a 1 vCPU box has other work
FORWARD_PER_HOST = 4  # of those, to one host: a source that hangs can't hold every slot
FORWARD_PAGES = 10  # due deliveries read per round, in pages, while slots are free and hosts full
FORWARD_POLL_SECONDS = 1.0  # how often the outbox is looked at when nothing woke the worker
FORWARD_BATCH = 100  # due deliveries read at a time
FORWARD_SHUTDOWN_SECONDS = 10  # SIGTERM waits at most this for deliveries in flight
MAX_BACKOFF_SECONDS = 6 * 3600
MAX_ANSWER_BYTES = 64 * 1024  # of an answer's body read (Meta's is a few hundred bytes)
META_TRANSIENT = frozenset({1, 2, 4, 17, 32, 341, 613, 80004})  # Meta's error codes a later try may get past


class ForwardFacts(NamedTuple):
    """A conversion's facts its forward URL is filled from, as conversions stores them."""

    click_id: bytes
    campaign: str
    sub1: str | None
    sub2: str | None
    sub3: str | None
    sub4: str | None
    sub5: str | None
    ext_id: str | None
    event: str
    txid: str | None
    cost: int | None  # what {cost} says: the conversion's cpa/revshare cost, else its click's
    lander: str | None = None
    offer: str | None = None  # None: the click had none (a plain `url` campaign): {offer} says "default"
    ad_ids: str | None = None  # its click's ad click ids, JSON (see ad_ids_of)


class Delivery(NamedTuple):
    """One forward of a conversion, as the outbox stores it when queued."""

    conversion_id: int
    campaign: str
    status: str  # the conversion status it tells the source
    url: str
    idempotency_key: str
    created_at: int
    next_at: int
    deadline: int
    fallback_url: str | None = None  # where it goes after FALLBACK_AFTER failed tries
    kind: str | None = None  # None: a GET of url; "json", "meta_capi": a POST of body (ForwardTarget)
    body: bytes | None = None


FALLBACK_AFTER = 3  # failed tries of a delivery's url before its fallback_url is tried


class ForwardPlan(NamedTuple):
    reversal: bool  # a rejection of a forwarded event: cancel what is pending, tell a source that heard
    forward: bool  # the campaign forwards this event and status


def plan_forward(campaign: Campaign | None, event: str, status: str) -> ForwardPlan:
    """What a conversion's new status means for its traffic source."""
    if campaign is None or (campaign.postback_url is None and campaign.target is None):
        return ForwardPlan(False, False)
    reversal = status == "rejected" and (campaign.forward_events is None or event in campaign.forward_events)
    return ForwardPlan(reversal, campaign.forwards(event, status))


def build_delivery(
    campaign: Campaign,
    conversion_id: int,
    facts: ForwardFacts,
    status: str,
    payout: int,
    currency: str,
    now_ms: int,
    conf: ForwardConfig,
) -> Delivery:
    """A delivery of a conversion to the campaign's postback_url, its macros filled."""
    values = {name: value for name, value in facts._asdict().items() if value is not None}
    if facts.ad_ids:
        values.update(orjson.loads(values.pop("ad_ids")))
    values.update(
        click_id=format_uuid(facts.click_id) if len(facts.click_id) == 16 else "",  # b"": credited to a touch
        cost="" if facts.cost is None else format_money(facts.cost),
        offer=facts.offer or DEFAULT_OFFER,
        status=status,
        payout=format_money(payout),
        currency=currency,
        id=str(conversion_id),
    )
    first_try = now_ms + conf.delay_seconds * 1000
    # The key the source can dedupe on: random, so it is unique across installations,
    # and stored, so every retry of this delivery sends the same one.
    return Delivery(
        conversion_id,
        campaign.name,
        status,
        campaign.postback_url.fill(values),
        secrets.token_hex(16),
        now_ms,
        first_try,
        first_try + conf.max_age_hours * 3_600_000,
        campaign.fallback_url and campaign.fallback_url.fill(values),
    )


def offer_page(campaign: Campaign, offer: str | None) -> str | None:
    """Where a conversion's visitor was sent, for Meta's event_source_url: its offer's URL
    up to its query or first macro (no click id, nothing personal)."""
    arm = next((arm for arm in campaign.offers.arms if arm.name == (offer or DEFAULT_OFFER)), None)
    if arm is None:
        arm = campaign.offers.arms[0] if campaign.offers.arms else None
    return arm and re.split(r"[?#{]", arm.url.source, maxsplit=1)[0]


def meta_event_id(facts: ForwardFacts) -> str:
    """The event_id Meta dedupes on: the order's txid, else <click id>:<event>. A browser
    pixel that sends the same eventID (and event name) is the same event to Meta."""
    return facts.txid or f"{format_uuid(facts.click_id)}:{facts.event}"


def target_delivery(
    campaign: Campaign, conversion: Mapping[str, Any], ts_ms: int, facts: ForwardFacts, now_ms: int, conf: ForwardConfig
) -> Delivery:
    """A delivery to the campaign's target (json or meta_capi) of a conversion as
    /api/conversions shows it (its current row; it converted at ts_ms): the body
    stored, its secrets not."""
    target = campaign.target
    key = secrets.token_hex(16)
    if target.kind == "json":
        body: dict[str, Any] = {**conversion, "idempotency_key": key}
    else:
        event: dict[str, Any] = {
            "event_name": target.event_map[facts.event],
            "event_time": ts_ms // 1000,
            "event_id": meta_event_id(facts),
            "action_source": target.action_source,
            # Filled as each try is sent, from what is kept then (Database.meta_user_data): the
            # outbox holds nothing personal, and forget and the purges reach what is sent.
            "user_data": {},
            "custom_data": {"value": float(conversion["payout"]), "currency": conversion["currency"]},
        }
        page = target.event_source_url or offer_page(campaign, facts.offer)
        if target.action_source == "website" and page:
            event["event_source_url"] = page
        body = {"data": [event]}
    first_try = now_ms + conf.delay_seconds * 1000
    return Delivery(
        conversion["id"],
        campaign.name,
        conversion["status"],
        target.url,
        key,
        now_ms,
        first_try,
        first_try + conf.max_age_hours * 3_600_000,
        None,
        target.kind,
        orjson.dumps(body),
    )


def forward_host(url: str) -> str:
    """The host:port a delivery goes to, as the per-host limit counts it."""
    head = URL_HEAD_RE.match(url)
    return head.group(1).lower() if head else ""


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What one try of a delivery came to."""

    code: int | None = None  # the HTTP status, if an answer came
    error: str | None = None
    retry_after: float | None = None  # seconds, from a 429/503's Retry-After
    final: bool = False  # an error no retry can fix (a refused address)
    retry: bool = False  # a 4xx worth trying again (Meta says it is transient or a rate limit)
    body: bytes = b""  # the answer's body, when it was asked for (meta_capi)


NAT64 = ipaddress.ip_network("64:ff9b::/96")
NOT_PUBLIC_V6 = (
    ipaddress.ip_network("64:ff9b:1::/48"),  # RFC 8215 local-use NAT64; Python < 3.12.4 calls it global
    ipaddress.ip_network("fec0::/10"),  # deprecated site-local (RFC 3879), still routed inside some networks
)
IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 SIIT: ::ffff:0:a.b.c.d
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # the deprecated ::a.b.c.d form


def is_public(address: Address) -> bool:
    """False for loopback, private, link-local, multicast, unspecified and reserved
    addresses, including IPv4 inside IPv6 (mapped, NAT64, 6to4, Teredo)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo and address.teredo[1])
        if address in NAT64 or address in IPV4_COMPATIBLE or address in IPV4_TRANSLATED:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if (embedded is not None and not is_public(embedded)) or any(address in net for net in NOT_PUBLIC_V6):
            return False
    return address.is_global and not address.is_multicast


def parse_retry_after(text: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if not text:
        return None
    text = text.strip()
    if DIGITS_RE.fullmatch(text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def next_step(
    attempt: Attempt,
    attempts: int,
    deadline_ms: int,
    now_ms: int,
    conf: ForwardConfig,
    rng: Callable[[], float] = random.random,
) -> tuple[str, int, str | None]:
    """After a delivery's ``attempts``-th try: its new state, when it is next due and
    why it failed (None when done)."""
    code = attempt.code
    if code is not None and 200 <= code < 300 and attempt.error is None:
        return "done", now_ms, None
    error = attempt.error or f"HTTP {code}"
    if code == 410:
        return "failed", now_ms, "HTTP 410: the source says this URL is gone; not retried"
    if attempt.final or (code is not None and 300 <= code < 500 and code != 429 and not attempt.retry):
        return "failed", now_ms, error
    # Retried: 5xx, 429, timeouts, refused connections. Exponential with jitter, so
    # deliveries that failed together (the source was down) don't retry together.
    if attempt.retry_after is not None and code in (429, 503):
        delay = min(attempt.retry_after, MAX_BACKOFF_SECONDS)
    else:
        delay = min(conf.first_retry_seconds * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS) * (0.8 + 0.4 * rng())
    due = now_ms + int(delay * 1000)
    if due > deadline_ms:
        return "dead", now_ms, f"{error}; gave up after {attempts} tries (forward.max_age_hours)"
    return "pending", due, error


# -- fraud rules --


REVIEW_DECISIONS = ("approve", "reject")
FLAG_BATCH = 500  # conversions per transaction of `flags recompute`
FLAGS = ("bot", "no_click_id", "ip_flood", "listed_ip", "ctit_fast", "ip_cluster")  # what a flag may be named
ADDRESS_KEYS = 20_000  # (campaign, address) pairs ip_flood counts at once: ~150 bytes each, 3.1 MB (tracemalloc, IPv6)


class AddressCounts:
    """Clicks per (campaign, address) in the current UTC minute, in memory: ip_flood reads
    no database on the click's path. At most ADDRESS_KEYS pairs: a minute with more new
    addresses starts its counts over (a flood of addresses is undercounted, never let
    grow memory), and a new minute starts from nothing."""

    def __init__(self, limit: int = ADDRESS_KEYS) -> None:
        self.limit, self.minute, self.counts = limit, -1, {}

    def add(self, campaign: str, ip: str, ms: int) -> int:
        """Count a click; how many this minute so far, this one included."""
        if ms // 60_000 != self.minute:
            self.minute, self.counts = ms // 60_000, {}
        key = (campaign, ip)
        n = self.counts.get(key, 0) + 1
        if n == 1 and len(self.counts) >= self.limit:
            self.counts = {}
        self.counts[key] = n
        return n


def click_flags(fraud: FraudConfig, ip: str, count: int) -> dict[str, str]:
    """A click's flags and their evidence: ip_flood (`count` clicks from its address this
    minute, this one included) and listed_ip."""
    flags = {}
    if fraud.ip_clicks_per_minute is not None and count > fraud.ip_clicks_per_minute:
        flags["ip_flood"] = f"{count} clicks from this address this minute > {fraud.ip_clicks_per_minute}"
    if fraud.listed_ips:
        found = fraud.listed_network(ip)
        if found:
            flags["listed_ip"] = f"{found[0]} in {found[1]}"
    return flags


def conversion_flags(
    fraud: FraudConfig, click_flags_json: str | None, bot: bool, ctit_ms: int | None, cluster: int = 0
) -> dict[str, str]:
    """A conversion's flags: its click's (bot among them); ctit_fast: sooner than
    min_ctit_seconds after its click (ctit_ms: its time minus its click's; None without
    a click: credited to a posted touch, or to nobody); ip_cluster:
    `cluster` conversions (this one included, counted up to one past the limit) in the
    hour up to it on clicks from its click's address, more than ip_conversions_per_hour."""
    flags = orjson.loads(click_flags_json) if click_flags_json else {}
    if bot:
        flags["bot"] = "its click was a bot's (User-Agent)"
    if fraud.min_ctit_seconds is not None and ctit_ms is not None and ctit_ms < fraud.min_ctit_seconds * 1000:
        flags["ctit_fast"] = f"{ctit_ms / 1000:.1f} s < {fraud.min_ctit_seconds} s"
    if fraud.ip_conversions_per_hour is not None and cluster > fraud.ip_conversions_per_hour:
        flags["ip_cluster"] = (
            f"{cluster} conversions in an hour on clicks from this address > {fraud.ip_conversions_per_hour}"
        )
    return flags


def recomputed_flags(
    fraud: FraudConfig,
    stored: str | None,
    click_flags_json: str | None,
    click_kept: bool,
    bot: bool,
    ip: str | None,
    ctit_ms: int | None,
    cluster: int,
) -> dict[str, str]:
    """A past conversion's flags under today's rules: its click's as they were stored
    (ip_flood counted then), listed_ip against today's list, ctit_fast and ip_cluster
    again. A purged click's flags are read from the conversion's own (they were copied);
    without its address (cut after pii_days) listed_ip and ip_cluster stay as they were."""
    before = orjson.loads(stored or "{}")
    if click_kept:
        inherited = orjson.loads(click_flags_json) if click_flags_json else {}
    else:
        inherited = {k: v for k, v in before.items() if k in ("bot", "no_click_id", "ip_flood")}
        bot = False  # "bot" is in inherited already, if it was
    inherited.pop("listed_ip", None)
    if ip and fraud.listed_ips:
        inherited.update(click_flags(fraud, ip, 0))  # count 0: listed_ip only (ip_flood was counted then)
    flags = conversion_flags(fraud, orjson.dumps(inherited).decode() if inherited else None, bot, ctit_ms, cluster)
    if not ip:
        flags.update({name: before[name] for name in ("listed_ip", "ip_cluster") if name in before})
    return flags


# -- attribution: who gets the credit --


ORGANIC, NOBODY = "(organic)", "(none)"  # the campaign of a conversion nobody is credited with
MAX_CANDIDATES = 500  # a user's latest clicks, and touches, weighed for a conversion
MAX_SHOWN_CANDIDATES = 50  # of those, the latest stored with the decision (and the winner)


class Touch(NamedTuple):
    """One of a user's touches a conversion may be credited to: a click (through /c/,
    with its uid) or a touch (POST /touch: an email, a CRM, an organic visit)."""

    kind: str  # "click" | "touch"
    id: str  # the click's id, or the touch's number
    channel: str
    campaign: str
    ts: int  # unix ms

    def view(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.id,
            "channel": self.channel,
            "campaign": self.campaign,
            "ts": iso_ms(self.ts),
        }


def forward_facts(row: Sequence, by_matrix: bool, credited_click: bytes | None) -> ForwardFacts:
    """A stored conversion's ForwardFacts (click_id .. offer); one credited by the
    matrix (`by_matrix`) names the click credited (b"": a touch's, or nobody's)."""
    facts = ForwardFacts(*row)
    return facts._replace(click_id=credited_click or b"") if by_matrix else facts


def address_matcher(ip: str) -> Callable[[str | None], bool]:
    """Whether a stored address is `ip` in any way it may have been written (clicks keep
    what X-Forwarded-For said: ::ffff:a.b.c.d, upper case, zeros written out), cheaply
    for the many that plainly are not."""
    target = parse_address(ip)
    text_of = str(target)

    def matches(text: str | None) -> bool:
        if not text:
            return False
        if text == text_of:
            return True
        if (text_of not in text) if target.version == 4 else (":" not in text):
            return False
        return parse_address(text) == target

    return matches


def forgotten_decision(stored: str) -> str:
    """A stored decision once its person is forgotten: the rule, and the winner's kind,
    channel and campaign (the credit stands); no touch's id or time."""
    decision = orjson.loads(stored)
    winner = decision["winner"]
    return orjson.dumps(
        {
            "rule": decision["rule"],
            "winner": winner and {k: winner[k] for k in ("kind", "channel", "campaign")},
            "candidates": [],
            "candidates_total": decision.get("candidates_total", len(decision["candidates"])),
            "forgotten": True,
        }
    ).decode()


class Decision(NamedTuple):
    """Who gets a conversion's credit, and why: the winning touch (None: nobody, the
    conversion is stored under `campaign`, "(organic)" or "(none)"), the rule that
    decided, and every candidate that was weighed (oldest first)."""

    winner: Touch | None
    campaign: str
    rule: str
    candidates: tuple[Touch, ...]

    def view(self) -> dict[str, Any]:
        """As stored and shown: the latest MAX_SHOWN_CANDIDATES candidates (and the winner)."""
        shown = self.candidates[-MAX_SHOWN_CANDIDATES:]
        if self.winner is not None and self.winner not in shown:
            shown = (self.winner, *shown)
        return {
            "rule": self.rule,
            "winner": self.winner and self.winner.view(),
            "candidates": [touch.view() for touch in shown],
            "candidates_total": len(self.candidates),
        }


def attribute(touches: Iterable[Touch], ts: int, conf: AttributionConfig) -> Decision:
    """The seed's priority matrix. Candidates are the touches in the window up to the
    conversion (`ts`; window_days before it, inclusive; later touches are ignored). The
    first channel of `priority` with a candidate wins, by its latest touch (a tie in
    time goes to a click over a touch, then to the later stored): "affiliate first, last
    click in the window; paid next unless an affiliate claims; email only without
    either". Organic touches, and channels left out of `priority`, are never credited."""
    since = ts - conf.window_days * DAY_MS
    candidates = tuple(
        sorted((t for t in touches if since <= t.ts <= ts), key=lambda t: (t.ts, t.kind == "click", t.id.zfill(20)))
    )
    for i, channel in enumerate(conf.priority):
        latest = [t for t in candidates if t.channel == channel]
        if latest:
            winner = latest[-1]
            higher = conf.priority[:i]
            beaten = f"; no {' or '.join(higher)} touch" if higher else ""
            rule = f"{channel}: the last {channel} touch in the {conf.window_days}-day window{beaten}"
            return Decision(winner, winner.campaign, rule, candidates)
    if not candidates:
        return Decision(None, NOBODY, f"none: no touch in the {conf.window_days}-day window", candidates)
    channels = sorted({t.channel for t in candidates}, key=CHANNELS.index)
    campaign = ORGANIC if "organic" in channels else NOBODY
    return Decision(None, campaign, f"{campaign[1:-1]}: only {', '.join(channels)} touches, never credited", candidates)


# -- costs: a source's spend report --


MAX_COST_ROWS = 100_000  # rows in one upload
MAX_COST_BODY = 16 * 1024 * 1024  # bytes of a PUT /api/costs body
COST_ROWS_PER_WRITE = 500  # an upload is written in transactions of this many rows (~30 ms): clicks go between
COST_FIELDS = ("day", "campaign", "sub1", "cost", "currency")


class CostUpload(NamedTuple):
    """One uploaded cost: a day in the upload's zone, a campaign, a sub1 ('' for the
    whole campaign-day, spread over its sub1 by clicks), micro-units and a currency."""

    day: int
    campaign: str
    sub1: str
    cost: int
    currency: str


UTC_NAMES = frozenset(
    ("UTC", "utc", "Z", "+00:00", "Etc/UTC", "UTC0", "GMT", "Etc/GMT", "Etc/Zulu", "Zulu", "Universal", "Etc/Universal")
    + ("UCT", "Etc/UCT", "Etc/Greenwich", "Greenwich", "GMT0", "Etc/GMT0", "Etc/GMT+0", "Etc/GMT-0")
)


@cache
def zone_names() -> frozenset[str]:
    """The IANA zones this machine knows (not its files that are no zone: localtime, posixrules...)."""
    return frozenset(available_timezones()) - {"Factory", "localtime", "posixrules", "posix", "right"}


def zone_param(text: str | None, field: str = "tz") -> str:
    """A zone as given (?tz=, --tz): UTC's other names as "UTC", else an IANA zone this
    machine knows (not its files that are no zone); FieldError if not."""
    name = text or "UTC"
    if name in UTC_NAMES:
        return "UTC"
    if name not in zone_names():
        raise FieldError(field, f"must be an IANA time zone like Europe/Berlin or UTC, got {quoted(name)}")
    zone(name)
    return name


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    """An IANA time zone (Europe/Berlin, America/New_York, UTC); FieldError if unknown.
    (Input is checked by zone_param first; a zone stored by an older version is read as it was.)"""
    try:
        if not name or len(name) > 64 or name.startswith(("/", ".")) or ".." in name:
            raise ValueError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise FieldError("tz", f"must be an IANA time zone like Europe/Berlin or UTC, got {quoted(name)}") from None


@lru_cache(maxsize=4096)
def day_seconds(day: int, tz: str) -> tuple[tuple[int, int], ...]:
    """A day in zone `tz` as the UTC days it covers and how many of its seconds each
    holds; none for a day the zone skipped (Samoa's 2011-12-30: cost_rows refuses it)."""
    local = zone(tz)
    date = dt.date(1970, 1, 1) + dt.timedelta(days=day)
    start = int(dt.datetime.combine(date, dt.time(), local).timestamp())
    end = int(dt.datetime.combine(date + dt.timedelta(days=1), dt.time(), local).timestamp())
    days = range(start // 86400, (end - 1) // 86400 + 1) if end > start else ()
    return tuple((d, min(end, (d + 1) * 86400) - max(start, d * 86400)) for d in days)


def utc_parts(day: int, tz: str, amount: int) -> list[tuple[int, int]]:
    """A day in zone `tz` over the UTC days it covers: (UTC day, its share of amount by
    the seconds it holds of the day), the shares adding up to amount exactly."""
    parts = day_seconds(day, tz)
    return list(zip([d for d, _ in parts], spread(amount, [n for _, n in parts]))) if parts else []


def cost_rows(
    items: Iterable[Mapping[str, Any]],
    campaigns: Mapping[str, Campaign],
    tz: str,
    last_day: int,
    name: Callable[[int, str], str],
) -> list[CostUpload]:
    """Validate uploaded rows, their days in zone `tz` (name(i, field) says where a
    problem is), into one CostUpload per key: rows with the same key add up."""
    merged: dict[tuple[int, str, str], CostUpload] = {}
    whole_days: dict[tuple[int, str], bool] = {}  # (day, campaign) -> uploaded whole (no sub1)
    for i, item in enumerate(items):
        if i >= MAX_COST_ROWS:
            raise FieldError("rows", f"at most {MAX_COST_ROWS} rows in one upload")
        if not isinstance(item, Mapping):
            raise FieldError(name(i, ""), "must be an object with day, campaign, cost (sub1, currency optional)")
        for key in item:
            if key not in COST_FIELDS:
                raise FieldError(name(i, str(key)), f"unknown field; known: {', '.join(COST_FIELDS)}")
        text = {field: field_text(name(i, field), item.get(field)) for field in COST_FIELDS}
        for field in ("day", "campaign", "cost"):
            if text[field] is None:
                raise FieldError(name(i, field), "is required")
        day = parse_day(text["day"], name(i, "day"))
        if not 10957 <= day <= last_day:  # 2000-01-01 to tomorrow
            raise FieldError(name(i, "day"), f"must be from 2000-01-01 to {day_text(last_day)}, got {text['day']}")
        if not day_seconds(day, tz):
            raise FieldError(name(i, "day"), f"{text['day']} did not happen in {tz} (the zone skipped it)")
        campaign = campaigns.get(text["campaign"])
        if campaign is None:
            raise FieldError(name(i, "campaign"), f"no campaign {quoted(text['campaign'])} in the config")
        sub1 = text["sub1"] or ""
        if len(sub1) > MAX_VALUE_CHARS or not sub1.isprintable():
            raise FieldError(name(i, "sub1"), f"must be at most {MAX_VALUE_CHARS} printable characters")
        cost = parse_money(text["cost"], name(i, "cost"))
        currency = text["currency"] or campaign.cost_currency
        if not CURRENCY_RE.fullmatch(currency):
            raise FieldError(name(i, "currency"), f"must be a three-letter ISO 4217 code, got {quoted(currency)}")
        currency = currency.upper()
        whole = whole_days.setdefault((day, campaign.name), not sub1)
        if whole != (not sub1):
            raise FieldError(
                name(i, "sub1"),
                f"campaign {campaign.name} on {day_text(day)} has rows with and without sub1: a row without "
                "sub1 is the whole day's cost, so send either that or one row per sub1",
            )
        key = (day, campaign.name, sub1)
        earlier = merged.get(key)
        if earlier is not None and earlier.currency != currency:
            raise FieldError(
                name(i, "currency"), f"{currency}, but an earlier row of the same key said {earlier.currency}"
            )
        if earlier is not None:
            cost += earlier.cost
            if cost > MAX_PAYOUT:
                raise FieldError(name(i, "cost"), f"the rows of one key add up past {format_money(MAX_PAYOUT)}")
        merged[key] = CostUpload(day, campaign.name, sub1, cost, currency)
    return list(merged.values())


def parse_cost_upload(
    body: bytes, media: str, campaigns: Mapping[str, Campaign], tz: str, last_day: int
) -> tuple[int, list[CostUpload]]:
    """PUT /api/costs' body, JSON or CSV, checked whole: how many rows it has, and
    their CostUploads. (Run off the event loop: 100,000 rows take a second.)"""
    if media == "application/json":
        if body.count(b"{") > 3 * MAX_COST_ROWS:  # before orjson builds millions of objects (a
            raise FieldError("rows", f"at most {MAX_COST_ROWS} rows in one upload")  # sub1 may hold braces)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise FieldError("body", "invalid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or len(data) != 1:
            raise FieldError("body", 'must be {"rows": [...]}')
        return len(data["rows"]), cost_rows(data["rows"], campaigns, tz, last_day, json_row_name)
    try:
        lines = parse_cost_csv(body.decode())
    except UnicodeDecodeError:
        raise FieldError("body", "not valid UTF-8") from None
    return len(lines), cost_rows([row for _, row in lines], campaigns, tz, last_day, csv_row_name(lines))


def json_row_name(i: int, field: str) -> str:
    return f"rows[{i}].{field}" if field else f"rows[{i}]"


def csv_row_name(lines: Sequence[tuple[int, Mapping[str, str]]]) -> Callable[[int, str], str]:
    return lambda i, field: f"line {lines[i][0]}, {field}" if field else f"line {lines[i][0]}"


def parse_cost_csv(text: str) -> list[tuple[int, dict[str, str]]]:
    """A spend report as CSV (header day,campaign,sub1,cost,currency; sub1 and currency
    optional) into (line number, row) for cost_rows; FieldError names the line. Any
    line ending will do (universal newlines: a Mac spreadsheet's bare CR too)."""
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=None))
    rows = []
    try:
        header = [cell.strip().lower() for cell in next(reader, [])]
        for column in header:
            if column not in COST_FIELDS:
                raise FieldError(f"line 1, column {quoted(column)}", f"unknown; the header is {','.join(COST_FIELDS)}")
        for column in ("day", "campaign", "cost"):
            if column not in header:
                raise FieldError("line 1", f"the header needs a {column} column")
        for line in reader:
            if not any(cell.strip() for cell in line):
                continue
            if len(line) != len(header):
                raise FieldError(f"line {reader.line_num}", f"has {len(line)} cells, the header {len(header)}")
            if len(rows) == MAX_COST_ROWS:
                raise FieldError("rows", f"at most {MAX_COST_ROWS} rows in one upload")
            rows.append((reader.line_num, dict(zip(header, (cell.strip() for cell in line)))))
    except csv.Error as exc:
        raise FieldError(f"line {reader.line_num}", f"not CSV: {exc}") from None
    return rows


# -- retention rules --


QUARANTINE_ROWS = 10_000  # refused postbacks kept at most (< 3 KB each: values cut at MAX_VALUE_CHARS)
PURGE_BATCH = 1000  # rows per transaction: short enough that clicks queued behind it barely wait
PURGE_PAUSE = 0.005  # seconds between batches, so clicks' own batches go in between
VACUUM_PAGES = 256  # pages handed back to the file system per transaction
DAY_MS = 86_400_000
SLOT_MS = 900_000  # the time totals' quarter hours (slot_clicks ...): a day in any zone is whole slots
UNIQUE_DAYS = 2  # click_uniques keeps the keys of today and the day before (a clock near midnight)


def uuid_floor(ms: int) -> bytes:
    """The smallest UUIDv7 of a millisecond: click ids below it are older."""
    return max(ms, 0).to_bytes(6, "big") + bytes(10)


@dataclasses.dataclass(frozen=True)
class PurgeRule:
    """One retention rule: what it does to which rows, a batch at a time."""

    name: str  # how /metrics and the log call it
    table: str
    action: str
    days: Callable[[RetentionConfig], int]  # 0 turns the rule off; its SQL is Database.PURGE_SQL[name]


PURGE_RULES = (
    PurgeRule("clicks", "clicks", "deleted", lambda r: r.clicks_days),
    PurgeRule("pii", "clicks", "ip cut to /24 or /48, user agent dropped", lambda r: r.pii_days),
    PurgeRule("conversion_ips", "conversions", "click address kept for ip_cluster dropped", lambda r: r.pii_days),
    PurgeRule("uids", "clicks", "uid dropped", lambda r: r.uid_days),
    PurgeRule("touches", "touches", "deleted", lambda r: min([d for d in (r.clicks_days, r.uid_days) if d] or [0])),
    PurgeRule("conversion_uids", "conversions", "user id dropped", lambda r: r.pii_days),
    PurgeRule("conversion_ad_ids", "conversions", "ad click ids dropped", lambda r: r.clicks_days),
    PurgeRule("conversions", "conversions", "deleted, with their history", lambda r: r.conversions_days),
    PurgeRule("orphans", "orphans", "deleted", lambda r: r.orphans_days),
    PurgeRule("quarantine", "quarantine", "refused postbacks deleted", lambda r: r.orphans_days),
    PurgeRule("outbox", "outbox", "finished deliveries deleted, with their attempts", lambda r: r.outbox_days),
    # Not a setting: unique clicks need only the days a new click can fall on.
    PurgeRule("uniques", "click_uniques", "older days' unique-click keys deleted", lambda r: UNIQUE_DAYS),
)


def rule_cutoff(rule: PurgeRule, conf: RetentionConfig, now_ms: int) -> int | bytes:
    cutoff = now_ms - rule.days(conf) * DAY_MS
    return uuid_floor(cutoff) if rule.table == "clicks" else cutoff


# -- where clicks come from: country, device, OS, browser (the geo extra) --


GEO_EXTRA = "pip install 'tinytrack[geo]'"
DEVICES = ("desktop", "mobile", "tablet", "other")
MOBILE_OS = frozenset(
    ("iOS", "Android", "Windows Phone", "BlackBerry OS", "KaiOS", "Firefox OS", "Symbian OS", "Tizen")
)
DESKTOP_OS = frozenset(
    ("Windows", "Mac OS X", "macOS", "Linux", "Ubuntu", "Chrome OS", "Fedora", "Debian", "FreeBSD", "OpenBSD")
)
ENRICH_BATCH = 200  # clicks per look: one read, one write of ~2 ms that clicks queue behind
ENRICH_IDLE_SECONDS = 1.0  # the wait when it has caught up
ENRICH_LAG_MS = 2000  # it looks at clicks at least this old: all committed, in id order
ENRICH_PAUSE_SECONDS = 0.05  # between batches while behind (after an upgrade: ~4,000 clicks a second)


def open_country_database(path: str, key: str) -> Any:
    """A MaxMind-format database, opened with maxminddb (the geo extra); ConfigError if it can't be."""
    try:
        import maxminddb  # noqa: PLC0415 (optional: the geo extra)
    except ImportError:
        raise ConfigError(key, f"reading a country database needs the geo extra: {GEO_EXTRA}") from None
    try:
        return maxminddb.open_database(path)
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise ConfigError(key, f"can't read {quoted(path, 200)} as a MaxMind database: {exc}") from None


def device_of(user_agent: str, os_family: str | None, device: Any) -> str:
    """desktop, mobile, tablet or other, from ua-parser's OS and device families (it names
    devices, not their kinds): tablets first (an iPad, a tablet brand, Android without
    "Mobile"), then phones, then desktop systems; crawlers and the unknown are other."""
    family, brand = (device.family, device.brand or "") if device is not None else ("", "")
    if family == "Spider":
        return "other"
    if family == "iPad" or "Tablet" in brand or "Kindle" in family or "Tablet" in user_agent:
        return "tablet"
    if os_family == "Android":
        return "mobile" if "Mobile" in user_agent else "tablet"
    if os_family in MOBILE_OS or "Mobi" in user_agent:
        return "mobile"
    if os_family in DESKTOP_OS or family == "Mac":
        return "desktop"
    return "other"


class Geo:
    """What a click's address and User-Agent say: (country, device, os, browser), None
    where nothing is known. Country from [geo] database; the rest from ua-parser when
    [geo] user_agents is on and the geo extra is installed (each User-Agent parsed once
    while it stays among the last 8,192 seen)."""

    def __init__(self, conf: GeoConfig) -> None:
        self.conf = conf
        self.countries = open_country_database(conf.database, "geo.database") if conf.database else None
        self.parse: Callable[[str], Any] | None = None
        if conf.user_agents:
            try:
                import ua_parser  # noqa: PLC0415 (optional: the geo extra)
            except ImportError:
                log.info("clicks' device, os and browser need the geo extra (%s): left empty", GEO_EXTRA)
            else:
                self.parse = ua_parser.parse
        self.describe = lru_cache(maxsize=8192)(self._describe)
        self.warm = self.parse is None  # the parser has been used once (Enricher.step)

    def __bool__(self) -> bool:
        return self.countries is not None or self.parse is not None

    def country(self, ip: str | None) -> str | None:
        if self.countries is None or not ip:
            return None
        try:
            found = self.countries.get(ip)
        except ValueError:  # not an address (a truncated one still is)
            return None
        if not isinstance(found, Mapping):
            return None
        for key in ("country", "registered_country"):  # an anycast or satellite range may have only the second
            code = (found.get(key) or {}).get("iso_code") if isinstance(found.get(key), Mapping) else None
            if isinstance(code, str) and len(code) == 2 and code.isalpha():
                return code.upper()
        return None

    def _describe(self, user_agent: str) -> tuple[str | None, str | None, str | None]:
        if self.parse is None:
            return None, None, None
        found = self.parse(user_agent)
        os_family = found.os.family if found.os is not None else None
        browser = found.user_agent.family if found.user_agent is not None else None
        return device_of(user_agent, os_family, found.device), os_family or "Other", browser or "Other"

    def __call__(self, ip: str | None, user_agent: str | None) -> tuple[str | None, ...]:
        described = self.describe(user_agent) if user_agent is not None else (None, None, None)
        return (self.country(ip), *described)


def enrich_batch(db: Database, now_ms: int, *, geo: Geo, limit: int, before_ms: int) -> tuple[int, int]:
    """A writer's job: the next clicks (after the cursor, made before before_ms) looked
    at and their facts stored. On the writer, not the reader: the clicks were just
    written (their pages are in its cache), and a reader's snapshot at the wrong moment
    keeps a checkpoint from emptying the WAL. How many were looked at, and filled."""
    rows = db.unenriched(limit, before_ms, geo.conf)
    updates = []
    for click_id, ip, user_agent in rows:
        try:
            values = geo(ip, user_agent)
        except Exception:  # a parser's bug on one odd User-Agent must not stop the rest
            log.exception("geo: looking up a click failed; it is left empty")
            continue
        if any(values):
            updates.append((*values, click_id))
    if rows:
        db.set_enriched(now_ms, updates=updates, last=rows[-1][0])
    return len(rows), len(updates)


# -- reports --


STATS_GROUPS = (
    "day",
    "hour",  # of the day, 0-23, in the report's zone
    "campaign",
    *SUB_FIELDS,
    "status",
    "offer",
    "lander",
    "channel",
    "country",
    "device",
    "os",
    "browser",
)
MAX_GROUP_FIELDS = 3
FILTER_FIELDS = (*SUB_FIELDS, "offer", "lander", "country", "device", "os", "browser")  # ?sub1=a&country=DE
ENRICHED_FIELDS = ("country", "device", "os", "browser")  # the clicks' (Enricher): raw rows only
# What each kind of totals can group by; a report whose fields fit none reads the raw rows (STATS_SOURCES).
DAILY_FIELDS = frozenset(("day", "campaign", "sub1", "status", "channel"))  # per UTC day: daily_*
FUNNEL_FIELDS = frozenset(("day", "campaign", "lander", "offer", "status", "channel"))  # per UTC day: daily_funnel*
SLOT_FIELDS = frozenset(("day", "hour", "campaign", "status", "channel"))  # per quarter hour: slot_*, any zone
STATS_SOURCES = {  # a report's answer says which it read
    "daily": "daily totals (kept for good)",
    "funnel": "daily lander and offer totals (kept for good)",
    "slots": "quarter-hour totals (kept for good)",
    "raw": "raw rows (clicks as long as clicks_days keeps them)",
}
COUNT_COLUMNS = (
    "clicks",
    "unique_clicks",
    "bot_clicks",
    "conversions",
    "approved",
    "pending",
    "rejected",
    "lp_clicks",
    "flagged_clicks",  # human clicks with flags
    "flagged_conversions",  # conversions with fraud flags, in any status
    "pixel_only",  # conversions only the browser pixel reported (no postback yet), in any status
)
MONEY_COLUMNS = ("payout", "cost", "profit", "roi")  # each {currency: amount}, as are epc and cpa
STATS_COLUMNS = (*COUNT_COLUMNS, *MONEY_COLUMNS, "cr", "epc", "cpa", "lp_ctr")
STATS_DEFAULT_DAYS = 30
STATS_MAX_DAYS = 3660
LAST_DAY = 2932531  # 9998-12-31
HOUR_MS = 3_600_000
RAW_REPORT_READ = 0.05  # seconds a raw report reads (a day at a time) before it pauses...
RAW_REPORT_PAUSE = 0.06  # ...this long: time for the writer to checkpoint (due 50 ms after the last)


@dataclasses.dataclass(frozen=True)
class StatsQuery:
    first_day: int  # days since 1970 in zone tz, inclusive
    last_day: int
    by: tuple[str, ...] | str = ("campaign",)  # up to MAX_GROUP_FIELDS of STATS_GROUPS ("day,sub1" is split)
    campaign: str | None = None
    bots: bool = False
    money: MoneyConfig = MoneyConfig()  # rates to report in one currency; none: each apart
    channels: Mapping[str, str] = dataclasses.field(default_factory=dict)  # campaign -> channel, for by=channel
    tz: str = "UTC"
    filters: tuple[tuple[str, str], ...] = ()  # (field, value): only rows with that value (FILTER_FIELDS)
    slots_since: int | None = None  # unix ms from which the quarter-hour totals are whole (None: unknown)

    def __post_init__(self) -> None:
        if isinstance(self.by, str):
            object.__setattr__(self, "by", tuple(self.by.split(",")))

    def channel_of(self, campaign: str) -> str:
        """A campaign's channel as configured now; "paid" (the default) for one no longer
        configured; organic and (none) for the uncredited."""
        found = self.channels.get(campaign)
        return found or ("organic" if campaign == ORGANIC else NOBODY if campaign == NOBODY else "paid")

    @property
    def span_ms(self) -> tuple[int, int]:
        """The range as unix ms, [start, end): from the first day's midnight in tz to the one after the last."""
        return local_midnight(self.first_day, self.tz), local_midnight(self.last_day + 1, self.tz)

    @property
    def source(self) -> str:
        """Which rows answer it (a key of STATS_SOURCES): totals where its fields and
        zone fit them, else the raw rows."""
        filtered = {name for name, _ in self.filters}
        fields = set(self.by) | filtered
        utc = self.tz == "UTC"
        if utc and fields <= DAILY_FIELDS:  # a sub1 filter too
            if fields <= SLOT_FIELDS and not filtered and self.slots_since is not None:
                if self.span_ms[0] >= self.slots_since:  # the same numbers from far fewer rows
                    return "slots"  # (96 a campaign-day, not one per sub1)
            return "daily"
        if filtered:  # the funnel and quarter-hour totals have no sub ids, countries...
            return "raw"
        if utc and fields <= FUNNEL_FIELDS:
            return "funnel"
        start, end = self.span_ms
        if fields <= SLOT_FIELDS and start % SLOT_MS == 0 and end % SLOT_MS == 0:
            return "slots"
        return (
            "raw"  # sub2..sub5, the clicks' country and device, lander or offer with sub1, a zone off the quarter hour
        )


def local_midnight(day: int, tz: str) -> int:
    """Unix ms of the start of `day` (days since 1970) in zone tz: its first instant."""
    if tz == "UTC":
        return day * DAY_MS
    date = dt.date(1970, 1, 1) + dt.timedelta(days=day)
    # A midnight in a gap (clocks put forward at 00:00) is read with the offset before
    # it: the instant of the change, which is then when the day starts. A day the zone
    # skipped whole (Samoa's 2011-12-30) starts and ends at that instant: no hours.
    return int(dt.datetime.combine(date, dt.time(), zone(tz)).timestamp() * 1000)


def zone_offsets(tz: str, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
    """The zone's UTC offsets over [start_ms, end_ms): (from unix ms, offset ms), the
    first from start_ms; each change found to the millisecond (offsets are sampled
    every six hours, and a change bisected between two samples)."""
    if tz == "UTC":
        return [(start_ms, 0)]
    local = zone(tz)

    def offset(ms: int) -> int:
        return int(dt.datetime.fromtimestamp(ms / 1000, local).utcoffset().total_seconds() * 1000)

    out = [(start_ms, offset(start_ms))]
    t = start_ms
    while t < end_ms:
        nxt = min(t + 6 * HOUR_MS, end_ms)
        if offset(nxt) != out[-1][1] and nxt < end_ms:
            low, high = t, nxt  # offset(low) is the current one, offset(high) the next
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if offset(mid) == out[-1][1] else (low, mid)
            out.append((high, offset(high)))
        t = nxt
    return out


def offset_sql(ms: str, offsets: Sequence[tuple[int, int]]) -> str:
    """SQL for the zone's offset at unix ms `ms` (an expression): integers made here, never input."""
    if len(offsets) == 1:
        return str(offsets[0][1])
    cases = " ".join(f"WHEN {ms} < {at} THEN {off}" for (_, off), (at, _) in zip(offsets, offsets[1:]))
    return f"(CASE {cases} ELSE {offsets[-1][1]} END)"


def time_fields_sql(ms: str, offsets: Sequence[tuple[int, int]]) -> dict[str, str]:
    """SQL for a time's day and hour in the zone of `offsets`, from unix ms `ms`."""
    local = f"({ms} + {offset_sql(ms, offsets)})"
    return {"day": f"{local} / {DAY_MS}", "hour": f"{local} % {DAY_MS} / {HOUR_MS}"}


def parse_group(text: str) -> tuple[str, ...]:
    """?by= as fields: up to MAX_GROUP_FIELDS of STATS_GROUPS, comma-separated, each once."""
    fields = tuple(name.strip() for name in text.split(","))
    for name in fields:
        if name not in STATS_GROUPS:
            raise FieldError("by", f"must be up to {MAX_GROUP_FIELDS} of {', '.join(STATS_GROUPS)}, got {quoted(name)}")
    if len(fields) > MAX_GROUP_FIELDS:
        raise FieldError("by", f"at most {MAX_GROUP_FIELDS} fields, got {len(fields)}")
    if len(set(fields)) != len(fields):
        raise FieldError("by", f"names a field twice: {quoted(text)}")
    return fields


def campaign_channels(config: Config) -> dict[str, str]:
    return {name: campaign.channel for name, campaign in config.campaigns.items()}


def local_today(now: float, tz: str) -> int:
    """Today in zone tz, as days since 1970."""
    if tz == "UTC":
        return int(now // 86400)
    return (dt.datetime.fromtimestamp(now, zone(tz)).date() - dt.date(1970, 1, 1)).days


def stats_query(
    params: Mapping[str, str | None],
    now: float,
    money: MoneyConfig = MoneyConfig(),
    channels: Mapping[str, str] | None = None,
) -> StatsQuery:
    """A StatsQuery from ?from=&to=&tz=&by=&campaign=&bots=&convert= (or the CLI's flags); FieldError names what is wrong."""
    tz = zone_param(params.get("tz"))
    today = local_today(now, tz)
    last = parse_day(params["to"], "to") if params.get("to") else today
    first = parse_day(params["from"], "from") if params.get("from") else last - STATS_DEFAULT_DAYS + 1
    if first > last:
        raise FieldError("from", f"must not be after to ({day_text(last)}), got {day_text(first)}")
    if last - first >= STATS_MAX_DAYS:
        raise FieldError("from", f"the range is at most {STATS_MAX_DAYS} days")
    if first < 0 or last > LAST_DAY:  # a zone's midnight after the last day must still be a time
        raise FieldError("from" if first < 0 else "to", "must be from 1970-01-01 to 9998-12-31")
    by = parse_group(params.get("by") or "campaign")
    bots = params.get("bots") or "0"
    if bots not in ("0", "1"):
        raise FieldError("bots", f"must be 0 or 1, got {quoted(bots)}")
    convert = params.get("convert") or "1"
    if convert not in ("0", "1"):
        raise FieldError("convert", f"must be 0 or 1, got {quoted(convert)}")
    filters = []
    for name in FILTER_FIELDS:
        value = params.get(name)
        if value is not None:
            if len(value) > MAX_VALUE_CHARS or not value.isprintable():
                raise FieldError(name, f"must be at most {MAX_VALUE_CHARS} printable characters")
            filters.append((name, value))
    return StatsQuery(
        first,
        last,
        by,
        params.get("campaign") or None,
        bots == "1",
        money if convert == "1" else MoneyConfig(),
        channels or {},
        tz,
        tuple(filters),
    )


def stats_rows(
    q: StatsQuery, clicks: Iterable[tuple], conversions: Iterable[tuple], costs: Iterable[tuple] = ()
) -> list[dict]:
    """Rows of a report from its reads (Database.stats), each read's rows led by a key,
    the values of q.by in order (status '' where the read has none): clicks (key, humans,
    bots, unique, LP clicks, human clicks sent to a lander, LP clicks of those, flagged),
    conversions (key, status, currency, count, whole, micros, flagged, pixel only) and
    costs (key, currency, whole, micros). Money stays integer micro-units until it is printed."""
    by = q.by
    width = len(by)
    groups: dict[tuple, dict] = {}

    def group(key: tuple) -> dict:
        row = groups.get(key)
        if row is None:
            row = groups[key] = {
                "clicks": 0,
                "unique_clicks": 0,
                "bot_clicks": 0,
                "approved": 0,
                "pending": 0,
                "rejected": 0,
                "lp_clicks": 0,
                "landed": 0,
                "landed_lp": 0,
                "flagged_clicks": 0,
                "flagged_conversions": 0,
                "pixel_only": 0,
                "payout": Counter(),
                "cost": Counter(),
            }
        return row

    channel = by.index("channel") if "channel" in by else None
    status = by.index("status") if "status" in by else None

    def key_of(row: Sequence) -> tuple:
        key = tuple(row[:width])
        if channel is not None:  # each campaign's rows under its channel
            key = (*key[:channel], q.channel_of(key[channel]), *key[channel + 1 :])
        return key

    click_columns = ("clicks", "bot_clicks", "unique_clicks", "lp_clicks", "landed", "landed_lp", "flagged_clicks")
    for read in clicks:
        row = group(key_of(read))
        for name, n in zip(click_columns, read[width:]):
            row[name] += n
    for read in conversions:
        st, currency, count, whole, micros, flagged, pixel = read[width:]
        row = group(key_of(read))
        row[st] += count
        row["flagged_conversions"] += flagged
        row["pixel_only"] += pixel
        if st == "approved" or status is not None:
            row["payout"][currency] += money_units(whole, micros)
    for read in costs:
        currency, whole, micros = read[width:]
        group(key_of(read))["cost"][currency] += money_units(whole, micros)
    if status is not None:
        # Clicks and costs have no status: each status row is set against all the clicks
        # (and costs) of the rest of its key; what had no conversion has no row.
        apart = {key: groups.pop(key) for key in [key for key in groups if key[status] == ""]}
        for key, row in groups.items():
            shared = apart.get((*key[:status], "", *key[status + 1 :]))
            if shared is not None:
                for name in click_columns:
                    row[name] = shared[name]
                row["cost"] = shared["cost"].copy()
    day = by.index("day") if "day" in by else None
    rows = []
    for key in sorted(groups):
        row = groups[key]
        named = dict(zip(by, key))
        if day is not None:
            named["day"] = day_text(key[day])
        row["clicks"] += row["bot_clicks"] if q.bots else 0
        row["conversions"] = row["approved"] + row["pending"]
        payout, cost = convert_money(row["payout"], q.money), convert_money(row["cost"], q.money)
        figures = money_figures(payout, cost, row)
        figures["lp_ctr"] = ratio(row["landed_lp"] * 100, row["landed"], 2)  # LP clicks per 100 lander visits
        rows.append({**named, **{c: row[c] for c in COUNT_COLUMNS}, **figures})
    return rows


def money_figures(payout: Counter[str], cost: Counter[str], row: Mapping[str, int]) -> dict[str, Any]:
    """A report row's money, per currency: payout, cost, profit (payout - cost), roi
    (profit / cost x 100), cr, epc and cpa (cost / conversions)."""
    clicks, conversions = row["clicks"], row["conversions"]
    currencies = sorted(payout.keys() | cost.keys())
    profit = {cur: payout[cur] - cost[cur] for cur in currencies}
    return {
        "payout": {cur: format_money(units) for cur, units in sorted(payout.items())},
        "cost": {cur: format_money(units) for cur, units in sorted(cost.items())},
        "profit": {cur: format_money(units) for cur, units in profit.items()},
        "roi": {cur: ratio(profit[cur] * 100, cost[cur], 2) for cur in currencies},
        "cr": ratio(conversions * 100, clicks, 2),
        "epc": {cur: ratio(units, clicks * 1_000_000, 4) for cur, units in sorted(payout.items())} if clicks else {},
        "cpa": {cur: ratio(units, conversions * 1_000_000, 4) for cur, units in sorted(cost.items())},
    }


EXACT = decimal.Context(prec=80)  # wide enough for any sum times any rate: rounded once, at the end


def convert_money(amounts: Counter[str], money: MoneyConfig) -> Counter[str]:
    """Amounts in report_currency where a rate says how (each currency's sum converted,
    rounded half-even to the micro-unit); a currency without a rate stays apart."""
    report = money.report_currency
    if report is None or not amounts.keys() - {report}:
        return amounts
    out: Counter[str] = Counter()
    for cur, units in amounts.items():
        rate = Decimal(1) if cur == report else money.rates.get(cur)
        if rate is None:
            out[cur] += units
        else:
            out[report] += int(EXACT.multiply(units, rate).to_integral_value(ROUND_HALF_EVEN))
    return out


def report_kept(retention: RetentionConfig, now: float, slots_since: int | None) -> dict[str, int | None]:
    """Since when a report's sources are whole, unix ms: the raw clicks (clicks_days
    purges older ones) and the quarter-hour totals (made by schema 11)."""
    clicks = int(now * 1000) - retention.clicks_days * DAY_MS if retention.clicks_days else None
    return {"clicks_since": clicks, "slots_since": slots_since}


def report_facts(q: StatsQuery, kept: Mapping[str, int | None]) -> dict[str, Any]:
    """What a report covers and read (from, to, tz, by, source) and, when its first days
    are partial, from when it is whole (complete_from). `kept`: since when the raw
    clicks (clicks_since) and the quarter-hour totals (slots_since) are, unix ms."""
    facts: dict[str, Any] = {
        "from": day_text(q.first_day),
        "to": day_text(q.last_day),
        "tz": q.tz,
        "by": list(q.by),
        "source": q.source,
    }
    since = kept.get("clicks_since" if q.source == "raw" else "slots_since" if q.source == "slots" else "")
    if since is not None and since > q.span_ms[0]:
        facts["complete_from"] = iso_ms(since)
    return facts


def stats_answer(q: StatsQuery, rows: list[dict], kept: Mapping[str, int | None] = {}) -> dict[str, Any]:  # noqa: B006
    """/api/stats' (and `stats --json`'s) answer: report_facts, the rows, and with
    report_currency the rates used and any currency that had none (kept apart, never dropped)."""
    answer = report_facts(q, kept)
    answer["rows"] = rows
    report = q.money.report_currency
    if report is not None:
        seen = {cur for row in rows for column in ("payout", "cost") for cur in row[column]}
        answer["currency"] = report
        answer["rates"] = {cur: str(rate) for cur, rate in sorted(q.money.rates.items())}
        answer["unconverted"] = sorted(seen - {report})
    return answer


def ratio(numerator: int, denominator: int, places: int) -> str | None:
    """numerator / denominator as an exact decimal string, rounded half-even."""
    if not denominator:
        return None
    value = (Decimal(numerator) / Decimal(denominator)).quantize(Decimal(1).scaleb(-places), ROUND_HALF_EVEN)
    return str(value if value else abs(value))  # a loss too small to show is 0.00, not -0.00


def stats_table(q: StatsQuery, rows: list[dict]) -> tuple[list[str], list[list[object]]]:
    """Header and cells for CSV: the counts, then a column per money figure and currency."""
    currencies = sorted({cur for row in rows for column in ("payout", "cost") for cur in row[column]})
    money = [f"{column}_{cur}" for column in MONEY_COLUMNS for cur in currencies]
    header = [
        *q.by,
        *COUNT_COLUMNS,
        *money,
        "cr",
        *(f"epc_{c}" for c in currencies),
        *(f"cpa_{c}" for c in currencies),
        "lp_ctr",
    ]
    cells = []
    for row in rows:
        figures = [
            row[column].get(cur, None if column == "roi" else "0.00") for column in MONEY_COLUMNS for cur in currencies
        ]
        epc = [row["epc"].get(cur, "0.0000" if row["clicks"] else None) for cur in currencies]
        cpa = [row["cpa"].get(cur) if row["conversions"] else None for cur in currencies]
        cells.append(
            [*(row[f] for f in q.by), *(row[c] for c in COUNT_COLUMNS), *figures, row["cr"], *epc, *cpa, row["lp_ctr"]]
        )
    return header, cells


FORMULA_RE = re.compile(r"(?:^|[,;\t|\r\n])\s*[=+\-@\t\r]")


def csv_cell(value: object) -> object:
    """A spreadsheet reads a cell starting with = + - @ as a formula, and one set to
    split on ; (or tab, or |) finds a cell start after each of them; sub ids come from
    the internet, so such text is prefixed with ' (OWASP: CSV injection). Every text
    cell is also quoted (csv_text), so no separator inside one starts a new cell."""
    if isinstance(value, str) and FORMULA_RE.search(value):
        return "'" + value
    return value


def csv_text(header: Iterable[str], lines: Iterable[Iterable[object]]) -> str:
    """A header row and rows as CSV, every text cell quoted and defused (csv_cell)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow(header)
    writer.writerows([csv_cell(cell) for cell in line] for line in lines)
    return out.getvalue()


def listing_params(params: Mapping[str, str]) -> tuple[int, int, int, str]:
    """``since``, the ``after`` cursor, ``limit`` and ``format`` of a listing."""
    since = parse_since(params["since"]) if params.get("since") else 0
    after, limit = params.get("after", "0"), params.get("limit", "100")
    if not DIGITS_RE.fullmatch(after):
        raise FieldError("after", f"must be the cursor from a previous page, got {quoted(after)}")
    if not DIGITS_RE.fullmatch(limit) or not 1 <= int(limit) <= 1000:
        raise FieldError("limit", f"must be 1-1000, got {quoted(limit)}")
    fmt = params.get("format", "json")
    if fmt not in ("json", "csv"):
        raise FieldError("format", f"must be json or csv, got {quoted(fmt)}")
    return since, int(after), int(limit), fmt


class Histogram:
    """A Prometheus histogram: counts per upper bound, their sum and count."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str = "") -> Iterator[str]:
        cumulative = 0
        sep = "," if labels else ""
        for bound, count in zip((*self.bounds, "+Inf"), self.counts):
            cumulative += count
            yield f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}'
        braces = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{braces} {self.sum:.6f}"
        yield f"{name}_count{braces} {cumulative}"


LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


# --- Storage: the schema --------------------------------------------------------------

SCHEMA = [
    # version 1
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    -- id is a UUIDv7: time-ordered, so inserts append and purges are range deletes.
    CREATE TABLE clicks (
        id BLOB PRIMARY KEY,
        ts INTEGER NOT NULL,               -- unix ms
        campaign TEXT NOT NULL,
        sub1 TEXT, sub2 TEXT, sub3 TEXT, sub4 TEXT, sub5 TEXT,
        ext_id TEXT,
        ip TEXT,
        ua TEXT,
        bot INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    -- A conversion copies its click's campaign and subs so it outlives the click.
    CREATE TABLE conversions (
        id INTEGER PRIMARY KEY,
        click_id BLOB NOT NULL,
        dedupe_key TEXT NOT NULL,          -- 't:<txid>' or 'e:<event>'
        click_ts INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        sub1 TEXT, sub2 TEXT, sub3 TEXT, sub4 TEXT, sub5 TEXT,
        ext_id TEXT,
        event TEXT NOT NULL,
        txid TEXT,
        status TEXT NOT NULL,
        reason TEXT,                       -- why a valid postback was not counted
        payout INTEGER NOT NULL,           -- micro-units of currency
        currency TEXT NOT NULL,
        ts INTEGER NOT NULL,               -- when it converted, unix ms
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        ip TEXT,
        UNIQUE (click_id, dedupe_key)
    );
    CREATE INDEX conversions_created_at ON conversions (created_at);
    CREATE TABLE conversion_history (
        conversion_id INTEGER NOT NULL REFERENCES conversions (id) ON DELETE CASCADE,
        at INTEGER NOT NULL,
        status TEXT NOT NULL,
        payout INTEGER NOT NULL,
        currency TEXT NOT NULL,
        ip TEXT
    );
    CREATE INDEX conversion_history_conversion ON conversion_history (conversion_id);
    -- Every status a conversion takes is kept, written by SQLite itself.
    CREATE TRIGGER conversions_history_insert AFTER INSERT ON conversions BEGIN
        INSERT INTO conversion_history (conversion_id, at, status, payout, currency, ip)
        VALUES (NEW.id, NEW.updated_at, NEW.status, NEW.payout, NEW.currency, NEW.ip);
    END;
    CREATE TRIGGER conversions_history_update AFTER UPDATE OF status ON conversions BEGIN
        INSERT INTO conversion_history (conversion_id, at, status, payout, currency, ip)
        VALUES (NEW.id, NEW.updated_at, NEW.status, NEW.payout, NEW.currency, NEW.ip);
    END;
    -- Postbacks for click ids we never issued (or already purged), kept to reconcile.
    CREATE TABLE orphans (
        id INTEGER PRIMARY KEY,
        click_id TEXT NOT NULL,
        dedupe_key TEXT NOT NULL,
        event TEXT NOT NULL,
        txid TEXT,
        status TEXT NOT NULL,
        payout INTEGER NOT NULL,
        currency TEXT NOT NULL,
        ts INTEGER NOT NULL,
        ip TEXT,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        hits INTEGER NOT NULL DEFAULT 1,
        UNIQUE (click_id, dedupe_key)
    );
    """,
    # version 2: forwarding, daily totals, retention
    """
    -- A conversion's forward to its traffic source, written in the conversion's own
    -- transaction. The URL is filled in then, so the row needs nothing else to send.
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        conversion_id INTEGER NOT NULL,    -- no foreign key: a delivery outlives a purge
        campaign TEXT NOT NULL,
        status TEXT NOT NULL,              -- the conversion status it tells the source
        url TEXT NOT NULL,
        idempotency_key TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,               -- pending, done, failed (final), dead (gave up), canceled
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        next_at INTEGER NOT NULL,          -- when a pending delivery is due
        last_at INTEGER,
        last_code INTEGER,
        last_error TEXT,
        deadline INTEGER NOT NULL          -- after this a failing delivery is dead
    );
    CREATE INDEX outbox_due ON outbox (next_at) WHERE state = 'pending';
    CREATE INDEX outbox_conversion ON outbox (conversion_id);
    CREATE INDEX outbox_state ON outbox (state, id);
    CREATE TABLE outbox_attempts (
        outbox_id INTEGER NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
        at INTEGER NOT NULL,
        code INTEGER,                      -- the HTTP status, if one came back
        error TEXT,
        ms INTEGER NOT NULL
    );
    CREATE INDEX outbox_attempts_outbox ON outbox_attempts (outbox_id);
    -- Totals per UTC day (days since 1970), campaign and sub1, kept current as rows
    -- are written, so reports never scan raw rows and outlive their purge.
    CREATE TABLE daily_clicks (
        day INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        sub1 TEXT NOT NULL,                -- '' when the click had none
        clicks INTEGER NOT NULL,           -- humans
        bot_clicks INTEGER NOT NULL,
        PRIMARY KEY (day, campaign, sub1)
    ) WITHOUT ROWID;
    -- Conversions by the day they converted, in their current status.
    CREATE TABLE daily_conversions (
        day INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        sub1 TEXT NOT NULL,
        status TEXT NOT NULL,
        currency TEXT NOT NULL,
        conversions INTEGER NOT NULL,
        payout INTEGER NOT NULL,           -- micro-units
        PRIMARY KEY (day, campaign, sub1, status, currency)
    ) WITHOUT ROWID;
    INSERT INTO daily_clicks
        SELECT ts / 86400000, campaign, coalesce(sub1, ''), sum(bot = 0), sum(bot) FROM clicks GROUP BY 1, 2, 3;
    INSERT INTO daily_conversions
        SELECT ts / 86400000, campaign, coalesce(sub1, ''), status, currency, count(*), sum(payout)
        FROM conversions GROUP BY 1, 2, 3, 4, 5;
    CREATE TRIGGER conversions_daily_insert AFTER INSERT ON conversions BEGIN
        INSERT INTO daily_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.sub1, ''),
            NEW.status, NEW.currency, 1, NEW.payout)
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout;
    END;
    CREATE TRIGGER conversions_daily_update AFTER UPDATE OF status, payout, currency ON conversions BEGIN
        UPDATE daily_conversions SET conversions = conversions - 1, payout = payout - OLD.payout
        WHERE day = OLD.ts / 86400000 AND campaign = OLD.campaign AND sub1 = coalesce(OLD.sub1, '')
            AND status = OLD.status AND currency = OLD.currency;
        INSERT INTO daily_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.sub1, ''),
            NEW.status, NEW.currency, 1, NEW.payout)
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout;
    END;
    CREATE INDEX orphans_last_seen ON orphans (last_seen);
    """,
    # version 3: at most retention.sub1_per_day sub1 per campaign and day in the totals
    """
    -- 1 when the click's sub1 came after its campaign-day's cap, so the totals count it
    -- (and its conversions) under '(other)'. Decided once, as the click is stored.
    ALTER TABLE clicks ADD COLUMN sub1_other INTEGER;
    -- The sub1 a conversion is totalled under when it is not its own: '(other)'.
    ALTER TABLE conversions ADD COLUMN sub1_total TEXT;
    DROP TRIGGER conversions_daily_insert;
    DROP TRIGGER conversions_daily_update;
    CREATE TRIGGER conversions_daily_insert AFTER INSERT ON conversions BEGIN
        INSERT INTO daily_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.sub1_total, NEW.sub1, ''),
            NEW.status, NEW.currency, 1, NEW.payout)
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout;
    END;
    CREATE TRIGGER conversions_daily_update AFTER UPDATE OF status, payout, currency ON conversions BEGIN
        UPDATE daily_conversions SET conversions = conversions - 1, payout = payout - OLD.payout
        WHERE day = OLD.ts / 86400000 AND campaign = OLD.campaign AND sub1 = coalesce(OLD.sub1_total, OLD.sub1, '')
            AND status = OLD.status AND currency = OLD.currency;
        INSERT INTO daily_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.sub1_total, NEW.sub1, ''),
            NEW.status, NEW.currency, 1, NEW.payout)
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout;
    END;
    """,
    # version 4: money (costs, uploaded spend, unique clicks)
    """
    -- What the click cost, in micro-units of cost_currency (its own cost, else the model's).
    ALTER TABLE clicks ADD COLUMN cost INTEGER;
    ALTER TABLE clicks ADD COLUMN cost_currency TEXT;
    -- What {cost} tells a source: with cost_model ('cpa' or 'revshare', as it was when
    -- stored) the conversion's own cost, in the totals while approved; without, its click's
    -- cost (already counted with the click).
    ALTER TABLE conversions ADD COLUMN cost INTEGER;
    ALTER TABLE conversions ADD COLUMN cost_currency TEXT;
    ALTER TABLE conversions ADD COLUMN cost_model TEXT;
    -- Human clicks whose (campaign, UTC day, IP, User-Agent) was new that day.
    ALTER TABLE daily_clicks ADD COLUMN unique_clicks INTEGER NOT NULL DEFAULT 0;
    -- Costs per UTC day, campaign and sub1, by where they came from: 'clicks' and
    -- 'conversions' as they are written, 'upload' from cost_uploads. A day-campaign-sub1
    -- with an 'upload' row reports that, and nothing else, as its cost; a day-campaign
    -- with a 'day' row (sub1 '', cost 0: a whole-day upload) reports only its uploads.
    CREATE TABLE daily_costs (
        day INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        sub1 TEXT NOT NULL,
        source TEXT NOT NULL,
        currency TEXT NOT NULL,
        cost INTEGER NOT NULL,             -- micro-units
        PRIMARY KEY (day, campaign, sub1, source, currency)
    ) WITHOUT ROWID;
    -- A source's spend report as it was uploaded: one row per (its day, campaign, sub1);
    -- sub1 '' is the whole campaign-day. Its days are in its own zone (tz).
    -- The days and campaigns with uploads, so reports find them without reading the rest.
    CREATE INDEX daily_costs_uploaded ON daily_costs (source, day, campaign) WHERE source IN ('upload', 'day');
    CREATE TABLE cost_uploads (
        day INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        sub1 TEXT NOT NULL,
        tz TEXT NOT NULL,
        currency TEXT NOT NULL,
        cost INTEGER NOT NULL,
        uploaded_at INTEGER NOT NULL,
        PRIMARY KEY (campaign, day, sub1)
    ) WITHOUT ROWID;
    -- A day's (campaign, IP, User-Agent) keys, hashed, past the UNIQUE_MEMORY_KEYS the
    -- writer keeps in memory: a click is unique when its key goes in. Purged after 2 days.
    CREATE TABLE click_uniques (day INTEGER NOT NULL, key BLOB NOT NULL, PRIMARY KEY (day, key)) WITHOUT ROWID;
    CREATE TRIGGER conversions_cost_insert AFTER INSERT ON conversions
    WHEN NEW.cost_model IS NOT NULL AND NEW.status = 'approved' BEGIN
        INSERT INTO daily_costs VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.sub1_total, NEW.sub1, ''),
            'conversions', NEW.cost_currency, NEW.cost)
        ON CONFLICT DO UPDATE SET cost = cost + excluded.cost;
    END;
    CREATE TRIGGER conversions_cost_update AFTER UPDATE OF status, cost, cost_currency ON conversions
    WHEN (OLD.cost_model IS NOT NULL AND OLD.status = 'approved') OR (NEW.cost_model IS NOT NULL AND NEW.status = 'approved')
    BEGIN
        UPDATE daily_costs SET cost = cost - OLD.cost
        WHERE OLD.cost_model IS NOT NULL AND OLD.status = 'approved' AND day = OLD.ts / 86400000 AND campaign = OLD.campaign
            AND sub1 = coalesce(OLD.sub1_total, OLD.sub1, '') AND source = 'conversions' AND currency = OLD.cost_currency;
        INSERT INTO daily_costs SELECT NEW.ts / 86400000, NEW.campaign, coalesce(NEW.sub1_total, NEW.sub1, ''),
            'conversions', NEW.cost_currency, NEW.cost WHERE NEW.cost_model IS NOT NULL AND NEW.status = 'approved'
        ON CONFLICT DO UPDATE SET cost = cost + excluded.cost;
    END;
    -- Unique clicks of the days whose clicks are still kept whole: purged days, and days
    -- whose addresses were cut (pii_days, which drops the User-Agent), stay at 0.
    WITH firsts AS (
        SELECT min(id) AS id FROM clicks WHERE bot = 0
            AND ts / 86400000 NOT IN (SELECT DISTINCT ts / 86400000 FROM clicks WHERE ua IS NULL)
        GROUP BY ts / 86400000, campaign, ip, ua),
    counts AS (
        SELECT ts / 86400000 AS day, campaign, CASE WHEN sub1_other THEN '(other)' ELSE coalesce(sub1, '') END AS sub1,
            count(*) AS n
        FROM clicks WHERE id IN (SELECT id FROM firsts) GROUP BY 1, 2, 3)
    UPDATE daily_clicks SET unique_clicks = counts.n FROM counts
    WHERE daily_clicks.day = counts.day AND daily_clicks.campaign = counts.campaign AND daily_clicks.sub1 = counts.sub1;
    """,
    # version 5: funnels (landers, offers, LP clicks)
    """
    -- The lander and offer a click was given (NULL: none, a plain `url` campaign's click:
    -- the offer "default"); lp_at: its first LP click (/go/), unix ms; flags: why it is
    -- suspect ('no_click_id': made by an LP click that named no click of its campaign).
    ALTER TABLE clicks ADD COLUMN lander TEXT;
    ALTER TABLE clicks ADD COLUMN offer TEXT;
    ALTER TABLE clicks ADD COLUMN lp_at INTEGER;
    ALTER TABLE clicks ADD COLUMN flags TEXT;
    -- A conversion is credited to its click's lander and offer (as they were when it came).
    ALTER TABLE conversions ADD COLUMN lander TEXT;
    ALTER TABLE conversions ADD COLUMN offer TEXT;
    -- By the click's day: human clicks with an LP click (once per click), human clicks
    -- sent to a lander, and of those the ones with an LP click (lp_ctr's two sides; an
    -- LP click of no lander's click, a no_click_id one say, is only in lp_clicks).
    ALTER TABLE daily_clicks ADD COLUMN lp_clicks INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily_clicks ADD COLUMN lander_clicks INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily_clicks ADD COLUMN lander_lp_clicks INTEGER NOT NULL DEFAULT 0;
    -- Totals per lander and offer of the campaigns that have them (lander '': none).
    -- Clicks without names (a plain `url`) are what daily_clicks has beyond these:
    -- reports show them as offer "default".
    CREATE TABLE daily_funnel (
        day INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        lander TEXT NOT NULL,
        offer TEXT NOT NULL,
        clicks INTEGER NOT NULL,           -- humans, under the offer the click was given
        bot_clicks INTEGER NOT NULL,
        unique_clicks INTEGER NOT NULL,
        lp_clicks INTEGER NOT NULL,        -- humans, under the offer their conversions are credited to
        PRIMARY KEY (day, campaign, lander, offer)
    ) WITHOUT ROWID;
    -- What approved conversions cost under cpa or revshare, per lander and offer (the
    -- campaign-day's are in daily_costs, source 'conversions').
    CREATE TABLE daily_funnel_costs (
        day INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        lander TEXT NOT NULL,
        offer TEXT NOT NULL,
        currency TEXT NOT NULL,
        cost INTEGER NOT NULL,
        PRIMARY KEY (day, campaign, lander, offer, currency)
    ) WITHOUT ROWID;
    DROP TRIGGER conversions_cost_insert;
    DROP TRIGGER conversions_cost_update;
    CREATE TRIGGER conversions_cost_insert AFTER INSERT ON conversions
    WHEN NEW.cost_model IS NOT NULL AND NEW.status = 'approved' BEGIN
        INSERT INTO daily_costs VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.sub1_total, NEW.sub1, ''),
            'conversions', NEW.cost_currency, NEW.cost)
        ON CONFLICT DO UPDATE SET cost = cost + excluded.cost;
        INSERT INTO daily_funnel_costs SELECT NEW.ts / 86400000, NEW.campaign, coalesce(NEW.lander, ''), NEW.offer,
            NEW.cost_currency, NEW.cost WHERE NEW.offer IS NOT NULL
        ON CONFLICT DO UPDATE SET cost = cost + excluded.cost;
    END;
    CREATE TRIGGER conversions_cost_update AFTER UPDATE OF status, cost, cost_currency ON conversions
    WHEN (OLD.cost_model IS NOT NULL AND OLD.status = 'approved') OR (NEW.cost_model IS NOT NULL AND NEW.status = 'approved')
    BEGIN
        UPDATE daily_costs SET cost = cost - OLD.cost
        WHERE OLD.cost_model IS NOT NULL AND OLD.status = 'approved' AND day = OLD.ts / 86400000 AND campaign = OLD.campaign
            AND sub1 = coalesce(OLD.sub1_total, OLD.sub1, '') AND source = 'conversions' AND currency = OLD.cost_currency;
        INSERT INTO daily_costs SELECT NEW.ts / 86400000, NEW.campaign, coalesce(NEW.sub1_total, NEW.sub1, ''),
            'conversions', NEW.cost_currency, NEW.cost WHERE NEW.cost_model IS NOT NULL AND NEW.status = 'approved'
        ON CONFLICT DO UPDATE SET cost = cost + excluded.cost;
        UPDATE daily_funnel_costs SET cost = cost - OLD.cost
        WHERE OLD.cost_model IS NOT NULL AND OLD.status = 'approved' AND OLD.offer IS NOT NULL
            AND day = OLD.ts / 86400000 AND campaign = OLD.campaign AND lander = coalesce(OLD.lander, '')
            AND offer = OLD.offer AND currency = OLD.cost_currency;
        INSERT INTO daily_funnel_costs SELECT NEW.ts / 86400000, NEW.campaign, coalesce(NEW.lander, ''), NEW.offer,
            NEW.cost_currency, NEW.cost WHERE NEW.cost_model IS NOT NULL AND NEW.status = 'approved' AND NEW.offer IS NOT NULL
        ON CONFLICT DO UPDATE SET cost = cost + excluded.cost;
    END;
    CREATE TABLE daily_funnel_conversions (
        day INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        lander TEXT NOT NULL,
        offer TEXT NOT NULL,
        status TEXT NOT NULL,
        currency TEXT NOT NULL,
        conversions INTEGER NOT NULL,
        payout INTEGER NOT NULL,
        PRIMARY KEY (day, campaign, lander, offer, status, currency)
    ) WITHOUT ROWID;
    CREATE TRIGGER conversions_funnel_insert AFTER INSERT ON conversions WHEN NEW.offer IS NOT NULL BEGIN
        INSERT INTO daily_funnel_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.lander, ''),
            NEW.offer, NEW.status, NEW.currency, 1, NEW.payout)
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout;
    END;
    CREATE TRIGGER conversions_funnel_update AFTER UPDATE OF status, payout, currency ON conversions
    WHEN NEW.offer IS NOT NULL BEGIN
        UPDATE daily_funnel_conversions SET conversions = conversions - 1, payout = payout - OLD.payout
        WHERE day = OLD.ts / 86400000 AND campaign = OLD.campaign AND lander = coalesce(OLD.lander, '')
            AND offer = OLD.offer AND status = OLD.status AND currency = OLD.currency;
        INSERT INTO daily_funnel_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.lander, ''),
            NEW.offer, NEW.status, NEW.currency, 1, NEW.payout)
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout;
    END;
    """,
    # version 6: fraud flags
    """
    -- flags: JSON {flag: evidence}, e.g. {"ip_flood": "31 clicks from this address this minute > 30"}.
    UPDATE clicks SET flags = json_object('no_click_id', 'cid: missing, not a click id, or of no click of this campaign')
    WHERE flags = 'no_click_id';
    -- A conversion's: its click's (bot included) and its own (ctit_fast, ip_cluster).
    ALTER TABLE conversions ADD COLUMN flags TEXT;
    -- Its click's address, kept (until pii_days) only where ip_cluster is on, to count by.
    ALTER TABLE conversions ADD COLUMN click_ip TEXT;
    CREATE INDEX conversions_click_ip ON conversions (click_ip, ts) WHERE click_ip IS NOT NULL;
    -- While held: what the network says it is (its first postback's status, then its later ones').
    ALTER TABLE conversions ADD COLUMN network_status TEXT;
    -- Human clicks with flags; conversions with flags, in the row of their current status.
    ALTER TABLE daily_clicks ADD COLUMN flagged_clicks INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily_conversions ADD COLUMN flagged INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily_funnel ADD COLUMN flagged_clicks INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily_funnel_conversions ADD COLUMN flagged INTEGER NOT NULL DEFAULT 0;
    -- The flagged clicks still kept (no_click_id ones) into the totals that now count them.
    UPDATE daily_clicks SET flagged_clicks = counts.n FROM (
        SELECT ts / 86400000 AS day, campaign, CASE WHEN sub1_other THEN '(other)' ELSE coalesce(sub1, '') END AS sub1,
            count(*) AS n
        FROM clicks WHERE bot = 0 AND flags IS NOT NULL GROUP BY 1, 2, 3) AS counts
    WHERE daily_clicks.day = counts.day AND daily_clicks.campaign = counts.campaign AND daily_clicks.sub1 = counts.sub1;
    UPDATE daily_funnel SET flagged_clicks = counts.n FROM (
        SELECT ts / 86400000 AS day, campaign, coalesce(lander, '') AS lander, offer, count(*) AS n
        FROM clicks WHERE bot = 0 AND flags IS NOT NULL AND offer IS NOT NULL GROUP BY 1, 2, 3, 4) AS counts
    WHERE daily_funnel.day = counts.day AND daily_funnel.campaign = counts.campaign
        AND daily_funnel.lander = counts.lander AND daily_funnel.offer = counts.offer;
    DROP TRIGGER conversions_funnel_insert;
    DROP TRIGGER conversions_funnel_update;
    CREATE TRIGGER conversions_funnel_insert AFTER INSERT ON conversions WHEN NEW.offer IS NOT NULL BEGIN
        INSERT INTO daily_funnel_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.lander, ''),
            NEW.offer, NEW.status, NEW.currency, 1, NEW.payout, NEW.flags IS NOT NULL)
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout,
            flagged = flagged + excluded.flagged;
    END;
    CREATE TRIGGER conversions_funnel_update AFTER UPDATE OF status, payout, currency, flags ON conversions
    WHEN NEW.offer IS NOT NULL BEGIN
        UPDATE daily_funnel_conversions SET conversions = conversions - 1, payout = payout - OLD.payout,
            flagged = flagged - (OLD.flags IS NOT NULL)
        WHERE day = OLD.ts / 86400000 AND campaign = OLD.campaign AND lander = coalesce(OLD.lander, '')
            AND offer = OLD.offer AND status = OLD.status AND currency = OLD.currency;
        INSERT INTO daily_funnel_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.lander, ''),
            NEW.offer, NEW.status, NEW.currency, 1, NEW.payout, NEW.flags IS NOT NULL)
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout,
            flagged = flagged + excluded.flagged;
    END;
    DROP TRIGGER conversions_daily_insert;
    DROP TRIGGER conversions_daily_update;
    CREATE TRIGGER conversions_daily_insert AFTER INSERT ON conversions BEGIN
        INSERT INTO daily_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.sub1_total, NEW.sub1, ''),
            NEW.status, NEW.currency, 1, NEW.payout, NEW.flags IS NOT NULL)
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout,
            flagged = flagged + excluded.flagged;
    END;
    CREATE TRIGGER conversions_daily_update AFTER UPDATE OF status, payout, currency, flags ON conversions BEGIN
        UPDATE daily_conversions SET conversions = conversions - 1, payout = payout - OLD.payout,
            flagged = flagged - (OLD.flags IS NOT NULL)
        WHERE day = OLD.ts / 86400000 AND campaign = OLD.campaign AND sub1 = coalesce(OLD.sub1_total, OLD.sub1, '')
            AND status = OLD.status AND currency = OLD.currency;
        INSERT INTO daily_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.sub1_total, NEW.sub1, ''),
            NEW.status, NEW.currency, 1, NEW.payout, NEW.flags IS NOT NULL)
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout,
            flagged = flagged + excluded.flagged;
    END;
    """,
    # version 7: attribution across channels
    """
    -- The site's own id for the visitor (uid=, a click's query): personal, cut as pii (see uid_days).
    ALTER TABLE clicks ADD COLUMN uid TEXT;
    CREATE INDEX clicks_uid ON clicks (uid, ts) WHERE uid IS NOT NULL;
    CREATE INDEX clicks_uid_id ON clicks (id) WHERE uid IS NOT NULL;  -- the uids purge rule's walk
    -- Touches that never passed through /c/ (POST /touch): one per user, campaign and second.
    CREATE TABLE touches (
        id INTEGER PRIMARY KEY,
        uid TEXT NOT NULL,
        channel TEXT NOT NULL,
        campaign TEXT NOT NULL,
        ts INTEGER NOT NULL,               -- unix ms
        created_at INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX touches_key ON touches (uid, campaign, ts / 1000);
    CREATE INDEX touches_ts ON touches (ts);
    -- A conversion credited by the matrix: the user id (cut after pii_days) and the
    -- decision, JSON {rule, winner, candidates}. Its click_id is then the user's key
    -- (Database.user_key).
    ALTER TABLE conversions ADD COLUMN uid TEXT;
    ALTER TABLE conversions ADD COLUMN attribution TEXT;
    ALTER TABLE conversions ADD COLUMN credited_click BLOB;  -- the click the decision credited, if any
    -- user_key's secret: a user's key can't be computed without this database.
    INSERT INTO meta (key, value) VALUES ('user_key_secret', hex(randomblob(32)));
    CREATE INDEX conversions_uid ON conversions (uid) WHERE uid IS NOT NULL;
    """,
    # version 8: forwards beyond one URL
    """
    -- Where a delivery goes after FALLBACK_AFTER failed tries of its url ([campaigns.x.forward]).
    ALTER TABLE outbox ADD COLUMN fallback_url TEXT;
    -- The URL each try went to (NULL: tries made before version 8, to the delivery's url).
    ALTER TABLE outbox_attempts ADD COLUMN url TEXT;
    -- Ad platforms' click ids (gclid, fbclid, ... and fbc), JSON, kept with the click and
    -- copied to its conversions (forwards' macros, the Google Ads export).
    ALTER TABLE clicks ADD COLUMN ad_ids TEXT;
    ALTER TABLE conversions ADD COLUMN ad_ids TEXT;
    CREATE INDEX conversions_ad_ids ON conversions (created_at) WHERE ad_ids IS NOT NULL;  -- their purge rule
    """,
    # version 9: the browser pixel, and forwards of other kinds
    """
    -- Who reported a conversion: NULL a network's postback; 'pixel' the browser pixel
    -- alone, until a postback confirms it. Each history row says who set that status.
    ALTER TABLE conversions ADD COLUMN source TEXT;
    ALTER TABLE conversion_history ADD COLUMN source TEXT;
    DROP TRIGGER conversions_history_insert;
    DROP TRIGGER conversions_history_update;
    CREATE TRIGGER conversions_history_insert AFTER INSERT ON conversions BEGIN
        INSERT INTO conversion_history (conversion_id, at, status, payout, currency, ip, source)
        VALUES (NEW.id, NEW.updated_at, NEW.status, NEW.payout, NEW.currency, NEW.ip, NEW.source);
    END;
    CREATE TRIGGER conversions_history_update AFTER UPDATE OF status ON conversions BEGIN
        INSERT INTO conversion_history (conversion_id, at, status, payout, currency, ip, source)
        VALUES (NEW.id, NEW.updated_at, NEW.status, NEW.payout, NEW.currency, NEW.ip, NEW.source);
    END;
    -- Conversions only the pixel has reported, in the row of their current status.
    ALTER TABLE daily_conversions ADD COLUMN pixel_only INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily_funnel_conversions ADD COLUMN pixel_only INTEGER NOT NULL DEFAULT 0;
    DROP TRIGGER conversions_daily_insert;
    DROP TRIGGER conversions_daily_update;
    CREATE TRIGGER conversions_daily_insert AFTER INSERT ON conversions BEGIN
        INSERT INTO daily_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.sub1_total, NEW.sub1, ''),
            NEW.status, NEW.currency, 1, NEW.payout, NEW.flags IS NOT NULL, NEW.source IS 'pixel')
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout,
            flagged = flagged + excluded.flagged, pixel_only = pixel_only + excluded.pixel_only;
    END;
    CREATE TRIGGER conversions_daily_update AFTER UPDATE OF status, payout, currency, flags, source ON conversions BEGIN
        UPDATE daily_conversions SET conversions = conversions - 1, payout = payout - OLD.payout,
            flagged = flagged - (OLD.flags IS NOT NULL), pixel_only = pixel_only - (OLD.source IS 'pixel')
        WHERE day = OLD.ts / 86400000 AND campaign = OLD.campaign AND sub1 = coalesce(OLD.sub1_total, OLD.sub1, '')
            AND status = OLD.status AND currency = OLD.currency;
        INSERT INTO daily_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.sub1_total, NEW.sub1, ''),
            NEW.status, NEW.currency, 1, NEW.payout, NEW.flags IS NOT NULL, NEW.source IS 'pixel')
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout,
            flagged = flagged + excluded.flagged, pixel_only = pixel_only + excluded.pixel_only;
    END;
    DROP TRIGGER conversions_funnel_insert;
    DROP TRIGGER conversions_funnel_update;
    CREATE TRIGGER conversions_funnel_insert AFTER INSERT ON conversions WHEN NEW.offer IS NOT NULL BEGIN
        INSERT INTO daily_funnel_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.lander, ''),
            NEW.offer, NEW.status, NEW.currency, 1, NEW.payout, NEW.flags IS NOT NULL, NEW.source IS 'pixel')
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout,
            flagged = flagged + excluded.flagged, pixel_only = pixel_only + excluded.pixel_only;
    END;
    CREATE TRIGGER conversions_funnel_update AFTER UPDATE OF status, payout, currency, flags, source ON conversions
    WHEN NEW.offer IS NOT NULL BEGIN
        UPDATE daily_funnel_conversions SET conversions = conversions - 1, payout = payout - OLD.payout,
            flagged = flagged - (OLD.flags IS NOT NULL), pixel_only = pixel_only - (OLD.source IS 'pixel')
        WHERE day = OLD.ts / 86400000 AND campaign = OLD.campaign AND lander = coalesce(OLD.lander, '')
            AND offer = OLD.offer AND status = OLD.status AND currency = OLD.currency;
        INSERT INTO daily_funnel_conversions VALUES (NEW.ts / 86400000, NEW.campaign, coalesce(NEW.lander, ''),
            NEW.offer, NEW.status, NEW.currency, 1, NEW.payout, NEW.flags IS NOT NULL, NEW.source IS 'pixel')
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout,
            flagged = flagged + excluded.flagged, pixel_only = pixel_only + excluded.pixel_only;
    END;
    -- A delivery's kind ([campaigns.x.forward] kind; NULL: a GET of url) and, for a POST,
    -- its body. Secrets (headers, an access token) are never stored: they are read from
    -- the config as each try is sent, so a rotated one is used from the next try.
    ALTER TABLE outbox ADD COLUMN kind TEXT;
    ALTER TABLE outbox ADD COLUMN body BLOB;
    """,
    # version 10: trusting the numbers
    """
    -- Postbacks with a valid token refused for what they say (a 400): a network rarely
    -- retries one, so they are kept, for reconcile and for people (at most QUARANTINE_ROWS).
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,               -- unix ms
        reason TEXT NOT NULL,              -- the 400's "<field>: <problem>"
        fields TEXT NOT NULL,              -- JSON: the fields as sent (aliases as their names), no token
        click_id TEXT,                     -- as sent
        txid TEXT,
        ip TEXT
    );
    CREATE INDEX quarantine_at ON quarantine (at);
    CREATE INDEX quarantine_click ON quarantine (click_id);
    -- tinytrack selftest's clicks (/c/...?tinytrack_selftest=<selftest_key>), kept apart:
    -- through the real paths, never in the totals, a report or a forward; deleted by it.
    CREATE TABLE selftest (
        click_id BLOB PRIMARY KEY,
        ts INTEGER NOT NULL,               -- when the click was stored
        campaign TEXT NOT NULL,
        lp_at INTEGER,                     -- its LP click
        converted_at INTEGER,              -- its postback
        txid TEXT
    ) WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('selftest_key', lower(hex(randomblob(16))));
    """,
    # version 11: reports in any time zone, and by country and device
    f"""
    -- Where a click came from and on what, filled in batches after it is stored (the
    -- Enricher), never on its path: country (ISO 3166 alpha-2, from [geo] database),
    -- device (desktop, mobile, tablet, other), os and browser (families, from ua-parser).
    -- A table of its own, appended to in id order: the wide click rows are not written
    -- twice. No row (or NULL): nothing known. Deleted with its click.
    CREATE TABLE click_facts (
        id BLOB PRIMARY KEY,                         -- the click's
        country TEXT,
        device TEXT,
        os TEXT,
        browser TEXT
    ) WITHOUT ROWID;
    CREATE TRIGGER clicks_facts_delete AFTER DELETE ON clicks BEGIN
        DELETE FROM click_facts WHERE id = OLD.id;
    END;
    -- Totals per quarter hour (slot: unix ms / {SLOT_MS}) and campaign: every zone in use
    -- starts its days on a quarter hour (India +5:30, Nepal +5:45), so a day in any zone
    -- is a whole number of slots. At most 96 rows per campaign and day in each table.
    CREATE TABLE slot_clicks (
        slot INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        clicks INTEGER NOT NULL DEFAULT 0,           -- humans
        bot_clicks INTEGER NOT NULL DEFAULT 0,
        unique_clicks INTEGER NOT NULL DEFAULT 0,    -- first of their (campaign, UTC day, address, User-Agent)
        lp_clicks INTEGER NOT NULL DEFAULT 0,        -- by the click's slot, as daily_clicks
        lander_clicks INTEGER NOT NULL DEFAULT 0,
        lander_lp_clicks INTEGER NOT NULL DEFAULT 0,
        flagged_clicks INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (slot, campaign)
    ) WITHOUT ROWID;
    CREATE TABLE slot_conversions (
        slot INTEGER NOT NULL,                       -- of when it converted (ts)
        campaign TEXT NOT NULL,
        status TEXT NOT NULL,
        currency TEXT NOT NULL,
        conversions INTEGER NOT NULL,
        payout INTEGER NOT NULL,
        flagged INTEGER NOT NULL,
        pixel_only INTEGER NOT NULL,
        PRIMARY KEY (slot, campaign, status, currency)
    ) WITHOUT ROWID;
    -- What clicks cost (by the click's slot) and approved cpa or revshare conversions cost
    -- (by theirs). Uploaded costs stay in daily_costs: a report shares a UTC day's upload
    -- over its slots (Database.slot_costs).
    CREATE TABLE slot_costs (
        slot INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        currency TEXT NOT NULL,
        cost INTEGER NOT NULL,
        PRIMARY KEY (slot, campaign, currency)
    ) WITHOUT ROWID;
    CREATE TRIGGER conversions_slot_insert AFTER INSERT ON conversions BEGIN
        INSERT INTO slot_conversions VALUES (NEW.ts / {SLOT_MS}, NEW.campaign, NEW.status, NEW.currency, 1, NEW.payout,
            NEW.flags IS NOT NULL, NEW.source IS 'pixel')
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout,
            flagged = flagged + excluded.flagged, pixel_only = pixel_only + excluded.pixel_only;
    END;
    CREATE TRIGGER conversions_slot_update AFTER UPDATE OF status, payout, currency, flags, source ON conversions BEGIN
        UPDATE slot_conversions SET conversions = conversions - 1, payout = payout - OLD.payout,
            flagged = flagged - (OLD.flags IS NOT NULL), pixel_only = pixel_only - (OLD.source IS 'pixel')
        WHERE slot = OLD.ts / {SLOT_MS} AND campaign = OLD.campaign AND status = OLD.status AND currency = OLD.currency;
        INSERT INTO slot_conversions VALUES (NEW.ts / {SLOT_MS}, NEW.campaign, NEW.status, NEW.currency, 1, NEW.payout,
            NEW.flags IS NOT NULL, NEW.source IS 'pixel')
        ON CONFLICT DO UPDATE SET conversions = conversions + 1, payout = payout + excluded.payout,
            flagged = flagged + excluded.flagged, pixel_only = pixel_only + excluded.pixel_only;
    END;
    -- Costs in triggers of their own, run only for the conversions that have one.
    CREATE TRIGGER conversions_slot_cost_insert AFTER INSERT ON conversions
    WHEN NEW.cost_model IS NOT NULL AND NEW.status = 'approved' BEGIN
        INSERT INTO slot_costs VALUES (NEW.ts / {SLOT_MS}, NEW.campaign, NEW.cost_currency, NEW.cost)
        ON CONFLICT DO UPDATE SET cost = cost + excluded.cost;
    END;
    CREATE TRIGGER conversions_slot_cost_update AFTER UPDATE OF status, cost, cost_currency ON conversions
    WHEN (OLD.cost_model IS NOT NULL AND OLD.status = 'approved') OR (NEW.cost_model IS NOT NULL AND NEW.status = 'approved')
    BEGIN
        UPDATE slot_costs SET cost = cost - OLD.cost
        WHERE OLD.cost_model IS NOT NULL AND OLD.status = 'approved' AND slot = OLD.ts / {SLOT_MS}
            AND campaign = OLD.campaign AND currency = OLD.cost_currency;
        INSERT INTO slot_costs SELECT NEW.ts / {SLOT_MS}, NEW.campaign, NEW.cost_currency, NEW.cost
            WHERE NEW.cost_model IS NOT NULL AND NEW.status = 'approved'
        ON CONFLICT DO UPDATE SET cost = cost + excluded.cost;
    END;
    -- What is kept now into the new totals: the clicks still stored (the slots start at
    -- the oldest: meta slots_since), and every conversion.
    INSERT INTO slot_clicks
        SELECT ts / {SLOT_MS}, campaign, sum(bot = 0), sum(bot), 0, sum(bot = 0 AND lp_at IS NOT NULL),
            sum(bot = 0 AND lander IS NOT NULL), sum(bot = 0 AND lander IS NOT NULL AND lp_at IS NOT NULL),
            sum(bot = 0 AND flags IS NOT NULL)
        FROM clicks GROUP BY 1, 2;
    UPDATE slot_clicks SET unique_clicks = firsts.n FROM (
        SELECT ts / {SLOT_MS} AS slot, campaign, count(*) AS n FROM clicks WHERE id IN (
            SELECT min(id) FROM clicks WHERE bot = 0 AND ua IS NOT NULL GROUP BY ts / {DAY_MS}, campaign, ip, ua)
        GROUP BY 1, 2) AS firsts
    WHERE slot_clicks.slot = firsts.slot AND slot_clicks.campaign = firsts.campaign;
    INSERT INTO slot_conversions
        SELECT ts / {SLOT_MS}, campaign, status, currency, count(*), sum(payout), sum(flags IS NOT NULL),
            sum(source IS 'pixel')
        FROM conversions GROUP BY 1, 2, 3, 4;
    INSERT INTO slot_costs SELECT slot, campaign, currency, sum(cost) FROM (
        SELECT ts / {SLOT_MS} AS slot, campaign, cost_currency AS currency, cost FROM clicks WHERE cost IS NOT NULL
        UNION ALL
        SELECT ts / {SLOT_MS}, campaign, cost_currency, cost FROM conversions
        WHERE cost_model IS NOT NULL AND status = 'approved') GROUP BY 1, 2, 3;
    -- From when they are whole: the oldest click kept, or the UTC day after the last
    -- human click whose User-Agent was cut (pii_days: its unique clicks can't be
    -- counted again), whichever is later. A database that never counted a click (a new
    -- one) has everything in them: 0.
    INSERT INTO meta (key, value) SELECT 'slots_since', CASE WHEN EXISTS (SELECT 1 FROM daily_clicks)
        THEN max(
            coalesce((SELECT min(ts) FROM clicks), CAST((julianday('now') - 2440587.5) * {DAY_MS} AS INTEGER)),
            coalesce((SELECT max(ts) FROM clicks WHERE bot = 0 AND ua IS NULL) / {DAY_MS} * {DAY_MS} + {DAY_MS}, 0))
        ELSE 0 END;
    """,
]
OTHER_SUB1 = "(other)"  # the totals' sub1 for a campaign-day's sub1 beyond retention.sub1_per_day


def open_database(path: str) -> sqlite3.Connection:
    """Open the file in WAL mode and bring its schema up to date."""
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")  # CLI commands may hold the lock briefly
    # Pages freed by purges go back to the file system a few at a time (the purge
    # runs incremental_vacuum), never in one long exclusive VACUUM. Only takes
    # effect before the first table is made; migrate converts older files once.
    con.execute("PRAGMA auto_vacuum = INCREMENTAL")
    con.execute("PRAGMA journal_mode = WAL")
    # The WAL is cut back to this after a checkpoint; a long report can grow it meanwhile.
    con.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
    # NORMAL: in WAL mode a commit survives a killed process; batches that
    # acknowledge postbacks switch to FULL so they also survive power loss.
    con.execute("PRAGMA synchronous = NORMAL")
    con.execute("PRAGMA foreign_keys = ON")
    con.create_function("truncate_ip", 1, truncate_ip, deterministic=True)
    migrate(con, path)
    return con


def migrate(con: sqlite3.Connection, path: str) -> None:
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if version > len(SCHEMA):
        raise StorageError(f"{path}: made by a newer tinytrack (schema {version}), this one knows {len(SCHEMA)}")
    for number in range(version + 1, len(SCHEMA) + 1):
        try:  # one transaction per version: the schema and its number change together
            con.executescript(f"BEGIN IMMEDIATE; {SCHEMA[number - 1]}; PRAGMA user_version = {number}; COMMIT;")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
    if version < 2 <= len(SCHEMA) and con.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        # A file made before tinytrack purged anything: switch it to incremental
        # auto-vacuum, which takes one full VACUUM (once, while nothing else runs).
        log.warning("%s: converting to incremental auto-vacuum (once; takes a while on a big file)", path)
        con.execute("PRAGMA auto_vacuum = INCREMENTAL")
        con.execute("VACUUM")


# -- reconciling with a network's report --


REPORT_FIELDS = ("click_id", "txid", "event", "payout", "currency", "status", "ts")  # a report column's meanings
RECONCILE_CATEGORIES = {  # in the order the table lists them
    "matched": "matched",
    "payout_differs": "payout differs",
    "status_differs": "status differs",
    "missing_here": "missing here (its click is known)",
    "quarantined": "missing here: its postback was refused (quarantined)",
    "orphan": "an orphan the file explains (we had the postback, not the click)",
    "unknown_click": "unknown click (purged, or not ours)",
    "only_here": "only here (not in the file)",
    "not_counted_here": "held or rejected here (fraud, window): not applied",
    "ambiguous": "no txid, and its click has several conversions: not applied",
    "repeated": "repeated in the file (a later row for it decides)",
    "unreadable": "unreadable rows",
}
APPLIED = ("payout_differs", "status_differs", "missing_here", "quarantined")  # what --apply stores
MAX_IMPORT_ROWS = 1000  # rows of one POST /api/conversions/import
MAX_IMPORT_BODY = 1024 * 1024
IMPORT_ROWS_PER_WRITE = 100  # an import's rows per transaction (~10 ms): clicks queued behind it barely wait


QUARANTINE_COLUMNS = ("id", "at", "reason", "fields", "ip")


def import_answer(row: int, outcome: PostbackOutcome) -> dict[str, Any]:
    """One imported row's answer: created, updated, duplicate, rejected (with why),
    unknown_click (nothing stored), or invalid (with the field's problem)."""
    if outcome.result is PostbackResult.IGNORED:
        return {"row": row, "status": "unknown_click"}
    if outcome.result is PostbackResult.INVALID:
        return {"row": row, "status": "invalid", "error": outcome.reason}
    answer = {"row": row, "status": outcome.result.value, "id": outcome.id}
    if outcome.result is PostbackResult.REJECTED:
        answer["reason"] = outcome.reason
    return answer


class ReportRow(NamedTuple):
    """A row of a network's report, as reconcile judges it."""

    line: int  # in the file (the header is line 1), or the index of an import's row
    postback: Postback | None  # None: unreadable; for a stored conversion, what --apply would post
    category: str
    detail: str = ""
    stored: tuple | None = None  # id, status, payout, currency, reason, source, txid, event
    given: frozenset[str] = frozenset()  # of status, payout, currency: what the row said (an empty cell says nothing)
    click: bytes | None = None  # an unreadable row's click id, if that much could be read


def parse_report_map(text: str) -> dict[str, str]:
    """--map click_id=COL,txid=COL,...: which report column holds which postback field."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        field, sep, column = part.partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not column:
            raise TinytrackError(f"--map: {quoted(part)} is not FIELD=COLUMN")
        if field not in REPORT_FIELDS:
            raise TinytrackError(f"--map: {quoted(field)} is no field; known: {', '.join(REPORT_FIELDS)}")
        if field in mapping:
            raise TinytrackError(f"--map: {field} given twice")
        mapping[field] = column
    if "click_id" not in mapping:
        raise TinytrackError("--map: click_id=COLUMN is required (how a row names its click)")
    return mapping


def read_report(text: str, mapping: Mapping[str, str], conf: PostbackConfig, now: float) -> list[ReportRow]:
    """A network's CSV export (comma, semicolon or tab separated) as report rows: each
    read as a postback would be (payout as decimal text, ts ISO 8601 or unix, status words
    through postback.status_map), source import; a row that can't be is unreadable, with
    why. A row repeated for one conversion (its click and txid or event) is "repeated"
    but the last, which decides."""
    text = text.lstrip("\ufeff")
    try:
        dialect: Any = csv.Sniffer().sniff(text[:65536], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    header = [name.strip() for name in next(reader, [])]
    if not header:
        raise TinytrackError("the report is empty")
    missing = [column for column in mapping.values() if column not in header]
    if missing:
        raise TinytrackError(f"--map: no column {quoted(missing[0])} in the report; it has: {', '.join(header)}")
    index = {field: header.index(column) for field, column in mapping.items()}
    rows: list[ReportRow] = []
    last: dict[tuple[bytes, str], int] = {}  # a conversion's key -> its last row
    for record in reader:
        if not any(cell.strip() for cell in record):
            continue  # a blank line
        fields = {f: record[i].strip() for f, i in index.items() if i < len(record) and record[i].strip()}
        try:
            if "click_id" not in fields:
                raise FieldError("click_id", "is empty")
            postback = dataclasses.replace(build_postback(fields, conf, now, "import"), source=IMPORT)
        except FieldError as exc:
            said = f"click_id {fields.get('click_id', '-')}, txid {fields.get('txid', '-')}"
            click = parse_click_id(fields.get("click_id"))
            rows.append(ReportRow(reader.line_num, None, "unreadable", f"{exc.message} ({said})", click=click))
            continue
        given = frozenset(name for name in ("status", "payout", "currency") if name in fields)
        key = (postback.click_id, postback.dedupe_key)
        if key in last:
            earlier = rows[last[key]]
            rows[last[key]] = earlier._replace(category="repeated", detail=f"line {reader.line_num} decides")
        last[key] = len(rows)
        rows.append(ReportRow(reader.line_num, postback, "", given=given))
    return rows


def judge_report_row(row: ReportRow, found: tuple[tuple | None, bool, bool, str | None, int]) -> ReportRow:
    """A readable row's category, from what is stored for it (Database.report_lookup). For
    a stored conversion, row.postback becomes what --apply posts: its key, and what the row
    left unsaid (an empty status or payout cell, no currency column) as stored."""
    stored, known, orphan, refused, others = found
    pb = row.postback
    if row.category == "repeated":
        return row._replace(stored=stored)
    if stored is not None:
        _, status, payout, currency, reason, _, txid, event = stored
        if reason is not None:
            return row._replace(category="not_counted_here", detail=f"here: {status}, {reason}", stored=stored)
        target = dataclasses.replace(
            pb,
            txid=txid,
            event=event,
            status=pb.status if "status" in row.given else status,
            payout=pb.payout if "payout" in row.given else payout,
            currency=pb.currency if "currency" in row.given else currency,
            payout_given=True,
        )
        said = f"{format_money(target.payout)} {target.currency} here {format_money(payout)} {currency}"
        money = (target.payout, target.currency) != (payout, currency)
        row = row._replace(postback=target, stored=stored)
        if target.status != status:
            detail = f"file {target.status}, here {status}" + (f"; file {said}" if money else "")
            return row._replace(category="status_differs", detail=detail)
        if money:
            return row._replace(category="payout_differs", detail=f"file {said}")
        return row._replace(category="matched")
    if others > 1:
        return row._replace(category="ambiguous", detail=f"{others} conversions of this click")
    if refused is not None:
        return row._replace(category="quarantined" if known else "unknown_click", detail=f"refused: {refused}")
    if known:
        return row._replace(category="missing_here")
    if orphan:
        return row._replace(category="orphan", detail="the postback came for a click id we never issued (or purged)")
    return row._replace(category="unknown_click")


# --- Storage: the database ------------------------------------------------------------


CONVERSION_COLUMNS = (
    "id",
    "click_id",
    "campaign",
    "sub1",
    "sub2",
    "sub3",
    "sub4",
    "sub5",
    "ext_id",
    "event",
    "txid",
    "status",
    "reason",
    "payout",
    "currency",
    "ts",
    "created_at",
    "updated_at",
    "lander",  # null: none
    "offer",  # null: the click had none (a plain `url` campaign: "default")
    "flags",  # {flag: evidence}, or null; CSV: "flag: evidence; ..."
    "source",  # postback, or pixel while only the browser pixel has reported it
)
CONVERSION_SELECT = """SELECT id, click_id, campaign, sub1, sub2, sub3, sub4, sub5, ext_id, event, txid, status, reason,
                              payout, currency, ts, created_at, updated_at, lander, offer, flags,
                              coalesce(source, 'postback')
                       FROM conversions"""


def conversion_view(r: Sequence) -> dict:
    """A CONVERSION_SELECT row as the API gives it (CONVERSION_COLUMNS)."""
    return dict(
        zip(
            CONVERSION_COLUMNS,
            (
                r[0],
                format_uuid(r[1]) if len(r[1]) == 16 else None,  # None: credited by a user id alone
                *r[2:13],
                format_money(r[13]),
                r[14],
                *map(iso_ms, r[15:18]),
                *r[18:20],
                r[20] and orjson.loads(r[20]),
                r[21],
            ),
        )
    )


OUTBOX_COLUMNS = (
    "id",
    "conversion_id",
    "campaign",
    "status",
    "state",
    "attempts",
    "created_at",
    "next_at",
    "last_at",
    "last_code",
    "last_error",
    "url",
    "kind",  # get, json or meta_capi
)
OUTBOX_STATES = ("pending", "done", "failed", "dead", "canceled")
ORPHAN_COLUMNS = (
    "id",
    "click_id",
    "event",
    "txid",
    "status",
    "payout",
    "currency",
    "ts",
    "first_seen",
    "last_seen",
    "hits",
)
OUTBOX_SELECT = """SELECT id, conversion_id, campaign, status, state, attempts, created_at, next_at, last_at,
                         last_code, last_error, url, coalesce(kind, 'get') FROM outbox"""


def outbox_dict(row: tuple) -> dict:
    """An OUTBOX_SELECT row for people: times as ISO 8601, next_at only while pending."""
    fields = dict(zip(OUTBOX_COLUMNS, row))
    fields["created_at"] = iso_ms(fields["created_at"])
    fields["next_at"] = iso_ms(fields["next_at"]) if fields["state"] == "pending" else None
    fields["last_at"] = fields["last_at"] and iso_ms(fields["last_at"])
    fields["url"] = redact_url(fields["url"]) if fields["campaign"] != ALERTS else hidden_path(fields["url"])
    return fields


def hidden_path(url: str) -> str:
    """A webhook URL for people: its origin only (a chat tool's hook has its secret in the path)."""
    head = URL_HEAD_RE.match(url)
    return f"{head.group(0)}/..." if head else "..."


class PostbackResult(enum.Enum):
    """What a postback did; the value is what the answer and the log say."""

    CREATED = "created"
    DUPLICATE = "duplicate"
    UPDATED = "updated"
    REJECTED = "rejected"
    ORPHAN = "orphan"
    INVALID = "invalid"  # refused once matched to its click (a 400): nothing stored
    IGNORED = "ignored"  # a pixel hit for no known click, or of a campaign without the pixel: nothing stored


class RejectReason(enum.Enum):
    """Why a valid postback was stored but not counted."""

    OUTSIDE_WINDOW = "outside_window"
    FRAUD = "fraud"  # flagged, under [fraud] action = "reject" (or rejected on review)
    HELD = "held"  # flagged, under action = "hold": pending until reviewed, never forwarded before


@dataclasses.dataclass(frozen=True)
class PostbackOutcome:
    result: PostbackResult
    id: int | None = None
    reason: str | None = None  # REJECTED: why; INVALID: the 400's "<field>: <problem>"
    campaign: str | None = None
    queued_forward: bool = False  # a delivery to the traffic source was queued with it
    flags: tuple[str, ...] = ()  # a new conversion's flags


CLICK_COLUMNS = (
    "id, ts, campaign, sub1, sub2, sub3, sub4, sub5, ext_id, ip, ua, bot, cost, cost_currency, lander, offer"
)
# A value no click can carry (control characters are stripped), bound for "none" where
# None would cost an adaptation (see ClickRow); NULL_IF_NONE stores NULL for it. In the
# SQL as a literal: char(1) would be called for every row.
NO_TEXT = "\x01"
NULL_IF_NONE = f"nullif(?, '{NO_TEXT}')"
CLICK_VALUES = f"?, ?, ?, ?, {', '.join([NULL_IF_NONE] * 5)}, ?, ?, ?, nullif(?, -1), nullif(?, ''), {NULL_IF_NONE}, {NULL_IF_NONE}"
INSERT_CLICK = f"INSERT INTO clicks ({CLICK_COLUMNS}) VALUES ({CLICK_VALUES})"  # a ClickRow's
INSERT_WIDE_CLICK = (  # a WideClickRow's
    f"INSERT INTO clicks ({CLICK_COLUMNS}, flags, uid, ad_ids) VALUES ({CLICK_VALUES}, {', '.join([NULL_IF_NONE] * 3)})"
)
ADD_DAILY_CLICKS = """INSERT INTO daily_clicks (day, campaign, sub1, clicks, bot_clicks, unique_clicks) VALUES (?, ?, ?, ?, ?, ?)
                      ON CONFLICT DO UPDATE SET clicks = clicks + excluded.clicks,
                          bot_clicks = bot_clicks + excluded.bot_clicks, unique_clicks = unique_clicks + excluded.unique_clicks"""


_INSERT_CONVERSION = f"""INSERT INTO conversions (click_id, dedupe_key, click_ts, campaign, sub1, sub2, sub3, sub4, sub5,
                           ext_id, event, txid, status, reason, payout, currency, ts, created_at, updated_at, ip,
                           sub1_total, cost, cost_currency, cost_model, lander, offer{{extra_columns}})
                        VALUES (?, ?, ?, ?, {", ".join([NULL_IF_NONE] * 6)}, ?, nullif(?, ''), ?, nullif(?, ''), ?, ?,
                           ?, ?, ?, ?, nullif(?, ''), nullif(?, -1), nullif(?, ''), nullif(?, ''), {NULL_IF_NONE},
                           {NULL_IF_NONE}{{extra_values}})
                        ON CONFLICT (click_id, dedupe_key) DO NOTHING RETURNING id"""
INSERT_CONVERSION = _INSERT_CONVERSION.format(extra_columns="", extra_values="")


@cache
def insert_conversion_sql(suspect: bool, user: bool, ads: bool = False, source: bool = False) -> str:
    """INSERT_CONVERSION with the columns few conversions have, bound only for those
    (three binds are ~1.5% of a postback): a suspect one's flags, its click's address
    kept (ip_cluster) and the network's status while held; a user-credited one's uid
    and decision; its click's ad click ids; who reported it, if not a postback."""
    columns = (
        (("flags", "click_ip", "network_status") if suspect else ())
        + (("uid", "attribution", "credited_click") if user else ())
        + (("ad_ids",) if ads else ())
        + (("source",) if source else ())
    )
    return _INSERT_CONVERSION.format(
        extra_columns="".join(f", {c}" for c in columns), extra_values=f", {NULL_IF_NONE}" * len(columns)
    )


ADD_FUNNEL_CLICKS = """INSERT INTO daily_funnel (day, campaign, lander, offer, clicks, bot_clicks, unique_clicks,
                           flagged_clicks, lp_clicks)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT DO UPDATE SET clicks = clicks + excluded.clicks, bot_clicks = bot_clicks + excluded.bot_clicks,
                           unique_clicks = unique_clicks + excluded.unique_clicks, lp_clicks = lp_clicks + excluded.lp_clicks,
                           flagged_clicks = flagged_clicks + excluded.flagged_clicks"""
# Clicks' costs can't push a total past 64 bits into a REAL (inexact for good): at that
# point (9.2 million clicks at max_click_cost in one day and sub1: a flood) the total stays.
ADD_DAILY_COSTS = f"""INSERT INTO daily_costs (day, campaign, sub1, source, currency, cost) VALUES (?, ?, ?, ?, ?, ?)
                      ON CONFLICT DO UPDATE SET cost = CASE WHEN cost <= {MAX_SUM} - excluded.cost
                          THEN cost + excluded.cost ELSE cost END"""
ADD_SLOT_CLICKS = """INSERT INTO slot_clicks (slot, campaign, clicks, bot_clicks, unique_clicks, lander_clicks,
                         flagged_clicks)
                     VALUES (?, ?, ?, ?, ?, ?, ?)
                     ON CONFLICT DO UPDATE SET clicks = clicks + excluded.clicks, bot_clicks = bot_clicks + excluded.bot_clicks,
                         unique_clicks = unique_clicks + excluded.unique_clicks,
                         lander_clicks = lander_clicks + excluded.lander_clicks,
                         flagged_clicks = flagged_clicks + excluded.flagged_clicks"""
ADD_SLOT_COSTS = f"""INSERT INTO slot_costs (slot, campaign, currency, cost) VALUES (?, ?, ?, ?)
                     ON CONFLICT DO UPDATE SET cost = CASE WHEN cost <= {MAX_SUM} - excluded.cost
                         THEN cost + excluded.cost ELSE cost END"""
# What a conversion copies of its click (ClickFacts, sub1_other, its cost) and judges it by (bot, flags, ip).
CLICK_FOR_POSTBACK = """SELECT ts, campaign, sub1, sub2, sub3, sub4, sub5, ext_id, sub1_other, cost, cost_currency,
                               lander, offer, bot, flags, ip, uid, ad_ids
                        FROM clicks WHERE id = ?"""
LP_CLICK_SELECT = """SELECT ts, campaign, sub1_other, bot, lp_at, offer, lander, sub1, sub2, sub3, sub4, sub5, ext_id
                     FROM clicks WHERE id = ?"""
LP_CLICK_FACTS = ("lander", *SUB_FIELDS, "ext_id")  # what an LP click's offer URL is filled from, as its click has it


def lp_click_facts(row: Sequence) -> dict[str, str]:
    """An LP_CLICK_SELECT row's LP_CLICK_FACTS that are there."""
    return {name: value for name, value in zip(LP_CLICK_FACTS, row[6:]) if value is not None}


INSERT_UNIQUE = "INSERT OR IGNORE INTO click_uniques (day, key) VALUES (?, ?)"
# Unique clicks: the writer keeps the day's (campaign, IP, User-Agent) keys in a set (about
# 80 bytes each, 8 MB in all; rebuilt from the day's clicks after a restart); past this many
# in a day, click_uniques takes the rest (an insert per click, ~2 us more).
UNIQUE_MEMORY_KEYS = 100_000


def money_sum(column: str) -> str:
    """Whole units and micro-units summed apart: a plain sum() of daily totals near the
    64-bit limit raises "integer overflow", and a total stored as a REAL (an overflow
    before the cap) still adds up. money_units() puts the two back together, exactly."""
    return f"sum({column} / 1000000), sum({column} - {column} / 1000000 * 1000000)"


PAYOUT_SUM = money_sum("payout")


def money_units(whole: int | float, micros: int | float) -> int:
    return (whole * 1_000_000 if isinstance(whole, int) else int(whole * 1_000_000)) + int(micros)


class ClickRow(NamedTuple):
    """A click as it is inserted (and as ``clicks`` stores it). The server builds it in
    the types the sqlite3 module binds fastest: it adapts None, bytes and bool through
    its adapter registry (0.3-0.6 us each, measured; a click has up to eight), so a
    missing sub2..ext_id is NO_TEXT and a missing cost -1 (INSERT_CLICK stores NULL),
    the id a bytearray, the flag an int. None still works (other callers), only slower."""

    id: bytes | bytearray
    ts: int  # unix ms: the millisecond inside the id
    campaign: str
    sub1: str | None
    sub2: str | None  # NO_TEXT: none
    sub3: str | None
    sub4: str | None
    sub5: str | None
    ext_id: str | None
    ip: str | None
    ua: str | None
    bot: int  # 1: a bot
    cost: int | None  # micro-units of cost_currency; -1 (or None): no cost we know of
    cost_currency: str | None  # '' (or None) without a cost
    lander: str | None = NO_TEXT  # the names it was given; NO_TEXT: none (a plain `url` campaign's click)
    offer: str | None = NO_TEXT


class WideClickRow(NamedTuple):
    """A ClickRow with what few clicks have: flags (what fraud rules and the LP click
    found, as JSON {flag: evidence}), a uid and ad click ids, NO_TEXT for what it lacks.
    Most clicks have none: they stay ClickRows, bound as before."""

    id: bytes | bytearray
    ts: int
    campaign: str
    sub1: str | None
    sub2: str | None
    sub3: str | None
    sub4: str | None
    sub5: str | None
    ext_id: str | None
    ip: str | None
    ua: str | None
    bot: int
    cost: int | None
    cost_currency: str | None
    lander: str | None
    offer: str | None
    flags: str
    uid: str
    ad_ids: str  # JSON {gclid: ..., fbclid: ..., fbc: ...}

    @classmethod
    def of(
        cls, row: ClickRow, flags: Mapping[str, str] | None, uid: str | None = None, ad_ids: str | None = None
    ) -> tuple:
        """The row as a plain tuple of these fields (built and bound quicker than the class)."""
        return (*row, orjson.dumps(flags).decode() if flags else NO_TEXT, uid or NO_TEXT, ad_ids or NO_TEXT)


class LPClick(NamedTuple):
    """An LP click (GET /go/<campaign>) as the writer takes it."""

    click_id: bytes | None  # None: no cid, or not a click id
    campaign: Campaign  # as the request read it: a reload meanwhile doesn't change its answer
    named: str | None  # &offer=
    pick: Arm  # by weight, for when neither the named offer nor the click's own will do
    bot: bool  # the request's User-Agent is a bot's: it is redirected and changes nothing
    new: WideClickRow | None  # stored (flagged no_click_id) when click_id names no click of the campaign


@dataclasses.dataclass
class LPCounts:
    """A batch's LP clicks, counted as they are stored (see Database.lp_click)."""

    daily: Counter = dataclasses.field(default_factory=Counter)  # (day, campaign, sub1) -> LP clicks
    landed: Counter = dataclasses.field(default_factory=Counter)  # the same key -> LP clicks of clicks sent to a lander
    funnel: Counter = dataclasses.field(default_factory=Counter)  # (day, campaign, lander, offer) -> LP clicks
    slots: Counter = dataclasses.field(default_factory=Counter)  # (slot, campaign, sent to a lander) -> LP clicks

    def __bool__(self) -> bool:
        return bool(self.daily or self.funnel)


class ClickFacts(NamedTuple):
    """What a conversion copies from its click, so it outlives the click."""

    ts: int
    campaign: str
    sub1: str | None
    sub2: str | None
    sub3: str | None
    sub4: str | None
    sub5: str | None
    ext_id: str | None
    lander: str | None
    offer: str | None


class StoredConversion(NamedTuple):
    """A stored conversion, as a postback for the same key finds it."""

    id: int
    status: str
    reason: str | None
    day: int  # UTC day it converted
    payout: int
    currency: str
    sub1_total: str | None
    cost_model: str | None  # 'cpa' or 'revshare': its cost is its own, in the totals while approved
    cost_currency: str | None
    facts: ForwardFacts
    source: str | None = None  # "pixel": only the browser pixel has reported it


def stored_click_facts(stored: StoredConversion) -> ClickFacts:
    """The click facts a stored conversion copied (its time aside), for a later postback
    that finds it by a user's key rather than through its click."""
    facts = stored.facts
    return ClickFacts(0, facts.campaign, *facts[2:8], facts.lander, facts.offer)


class DueDelivery(NamedTuple):
    id: int
    url: str
    key: str
    attempts: int
    deadline: int
    campaign: str
    kind: str | None  # None: a GET of url
    body: bytes | None


class WritePolicy(NamedTuple):
    """What the config tells the write path: applied per batch, swapped on reload."""

    campaigns: Mapping[str, Campaign]
    forward: ForwardConfig
    sub1_per_day: int
    attribution: AttributionConfig = AttributionConfig()
    pixel: bool = False  # [pixel] enabled: every campaign's clicks may be reported by /pixel

    @classmethod
    def of(cls, config: Config) -> WritePolicy:
        return cls(
            config.campaigns, config.forward, config.retention.sub1_per_day, config.attribution, config.pixel.enabled
        )


PURGE_SQL = {
    # rule name: (how many rows are due, for --dry-run; one batch). The count takes
    # :cutoff and :clicks_cutoff; the batch (cutoff, limit).
    "clicks": (
        "SELECT count(*) FROM clicks WHERE id < :cutoff",
        "DELETE FROM clicks WHERE id IN (SELECT id FROM clicks WHERE id < ? ORDER BY id LIMIT ?)",
    ),
    # pii_done marks how far it got, so each batch starts where the last stopped.
    "pii": (
        """SELECT count(*) FROM clicks WHERE id > coalesce((SELECT value FROM meta WHERE key = 'pii_done'), x'')
                   AND id < :cutoff AND id >= :clicks_cutoff""",  # what the clicks rule deletes first is not cut
        """UPDATE clicks SET ip = truncate_ip(ip), ua = NULL WHERE id IN (
                   SELECT id FROM clicks WHERE id > coalesce((SELECT value FROM meta WHERE key = 'pii_done'), x'')
                   AND id < ?1 ORDER BY id LIMIT ?2) RETURNING id""",
    ),
    "conversion_ips": (
        "SELECT count(*) FROM conversions WHERE click_ip IS NOT NULL AND ts < :cutoff",
        """UPDATE conversions SET click_ip = NULL WHERE id IN (
                      SELECT id FROM conversions WHERE click_ip IS NOT NULL AND ts < ? LIMIT ?)""",
    ),
    # By clicks_uid_id: only clicks that still have a uid are read.
    "uids": (
        "SELECT count(*) FROM clicks WHERE uid IS NOT NULL AND id < :cutoff AND id >= :clicks_cutoff",
        """UPDATE clicks SET uid = NULL WHERE id IN (
                      SELECT id FROM clicks WHERE uid IS NOT NULL AND id < ? ORDER BY id LIMIT ?)""",
    ),
    "touches": (
        "SELECT count(*) FROM touches WHERE ts < :cutoff",
        "DELETE FROM touches WHERE id IN (SELECT id FROM touches WHERE ts < ? LIMIT ?)",
    ),
    "conversion_uids": (
        "SELECT count(*) FROM conversions WHERE uid IS NOT NULL AND ts < :cutoff",
        """UPDATE conversions SET uid = NULL WHERE id IN (
                      SELECT id FROM conversions WHERE uid IS NOT NULL AND ts < ? LIMIT ?)""",
    ),
    # A conversion's copy of its click's ad click ids goes when its click would have.
    "conversion_ad_ids": (
        "SELECT count(*) FROM conversions WHERE ad_ids IS NOT NULL AND created_at < :cutoff",
        """UPDATE conversions SET ad_ids = NULL WHERE id IN (
                      SELECT id FROM conversions WHERE ad_ids IS NOT NULL AND created_at < ? LIMIT ?)""",
    ),
    "conversions": (
        "SELECT count(*) FROM conversions WHERE created_at < :cutoff",
        "DELETE FROM conversions WHERE id IN (SELECT id FROM conversions WHERE created_at < ? ORDER BY created_at LIMIT ?)",
    ),
    "orphans": (
        "SELECT count(*) FROM orphans WHERE last_seen < :cutoff",
        "DELETE FROM orphans WHERE id IN (SELECT id FROM orphans WHERE last_seen < ? LIMIT ?)",
    ),
    "quarantine": (
        "SELECT count(*) FROM quarantine WHERE at < :cutoff",
        "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine WHERE at < ? ORDER BY at LIMIT ?)",
    ),
    "uniques": (
        "SELECT count(*) FROM click_uniques WHERE day < :cutoff / 86400000",
        """DELETE FROM click_uniques WHERE (day, key) IN (SELECT day, key FROM click_uniques
                      WHERE day < ? / 86400000 LIMIT ?)""",
    ),
    "outbox": (
        "SELECT count(*) FROM outbox WHERE state != 'pending' AND coalesce(last_at, created_at) < :cutoff",
        """DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE state != 'pending'
                      AND coalesce(last_at, created_at) < ? LIMIT ?)""",
    ),
}


class Database:
    """Every SQL statement tinytrack runs but the schema's, as domain verbs, on one
    connection: the writer's (in transactions the Store begins and ends), the
    reader's, or a command's (datasette's split). Not thread-safe: one thread each."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con
        self._sub1_seen: dict[tuple[int, str], set[str]] = {}  # (day, campaign) -> sub1 in its totals
        self._unique_keys: dict[int, set[int]] = {}  # UTC day -> its human clicks' keys (see seen_before)
        self._unique_added: list[tuple[int, int]] = []  # (day, key) added in this transaction
        self._busy_timeout: int | None = None
        self._synchronous_full: bool | None = None
        self._user_secret: bytes | None = None  # see user_key

    @classmethod
    def open(cls, path: str) -> Database:
        """The file in WAL mode, its schema brought up to date (see open_database)."""
        return cls(open_database(path))

    @classmethod
    def open_readonly(cls, path: str) -> Database:
        """A read-only connection beside the writer: reports, listings, the outbox."""
        con = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, check_same_thread=False)
        return cls(con)

    def close(self) -> None:
        self.con.close()

    # -- Transactions and upkeep (the Store decides when) --

    def begin(self, *, fsync: bool, busy_timeout_ms: int) -> None:
        """BEGIN IMMEDIATE; ``fsync``: the commit survives power loss (synchronous=FULL),
        else a killed process (NORMAL, in WAL mode). Pragmas only change when needed."""
        con = self.con
        if len(self._sub1_seen) >= 256:  # campaigns x days seen; emptied between transactions, never inside one
            self._sub1_seen.clear()
        if busy_timeout_ms != self._busy_timeout:
            con.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            self._busy_timeout = busy_timeout_ms
        if fsync != self._synchronous_full:
            # Outside a transaction, as SQLite requires. The WAL is one log, so
            # the fsync of a postback batch also hardens the clicks before it.
            con.execute("PRAGMA synchronous = FULL" if fsync else "PRAGMA synchronous = NORMAL")
            self._synchronous_full = fsync
        con.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.con.execute("COMMIT")
        self._unique_added.clear()

    def rollback(self) -> None:
        if self.con.in_transaction:
            self.con.execute("ROLLBACK")
        self._sub1_seen.clear()  # it may name totals rows the rollback took back
        for day, key in self._unique_added:  # clicks that were not stored were not seen
            self._unique_keys.get(day, set()).discard(key)
        self._unique_added.clear()

    @contextmanager
    def transaction(self, *, fsync: bool = False, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Iterator[Database]:
        self.begin(fsync=fsync, busy_timeout_ms=busy_timeout_ms)
        try:
            yield self
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def no_autocheckpoint(self) -> None:
        # Commits never checkpoint on their own: that fsyncs the database file, and a
        # click-only commit runs on the event loop. The Store does it on the writer thread.
        self.con.execute("PRAGMA wal_autocheckpoint = 0")

    def checkpoint(self, mode: str = "PASSIVE") -> bool:
        """Copy the WAL into the database; True when all of it was. PASSIVE never waits
        for readers; TRUNCATE also cuts the WAL file to nothing, and here doesn't wait
        either (busy timeout 0): a report may be reading."""
        if mode == "TRUNCATE" and self._busy_timeout != 0:
            self.con.execute("PRAGMA busy_timeout = 0")
            self._busy_timeout = 0
        busy, log_frames, done = self.con.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return not busy and log_frames == done

    def probe_write(self, now_ms: int) -> None:
        """One tiny write, in the caller's transaction: can the disk take a commit?"""
        self.con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_write', ?)", (str(now_ms),))

    def vacuum_step(self) -> int:
        """Give up to VACUUM_PAGES free pages back to the file system; how many are left."""
        for _ in range(VACUUM_PAGES):  # each step of the pragma frees one page; Python's sqlite3 steps once
            self.con.execute("PRAGMA incremental_vacuum(1)")
        return self.con.execute("PRAGMA freelist_count").fetchone()[0]

    def integrity_check(self) -> list[tuple]:
        return self.con.execute("PRAGMA integrity_check").fetchall()

    def vacuum_into(self, dest: str) -> None:
        """A compact, consistent copy (one read transaction: the server keeps writing)."""
        self.con.execute("VACUUM INTO ?", (dest,))

    def can_write(self) -> None:
        """Raise if this connection can't take a write lock (a read-only file or folder)."""
        self.con.execute("BEGIN IMMEDIATE")
        self.con.execute("ROLLBACK")

    # -- Meta --

    def meta_token(self, key: str) -> tuple[str, bool]:
        """A token kept in the meta table, made on first use; True if just made."""
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row:
            return row[0], False
        token = secrets.token_urlsafe(24)
        self.con.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, token))
        return token, True

    def meta_values(self, *keys: str) -> dict[str, str]:
        marks = ",".join("?" * len(keys))
        return dict(self.con.execute(f"SELECT key, value FROM meta WHERE key IN ({marks})", keys))

    def newest_click_id(self) -> bytes | None:
        row = self.con.execute("SELECT id FROM clicks ORDER BY id DESC LIMIT 1").fetchone()
        return row and row[0]

    def campaigns_with_clicks(self, other_than: str, limit: int) -> list[str]:
        rows = self.con.execute(
            "SELECT DISTINCT campaign FROM daily_clicks WHERE campaign != ? LIMIT ?", (other_than, limit)
        )
        return [row[0] for row in rows]

    def table_counts(self, *tables: str) -> dict[str, int]:
        return {table: self.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in tables}

    # -- Clicks --

    @staticmethod
    @cache
    def insert_other_click_sql(wide: bool) -> str:
        """INSERT_CLICK (or INSERT_WIDE_CLICK) with sub1_other bound last: a batch with
        clicks whose sub1 the totals fold into OTHER_SUB1."""
        columns = CLICK_COLUMNS + (", flags, uid, ad_ids" if wide else "") + ", sub1_other"
        extra = f", {NULL_IF_NONE}" * 3 if wide else ""
        return f"INSERT INTO clicks ({columns}) VALUES ({CLICK_VALUES}{extra}, ?)"

    @staticmethod
    @cache
    def add_daily_clicks_sql(extra: tuple[str, ...] = ()) -> str:
        """The upsert of a batch's daily_clicks rows: clicks, bot_clicks, unique_clicks, and
        the `extra` counts the batch has (lander_clicks, flagged_clicks): a column a batch
        has nothing for is not bound (most batches: none)."""
        columns = ("clicks", "bot_clicks", "unique_clicks", *extra)
        return f"""INSERT INTO daily_clicks (day, campaign, sub1, {", ".join(columns)})
                   VALUES (?, ?, ?, {", ".join("?" * len(columns))})
                   ON CONFLICT DO UPDATE SET {", ".join(f"{c} = {c} + excluded.{c}" for c in columns)}"""

    def _insert_click_rows(self, rows: Sequence[tuple], other: set, *, wide: bool) -> None:
        if not rows:
            return
        if other:
            rows = [(*row, 1 if (row[1] // DAY_MS, row[2], row[3] or "") in other else None) for row in rows]
            self.con.executemany(self.insert_other_click_sql(wide), rows)
        else:  # as plain tuples: the sqlite3 module reads a tuple subclass's items the slow way (~6k instructions)
            self.con.executemany(INSERT_WIDE_CLICK if wide else INSERT_CLICK, map(tuple, rows))

    def insert_clicks(self, rows: Sequence[ClickRow | WideClickRow], sub1_per_day: int | None = None) -> None:
        """Insert clicks and add them to the daily totals. With ``sub1_per_day``, a
        campaign-day's sub1 beyond that many are totalled as OTHER_SUB1 (clicks are
        unauthenticated: one address could otherwise add a totals row per click, kept
        for good); the click keeps that decision, so its conversions follow it."""
        # The day's totals, once per (day, campaign, sub1) in the batch rather than a
        # trigger per row: a batch of clicks has few distinct keys.
        # Counter counts a big batch in C; the other counts are plain dicts (defaultdict): a
        # batch is often one click, and each Counter() costs ~1 us to make.
        totals = Counter((row[1] // DAY_MS, row[2], row[3] or "", row[11]) for row in rows)
        other = set()
        if sub1_per_day is not None:
            folded: defaultdict = defaultdict(int)
            for (day, campaign, sub1, bot), n in totals.items():
                named = self._total_sub1(day, campaign, sub1, sub1_per_day)
                if named != sub1:
                    other.add((day, campaign, sub1))
                folded[day, campaign, named, bot] += n
            totals = folded
        # Per totals row: its unique clicks, and its costs (one pass; this runs per click).
        # Before the insert: a day's keys read from its clicks must not find these.
        unique: defaultdict = defaultdict(int)
        landed: defaultdict = defaultdict(int)  # human clicks sent to a lander
        flagged: defaultdict = defaultdict(int)  # human clicks with flags
        wide_rows = []
        costs: defaultdict = defaultdict(int)
        funnel: dict[tuple, list[int]] = {}  # (day, campaign, lander, offer) -> [humans, bots, unique, flagged]
        slots: dict[tuple, list[int]] = {}  # (slot, campaign) -> [humans, bots, unique, sent to a lander, flagged]
        slot_costs: defaultdict = defaultdict(int)
        day, keys = -1, set()
        for row in rows:
            if row[1] // DAY_MS != day:
                day = row[1] // DAY_MS
                keys = self.unique_keys(day)
            slot = slots.get((row[1] // SLOT_MS, row[2]))
            if slot is None:
                slot = slots[row[1] // SLOT_MS, row[2]] = [0, 0, 0, 0, 0]
            slot[1 if row[11] else 0] += 1
            first = False
            if not row[11]:
                key = hash((row[2], row[9], row[10]))  # the set lives in this process: its hash will do
                if key not in keys and self._first_seen(day, keys, key, row):
                    first = True
                    slot[2] += 1
                    sub1 = row[3] or ""
                    unique[day, row[2], OTHER_SUB1 if other and (day, row[2], sub1) in other else sub1] += 1
            if row[13]:  # a cost_currency: the click has a cost
                sub1 = row[3] or ""
                costs[
                    day, row[2], OTHER_SUB1 if other and (day, row[2], sub1) in other else sub1, "clicks", row[13]
                ] += row[12]
                slot_costs[row[1] // SLOT_MS, row[2], row[13]] += row[12]
            if len(row) > 16:  # a WideClickRow
                wide_rows.append(row)
                if not row[11] and row[16] != NO_TEXT:  # flagged
                    slot[4] += 1
                    sub1 = row[3] or ""
                    flagged[day, row[2], OTHER_SUB1 if other and (day, row[2], sub1) in other else sub1] += 1
            if row[15] != NO_TEXT:  # a click of a campaign with landers or offers
                lander = "" if row[14] == NO_TEXT else row[14]
                counts = funnel.setdefault((day, row[2], lander, row[15]), [0, 0, 0, 0])
                counts[1 if row[11] else 0] += 1
                counts[2] += first
                counts[3] += len(row) > 16 and not row[11] and row[16] != NO_TEXT
                if lander and not row[11]:
                    slot[3] += 1
                    sub1 = row[3] or ""
                    landed[day, row[2], OTHER_SUB1 if other and (day, row[2], sub1) in other else sub1] += 1
        if wide_rows:
            self._insert_click_rows([row for row in rows if len(row) == 16], other, wide=False)
            self._insert_click_rows(wide_rows, other, wide=True)
        else:
            self._insert_click_rows(rows, other, wide=False)
        if landed or flagged:
            extra = [(name, n) for name, n in (("lander_clicks", landed), ("flagged_clicks", flagged)) if n]
            counts = [n for _, n in extra]
            self.con.executemany(
                self.add_daily_clicks_sql(tuple(name for name, _ in extra)),
                [
                    (
                        day,
                        c,
                        s,
                        0 if bot else n,
                        n if bot else 0,
                        0 if bot else unique.get((day, c, s), 0),
                        *(0 if bot else count.get((day, c, s), 0) for count in counts),
                    )
                    for (day, c, s, bot), n in totals.items()
                ],
            )
        else:  # most batches: clicks, bots and unique clicks
            self.con.executemany(
                ADD_DAILY_CLICKS,
                [
                    (day, c, s, 0, n, 0) if bot else (day, c, s, n, 0, unique.get((day, c, s), 0))
                    for (day, c, s, bot), n in totals.items()
                ],
            )
        self.con.executemany(ADD_SLOT_CLICKS, [(*key, *counts) for key, counts in slots.items()])
        if funnel:
            self.con.executemany(ADD_FUNNEL_CLICKS, [(*key, *counts, 0) for key, counts in funnel.items()])
        if costs:
            self.con.executemany(ADD_DAILY_COSTS, [(*key, cost) for key, cost in costs.items()])
            self.con.executemany(ADD_SLOT_COSTS, [(*key, cost) for key, cost in slot_costs.items()])

    def lp_click(
        self, lp: LPClick, now_ms: int, counts: LPCounts, sub1_per_day: int | None = None
    ) -> tuple[Arm, bytes, dict] | None:
        """Store an LP click, in the caller's transaction: the offer it goes to, the click
        it is of, and that click's lander, sub ids and ext_id (for the offer's macros);
        None, and nothing stored, if lp.click_id names no click of the campaign and
        there is no lp.new (else lp.new is stored, flagged no_click_id).

        A click's first LP click is counted (lp_clicks, by the click's day; into `counts`,
        which add_lp_counts adds to the totals once per batch). A later one that goes to
        another offer moves the click's credit, and its LP click in the funnel totals,
        to that offer: an LP click counts where its conversions do. A bot's LP click (a
        link scanner on the lander) changes nothing."""
        campaign = lp.campaign
        row = lp.click_id and self.con.execute(LP_CLICK_SELECT, (bytearray(lp.click_id),)).fetchone()
        click_id = lp.click_id
        if not row and click_id and self._test_step(click_id, "lp_at = coalesce(lp_at, ?)", now_ms):
            return campaign.offers.choose(lp.named, None, lp.pick), click_id, {}  # selftest's: nothing counted
        if not row or row[1] != campaign.name:
            if lp.new is None:
                return None
            self.insert_clicks([lp.new], sub1_per_day)
            click_id, row = bytes(lp.new[0]), self.con.execute(LP_CLICK_SELECT, (lp.new[0],)).fetchone()
        elif lp.bot:
            return campaign.offers.choose(lp.named, row[5], lp.pick), click_id, lp_click_facts(row)
        ts, _, other, bot, lp_at, offer, lander, sub1 = row[:8]
        arm = campaign.offers.choose(lp.named, offer, lp.pick)
        # Clicks stored with names (their campaign had landers or offers) are in the
        # funnel totals; others (a plain `url`'s, "default") keep naming none.
        stored = None if offer is None else arm.name
        day, counted = ts // DAY_MS, not bot
        if lp_at is None:
            self.con.execute("UPDATE clicks SET lp_at = ?, offer = ? WHERE id = ?", (now_ms, stored, click_id))
            if counted:
                key = (day, campaign.name, OTHER_SUB1 if other else sub1 or "")
                counts.daily[key] += 1
                counts.slots[ts // SLOT_MS, campaign.name, bool(lander)] += 1
                if lander:
                    counts.landed[key] += 1
                if stored is not None:
                    counts.funnel[day, campaign.name, lander or "", stored] += 1
        elif stored != offer:
            self.con.execute("UPDATE clicks SET offer = ? WHERE id = ?", (stored, click_id))
            if counted:
                counts.funnel[day, campaign.name, lander or "", offer] -= 1
                counts.funnel[day, campaign.name, lander or "", stored] += 1
        return arm, click_id, lp_click_facts(row)

    def add_lp_counts(self, counts: LPCounts) -> None:
        """A batch's LP clicks into the totals: a statement per totals row, not per LP click."""
        self.con.executemany(
            """UPDATE daily_clicks SET lp_clicks = lp_clicks + ?, lander_lp_clicks = lander_lp_clicks + ?
               WHERE day = ? AND campaign = ? AND sub1 = ?""",
            [(n, counts.landed[key], *key) for key, n in counts.daily.items()],
        )
        self.con.executemany(ADD_FUNNEL_CLICKS, [(*key, 0, 0, 0, 0, n) for key, n in counts.funnel.items() if n])
        self.con.executemany(
            """UPDATE slot_clicks SET lp_clicks = lp_clicks + ?, lander_lp_clicks = lander_lp_clicks + ?
               WHERE slot = ? AND campaign = ?""",
            [(n, n if landed else 0, slot, campaign) for (slot, campaign, landed), n in counts.slots.items()],
        )

    def _first_seen(self, day: int, keys: set[int], key: int, row: Sequence) -> bool:
        """A human click whose key is not in the day's set: the first of its (campaign,
        address, User-Agent) that day, unless the set is full and click_uniques knew it."""
        if len(keys) < UNIQUE_MEMORY_KEYS:
            keys.add(key)
            self._unique_added.append((day, key))
            return True
        return self.con.execute(INSERT_UNIQUE, (day, click_key(row[2], row[9], row[10]))).rowcount == 1

    def unique_keys(self, day: int) -> set[int]:
        """The set of a day's human-click keys, hash((campaign, ip, ua)); read from the
        day's clicks when first asked (in the order they came, so after a restart it
        holds what it held before). The server asks as it opens; at midnight the new
        day has no clicks to read yet. No read on the click's path, so."""
        keys = self._unique_keys.get(day)
        return keys if keys is not None else self._load_unique_keys(day)

    def _load_unique_keys(self, day: int) -> set[int]:
        """A day's keys from its stored human clicks, in the order they came (so after a
        restart the set holds what it held before). The server does this as it opens;
        at midnight the new day has no clicks to read yet."""
        while len(self._unique_keys) >= UNIQUE_DAYS:  # the day loaded longest ago goes; read again if asked
            del self._unique_keys[next(iter(self._unique_keys))]
        keys = self._unique_keys[day] = set()
        rows = self.con.execute(
            "SELECT campaign, ip, ua FROM clicks WHERE id >= ? AND id < ? AND bot = 0 ORDER BY id",
            (uuid_floor(day * DAY_MS), uuid_floor((day + 1) * DAY_MS)),
        )
        for campaign, ip, user_agent in rows:
            keys.add(hash((campaign, ip, user_agent)))
            if len(keys) == UNIQUE_MEMORY_KEYS:
                break
        return keys

    def _total_sub1(self, day: int, campaign: str, sub1: str, cap: int) -> str:
        seen = self._sub1_in_totals(day, campaign)
        if sub1 in seen:
            return sub1
        if len(seen) - (OTHER_SUB1 in seen) >= cap:
            seen.add(OTHER_SUB1)
            return OTHER_SUB1
        seen.add(sub1)
        return sub1

    def _sub1_in_totals(self, day: int, campaign: str) -> set[str]:
        seen = self._sub1_seen.get((day, campaign))
        if seen is None:
            rows = self.con.execute("SELECT sub1 FROM daily_clicks WHERE day = ? AND campaign = ?", (day, campaign))
            seen = self._sub1_seen[day, campaign] = {row[0] for row in rows}
        return seen

    # -- Postbacks --

    def apply_postback(
        self, pb: Postback, now_ms: int, policy: WritePolicy, *, by_click: bool = False
    ) -> PostbackOutcome:
        """Match, dedupe and store a postback, in the caller's transaction: an orphan,
        a new conversion, a duplicate, or a status change; forwards queued with it.
        Without a click id, or under [attribution] mode = "priority", the user's touches
        decide (see _apply_by_user); else (`by_click`) its click does. A pixel's (pb.source)
        counts only for a known click of a campaign the pixel is on for."""
        if pb.source is not None and not by_click:  # a pixel's or a report's: of a known click, never an orphan
            known = self.con.execute("SELECT campaign FROM clicks WHERE id = ?", (bytearray(pb.click_id),)).fetchone()
            if known is None:
                return PostbackOutcome(PostbackResult.IGNORED, reason="no such click")
            campaign = policy.campaigns.get(known[0])
            if pb.source == PIXEL and not (policy.pixel or (campaign is not None and campaign.pixel)):
                return PostbackOutcome(
                    PostbackResult.IGNORED, reason="the pixel is off for this campaign", campaign=known[0]
                )
        if not by_click and (pb.click_id is None or policy.attribution.mode == "priority"):
            return self._apply_by_user(pb, now_ms, policy)
        row = self.con.execute(CLICK_FOR_POSTBACK, (bytearray(pb.click_id),)).fetchone()
        uid = pb.user_id or (row and row[16])
        if uid is not None and pb.txid:  # the order may be stored already under the user's key or another click
            existing = self._find_conversion(pb) or self._same_order(pb, uid)
            if existing is not None:
                return self._existing_conversion(pb, existing, now_ms, policy)
        if row is None:
            if pb.source is None and self._test_step(pb.click_id, "converted_at = ?, txid = ?", now_ms, pb.txid):
                return PostbackOutcome(PostbackResult.CREATED, 0, campaign="(selftest)")  # never counted nor forwarded
            return self._record_orphan(pb, now_ms)
        click, sub1_total, click_cost = ClickFacts(*row[:8], *row[11:13]), OTHER_SUB1 if row[8] else None, row[9:11]
        ts = pb.ts_ms
        if ts < click.ts:
            if pb.ts_given and click.ts - ts > EARLY_TS_TOLERANCE_MS:
                problem = f"ts: is before its click ({iso_ms(click.ts)}), got {iso_ms(ts)}"
                return PostbackOutcome(PostbackResult.INVALID, reason=problem, campaign=click.campaign)
            ts = click.ts  # clock skew (the sender's, or ours stepped back): never dated before its click
        created = self._new_conversion(
            pb, click, sub1_total, click_cost, row[13:16], ts, now_ms, policy, ad_ids=row[17]
        )
        if created is not None:
            return created
        return self._existing_conversion(pb, self._find_conversion(pb), now_ms, policy)

    def _same_order(self, pb: Postback, uid: str) -> StoredConversion | None:
        """An order (its txid) of this user's stored under another key than pb's: the
        user's own (a user id alone) or one of the user's latest clicks'."""
        key = self.user_key(uid)
        if pb.click_id != key:
            found = self._stored_conversion("click_id = ? AND dedupe_key = ?", (key, pb.dedupe_key))
            if found is not None:
                return found
        return self._stored_conversion(
            """dedupe_key = ? AND click_id IN (SELECT id FROM clicks WHERE uid = ? ORDER BY ts DESC LIMIT ?)
               AND click_id != ?""",
            (pb.dedupe_key, uid, MAX_CANDIDATES, pb.click_id),
        )

    def _existing_conversion(
        self, pb: Postback, existing: StoredConversion, now_ms: int, policy: WritePolicy
    ) -> PostbackOutcome:
        """A postback for a conversion already stored: held, rejected, the same, or a new
        status, told as the conversion was credited (its campaign and sub1, whichever
        click or user the postback names)."""
        click = stored_click_facts(existing)
        if pb.source == PIXEL:  # a pixel changes nothing stored: the network's word (or the first pixel's) stands
            return PostbackOutcome(PostbackResult.DUPLICATE, existing.id, campaign=click.campaign)
        confirms = existing.source == PIXEL  # the first postback (or import) for a conversion the pixel reported
        if confirms and existing.reason != RejectReason.HELD.value:
            if existing.reason is None:
                return self._confirm(pb, click, existing, now_ms, policy)
            self._confirmed(existing.id, pb, now_ms)  # stays rejected: it was out of its window, or fraud
        if existing.reason == RejectReason.HELD.value:  # the operator decides (see review); the network's word is kept
            if not confirms:
                return self._network_word(pb, existing, now_ms, click.campaign)
            outcome = self._network_word(dataclasses.replace(pb, payout_given=True), existing, now_ms, click.campaign)
            self._confirmed(existing.id, pb, now_ms)
            return outcome
        if existing.reason is not None:
            return PostbackOutcome(PostbackResult.REJECTED, existing.id, existing.reason, click.campaign)
        if existing.status != pb.status:
            return self._change_status(pb, click, existing, now_ms, policy)
        if pb.source == IMPORT and (existing.payout, existing.currency) != (pb.payout, pb.currency):
            # a report's other amount corrects it; a source hears it only if it has heard nothing yet
            return self._change_status(pb, click, existing, now_ms, policy, resend=self._replace_unsent(existing.id))
        return PostbackOutcome(PostbackResult.DUPLICATE, existing.id, campaign=click.campaign)

    def _confirm(
        self, pb: Postback, click: ClickFacts, pixel: StoredConversion, now_ms: int, policy: WritePolicy
    ) -> PostbackOutcome:
        """The network's first postback for a conversion only the pixel reported: its word
        wins, as if the pixel had never come (its event, status, payout and currency; 0 if
        it gives no payout). A forward of the pixel's status no try has sent yet is
        replaced by one of these facts; one already sent is followed only by news (a new
        status), as for any postback."""
        if pb.event != pixel.facts.event:  # one txid, another event: the page named it wrong, or not at all
            self.con.execute("UPDATE conversions SET event = ? WHERE id = ?", (pb.event, pixel.id))
            pixel = pixel._replace(facts=pixel.facts._replace(event=pb.event))
        return self._change_status(
            dataclasses.replace(pb, payout_given=True),
            click,
            pixel,
            now_ms,
            policy,
            resend=self._replace_unsent(pixel.id),
        )

    def _replace_unsent(self, conversion_id: int) -> bool:
        """Cancel a conversion's deliveries no try has sent yet (their facts are outdated);
        whether there were any, to be queued again with the new facts."""
        return bool(
            self.con.execute(
                """UPDATE outbox SET state = 'canceled', last_error = 'replaced: newer facts were queued'
                   WHERE conversion_id = ? AND state = 'pending' AND attempts = 0""",
                (conversion_id,),
            ).rowcount
        )

    def _confirmed(self, conversion_id: int, pb: Postback, now_ms: int) -> None:
        """A held or rejected pixel conversion a postback confirms: its source is now the
        network, and its history says so (its status is the review's to set, or stays rejected)."""
        self.con.execute(
            "UPDATE conversions SET source = ?, ip = ?, updated_at = ? WHERE id = ?",
            (pb.source, pb.ip, now_ms, conversion_id),
        )
        self.con.execute(
            """INSERT INTO conversion_history (conversion_id, at, status, payout, currency, ip, source)
               SELECT id, ?, status, payout, currency, ?, source FROM conversions WHERE id = ?""",
            (now_ms, pb.ip, conversion_id),
        )

    def _apply_by_user(self, pb: Postback, now_ms: int, policy: WritePolicy) -> PostbackOutcome:
        """A postback credited by its user's touches: its user_id's (or, under mode
        "priority", its click's uid), decided by attribute() once, when it is new, and
        stored with the decision. Keyed by the user (user_key) and its txid or event, so
        one order is one conversion whichever click id or user id each postback for it
        names, and a retry or a later status finds it whoever would be credited by then."""
        given, ts = None, pb.ts_ms
        if pb.click_id is not None:
            given = self.con.execute(
                "SELECT id, ts, campaign, uid FROM clicks WHERE id = ?", (bytearray(pb.click_id),)
            ).fetchone()
        uid = pb.user_id or (given and given[3])
        if uid is None:  # a click id and no user to weigh: its click decides, as in mode "click"
            return self.apply_postback(pb, now_ms, policy, by_click=True)
        if given is not None and ts < given[1]:  # as the click path: clock skew, or a ts before its click
            if pb.ts_given and given[1] - ts > EARLY_TS_TOLERANCE_MS:
                problem = f"ts: is before its click ({iso_ms(given[1])}), got {iso_ms(ts)}"
                return PostbackOutcome(PostbackResult.INVALID, reason=problem, campaign=given[2])
            ts = given[1]
        # Keyed by its click id, else by the user; the same order (txid) under another is that one.
        keyed = dataclasses.replace(pb, click_id=pb.click_id or self.user_key(uid), ts_ms=ts)
        existing = self._find_conversion(keyed) or (self._same_order(keyed, uid) if pb.txid else None)
        if existing is not None:
            return self._existing_conversion(keyed, existing, now_ms, policy)
        touches = self.user_touches(uid, ts, policy)
        if given is not None and not any(t.kind == "click" and t.id == format_uuid(given[0]) for t in touches):
            touches += self.candidates("click", [(given[0], given[2], given[1], None)], ts, policy)  # without the uid
        decision = attribute(touches, ts, policy.attribution)
        winner = decision.winner
        row = None
        if winner is not None and winner.kind == "click":
            row = self.con.execute(CLICK_FOR_POSTBACK, (bytearray(parse_click_id(winner.id)),)).fetchone()
        if row is not None:
            click, sub1_total, click_cost = ClickFacts(*row[:8], *row[11:13]), OTHER_SUB1 if row[8] else None, row[9:11]
            suspect, credited = row[13:16], parse_click_id(winner.id)
        else:  # a touch, or nobody: no click's facts to copy
            click = ClickFacts(winner.ts if winner else ts, decision.campaign, *(None,) * 6, None, None)
            sub1_total, click_cost, suspect, credited = None, (None, None), (0, None, None), b""
        user = (uid, orjson.dumps(decision.view()).decode(), credited)
        ad_ids = row[17] if row is not None else None
        created = self._new_conversion(
            keyed, click, sub1_total, click_cost, suspect, ts, now_ms, policy, user, ad_ids=ad_ids
        )
        if created is not None:
            return created
        return self._existing_conversion(keyed, self._find_conversion(keyed), now_ms, policy)

    def user_touches(self, uid: str, ts: int, policy: WritePolicy) -> list[Touch]:
        """A user's candidates for a conversion at `ts`: their human clicks (by uid) and
        their touches in the attribution window, the latest MAX_CANDIDATES of each (clicks
        are unauthenticated: a flood of clicks naming a user must not stall the writer);
        one indexed read each."""
        since = ts - policy.attribution.window_days * DAY_MS
        clicks = self.con.execute(
            """SELECT id, campaign, ts, NULL FROM clicks WHERE uid = ? AND ts >= ? AND ts <= ? AND bot = 0
               ORDER BY ts DESC LIMIT ?""",
            (uid, since, ts, MAX_CANDIDATES),
        )
        touches = self.con.execute(
            """SELECT id, campaign, ts, channel FROM touches WHERE uid = ? AND ts >= ? AND ts <= ?
               ORDER BY ts DESC LIMIT ?""",
            (uid, since, ts, MAX_CANDIDATES),
        )
        return self.candidates("click", clicks, ts, policy) + self.candidates("touch", touches, ts, policy)

    @staticmethod
    def candidates(kind: str, rows: Iterable[tuple], ts: int, policy: WritePolicy) -> list[Touch]:
        """Clicks or touches (id, campaign, ts, channel) as candidates for a conversion at
        `ts`; a click's channel is its campaign's as configured now ("paid", the default,
        for one no longer configured); any past its campaign's own window_days is left
        out (its conversion would be rejected)."""
        found = []
        for ident, name, at, channel in rows:
            campaign = policy.campaigns.get(name)
            if campaign is not None and campaign.window_days is not None and ts - at > campaign.window_days * DAY_MS:
                continue
            channel = channel or (campaign.channel if campaign else "paid")
            found.append(Touch(kind, format_uuid(ident) if kind == "click" else str(ident), channel, name, at))
        return found

    def user_key(self, uid: str) -> bytes:
        """What a conversion credited by the matrix is keyed by in place of a click id:
        21 bytes (no click id has that many), the uid keyed-hashed with this database's
        own secret, so the key outlives pii_days without keeping the uid, nor letting one
        be guessed back from it."""
        if self._user_secret is None:
            self.con.execute(  # made by schema 7; made here if a copy lacks it (then written with the caller's)
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('user_key_secret', hex(randomblob(32)))"
            )
            row = self.con.execute("SELECT value FROM meta WHERE key = 'user_key_secret'").fetchone()
            self._user_secret = bytes.fromhex(row[0])
        return b"user:" + hmac.digest(self._user_secret, uid.encode(), "sha256")[:16]

    def add_touch(self, touch: NewTouch, now_ms: int) -> tuple[str, int]:
        """Store a touch: ("created", id), or ("duplicate", id) for one of the same user,
        campaign and second."""
        row = self.con.execute(
            "INSERT INTO touches (uid, channel, campaign, ts, created_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING RETURNING id",
            (*touch, now_ms),
        ).fetchone()
        if row is not None:
            return "created", row[0]
        row = self.con.execute(
            "SELECT id FROM touches WHERE uid = ? AND campaign = ? AND ts / 1000 = ? / 1000",
            (touch.uid, touch.campaign, touch.ts),
        ).fetchone()
        return "duplicate", row[0]

    # -- Forgetting a person (tinytrack forget) --

    def forget_user(self, uid: str, limit: int, dry_run: bool = False) -> Counter:
        """One batch of erasing a user: their clicks (by uid) and touches deleted, and the
        personal fields of their conversions blanked (see _blank_conversions). Counts of
        what it did; nothing left to do when all are 0. `dry_run`: counts all, changes nothing."""
        done: Counter = Counter()
        key = self.user_key(uid)
        if dry_run:
            ids = [row[0] for row in self.con.execute("SELECT id FROM clicks WHERE uid = ?", (uid,))]
            done["clicks deleted"] = len(ids)
            done["touches deleted"] = self.con.execute("SELECT count(*) FROM touches WHERE uid = ?", (uid,)).fetchone()[
                0
            ]
            found = {
                row[0]
                for row in self.con.execute("SELECT id FROM conversions WHERE uid = ? OR click_id = ?", (uid, key))
            }
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                found.update(
                    row[0]
                    for row in self.con.execute(
                        f"SELECT id FROM conversions WHERE click_id IN ({', '.join('?' * len(chunk))})", chunk
                    )
                )
            done["conversions blanked"] = len(found)
            done["refused postbacks deleted"] = self.con.execute(
                "SELECT count(*) FROM quarantine WHERE json_extract(fields, '$.user_id') = ?", (uid,)
            ).fetchone()[0]
            return done
        ids = [row[0] for row in self.con.execute("SELECT id FROM clicks WHERE uid = ? LIMIT ?", (uid, limit))]
        done["conversions blanked"] += self._blank_conversions(ids)
        done["clicks deleted"] = self._delete_clicks(ids)
        done["touches deleted"] = self.con.execute(
            "DELETE FROM touches WHERE id IN (SELECT id FROM touches WHERE uid = ? LIMIT ?)", (uid, limit)
        ).rowcount
        conversions = [
            row[0]
            for row in self.con.execute(
                "SELECT id FROM conversions WHERE uid = ? OR click_id = ? LIMIT ?", (uid, key, limit)
            )
        ]
        done["conversions blanked"] += self._blank_conversions((), conversions)
        done["refused postbacks deleted"] = self.con.execute(  # a scan of at most QUARANTINE_ROWS
            """DELETE FROM quarantine WHERE id IN (
                   SELECT id FROM quarantine WHERE json_extract(fields, '$.user_id') = ? LIMIT ?)""",
            (uid, limit),
        ).rowcount
        return done

    # Where an address may be, and how forget_ip walks each table (no index by address:
    # a walk in batches, so the writer is never held for a whole table).
    FORGET_IP_WALKS = (
        ("clicks", "id", b""),
        ("conversions", "id", 0),
        ("conversion_history", "rowid", 0),
        ("orphans", "id", 0),
        ("quarantine", "id", 0),
    )

    def forget_ip(self, ip: str, table: str, after: Any, limit: int) -> tuple[Counter, Any]:
        """One batch of erasing an address from `table`: of its next `limit` rows after
        `after`, the clicks from `ip` deleted (and their conversions blanked), the
        conversions whose click or sender it was blanked, the histories' and orphans'
        copies of it dropped. Counts of what it did, and where the walk goes on (None:
        this table is done)."""
        done: Counter = Counter()
        self.con.create_function("is_address", 1, address_matcher(ip), deterministic=True)
        key = dict((name, column) for name, column, _ in self.FORGET_IP_WALKS)[table]
        end, scanned = self.con.execute(
            f"SELECT max({key}), count(*) FROM (SELECT {key} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT ?)",
            (after, limit),
        ).fetchone()
        if not scanned:
            return done, None
        span = f"{key} > ? AND {key} <= ?"
        if table == "clicks":
            ids = [
                row[0]
                for row in self.con.execute(f"SELECT id FROM clicks WHERE {span} AND is_address(ip)", (after, end))
            ]
            done["conversions blanked"] = self._blank_conversions(ids)
            done["clicks deleted"] = self._delete_clicks(ids)
        elif table == "conversions":
            ids = [
                row[0]
                for row in self.con.execute(
                    f"SELECT id FROM conversions WHERE {span} AND (is_address(click_ip) OR is_address(ip))",
                    (after, end),
                )
            ]
            done["conversions blanked"] = self._blank_conversions((), ids)
        else:
            self.con.execute(f"UPDATE {table} SET ip = NULL WHERE {span} AND is_address(ip)", (after, end))
        return done, end

    def forget_ip_due(self, ip: str) -> Counter:
        """What forget_ip would do (it reads every row: for --dry-run)."""
        done: Counter = Counter()
        self.con.create_function("is_address", 1, address_matcher(ip), deterministic=True)
        done["clicks deleted"] = self.con.execute("SELECT count(*) FROM clicks WHERE is_address(ip)").fetchone()[0]
        done["conversions blanked"] = self.con.execute(
            """SELECT count(*) FROM conversions WHERE is_address(click_ip) OR is_address(ip)
                   OR click_id IN (SELECT id FROM clicks WHERE is_address(ip))"""
        ).fetchone()[0]
        return done

    def _blank_conversions(self, click_ids: Sequence[bytes], conversion_ids: Sequence[int] = ()) -> int:
        """Blank the personal fields of conversions (those of `click_ids`, and by id): the
        user id, the click's address and ad click ids, the sender's address (also in their history), the
        touches their decision weighed (see forgotten_decision); a user's key (user_key)
        becomes a random one. Their campaign, money and status stay, as do the daily totals."""
        ids = set(conversion_ids)
        for start in range(0, len(click_ids), 500):
            chunk = click_ids[start : start + 500]
            ids.update(
                row[0]
                for row in self.con.execute(
                    f"SELECT id FROM conversions WHERE click_id IN ({', '.join('?' * len(chunk))})", chunk
                )
            )
        for cid in ids:
            (decision,) = self.con.execute("SELECT attribution FROM conversions WHERE id = ?", (cid,)).fetchone()
            if decision is not None:  # the credit stays; the person's touches (ids, times) go
                self.con.execute(
                    "UPDATE conversions SET attribution = ? WHERE id = ?", (forgotten_decision(decision), cid)
                )
            self.con.execute(
                """UPDATE conversions SET uid = NULL, click_ip = NULL, ip = NULL, ad_ids = NULL,
                       click_id = CASE WHEN length(click_id) = 21 THEN CAST(x'757365723a' || randomblob(16) AS BLOB)
                           ELSE click_id END
                   WHERE id = ?""",
                (cid,),
            )
            self.con.execute("UPDATE conversion_history SET ip = NULL WHERE conversion_id = ?", (cid,))
        return len(ids)

    def _delete_clicks(self, ids: Sequence[bytes]) -> int:
        self.con.executemany("DELETE FROM clicks WHERE id = ?", [(i,) for i in ids])
        return len(ids)

    def _record_orphan(self, pb: Postback, now_ms: int) -> PostbackOutcome:
        self.con.execute(
            """INSERT INTO orphans (click_id, dedupe_key, event, txid, status, payout, currency, ts, ip, first_seen, last_seen)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (click_id, dedupe_key) DO UPDATE SET hits = hits + 1, last_seen = excluded.last_seen,
                   status = excluded.status, payout = excluded.payout, currency = excluded.currency, ip = excluded.ip""",
            (
                format_uuid(pb.click_id),
                pb.dedupe_key,
                pb.event,
                pb.txid,
                pb.status,
                pb.payout,
                pb.currency,
                pb.ts_ms,
                pb.ip,
                now_ms,
                now_ms,
            ),
        )
        return PostbackOutcome(PostbackResult.ORPHAN)

    # -- Reports and refused postbacks (reconcile, /api/conversions/import, quarantine) --

    def report_lookup(self, pb: Postback) -> tuple[tuple | None, bool, bool, str | None, int]:
        """What is stored for a row of a network's report: its conversion (id, status,
        payout, currency, reason, source, txid, event), whether its click is known, whether
        an orphan postback has its key, why a postback for its click was quarantined (the
        latest), and (a row without txid matching none) how many conversions its click has.
        A row without txid is its click's conversion when the click has exactly one."""
        click_id = bytearray(pb.click_id)
        columns = "id, status, payout, currency, reason, source, txid, event"
        stored = self.con.execute(
            f"SELECT {columns} FROM conversions WHERE click_id = ? AND dedupe_key = ?", (click_id, pb.dedupe_key)
        ).fetchone()
        others = 0
        if stored is None and pb.txid is None:
            theirs = self.con.execute(f"SELECT {columns} FROM conversions WHERE click_id = ? LIMIT 2", (click_id,))
            theirs = theirs.fetchall()
            stored, others = (theirs[0] if len(theirs) == 1 else None), len(theirs)
        if stored is not None:
            return stored, True, False, None, 1
        known = self.con.execute("SELECT 1 FROM clicks WHERE id = ?", (click_id,)).fetchone() is not None
        text = format_uuid(pb.click_id)
        orphan = (
            self.con.execute(
                "SELECT 1 FROM orphans WHERE click_id = ? AND dedupe_key = ?", (text, pb.dedupe_key)
            ).fetchone()
            is not None
        )
        found = self.con.execute(
            "SELECT reason FROM quarantine WHERE click_id IN (?, ?) AND (txid IS ? OR ? IS NULL) ORDER BY id DESC LIMIT 1",
            (text, text.upper(), pb.txid, pb.txid),
        ).fetchone()
        return None, known, orphan, found and found[0], others

    def report_only_here(
        self, since_ms: int, until_ms: int, keys: Collection[tuple[bytes, str]], clicks: Collection[bytes] = ()
    ) -> list[tuple]:
        """Conversions stored that converted in [since, until) and are not among a report's
        keys (click id, dedupe key), nor of `clicks` (named by rows that could be any of
        theirs): id, click id, campaign, event, txid, status, payout, currency, ts."""
        rows = self.con.execute(
            """SELECT id, click_id, dedupe_key, campaign, event, txid, status, payout, currency, ts FROM conversions
               WHERE ts >= ? AND ts < ? AND length(click_id) = 16 ORDER BY ts, id""",
            (since_ms, until_ms),
        )
        return [(r[0], r[1], *r[3:]) for r in rows if (bytes(r[1]), r[2]) not in keys and bytes(r[1]) not in clicks]

    def selftest_key(self) -> str:
        """What marks tinytrack selftest's clicks (tinytrack_selftest=): random, per database."""
        row = self.con.execute("SELECT value FROM meta WHERE key = 'selftest_key'").fetchone()
        return row[0] if row else ""

    def test_click(self, click_id: bytes, ts: int, campaign: str) -> None:
        self.con.execute("INSERT INTO selftest (click_id, ts, campaign) VALUES (?, ?, ?)", (click_id, ts, campaign))

    def _test_step(self, click_id: bytes, assignments: str, *args: Any) -> bool:
        """A selftest click's LP click or postback, stored on its row; False if it is none
        (asked only where a click was not found: no cost to real ones)."""
        return bool(
            self.con.execute(f"UPDATE selftest SET {assignments} WHERE click_id = ?", (*args, click_id)).rowcount
        )

    def test_steps(self, click_id: bytes) -> tuple | None:
        """What the server stored of a selftest click: ts, campaign, lp_at, converted_at, txid."""
        return self.con.execute(
            "SELECT ts, campaign, lp_at, converted_at, txid FROM selftest WHERE click_id = ?", (click_id,)
        ).fetchone()

    def latest_test_click(self, campaign: str, since_ms: int) -> bytes | None:
        """The newest selftest click of a campaign stored since a time (its id)."""
        row = self.con.execute(
            "SELECT click_id FROM selftest WHERE campaign = ? AND ts >= ? ORDER BY ts DESC LIMIT 1",
            (campaign, since_ms),
        ).fetchone()
        return row and bytes(row[0])

    def forget_test(self, click_id: bytes) -> None:
        self.con.execute("DELETE FROM selftest WHERE click_id = ?", (click_id,))

    def quarantine_postback(self, fields: Mapping[str, str], reason: str, ip: str, now_ms: int) -> int:
        """Keep a refused postback (a valid token, a 400) with its reason; the oldest beyond
        QUARANTINE_ROWS go. Its id."""
        kept = {name: strip_controls(value, MAX_VALUE_CHARS) for name, value in fields.items() if name != "token"}
        row = self.con.execute(
            "INSERT INTO quarantine (at, reason, fields, click_id, txid, ip) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (now_ms, reason, orjson.dumps(kept).decode(), kept.get("click_id"), kept.get("txid"), ip),
        ).fetchone()
        self.con.execute("DELETE FROM quarantine WHERE id <= ?", (row[0] - QUARANTINE_ROWS,))
        return row[0]

    def quarantined(self, since_ms: int, after_id: int, limit: int) -> list[dict]:
        """Refused postbacks, oldest first."""
        rows = self.con.execute(
            "SELECT id, at, reason, fields, ip FROM quarantine WHERE id > ? AND at >= ? ORDER BY id LIMIT ?",
            (after_id, since_ms, limit),
        )
        return [
            {"id": i, "at": iso_ms(at), "reason": reason, "fields": orjson.loads(fields), "ip": ip}
            for i, at, reason, fields, ip in rows
        ]

    def latest_quarantined(self, limit: int) -> list[tuple]:
        """The newest refused postbacks: id, at, reason, fields (JSON)."""
        return self.con.execute(
            "SELECT id, at, reason, fields FROM quarantine ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()

    def _find_conversion(self, pb: Postback) -> StoredConversion | None:
        return self._stored_conversion("click_id = ? AND dedupe_key = ?", (pb.click_id, pb.dedupe_key))

    def _stored_conversion(self, where: str, args: tuple) -> StoredConversion | None:
        row = self.con.execute(
            f"""SELECT id, status, reason, ts / 86400000, payout, currency, sub1_total, cost_model, cost_currency,
                       click_id, campaign, sub1, sub2, sub3, sub4, sub5, ext_id, event, txid, cost, lander, offer,
                       ad_ids, attribution IS NOT NULL, credited_click, source
                FROM conversions WHERE {where}""",
            args,
        ).fetchone()
        if row is None:
            return None
        return StoredConversion(*row[:9], forward_facts(row[9:23], row[23], row[24]), row[25])

    def _network_word(self, pb: Postback, held: StoredConversion, now_ms: int, campaign: str) -> PostbackOutcome:
        """A postback for a held conversion: it stays held (pending, not forwarded), and what
        the network now says is kept for the review (network_status, and its payout if given)."""
        changed = self.con.execute(
            """UPDATE conversions SET network_status = ?, updated_at = ?, source = ?,
                   payout = CASE WHEN ? THEN ? ELSE payout END, currency = CASE WHEN ? THEN ? ELSE currency END
               WHERE id = ? AND (network_status IS NOT ? OR source IS 'pixel' OR (? AND (payout != ? OR currency != ?)))""",
            (
                pb.status,
                now_ms,
                pb.source,
                pb.payout_given,
                pb.payout,
                pb.payout_given,
                pb.currency,
                held.id,
                pb.status,
                pb.payout_given,
                pb.payout,
                pb.currency,
            ),
        ).rowcount
        result = PostbackResult.UPDATED if changed else PostbackResult.DUPLICATE
        return PostbackOutcome(result, held.id, campaign=campaign)

    def review(self, conversion_id: int, decision: str, now_ms: int, policy: WritePolicy) -> tuple[str, bool]:
        """An operator's decision on a held conversion, in the caller's transaction:
        approve (it takes the status the network last gave it, and is forwarded as any
        status change) or reject (rejected, reason fraud; the source never heard of it, so
        nothing is sent). (its new status, True), or (what is wrong, False): nothing
        raised, since the writer takes a raised error for a failing disk."""
        held = self._stored_conversion("id = ?", (conversion_id,))
        if held is None:
            return "no such conversion", False
        if held.reason != RejectReason.HELD.value:
            return f"not held for review (it is {held.status}{f', {held.reason}' if held.reason else ''})", False
        network = self.con.execute("SELECT network_status FROM conversions WHERE id = ?", (conversion_id,)).fetchone()[
            0
        ]
        if decision == "approve":  # a pixel's, no network has confirmed: pending until one does
            status, reason = network or ("pending" if held.source == PIXEL else "approved"), None
        else:
            status, reason = "rejected", RejectReason.FRAUD.value
        self.con.execute(
            "UPDATE conversions SET status = ?, reason = ?, network_status = NULL, updated_at = ?, ip = ? WHERE id = ?",
            (status, reason, now_ms, f"review:{decision}", conversion_id),
        )
        if decision == "approve":
            campaign = policy.campaigns.get(held.facts.campaign)
            self._forward(
                campaign, conversion_id, held.facts, status, held.payout, held.currency, now_ms, policy.forward
            )
        return status, True

    def held_conversions(self, limit: int) -> list[tuple]:
        """Conversions held for review, oldest first: id, created_at, campaign, sub1, event, payout, currency,
        flags, and what the network says it is."""
        return self.con.execute(
            """SELECT id, created_at, campaign, sub1, event, payout, currency, flags, network_status FROM conversions
               WHERE reason = 'held' ORDER BY id LIMIT ?""",
            (limit,),
        ).fetchall()

    def flag_facts(self, since_ms: int) -> list[tuple]:
        """What recomputing flags needs of each conversion created since a time and of those
        an hour before it (ip_cluster looks back an hour), in the order they converted:
        id, created_at, ts, click_ts, campaign, status, reason, flags, the click's stored flags
        (None: purged, or none), bot, its address (kept for ip_cluster, else the click's; None
        once pii_days cut it: a /24 is not the address), whether the click is kept, and whether
        it was credited to a click at all (not: by the matrix to a touch, or to nobody). The
        click is the one credited: its own, or the one the matrix chose."""
        return self.con.execute(
            """SELECT c.id, c.created_at, c.ts, c.click_ts, c.campaign, c.status, c.reason, c.flags,
                      k.flags, coalesce(k.bot, 0), coalesce(c.click_ip, CASE WHEN k.ua IS NOT NULL THEN k.ip END),
                      k.id IS NOT NULL, c.attribution IS NULL OR c.credited_click IS NOT NULL
               FROM conversions AS c
               LEFT JOIN clicks AS k ON k.id = CASE WHEN c.attribution IS NULL THEN c.click_id ELSE c.credited_click END
               WHERE c.created_at >= ? ORDER BY c.ts, c.id""",
            (since_ms - 3_600_000,),
        ).fetchall()

    def apply_flags(
        self,
        conversion_id: int,
        flags: Mapping[str, str] | None,
        campaign: Campaign | None,
        fraud: FraudConfig,
        now_ms: int,
        conf: ForwardConfig,
        *,
        reverse: bool,
        act: bool = True,
    ) -> str:
        """Store a conversion's recomputed flags and do what its campaign's action says to a
        newly flagged one, in the caller's transaction; what was done, for people. One already
        forwarded keeps its status unless `reverse` (then the source hears a rejection)."""
        old = self._stored_conversion("id = ?", (conversion_id,))
        status, reason = old.status, old.reason
        self.con.execute(
            "UPDATE conversions SET flags = ? WHERE id = ?",
            (flags and orjson.dumps(flags).decode(), conversion_id),
        )
        if not act or not flags or fraud.action == "flag" or reason is not None or status == "rejected":
            return "flags stored"
        forwarded = self.con.execute(
            "SELECT 1 FROM outbox WHERE conversion_id = ? AND attempts > 0 LIMIT 1", (conversion_id,)
        ).fetchone()
        if forwarded and not reverse:
            return f"flags stored; left {status}: already forwarded (--reverse-forwarded to {fraud.action} it)"
        if fraud.action == "hold" and not forwarded:
            self.con.execute(
                """UPDATE conversions SET network_status = status, status = 'pending', reason = 'held', updated_at = ?,
                       ip = 'recompute' WHERE id = ?""",
                (now_ms, conversion_id),
            )
            self.con.execute(
                "UPDATE outbox SET state = 'canceled', last_error = 'held for review' WHERE conversion_id = ? AND state = 'pending'",
                (conversion_id,),
            )
            return f"{status} -> held"
        # reject (or hold of one the source already heard of: only a rejection can take it back)
        self.con.execute(
            "UPDATE conversions SET status = 'rejected', reason = 'fraud', updated_at = ?, ip = 'recompute' WHERE id = ?",
            (now_ms, conversion_id),
        )
        # Deliveries not yet tried are canceled; a source that heard of it hears the rejection.
        told = self._forward(campaign, conversion_id, old.facts, "rejected", old.payout, old.currency, now_ms, conf)
        return f"{status} -> rejected (fraud)" + ("; the source is told" if told and forwarded else "")

    def _new_conversion(
        self,
        pb: Postback,
        click: ClickFacts,
        sub1_total: str | None,
        click_cost: tuple[int | None, str | None],
        suspect: tuple[int, str | None, str | None],
        ts: int,
        now_ms: int,
        policy: WritePolicy,
        user: tuple[str, str, bytes] | None = None,
        ad_ids: str | None = None,
    ) -> PostbackOutcome | None:
        """A new conversion (None if its key exists): one INSERT .. RETURNING, the usual case.
        `suspect`: its click's bot flag and flags, which it inherits (see conversion_flags),
        and its address (for ip_cluster). `user`: credited by a user's touches, its uid,
        the decision (JSON) and the credited click's id (b"": a touch's, or nobody's)."""
        campaign = policy.campaigns.get(click.campaign)
        if pb.source == PIXEL and not (policy.pixel or (campaign is not None and campaign.pixel)):
            # the matrix credited a campaign the pixel is off for
            return PostbackOutcome(
                PostbackResult.IGNORED, reason="the pixel is off for this campaign", campaign=click.campaign
            )
        late = (
            campaign is not None and campaign.window_days is not None and ts - click.ts > campaign.window_days * DAY_MS
        )
        fraud = campaign.fraud if campaign is not None else NO_FRAUD_RULES
        bot, click_flags_json, click_ip = suspect
        cluster, kept_ip = 0, None
        if fraud.ip_conversions_per_hour is not None and click_ip:
            kept_ip = click_ip
            # Counted up to one past the limit: an address with thousands costs no more to judge.
            earlier = self.con.execute(
                "SELECT count(*) FROM (SELECT 1 FROM conversions WHERE click_ip = ? AND ts > ? AND ts <= ? LIMIT ?)",
                (click_ip, ts - 3_600_000, ts, fraud.ip_conversions_per_hour),
            ).fetchone()[0]
            cluster = 1 + earlier
        flags = None
        if bot or click_flags_json or fraud.min_ctit_seconds is not None or cluster:
            ctit = ts - click.ts if user is None or user[2] else None  # a touch is no click
            flags = conversion_flags(fraud, click_flags_json, bot, ctit, cluster) or None
        reason = (
            RejectReason.OUTSIDE_WINDOW.value
            if late
            else None
            if not flags or fraud.action == "flag"
            else RejectReason.FRAUD.value
            if fraud.action == "reject"
            else RejectReason.HELD.value
        )
        status = pb.status if not reason else "pending" if reason == RejectReason.HELD.value else "rejected"
        day, sub1 = ts // DAY_MS, sub1_total or click.sub1 or ""
        if pb.payout and not self._total_has_room(day, click.campaign, sub1, status, pb.currency, pb.payout):
            if self._find_conversion(pb) is not None:
                return None  # not new: the status-change path decides
            return PostbackOutcome(
                PostbackResult.INVALID, reason=overflow_problem(click.campaign, day), campaign=click.campaign
            )
        model_cost = campaign and campaign.conversion_cost(pb.payout, pb.currency)
        (cost, cost_currency), model = (model_cost, campaign.cost_model) if model_cost else (click_cost, None)
        # NO_TEXT, '' (where no real value is empty) and -1 for none, stored as NULL: the
        # sqlite3 module binds None ~0.3 us slower (see ClickRow), and a conversion has up to ten.
        suspect = (
            ()
            if flags is None and kept_ip is None
            else (
                NO_TEXT if flags is None else orjson.dumps(flags).decode(),
                kept_ip or NO_TEXT,
                pb.status if reason == RejectReason.HELD.value and pb.source != PIXEL else NO_TEXT,
            )
        )
        row = self.con.execute(
            INSERT_CONVERSION
            if not (suspect or user or ad_ids or pb.source)
            else insert_conversion_sql(bool(suspect), user is not None, bool(ad_ids), pb.source is not None),
            (
                bytearray(pb.click_id),
                pb.dedupe_key,
                click.ts,
                click.campaign,
                *(NO_TEXT if value is None else value for value in click[2:8]),
                pb.event,
                pb.txid or "",
                status,
                reason or "",
                pb.payout,
                pb.currency,
                ts,
                now_ms,
                now_ms,
                pb.ip,
                sub1_total or "",
                -1 if cost is None else cost,
                cost_currency or "",
                model or "",
                NO_TEXT if click.lander is None else click.lander,
                NO_TEXT if click.offer is None else click.offer,
                *suspect,
                *((user[0], user[1], bytearray(user[2]) or NO_TEXT) if user else ()),
                *((ad_ids,) if ad_ids else ()),
                *((pb.source,) if pb.source else ()),
            ),
        ).fetchone()
        if row is None:
            return None
        conversion_id = row[0]
        flag_names = tuple(flags or ())
        if reason == RejectReason.HELD.value:  # the network hears "created"; nothing is forwarded
            return PostbackOutcome(PostbackResult.CREATED, conversion_id, campaign=click.campaign, flags=flag_names)
        if reason:
            return PostbackOutcome(PostbackResult.REJECTED, conversion_id, reason, click.campaign, flags=flag_names)
        credited = pb.click_id if user is None else user[2]
        facts = ForwardFacts(credited, *click[1:8], pb.event, pb.txid, cost, click.lander, click.offer, ad_ids)
        queued = self._forward(
            campaign, conversion_id, facts, pb.status, pb.payout, pb.currency, now_ms, policy.forward
        )
        return PostbackOutcome(
            PostbackResult.CREATED, conversion_id, campaign=click.campaign, queued_forward=queued, flags=flag_names
        )

    def _change_status(
        self,
        pb: Postback,
        click: ClickFacts,
        old: StoredConversion,
        now_ms: int,
        policy: WritePolicy,
        *,
        resend: bool = False,
    ) -> PostbackOutcome:
        # Without a payout it keeps the amount it was credited with.
        payout, currency = (pb.payout, pb.currency) if pb.payout_given else (old.payout, old.currency)
        sub1 = old.sub1_total or click.sub1 or ""
        if payout and not self._total_has_room(old.day, click.campaign, sub1, pb.status, currency, payout):
            return PostbackOutcome(
                PostbackResult.INVALID, reason=overflow_problem(click.campaign, old.day), campaign=click.campaign
            )
        campaign = policy.campaigns.get(click.campaign)
        cost, cost_currency = old.facts.cost, old.cost_currency
        if (
            old.cost_model == "revshare"
            and pb.payout_given
            and campaign is not None
            and campaign.cost_model == "revshare"
        ):
            cost, cost_currency = campaign.conversion_cost(
                payout, currency
            )  # the share of its new payout, at today's percent
        self.con.execute(
            """UPDATE conversions SET status = ?, updated_at = ?, ip = ?, payout = ?, currency = ?, cost = ?, cost_currency = ?,
                   source = ?
               WHERE id = ?""",
            (pb.status, now_ms, pb.ip, payout, currency, cost, cost_currency, pb.source, old.id),
        )
        facts = old.facts._replace(cost=cost)
        # A postback confirming the pixel's status is no news to a source that heard it (see _confirm).
        queued = (old.status != pb.status or resend) and self._forward(
            campaign, old.id, facts, pb.status, payout, currency, now_ms, policy.forward
        )
        return PostbackOutcome(PostbackResult.UPDATED, old.id, campaign=click.campaign, queued_forward=queued)

    def _total_has_room(self, day: int, campaign: str, sub1: str, status: str, currency: str, payout: int) -> bool:
        """Whether adding payout keeps that daily total inside a 64-bit integer (one that
        overflowed into a REAL before the payout cap stays one: reports read it)."""
        row = self.con.execute(
            "SELECT payout FROM daily_conversions WHERE day = ? AND campaign = ? AND sub1 = ? AND status = ? AND currency = ?",
            (day, campaign, sub1, status, currency),
        ).fetchone()
        return row is None or not isinstance(row[0], int) or row[0] <= MAX_SUM - payout

    def _forward(
        self,
        campaign: Campaign | None,
        conversion_id: int,
        facts: ForwardFacts,
        status: str,
        payout: int,
        currency: str,
        now_ms: int,
        conf: ForwardConfig,
    ) -> bool:
        """Queue the conversion's forwards in the same transaction, as plan_forward says
        (to postback_url, and to the campaign's json or meta_capi target); True if one was queued."""
        if not facts.click_id:  # credited by the matrix to a posted touch: no click the source could match
            return False
        plan = plan_forward(campaign, facts.event, status)
        told: set[str | None] = set()
        if plan.reversal:
            # Earlier statuses not yet delivered are not sent at all (nor retried); if the
            # source may have heard one, it now hears the reversal, its last word.
            self.con.execute(
                """UPDATE outbox SET state = 'canceled', last_error = 'the conversion was rejected before this was delivered'
                   WHERE conversion_id = ? AND state = 'pending'""",
                (conversion_id,),
            )
            told = {
                kind
                for (kind,) in self.con.execute(
                    "SELECT DISTINCT kind FROM outbox WHERE conversion_id = ? AND attempts > 0", (conversion_id,)
                )
            }
        if not (plan.forward or told):
            return False
        return bool(
            self.queue_forwards(
                campaign,
                conversion_id,
                facts,
                status,
                payout,
                currency,
                now_ms,
                conf,
                get=plan.forward or None in told,
                target=plan.forward or (campaign.target is not None and campaign.target.kind in told),
            )
        )

    def queue_forwards(
        self,
        campaign: Campaign,
        conversion_id: int,
        facts: ForwardFacts,
        status: str,
        payout: int,
        currency: str,
        now_ms: int,
        conf: ForwardConfig,
        *,
        get: bool = True,
        target: bool = True,
    ) -> int:
        """Deliveries of a conversion's status: to postback_url (`get`) and to the campaign's
        json or meta_capi target (`target`), where it has them; how many were queued. One
        credited to a posted touch (no click the source could match) is never forwarded."""
        queued = 0
        if not facts.click_id:
            return 0
        if get and campaign.postback_url is not None:
            self.queue_delivery(build_delivery(campaign, conversion_id, facts, status, payout, currency, now_ms, conf))
            queued += 1
        if target and campaign.target_hears(facts.event, status):
            row = self.con.execute(f"{CONVERSION_SELECT} WHERE id = ?", (conversion_id,)).fetchone()
            self.queue_delivery(target_delivery(campaign, conversion_view(row), row[15], facts, now_ms, conf))
            queued += 1
        return queued

    # -- Uploaded costs --

    def upload_costs(self, now_ms: int, *, rows: Sequence[CostUpload], tz: str) -> int:
        """Store a spend report whose days are in zone `tz`, in the caller's transaction:
        each row replaces what was uploaded for its key before (a whole-day row, every
        row of its campaign-day), and what it touches is totalled again: one sub1 of a
        UTC day, or the whole day where a whole-day row (or '(other)') is involved. How
        many rows replaced an earlier upload."""
        replaced = 0
        touched: dict[tuple[int, str], set[str] | None] = {}  # (UTC day, campaign) -> sub1, or None: all
        for row in rows:
            if row.sub1:  # one sub1, and no longer a whole-day row of that day
                old = self.con.execute(
                    "DELETE FROM cost_uploads WHERE campaign = ? AND day = ? AND sub1 IN (?, '') RETURNING tz, sub1",
                    (row.campaign, row.day, row.sub1),
                ).fetchall()
            else:
                old = self.con.execute(
                    "DELETE FROM cost_uploads WHERE campaign = ? AND day = ? RETURNING tz, sub1",
                    (row.campaign, row.day),
                ).fetchall()
            replaced += bool(old)
            self.con.execute(
                "INSERT INTO cost_uploads (day, campaign, sub1, tz, currency, cost, uploaded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row.day, row.campaign, row.sub1, tz, row.currency, row.cost, now_ms),
            )
            whole = not row.sub1 or any(not sub1 for _, sub1 in old)
            for zone_name in {tz, *(old_tz for old_tz, _ in old)}:
                for utc_day, _ in day_seconds(row.day, zone_name):
                    key = (utc_day, row.campaign)
                    if whole or touched.get(key, set()) is None:
                        touched[key] = None
                    else:
                        touched.setdefault(key, set()).add(row.sub1)
        for (utc_day, campaign), sub1s in sorted(touched.items(), key=lambda item: item[0]):
            self._total_uploads(utc_day, campaign, sub1s)
        return replaced

    def _total_uploads(self, utc_day: int, campaign: str, sub1s: Collection[str] | None = None) -> None:
        """Rewrite a UTC day's 'upload' costs of a campaign (only these sub1's, when the
        day has no whole-day upload and none of them counts as '(other)') from the uploads
        that cover it: a whole-day upload's share spread over that day's sub1 by clicks,
        and a 'day' row saying the uploads are the whole day's cost. A sub1 the day's
        totals count as '(other)' (past retention.sub1_per_day) is uploaded under it."""
        span = (campaign, utc_day - 1, utc_day + 1)  # a zone is at most 14 hours from UTC
        names, weights = self._click_weights(utc_day, campaign)
        if sub1s is not None:
            whole_days = self.con.execute(  # day IN (...): three lookups of the primary key
                "SELECT 1 FROM cost_uploads WHERE campaign = ? AND day IN (?, ?, ?) AND sub1 = '' LIMIT 1",
                (campaign, utc_day - 1, utc_day, utc_day + 1),
            ).fetchone()
            # '(other)' holds folded sub1s' uploads too: it is only ever totalled whole.
            folded = OTHER_SUB1 in names and (OTHER_SUB1 in sub1s or not set(names).issuperset(sub1s))
            if whole_days is None and not folded:
                return self._total_upload_sub1s(utc_day, campaign, sub1s)
        parts: Counter[tuple[str, str]] = Counter()
        whole_day = False
        uploads = self.con.execute(
            "SELECT day, sub1, tz, currency, cost FROM cost_uploads WHERE campaign = ? AND day BETWEEN ? AND ?", span
        ).fetchall()
        for day, sub1, tz, currency, cost in uploads:
            share_here = dict(utc_parts(day, tz, cost)).get(utc_day)
            if share_here is None:
                continue
            if sub1:
                folded = sub1 not in names and OTHER_SUB1 in names
                parts[OTHER_SUB1 if folded else sub1, currency] += share_here
                continue
            whole_day = True
            for name, amount in zip(names, spread(share_here, weights)):
                parts[name, currency] += amount
        self.con.execute(
            "DELETE FROM daily_costs WHERE day = ? AND campaign = ? AND source IN ('upload', 'day')",
            (utc_day, campaign),
        )
        rows = [(utc_day, campaign, sub1, "upload", currency, cost) for (sub1, currency), cost in sorted(parts.items())]
        if whole_day:
            rows.append((utc_day, campaign, "", "day", "", 0))
        self.con.executemany(
            "INSERT INTO daily_costs (day, campaign, sub1, source, currency, cost) VALUES (?, ?, ?, ?, ?, ?)", rows
        )

    def _total_upload_sub1s(self, utc_day: int, campaign: str, sub1s: Collection[str]) -> None:
        """_total_uploads for a few sub1 of a day without whole-day uploads: each from its own uploads."""
        for sub1 in sub1s:
            parts: Counter[str] = Counter()
            for day, tz, currency, cost in self.con.execute(
                "SELECT day, tz, currency, cost FROM cost_uploads WHERE campaign = ? AND day IN (?, ?, ?) AND sub1 = ?",
                (campaign, utc_day - 1, utc_day, utc_day + 1, sub1),
            ):
                share_here = dict(utc_parts(day, tz, cost)).get(utc_day)
                if share_here is not None:
                    parts[currency] += share_here
            self.con.execute(
                "DELETE FROM daily_costs WHERE day = ? AND campaign = ? AND sub1 = ? AND source = 'upload'",
                (utc_day, campaign, sub1),
            )
            self.con.executemany(
                "INSERT INTO daily_costs (day, campaign, sub1, source, currency, cost) VALUES (?, ?, ?, 'upload', ?, ?)",
                [(utc_day, campaign, sub1, currency, cost) for currency, cost in sorted(parts.items())],
            )

    def _click_weights(self, day: int, campaign: str) -> tuple[list[str], list[int]]:
        """A campaign-day's sub1 (as totalled) and their clicks, to spread a whole-day cost
        by: human clicks; with none, bot clicks; with no clicks at all, sub1 ''."""
        rows = self.con.execute(
            "SELECT sub1, clicks, bot_clicks FROM daily_clicks WHERE day = ? AND campaign = ? ORDER BY sub1",
            (day, campaign),
        ).fetchall()
        for column in (1, 2):
            if sum(row[column] for row in rows):
                return [row[0] for row in rows], [row[column] for row in rows]
        return [""], [1]

    # -- The outbox --

    def queue_delivery(self, delivery: Delivery) -> None:
        self.con.execute(
            """INSERT INTO outbox (conversion_id, campaign, status, url, idempotency_key, state, created_at, next_at, deadline,
                                   fallback_url, kind, body)
               VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)""",
            delivery,
        )

    def due_deliveries(self, now_ms: int, limit: int, offset: int = 0) -> list[DueDelivery]:
        """Pending deliveries that are due, soonest first, each with the URL to try now:
        its fallback_url once its url has failed FALLBACK_AFTER times."""
        rows = self.con.execute(
            f"""SELECT id, CASE WHEN attempts >= {FALLBACK_AFTER} AND fallback_url IS NOT NULL THEN fallback_url
                                ELSE url END,
                       idempotency_key, attempts, deadline, campaign, kind, body FROM outbox
                WHERE state = 'pending' AND next_at <= ? ORDER BY next_at, id LIMIT ? OFFSET ?""",
            (now_ms, limit, offset),
        )
        return [DueDelivery(*row) for row in rows]

    def record_attempt(
        self,
        outbox_id: int,
        attempt: Attempt,
        state: str,
        due: int,
        error: str | None,
        took_ms: int,
        now_ms: int,
        url: str | None = None,
    ) -> None:
        """One try's result, and the URL it went to. A delivery canceled meanwhile stays canceled."""
        self.con.execute(
            """UPDATE outbox SET attempts = attempts + 1, last_at = ?, last_code = ?, last_error = ?,
                   state = CASE state WHEN 'pending' THEN ? ELSE state END, next_at = ?
               WHERE id = ?""",
            (now_ms, attempt.code, error, state, due, outbox_id),
        )
        self.con.execute(
            "INSERT INTO outbox_attempts (outbox_id, at, code, error, ms, url) VALUES (?, ?, ?, ?, ?, ?)",
            (outbox_id, now_ms, attempt.code, attempt.error, took_ms, url),
        )

    def retry_deliveries(
        self, ids: Sequence[int], states: Sequence[str], now_ms: int, deadline: int
    ) -> tuple[int, list[int]]:
        """Dead, failed or canceled deliveries pending again (these ids, or every one in
        these states); how many, and which of the ids were not."""
        cursor = self.con.execute(
            f"""UPDATE outbox SET state = 'pending', next_at = ?, deadline = ?
                WHERE state IN ('dead', 'failed', 'canceled') AND (id IN ({",".join("?" * len(ids))})
                      OR state IN ({",".join("?" * len(states))}))""",
            (now_ms, deadline, *ids, *states),
        )
        pending = {
            row[0]
            for row in self.con.execute(
                f"SELECT id FROM outbox WHERE id IN ({','.join('?' * len(ids))}) AND state = 'pending'", ids
            )
        }
        return cursor.rowcount, sorted(set(ids) - pending)

    def conversions_to_replay(
        self, since_ms: int, campaigns: Collection[str]
    ) -> Iterator[tuple[int, ForwardFacts, str, int, str]]:
        """Counted conversions created since a time in these campaigns: id, facts, status, payout, currency."""
        rows = self.con.execute(
            f"""SELECT id, click_id, campaign, sub1, sub2, sub3, sub4, sub5, ext_id, event, txid, cost, lander, offer,
                       ad_ids, status, payout, currency, attribution IS NOT NULL, credited_click
                FROM conversions WHERE created_at >= ? AND reason IS NULL AND campaign IN ({",".join("?" * len(campaigns))})
                ORDER BY id""",
            (since_ms, *campaigns),
        ).fetchall()
        for conversion_id, *facts, status, payout, currency, by_matrix, credited in rows:
            yield conversion_id, forward_facts(facts, by_matrix, credited), status, payout, currency

    def deliveries(self, since_ms: int, after_id: int, limit: int, state: str | None) -> list[dict]:
        """Deliveries created since a time, oldest first."""
        sql, args = OUTBOX_SELECT + " WHERE id > ? AND created_at >= ?", [after_id, since_ms]
        if state is not None:
            sql, args = sql + " AND state = ?", [*args, state]
        return [outbox_dict(row) for row in self.con.execute(sql + " ORDER BY id LIMIT ?", (*args, limit))]

    def latest_deliveries(self, state: str | None, limit: int) -> list[dict]:
        """The newest deliveries (in a state), oldest of them first."""
        sql, args = OUTBOX_SELECT, []
        if state:
            sql, args = sql + " WHERE state = ?", [state]
        rows = self.con.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [outbox_dict(row) for row in reversed(rows)]

    def delivery(self, outbox_id: int) -> dict | None:
        row = self.con.execute(OUTBOX_SELECT + " WHERE id = ?", (outbox_id,)).fetchone()
        return row and outbox_dict(row)

    def attempts(self, outbox_id: int) -> list[dict]:
        rows = self.con.execute(
            """SELECT a.at, a.code, a.error, a.ms, a.url, o.campaign FROM outbox_attempts AS a
               JOIN outbox AS o ON o.id = a.outbox_id WHERE a.outbox_id = ? ORDER BY a.at, a.rowid""",
            (outbox_id,),
        )
        return [
            {
                "at": iso_ms(at),
                "code": code,
                "error": error,
                "ms": ms,
                "url": redact_url(url) if campaign != ALERTS else url and hidden_path(url),
            }
            for at, code, error, ms, url, campaign in rows
        ]

    def meta_user_data(self, outbox_id: int) -> dict[str, str]:
        """Meta's user_data of a delivery's conversion, from what is kept as it is sent: fbc
        (its click's fbclid, until clicks_days or forget), the visitor's address and user
        agent (until pii_days cuts them) and the site's user id, hashed (SHA-256, as Meta
        asks of external_id)."""
        row = self.con.execute(
            """SELECT k.ip, k.ua, coalesce(c.uid, k.uid), c.ad_ids FROM outbox AS o JOIN conversions AS c ON c.id = o.conversion_id
               LEFT JOIN clicks AS k ON k.id = CASE WHEN c.attribution IS NULL THEN c.click_id ELSE c.credited_click END
               WHERE o.id = ?""",
            (outbox_id,),
        ).fetchone()
        data = {}
        if row is not None:
            ip, ua, uid, ad_ids = row
            if ua is not None:  # not yet cut: the address is whole
                data["client_user_agent"] = ua
                if ip:
                    data["client_ip_address"] = ip
            if uid:
                data["external_id"] = hashlib.sha256(uid.encode()).hexdigest()
            if ad_ids and (fbc := orjson.loads(ad_ids).get("fbc")):
                data["fbc"] = fbc
        return data

    def queue_alert(self, url: str, body: Mapping[str, Any], now_ms: int, conf: ForwardConfig) -> None:
        """An alert (Alerter) as a delivery: a JSON POST to [alerts] webhook_url, retried as
        any. Its status says the condition and state; a resolution cancels its condition's
        firing not yet sent, so the webhook's last word is never a stale one."""
        if body["state"] == "resolved":
            self.con.execute(
                """UPDATE outbox SET state = 'canceled', last_error = 'resolved before it was sent'
                   WHERE campaign = ? AND state = 'pending' AND status = ?""",
                (ALERTS, f"{body['alert']} firing"),
            )
        self.queue_delivery(
            Delivery(
                0,
                ALERTS,
                f"{body['alert']} {body['state']}",
                url,
                secrets.token_hex(16),
                now_ms,
                now_ms,
                now_ms + conf.max_age_hours * 3_600_000,
                None,
                "alert",
                orjson.dumps(body),
            )
        )

    def alert_state(self) -> dict:
        row = self.con.execute("SELECT value FROM meta WHERE key = 'alert_state'").fetchone()
        return orjson.loads(row[0]) if row else {}

    def save_alert_state(self, state: Mapping[str, Any]) -> None:
        self.con.execute(
            "INSERT INTO meta (key, value) VALUES ('alert_state', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (orjson.dumps(state).decode(),),
        )

    def dead_deliveries(self) -> int:
        """Dead deliveries to traffic sources and platforms (alerts' own aside)."""
        return self.con.execute(
            "SELECT count(*) FROM outbox WHERE state = 'dead' AND campaign != ?", (ALERTS,)
        ).fetchone()[0]

    def outbox_states(self) -> dict[str, int]:
        rows = self.con.execute("SELECT state, count(*) FROM outbox GROUP BY state")
        return {state: 0 for state in OUTBOX_STATES} | dict(rows)

    def troubled_deliveries(self, limit: int) -> list[tuple]:
        """Failed, dead and retrying deliveries, newest first: id, campaign, state, attempts, last_at, code, error."""
        return self.con.execute(
            """SELECT id, campaign, state, attempts, last_at, last_code, last_error FROM outbox
               WHERE state IN ('failed', 'dead') OR (state = 'pending' AND attempts > 0) ORDER BY id DESC LIMIT ?""",
            (limit,),
        ).fetchall()

    # -- Retention --

    def purge_batch(self, rule: PurgeRule, conf: RetentionConfig, limit: int, now_ms: int) -> int:
        """One batch of one rule, in the caller's transaction; how many rows it touched.
        A rule whose days are 0 is off: it touches nothing, whoever asks (its cutoff would be now)."""
        if not rule.days(conf):
            return 0
        cursor = self.con.execute(PURGE_SQL[rule.name][1], (rule_cutoff(rule, conf, now_ms), limit))
        if rule.name == "pii":
            ids = cursor.fetchall()
            if ids:  # the next batch starts after these
                self.con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('pii_done', ?)", (max(ids)[0],))
            return len(ids)
        return cursor.rowcount

    def purge_due(self, conf: RetentionConfig, now_ms: int) -> list[tuple[PurgeRule, int]]:
        """How many rows each rule that is on would touch now."""
        clicks_cutoff = uuid_floor(now_ms - conf.clicks_days * DAY_MS) if conf.clicks_days else b""
        return [
            (
                rule,
                self.con.execute(
                    PURGE_SQL[rule.name][0], {"cutoff": rule_cutoff(rule, conf, now_ms), "clicks_cutoff": clicks_cutoff}
                ).fetchone()[0],
            )
            for rule in PURGE_RULES
            if rule.days(conf)
        ]

    # -- Reports and listings --

    def ping(self) -> bool:
        self.con.execute("SELECT count(*) FROM meta").fetchone()
        return True

    @staticmethod
    def _costs_sql(key: str, where: str, keys: int = 1) -> str:
        """A report's costs per `key` (its first `keys` columns) and currency, from daily_costs:
        an uploaded cost is the whole cost of its day, campaign and sub1 (of the day and
        campaign, when a whole-day upload left its 'day' row). Days with uploads are few:
        the rows of the others are summed as they are, and only those days' rows look up
        whether an upload replaces them. Takes (first day, last day, *where's args)."""
        return f"""SELECT {key}, currency, {money_sum("cost")} FROM daily_costs AS d
                   WHERE day BETWEEN ?1 AND ?2{where} AND source != 'day' AND (
                       (day, campaign) NOT IN (SELECT day, campaign FROM daily_costs
                           WHERE source IN ('upload', 'day') AND day BETWEEN ?1 AND ?2)
                       OR source = 'upload'
                       OR NOT EXISTS (SELECT 1 FROM daily_costs AS u WHERE u.day = d.day
                           AND u.campaign = d.campaign AND u.sub1 = d.sub1 AND u.source = 'upload')
                       AND NOT EXISTS (SELECT 1 FROM daily_costs AS w WHERE w.day = d.day
                           AND w.campaign = d.campaign AND w.sub1 = '' AND w.source = 'day'))
                   GROUP BY {", ".join(str(i) for i in range(1, keys + 2))}"""

    def stats(self, q: StatsQuery) -> list[dict]:
        """A report, from what q.source says: the daily totals (day, campaign, sub1,
        status, channel; lander and offer), the quarter-hour totals (any zone, by hour),
        both kept for good, or the raw rows still kept (clicks_days)."""
        where, args = "", ()
        if q.campaign is not None:
            where, args = " AND campaign = ?", (q.campaign,)
        source = q.source
        if source == "daily":  # the only filter the totals take: sub1 ('' for none)
            for name, value in q.filters:
                where, args = f"{where} AND {name} = ?", (*args, value)
        if source == "funnel":
            return self._funnel_stats(q, where, args)
        if source == "slots":
            return self._slot_stats(q, where, args)
        if source == "raw":
            return self._raw_stats(q, where, args)
        fields = {"day": "day", "campaign": "campaign", "channel": "campaign", "sub1": "sub1", "status": "''"}
        key = ", ".join(fields[name] for name in q.by)
        groups = ", ".join(str(i) for i in range(1, len(q.by) + 1))
        span = (q.first_day, q.last_day, *args)
        clicks = self.con.execute(
            f"""SELECT {key}, sum(clicks), sum(bot_clicks), sum(unique_clicks), sum(lp_clicks), sum(lander_clicks),
                       sum(lander_lp_clicks), sum(flagged_clicks)
                FROM daily_clicks WHERE day BETWEEN ? AND ?{where} GROUP BY {groups}""",
            span,
        )
        conversions = self.con.execute(
            f"""SELECT {key.replace("''", "status")}, status, currency, sum(conversions), {PAYOUT_SUM},
                       sum(flagged), sum(pixel_only)
                FROM daily_conversions WHERE day BETWEEN ? AND ?{where} GROUP BY {groups}, status, currency
                HAVING sum(conversions) != 0""",  # a status change leaves its old row at zero
            span,
        )
        costs = self.con.execute(self._costs_sql(key, where, len(q.by)), span)
        return stats_rows(q, clicks.fetchall(), conversions.fetchall(), costs.fetchall())

    def unenriched(self, limit: int, before_ms: int, conf: GeoConfig) -> list[tuple]:
        """The next clicks the Enricher has not looked at, made before a moment: (id, ip,
        ua), oldest first. (It stays a moment behind: a click whose id was made just
        before another's may be committed just after it.) When [geo] changed since it
        last looked (a country file added, say), it starts again from the oldest kept."""
        found = dict(self.con.execute("SELECT key, value FROM meta WHERE key IN ('enriched_upto', 'enriched_with')"))
        looked_with = f"{conf.database}|{conf.user_agents}"
        if found.get("enriched_with") != looked_with:
            self.con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('enriched_with', ?)", (looked_with,))
            self.con.execute("DELETE FROM meta WHERE key = 'enriched_upto'")
            found.pop("enriched_upto", None)
        after = bytes.fromhex(found["enriched_upto"]) if "enriched_upto" in found else b""
        return self.con.execute(
            "SELECT id, ip, ua FROM clicks WHERE id > ? AND id < ? ORDER BY id LIMIT ?",
            (after, uuid_floor(before_ms), limit),
        ).fetchall()

    def set_enriched(self, now_ms: int, *, updates: Sequence[tuple], last: bytes) -> None:
        """Clicks' country, device, os and browser ((country, device, os, browser, id)),
        and the cursor past the last click looked at, in one transaction."""
        self.con.executemany(
            """INSERT INTO click_facts (country, device, os, browser, id) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (id) DO UPDATE SET country = coalesce(excluded.country, country),
                   device = coalesce(excluded.device, device), os = coalesce(excluded.os, os),
                   browser = coalesce(excluded.browser, browser)""",  # looked at again: what it can't say now stays
            updates,
        )
        self.con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('enriched_upto', ?)", (bytes(last).hex(),))

    def slots_since(self) -> int | None:
        """Since when the quarter-hour totals hold clicks, unix ms: the oldest click kept
        when schema 11 made them (its conversions are all in)."""
        found = self.con.execute("SELECT value FROM meta WHERE key = 'slots_since'").fetchone()
        return found and int(found[0])

    def _slot_stats(self, q: StatsQuery, where: str, args: tuple) -> list[dict]:
        """A report from the quarter-hour totals: days and hours in any zone, exact."""
        start, end = q.span_ms
        offsets = zone_offsets(q.tz, start, end)
        moments = time_fields_sql(f"slot * {SLOT_MS}", offsets)
        fields = {**moments, "campaign": "campaign", "channel": "campaign", "status": "''"}
        key = ", ".join(fields[name] for name in q.by)
        groups = ", ".join(str(i) for i in range(1, len(q.by) + 1))
        span = (start // SLOT_MS, end // SLOT_MS, *args)
        clicks = self.con.execute(
            f"""SELECT {key}, sum(clicks), sum(bot_clicks), sum(unique_clicks), sum(lp_clicks), sum(lander_clicks),
                       sum(lander_lp_clicks), sum(flagged_clicks)
                FROM slot_clicks WHERE slot >= ? AND slot < ?{where} GROUP BY {groups}""",
            span,
        ).fetchall()
        conversions = self.con.execute(
            f"""SELECT {key.replace("''", "status")}, status, currency, sum(conversions), {PAYOUT_SUM},
                       sum(flagged), sum(pixel_only)
                FROM slot_conversions WHERE slot >= ? AND slot < ?{where} GROUP BY {groups}, status, currency
                HAVING sum(conversions) != 0""",
            span,
        ).fetchall()
        # Costs: the slots' own, except on UTC days with an uploaded cost (daily_costs'
        # 'upload' and 'day' rows): those days' reported costs, shared over their slots.
        costs = self.con.execute(
            f"""SELECT {key}, currency, {money_sum("cost")} FROM slot_costs AS s
                WHERE slot >= ? AND slot < ?{where} AND NOT EXISTS (SELECT 1 FROM daily_costs AS u
                    WHERE u.source IN ('upload', 'day') AND u.day = s.slot / {DAY_MS // SLOT_MS}
                        AND u.campaign = s.campaign)
                GROUP BY {groups}, currency""",
            span,
        ).fetchall()
        costs.extend(self._uploaded_slot_costs(q, offsets, where, args))
        return stats_rows(q, clicks, conversions, costs)

    def _uploaded_slot_costs(
        self, q: StatsQuery, offsets: Sequence[tuple[int, int]], where: str, args: tuple
    ) -> list[tuple]:
        """Costs rows (stats_rows') of the UTC days with an uploaded cost that the report
        covers, each day's cost as the daily totals report it, over its quarter hours:
        an upload's share of the day evenly over the part of its own day (in its own
        zone) that the UTC day holds, so a report in the zone it was uploaded in has
        each day's upload whole; what the day's clicks and conversions still add (what
        the uploads did not replace) by what each quarter hour's cost, else by human
        clicks, else evenly. Exact to the micro-unit over each UTC day (spread)."""
        start, end = q.span_ms
        first, last = start // DAY_MS, (end - 1) // DAY_MS
        per_day = DAY_MS // SLOT_MS
        span = (first, last, *args)
        uploaded = set(
            self.con.execute(
                f"SELECT DISTINCT day, campaign FROM daily_costs WHERE source IN ('upload', 'day') AND day BETWEEN ? AND ?{where}",
                span,
            ).fetchall()
        )
        if not uploaded:
            return []
        shares: defaultdict[tuple, Counter] = defaultdict(Counter)  # (UTC day, campaign, currency) -> slot -> cost
        for day, campaign, tz, currency, cost in self.con.execute(
            f"SELECT day, campaign, tz, currency, cost FROM cost_uploads WHERE day BETWEEN ? AND ?{where}",
            (first - 1, last + 1, *args),
        ):
            lo, hi = local_midnight(day, tz) // SLOT_MS, -(-local_midnight(day + 1, tz) // SLOT_MS)
            for utc_day, amount in utc_parts(day, tz, cost):
                if (utc_day, campaign) in uploaded:
                    slots = range(max(lo, utc_day * per_day), min(hi, (utc_day + 1) * per_day)) or [utc_day * per_day]
                    for slot, part in zip(slots, spread(amount, [1] * len(slots))):
                        shares[utc_day, campaign, currency][slot] += part
        rows = []
        for day, campaign, currency, whole, micros in self.con.execute(
            self._costs_sql("day, campaign", where, 2), span
        ):
            if (day, campaign) not in uploaded:
                continue
            share = shares[day, campaign, currency]
            rest = money_units(whole, micros) - sum(share.values())  # clicks' and conversions' costs left
            if rest < 0:  # never expected (an upload's parts are in the day's cost): the day still adds up
                share[day * per_day] += rest
            elif rest:
                slots = range(day * per_day, (day + 1) * per_day)
                weights = dict.fromkeys(slots, 0)
                for slot, n in self.con.execute(
                    "SELECT slot, cost FROM slot_costs WHERE slot >= ? AND slot < ? AND campaign = ? AND currency = ?",
                    (slots[0], slots[-1] + 1, campaign, currency),
                ):
                    weights[slot] = max(n, 0)
                if not any(weights.values()):
                    for slot, n in self.con.execute(
                        "SELECT slot, clicks FROM slot_clicks WHERE slot >= ? AND slot < ? AND campaign = ?",
                        (slots[0], slots[-1] + 1, campaign),
                    ):
                        weights[slot] = n
                if not any(weights.values()):
                    weights = dict.fromkeys(slots, 1)
                for slot, part in zip(slots, spread(rest, list(weights.values()))):
                    share[slot] += part
            for slot, part in share.items():
                if part and start <= slot * SLOT_MS < end:
                    rows.append((*self._slot_key(q, offsets, slot, campaign), currency, 0, part))
        return rows

    @staticmethod
    def _slot_key(q: StatsQuery, offsets: Sequence[tuple[int, int]], slot: int, campaign: str) -> tuple:
        """A slot's key in a report without status: its day and hour in the zone, its campaign."""
        ms = slot * SLOT_MS
        local = ms + offsets[max(bisect.bisect_right(offsets, (ms, math.inf)) - 1, 0)][1]
        values = {"day": local // DAY_MS, "hour": local % DAY_MS // HOUR_MS, "campaign": campaign}
        values["channel"], values["status"] = campaign, ""
        return tuple(values[name] for name in q.by)

    def _raw_stats(self, q: StatsQuery, where: str, args: tuple) -> list[dict]:
        """A report from the raw rows still kept: any field, any zone. Clicks are `c`
        (with their click_facts `f`), conversions `v` (with their click's facts `k`,
        while the click is kept). Costs are what clicks and conversions carried (uploads
        are per campaign-day and sub1: the totals' business)."""
        start, end = q.span_ms
        offsets = zone_offsets(q.tz, start, end)
        filters = [name for name, _ in q.filters]
        enriched = bool((set(q.by) | set(filters)) & set(ENRICHED_FIELDS))
        facts = " LEFT JOIN click_facts AS f ON f.id = c.id" if enriched else ""
        their_facts = " LEFT JOIN click_facts AS k ON k.id = coalesce(v.credited_click, v.click_id)" if enriched else ""

        def column(table: str, name: str) -> str:
            if name in ENRICHED_FIELDS:
                return f"coalesce({'f' if table == 'c' else 'k'}.{name}, '')"
            none = DEFAULT_OFFER if name == "offer" else ""  # a plain `url`'s click: as the totals name it
            return f"coalesce({table}.{name}, '{none}')"

        def key_sql(table: str) -> str:
            moments = time_fields_sql(f"{table}.ts", offsets)
            keys = []
            for name in q.by:
                if name in moments:
                    keys.append(moments[name])
                elif name == "status":
                    keys.append("v.status" if table == "v" else "''")
                elif name in ("campaign", "channel"):
                    keys.append(f"{table}.campaign")
                else:
                    keys.append(column(table, name))
            return ", ".join(keys)

        campaign_only, campaign_args = where, args  # a visitor's first click is found among all of its campaign's
        where_clicks = where.replace("campaign", "c.campaign") + "".join(f" AND {column('c', n)} = ?" for n in filters)
        where_conversions = where.replace("campaign", "v.campaign") + "".join(
            f" AND {column('v', n)} = ?" for n in filters
        )
        args = (*args, *(value for _, value in q.filters))
        groups = ", ".join(str(i) for i in range(1, len(q.by) + 1))
        click_key, conversion_key = key_sql("c"), key_sql("v")
        clicks_sql = f"""SELECT {click_key}, sum(c.bot = 0), sum(c.bot), 0, sum(c.bot = 0 AND c.lp_at IS NOT NULL),
                                sum(c.bot = 0 AND c.lander IS NOT NULL),
                                sum(c.bot = 0 AND c.lander IS NOT NULL AND c.lp_at IS NOT NULL),
                                sum(c.bot = 0 AND c.flags IS NOT NULL)
                         FROM clicks AS c{facts} WHERE c.id >= ? AND c.id < ?{where_clicks} GROUP BY {groups}"""
        # The first human click of its (campaign, UTC day, address, User-Agent), found over
        # its whole UTC day whatever the filters: a zone's day that starts mid-UTC-day, or
        # a filter, must not make a later click the first.
        unique_sql = f"""SELECT {click_key}, 0, 0, count(*), 0, 0, 0, 0 FROM clicks AS c{facts} WHERE c.id IN (
                             SELECT min(id) FROM clicks WHERE id >= ? AND id < ? AND bot = 0{campaign_only}
                             GROUP BY ts / {DAY_MS}, campaign, ip, ua)
                         AND c.id >= ? AND c.id < ?{where_clicks} GROUP BY {groups}"""
        click_costs_sql = f"""SELECT {click_key}, c.cost_currency, {money_sum("c.cost")} FROM clicks AS c{facts}
                              WHERE c.id >= ? AND c.id < ? AND c.cost IS NOT NULL{where_clicks}
                              GROUP BY {groups}, c.cost_currency"""
        # The clicks a UTC day at a time, each its own short read: a report over millions
        # of them never holds one snapshot long enough to keep the writer's checkpoints
        # from emptying the WAL, and the writer (and clicks) go on between the days.
        clicks, costs = [], []
        oldest = self.con.execute("SELECT ts FROM clicks ORDER BY id LIMIT 1").fetchone()  # days before: none kept
        reading = 0.0  # seconds read since the last pause
        for day in range(max(start, oldest[0] if oldest else end) // DAY_MS, -(-end // DAY_MS)):
            began = time.monotonic()
            lo, hi = max(start, day * DAY_MS), min(end, (day + 1) * DAY_MS)
            ids = (uuid_floor(lo), uuid_floor(hi), *args)
            whole_day = (uuid_floor(day * DAY_MS), uuid_floor((day + 1) * DAY_MS), *campaign_args)
            clicks += self.con.execute(clicks_sql, ids).fetchall()
            clicks += self.con.execute(unique_sql, (*whole_day, *ids)).fetchall()
            costs += self.con.execute(click_costs_sql, ids).fetchall()
            reading += time.monotonic() - began
            if reading >= RAW_REPORT_READ:
                time.sleep(RAW_REPORT_PAUSE)
                reading = 0.0
        conversions = self.con.execute(
            f"""SELECT {conversion_key}, v.status, v.currency, count(*), {money_sum("v.payout")},
                       sum(v.flags IS NOT NULL), sum(v.source IS 'pixel')
                FROM conversions AS v{their_facts} WHERE v.ts >= ? AND v.ts < ?{where_conversions}
                GROUP BY {groups}, v.status, v.currency""",
            (start, end, *args),
        ).fetchall()
        costs += self.con.execute(
            f"""SELECT {conversion_key.replace("v.status", "''")}, v.cost_currency, {money_sum("v.cost")}
                FROM conversions AS v{their_facts} WHERE v.ts >= ? AND v.ts < ?
                    AND v.cost_model IS NOT NULL AND v.status = 'approved'{where_conversions}
                GROUP BY {groups}, v.cost_currency""",
            (start, end, *args),
        ).fetchall()
        return stats_rows(q, clicks, conversions, costs)

    def _funnel_stats(self, q: StatsQuery, where: str, args: tuple) -> list[dict]:
        """A report by lander or offer (with day, campaign, status, channel), from the
        totals: the funnel tables' rows, and what the campaign-days hold beyond them
        (clicks without names, a plain `url`'s: offer "default", lander ""). A cpa or
        revshare cost is each conversion's own; click costs and uploads are kept per
        campaign-day and sub1, so they are shared by the day's human clicks (a visit
        costs the same whichever lander or offer it was given), exactly to the
        micro-unit (spread)."""
        span = (q.first_day, q.last_day, *args)
        by = q.by

        def name_of(day: int, campaign: str, lander: str, offer: str, status: str = "") -> tuple:
            values = {"day": day, "campaign": campaign, "channel": campaign, "lander": lander, "offer": offer}
            values["status"] = status
            return tuple(values[name] for name in by)

        clicks, humans = self._funnel_clicks(span, where, name_of)
        conversions, approved = self._funnel_conversions(span, where, name_of)
        costs = []
        owed = self._funnel_owed(span, where, name_of)
        for day, campaign, per_conversion, currency, whole, micros in self.con.execute(
            self._costs_sql("day, campaign, source = 'conversions'", where, 3), span
        ):
            none = name_of(day, campaign, "", DEFAULT_OFFER)
            if per_conversion:  # shared as they were owed (an upload may have replaced some)
                weights = owed.get((day, campaign, currency), Counter())
                beyond = self._conversion_costs(day, campaign, currency) - sum(weights.values())
                if beyond > 0:  # conversions of clicks without names
                    weights[none] += beyond
            else:
                weights = humans.get((day, campaign), Counter())
            weights = weights or approved.get((day, campaign)) or Counter({none: 1})
            names = sorted(weights)
            if not any(weights.values()):
                weights = Counter(dict.fromkeys(names, 1))
            shares = spread(money_units(whole, micros), [weights[name] for name in names])
            costs.extend((*name, currency, 0, share) for name, share in zip(names, shares) if share)
        return stats_rows(q, clicks, conversions, costs)

    def _funnel_clicks(self, span: tuple, where: str, name_of: Callable) -> tuple[list, dict]:
        """Click rows (stats_rows' clicks) per lander or offer, and each campaign-day's
        human clicks per name (to share its click costs by)."""
        rest: dict[tuple, list[int]] = {
            (day, campaign): counts
            for day, campaign, *counts in self.con.execute(
                f"""SELECT day, campaign, sum(clicks), sum(bot_clicks), sum(unique_clicks), sum(lp_clicks),
                           sum(lander_clicks), sum(lander_lp_clicks), sum(flagged_clicks)
                    FROM daily_clicks WHERE day BETWEEN ? AND ?{where} GROUP BY 1, 2""",
                span,
            )
        }
        clicks, humans = [], {}
        rows = self.con.execute(
            f"""SELECT day, campaign, lander, offer, clicks, bot_clicks, unique_clicks, lp_clicks, flagged_clicks
                FROM daily_funnel WHERE day BETWEEN ? AND ?{where}""",
            span,
        )
        for day, campaign, lander, offer, humans_, bots, unique, lp, flagged in rows:
            # in stats_rows' order; sent to a lander, and their LP clicks, from the lander's name
            counts = [humans_, bots, unique, lp, humans_ if lander else 0, lp if lander else 0, flagged]
            if not any(counts):  # an LP click moved away with its credit
                continue
            name = name_of(day, campaign, lander, offer)
            clicks.append((*name, *counts))
            humans.setdefault((day, campaign), Counter())[name] += counts[0]
            left = rest.get((day, campaign))
            if left is not None:
                rest[day, campaign] = [a - b for a, b in zip(left, counts)]
        for (day, campaign), counts in rest.items():
            if any(counts):
                none = name_of(day, campaign, "", DEFAULT_OFFER)
                clicks.append((*none, *counts))
                humans.setdefault((day, campaign), Counter())[none] += counts[0]
        return clicks, humans

    def _funnel_conversions(self, span: tuple, where: str, name_of: Callable) -> tuple[list, dict]:
        """Conversion rows (stats_rows' conversions) per lander or offer, and each
        campaign-day's approved conversions per name."""
        rest: dict[tuple, list[int]] = {
            (day, campaign, status, currency): [n, money_units(whole, micros), flagged, pixel]
            for day, campaign, status, currency, n, whole, micros, flagged, pixel in self.con.execute(
                f"""SELECT day, campaign, status, currency, sum(conversions), {PAYOUT_SUM}, sum(flagged), sum(pixel_only)
                    FROM daily_conversions WHERE day BETWEEN ? AND ?{where} GROUP BY 1, 2, 3, 4""",
                span,
            )
        }
        conversions, approved = [], {}
        rows = self.con.execute(
            f"""SELECT day, campaign, lander, offer, status, currency, sum(conversions), {PAYOUT_SUM}, sum(flagged),
                       sum(pixel_only)
                FROM daily_funnel_conversions WHERE day BETWEEN ? AND ?{where} GROUP BY 1, 2, 3, 4, 5, 6""",
            span,
        )
        for day, campaign, lander, offer, status, currency, n, whole, micros, flagged, pixel in rows:
            units = money_units(whole, micros)
            conversions.append(
                (*name_of(day, campaign, lander, offer, status), status, currency, n, 0, units, flagged, pixel)
            )
            if status == "approved":
                approved.setdefault((day, campaign), Counter())[name_of(day, campaign, lander, offer)] += n
            left = rest.get((day, campaign, status, currency))
            if left is not None:
                left[0] -= n
                left[1] -= units
                left[2] -= flagged
                left[3] -= pixel
        for (day, campaign, status, currency), (n, units, flagged, pixel) in rest.items():
            if n or units:
                none = name_of(day, campaign, "", DEFAULT_OFFER, status)
                conversions.append((*none, status, currency, n, 0, units, flagged, pixel))
                if status == "approved":
                    approved.setdefault((day, campaign), Counter())[name_of(day, campaign, "", DEFAULT_OFFER)] += n
        return conversions, approved

    def _funnel_owed(self, span: tuple, where: str, name_of: Callable) -> dict[tuple, Counter]:
        """What approved conversions cost under cpa or revshare: (day, campaign, currency)
        -> cost per lander or offer."""
        owed: dict[tuple, Counter] = {}
        for day, campaign, lander, offer, currency, whole, micros in self.con.execute(
            f"""SELECT day, campaign, lander, offer, currency, {money_sum("cost")} FROM daily_funnel_costs
                WHERE day BETWEEN ? AND ?{where} GROUP BY 1, 2, 3, 4, 5""",
            span,
        ):
            owed.setdefault((day, campaign, currency), Counter())[name_of(day, campaign, lander, offer)] += money_units(
                whole, micros
            )
        return owed

    def _conversion_costs(self, day: int, campaign: str, currency: str) -> int:
        """What a campaign-day's approved conversions cost under cpa or revshare, in a currency."""
        whole, micros = self.con.execute(
            f"""SELECT {money_sum("cost")} FROM daily_costs
                WHERE day = ? AND campaign = ? AND source = 'conversions' AND currency = ?""",
            (day, campaign, currency),
        ).fetchone()
        return money_units(whole or 0, micros or 0)

    def conversions(
        self,
        since_ms: int,
        after_id: int,
        limit: int,
        campaign: str | None,
        status: str | None,
        flag: str | None = None,
    ) -> list[dict]:
        """Conversions created since a time, oldest first, for reconciliation; with
        `flag`, those carrying that flag."""
        sql = f"{CONVERSION_SELECT} WHERE id > ? AND created_at >= ?"
        args: list[Any] = [after_id, since_ms]
        if campaign is not None:
            sql, args = sql + " AND campaign = ?", [*args, campaign]
        if status is not None:
            sql, args = sql + " AND status = ?", [*args, status]
        if flag is not None:
            sql, args = sql + " AND flags IS NOT NULL AND json_extract(flags, '$.' || ?) IS NOT NULL", [*args, flag]
        return [conversion_view(r) for r in self.con.execute(sql + " ORDER BY id LIMIT ?", (*args, limit))]

    def conversion(self, conversion_id: int) -> dict | None:
        """One conversion as /api/conversions lists it, with its user id (while kept),
        how it was credited (`attribution`: null when its click decided) and its history."""
        row = self.con.execute(
            f"{CONVERSION_SELECT.replace(' FROM', ', uid, attribution FROM')} WHERE id = ?", (conversion_id,)
        ).fetchone()
        if row is None:
            return None
        view = conversion_view(row[:22])
        view["user_id"], view["attribution"] = row[22], row[23] and orjson.loads(row[23])
        view["history"] = [
            {"at": iso_ms(at), "status": status, "payout": format_money(payout), "currency": currency, "source": source}
            for at, status, payout, currency, source in self.con.execute(
                """SELECT at, status, payout, currency, coalesce(source, 'postback') FROM conversion_history
                   WHERE conversion_id = ? ORDER BY rowid""",
                (conversion_id,),
            )
        ]
        return view

    def orphans(self, since_ms: int, after_id: int, limit: int) -> list[dict]:
        """Postbacks for unknown click ids, oldest first."""
        rows = self.con.execute(
            """SELECT id, click_id, event, txid, status, payout, currency, ts, first_seen, last_seen, hits
               FROM orphans WHERE id > ? AND last_seen >= ? ORDER BY id LIMIT ?""",
            (after_id, since_ms, limit),
        )
        return [
            dict(zip(ORPHAN_COLUMNS, (*r[:5], format_money(r[5]), r[6], *map(iso_ms, r[7:10]), r[10]))) for r in rows
        ]

    def google_ads_conversions(self, since_ms: int) -> list[tuple]:
        """Approved conversions created since a time whose click had a gclid: gclid, when
        they converted (unix ms), payout, currency; in the order they were created."""
        return self.con.execute(
            """SELECT json_extract(ad_ids, '$.gclid'), ts, payout, currency FROM conversions
               WHERE created_at >= ? AND status = 'approved' AND reason IS NULL
                   AND json_extract(ad_ids, '$.gclid') IS NOT NULL
               ORDER BY id""",
            (since_ms,),
        ).fetchall()

    def recent_conversions(self, limit: int) -> list[tuple]:
        """The newest conversions: id, created_at, campaign, sub1, event, status, payout,
        currency, reason, attribution."""
        return self.con.execute(
            """SELECT id, created_at, campaign, sub1, event, status, payout, currency, reason, attribution
               FROM conversions ORDER BY id DESC LIMIT ?""",
            (limit,),
        ).fetchall()

    def recent_orphans(self, limit: int) -> list[tuple]:
        """The orphans seen last: last_seen, click_id, event, payout, currency, hits."""
        return self.con.execute(
            "SELECT last_seen, click_id, event, payout, currency, hits FROM orphans ORDER BY last_seen DESC LIMIT ?",
            (limit,),
        ).fetchall()


# --- Storage: the async store ---------------------------------------------------------


READER_NICE = 10  # CFS weight 110 against the event loop's 1024: about a tenth of a busy core


def lower_thread_priority() -> int:
    """Lower the calling thread's CPU priority (Linux: nice applies per thread)."""
    with suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READER_NICE)
    return 0


@dataclasses.dataclass(frozen=True)
class Job:
    """Work for the writer thread, in a transaction of its own (outbox results, purges)."""

    func: Callable[[Database, int], Any]
    rows: int = 1  # about how many rows it writes, for WAL checkpoint pacing
    fsync: bool = False  # durable before it returns (what a 200 or a 302 promises)


def batch_size(queue: list[tuple[object, Any]]) -> int:
    """How many queued writes go in the next transaction: a Job goes alone."""
    if isinstance(queue[0][0], Job):
        return 1
    for i in range(1, min(len(queue), MAX_BATCH)):
        if isinstance(queue[i][0], Job):
            return i
    return min(len(queue), MAX_BATCH)


WRITE_QUIET_SECONDS = 10  # failures this far apart are one episode in the log (a nearly full disk flaps)


@dataclasses.dataclass
class WriteHealth:
    """Whether writes are committing, for /healthz and the log."""

    last_commit: float | None = None  # wall-clock time of the last commit
    failing_since: float | None = None  # set while the latest write failed: /healthz answers 503
    failures: int = 0  # batches failed since failing_since
    last_error: str | None = None
    # The log tells an episode once: its start, a count a minute, its end once quiet.
    episode_since: float | None = None
    episode_failures: int = 0
    last_failure: float = 0.0
    last_logged: float = 0.0


class DiskReserve:
    """A file of ``size`` bytes beside the database, given back when the disk fills so
    that a checkpoint can copy the WAL home and the WAL can start over (then made again
    once the disk has room)."""

    def __init__(self, path: str, size: int) -> None:
        self.path, self.size = path, size

    def make(self) -> bool:
        """Create the reserve if it is missing and the disk has room for it twice."""
        if not self.size or os.path.exists(self.path):
            return False
        with suppress(OSError):
            disk = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
            if disk.f_bavail * disk.f_frsize < 2 * self.size:
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)  # real blocks: a sparse file would free nothing
            except OSError:
                os.close(fd)
                os.unlink(self.path)
                return False
            os.close(fd)
            return True
        return False

    def release(self) -> bool:
        try:
            os.unlink(self.path)
        except OSError:
            return False
        return True


def is_disk_full(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or getattr(exc, "errno", None) == errno.ENOSPC


class Store:
    """The async side of the database: one writer Database taking batches (group
    commit), and a reader Database on a thread of its own, so a slow read never holds
    up a write (datasette's split). Every SQL statement is a Database verb.

    A batch with postbacks (fsynced) runs in one call on the writer thread: a
    round trip per batch, not per statement. A batch of clicks alone (no fsync)
    commits right on the event loop.

    When writes fail (a full disk), each write that fails is answered with StorageError
    (a 503), /healthz says so, and the writer keeps trying to recover by itself: a
    checkpoint that lets the WAL start over (with the disk reserve given back if that
    is what it takes), then a write. Nothing is acknowledged that was not committed.
    """

    def __init__(
        self, config: Config, *, clock: Callable[[], float] = time.time, on_forward: Callable[[], object] | None = None
    ) -> None:
        self.path = config.storage.path
        self.clock = clock
        self.on_forward = on_forward  # told when a batch queued forwards
        self.health = WriteHealth()
        self.last_click_id: bytes | None = None  # the newest click stored, read at open
        self.reserve = DiskReserve(f"{self.path}-reserve", config.storage.reserve_mb << 20)
        self.batches = 0
        self.batch_sizes = Histogram(BATCH_BOUNDS)
        self._policy = WritePolicy({}, ForwardConfig(), RetentionConfig().sub1_per_day)
        self._db: Database | None = None  # the writer's; used on its thread, or on the loop for clicks alone
        self._reader: Database | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._read_executor: ThreadPoolExecutor | None = None
        self._queue: list[tuple[object, asyncio.Future]] = []
        self._wakeup: asyncio.Future | None = None
        self._writer_task: asyncio.Task | None = None
        self._unchecked_rows = 0
        self._checkpointed_at = 0.0  # loop time
        self._checkpoint_warned = 0.0
        self._recovered_at = 0.0  # loop time of the last recovery attempt
        self._closing = False
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Campaigns, forwarding and the sub1 cap: the next batch writes with these."""
        self._policy = WritePolicy.of(config)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinytrack-writer")
        self._db = await loop.run_in_executor(self._executor, Database.open, self.path)
        self._db.no_autocheckpoint()
        self.last_click_id = self._db.newest_click_id()
        # Today's visitors, so the first click after a restart need not read them.
        await loop.run_in_executor(self._executor, self._db.unique_keys, int(self.clock() // 86400))
        # A WAL left by a crash (or a full disk) is copied home before anything else. If a
        # reader (a backup, a report) holds it, that waits; a full disk is a failing write.
        try:
            await loop.run_in_executor(self._executor, self._make_room)
        except sqlite3.Error as exc:
            if not is_disk_full(exc):
                raise
            self._failed(exc)
        else:
            await loop.run_in_executor(self._executor, self.reserve.make)
        # Reports run on the reader's thread. On one core a long one would take half the
        # CPU from clicks; at a lower priority (Linux nice, per thread) it yields to them.
        self._read_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tinytrack-reader", initializer=lower_thread_priority
        )
        self._reader = await loop.run_in_executor(self._read_executor, Database.open_readonly, self.path)
        self._closing = False
        self._checkpointed_at = loop.time()
        self._writer_task = asyncio.create_task(self._write_loop(), name="tinytrack-writer")

    async def close(self) -> None:
        """Finish every queued write, then close."""
        self._closing = True
        self._wake()
        if self._writer_task:
            await self._writer_task
        loop = asyncio.get_running_loop()
        if self._read_executor:
            await loop.run_in_executor(self._read_executor, self._reader.close)
            self._read_executor.shutdown()
        if self._executor:
            await loop.run_in_executor(self._executor, self._db.close)  # the last close checkpoints
            self._executor.shutdown()

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def policy(self) -> WritePolicy:
        return self._policy

    @property
    def closed(self) -> bool:
        return self._closing and (self._writer_task is None or self._writer_task.done())

    @property
    def failing(self) -> bool:
        return self.health.failing_since is not None

    async def record_click(self, row: ClickRow) -> None:
        """Store a click; returns once it is committed."""
        await self._submit(row)

    async def record_lp_click(self, lp: LPClick) -> tuple[Arm, bytes, dict] | None:
        """Store an LP click; returns once it is committed (see Database.lp_click)."""
        return await self._submit(lp)

    async def record_postback(self, postback: Postback) -> PostbackOutcome:
        """Match, dedupe and store a postback; returns once it is committed and fsynced."""
        return await self._submit(postback)

    async def write(
        self, func: Callable[[Database, int], Any], rows: int = 1, *, droppable: bool = False, fsync: bool = False
    ) -> Any:
        """Run ``func(database, now_ms)`` on the writer, in a transaction of its own. A
        cancelled caller's job is still written (a forward's result must be), unless it
        is ``droppable`` (a purge batch): then, if not begun, it is dropped, and if being
        written, waited for, so nothing of a stopped purge runs after it stops."""
        future = self._enqueue(Job(func, rows, fsync))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            queued = [entry for entry in self._queue if entry[1] is future]
            if droppable and queued:
                self._queue.remove(queued[0])
            elif droppable:
                with suppress(Exception):
                    await future
            raise

    async def read(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func(database, *args)`` on the reader's thread, beside the writer."""
        return await asyncio.get_running_loop().run_in_executor(self._read_executor, partial(func, self._reader, *args))

    async def _submit(self, item: object) -> Any:
        return await self._enqueue(item)

    def _enqueue(self, item: object) -> asyncio.Future:
        if self._closing:
            raise StorageError("shutting down")
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._wake()
        return future

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue or not self._closing:
            try:
                await self._write_next(loop)
            except Exception:  # a bug here must not stop every write after it
                log.exception("writer: unexpected error, going on")
                await asyncio.sleep(0.01)

    async def _write_next(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit the next batch; idle, wait for one (or a checkpoint or recovery due)."""
        if not self._queue:
            # Idle: still wake for a checkpoint that is due, or to try to recover.
            timeout = WRITE_RETRY_SECONDS if self.failing else CHECKPOINT_SECONDS if self._unchecked_rows else None
            self._wakeup = loop.create_future()
            done, _ = await asyncio.wait((self._wakeup,), timeout=timeout)
            if not done and self.failing:
                await self._recover(loop, probe=True)
            elif not done:
                await self._checkpoint(loop)
            return
        if self.failing and loop.time() - self._recovered_at >= WRITE_RETRY_SECONDS:
            await self._recover(loop, probe=False)
            return  # the queue may have changed meanwhile (a stopped job leaves it)
        size = batch_size(self._queue)
        batch, self._queue = self._queue[:size], self._queue[size:]
        items = [item for item, _ in batch]
        try:
            results = await self._write(items)
        except Exception as exc:
            self._failed(exc)
            for _, future in batch:
                if not future.done():
                    future.set_exception(StorageError(f"database write failed: {exc}"))
            return
        self._committed()
        self.batches += 1
        self.batch_sizes.observe(len(items))
        queued_forward = False
        for (_, future), result in zip(batch, results):
            queued_forward = queued_forward or (isinstance(result, PostbackOutcome) and result.queued_forward)
            if not future.done():
                future.set_result(result)
        if queued_forward and self.on_forward:
            self.on_forward()
        self._unchecked_rows += items[0].rows if isinstance(items[0], Job) else len(items)
        if self._checkpoint_due(loop):
            await self._checkpoint(loop)

    async def _write(self, items: list[object]) -> list[Any]:
        loop = asyncio.get_running_loop()
        if isinstance(items[0], Job):  # always alone in its batch: its failure is its own
            return [await loop.run_in_executor(self._executor, self._run_job, items[0])]
        postbacks = any(isinstance(item, Postback) for item in items)
        if not postbacks:
            # Clicks alone commit without an fsync in ~5 us a row: cheaper on the event
            # loop than a hop to the writer thread and back (measured ~57 us on one core).
            # If another process holds the write lock, don't wait here: go to the thread.
            try:
                return self._write_batch(items, postbacks, busy_timeout=0)
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_BUSY:
                    raise
        return await loop.run_in_executor(self._executor, self._write_batch, items, postbacks)

    # One batch, one transaction: on the writer thread, or for clicks alone on the loop.

    def _write_batch(
        self, items: list[object], postbacks: bool, busy_timeout: int = BUSY_TIMEOUT_MS
    ) -> list[PostbackOutcome | tuple[Arm, bytes, dict] | None]:
        db, policy = self._db, self._policy
        now_ms = int(self.clock() * 1000)
        with db.transaction(fsync=postbacks, busy_timeout_ms=busy_timeout):
            results: list[PostbackOutcome | tuple[Arm, bytes, dict] | None] = []
            clicks: list[ClickRow] = []
            lp_counts = None  # made for the first LP click: most batches have none
            for item in items:
                if isinstance(item, (Postback, LPClick)):
                    if clicks:  # keep arrival order: a batch's clicks land before what comes after them
                        db.insert_clicks(clicks, policy.sub1_per_day)
                        clicks = []
                    if isinstance(item, Postback):
                        results.append(db.apply_postback(item, now_ms, policy))
                    else:
                        if lp_counts is None:
                            lp_counts = LPCounts()
                        results.append(db.lp_click(item, now_ms, lp_counts, policy.sub1_per_day))
                else:
                    clicks.append(item)
                    results.append(None)
            if clicks:
                db.insert_clicks(clicks, policy.sub1_per_day)
            if lp_counts:
                db.add_lp_counts(lp_counts)
        return results

    def _run_job(self, job: Job) -> Any:
        with self._db.transaction(fsync=job.fsync) as db:
            return job.func(db, int(self.clock() * 1000))

    # Checkpoints, and recovering from a full disk.

    def _checkpoint_due(self, loop: asyncio.AbstractEventLoop) -> bool:
        """By rows (throughput), by time (light load writes whole pages per commit) or
        by the WAL's size (big rows): whichever comes first keeps the WAL small."""
        if self._unchecked_rows >= CHECKPOINT_ROWS:
            return True
        since = loop.time() - self._checkpointed_at
        if since >= CHECKPOINT_SECONDS:
            return True
        with suppress(OSError):
            return since >= 0.05 and os.stat(f"{self.path}-wal").st_size > WAL_LIMIT_BYTES
        return False

    async def _checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        # Between batches, so the whole WAL is copied back and the next commit
        # starts it again from the top; requests queue meanwhile (group commit).
        self._unchecked_rows = 0
        self._checkpointed_at = loop.time()
        await loop.run_in_executor(self._executor, self._checkpoint_wal)

    def _checkpoint_wal(self) -> None:
        try:
            self._db.checkpoint("PASSIVE")  # never waits on readers; a long report just leaves some for next time
        except sqlite3.Error as exc:
            # Said once a minute at most, and not while failing writes are being told.
            if self.health.episode_since is None and time.time() - self._checkpoint_warned >= 60:
                self._checkpoint_warned = time.time()
                log.warning("WAL checkpoint failed, will retry: %s", exc)
        else:
            if self.reserve.size and not os.path.exists(self.reserve.path):
                self.reserve.make()  # the disk had room again

    async def _recover(self, loop: asyncio.AbstractEventLoop, *, probe: bool) -> None:
        """While writes fail: make room, and (when idle) see whether a write commits."""
        self._recovered_at = loop.time()
        try:
            with suppress(sqlite3.Error):  # the disk may still be full: the write below says
                await loop.run_in_executor(self._executor, self._make_room)
            if probe:
                await loop.run_in_executor(self._executor, self._probe_write)
        except Exception as exc:
            self._failed(exc)
        else:
            if probe:
                self._committed()

    def _make_room(self) -> bool:
        """Checkpoint the whole WAL and cut it to nothing, giving back the disk reserve
        if the disk is too full for that. True when the WAL was emptied, False when a
        reader still holds part of it; a full disk raises."""
        try:
            return self._db.checkpoint("TRUNCATE")
        except sqlite3.Error as exc:
            if not is_disk_full(exc) or not self._release_reserve():
                raise
            return self._db.checkpoint("TRUNCATE")

    def _release_reserve(self) -> bool:
        if not self.reserve.release():
            return False
        log.warning(
            "disk full: gave back the %d MB disk reserve (%s); made again once the disk has room",
            self.reserve.size >> 20,
            self.reserve.path,
        )
        return True

    def _probe_write(self) -> None:
        with self._db.transaction(busy_timeout_ms=0) as db:
            db.probe_write(int(self.clock() * 1000))

    def _failed(self, exc: BaseException) -> None:
        """Note a failed write. The log says it once, then a count a minute (a failing
        disk fails every batch: thousands of lines a second otherwise)."""
        health, now = self.health, time.time()
        if health.failing_since is None:
            health.failing_since, health.failures = now, 0
        health.failures += 1
        health.last_error = str(exc)
        health.last_failure = now
        if is_disk_full(exc):  # whatever filled it, the reserve's room lets the next writes and a checkpoint run
            self._release_reserve()
        health.episode_failures += 1
        if health.episode_since is None:
            health.episode_since = health.last_logged = now
            log.error("writes are failing, answering 503 until one commits again: %s", exc)
        elif now - health.last_logged >= 60:
            health.last_logged = now
            log.error(
                "writes still failing: %d batches in %.0f s, last: %s",
                health.episode_failures,
                now - health.episode_since,
                exc,
            )

    def _committed(self) -> None:
        health, now = self.health, time.time()
        health.last_commit = now
        health.failing_since, health.last_error = None, None
        if health.episode_since is not None and now - health.last_failure >= WRITE_QUIET_SECONDS:
            log.warning(
                "writes recovered: %d batches failed in %.1f s, none since %.0f s",
                health.episode_failures,
                health.last_failure - health.episode_since,
                now - health.last_failure,
            )
            health.episode_since, health.episode_failures = None, 0


# --- Background work: forwarding ------------------------------------------------------


async def send_forward(
    url: str,
    key: str,
    timeout: float,
    allow_private: bool,
    *,
    body: bytes | None = None,
    headers: Sequence[tuple[str, str]] = (),
    read_body: bool = False,
) -> Attempt:
    """GET ``url`` once (POST ``body`` as JSON, if given), without following redirects;
    what came back, with the answer's body if ``read_body``.

    The host is resolved here, checked, and the checked address is the one
    connected to, so DNS cannot swap in a private address after the check."""
    parts = urlsplit(url)
    host, https = parts.hostname or "", parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                return Attempt(error=f"cannot resolve {host}: {exc.strerror}")
            addresses = list(dict.fromkeys(info[4][0] for info in infos))
            if not allow_private:
                refused = [a for a in addresses if not is_public(ipaddress.ip_address(a.split("%")[0]))]
                if refused:
                    return Attempt(
                        error=f"refused: {host} resolves to {refused[0]}, not a public address "
                        "(forward.allow_private = true allows it)",
                        final=True,
                    )
            context = ssl.create_default_context() if https else None
            errors = []
            for address in addresses:
                try:
                    reader, writer = await asyncio.open_connection(
                        address, port, ssl=context, server_hostname=host if https else None
                    )
                    break
                except (OSError, ssl.SSLError) as exc:
                    errors.append(f"{address}: {exc.strerror or exc}")
            else:
                return Attempt(error=f"cannot connect: {'; '.join(errors)}")
            try:
                return await exchange(reader, writer, parts.netloc, target, key, body, headers, read_body)
            finally:
                writer.close()
    except TimeoutError:
        return Attempt(error=f"no answer within {timeout:g} s")
    except (OSError, ssl.SSLError) as exc:
        return Attempt(error=f"connection failed: {exc}")


async def exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    target: str,
    key: str,
    body: bytes | None = None,
    extra_headers: Sequence[tuple[str, str]] = (),
    read_body: bool = False,
) -> Attempt:
    """One request and the status line and headers of its answer (and its body, up to
    MAX_ANSWER_BYTES, if ``read_body``), parsed by h11."""
    conn = h11.Connection(h11.CLIENT)
    headers = [
        ("Host", host),
        ("User-Agent", f"tinytrack/{__version__}"),
        ("Accept", "*/*"),
        ("Idempotency-Key", key),
        ("Connection", "close"),
    ]
    if body is not None:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *extra_headers]
    writer.write(conn.send(h11.Request(method="GET" if body is None else "POST", target=target, headers=headers)))
    if body:
        writer.write(conn.send(h11.Data(data=body)))
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()
    answer: Attempt | None = None
    chunks: list[bytes] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return Attempt(error=f"bad HTTP answer: {exc}")
        if event is h11.NEED_DATA:
            data = await reader.read(8192)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            headers = dict(event.headers)  # h11 gives names lower-cased
            retry_after = headers.get(b"retry-after")
            if 300 <= event.status_code < 400:
                location = headers.get(b"location", b"").decode("latin-1")
                return Attempt(event.status_code, f"redirect to {quoted(location, 80)} not followed")
            answer = Attempt(
                event.status_code, None, parse_retry_after(retry_after and retry_after.decode("latin-1"), time.time())
            )
            if not read_body:
                return answer
            continue
        if isinstance(event, h11.Data) and answer is not None:
            chunks.append(event.data)
            if sum(map(len, chunks)) > MAX_ANSWER_BYTES:
                return dataclasses.replace(answer, body=b"".join(chunks)[:MAX_ANSWER_BYTES])
            continue
        if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed) and answer is not None:
            return dataclasses.replace(answer, body=b"".join(chunks))
        if isinstance(event, h11.ConnectionClosed):
            return Attempt(error="connection closed before an answer")
        # else h11.InformationalResponse (1xx): keep reading


def meta_answer(attempt: Attempt) -> Attempt:
    """Meta's answer to an events POST read: success only when it says events_received
    >= 1; its error object kept (message, codes, fbtrace_id), retried when Meta calls it
    transient or a rate limit."""
    if attempt.code is None:
        return attempt
    try:
        data = orjson.loads(attempt.body) if attempt.body else {}
    except orjson.JSONDecodeError:
        data = {}
    data = data if isinstance(data, dict) else {}
    error = data.get("error")
    if isinstance(error, dict):
        said = [strip_controls(str(error.get(name, "")), 300) for name in ("message", "error_user_msg")]
        codes = ", ".join(
            f"{name} {strip_controls(str(error[name]), 40)}"
            for name in ("code", "error_subcode", "fbtrace_id")
            if error.get(name) is not None
        )
        text = f"Meta: {' '.join(part for part in said if part) or 'an error without a message'} ({codes or 'no code'})"
        transient = error.get("is_transient") is True or error.get("code") in META_TRANSIENT
        return dataclasses.replace(attempt, error=text, retry=transient, body=b"")
    if 200 <= attempt.code < 300:
        received = data.get("events_received")
        if isinstance(received, int) and not isinstance(received, bool) and received >= 1:
            return dataclasses.replace(attempt, body=b"")
        said = "missing" if received is None else strip_controls(orjson.dumps(received).decode(), 40)
        return dataclasses.replace(attempt, error=f"Meta answered {attempt.code} with events_received {said}", body=b"")
    return dataclasses.replace(attempt, body=b"")


def scrub(text: str | None, hidden: Iterable[str]) -> str | None:
    """Text with each secret's value replaced by ***, before it is logged or stored."""
    if text:
        for value in hidden:
            text = text.replace(value, "***")
    return text


class Forwarder:
    """Sends the outbox: due deliveries, a few at a time, each result written back
    by the store's writer. Runs in the app's lifespan."""

    def __init__(
        self,
        store: Store,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        send: Callable[..., Any] = send_forward,
    ) -> None:
        self.store = store
        self.config = config.forward
        self.campaigns = config.campaigns  # their targets' secrets, read as each try is sent
        self.alerts = config.alerts  # [alerts] webhook_url, where each try of an alert goes
        self.clock = clock
        self.send = send
        self.counts: Counter[str] = Counter()  # outcomes since start, for /metrics
        self._inflight: dict[int, asyncio.Task] = {}
        self._hosts: dict[int, str] = {}  # in-flight id -> the host it goes to
        self._finished: dict[int, float] = {}  # id -> when its result was committed (loop time)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    def reconfigure(self, config: Config) -> None:
        """Timeouts, retry pacing and secrets for the next try; a try in flight keeps its own."""
        self.config = config.forward
        self.campaigns = config.campaigns
        self.alerts = config.alerts

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="tinytrack-forwarder")

    def wake(self) -> None:
        self._wakeup.set()

    async def stop(self, grace: float) -> None:
        """Take no new deliveries; give those in flight ``grace`` seconds. What is
        cut off stays pending and is sent after the next start."""
        self._stopping = True
        self._wakeup.set()
        if self._task:
            await self._task
        if self._inflight:
            done, cut = await asyncio.wait(list(self._inflight.values()), timeout=grace)
            for task in cut:
                task.cancel()
            await asyncio.gather(*cut, return_exceptions=True)
            if cut:
                log.info("forwarding: %d deliveries cut off by shutdown stay pending", len(cut))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wakeup.clear()
            await self.start_due(loop)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), FORWARD_POLL_SECONDS)

    async def start_due(self, loop: asyncio.AbstractEventLoop) -> list[asyncio.Task]:
        """Start the due deliveries that fit in the free slots (FORWARD_PER_HOST to a
        host); the tasks started."""
        started: list[asyncio.Task] = []
        per_host = Counter(self._hosts.values())
        for page in range(FORWARD_PAGES):
            read_at = loop.time()
            try:
                due = await self.read_due(int(self.clock() * 1000), FORWARD_BATCH, page * FORWARD_BATCH)
            except Exception as exc:  # a locked or busy database: try again next round
                log.warning("forwarding: cannot read the outbox: %s", exc)
                return started
            # A read that began before a delivery's result was committed still shows it
            # pending: such rows are skipped. Reads that began after have seen the result.
            self._finished = unsure = {i: at for i, at in self._finished.items() if at >= read_at}
            for row in due:
                if len(self._inflight) >= FORWARD_CONCURRENCY:
                    return started
                host = forward_host(row.url)
                if row.id in self._inflight or row.id in unsure or per_host[host] >= FORWARD_PER_HOST:
                    continue
                per_host[host] += 1
                self._hosts[row.id] = host
                self._inflight[row.id] = task = asyncio.create_task(self._deliver(*row))
                started.append(task)
            if len(due) < FORWARD_BATCH:
                return started
        return started

    async def deliver_due(self) -> int:
        """One pass, for tests and tools: start what is due now and wait until those tries
        are written; how many there were. The background loop is this, every poll."""
        started = await self.start_due(asyncio.get_running_loop())
        await asyncio.gather(*started)
        return len(started)

    async def read_due(self, now_ms: int, limit: int, offset: int) -> list[DueDelivery]:
        return await self.store.read(Database.due_deliveries, now_ms, limit, offset)

    async def _deliver(
        self,
        outbox_id: int,
        url: str,
        key: str,
        attempts: int,
        deadline: int,
        campaign: str = "",
        kind: str | None = None,
        body: bytes | None = None,
    ) -> None:
        try:
            started = time.perf_counter()
            try:
                if kind is None:
                    attempt = await self.send(url, key, self.config.timeout_seconds, self.config.allow_private)
                elif kind == "alert":  # to the webhook as the config has it now (a reload may move it)
                    url = self.alerts.webhook_url or url
                    attempt = await self.send(
                        url, key, self.config.timeout_seconds, self.config.allow_private, body=body or b"{}"
                    )
                else:
                    attempt, url = await self._post(outbox_id, url, key, campaign, kind, body or b"{}")
            except (ValueError, UnicodeError, h11.LocalProtocolError) as exc:  # a URL no request can carry
                attempt = Attempt(error=f"cannot send to this URL: {exc}", final=True)
            took = int((time.perf_counter() - started) * 1000)
            now_ms = int(self.clock() * 1000)
            state, due, error = next_step(attempt, attempts + 1, deadline, now_ms, self.config)
            self.counts[state] += 1
            level = logging.DEBUG if state == "done" else logging.INFO if state == "pending" else logging.WARNING
            log.log(level, "forward %d: %s (%s)", outbox_id, state, error or f"HTTP {attempt.code}")
            await self.store.write(
                lambda db, now_ms: db.record_attempt(outbox_id, attempt, state, due, error, took, now_ms, url)
            )
        except Exception:
            log.exception("forward %d: unexpected error; it stays pending", outbox_id)
            await asyncio.sleep(FORWARD_POLL_SECONDS)  # holding its slot: no tight loop if this repeats
        finally:
            self._finished[outbox_id] = asyncio.get_running_loop().time()
            self._inflight.pop(outbox_id, None)
            self._hosts.pop(outbox_id, None)
            self._wakeup.set()  # a slot is free

    async def _post(
        self, outbox_id: int, url: str, key: str, campaign: str, kind: str, body: bytes
    ) -> tuple[Attempt, str]:
        """One try of a json or meta_capi delivery, and the URL it went to: the target as
        the config has it now (its URL, secrets and test code go together: a reload that
        moves a webhook moves its pending deliveries), Meta's user_data from what is kept;
        no secret in what it returns."""
        found = self.campaigns.get(campaign)
        target = found and found.target
        if target is None or target.kind != kind:
            return Attempt(
                error=f"campaigns.{campaign}.forward is no longer of kind {kind}, so its secrets are unknown",
                final=True,
            ), url
        if kind == "meta_capi":
            document = orjson.loads(body)
            document["data"][0]["user_data"].update(await self.store.read(Database.meta_user_data, outbox_id))
            if target.test_event_code:
                document["test_event_code"] = target.test_event_code
            document["access_token"] = target.access_token  # in the body: a URL may reach a proxy's log
            body = orjson.dumps(document)
        try:
            attempt = await self.send(
                target.url,
                key,
                self.config.timeout_seconds,
                self.config.allow_private,
                body=body,
                headers=target.headers,
                read_body=kind == "meta_capi",
            )
        except (ValueError, UnicodeError, h11.LocalProtocolError) as exc:  # an error may quote a header
            attempt = Attempt(error=f"cannot send this request: {exc}", final=True)
        if kind == "meta_capi":
            attempt = meta_answer(attempt)
        return dataclasses.replace(attempt, error=scrub(attempt.error, target.secrets()), body=b""), target.url


# --- Background work: health and alerts -----------------------------------------------


HEALTH_WINDOW_MINUTES = 5  # what the match rate, the refused share and [alerts] look at
MATCHED, ORPHANED, REFUSED = 0, 1, 2  # PostbackHealth's counts
ALERTS = "(alerts)"  # the outbox's campaign for alerts (conversion_id 0)
ALERT_REPEAT_MS = 3_600_000  # a condition is announced at most once an hour
ALERT_CHECK_SECONDS = 60


class PostbackHealth:
    """Postbacks' answers per minute over the last HEALTH_WINDOW_MINUTES: matched to a
    click, orphaned, refused (a 4xx but 404, or a 503). Counting one is a dict lookup."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.minutes: dict[int, list[int]] = {}  # minute -> [matched, orphaned, refused]

    def count(self, kind: int) -> None:
        minute = int(self.clock() // 60)
        bucket = self.minutes.get(minute)
        if bucket is None:
            for old in [m for m in self.minutes if m <= minute - HEALTH_WINDOW_MINUTES]:
                del self.minutes[old]
            bucket = self.minutes[minute] = [0, 0, 0]
        bucket[kind] += 1

    def window(self) -> tuple[int, int, int]:
        """Matched, orphaned and refused postbacks in the last HEALTH_WINDOW_MINUTES."""
        minute = int(self.clock() // 60)
        sums = [0, 0, 0]
        for m, bucket in self.minutes.items():
            if minute - HEALTH_WINDOW_MINUTES < m <= minute:
                for i in range(3):
                    sums[i] += bucket[i]
        return sums[0], sums[1], sums[2]

    def rates(self) -> tuple[float | None, float | None]:
        """The match rate (matched / (matched + orphaned)) and the refused share (refused /
        all), 0 to 1; None with nothing to judge."""
        matched, orphaned, refused = self.window()
        total = matched + orphaned + refused
        return (matched / (matched + orphaned) if matched + orphaned else None, refused / total if total else None)


def judge_health(window: tuple[int, int, int], dead: int, conf: AlertsConfig) -> dict[str, tuple[bool, str]]:
    """Each alert condition: whether it holds, and what to say either way."""
    matched, orphaned, refused = window
    total = matched + orphaned + refused
    refused_pct = Decimal(refused * 100) / total if total else Decimal(0)
    match_pct = Decimal(matched * 100) / (matched + orphaned) if matched + orphaned else Decimal(100)
    minutes = HEALTH_WINDOW_MINUTES
    return {
        "refused": (
            total >= conf.min_postbacks and refused_pct > conf.max_refused_pct,
            f"{refused} of {total} postbacks refused in {minutes} min ({refused_pct:.1f}%; "
            f"alerts.max_refused_pct {conf.max_refused_pct})",
        ),
        "match": (
            matched + orphaned >= conf.min_postbacks and match_pct < conf.min_match_pct,
            f"{matched} of {matched + orphaned} postbacks matched a click in {minutes} min ({match_pct:.1f}%; "
            f"alerts.min_match_pct {conf.min_match_pct})",
        ),
        "dead": (dead > 0, f"{dead} deliveries dead (tinytrack outbox list --state dead)"),
    }


class Background:
    """A loop of the server's own (`_run`), started with it (always: a reload may turn
    its feature on) and cancelled at shutdown."""

    task_name = "tinytrack-background"
    _task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        raise NotImplementedError


class Alerter(Background):
    """[alerts]: every ALERT_CHECK_SECONDS, each condition judged; one that starts to
    hold is announced (at most once an hour), and once it clears, that is announced too.
    Alerts are JSON POSTs queued in the outbox: retried, and sent after a restart."""

    task_name = "tinytrack-alerts"

    def __init__(self, app: TinyTrack) -> None:
        self.app = app
        self.announced: dict[str, bool] = {}
        self.last_fired: dict[str, int] = {}
        self.loaded = False  # the state is kept in the database: a restart neither repeats nor forgets one

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(ALERT_CHECK_SECONDS)
            try:
                await self.check()
            except Exception:  # a busy database: the next check
                log.exception("alerts: the check failed")

    async def check(self) -> list[dict]:
        """One look: the alerts queued (each a body as sent)."""
        conf = self.app.config.alerts
        if not conf.webhook_url:
            return []
        now_ms = int(self.app.clock() * 1000)
        if not self.loaded:
            state = await self.app.store.read(Database.alert_state)
            self.announced, self.last_fired = state.get("announced", {}), state.get("last_fired", {})
            self.loaded = True
        dead = await self.app.store.read(Database.dead_deliveries)
        sent = []
        for name, (holds, text) in judge_health(self.app.health.window(), dead, conf).items():
            if holds and not self.announced.get(name):
                if now_ms - self.last_fired.get(name, -ALERT_REPEAT_MS) < ALERT_REPEAT_MS:
                    continue  # flapping: once an hour is enough
                self.announced[name], self.last_fired[name] = True, now_ms
                sent.append({"alert": name, "state": "firing", "text": text, "at": iso_ms(now_ms)})
            elif not holds and self.announced.get(name):
                self.announced[name] = False
                sent.append({"alert": name, "state": "resolved", "text": text, "at": iso_ms(now_ms)})
        if sent:
            forward = self.app.config.forward
            state = {"announced": self.announced, "last_fired": self.last_fired}

            def queue(db: Database, now: int) -> None:
                for body in sent:
                    db.queue_alert(conf.webhook_url, body, now, forward)
                db.save_alert_state(state)

            await self.app.store.write(queue, fsync=True)
            for body in sent:
                log.warning("alert %s %s: %s", body["alert"], body["state"], body["text"])
            self.app.wake_forwarder()
        return sent


# --- Reports: a process of their own --------------------------------------------------


_report_db: Database | None = None  # the report process's connection


def report_process_start(path: str) -> None:
    """In the report process: a lower CPU priority, and the database opened read-only."""
    global _report_db
    with suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, READER_NICE)
    # The server stops it (Reports.close): Ctrl-C or systemd's SIGTERM to the group is the server's.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _report_db = Database.open_readonly(path)


def report_process_stats(q: StatsQuery) -> list[dict]:
    assert _report_db is not None
    return _report_db.stats(q)


class Reports:
    """Database.stats for the server, in a process of its own at a lower priority
    (started at the first report). A report over millions of raw rows is CPU in
    Python's hands as well as SQLite's: in a thread of the server it shares the GIL
    with the event loop, and a low-priority thread the kernel pauses while holding
    it pauses every click with it (raw-row reports raised click p99 by half even at
    nice 10). A process the kernel can pause freely. A process that dies is started
    again at the next report."""

    def __init__(self, path: str, store: Store) -> None:
        self.path, self.store = path, store
        self._pool: ProcessPoolExecutor | None = None
        self.in_process = True  # False once a process could not be started: the reader's thread, then
        self.closing = False

    async def stats(self, q: StatsQuery) -> list[dict]:
        if self.closing:
            raise HTTPError(Refusal.UNAVAILABLE, "shutting down")
        if self._pool is not None and getattr(self._pool, "_broken", False):
            self.close()  # it died between reports (killed): a new one, and no report lost
        if self._pool is None and self.in_process:
            try:
                self._pool = ProcessPoolExecutor(
                    1,
                    mp_context=multiprocessing.get_context("spawn"),  # not fork: the server has threads
                    initializer=report_process_start,
                    initargs=(self.path,),
                )
            except OSError as exc:  # no process can start here (a sandbox): the reader's thread, then
                log.warning("reports: no process of their own (%s); they run on the reader's thread", exc)
                self.in_process = False
        if not self.in_process:
            return await self.store.read(Database.stats, q)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, report_process_stats, q)
        except BrokenProcessPool:  # it died (killed, out of memory): not run again; the next report starts one
            self.close()
            if self.closing:
                raise HTTPError(Refusal.UNAVAILABLE, "shutting down") from None
            log.warning("reports: the report process stopped during a report; the next one starts a new one")
            raise HTTPError(Refusal.UNAVAILABLE, "the report process stopped (out of memory?): ask again") from None

    def close(self) -> None:
        """Stop the process now, a report in it or not (its read-only work is lost, nothing else)."""
        if self._pool is not None:
            for process in list(getattr(self._pool, "_processes", {}).values()):
                with suppress(OSError):
                    process.kill()  # it ignores SIGTERM (the group's: systemd's stop)
            self._pool.shutdown(wait=True, cancel_futures=True)  # not wait=False: its exit hook then fails
            self._pool = None


# --- Background work: where clicks come from -------------------------------------------


class Enricher(Background):
    """Fills stored clicks' country, device, os and browser ([geo]), in batches after
    they are committed: never on a click's path. Each batch is one short job on the
    writer (enrich_batch: ENRICH_BATCH clicks read, looked up, their facts stored)."""

    task_name = "tinytrack-enrich"

    def __init__(self, app: TinyTrack) -> None:
        self.app = app
        self.geo: Geo | None = None
        self._config: Config | None = None  # the config self.geo was made from
        self.filled = 0  # clicks given something since start

    async def _run(self) -> None:
        while True:
            try:
                looked = await self.step()
            except StorageError:  # writes failing (a full disk): the store says so; the next look
                looked = 0
            except Exception:  # a broken database file, a parser's bug: the next look
                log.exception("geo: filling clicks' country and device failed")
                looked = 0
            await asyncio.sleep(ENRICH_IDLE_SECONDS if looked < ENRICH_BATCH else ENRICH_PAUSE_SECONDS)

    def current_geo(self) -> Geo | None:
        """The Geo of the config as it is now: made again after each reload, so a
        country file replaced in place is read anew."""
        if self.geo is None or self._config is not self.app.config:
            self._config = self.app.config
            try:
                self.geo = Geo(self._config.geo)
            except ConfigError as exc:  # the file went away since the config was read
                log.error("geo: %s", exc)
                self.geo = None
        return self.geo if self.geo else None

    async def step(self) -> int:
        """One batch: how many clicks it looked at."""
        geo = self.current_geo()
        if geo is None:
            return 0
        if not geo.warm:  # ua-parser builds its matcher on first use (~0.5 s): not on the writer
            await asyncio.to_thread(geo.describe, "Mozilla/5.0")
            geo.warm = True
        before = int(self.app.clock() * 1000) - ENRICH_LAG_MS
        job = partial(enrich_batch, geo=geo, limit=ENRICH_BATCH, before_ms=before)
        looked, filled = await self.app.store.write(job)
        self.filled += filled
        return looked

    async def catch_up(self) -> int:
        """Look until nothing is left (tests, and a command that wants it now): clicks filled."""
        before = self.filled
        while await self.step() >= ENRICH_BATCH:
            pass
        return self.filled - before


# --- Background work: purge -----------------------------------------------------------


def purge_step(db: Database, now_ms: int, *, rule: PurgeRule, conf: RetentionConfig) -> int:
    return db.purge_batch(rule, conf, PURGE_BATCH, now_ms)


class Purger:
    """Retention in the background: every ``interval_minutes``, each rule in small
    batches through the store's writer, pausing between them."""

    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.config = config.retention
        self.last: dict[str, int] = {}  # what the last run did, for /metrics
        self._task: asyncio.Task | None = None

    def reconfigure(self, config: Config) -> None:
        """The rules for the next run; a run under way keeps the ones it started with."""
        self.config = config.retention

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="tinytrack-purge")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except StorageError as exc:  # a failing disk: the store has said so already
                log.warning("purge stopped, will try again next interval: %s", exc)
            except Exception as exc:  # a busy database: the next run tries again
                log.error("purge failed, will try again: %s", exc)
            await asyncio.sleep(self.config.interval_minutes * 60)

    async def run_once(self) -> dict[str, int]:
        """Apply every rule until nothing is due; rows touched per rule."""
        done: dict[str, int] = {}
        started = time.perf_counter()
        # One config for the whole run: a reload meanwhile (say clicks_days = 0, to stop a
        # purge) must not turn the next batch's cutoff into "now". It applies next run.
        conf = self.config
        for rule in PURGE_RULES:
            if not rule.days(conf):
                continue
            total = 0
            while True:
                n = await self.store.write(partial(purge_step, rule=rule, conf=conf), rows=PURGE_BATCH, droppable=True)
                total += n
                if n < PURGE_BATCH:
                    break
                await asyncio.sleep(PURGE_PAUSE)
            done[rule.name] = total
        before = math.inf  # until nothing is left, or a step frees nothing (not an incremental auto-vacuum file)
        vacuum = partial(self.store.write, lambda db, now_ms: db.vacuum_step(), rows=VACUUM_PAGES, droppable=True)
        while 0 < (left := await vacuum()) < before:
            before = left
            await asyncio.sleep(PURGE_PAUSE)
        self.last = done
        if any(done.values()):
            log.info(
                "purge: %s in %.1f s",
                ", ".join(f"{what}: {n}" for what, n in done.items() if n),
                time.perf_counter() - started,
            )
        return done


# --- HTTP: the hot path ---------------------------------------------------------------


NO_STORE = (b"cache-control", b"no-store")
JSON_TYPE = (b"content-type", b"application/json")
# The pixel's answer, whatever it was sent: a transparent 1x1 GIF, 43 bytes, never cached;
# byte for byte nginx's empty_gif, which the shipped site answers when it limits a hit.
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIABAAAAAP///yH5BAEAAAEALAAAAAABAAEAAAICTAEAOw==")
PIXEL_HEADERS = ((b"content-type", b"image/gif"), NO_STORE, (b"x-content-type-options", b"nosniff"))
PIXEL_FIELDS = ("click_id", "event", "payout", "currency", "txid")  # what a page may say; status and ts are ours
PIXEL_RESULTS = ("created", "duplicate", "rejected", "ignored", "invalid", "off", "unavailable", "error")


async def send_answer(send: Callable, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_no_store(send: Callable, message: dict) -> None:
    """Starlette's answers, each with Cache-Control: no-store unless it set its own
    (401s, 404s and 405s included: nothing here is for a shared cache)."""
    if message["type"] == "http.response.start" and not any(name == b"cache-control" for name, _ in message["headers"]):
        message["headers"] = [*message["headers"], NO_STORE]
    await send(message)


async def send_refusal(send: Callable, exc: HTTPError, *, text: bool = False) -> None:
    """The one way the hot path refuses: JSON for senders, plain text for visitors."""
    if text:
        return await send_answer(
            send, exc.status, exc.message.encode() + b"\n", [(b"content-type", b"text/plain"), NO_STORE, *exc.headers]
        )
    await send_json(send, exc.status, {"error": exc.message}, exc.headers)


async def send_json(send: Callable, status: int, payload: dict, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    await send_answer(send, status, orjson.dumps(payload), [JSON_TYPE, NO_STORE, *extra])


async def read_body(receive: Callable, limit: int, timeout: float = 10) -> bytes:
    """The request body, refusing with 413 as soon as it passes `limit` bytes
    (chunked bodies have no Content-Length to check up front), and with 408 when it
    takes longer than `timeout` seconds (a slow client holds a connection)."""
    chunks, size = [], 0
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise HTTPError(
                Refusal.TIMEOUT, f"body: not received within {timeout:g} s", [(b"connection", b"close")]
            ) from None
        if message["type"] == "http.disconnect":
            raise HTTPError(Refusal.BAD_REQUEST, "body: client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPError(Refusal.TOO_LARGE, f"body: more than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def header_values(scope: dict, *names: bytes) -> list[str | None]:
    """Values of the named request headers (repeated headers joined by commas)."""
    found: list[str | None] = [None] * len(names)
    for name, value in scope["headers"]:
        if name in names:
            i = names.index(name)
            text = value.decode("latin-1")
            found[i] = text if found[i] is None else f"{found[i]},{text}"
    return found


def store_test_click(click_id: bytes, ms: int, campaign: str, db: Database, now_ms: int) -> None:
    """A selftest click, as a writer job (a function, not a lambda: click() keeps no closure cells)."""
    db.test_click(click_id, ms, campaign)


class TinyTrack:
    """The ASGI app: clicks and postbacks on a raw ASGI hot path (HOT_ROUTES), the
    rest on a Starlette router (Admin), which also runs the lifespan."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        tune_gc: bool = False,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.clock = clock
        self.tune_gc = tune_gc
        self.random = rng  # [0, 1): which lander and offer a click gets
        self.ids = ClickIds(clock)
        self.store = Store(config, clock=clock, on_forward=self.wake_forwarder)
        self.reports = Reports(config.storage.path, self.store)
        self.forwarder = Forwarder(self.store, config, clock=clock)
        self.purger = Purger(self.store, config)
        self.health = PostbackHealth(clock)
        self.selftest_key = ""  # read from the database at startup
        self.alerter = Alerter(self)
        self.enricher = Enricher(self)
        self.clicks = Counter()  # stored since start: human, bot
        self.bad_costs = 0  # clicks whose `cost` was no amount (stored without it)
        self.bad_uids = 0  # clicks whose `uid` was no uid (stored without it)
        self.touches: Counter = Counter()  # POST /touch answers: created, duplicate, or the refusal's code
        self.address_counts = AddressCounts()  # ip_flood's clicks per (campaign, address) this minute
        self.flagged = Counter()  # ("click" | "conversion", flag) -> how many since start
        self.postbacks = Counter()  # answers since start: a PostbackResult's value, or a Refusal's code
        self.lp_clicks = Counter()  # LP clicks stored since start: "known" (of a click), "no_click_id"
        self.pixels = Counter()  # /pixel hits since start, by PIXEL_RESULTS
        self.quarantined = 0  # refused postbacks (a valid token, a 400) kept since start
        self.pixel_on = pixel_on(config)
        self.latency = {name: Histogram(LATENCY_BOUNDS) for name in ("click", "lp_click", "postback")}
        self.router = Admin(self).router(lifespan=self.lifespan)

    def apply_config(self, config: Config) -> None:
        """Every component takes the new config, each at a point it chooses."""
        self.config = config
        self.pixel_on = pixel_on(config)
        for component in (self.store, self.forwarder, self.purger):
            component.reconfigure(config)

    def wake_forwarder(self) -> None:
        self.forwarder.wake()

    def reload(self, path: str) -> bool:
        """Swap in a new config from `path` (SIGHUP). A bad file is refused and
        the running config stays; requests in flight finish on the one they read."""
        try:
            new = load_config(path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return False
        # Where to listen and which database are fixed for the life of the process.
        server = dataclasses.replace(
            new.server, host=self.config.server.host, port=self.config.server.port, uds=self.config.server.uds
        )
        new = dataclasses.replace(new, server=server, storage=self.config.storage)
        self.apply_config(new)
        log.info("reloaded %s: %d campaigns, %d postback tokens", path, len(new.campaigns), len(new.postback.tokens))
        return True

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith("/c/"):
                started = time.perf_counter()
                await self.click(scope, send)
                return self.latency["click"].observe(time.perf_counter() - started)
            if path.startswith("/go/"):
                started = time.perf_counter()
                await self.lp_click(scope, send)
                return self.latency["lp_click"].observe(time.perf_counter() - started)
            if path == "/postback":
                started = time.perf_counter()
                await self.postback(scope, receive, send)
                return self.latency["postback"].observe(time.perf_counter() - started)
            if path == "/touch":
                return await self.touch(scope, receive, send)
            if path == "/pixel" or path == "/pixel.gif":
                return await self.pixel(scope, send)
            return await self.router(scope, receive, partial(send_no_store, send))
        await self.router(scope, receive, send)

    @asynccontextmanager
    async def lifespan(self, app: Starlette):
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        await self.store.open()
        self.selftest_key = await self.store.read(Database.selftest_key)
        self.ids.resume(self.store.last_click_id)
        self.forwarder.start()
        self.purger.start()
        self.alerter.start()
        self.enricher.start()
        if self.tune_gc:
            # Measured: the 16-22 ms p99 tails under load were gen-0 collections of
            # short-lived request objects. Freeze start-up objects, collect less often.
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 50, 100)
        server = self.config.server
        where = f"unix:{server.uds}" if server.uds else f"http://{server.host}:{server.port}"
        log.info(
            "tinytrack %s ready on %s: %d campaigns, database %s",
            __version__,
            where,
            len(self.config.campaigns),
            self.config.storage.path,
        )

    async def shutdown(self) -> None:
        """Stop the background work, finish every queued write, close (once)."""
        if self.store.closed:
            return
        self.reports.closing = True
        self.reports.close()  # first: its read-only connection would keep the writer's close from checkpointing
        await self.alerter.stop()
        await self.enricher.stop()
        await self.purger.stop()
        # Deliveries in flight get a bounded time; their results go through the writer.
        await self.forwarder.stop(grace=min(self.config.forward.timeout_seconds, FORWARD_SHUTDOWN_SECONDS))
        await self.store.close()
        log.info("tinytrack stopped; every acknowledged write is committed")

    def peer_address(self, scope: dict, forwarded_for: str | None) -> str:
        client = scope.get("client")
        return client_address(client[0] if client else None, forwarded_for, self.config.server.trusted_proxies)

    # -- HTTP: clicks, GET /c/<campaign> --

    async def click(self, scope: dict, send: Callable) -> None:
        method = scope["method"]
        if method != "GET" and method != "HEAD":
            return await send_refusal(
                send, HTTPError(Refusal.METHOD_NOT_ALLOWED, headers=[(b"allow", b"GET, HEAD")]), text=True
            )
        campaign = self.config.campaigns.get(scope["path"][3:])
        if campaign is None:
            return await send_refusal(send, HTTPError(Refusal.NOT_FOUND, "unknown campaign"), text=True)
        values, rest = parse_click_query(scope["query_string"])
        user_agent, forwarded_for = header_values(scope, b"user-agent", b"x-forwarded-for")
        user_agent = strip_controls(user_agent, MAX_UA_CHARS) if user_agent else ""
        click_id, ms = self.ids.new()
        if campaign.funnel:
            offer = campaign.offers.pick(self.random)
            lander = campaign.landers and campaign.landers.pick(self.random)
        else:  # a plain `url`: its one offer
            offer, lander = campaign.offers.live[0], None
        if method == "GET":  # HEAD (link previews) gets the same answer and stores nothing
            bot = is_bot(user_agent)
            cost = None
            if "cost" in values or campaign.cost_model is not None:  # else nothing to do, at no cost
                cost = self.click_cost(campaign, values.get("cost"), bot)
            ip = self.peer_address(scope, forwarded_for)
            row = ClickRow(  # in the types SQLite binds fastest: see ClickRow
                bytearray(click_id),
                ms,  # ts: the millisecond inside the id
                campaign.name,
                values.get("sub1"),  # None: the totals' "or ''" needs a falsy none
                values.get("sub2", NO_TEXT),
                values.get("sub3", NO_TEXT),
                values.get("sub4", NO_TEXT),
                values.get("sub5", NO_TEXT),
                values.get("ext_id", NO_TEXT),
                ip,
                user_agent,
                1 if bot else 0,
                -1 if cost is None else cost,
                "" if cost is None else campaign.cost_currency,
                lander.name if lander else NO_TEXT,
                offer.name if campaign.funnel else NO_TEXT,
            )
            test = "selftest" in values and self.is_selftest(values["selftest"])
            if not test:
                flags = None
                if campaign.fraud.click_rules:  # else nothing is counted or looked up
                    flags = self.click_flags(campaign, ip, ms)
                    for name in flags:
                        self.flagged["click", name] += 1
                uid = values.get("uid") and self.click_uid(values["uid"])
                ad_ids = ad_ids_of(values, ms) if AD_MARK in values else None
                if flags or uid or ad_ids:
                    row = WideClickRow.of(row, flags, uid, ad_ids)
            try:
                if test:  # stored apart, committed before the 302 as any click (see Database.test_click)
                    await self.store.write(partial(store_test_click, click_id, ms, campaign.name), fsync=True)
                else:
                    await self.store.record_click(row)
            except StorageError:
                # Never redirect a click we could not store: the conversion would be lost.
                return await send_refusal(
                    send, HTTPError(Refusal.UNAVAILABLE, "try again", [(b"retry-after", b"1")]), text=True
                )
            if not test:
                self.clicks["bot" if row[11] else "human"] += 1  # row.bot (a flagged row is a plain tuple)
        values["click_id"] = format_uuid(click_id)
        values["campaign"] = campaign.name
        values["offer"] = offer.name
        if lander:
            values["lander"] = lander.name
        location = (lander or offer).url.fill(values, rest if campaign.pass_query else ())
        await send_answer(send, 302, b"", [(b"location", location.encode()), NO_STORE])

    # -- HTTP: LP clicks, GET /go/<campaign>?cid=<click id>[&offer=<name>] --

    async def lp_click(self, scope: dict, send: Callable) -> None:
        """A lander's call to action: stored (committed) before the 302 to an offer, as
        a click is. Whatever the cid says, the visitor gets an offer."""
        method = scope["method"]
        if method != "GET" and method != "HEAD":
            return await send_refusal(
                send, HTTPError(Refusal.METHOD_NOT_ALLOWED, headers=[(b"allow", b"GET, HEAD")]), text=True
            )
        campaign = self.config.campaigns.get(scope["path"][4:])
        if campaign is None:
            return await send_refusal(send, HTTPError(Refusal.NOT_FOUND, "unknown campaign"), text=True)
        values, rest = parse_click_query(scope["query_string"])
        cid = named = None
        if rest:
            cid, named, rest = lp_params(rest)
        click_id = parse_click_id(cid)
        pick = campaign.offers.pick(self.random)
        if method == "HEAD":  # the same kind of answer, nothing stored and nothing read
            offer = campaign.offers.choose(named, None, pick)
            values["click_id"] = format_uuid(click_id or self.ids.new()[0])
        else:
            # A cid that is no click id at all: a new click, at once. One that names no
            # click of the campaign: found out by the writer, which then stores nothing.
            user_agent, forwarded_for = header_values(scope, b"user-agent", b"x-forwarded-for")
            user_agent = strip_controls(user_agent, MAX_UA_CHARS) if user_agent else ""
            bot = is_bot(user_agent)
            new = None
            if click_id is None:
                why = f"cid: not a click id, got {quoted(cid)}" if cid else "cid: missing"
                new = self.lp_new_click(scope, forwarded_for, user_agent, campaign, values, named, pick, why)
            try:
                stored = await self.store.record_lp_click(LPClick(click_id, campaign, named, pick, bot, new))
                if stored is None:
                    why = "cid: no click of this campaign"
                    new = self.lp_new_click(scope, forwarded_for, user_agent, campaign, values, named, pick, why)
                    stored = await self.store.record_lp_click(LPClick(None, campaign, named, pick, bot, new))
            except StorageError:
                return await send_refusal(
                    send, HTTPError(Refusal.UNAVAILABLE, "try again", [(b"retry-after", b"1")]), text=True
                )
            self.lp_clicks["known" if new is None else "no_click_id"] += 1
            offer, stored_id, values = stored
            values["click_id"] = format_uuid(stored_id)
        values["campaign"] = campaign.name
        values["offer"] = offer.name
        location = offer.url.fill(values, rest if campaign.pass_query else ())
        await send_answer(send, 302, b"", [(b"location", location.encode()), NO_STORE])

    def lp_new_click(
        self,
        scope: dict,
        forwarded_for: str | None,
        user_agent: str,
        campaign: Campaign,
        values: Mapping[str, str],
        named: str | None,
        pick: Arm,
        why: str,
    ) -> WideClickRow:
        """The click an LP click without one of its campaign stores (flagged no_click_id by
        the writer): sub ids and ext_id from its own query, no lander, no cost (whatever
        it cost came with the click we can't find), flagged no_click_id with `why`."""
        click_id, ms = self.ids.new()
        ip = self.peer_address(scope, forwarded_for)
        row = ClickRow(
            bytearray(click_id),
            ms,
            campaign.name,
            values.get("sub1"),
            values.get("sub2", NO_TEXT),
            values.get("sub3", NO_TEXT),
            values.get("sub4", NO_TEXT),
            values.get("sub5", NO_TEXT),
            values.get("ext_id", NO_TEXT),
            ip,
            user_agent,
            1 if is_bot(user_agent) else 0,
            -1,
            "",
            NO_TEXT,
            campaign.offers.choose(named, None, pick).name if campaign.funnel else NO_TEXT,
        )
        flags = {"no_click_id": why}
        if campaign.fraud.click_rules:
            flags.update(self.click_flags(campaign, ip, ms))
        for name in flags:
            self.flagged["click", name] += 1
        uid = values.get("uid") and self.click_uid(values["uid"])
        return WideClickRow.of(row, flags, uid, ad_ids_of(values, ms) if AD_MARK in values else None)

    def is_selftest(self, key: str) -> bool:
        """Whether a click's tinytrack_selftest= is this database's selftest key (anyone
        else's is an ordinary click parameter)."""
        return bool(self.selftest_key) and hmac.compare_digest(key.encode(), self.selftest_key.encode())

    def click_uid(self, text: str) -> str | None:
        """A click's uid, or None (counted) for one that is no uid: a visitor is never refused."""
        if UID_RE.fullmatch(text):
            return text
        self.bad_uids += 1
        return None

    def click_flags(self, campaign: Campaign, ip: str, ms: int) -> dict[str, str]:
        """What the campaign's click rules say of a click from `ip` (see click_flags)."""
        fraud = campaign.fraud
        count = self.address_counts.add(campaign.name, ip, ms) if fraud.ip_clicks_per_minute is not None else 0
        return click_flags(fraud, ip, count)

    def click_cost(self, campaign: Campaign, text: str | None, bot: bool) -> int | None:
        """A click's cost: its own `cost` (a bad one is counted and dropped), else the model's."""
        own = None
        if text:  # empty: the source left its macro blank
            own = click_cost_units(text, campaign.max_click_cost)
            if own is None:
                self.bad_costs += 1
        return campaign.click_cost(own, bot)

    # -- HTTP: postbacks, GET/POST /postback --

    async def postback(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Read a postback, store it, answer it, and log one line for it."""
        try:
            postback, fields = await self.read_postback(scope, receive)
            try:
                outcome = await self.store.record_postback(postback)
            except StorageError:
                raise HTTPError(Refusal.UNAVAILABLE, headers=[(b"retry-after", b"5")]) from None
            # Refused by what its click says (a ts before it, a total's limit).
            if outcome.result is PostbackResult.INVALID:
                click = format_uuid(postback.click_id) if postback.click_id else "-"
                log.info("postback 400 %s campaign=%s click=%s", outcome.reason, outcome.campaign, click)
                self.postbacks[Refusal.BAD_REQUEST.code] += 1
                self.health.count(REFUSED)
                await self.quarantine(fields, outcome.reason, postback.ip)
                return await send_refusal(send, FieldError.from_message(outcome.reason))
        except HTTPError as exc:
            # A full disk is told once by the store, not once per postback a network retries.
            log.log(
                logging.DEBUG if exc.refusal is Refusal.UNAVAILABLE else logging.INFO,
                "postback %d %s",
                exc.status,
                exc.message,
            )
            self.postbacks[exc.refusal.code] += 1
            self.health.count(REFUSED)
            return await send_refusal(send, exc)
        result = outcome.result
        self.postbacks[result.value] += 1
        self.health.count(ORPHANED if result is PostbackResult.ORPHAN else MATCHED)
        for name in outcome.flags:
            self.flagged["conversion", name] += 1
        # One line per postback (no token): what came, for which campaign, what it became.
        counted = result is not PostbackResult.ORPHAN and result is not PostbackResult.REJECTED
        level = logging.INFO if self.config.server.log_postbacks or not counted else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(
                level,
                "postback %s id=%s campaign=%s click=%s event=%s status=%s ip=%s",
                result.value,
                outcome.id,
                outcome.campaign,
                format_uuid(postback.click_id) if postback.click_id else "-",  # "-": a user id's (never logged)
                postback.event,
                postback.status,
                mask_ip(postback.ip),
            )
        if result is PostbackResult.ORPHAN:
            return await send_json(send, 404, {"error": "unknown click_id"})
        if result is PostbackResult.REJECTED:
            return await send_json(send, 200, {"status": "rejected", "reason": outcome.reason})
        await send_json(send, 200, {"status": result.value, "id": outcome.id})

    # -- HTTP: the browser pixel, GET /pixel --

    async def pixel(self, scope: dict, send: Callable) -> None:
        """A conversion reported by the advertiser's page (an <img>): no token, so it is
        stored as [pixel] status says (pending), and a postback for the same key confirms
        it. Every hit is answered the same GIF: an error never reaches a browser."""
        result = "off"
        try:
            if self.pixel_on:
                result = await self.record_pixel(scope)
        except HTTPError as exc:
            result = "invalid"
            log.debug("pixel ignored: %s", exc.message)
        except Exception:
            result = "error"
            log.exception("pixel: unexpected error (the GIF was sent all the same)")
        self.pixels[result] += 1
        await send_answer(send, 200, PIXEL_GIF, [*PIXEL_HEADERS])

    async def record_pixel(self, scope: dict) -> str:
        """Store what a pixel hit says; what it came to (PIXEL_RESULTS)."""
        (forwarded_for,) = header_values(scope, b"x-forwarded-for")
        ip = self.peer_address(scope, forwarded_for)
        fields = collect_fields(parse_pairs(scope["query_string"], "query"))
        given = {name: fields[name] for name in PIXEL_FIELDS if name in fields}
        if "click_id" not in given:
            raise FieldError("click_id", "is required")
        postback = build_postback(given, self.config.postback, self.clock(), ip)
        postback = dataclasses.replace(postback, status=self.config.pixel.status, source=PIXEL)
        try:
            outcome = await self.store.record_postback(postback)
        except StorageError:
            return "unavailable"
        log.debug(
            "pixel %s id=%s campaign=%s %s", outcome.result.value, outcome.id, outcome.campaign, outcome.reason or ""
        )
        return outcome.result.value

    # -- HTTP: touches, POST /touch --

    async def touch(self, scope: dict, receive: Callable, send: Callable) -> None:
        """A touch that never passed through /c/ (an email, a CRM, an organic visit): a
        user, a campaign, its channel and when; authenticated as a postback is."""
        try:
            if scope["method"] != "POST":
                raise HTTPError(Refusal.METHOD_NOT_ALLOWED, headers=[(b"allow", b"POST")])
            fields, _, now = await self.read_signed_fields(scope, receive, TOUCH_ALIASES)
            touch = build_touch(fields, self.config.campaigns, now)
            try:
                result, touch_id = await self.store.write(lambda db, now_ms: db.add_touch(touch, now_ms))
            except StorageError:
                raise HTTPError(Refusal.UNAVAILABLE, headers=[(b"retry-after", b"5")]) from None
        except HTTPError as exc:
            self.touches[str(exc.status)] += 1
            log.log(
                logging.DEBUG if exc.refusal is Refusal.UNAVAILABLE else logging.INFO,
                "touch %d %s",
                exc.status,
                exc.message,
            )
            return await send_refusal(send, exc)
        self.touches[result] += 1
        await send_json(send, 200, {"status": result, "id": touch_id})

    async def read_postback(self, scope: dict, receive: Callable) -> tuple[Postback, dict[str, str]]:
        """A postback, authenticated and validated, and its fields as sent; HTTPError says
        why not. One authenticated but refused for what it says is quarantined first."""
        method = scope["method"]
        if method != "GET" and method != "POST":
            raise HTTPError(Refusal.METHOD_NOT_ALLOWED, headers=[(b"allow", b"GET, POST")])
        fields, ip, now = await self.read_signed_fields(scope, receive, POSTBACK_ALIASES)
        try:
            return build_postback(fields, self.config.postback, now, ip), fields
        except FieldError as exc:
            await self.quarantine(fields, exc.message, ip)
            raise

    async def quarantine(self, fields: Mapping[str, str], reason: str, ip: str) -> None:
        """Keep a postback a network sent with a valid token and we refused (a 400): networks
        rarely retry a 400, so without this the money would be gone (see reconcile)."""
        try:
            await self.store.write(lambda db, now_ms: db.quarantine_postback(fields, reason, ip, now_ms))
            self.quarantined += 1
        except Exception as exc:  # a full disk: the 400 still goes out; the log says what was lost
            log.warning("postback refused (%s) and not quarantined: %s", reason, exc)

    async def read_signed_fields(
        self, scope: dict, receive: Callable, aliases: Mapping[str, str]
    ) -> tuple[dict[str, str], str, float]:
        """What a network's server sent (a postback, a touch): its fields (query, and a
        POST's body), checked against the allowlist, a token and any HMAC secrets; the
        sender's address; the time. HTTPError says why not."""
        conf = self.config.postback
        method = scope["method"]
        forwarded_for, authorization, content_type, length, signature = header_values(
            scope, b"x-forwarded-for", b"authorization", b"content-type", b"content-length", b"x-tinytrack-signature"
        )
        ip = self.peer_address(scope, forwarded_for)
        if conf.allow_ips and not match_networks(parse_address(ip), conf.allow_ips):
            raise HTTPError(Refusal.FORBIDDEN)
        query = scope["query_string"]
        query_pairs: list[tuple[str, Any]] = parse_pairs(query, "query")
        pairs, body = query_pairs, b""
        if method == "POST":
            if length and (not DIGITS_RE.fullmatch(length) or int(length) > MAX_BODY_BYTES):
                raise HTTPError(Refusal.TOO_LARGE)
            body = await read_body(receive, MAX_BODY_BYTES, self.config.server.read_timeout_seconds)
            if body:
                pairs = query_pairs + parse_body(body, content_type)
        try:
            fields = collect_fields(pairs, aliases)
        except FieldError as exc:  # a field twice, a JSON object: refused for what it says
            sent = {  # as sent, but whole UTF-8 (a JSON "\ud800" can't be stored)
                name: str(value).encode("utf-8", "replace").decode()
                for name, value in pairs
                if isinstance(value, str | int | float)
            }
            given = next((sent[name] for name in ("token", "key") if name in sent), None)
            if aliases is POSTBACK_ALIASES and token_matches(given or bearer_token(authorization), conf.tokens):
                kept = {k: v for k, v in sent.items() if POSTBACK_ALIASES.get(k, "token") != "token"}
                await self.quarantine(kept, exc.message, ip)
            raise
        if not token_matches(fields.get("token") or bearer_token(authorization), conf.tokens):
            raise HTTPError(Refusal.UNAUTHORIZED, headers=[(b"www-authenticate", b"Bearer")])
        now = self.clock()
        if conf.hmac_secrets:
            if not verify_signature(signature, body if method == "POST" else query, conf.hmac_secrets, now):
                raise HTTPError(Refusal.UNAUTHORIZED, headers=[(b"www-authenticate", b"Bearer")])
            if method == "POST":
                refuse_unsigned_fields(query_pairs, aliases)
        return fields, ip, now


def pixel_on(config: Config) -> bool:
    """Whether /pixel may store anything: [pixel] enabled, or a campaign's pixel = true."""
    return config.pixel.enabled or any(campaign.pixel for campaign in config.campaigns.values())


def create_app(
    config: Config,
    *,
    clock: Callable[[], float] = time.time,
    tune_gc: bool = False,
    rng: Callable[[], float] = random.random,
) -> TinyTrack:
    """Build the ASGI app for a config; nothing starts until the lifespan runs."""
    return TinyTrack(config, clock=clock, tune_gc=tune_gc, rng=rng)


# --- HTTP: admin, API and metrics -----------------------------------------------------


def listing_answer(rows: list[dict], columns: tuple[str, ...], limit: int, fmt: str) -> Response:
    """A page of rows; the cursor for the next page is ``next`` (JSON) or X-Next-After (CSV)."""
    after = str(rows[-1]["id"]) if len(rows) == limit else None
    headers = {"cache-control": "no-store"}
    if fmt == "json":
        return Response(orjson.dumps({"rows": rows, "next": after}), headers=headers, media_type="application/json")
    if after:
        headers["x-next-after"] = after
    text = csv_text(columns, ([row[column] for column in columns] for row in rows))
    return Response(text, headers=headers, media_type="text/csv; charset=utf-8")


ADMIN_FUNNELS = 20  # campaigns with landers or offers that /admin shows a table for
ADMIN_HEADERS = {
    "cache-control": "no-store",
    # Sub ids and events come from the internet: no script may run here, whatever slips through.
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


class Admin:
    """Everything but clicks and postbacks: /healthz, the demo page, and behind the
    admin token the JSON/CSV API, /metrics and /admin. Reads only, beside the writer."""

    def __init__(self, app: TinyTrack) -> None:
        self.app = app

    def router(self, lifespan: Callable) -> Starlette:
        return Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/demo", self.demo),
                Route("/", self.index),
                Route("/api/conversions", self.api_conversions),
                Route("/api/conversions/import", self.api_import, methods=["POST"]),
                Route("/api/quarantine", self.api_quarantine),
                Route("/api/conversions/{id:int}", self.api_conversion),
                Route("/api/conversions/{id:int}/review", self.api_review, methods=["POST"]),
                Route("/api/orphans", self.api_orphans),
                Route("/api/outbox", self.api_outbox),
                Route("/api/stats", self.api_stats),
                Route("/api/costs", self.api_costs, methods=["PUT"]),
                Route("/metrics", self.metrics),
                Route("/admin", self.admin_page),
                Route("/admin/conversions/{id:int}", self.admin_conversion),
            ],
            exception_handlers={HTTPError: self.refused, 404: self.refused, 405: self.refused},
            lifespan=lifespan,
        )

    async def refused(self, request: Request, exc: Exception) -> Response:
        """The one way a refusal is answered here: Starlette's own 404/405 included."""
        if not isinstance(exc, HTTPError):
            refusal = Refusal.METHOD_NOT_ALLOWED if getattr(exc, "status_code", 404) == 405 else Refusal.NOT_FOUND
            exc = HTTPError(refusal)
        headers = {name.decode(): value.decode() for name, value in exc.headers}
        return JSONResponse({"error": exc.message}, exc.status, headers={"cache-control": "no-store", **headers})

    def require_admin(self, request: Request) -> None:
        """admin.token as a Bearer token or the HTTP Basic password, or a 401."""
        if not admin_authorized(request.headers.get("authorization"), self.app.config.admin.token):
            raise HTTPError(Refusal.UNAUTHORIZED, headers=[(b"www-authenticate", b'Basic realm="tinytrack"')])

    async def healthz(self, request: Request) -> Response:
        """200 while reads answer and writes commit; 503 (with why) when either fails."""
        store, health = self.app.store, self.app.store.health
        answer = {
            "ok": True,
            "version": __version__,
            "campaigns": len(self.app.config.campaigns),
            "pending_writes": store.pending,
            "writes": "failing" if store.failing else "ok",
            "last_commit": health.last_commit and iso_ms(int(health.last_commit * 1000)),
        }
        if store.failing:
            answer.update(
                ok=False,
                failing_since=iso_ms(int(health.failing_since * 1000)),
                failed_batches=health.failures,
                error=health.last_error,
            )
        try:
            await store.read(Database.ping)
        except Exception as exc:  # any failure to read is "not healthy", never a 500
            answer.update(ok=False, error=str(exc))
        return JSONResponse(answer, 200 if answer["ok"] else 503, headers={"cache-control": "no-store"})

    async def index(self, request: Request) -> Response:
        return JSONResponse({"name": "tinytrack", "version": __version__})

    async def demo(self, request: Request) -> Response:
        config = self.app.config
        if not config.demo:
            raise HTTPError(Refusal.NOT_FOUND)
        click_id = request.query_params.get("click_id", "")
        if not UUID_RE.fullmatch(click_id):
            return HTMLResponse("<p>No click id here. Start at <a href='/c/demo'>/c/demo</a>.</p>", 400)
        # The token is shown only to the machine the server runs on: the embedded
        # default listens on loopback, but someone may pass --host 0.0.0.0. The Host
        # must name loopback too, or a page on any site could read it by DNS rebinding.
        peer = request.client.host if request.client else ""
        host = request.headers.get("host", "")
        local = (
            match_networks(parse_address(peer), config.server.trusted_proxies)
            and "x-forwarded-for" not in request.headers
            and is_loopback_host(host)
        )
        token = config.postback.tokens[0] if local else "YOUR_POSTBACK_TOKEN"
        base = f"{request.url.scheme}://{host if HOST_RE.fullmatch(host) else 'YOUR_TRACKER'}"
        body = orjson.dumps({"click_id": click_id, "payout": "1.50"}).decode()
        curl_get = f"curl {shlex.quote(f'{base}/postback?click_id={click_id}&payout=1.50&token={token}')}"
        curl_post = (
            f"curl -X POST {shlex.quote(base + '/postback')} -H {shlex.quote('Authorization: Bearer ' + token)} "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
        )
        page = DEMO_PAGE.format(
            click_id=html.escape(click_id), curl_get=html.escape(curl_get), curl_post=html.escape(curl_post)
        )
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    async def api_conversions(self, request: Request) -> Response:
        """Conversions for reconciliation: ?since=&campaign=&status=&flag=&after=&limit=&format=json|csv"""
        self.require_admin(request)
        params = request.query_params
        status = params.get("status")
        if status is not None and status not in STATUSES:
            raise FieldError("status", f"must be one of {', '.join(STATUSES)}, got {quoted(status)}")
        flag = params.get("flag")
        if flag is not None and flag not in FLAGS:
            raise FieldError("flag", f"must be one of {', '.join(FLAGS)}, got {quoted(flag)}")
        since, after, limit, fmt = listing_params(params)
        rows = await self.app.store.read(
            Database.conversions, since, after, limit, params.get("campaign"), status, flag
        )
        if fmt == "csv":
            for row in rows:
                row["flags"] = row["flags"] and "; ".join(f"{name}: {why}" for name, why in row["flags"].items())
        return listing_answer(rows, CONVERSION_COLUMNS, limit, fmt)

    async def api_conversion(self, request: Request) -> Response:
        """One conversion: its fields, its history and how it was credited (`attribution`)."""
        self.require_admin(request)
        view = await self.conversion_or_404(request.path_params["id"])
        return Response(orjson.dumps(view), headers={"cache-control": "no-store"}, media_type="application/json")

    async def conversion_or_404(self, conversion_id: int) -> dict:
        found = conversion_id <= MAX_SUM and await self.app.store.read(Database.conversion, conversion_id)
        if not found:  # past SQLite's integers, or not there
            raise HTTPError(Refusal.NOT_FOUND, f"conversion {conversion_id}: no such conversion")
        return found

    async def api_import(self, request: Request) -> Response:
        """POST {"rows": [{"click_id", "txid", "event", "payout", "currency", "status", "ts"}, ...]}:
        a network's report, stored as reconcile --apply stores it (source import); an answer per row."""
        self.require_admin(request)
        length = request.headers.get("content-length")
        if length and (not DIGITS_RE.fullmatch(length) or int(length) > MAX_IMPORT_BODY):
            raise HTTPError(Refusal.TOO_LARGE, f"body: more than {MAX_IMPORT_BODY} bytes")
        body = await read_body(request.receive, MAX_IMPORT_BODY)
        try:
            rows = orjson.loads(body).get("rows")
        except (orjson.JSONDecodeError, AttributeError):
            rows = None
        if not isinstance(rows, list) or not rows or len(rows) > MAX_IMPORT_ROWS:
            raise FieldError("rows", f"must be a list of 1-{MAX_IMPORT_ROWS} objects in a JSON body")
        answers: list[dict] = []
        valid: list[tuple[int, Postback]] = []
        now = self.app.clock()
        for i, item in enumerate(rows):
            try:
                if not isinstance(item, dict):
                    raise FieldError(f"rows[{i}]", "must be an object of postback fields")
                fields = collect_fields(item.items())
                if "click_id" not in fields:
                    raise FieldError("click_id", "is required")
                pb = build_postback(fields, self.app.config.postback, now, "import")
                valid.append((i, dataclasses.replace(pb, source=IMPORT)))
                answers.append({"row": i})
            except FieldError as exc:
                answers.append({"row": i, "status": "invalid", "error": exc.message})
        if valid:
            outcomes: list[PostbackOutcome] = []
            try:
                for start in range(0, len(valid), IMPORT_ROWS_PER_WRITE):  # clicks are written in between
                    chunk = [pb for _, pb in valid[start : start + IMPORT_ROWS_PER_WRITE]]
                    outcomes += await self.app.store.write(
                        lambda db, now_ms, chunk=chunk: [
                            db.apply_postback(pb, now_ms, self.app.store.policy) for pb in chunk
                        ],
                        rows=len(chunk),
                        fsync=True,  # answered "created" means stored, as for a postback
                    )
            except StorageError:
                raise HTTPError(Refusal.UNAVAILABLE, headers=[(b"retry-after", b"5")]) from None
            for (i, _), outcome in zip(valid, outcomes):
                answers[i] = import_answer(i, outcome)
            self.app.wake_forwarder()
        counts = Counter(answer["status"] for answer in answers)
        log.info("import: %d rows: %s", len(rows), ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        return Response(
            orjson.dumps({"rows": answers, "counts": dict(sorted(counts.items()))}),
            headers={"cache-control": "no-store"},
            media_type="application/json",
        )

    async def api_quarantine(self, request: Request) -> Response:
        """Postbacks refused for what they said (a valid token, a 400): ?since=&after=&limit=&format=json|csv"""
        self.require_admin(request)
        since, after, limit, fmt = listing_params(request.query_params)
        rows = await self.app.store.read(Database.quarantined, since, after, limit)
        if fmt == "csv":
            rows = [{**row, "fields": orjson.dumps(row["fields"]).decode()} for row in rows]
        return listing_answer(rows, QUARANTINE_COLUMNS, limit, fmt)

    async def api_review(self, request: Request) -> Response:
        """POST {"decision": "approve" | "reject"}: an operator's word on a held conversion."""
        self.require_admin(request)
        conversion_id = request.path_params["id"]
        if conversion_id > MAX_SUM:  # SQLite's integers stop there: no such conversion
            raise HTTPError(Refusal.NOT_FOUND, f"conversion {conversion_id}: no such conversion")
        body = await read_body(request.receive, MAX_BODY_BYTES)
        try:
            decision = orjson.loads(body).get("decision")
        except (orjson.JSONDecodeError, AttributeError):
            decision = None
        if decision not in REVIEW_DECISIONS:
            got = quoted(body[:40].decode("utf-8", "replace"))
            raise FieldError("decision", f'must be "approve" or "reject", in a JSON body, got {got}')
        try:
            answer, done = await self.app.store.write(
                lambda db, now_ms: db.review(conversion_id, decision, now_ms, self.app.store.policy)
            )
        except StorageError:
            raise HTTPError(Refusal.UNAVAILABLE, headers=[(b"retry-after", b"5")]) from None
        if not done:
            code = 404 if answer == "no such conversion" else 409
            return JSONResponse(
                {"error": f"conversion {conversion_id}: {answer}"}, code, headers={"cache-control": "no-store"}
            )
        self.app.wake_forwarder()
        log.info("conversion %d reviewed: %s, now %s", conversion_id, decision, answer)
        return JSONResponse({"id": conversion_id, "status": answer}, headers={"cache-control": "no-store"})

    async def api_orphans(self, request: Request) -> Response:
        """Postbacks for unknown click ids: ?since=&after=&limit=&format=json|csv"""
        self.require_admin(request)
        since, after, limit, fmt = listing_params(request.query_params)
        return listing_answer(
            await self.app.store.read(Database.orphans, since, after, limit), ORPHAN_COLUMNS, limit, fmt
        )

    async def api_outbox(self, request: Request) -> Response:
        """Forwards to traffic sources: ?state=&since=&after=&limit=&format=json|csv"""
        self.require_admin(request)
        state = request.query_params.get("state")
        if state is not None and state not in OUTBOX_STATES:
            raise FieldError("state", f"must be one of {', '.join(OUTBOX_STATES)}, got {quoted(state)}")
        since, after, limit, fmt = listing_params(request.query_params)
        rows = await self.app.store.read(Database.deliveries, since, after, limit, state)
        return listing_answer(rows, OUTBOX_COLUMNS, limit, fmt)

    async def api_stats(self, request: Request) -> Response:
        """A report: ?from=&to=&tz=&by=&campaign=&bots=&convert=&format=json|csv (by: up to three fields)"""
        self.require_admin(request)
        params = request.query_params
        fmt = params.get("format", "json")
        if fmt not in ("json", "csv"):
            raise FieldError("format", f"must be json or csv, got {quoted(fmt)}")
        q = stats_query(params, self.app.clock(), self.app.config.money, campaign_channels(self.app.config))
        slots_since = await self.app.store.read(Database.slots_since)
        q = dataclasses.replace(q, slots_since=slots_since)
        rows = await self.app.reports.stats(q)
        headers = {"cache-control": "no-store"}
        if fmt == "json":
            answer = stats_answer(q, rows, report_kept(self.app.config.retention, self.app.clock(), slots_since))
            return Response(orjson.dumps(answer), headers=headers, media_type="application/json")
        return Response(csv_text(*stats_table(q, rows)), headers=headers, media_type="text/csv; charset=utf-8")

    async def api_costs(self, request: Request) -> Response:
        """A source's spend report: PUT {"rows": [...]} as JSON, or CSV with a header; ?tz= its zone."""
        self.require_admin(request)
        tz = zone_param(request.query_params.get("tz"))
        length = request.headers.get("content-length")
        too_large = HTTPError(Refusal.TOO_LARGE, f"body: more than {MAX_COST_BODY} bytes")
        if length and (not DIGITS_RE.fullmatch(length) or int(length) > MAX_COST_BODY):
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_COST_BODY:
                raise too_large
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in ("application/json", "text/csv"):
            raise HTTPError(Refusal.UNSUPPORTED_MEDIA_TYPE, "content-type: must be application/json or text/csv")
        campaigns, last_day = self.app.config.campaigns, self.upload_last_day()
        loop = asyncio.get_running_loop()
        count, rows = await loop.run_in_executor(None, parse_cost_upload, bytes(body), media, campaigns, tz, last_day)
        replaced = 0
        try:
            for start in range(0, len(rows), COST_ROWS_PER_WRITE):
                part = rows[start : start + COST_ROWS_PER_WRITE]
                replaced += await self.app.store.write(partial(Database.upload_costs, rows=part, tz=tz), len(part))
        except StorageError:
            raise HTTPError(Refusal.UNAVAILABLE, headers=[(b"retry-after", b"5")]) from None
        log.info("costs uploaded: %d rows (tz %s), %d replaced an earlier upload", count, tz, replaced)
        return JSONResponse({"rows": count, "replaced": replaced}, headers={"cache-control": "no-store"})

    def upload_last_day(self) -> int:
        return int(self.app.clock() // 86400) + 1  # tomorrow: east of UTC it may already be

    async def metrics(self, request: Request) -> Response:
        """Prometheus text format."""
        self.require_admin(request)
        app, lines = self.app, []

        def metric(name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]) -> None:
            lines.extend((f"# HELP {name} {help_}", f"# TYPE {name} {kind}"))
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        metric(
            "tinytrack_clicks_total",
            "counter",
            "Clicks stored since start.",
            [(f'{{bot="{int(kind == "bot")}"}}', app.clicks[kind]) for kind in ("human", "bot")],
        )
        metric(
            "tinytrack_click_cost_invalid_total",
            "counter",
            "Clicks whose cost was not a decimal >= 0 with at most 6 decimals (or over max_click_cost): stored without it.",
            [("", app.bad_costs)],
        )
        metric(
            "tinytrack_click_uid_invalid_total",
            "counter",
            "Clicks whose uid was not 1-64 characters of A-Z a-z 0-9 . _ : - (stored without it).",
            [("", app.bad_uids)],
        )
        metric(
            "tinytrack_touches_total",
            "counter",
            "POST /touch answers since start: created, duplicate, or the HTTP status it was refused with.",
            [(f'{{result="{r}"}}', app.touches[r]) for r in sorted({"created", "duplicate", *app.touches})],
        )
        match_rate, refused_rate = app.health.rates()
        metric(
            "tinytrack_postback_match_rate",
            "gauge",
            f"Postbacks matched to a click, of those matched or orphaned, in the last {HEALTH_WINDOW_MINUTES} "
            "minutes (0-1; NaN: none).",
            [("", "NaN" if match_rate is None else round(match_rate, 6))],
        )
        metric(
            "tinytrack_postback_refused_rate",
            "gauge",
            f"Postbacks refused (a 4xx but 404, or a 503), of all, in the last {HEALTH_WINDOW_MINUTES} minutes "
            "(0-1; NaN: none).",
            [("", "NaN" if refused_rate is None else round(refused_rate, 6))],
        )
        metric(
            "tinytrack_quarantined_total",
            "counter",
            "Postbacks with a valid token refused for what they said, kept in the quarantine since start.",
            [("", app.quarantined)],
        )
        metric(
            "tinytrack_pixel_total",
            "counter",
            "GET /pixel hits since start, by what they came to (each was answered the same GIF).",
            [(f'{{result="{r}"}}', app.pixels[r]) for r in sorted({*PIXEL_RESULTS, *app.pixels})],
        )
        metric(
            "tinytrack_lp_clicks_total",
            "counter",
            "LP clicks (/go/) stored since start: of a known click, or of none (a new click flagged no_click_id).",
            [(f'{{click="{kind}"}}', app.lp_clicks[kind]) for kind in ("known", "no_click_id")],
        )
        metric(
            "tinytrack_flags_total",
            "counter",
            "Fraud flags given since start, by what got them (click, conversion) and flag.",
            [
                (f'{{kind="{kind}",flag="{flag}"}}', app.flagged[kind, flag])
                for kind in ("click", "conversion")
                for flag in FLAGS
            ],
        )
        metric(
            "tinytrack_postbacks_total",
            "counter",
            "Postbacks answered since start, by result.",
            [(f'{{result="{r}"}}', n) for r, n in sorted(app.postbacks.items())],
        )
        metric(
            "tinytrack_forwards_total",
            "counter",
            "Forward attempts since start, by the state they led to.",
            [(f'{{outcome="{o}"}}', app.forwarder.counts[o]) for o in ("done", "pending", "failed", "dead")],
        )
        outbox = await app.store.read(Database.outbox_states)
        metric(
            "tinytrack_outbox",
            "gauge",
            "Deliveries in the outbox, by state.",
            [(f'{{state="{state}"}}', n) for state, n in outbox.items()],
        )
        metric("tinytrack_write_queue", "gauge", "Writes waiting for the next commit.", [("", app.store.pending)])
        path = app.config.storage.path
        size = sum(os.stat(f).st_size for f in (path, f"{path}-wal") if os.path.exists(f))
        metric("tinytrack_database_bytes", "gauge", "Size of the database file and its WAL.", [("", size)])
        metric(
            "tinytrack_purged_rows",
            "gauge",
            "Rows the last purge touched, by rule.",
            [(f'{{rule="{log_safe(rule)}"}}', n) for rule, n in app.purger.last.items()],
        )
        lines.extend(
            ("# HELP tinytrack_commit_batch_size Writes per commit.", "# TYPE tinytrack_commit_batch_size histogram")
        )
        lines.extend(app.store.batch_sizes.lines("tinytrack_commit_batch_size"))
        lines.extend(
            ("# HELP tinytrack_request_seconds Time to answer, by route.", "# TYPE tinytrack_request_seconds histogram")
        )
        for route, histogram in app.latency.items():
            lines.extend(histogram.lines("tinytrack_request_seconds", f'route="{route}"'))
        return Response(
            "\n".join(lines) + "\n",
            media_type="text/plain; version=0.0.4; charset=utf-8",
            headers={"cache-control": "no-store"},
        )

    async def admin_page(self, request: Request) -> Response:
        """One page for a person: a report chosen with a form (range, zone, grouping,
        campaign, and the filters its drill-down links add), its totals and charts, and
        what needs a look: deliveries, held conversions, the latest conversions, orphans."""
        self.require_admin(request)
        config, read = self.app.config, self.app.store.read
        params = dict(request.query_params)
        params["by"] = ",".join(v for v in request.query_params.getlist("by") if v) or "campaign"
        error, status = None, 200
        try:
            q = stats_query(params, self.app.clock(), config.money, campaign_channels(config))
        except FieldError as exc:  # said on the page, over the form as it was sent
            error, status = exc.message, 400
            q = stats_query({}, self.app.clock(), config.money, campaign_channels(config))
        slots_since = await read(Database.slots_since)
        q = dataclasses.replace(q, slots_since=slots_since)
        stats = self.app.reports.stats
        rows = await stats(q)
        overall = q if q.by == ("campaign",) else dataclasses.replace(q, by=("campaign",))
        per_day = q if q.by == ("day",) else dataclasses.replace(q, by=("day",))
        funnels = {}  # campaign -> its landers' and offers' rows, for the campaigns that have them
        if not q.filters:
            names = [name for name, c in config.campaigns.items() if c.funnel and q.campaign in (None, name)]
            for name in names[:ADMIN_FUNNELS]:
                funnels[name] = [
                    (by, row)
                    for by in ("lander", "offer")
                    for row in await stats(dataclasses.replace(q, by=(by,), campaign=name))
                ]
        view = AdminView(
            q=q,
            form=params,
            error=error,
            campaigns=sorted(config.campaigns),
            rows=rows,
            overall=rows if overall is q else await stats(overall),
            days=rows if per_day is q else await stats(per_day),
            facts=report_facts(q, report_kept(config.retention, self.app.clock(), slots_since)),
            conversions=await read(Database.recent_conversions, 20),
            orphans=await read(Database.recent_orphans, 10),
            outbox=await read(Database.outbox_states),
            problems=await read(Database.troubled_deliveries, 10),
            funnels=funnels,
            held=await read(Database.held_conversions, 20),
            quarantined=await read(Database.latest_quarantined, 10),
        )
        return HTMLResponse(render_admin(view), status_code=status, headers=ADMIN_HEADERS)

    async def admin_conversion(self, request: Request) -> Response:
        """One conversion for a person: its fields, history and credit."""
        self.require_admin(request)
        view = await self.conversion_or_404(request.path_params["id"])
        return HTMLResponse(render_conversion(view), headers=ADMIN_HEADERS)


access_log = logging.getLogger("tinytrack.access")


class AccessLog:
    """tinytrack's own access log (uvicorn's prints query strings, tokens and all):
    masked client address, redacted query, status and time. Headers never."""

    def __init__(self, app: TinyTrack) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 0

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            forwarded_for = header_values(scope, b"x-forwarded-for")[0]
            query = "?" + redact_query(scope["query_string"]) if scope["query_string"] else ""
            path = log_safe(scope.get("raw_path", b"").decode("ascii", "backslashreplace") or scope["path"])
            access_log.info(
                '%s "%s %s%s" %d %.1fms',
                mask_ip(self.app.peer_address(scope, forwarded_for)),
                scope["method"],
                path,
                query,
                status,
                (time.perf_counter() - started) * 1000,
            )


# --- CLI ------------------------------------------------------------------------------


class QuietUpgrades(logging.Filter):
    """uvicorn warns twice about each WebSocket upgrade it won't serve (tinytrack serves
    none): lines anyone could make it write, so they are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Unsupported upgrade request") or message.startswith("No supported WebSocket"))


LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"quiet_upgrades": {"()": QuietUpgrades}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
            "filters": ["quiet_upgrades"],
        }
    },
    "loggers": {
        "tinytrack": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}


class UvicornServer(uvicorn.Server):
    """uvicorn's server, but a signal is a clean stop: after the graceful shutdown
    the process exits 0 (uvicorn re-raises the signal, which systemd sees as a kill).
    SIGHUP calls `on_hangup` (reload the config)."""

    def __init__(self, config: uvicorn.Config, on_hangup: Callable[[], object] | None = None) -> None:
        super().__init__(config)
        self.on_hangup = on_hangup

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handlers = {signal.SIGINT: self.handle_exit, signal.SIGTERM: self.handle_exit}
        if self.on_hangup:
            handlers[signal.SIGHUP] = lambda sig, frame: self.on_hangup()
        originals = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


DEFAULT_CONFIG = "config.toml"  # what `tinytrack init` writes, and what is used when found here


def config_path(args: argparse.Namespace) -> str | None:
    """-c, else $TINYTRACK_CONFIG, else ./config.toml when there is one (said on stderr)."""
    path = args.config or os.environ.get("TINYTRACK_CONFIG")
    if path:
        return path
    if os.path.exists(DEFAULT_CONFIG):
        print(f"tinytrack: using ./{DEFAULT_CONFIG} (-c FILE chooses another)", file=sys.stderr)
        return DEFAULT_CONFIG
    return None


def bind_tcp_sockets(host: str, port: int) -> list[socket.socket]:
    """The listening sockets, bound before anything else starts, so an address in use is
    one line and exit 1 (uvicorn would print "ready" first, then a traceback). One per
    address the host names, as asyncio's create_server: "localhost" is 127.0.0.1 and ::1."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TinytrackError(f"server.host: cannot listen on {host}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    for family, kind, proto, _, address in dict.fromkeys(infos):
        sock = socket.socket(family, kind, proto)
        sockets.append(sock)
        try:
            # As uvicorn: a restart may bind while the old process's connections linger.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # its IPv4 twin has its own socket
            sock.bind(address)
            sock.listen(2048)
        except OSError as exc:
            for opened in sockets:
                opened.close()
            raise TinytrackError(f"{host}:{port}: {exc.strerror}") from None
    return sockets


def bind_unix_socket(path: str) -> socket.socket:
    """A listening unix socket, mode 0660: the owner and its group (nginx joins it)
    may connect. uvicorn's own --uds makes it 0666, open to every local user."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        pass
    except ConnectionRefusedError:
        os.unlink(path)  # left by a process that died: nobody listens on it
    except OSError as exc:
        raise TinytrackError(f"{path}: {exc.strerror}") from None
    else:
        raise TinytrackError(f"{path}: another server is listening on it")
    finally:
        probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # no window in which the socket is wider than 0660
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise TinytrackError(f"{path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    sock.listen(2048)
    return sock


def check_database(path: str) -> None:
    """Open the database (making or migrating it) and check it takes writes, before
    serving: a read-only file or folder is one line and exit 1. A full disk is not
    refused here: the server starts, answers 503 and recovers once there is room."""
    try:
        with closing(Database.open(path)) as db:
            db.can_write()
    except sqlite3.Error as exc:
        if not is_disk_full(exc):
            raise TinytrackError(f"{path}: {exc}") from None
    except (StorageError, OSError) as exc:
        raise TinytrackError(f"{path}: {exc}") from None


def guarded_http_protocol() -> type | str:
    """uvicorn's httptools protocol with two repairs (or "auto" where it is missing).

    - A request's headers must be complete within ``timeout_keep_alive`` of the
      connection or of the previous answer: uvicorn stops that clock at the first byte,
      so a client sending a byte now and then held a connection for good (slowloris).
    - When a client closes with pipelined requests queued, the request being answered is
      told it is gone; uvicorn told only the last one queued, and the answer's write to
      the closed transport logged a RuntimeError traceback."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class GuardedHttpProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.running_cycle = None
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

        def _unset_keepalive_if_required(self) -> None:
            pass  # bytes arriving don't stop the clock; complete headers do (below)

        def stop_header_clock(self) -> None:
            if self.timeout_keep_alive_task is not None:
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = None

        def on_headers_complete(self) -> None:
            self.stop_header_clock()
            super().on_headers_complete()

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            self.running_cycle = cycle
            super()._start_asgi_task(cycle, app)

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_header_clock()
            cycle = self.running_cycle
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            super().connection_lost(exc)

    return GuardedHttpProtocol


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the tracker (one uvicorn worker)."""
    path = config_path(args)
    from_file = load_config(path) if path else None
    base = from_file.server if from_file else ServerConfig()
    server = dataclasses.replace(
        base, host=args.host or base.host, port=args.port or base.port, uds=args.uds or base.uds
    )
    # Listen first: an address in use is one line, before anything is made or printed.
    sockets = [bind_unix_socket(server.uds)] if server.uds else bind_tcp_sockets(server.host, server.port)
    try:
        config = dataclasses.replace(from_file or embedded_default(args), server=server)
        check_database(config.storage.path)
        app = create_app(config, tune_gc=True)
        uvicorn_config = uvicorn.Config(
            AccessLog(app) if server.access_log else app,
            lifespan="on",
            http=guarded_http_protocol(),
            ws="none",  # no WebSockets here; uvicorn's handshake log line carried the raw query (tokens)
            timeout_keep_alive=server.read_timeout_seconds,
            proxy_headers=False,  # tinytrack reads X-Forwarded-For itself, right to left
            server_header=False,
            access_log=False,
            log_config=LOG_CONFIG,
            timeout_graceful_shutdown=30,
        )
        hangup = (lambda: app.reload(path)) if path else (lambda: log.info("SIGHUP: no config file to reload"))
        runner = UvicornServer(uvicorn_config, on_hangup=hangup)
        # As socket objects, not fd=: uvicorn takes an fd for a unix socket, and a TCP
        # connection served as one loses TCP_NODELAY (a JSON answer then waited 40 ms
        # for the client's delayed ACK: postbacks fell from 12k to 1.4k a second).
        runner.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        if server.uds:
            with suppress(FileNotFoundError):
                os.unlink(server.uds)
    return 0 if runner.started else 1


def embedded_default(args: argparse.Namespace) -> Config:
    """The no-config set-up: tokens made once, kept in the database, shown once."""
    host, port = args.host or "127.0.0.1", args.port or 8080
    path = StorageConfig().path
    try:
        db = Database.open(path)
    except (sqlite3.Error, StorageError) as exc:
        raise TinytrackError(f"{path}: {exc}") from None
    with closing(db):
        others = db.campaigns_with_clicks(other_than="demo", limit=4)
        if others:  # a real set-up's database, run without its config: the demo would 404 its campaigns
            raise TinytrackError(
                f"./{path} holds clicks of campaigns other than the demo ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}): give its config with -c FILE"
            )
        with db.transaction():
            postback_token, made = db.meta_token("postback_token")
            admin_token, _ = db.meta_token("admin_token")
    config = embedded_config(host, port, postback_token, admin_token)
    where = f"http://{host}:{port}"
    print(f"tinytrack {__version__}: no config given, serving the embedded default from ./{path}")
    print(f"  try a click:       {where}/c/demo")
    print(f"  reports:           {where}/admin (any user name, the admin token as password)")
    if made:
        print(f"  postback token:    {postback_token}")
        print(f"  admin token:       {admin_token}")
        print("  (kept in the database: `tinytrack tokens` shows them again. For a real set-up run `tinytrack init`.)")
    else:
        print("  tokens: `tinytrack tokens` shows them (the demo page shows the postback token)")
    sys.stdout.flush()
    return config


def cmd_tokens(args: argparse.Namespace) -> int:
    """Show the embedded default's tokens, read from ./tinytrack.db on this machine."""
    path = config_path(args)
    if path:
        load_config(path)
        print(f"{path}: the tokens are in that file ([postback] tokens, [admin] token)")
        return 0
    db = StorageConfig().path
    if not os.path.exists(db):
        raise TinytrackError(f"./{db}: no database here yet (`tinytrack serve` makes it and its tokens)")
    try:
        with closing(Database.open_readonly(db)) as reader:
            tokens = reader.meta_values("postback_token", "admin_token")
    except sqlite3.Error as exc:
        raise TinytrackError(f"./{db}: {exc}") from None
    if not tokens:
        raise TinytrackError(f"./{db}: holds no embedded-default tokens (a config file's are in that file)")
    print(f"postback token:  {tokens.get('postback_token', '-')}")
    print(f"admin token:     {tokens.get('admin_token', '-')}")
    return 0


def render_config(path: str) -> str:
    """A commented config with fresh random tokens."""
    return CONFIG_TEMPLATE.format(
        path=path, postback_token=secrets.token_urlsafe(24), admin_token=secrets.token_urlsafe(24)
    )


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented config with fresh random tokens (never overwrites)."""
    path = args.file
    try:
        # O_EXCL: never overwrite; 0600: the file holds secrets.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise TinytrackError(f"{path}: already exists, not overwritten") from None
    except OSError as exc:
        raise TinytrackError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(render_config(path))
    print(f"wrote {path}; edit the campaigns, then: tinytrack serve -c {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a config file; exit 1 naming the key and the problem."""
    path = config_path(args)
    if not path:
        print("no config given (-c FILE or TINYTRACK_CONFIG): serve would use the embedded default")
        return 0
    config = load_config(path)
    print(f"ok: {path}: {len(config.campaigns)} campaigns, {len(config.postback.tokens)} postback tokens")
    return 0


def open_for_command(args: argparse.Namespace) -> tuple[Config, Database]:
    """The config (or the embedded default's) and its database, for a command run
    beside the server: WAL lets it read while the server writes, and its short
    writes wait for the server's (busy_timeout)."""
    path = config_path(args)
    config = load_config(path) if path else Config()
    if not os.path.exists(config.storage.path):
        raise TinytrackError(f"{config.storage.path}: no database here yet (serve creates it)")
    try:
        return config, Database.open(config.storage.path)
    except (sqlite3.Error, StorageError) as exc:
        raise TinytrackError(f"{config.storage.path}: {exc}") from None


def print_table(rows: list[dict], columns: Iterable[str]) -> None:
    """Rows as aligned text columns; numbers right-aligned."""
    columns = list(columns)
    cells = [[("" if row.get(c) is None else str(row[c])) for c in columns] for row in rows]
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]
    numeric = [all(re.fullmatch(r"-?[0-9.,%]+", line[i] or "0") for line in cells) for i in range(len(columns))]
    for line in [columns, *cells]:
        print("  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(line, widths, numeric)).rstrip())


def cmd_outbox(args: argparse.Namespace) -> int:
    """List, inspect, retry and replay forwards to traffic sources."""
    config, db = open_for_command(args)
    with closing(db):
        return OUTBOX_ACTIONS[args.action](args, config, db)


def outbox_list(args: argparse.Namespace, config: Config, db: Database) -> int:
    rows = db.latest_deliveries(args.state, args.limit)
    if not rows:
        print(f"no {args.state or ''} deliveries".replace("  ", " "))
        return 0
    for row in rows:
        row["last_error"] = row["last_error"] and quoted(row["last_error"], 60).strip("'\"")
        row["when"] = row["next_at"] if row["state"] == "pending" else row["last_at"]
    print_table(rows, ("id", "state", "campaign", "status", "attempts", "when", "last_code", "last_error"))
    return 0


def outbox_show(args: argparse.Namespace, config: Config, db: Database) -> int:
    delivery = db.delivery(args.id)
    if delivery is None:
        raise TinytrackError(f"outbox: no delivery {args.id}")
    for name, value in delivery.items():
        print(f"{name:>14}  {'' if value is None else value}")
    print()
    print_table(db.attempts(args.id), ("at", "code", "ms", "url", "error"))
    return 0


def outbox_retry(args: argparse.Namespace, config: Config, db: Database) -> int:
    if not args.ids and not args.all_dead and not args.all_failed:
        raise TinytrackError("outbox retry: give delivery ids, --all-dead or --all-failed")
    now_ms = int(time.time() * 1000)
    states = [state for state, wanted in (("dead", args.all_dead), ("failed", args.all_failed)) if wanted]
    with db.transaction():  # one transaction; the server's forwarder picks them up within a second
        count, missing = db.retry_deliveries(
            args.ids, states, now_ms, now_ms + config.forward.max_age_hours * 3_600_000
        )
    print(f"{count} deliveries pending again")
    if missing:
        raise TinytrackError(
            f"outbox retry: not retried (no such delivery, or not dead, failed or canceled): "
            f"{', '.join(map(str, missing))}"
        )
    return 0


def outbox_replay(args: argparse.Namespace, config: Config, db: Database) -> int:
    try:
        since = parse_since(args.since)
    except FieldError as exc:
        raise TinytrackError(f"--{exc.message}") from None
    forwarding = {name: c for name, c in config.campaigns.items() if c.postback_url or c.target}
    if args.campaign:
        if args.campaign not in config.campaigns:
            raise TinytrackError(f"--campaign: no campaign {quoted(args.campaign)} in the config")
        forwarding = {args.campaign: forwarding[args.campaign]} if args.campaign in forwarding else {}
    if not forwarding:
        raise TinytrackError("outbox replay: no campaign (of those asked for) has a postback_url or forward kind")
    now_ms = int(time.time() * 1000)
    queued = Counter()
    with db.transaction():
        for conversion_id, facts, status, payout, currency in db.conversions_to_replay(since, list(forwarding)):
            campaign = forwarding[facts.campaign]
            if not campaign.forwards(facts.event, status):
                continue
            if not args.dry_run:
                queued[campaign.name] += db.queue_forwards(
                    campaign, conversion_id, facts, status, payout, currency, now_ms, config.forward
                )
            else:
                queued[campaign.name] += bool(facts.click_id) and (
                    bool(campaign.postback_url) + campaign.target_hears(facts.event, status)
                )
    verb = "would queue" if args.dry_run else "queued"
    print(f"{verb} {sum(queued.values())} deliveries" + "".join(f"\n  {n}: {k}" for n, k in sorted(queued.items())))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Totals per day, campaign, sub id or status, read beside the running server."""
    config, db = open_for_command(args)
    try:
        q = stats_query(
            {
                "from": args.date_from,
                "to": args.date_to,
                "by": args.by,
                "tz": args.tz,
                "campaign": args.campaign,
                "bots": "1" if args.bots else "0",
                "convert": "0" if args.no_convert else "1",
            },
            time.time(),
            config.money,
            campaign_channels(config),
        )
    except FieldError as exc:
        raise TinytrackError(f"--{exc.message}") from None
    with closing(db):
        q = dataclasses.replace(q, slots_since=db.slots_since())
        rows = db.stats(q)
        answer = stats_answer(q, rows, report_kept(config.retention, time.time(), q.slots_since))
    if args.json:
        sys.stdout.write(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    header, cells = stats_table(q, rows)
    if args.csv:
        sys.stdout.write(csv_text(header, cells))
        return 0
    # The table keeps to what it has: no costs, no cost columns; no landers, no LP columns; no flags, no flag columns; no pixel, no pixel_only.
    hide = () if any(row["cost"] for row in rows) else ("cost_", "profit_", "roi_", "cpa_")
    if not any(row["lp_clicks"] or row["lp_ctr"] for row in rows):
        hide = (*hide, "lp_clicks", "lp_ctr")
    if not any(row["flagged_clicks"] or row["flagged_conversions"] for row in rows):
        hide = (*hide, "flagged_")
    if not any(row["pixel_only"] for row in rows):
        hide = (*hide, "pixel_only")
    if hide:
        keep = [i for i, name in enumerate(header) if not name.startswith(hide)]
        header, cells = [header[i] for i in keep], [[line[i] for i in keep] for line in cells]
    print(
        f"{day_text(q.first_day)} to {day_text(q.last_day)} ({q.tz}), by {', '.join(q.by)}"
        + (f", campaign {q.campaign}" if q.campaign else "")
        + (f"; from the {STATS_SOURCES['raw']}" if q.source == "raw" else "")
    )
    if "complete_from" in answer:
        print(f"complete from {answer['complete_from']} (older rows are no longer kept)")
    if not rows:
        print("nothing in that range")
        return 0
    print_table([dict(zip(header, line)) for line in cells], header)
    if "currency" in answer:
        rates = ", ".join(f"1 {cur} = {rate} {answer['currency']}" for cur, rate in answer["rates"].items())
        print(f"money in {answer['currency']}" + (f" ({rates})" if rates else ""))
        if answer["unconverted"]:
            print(f"not converted, no rate in [money] rates: {', '.join(answer['unconverted'])}")
    return 0


def cmd_flags(args: argparse.Namespace) -> int:
    """Fraud flags: recompute applies today's rules to past conversions and prints what changes."""
    config, db = open_for_command(args)
    try:
        since = parse_since(args.since)
    except FieldError as exc:
        raise TinytrackError(f"--{exc.message}") from None
    with closing(db):
        facts = db.flag_facts(since)
        # ip_cluster: conversions on one address's clicks in the hour up to each, in ts order
        recent: dict[str, list[int]] = {}
        changes: list[tuple[int, dict | None, FraudConfig]] = []
        for cid, created, ts, click_ts, name, _status, _reason, stored, click_json, bot, ip, kept, clicked in facts:
            campaign = config.campaigns.get(name)
            if campaign is None:
                continue  # no longer configured: its conversions keep what they have
            fraud = campaign.fraud
            cluster = 0
            if ip:
                times = [t for t in recent.get(ip, ()) if t > ts - 3_600_000] + [ts]
                recent[ip] = times
                limit = fraud.ip_conversions_per_hour
                cluster = min(len(times), limit + 1) if limit is not None else 0  # as the writer counts
            if created < since:
                continue  # only counted for ip_cluster
            ctit = ts - click_ts if clicked else None  # credited to a touch: no click to time
            flags = recomputed_flags(fraud, stored, click_json, bool(kept), bool(bot), ip, ctit, cluster)
            if flags != orjson.loads(stored or "{}"):
                changes.append((cid, flags or None, fraud))
        now_ms = int(time.time() * 1000)
        old = {row[0]: orjson.loads(row[7] or "{}") for row in facts}
        campaigns = {row[0]: config.campaigns.get(row[4]) for row in facts}
        for start in range(0, len(changes), FLAG_BATCH):
            batch = changes[start : start + FLAG_BATCH]
            lines = []
            with nullcontext() if args.dry_run else db.transaction(fsync=True):  # short, beside the server
                for cid, flags, fraud in batch:
                    before, after = old[cid], flags or {}
                    gained = [name for name in after if name not in before]
                    what = ", ".join(
                        [f"+{name}" for name in gained] + [f"-{name}" for name in before if name not in after]
                    )
                    what = what or "evidence updated"
                    if not args.dry_run:  # the action only for a new flag: an operator's review stands
                        what += "; " + db.apply_flags(
                            cid,
                            flags,
                            campaigns[cid],
                            fraud,
                            now_ms,
                            config.forward,
                            reverse=args.reverse_forwarded,
                            act=bool(gained),
                        )
                    lines.append(f"conversion {cid}: {what}")
            print("\n".join(lines))
        verb = "would change" if args.dry_run else "changed"
        print(f"{len(changes)} of {sum(1 for row in facts if row[1] >= since)} conversions {verb}")
    return 0


FORGET_BATCH = 1000  # rows per transaction of `forget` (clicks walked, for --ip)


def cmd_forget(args: argparse.Namespace) -> int:
    """Erase a person: their clicks and touches, and the personal fields of their
    conversions, in short transactions beside the running server; daily totals stay."""
    config, db = open_for_command(args)
    if args.user_id is not None and not UID_RE.fullmatch(args.user_id):
        raise TinytrackError(f"--user-id: must be 1-64 characters of A-Z a-z 0-9 . _ : -, got {quoted(args.user_id)}")
    if args.ip is not None and parse_address(args.ip) is None:
        raise TinytrackError(f"--ip: not an IP address, got {quoted(args.ip)}")
    total: Counter = Counter()
    with closing(db):
        if args.user_id is not None:
            while True:
                with nullcontext() if args.dry_run else db.transaction(fsync=True):
                    done = db.forget_user(args.user_id, FORGET_BATCH, args.dry_run)
                total.update(done)
                if args.dry_run or not any(done.values()):
                    break
        else:
            if args.dry_run:
                total.update(db.forget_ip_due(args.ip))
            for table, _, start in () if args.dry_run else Database.FORGET_IP_WALKS:
                after = start
                while after is not None:
                    with db.transaction(fsync=True):
                        done, after = db.forget_ip(args.ip, table, after, FORGET_BATCH)
                    total.update(done)
    who = f"user id {args.user_id}" if args.user_id is not None else f"address {args.ip}"
    what = ", ".join(f"{n} {name}" for name, n in sorted(total.items()) if n)
    print(f"{'would forget' if args.dry_run else 'forgot'} {who}: {what or 'nothing found'}")
    print("daily totals are kept (they hold no person)")
    return 0


GOOGLE_ADS_COLUMNS = (
    "Google Click ID",
    "Conversion Name",
    "Conversion Time",
    "Conversion Value",
    "Conversion Currency",
)


def google_ads_csv(rows: Iterable[tuple], name: str, tz: str) -> str:
    """Google Ads' offline conversion import file (click conversions by gclid): its
    Parameters:TimeZone line, its header, and each conversion's time in that zone."""
    where = zone(tz)
    out = io.StringIO()
    out.write(f"Parameters:TimeZone={'+0000' if tz in ('UTC', 'Etc/UTC') else tz}\n")
    writer = csv.writer(out, lineterminator="\n")  # no ' prefix (csv_cell): a gclid may start with -
    writer.writerow(GOOGLE_ADS_COLUMNS)
    for gclid, ts, payout, currency in rows:
        at = dt.datetime.fromtimestamp(ts / 1000, where).strftime("%Y-%m-%d %H:%M:%S")
        writer.writerow((gclid, name, at, format_money(payout), currency))
    return out.getvalue()


def cmd_export(args: argparse.Namespace) -> int:
    """Files for ad platforms: google-ads, the offline conversion import of approved
    conversions whose click had a gclid (uploading it, which needs OAuth, stays yours)."""
    config, db = open_for_command(args)
    try:
        since = parse_since(args.since)
        zone(args.tz)
    except FieldError as exc:
        raise TinytrackError(f"--{exc.message}") from None
    if not args.conversion_name.strip() or len(args.conversion_name) > 100:
        raise TinytrackError("--conversion-name: the conversion action's name in Google Ads, 1-100 characters")
    with closing(db):
        rows = db.google_ads_conversions(since)
    sys.stdout.write(google_ads_csv(rows, args.conversion_name, args.tz))
    print(f"{len(rows)} conversions", file=sys.stderr)
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Compare a network's report (CSV) with what is stored, by click id and txid (or event);
    --apply stores what is missing and corrects what differs, as postbacks would."""
    config, db = open_for_command(args)
    mapping = parse_report_map(args.map)
    try:
        text = Path(args.file).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise TinytrackError(f"{args.file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TinytrackError(f"{args.file}: not UTF-8 text") from None
    try:
        window = [
            parse_day(day, f"--{name}") if day else None for name, day in (("since", args.since), ("until", args.until))
        ]
    except FieldError as exc:
        raise TinytrackError(exc.message) from None
    rows = read_report(text, mapping, config.postback, time.time())
    readable = [row.postback for row in rows if row.postback is not None]
    days = [pb.ts_ms // DAY_MS for pb in readable if pb.ts_given]
    first = window[0] if window[0] is not None else min(days, default=None)
    last = window[1] if window[1] is not None else max(days, default=None)
    with closing(db):
        judged = [judge_report_row(row, db.report_lookup(row.postback)) if row.postback else row for row in rows]
        if first is not None and last is not None:
            keys = {(row.postback.click_id, row.postback.dedupe_key) for row in judged if row.postback is not None}
            # conversions a row may be, though which can't be said, are not "only here"
            maybe = {row.postback.click_id for row in judged if row.category == "ambiguous"}
            maybe |= {row.click for row in judged if row.click is not None}
            for conversion_id, click_id, campaign, event, txid, status, payout, currency, ts in db.report_only_here(
                first * DAY_MS, (last + 1) * DAY_MS, keys, maybe
            ):
                stored = (conversion_id, status, payout, currency, None, None, txid, event)
                pb = Postback(bytes(click_id), event, payout, True, currency, txid or None, status, ts, True)
                judged.append(ReportRow(0, pb, "only_here", f"conversion {conversion_id}, {campaign}", stored))
        changes, unchanged = reconcile_apply(db, config, judged) if args.apply else ([], [])
    print_reconcile(args.file, judged, first, last, args.show)
    if args.csv:
        Path(args.csv).write_text(csv_text(RECONCILE_CSV_COLUMNS, map(reconcile_csv_line, judged)))
        print(f"every row: {args.csv}")
    if args.apply:
        print(f"applied: {len(changes)} changes" + "".join(f"\n  {change}" for change in changes))
        if unchanged:
            print(f"not changed: {len(unchanged)}" + "".join(f"\n  {line}" for line in unchanged))
    else:
        todo = sum(row.category in APPLIED for row in judged)
        print(f"read only: nothing was written ({todo} rows --apply would store or correct)")
    return 0


RECONCILE_CSV_COLUMNS = (
    "category",
    "line",
    "click_id",
    "txid",
    "event",
    "file_status",
    "file_payout",
    "file_currency",
    "stored_id",
    "stored_status",
    "stored_payout",
    "stored_currency",
    "detail",
)


def reconcile_csv_line(row: ReportRow) -> list[object]:
    pb, stored = row.postback, row.stored
    file = (
        [format_uuid(pb.click_id), pb.txid or "", pb.event, pb.status, format_money(pb.payout), pb.currency]
        if pb is not None
        else [""] * 6
    )
    if row.category == "only_here":  # the stored conversion is the row: nothing came from the file
        file[3:] = ["", "", ""]
    here = [stored[0], stored[1], format_money(stored[2]), stored[3]] if stored else ["", "", "", ""]
    return [RECONCILE_CATEGORIES[row.category], row.line or "", *file, *here, row.detail]


def print_reconcile(name: str, rows: list[ReportRow], first: int | None, last: int | None, show: int) -> None:
    """The categories' counts, then the first `show` rows of each but matched."""
    counts = Counter(row.category for row in rows)
    span = f"{day_text(first)} to {day_text(last)} (UTC)" if first is not None and last is not None else None
    print(
        f"{name}: {sum(row.category != 'only_here' for row in rows)} rows; "
        + (f"only-here looked for in {span}" if span else "no ts column nor --since/--until: only-here not looked for")
    )
    width = max(map(len, RECONCILE_CATEGORIES.values()))
    for key, label in RECONCILE_CATEGORIES.items():
        print(f"  {label:<{width}}  {counts[key]:>6}")
    for key, label in RECONCILE_CATEGORIES.items():
        listed = [row for row in rows if row.category == key][:show] if key != "matched" else []
        if listed:
            print(f"{label} (first {len(listed)} of {counts[key]}):")
            for row in listed:
                line = reconcile_csv_line(row)
                where = f"line {row.line}" if row.line else "stored"
                print(f"  {where}: click {line[2] or '-'} txid {line[3] or '-'} {line[4]}  {row.detail}".rstrip())


def reconcile_apply(db: Database, config: Config, rows: list[ReportRow]) -> tuple[list[str], list[str]]:
    """Store what is missing and correct what differs, each row as a postback from the
    report (source import): history kept, totals and forwards as for any postback. What
    each did, for people; a second run finds them matched and does nothing."""
    policy = WritePolicy.of(config)
    done, unchanged = [], []
    for row in rows:
        if row.category not in APPLIED:
            continue
        with db.transaction(fsync=True):
            outcome = db.apply_postback(row.postback, int(time.time() * 1000), policy)
        pb = row.postback
        said = f"{pb.status} {format_money(pb.payout)} {pb.currency}"
        if outcome.result is PostbackResult.CREATED:
            done.append(f"line {row.line}: created conversion {outcome.id} ({said})")
        elif outcome.result is PostbackResult.UPDATED:
            done.append(f"line {row.line}: updated conversion {outcome.id} ({row.detail})")
        elif outcome.result is PostbackResult.REJECTED and outcome.id is not None:
            done.append(f"line {row.line}: stored conversion {outcome.id}, not counted: {outcome.reason}")
        else:
            unchanged.append(f"line {row.line}: {outcome.result.value}: {outcome.reason or 'nothing changed'}")
    return done, unchanged


class SelftestFailed(TinytrackError):
    def __init__(self, stage: str, problem: str) -> None:
        super().__init__(f"selftest failed at {stage}: {problem}")
        self.stage = stage


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the unix socket `serve` listens on (server.uds)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def selftest_request(
    base: str,
    target: str,
    stage: str,
    headers: Mapping[str, str] = {},  # noqa: B006 (read only)
) -> tuple[int, dict[str, str], bytes]:
    """One GET of the running server (base: http(s)://host[:port] or unix:/path): its
    status, headers (lower-cased) and body; SelftestFailed naming the stage if none came."""
    try:
        if base.startswith("unix:"):
            conn: http.client.HTTPConnection = UnixHTTPConnection(base[5:], 10)
        else:
            parts = urlsplit(base)
            kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = kind(parts.netloc, timeout=10)
        try:
            conn.request("GET", target, headers={"User-Agent": f"tinytrack-selftest/{__version__}", **headers})
            answer = conn.getresponse()
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as exc:
        raise SelftestFailed(stage, f"no answer from {base}: {exc}") from None


def cmd_selftest(args: argparse.Namespace) -> int:
    """Drive a click, an LP click (where the campaign has landers) and a postback through
    the running server, check what it stored, and leave nothing behind: exit 0, or 1
    naming the stage that failed. Fit for a timer (systemd/tinytrack-selftest.timer)."""
    config, db = open_for_command(args)
    started = int(time.time() * 1000)
    click_id = None
    with closing(db):
        try:
            name = args.campaign or next(iter(config.campaigns), None)
            campaign = config.campaigns.get(name) if name else None
            if campaign is None:
                raise SelftestFailed("config", f"no campaign {quoted(name)}" if name else "the config has no campaign")
            if not config.postback.tokens:
                raise SelftestFailed("config", "postback.tokens is empty: no postback could be sent")
            key = db.selftest_key()
            if not key:
                raise SelftestFailed("database", "no selftest key: start this version's server once (it migrates)")
            server = config.server
            base = (args.url or (f"unix:{server.uds}" if server.uds else f"http://{server.host}:{server.port}")).rstrip(
                "/"
            )
            status, _, _ = selftest_request(base, "/healthz", "healthz")
            if status != 200:
                raise SelftestFailed("healthz", f"answered {status}: writes are failing (see /healthz)")
            status, headers, _ = selftest_request(
                base, f"/c/{name}?{urlencode({'tinytrack_selftest': key, 'sub1': 'selftest'})}", "click"
            )
            if status != 302 or not headers.get("location"):
                raise SelftestFailed("click", f"answered {status}, not a 302 redirect")
            click_id = db.latest_test_click(name, started - CLOCK_STEP_MS)
            if click_id is None:
                raise SelftestFailed("click", "answered 302, but no click was committed")
            cid = format_uuid(click_id)
            stages = ["click"]
            if campaign.landers is not None:
                status, headers, _ = selftest_request(base, f"/go/{name}?cid={cid}", "lp click")
                if status != 302 or not (db.test_steps(click_id) or (None,) * 5)[2]:
                    raise SelftestFailed(
                        "lp click", f"answered {status}; stored: {db.test_steps(click_id) is not None}"
                    )
                stages.append("LP click")
            txid = f"selftest-{secrets.token_hex(4)}"
            query = urlencode({"click_id": cid, "txid": txid, "token": config.postback.tokens[0]}).encode()
            signed = {}
            if config.postback.hmac_secrets:
                now = int(time.time())
                signed["X-Tinytrack-Signature"] = f"t={now},v1={sign(config.postback.hmac_secrets[0], now, query)}"
            status, _, body = selftest_request(base, f"/postback?{query.decode()}", "postback", signed)
            if status != 200:
                said = body[:200].decode("utf-8", "replace")
                raise SelftestFailed("postback", f"answered {status} {said}".rstrip())
            steps = db.test_steps(click_id)
            if not steps or steps[4] != txid:
                raise SelftestFailed("postback", "answered 200, but the conversion was not committed")
            stages.append("postback")
        finally:
            if click_id is not None:
                with db.transaction():
                    db.forget_test(click_id)
    took = int(time.time() * 1000) - started
    print(f"ok: {', '.join(stages)} stored and checked through {base} in {took} ms (campaign {name})")
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    """Upload a traffic source's spend report: it replaces the clicks' costs for its days."""
    config, db = open_for_command(args)
    with closing(db):
        try:
            args.tz = zone_param(args.tz)
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
            last_day = int(time.time() // 86400) + 1
            count, rows = parse_cost_upload(text.encode(), "text/csv", config.campaigns, args.tz, last_day)
        except FieldError as exc:
            raise TinytrackError(f"{args.file}: {exc.message}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TinytrackError(f"{args.file}: cannot read: {exc}") from None
        if args.dry_run:
            print(f"{args.file}: {count} rows are valid ({len(rows)} keys); nothing written (--dry-run)")
            return 0
        replaced = 0
        for start in range(0, len(rows), COST_ROWS_PER_WRITE):  # short transactions: the server writes between
            with db.transaction():
                replaced += db.upload_costs(
                    int(time.time() * 1000), rows=rows[start : start + COST_ROWS_PER_WRITE], tz=args.tz
                )
    print(
        f"{args.file}: {count} rows stored ({len(rows)} keys, days in {args.tz}); {replaced} replaced an earlier upload"
    )
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Apply the retention rules now (the server also does, every interval_minutes)."""
    config, db = open_for_command(args)
    conf = config.retention
    now_ms = int(time.time() * 1000)
    with closing(db):
        if args.dry_run:
            rows = [{"table": r.table, "would be": r.action, "rows": n} for r, n in db.purge_due(conf, now_ms)]
        else:
            rows = []
            for rule in PURGE_RULES:
                if not rule.days(conf):
                    continue
                total, n = 0, PURGE_BATCH
                while n == PURGE_BATCH:  # short transactions: a running server keeps writing between them
                    with db.transaction():
                        n = db.purge_batch(rule, conf, PURGE_BATCH, now_ms)
                    total += n
                rows.append({"table": rule.table, "done": rule.action, "rows": total})
            before = math.inf  # as Purger.run_once
            while 0 < (left := db.vacuum_step()) < before:
                before = left
    off = [
        name
        for name in ("clicks_days", "pii_days", "conversions_days", "orphans_days", "outbox_days")
        if not getattr(conf, name)
    ]
    print_table(rows, list(rows[0]) if rows else ["table", "rows"])
    if off:
        print(f"kept for good (0 in [retention]): {', '.join(off)}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """Write a consistent copy of the database while the server runs, and check it."""
    config, db = open_for_command(args)
    dest = Path(args.dest)
    if args.keep is not None and (args.keep < 1 or not dest.is_dir()):
        raise TinytrackError("--keep: needs a folder as DEST and a count of at least 1")
    if dest.is_dir():
        dest = dest / time.strftime("tinytrack-%Y%m%d-%H%M%S.db", time.gmtime())
    if dest.exists():
        raise TinytrackError(f"{dest}: already exists, not overwritten")
    partial_copy = dest.with_name(f".{dest.name}.partial")
    with suppress(FileNotFoundError):
        partial_copy.unlink()
    old_umask = os.umask(0o077)  # it holds IPs and tokens: owner only
    try:
        with closing(db):
            db.vacuum_into(str(partial_copy))
        with closing(Database(sqlite3.connect(partial_copy))) as copy:
            check = copy.integrity_check()
            if check != [("ok",)]:
                raise TinytrackError(f"{dest}: the copy failed its integrity check: {check[:3]}")
            counts = copy.table_counts("clicks", "conversions", "outbox")
        with open(partial_copy, "rb+") as f:
            os.fsync(f.fileno())
        os.link(partial_copy, dest)  # unlike rename, never replaces a file that appeared meanwhile
    except sqlite3.Error as exc:
        raise TinytrackError(f"{dest}: {exc}") from None
    except FileExistsError:
        raise TinytrackError(f"{dest}: already exists, not overwritten") from None
    except OSError as exc:
        raise TinytrackError(f"{dest}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
        with suppress(FileNotFoundError):
            partial_copy.unlink()
    size = dest.stat().st_size
    print(f"{dest}: {size / 1e6:.1f} MB, integrity ok, " + ", ".join(f"{n} {t}" for t, n in counts.items()))
    if args.keep:
        older = sorted(dest.parent.glob("tinytrack-*.db"))[: -args.keep]
        for path in older:
            path.unlink()
        if older:
            print(f"removed {len(older)} older backups (--keep {args.keep})")
    return 0


OUTBOX_ACTIONS = {"list": outbox_list, "show": outbox_show, "retry": outbox_retry, "replay": outbox_replay}


def conversion_id_arg(text: str) -> int:
    """An ID argument: a conversion id SQLite can hold."""
    if not re.fullmatch(r"[0-9]{1,19}", text) or int(text) > MAX_SUM:
        raise argparse.ArgumentTypeError(f"not a conversion id: {text!r}")
    return int(text)


def cmd_review(args: argparse.Namespace) -> int:
    """Conversions held by the fraud rules: list them, approve or reject them."""
    config, db = open_for_command(args)
    with closing(db):
        if args.action == "list":
            rows = [
                {
                    "id": i,
                    "created": iso_ms(at),
                    "campaign": c,
                    "sub1": s1 or "",
                    "event": ev,
                    "payout": f"{format_money(p)} {cur}",
                    "network says": network or "",
                    "flags": "; ".join(f"{k}: {v}" for k, v in orjson.loads(flags or "{}").items()),
                }
                for i, at, c, s1, ev, p, cur, flags, network in db.held_conversions(args.limit)
            ]
            if not rows:
                print("nothing held for review")
                return 0
            print_table(rows, ("id", "created", "campaign", "sub1", "event", "payout", "network says", "flags"))
            return 0
        policy = WritePolicy.of(config)
        problems = []
        for conversion_id in args.ids:
            with db.transaction(fsync=True):  # the server's forwarder picks up what this queues
                answer, done = db.review(conversion_id, args.action, int(time.time() * 1000), policy)
            if done:
                print(f"conversion {conversion_id}: {answer}")
            else:
                problems.append(f"{conversion_id}: {answer}")
        if problems:
            raise TinytrackError(f"review {args.action}: not reviewed: {'; '.join(problems)}")
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinytrack", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tinytrack {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        func: Callable[[argparse.Namespace], int], *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        name = func.__name__.removeprefix("cmd_")
        sub = commands.add_parser(name, help=func.__doc__, description=func.__doc__, parents=parents)
        sub.set_defaults(func=func)
        return sub

    serve = command(cmd_serve)
    serve.add_argument(
        "-c",
        "--config",
        help="config file (default: $TINYTRACK_CONFIG, else ./config.toml if there, else the embedded default)",
    )
    serve.add_argument("--host", help="address to listen on")
    serve.add_argument("--port", type=int, help="port to listen on")
    serve.add_argument("--uds", help="listen on this unix socket instead")
    tokens = command(cmd_tokens)
    tokens.add_argument("-c", "--config", help="config file (default: $TINYTRACK_CONFIG, else ./config.toml if there)")
    init = command(cmd_init)
    init.add_argument("file", nargs="?", default="config.toml", help="where to write (default: config.toml)")
    check = command(cmd_check)
    check.add_argument("-c", "--config", help="config file (default: $TINYTRACK_CONFIG, else ./config.toml)")
    # The commands that work on the database beside a running server.
    config_flag = argparse.ArgumentParser(add_help=False)
    config_flag.add_argument(
        "-c",
        "--config",
        help="config file (default: $TINYTRACK_CONFIG, else ./config.toml if there, else ./tinytrack.db)",
    )

    stats = command(cmd_stats, config_flag)
    stats.add_argument("--from", dest="date_from", metavar="YYYY-MM-DD", help="first day (default: 30 days ago)")
    stats.add_argument("--to", dest="date_to", metavar="YYYY-MM-DD", help="last day (default: today, UTC)")
    stats.add_argument(
        "--by",
        default="campaign",
        help=f"group rows by up to {MAX_GROUP_FIELDS} fields, comma-separated (default: campaign): {', '.join(STATS_GROUPS)}",
    )
    stats.add_argument(
        "--tz", default="UTC", help="the days' time zone, an IANA name like Europe/Berlin (default: UTC)"
    )
    stats.add_argument("--campaign", help="only this campaign")
    stats.add_argument("--bots", action="store_true", help="count bot clicks in clicks")
    output = stats.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="CSV with a header row")
    output.add_argument("--json", action="store_true", help='JSON: {"rows": [...]}, as /api/stats')
    stats.add_argument("--no-convert", action="store_true", help="each currency apart, whatever [money] says")

    costs = command(cmd_costs)
    costs_actions = costs.add_subparsers(dest="action", required=True, metavar="ACTION")
    upload = costs_actions.add_parser(
        "import", parents=[config_flag], help="store a spend report (CSV: day,campaign,sub1,cost,currency)"
    )
    upload.add_argument("file", metavar="FILE.csv", help="the report; - reads standard input")
    upload.add_argument(
        "--tz", default="UTC", help="the zone the report's days are in (default UTC), e.g. Europe/Berlin"
    )
    upload.add_argument("--dry-run", action="store_true", help="check the file, write nothing")

    purge = command(cmd_purge, config_flag)
    purge.add_argument("--dry-run", action="store_true", help="show what would go, change nothing")
    selftest = command(cmd_selftest, config_flag)
    selftest.add_argument("--url", help="the server's base URL (default: server.uds, else http://host:port)")
    selftest.add_argument("--campaign", help="the campaign to click (default: the config's first)")

    backup = command(cmd_backup, config_flag)
    backup.add_argument("dest", help="file to write, or a folder for tinytrack-YYYYmmdd-HHMMSS.db")
    backup.add_argument("--keep", type=int, metavar="N", help="in that folder, keep only the newest N such backups")

    flags = command(cmd_flags)
    flags_actions = flags.add_subparsers(dest="action", required=True, metavar="ACTION")
    recompute = flags_actions.add_parser(
        "recompute", parents=[config_flag], help="apply today's [fraud] rules to conversions created since a day"
    )
    recompute.add_argument(
        "--since", required=True, help="conversions created since YYYY-MM-DD (UTC) or an ISO 8601 time"
    )
    recompute.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    recompute.add_argument(
        "--reverse-forwarded",
        action="store_true",
        help="hold or reject even conversions the traffic source already heard of (it hears a rejection)",
    )

    export = command(cmd_export)
    export_kinds = export.add_subparsers(dest="kind", required=True, metavar="KIND")
    google = export_kinds.add_parser(
        "google-ads", parents=[config_flag], help="Google Ads' offline conversion CSV (conversions by gclid)"
    )
    google.add_argument("--since", required=True, help="conversions created since YYYY-MM-DD (UTC) or an ISO 8601 time")
    google.add_argument("--conversion-name", required=True, help="the conversion action's name in Google Ads")
    google.add_argument(
        "--tz", default="UTC", help="the zone the file's times are in (default UTC), e.g. Europe/Berlin"
    )

    reconcile = command(cmd_reconcile, config_flag)
    reconcile.add_argument("file", metavar="FILE.csv", help="the network's export (comma, semicolon or tab separated)")
    reconcile.add_argument(
        "--map",
        required=True,
        help="which column is which field: click_id=COL,txid=COL,payout=COL,status=COL[,ts=COL,event=COL,currency=COL]",
    )
    reconcile.add_argument(
        "--since", help="only-here: stored conversions from this UTC day (default: the file's first ts)"
    )
    reconcile.add_argument("--until", help="only-here: up to this UTC day, inclusive (default: the file's last ts)")
    reconcile.add_argument("--csv", metavar="OUT", help="write every row, with its category, to this CSV file")
    reconcile.add_argument("--show", type=int, default=5, help="rows shown per category (default 5)")
    reconcile.add_argument(
        "--apply", action="store_true", help="store what is missing and correct what differs (source import)"
    )

    forget = command(cmd_forget, config_flag)
    who = forget.add_mutually_exclusive_group(required=True)
    who.add_argument("--user-id", help="the uid / user_id the site gave the person")
    who.add_argument("--ip", help="an IP address the person came from")
    forget.add_argument("--dry-run", action="store_true", help="count what would go, change nothing")

    review = command(cmd_review)
    review_actions = review.add_subparsers(dest="action", required=True, metavar="ACTION")
    held = review_actions.add_parser("list", parents=[config_flag], help="conversions held for review")
    held.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    for decision, what in (
        ("approve", "approved (and forwarded as any approval)"),
        ("reject", "rejected (reason fraud)"),
    ):
        decide = review_actions.add_parser(decision, parents=[config_flag], help=f"held conversions become {what}")
        decide.add_argument("ids", type=conversion_id_arg, nargs="+", metavar="ID")

    outbox = command(cmd_outbox)
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[config_flag], help="the latest deliveries")
    listing.add_argument("--state", choices=OUTBOX_STATES, help="only deliveries in this state")
    listing.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    show = actions.add_parser("show", parents=[config_flag], help="one delivery and each of its attempts")
    show.add_argument("id", type=int)
    retry = actions.add_parser("retry", parents=[config_flag], help="send dead, failed or canceled deliveries again")
    retry.add_argument("ids", type=int, nargs="*", metavar="ID")
    retry.add_argument("--all-dead", action="store_true", help="every dead delivery")
    retry.add_argument("--all-failed", action="store_true", help="every failed delivery")
    replay = actions.add_parser(
        "replay", parents=[config_flag], help="queue conversions again, with the current postback_url"
    )
    replay.add_argument("--since", required=True, help="conversions created since YYYY-MM-DD (UTC) or an ISO 8601 time")
    replay.add_argument("--campaign", help="only this campaign")
    replay.add_argument("--dry-run", action="store_true", help="count, queue nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `tinytrack` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so a closed pipe is caught below and not at exit
        return code
    except TinytrackError as exc:
        print(f"tinytrack: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `tinytrack outbox list | head -3`: the reader has all it wanted.
        with suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# --- Templates ------------------------------------------------------------------------


CONFIG_TEMPLATE = """\
# tinytrack config. Check it with `tinytrack check -c {path}`.
# Every key is optional unless it says otherwise.

[server]
host = "127.0.0.1"                        # behind nginx keep it on loopback
port = 8080
# uds = "/run/tinytrack/tinytrack.sock"   # a unix socket instead of host/port
trusted_proxies = ["127.0.0.1", "::1"]    # peers whose X-Forwarded-For is believed
# log_postbacks = true                    # a line per postback; false: only those not counted
# read_timeout_seconds = 10               # for a request's headers and body

[storage]
path = "tinytrack.db"                     # relative to the working directory
# reserve_mb = 8                          # kept aside so a full disk can recover; 0: none

[postback]
# Required. Give a network one of these; list two while you rotate.
tokens = ["{postback_token}"]
allow_ips = []                            # e.g. ["203.0.113.7", "198.51.100.0/24"]; empty = any
# events = ["signup", "purchase", "deposit", "ftd"]
currency = "USD"
# status_map = {{ sale = "approved", declined = "rejected", reversed = "rejected" }}
# hmac_secrets = []                       # when set, postbacks must be signed too

[admin]
token = "{admin_token}"

[retention]                               # 0 turns a rule off (keep for good)
clicks_days = 90                          # raw clicks; daily totals are kept for good
pii_days = 30                             # then a click's IP is cut to /24 or /48, its User-Agent dropped
conversions_days = 0
orphans_days = 30
outbox_days = 30                          # finished forwards and their tries
# interval_minutes = 60
# sub1_per_day = 1000                     # distinct sub1 per campaign and day in the totals; more: "(other)"

[forward]                                 # conversions sent on to campaigns' postback_url
# allow_private = false                   # true: allow loopback/private targets
# first_retry_seconds = 30                # then doubling, with jitter, capped at 6 h
# max_age_hours = 72                      # then a failing delivery is dead
# timeout_seconds = 10
# delay_seconds = 0                       # hold forwards so a quick reversal cancels them

# One table per campaign; the link for a traffic source is /c/<name>.
[campaigns.example]
url = "https://offer.example.com/lp?cid={{click_id}}&s1={{sub1}}"
# pass_query = false                      # true: append other query parameters
# window_days = 30                        # postbacks later than this are rejected
# postback_url = "https://source.example/pb?clickid={{ext_id}}&payout={{payout}}"
# forward_events = ["purchase"]           # default: every event
# forward_statuses = ["approved"]         # the default
# cost_model = "cpc"                      # cpc | cpm | cpa | revshare; a click's own &cost= wins over cpc/cpm
# cost_value = "0.05"                     # per click | per 1,000 clicks | per approved conversion | % of payout
# cost_currency = "USD"                   # default postback.currency
# bot_cost = false                        # bot clicks cost nothing unless true
# max_click_cost = "1"                    # a click's own cost above this is stored without it
# channel = "paid"                        # affiliate | paid | email | organic: what [attribution] ranks
# pixel = true                            # /pixel may report this campaign's conversions (see [pixel])
# [campaigns.spring-sale.forward]         # kind = "get" (postback_url): where its tries go after 3 failures
# fallback_url = "https://backup.source.example/pb?clickid={{ext_id}}&payout={{payout}}"

# Forwards of other kinds: a JSON webhook, and Meta's Conversions API.
# [campaigns.crm.forward]
# kind = "json"                           # POST of the conversion as /api/conversions shows it
# url = "https://crm.example/hooks/conversion"
# headers = {{ Authorization = "Bearer ..." }}   # never logged nor shown
# [campaigns.fb.forward]
# kind = "meta_capi"
# pixel_id = "1234567890"
# access_token = "..."                    # a system user's token; never logged nor shown
# event_map = {{ purchase = "Purchase", signup = "Lead" }}
# test_event_code = "TEST12345"           # Events Manager's test events

# A split test: offers (instead of url) and landers, each picked by weight (0 pauses one).
# The landers' call to action links to https://your.domain/go/split-test?cid=<the click id>.
# [campaigns.split-test]
# offers = [
#   {{ name = "a", url = "https://offer-a.example/?cid={{click_id}}&lp={{lander}}", weight = 70 }},
#   {{ name = "b", url = "https://offer-b.example/?cid={{click_id}}&lp={{lander}}", weight = 30 }},
# ]
# landers = [
#   {{ name = "lp1", url = "https://lp.example.com/one?cid={{click_id}}", weight = 50 }},
#   {{ name = "lp2", url = "https://lp.example.com/two?cid={{click_id}}", weight = 50 }},
# ]

# [fraud]                                 # each rule off until set; campaigns override in [campaigns.x.fraud]
# min_ctit_seconds = 10                   # ctit_fast: a conversion sooner than this after its click
# ip_clicks_per_minute = 120              # ip_flood: more clicks from one address in a minute, per campaign
# ip_conversions_per_hour = 3             # ip_cluster: more conversions on one address's clicks in an hour
# listed_ips = ["198.51.100.0/24"]        # listed_ip; and/or listed_ips_file = "/etc/tinytrack/datacenters.txt"
# action = "flag"                         # flag | hold (review with `tinytrack review`) | reject

# [attribution]                           # who gets the credit among a user's touches (uid=, POST /touch)
# window_days = 30                        # touches up to this long before the conversion
# priority = ["affiliate", "paid", "email"]   # the first channel with a touch wins; organic never
# mode = "click"                          # "priority": the matrix decides even for a postback with a click id

# [pixel]                                 # GET /pixel from advertisers' pages; off unless enabled
# enabled = false                         # true: every campaign's clicks (or pixel = true per campaign)
# status = "pending"                      # what a pixel's conversion is until a postback confirms it

# [money]                                 # to report every currency in one
# rates = {{ EUR = "1.08" }}                # 1 EUR = 1.08 report_currency
# report_currency = "USD"                 # default postback.currency
"""
DEMO_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>tinytrack demo landing page</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem}}
pre{{background:#f4f4f4;padding:.8rem;overflow-x:auto;white-space:pre-wrap;word-break:break-all}}</style></head>
<body><h1>The offer's landing page</h1>
<p>tinytrack stored your click and sent you here with its id, as it would to a real offer:</p>
<pre>{click_id}</pre>
<p>When this visitor converts, the offer's server calls tinytrack back. Paste this to play the network:</p>
<pre>{curl_get}</pre>
<p>or, as a JSON POST:</p>
<pre>{curl_post}</pre>
<p>Send it twice: the second answer says <code>duplicate</code>.</p>
</body></html>
"""


class RawHTML(str):
    """Markup html_table puts in a cell as it is (made here, never from input)."""


def html_table(header: Sequence[str], rows: Iterable[Iterable[object]], empty: str, numeric: int = 0) -> str:
    """A table whose every cell is escaped (but RawHTML), or `empty` when it has no rows.
    Each cell carries its column's name (data-label: a phone shows a row as a card of
    "name value" lines); the last `numeric` columns are figures, kept on one line."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    first_number = len(header) - numeric
    labels = [f' data-label="{e(h)}"' + (" class=n" if i >= first_number else "") for i, h in enumerate(header)]

    def cell(label: str, value: object) -> str:
        if isinstance(value, RawHTML):
            return f"<td{label}>{value}</td>"
        text = "" if value is None else str(value)
        long = " class=w" if len(text) > 20 and " class=n" not in label else ""  # may break anywhere
        return f"<td{label}{long}>{e(text)}</td>"

    body = "".join("<tr>" + "".join(cell(label, v) for label, v in zip(labels, row)) + "</tr>" for row in rows)
    if not body:
        return f"<p class=muted>{e(empty)}</p>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def conversion_link(conversion_id: int) -> RawHTML:
    return RawHTML(f'<a href="/admin/conversions/{int(conversion_id)}">{int(conversion_id)}</a>')


def render_conversion(view: Mapping[str, Any]) -> str:
    """/admin/conversions/<id>: one conversion, its history, and who got its credit and why."""
    e = html.escape
    fields = [(name, view[name]) for name in (*CONVERSION_COLUMNS, "user_id") if name not in ("flags",)]
    flags = "; ".join(f"{k}: {v}" for k, v in (view["flags"] or {}).items())
    decision = view["attribution"]
    if decision is None:
        credit = "<p class=muted>Credited to its click (the postback's click id).</p>"
    else:
        winner = decision["winner"]
        credit = (
            f"<p>Rule: <b>{e(decision['rule'])}</b>. Winner: "
            + (
                e(f"{winner['kind']} {winner.get('id', '')} ({winner['channel']}, {winner['campaign']})")
                if winner
                else "nobody"
            )
            + ".</p>"
            + html_table(
                ("kind", "id", "channel", "campaign", "when", ""),
                (
                    (t["kind"], t["id"], t["channel"], t["campaign"], t["ts"], "winner" if t == winner else "")
                    for t in decision["candidates"]
                ),
                "No touch in the window.",
            )
        )
    sections = [
        f'<h1>Conversion {int(view["id"])}</h1><p class=muted><a href="/admin">back to /admin</a></p>',
        html_table(("field", "value"), [*fields, ("flags", flags)], ""),
        "<h2>Credit</h2>" + credit,
        "<h2>History</h2>"
        + html_table(
            ("at", "status", "payout", "reported by"),
            ((h["at"], h["status"], f"{h['payout']} {h['currency']}", h["source"]) for h in view["history"]),
            "No history.",
        ),
    ]
    return ADMIN_PAGE.format(body="\n".join(sections))


@dataclasses.dataclass
class AdminView:
    """What /admin shows: the report asked for, and the reads around it."""

    q: StatsQuery
    form: Mapping[str, str]  # the query as sent (shown back in the form)
    error: str | None  # what was wrong with it ("field: problem"); the default report is shown then
    campaigns: Sequence[str]
    rows: list[dict]  # the report, grouped by q.by
    overall: list[dict]  # the same by campaign: the totals at the top
    days: list[dict]  # the same by day: the charts
    facts: Mapping[str, Any]  # report_facts (source, complete_from)
    conversions: list[tuple]
    orphans: list[tuple]
    outbox: Mapping[str, int]
    problems: list[tuple]
    funnels: Mapping[str, list[tuple[str, dict]]]
    held: Sequence[tuple]
    quarantined: Sequence[tuple]


ADMIN_ZONES = (  # offered in the form's zone field; any IANA name may be typed
    "UTC",
    "Europe/London",
    "Europe/Berlin",
    "Europe/Moscow",
    "America/New_York",
    "America/Chicago",
    "America/Denver",
    "America/Los_Angeles",
    "America/Sao_Paulo",
    "Asia/Dubai",
    "Asia/Kolkata",
    "Asia/Singapore",
    "Asia/Tokyo",
    "Australia/Sydney",
)
DRILL_ORDER = ("campaign", *SUB_FIELDS, "offer", "lander", "country", "device", "os", "browser")
FIELD_TITLES = {"unique_clicks": "unique", "conversions": "conv.", "lp_ctr": "LP CTR %", "cr": "CR %"}


def local_time(ms: int, tz: str) -> str:
    """A moment as a person reads it in zone tz: 2026-03-04 17:00:05."""
    moment = dt.datetime.fromtimestamp(ms / 1000, dt.UTC if tz == "UTC" else zone(tz))
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def admin_link(params: Mapping[str, str], **changes: str | None) -> str:
    """/admin with the query `params` after `changes` (None drops a parameter), escaped for an attribute."""
    query = {k: v for k, v in {**params, **changes}.items() if v is not None}
    return html.escape("/admin?" + urlencode(query))


def report_params(q: StatsQuery) -> dict[str, str]:
    """The query parameters that ask for q again."""
    params = {"from": day_text(q.first_day), "to": day_text(q.last_day), "tz": q.tz, "by": ",".join(q.by)}
    if q.campaign:
        params["campaign"] = q.campaign
    params.update(q.filters)
    if q.bots:
        params["bots"] = "1"
    return params


def drill_link(q: StatsQuery, row: Mapping[str, Any], text: str) -> RawHTML | str:
    """`text` linking one level down from a report row: its values become filters (a day
    becomes the range), grouped by the next field nobody has chosen yet (DRILL_ORDER)."""
    params = report_params(q)
    chosen = set(q.by) | {name for name, _ in q.filters} | ({"campaign"} if q.campaign else set())
    for name in q.by:
        value = row[name]
        if name == "day":
            params["from"] = params["to"] = value
        elif name == "campaign" or name in FILTER_FIELDS:
            params[name] = value
        else:  # hour, status, channel: not a filter; the link keeps the grouping by it
            return text
    following = next((name for name in DRILL_ORDER if name not in chosen), None)
    if following is None:
        return text
    params["by"] = following
    return RawHTML(f'<a href="{admin_link(params)}">{html.escape(text)}</a>')


def nice_step(top: float) -> int:
    """A round step for about four ticks up to `top`: 1, 2 or 5 times a power of ten."""
    raw = max(top / 4, 1)
    power = 10 ** math.floor(math.log10(raw))
    return int(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def bar_chart(name: str, points: Sequence[tuple[str, int]], unit: str, caption: str) -> str:
    """Bars of one figure per day on one labelled scale (0 to a round top, ticks on the
    left), the days under them. Sized in per cent and pixels with no viewBox, so its
    text keeps the page's size on a phone. A bar's <title> says its day and value."""
    height, base, left = 200, 176, 9.0  # px: the chart, the axis line; %: the tick labels' column
    top = max([value for _, value in points] + [1])
    step = nice_step(top)
    top = -(-top // step) * step
    plot = base - 8
    width = (100 - left) / len(points)
    parts = []
    for tick in range(0, top + 1, step):
        y = base - plot * tick / top
        parts.append(
            f'<line class=grid x1="{left}%" x2="100%" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class=tick x="{left - 1}%" y="{y + 4:.1f}" text-anchor=end>{tick:,}</text>'
        )
    for i, (day, value) in enumerate(points):
        h = plot * value / top
        parts.append(
            f'<rect class=bar x="{left + i * width + width * 0.1:.3f}%" width="{width * 0.8:.3f}%" '
            f'y="{base - h:.1f}" height="{h:.1f}"><title>{day}: {value} {unit}</title></rect>'
        )
    every = max(1, math.ceil(len(points) / 6))  # at most about six dates under the axis
    for i in range(0, len(points), every):
        x = left + (i + 0.5) * width
        parts.append(f'<text class=tick x="{x:.3f}%" y="{height - 6}" text-anchor=middle>{points[i][0][5:]}</text>')
    return (
        f'<figure><figcaption>{html.escape(caption)}</figcaption><svg id="{name}" width="100%" height="{height}" '
        f'role=img aria-label="{html.escape(caption)}">{"".join(parts)}</svg></figure>'
    )


def render_form(view: AdminView) -> str:
    """The report's form: an ordinary GET (no script), showing what was asked."""
    e, form, q = html.escape, view.form, view.q
    chosen = [name for name in (form.get("by") or "").split(",") if name] if view.error else list(q.by)

    def select(name: str, options: Sequence[str], current: str | None, blank: str | None) -> str:
        items = [f'<option value="">{e(blank)}</option>'] if blank is not None else []
        items += [f'<option value="{e(o)}"{" selected" if o == current else ""}>{e(o)}</option>' for o in options]
        return f'<select name="{name}">{"".join(items)}</select>'

    groups = "".join(
        f"<label>{'Group by' if i == 0 else 'then'} "
        + select("by", STATS_GROUPS, chosen[i] if i < len(chosen) else None, None if i == 0 else "-")
        + "</label>"
        for i in range(MAX_GROUP_FIELDS)
    )
    value = (lambda key, default: form.get(key, default)) if view.error else (lambda key, default: default)
    # What the form has no field for is sent again as it was: the filters (and bots=1).
    kept = [(n, form[n]) for n in (*FILTER_FIELDS, "bots") if n in form] if view.error else list(q.filters)
    if q.bots and not view.error:
        kept.append(("bots", "1"))
    hidden = "".join(f'<input type=hidden name="{name}" value="{e(v)}">' for name, v in kept)
    campaign = value("campaign", q.campaign) or None
    campaigns = list(view.campaigns) + ([campaign] if campaign and campaign not in view.campaigns else [])
    zones = "".join(f"<option>{z}</option>" for z in ADMIN_ZONES)
    return (
        "<form method=get action=/admin>"
        f'<label>From <input type=date name=from value="{e(value("from", day_text(q.first_day)))}"></label>'
        f'<label>To <input type=date name=to value="{e(value("to", day_text(q.last_day)))}"></label>'
        f'<label>Time zone <input name=tz list=zones value="{e(value("tz", q.tz))}" size=18></label>'
        f"<datalist id=zones>{zones}</datalist>{groups}"
        f"<label>Campaign {select('campaign', campaigns, campaign, 'all')}</label>"
        f"{hidden}<button>Show</button></form>"
    )


def money_text(amounts: Mapping[str, str | None], suffix: str = "") -> RawHTML:
    """Amounts per currency, each kept whole on a line of its own if they must wrap; "-" for none."""
    shown = [f"<span>{html.escape(f'{v}{suffix} {cur}')}</span>" for cur, v in amounts.items() if v is not None]
    return RawHTML(" ".join(shown) or "-")


def kpis(rows: Sequence[dict]) -> str:
    """The totals of a report's rows (one per campaign): clicks, unique clicks,
    conversions, revenue (approved), cost, profit, ROI, CR and EPC."""
    counts = {k: sum(row[k] for row in rows) for k in ("clicks", "unique_clicks", "conversions", "approved")}
    revenue: Counter[str] = Counter()
    spent: Counter[str] = Counter()
    for row in rows:  # exact: amounts have at most 6 decimals
        for cur, amount in row["payout"].items():
            revenue[cur] += int(Decimal(amount) * 1_000_000)
        for cur, amount in row["cost"].items():
            spent[cur] += int(Decimal(amount) * 1_000_000)
    figures = money_figures(revenue, spent, counts)
    tiles = [
        ("Clicks", f"{counts['clicks']:,}"),
        ("Unique clicks", f"{counts['unique_clicks']:,}"),
        ("Conversions", f"{counts['conversions']:,}"),
        ("Revenue", money_text(figures["payout"])),
        ("Cost", money_text(figures["cost"])),
        ("Profit", money_text(figures["profit"])),
        ("ROI", money_text(figures["roi"], "%")),
        ("CR", f"{figures['cr']}%" if figures["cr"] is not None else "-"),
        ("EPC", money_text(figures["epc"])),
    ]
    return "<div class=kpis>" + "".join(f"<div><span>{t}</span><b>{v}</b></div>" for t, v in tiles) + "</div>"


def report_table(view: AdminView) -> str:
    """The grouped report: a column per field (the first cell links one level down),
    the counts, money and ratios."""
    q = view.q
    columns = ("clicks", "unique_clicks", "conversions", "approved", "pending", "rejected", "cr")
    header = [*q.by, *(FIELD_TITLES.get(c, c) for c in columns), "revenue", "cost", "profit", "ROI %", "EPC", "CPA"]
    lines = []
    for row in view.rows:
        fields = [f"{row[name]:02d}:00" if name == "hour" else row[name] or "(none)" for name in q.by]
        fields[0] = drill_link(q, row, str(fields[0]))
        lines.append(
            [
                *fields,
                *(row[c] if row[c] is not None else "-" for c in columns),
                money_text(row["payout"]),
                money_text(row["cost"]),
                money_text(row["profit"]),
                money_text(row["roi"]),
                money_text(row["epc"]),
                money_text(row["cpa"]),
            ]
        )
    return html_table(header, lines, "Nothing in this range.", numeric=len(header) - len(q.by))


def render_admin(view: AdminView) -> str:
    """The /admin page: plain HTML, inline SVG charts, no script, no CDN."""
    e, q = html.escape, view.q
    tz = q.tz
    series = {row["day"]: row for row in view.days}
    days = [day_text(d) for d in range(q.first_day, q.last_day + 1)]
    params = report_params(q)
    filters = " ".join(
        f'<a class=chip href="{admin_link(params, **{name: None})}" title="remove this filter">'
        f"{e(name)} = {e(value or '(none)')} &#215;</a>"
        for name, value in ([("campaign", q.campaign)] if q.campaign else []) + list(q.filters)
    )
    source = view.facts["source"]
    note = f"read from the {STATS_SOURCES[source]}"
    if "complete_from" in view.facts:
        note += f", complete from {local_time(iso_to_ms(view.facts['complete_from']), tz)}"
    health = " · ".join(
        f"{state} <b>{view.outbox.get(state, 0)}</b>" for state in ("pending", "failed", "dead", "done")
    )
    when = lambda ms: local_time(ms, tz)  # noqa: E731
    table = html_table
    sections = [
        "<h1>tinytrack</h1>",
        f"<p class=error>{e(view.error)} (showing the last {STATS_DEFAULT_DAYS} days instead)</p>"
        if view.error
        else "",
        render_form(view),
        f"<p class=muted>{day_text(q.first_day)} to {day_text(q.last_day)} ({e(tz)}) {filters}</p>",
        kpis(view.overall),
        "<div class=charts>"
        + bar_chart(
            "clicks", [(d, series.get(d, {}).get("clicks", 0)) for d in days], "clicks", f"Clicks per day ({tz})"
        )
        + bar_chart(
            "conversions",
            [(d, series.get(d, {}).get("conversions", 0)) for d in days],
            "conversions",
            f"Conversions per day ({tz}): approved and pending",
        )
        + "</div>",
        f"<h2>By {e(', '.join(q.by))}</h2>"
        f'<p class=muted>{e(note)} · <a href="{e("/api/stats?" + urlencode({**params, "format": "csv"}))}">'
        "CSV of this table</a></p>" + report_table(view),
        *(
            f"<h2>Landers and offers: {e(name)}</h2>"
            + table(
                (
                    "",
                    "name",
                    "clicks",
                    "LP clicks",
                    "LP CTR %",
                    "conv.",
                    "CR %",
                    "payout",
                    "EPC",
                    *(("cost", "profit", "ROI %") if any(r["cost"] for _, r in rows) else ()),
                ),
                (
                    (
                        by,
                        r[by] or ("(none)" if by == "lander" else ""),
                        r["clicks"],
                        r["lp_clicks"],
                        r["lp_ctr"],
                        r["conversions"],
                        r["cr"],
                        money_text(r["payout"]),
                        money_text(r["epc"]),
                        *(
                            (money_text(r["cost"]), money_text(r["profit"]), money_text(r["roi"]))
                            if any(r["cost"] for _, r in rows)
                            else ()
                        ),
                    )
                    for by, r in rows
                ),
                "No clicks in this range.",
                numeric=10 if any(r["cost"] for _, r in rows) else 7,
            )
            for name, rows in view.funnels.items()
        ),
        f"<h2>Forwards</h2><p>{health}</p>"
        + table(
            ("id", "campaign", "state", "tries", "last try", "code", "error"),
            (
                (i, c, "retrying" if st == "pending" else st, n, at and when(at), code, err)
                for i, c, st, n, at, code, err in view.problems
            ),
            "Nothing failed or retrying.",
        ),
        '<h2>Held for review</h2><p class=muted>Flagged conversions under <code>action = "hold"</code>: '
        "pending and never forwarded until you decide (<code>tinytrack review approve|reject ID</code>).</p>"
        + table(
            ("id", "when", "campaign", "sub1", "event", "payout", "network says", "flags"),
            (
                (
                    i,
                    when(at),
                    c,
                    s1,
                    ev,
                    f"{format_money(p)} {cur}",
                    network,
                    "; ".join(f"{k}: {v}" for k, v in orjson.loads(flags or "{}").items()),
                )
                for i, at, c, s1, ev, p, cur, flags, network in view.held
            ),
            "Nothing held.",
        ),
        f"<h2>Latest conversions</h2><p class=muted>Times in {e(tz)}.</p>"
        + table(
            ("id", "when", "campaign", "sub1", "event", "status", "payout", "why", "credited by"),
            (
                (
                    conversion_link(i),
                    when(at),
                    c,
                    s1,
                    ev,
                    st,
                    f"{format_money(p)} {cur}",
                    why,
                    orjson.loads(attribution)["rule"] if attribution else "its click",
                )
                for i, at, c, s1, ev, st, p, cur, why, attribution in view.conversions
            ),
            "No conversions yet.",
        ),
        "<h2>Orphans</h2><p class=muted>Postbacks for click ids this server never issued (or has purged).</p>"
        + table(
            ("last seen", "click_id", "event", "payout", "hits"),
            ((when(at), cid, ev, f"{format_money(p)} {cur}", hits) for at, cid, ev, p, cur, hits in view.orphans),
            "None.",
        ),
        "<h2>Refused postbacks</h2><p class=muted>Sent with a valid token, refused for what they said (a 400): "
        "networks rarely retry one. <code>tinytrack reconcile</code> stores them from the network's report.</p>"
        + table(
            ("at", "why", "fields"),
            (
                (when(at), reason, "; ".join(f"{k}={v}" for k, v in orjson.loads(fields).items()))
                for _, at, reason, fields in view.quarantined
            ),
            "None.",
        ),
    ]
    return ADMIN_PAGE.format(body="\n".join(section for section in sections if section))


def iso_to_ms(text: str) -> int:
    """iso_ms's text back to unix ms."""
    return int(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


# The page's look: wide enough for the report at 1280 px; under 700 px each table row
# becomes a card of "column value" lines (data-label), so nothing is cut off on a phone.
ADMIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>tinytrack</title>
<style>body{{font:15px/1.45 system-ui,sans-serif;max-width:80rem;margin:1rem auto;padding:0 .8rem;color:#222}}
h1{{margin:.2rem 0}}h2{{font-size:1.1rem;margin:1.6rem 0 .4rem}}.muted{{color:#666}}.error{{color:#a00;font-weight:600}}
a{{color:#1a5fa8}}form{{display:flex;flex-wrap:wrap;gap:.4rem .8rem;align-items:end;margin:.6rem 0}}
label{{display:flex;flex-direction:column;font-size:.8rem;color:#555}}input,select,button{{font:inherit;font-size:.9rem}}
button{{padding:.2rem .9rem}}.chip{{display:inline-block;background:#eef3f9;border-radius:1rem;padding:0 .6rem;
margin-left:.3rem;text-decoration:none;overflow-wrap:anywhere}}
.kpis{{display:grid;grid-template-columns:repeat(auto-fit,minmax(7.6rem,1fr));gap:.5rem;margin:.8rem 0}}
.kpis div{{background:#f6f8fa;border-radius:.4rem;padding:.4rem .6rem;min-width:0}}
.kpis span{{display:block;font-size:.8rem;color:#555}}.kpis b{{font-size:1.1rem;overflow-wrap:anywhere}}
.charts{{display:grid;grid-template-columns:repeat(auto-fit,minmax(18rem,1fr));gap:1rem}}
figure{{margin:0}}figcaption{{font-size:.85rem;color:#555}}svg{{display:block;background:#fafafa}}
rect.bar{{fill:#6d8fb3}}#conversions rect.bar{{fill:#d2691e}}line.grid{{stroke:#ddd}}
text.tick{{font-size:11px;fill:#555}}
table{{border-collapse:collapse;width:100%;font-size:.88rem}}
th,td{{text-align:left;padding:.25rem .45rem;border-bottom:1px solid #ddd;vertical-align:top;white-space:nowrap}}
td.w{{white-space:normal;overflow-wrap:anywhere;min-width:8rem}}td.n{{text-align:right}}td.n span{{display:block}}
td a{{overflow-wrap:anywhere;white-space:normal}}
@media (max-width:700px){{thead{{display:none}}table,tbody,tr,td{{display:block;width:auto}}
tr{{border:1px solid #ddd;border-radius:.4rem;margin:.5rem 0;padding:.2rem .4rem}}
td{{display:flex;gap:.8rem;justify-content:space-between;border:0;padding:.1rem 0;text-align:right}}
td.w{{min-width:0}}td.n{{white-space:normal}}td.n span{{display:inline}}
td::before{{content:attr(data-label);color:#666;text-align:left;white-space:nowrap}}}}</style>
</head><body>
{body}
</body></html>
"""
if __name__ == "__main__":
    sys.exit(main())
