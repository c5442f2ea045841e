"""A local stand-in for Meta's Conversions API (POST <base>/<pixel id>/events), for
tests. It checks each request against Meta's documented body, field by field, and
answers as Meta does: {"events_received": n, "messages": [], "fbtrace_id": ...} on
success, or a Graph API error object with HTTP 400. `mode` makes it answer
events_received 0, an error, a transient error or a 500 instead.

    meta = FakeMeta(token="EAAB...").start()
    ... endpoint = meta.endpoint  (http://127.0.0.1:<port>/v21.0)
    meta.events  -> every event it accepted, in order
    meta.problems -> what it refused, and why (a test expects none)

Documented rules (developers.facebook.com, Conversions API, "Server Event
Parameters" and "Customer Information Parameters"): event_name, event_time (unix
seconds, at most 7 days old), action_source and user_data are required; website
events also need event_source_url and user_data.client_user_agent; fbc is
fb.1.<creation time in ms>.<fbclid>; external_id is hashed (SHA-256, hex);
custom_data.value is a number and currency an ISO 4217 code.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from typing import Any

from receiver import Hit, Receiver, Step

ACTION_SOURCES = {
    "website",
    "app",
    "email",
    "phone_call",
    "chat",
    "physical_store",
    "system_generated",
    "business_messaging",
    "other",
}
SEVEN_DAYS = 7 * 86400


def graph_error(message: str, code: int = 100, subcode: int | None = None, **extra: Any) -> bytes:
    error = {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "AbCdEfFakeTrace", **extra}
    if subcode is not None:
        error["error_subcode"] = subcode
    return json.dumps({"error": error}).encode()


def check_event(event: Any, now: float) -> list[str]:
    """What is wrong with one server event, as Meta documents it (empty: nothing)."""
    if not isinstance(event, dict):
        return ["an event must be an object"]
    problems = []
    name = event.get("event_name")
    if not isinstance(name, str) or not name:
        problems.append("event_name: required string")
    when = event.get("event_time")
    if not isinstance(when, int) or isinstance(when, bool):
        problems.append("event_time: required integer (unix seconds)")
    elif when > now + 60 or when < now - SEVEN_DAYS:
        problems.append("event_time: more than 7 days old or in the future")
    event_id = event.get("event_id")
    if event_id is not None and (not isinstance(event_id, str) or not event_id):
        problems.append("event_id: a string")
    source = event.get("action_source")
    if source not in ACTION_SOURCES:
        problems.append("action_source: required, one of Meta's")
    user = event.get("user_data")
    if not isinstance(user, dict) or not user:
        problems.append("user_data: required, at least one customer information parameter")
        user = {}
    if source == "website":
        page = event.get("event_source_url")
        if not isinstance(page, str) or not page.startswith(("http://", "https://")):
            problems.append("event_source_url: required for website events")
        if not isinstance(user.get("client_user_agent"), str):
            problems.append("user_data.client_user_agent: required for website events")
    fbc = user.get("fbc")
    if fbc is not None and not (isinstance(fbc, str) and re.fullmatch(r"fb\.1\.[0-9]{13}\.\S+", fbc)):
        problems.append("user_data.fbc: fb.1.<ms>.<fbclid>")
    address = user.get("client_ip_address")
    if address is not None:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            problems.append("user_data.client_ip_address: an IP address")
    external = user.get("external_id")
    if external is not None and not (isinstance(external, str) and re.fullmatch(r"[0-9a-f]{64}", external)):
        problems.append("user_data.external_id: SHA-256, hex")
    custom = event.get("custom_data")
    if custom is not None:
        value = custom.get("value") if isinstance(custom, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            problems.append("custom_data.value: a number")
        currency = custom.get("currency") if isinstance(custom, dict) else None
        if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{3}", currency):
            problems.append("custom_data.currency: ISO 4217")
    return problems


class FakeMeta:
    def __init__(self, token: str, pixel_id: str = "1234567890", version: str = "v21.0") -> None:
        self.token, self.pixel_id, self.version = token, pixel_id, version
        self.mode = "ok"  # ok | zero | error | transient | 500
        self.events: list[dict] = []
        self.bodies: list[dict] = []
        self.problems: list[str] = []
        self.receiver = Receiver([Step(answer=self.answer, headers={"Content-Type": "application/json"})])

    def start(self) -> FakeMeta:
        self.receiver.start()
        return self

    def stop(self) -> None:
        self.receiver.stop()

    @property
    def endpoint(self) -> str:
        return self.receiver.url(f"/{self.version}")

    @property
    def hits(self) -> list[Hit]:
        return self.receiver.hits

    def answer(self, hit: Hit) -> tuple[int, bytes]:
        if hit.method != "POST" or hit.path != f"/{self.version}/{self.pixel_id}/events":
            return 404, graph_error("Unknown path components", 2500)
        try:
            body = json.loads(hit.body)
        except ValueError:
            self.problems.append("the body is no JSON")
            return 400, graph_error("Invalid JSON")
        self.bodies.append(body)
        if body.get("access_token") != self.token or "access_token" in hit.query:
            return 400, graph_error("Invalid OAuth access token - Cannot parse access token", 190)
        if self.mode == "500":
            return 500, graph_error("An unknown error occurred", 1, is_transient=True)
        if self.mode == "transient":
            return 400, graph_error("Please reduce the amount of data you're asking for, then retry your request", 2)
        if self.mode == "error":
            return 400, graph_error(
                "Invalid parameter", 100, 2804019, error_user_msg="The event_time is too far in the past"
            )
        data = body.get("data")
        if not isinstance(data, list) or not data:
            self.problems.append("data: a list of events")
            return 400, graph_error("(#100) The parameter data is required")
        unknown = set(body) - {"data", "access_token", "test_event_code", "partner_agent"}
        problems = [f"{name}: not a body parameter" for name in sorted(unknown)]
        for event in data:
            problems += check_event(event, time.time())
        if problems:
            self.problems += problems
            return 400, graph_error("Invalid parameter", 100, 2804050, error_user_msg="; ".join(problems))
        if self.mode == "zero":
            return 200, json.dumps({"events_received": 0, "messages": [], "fbtrace_id": "AbCdZero"}).encode()
        self.events += data
        return 200, json.dumps({"events_received": len(data), "messages": [], "fbtrace_id": "AbCdOk"}).encode()
