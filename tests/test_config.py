from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import pytest

import tinytrack
from tinytrack import ConfigError, build_config, load_config

BASE = {"postback": {"tokens": ["token-123456"]}}


def config_with(**tables: dict) -> dict:
    data = {"postback": {"tokens": ["token-123456"]}}
    for name, table in tables.items():
        data[name] = {**data.get(name, {}), **table}
    return data


def test_example_config_loads():
    example = Path(__file__).parent.parent / "config.example.toml"
    config = load_config(example)
    assert "spring-sale" in config.campaigns
    assert config.server.port == 8080
    assert config.postback.currency == "USD"


def test_defaults():
    config = build_config(BASE)
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.storage.path == "tinytrack.db"
    assert config.retention.clicks_days == 90
    assert config.retention.pii_days == 30
    assert config.retention.conversions_days == 0
    assert config.forward.max_age_hours == 72
    assert config.forward.allow_private is False
    assert sorted(str(n) for n in config.server.trusted_proxies) == ["127.0.0.1/32", "::1/128"]


def test_config_is_frozen():
    config = build_config(BASE)
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "data, message",
    [
        (
            config_with(campaigns={"x": {"url": "ftp://nope"}}),
            "campaigns.x.url: must be an http(s) URL, got 'ftp://nope'",
        ),
        (config_with(campaigns={"x": {}}), "campaigns.x.url: is required (or offers, a list of them)"),
        (
            config_with(campaigns={"x": {"url": "https://{sub1}.evil.com/"}}),
            "campaigns.x.url: macros are only allowed after the host, got 'https://{sub1}.evil.com/'",
        ),
        (
            config_with(campaigns={"x": {"url": "https://a.com/?q={nope}"}}),
            "campaigns.x.url: unknown macro {nope}; known: click_id, campaign, sub1, sub2, sub3, sub4, sub5, ext_id, offer, lander",
        ),
        (
            config_with(campaigns={"x": {"url": "https://a.com/\r\nX: y"}}),
            "campaigns.x.url: must not contain spaces or control characters, got 'https://a.com/\\r\\nX: y'",
        ),
        (
            config_with(campaigns={"x": {"url": "https://a.com/{click_id"}}),
            "campaigns.x.url: unbalanced or misplaced brace in 'https://a.com/{click_id'",
        ),
        (
            config_with(campaigns={"bad name": {"url": "https://a.com/"}}),
            "campaigns.bad name: campaign names are 1-64 characters of A-Z a-z 0-9 _ -",
        ),
        (
            config_with(campaigns={"x": {"url": "https://a.com/", "window_days": 0}}),
            "campaigns.x.window_days: must be at least 1, got 0",
        ),
        (
            config_with(campaigns={"x": {"url": "https://a.com/", "forward": {"fallback_url": "https://b.com/"}}}),
            "campaigns.x.forward.fallback_url: needs postback_url: it is where that one's deliveries go next",
        ),
        (
            config_with(
                campaigns={
                    "x": {
                        "url": "https://a.com/",
                        "postback_url": "https://s.com/?c={click_id}",
                        "forward": {"fallback_url": "https://b.com/?c={clickid}"},
                    }
                }
            ),
            "campaigns.x.forward.fallback_url: unknown macro {clickid}; known: click_id, campaign, sub1, sub2, sub3, "
            "sub4, sub5, ext_id, offer, lander, event, payout, currency, txid, status, id, cost, fbclid, gclid, gbraid, "
            "wbraid, ttclid, msclkid, fbc",
        ),
        (
            config_with(
                campaigns={
                    "x": {"url": "https://a.com/", "postback_url": "https://s.com/", "forward": {"fallback": "x"}}
                }
            ),
            "campaigns.x.forward.fallback: unknown key",
        ),
        (
            config_with(campaigns={"x": {"url": "https://a.com/", "pass_query": "yes"}}),
            "campaigns.x.pass_query: must be true or false, got 'yes'",
        ),
        (config_with(campaigns={"x": {"url": "https://a.com/", "colour": 1}}), "campaigns.x.colour: unknown key"),
        (
            config_with(campaigns={"x": {"url": "https://a.com/", "forward_statuses": ["paid"]}}),
            "campaigns.x.forward_statuses[0]: must be one of approved, pending, rejected, got 'paid'",
        ),
        (config_with(server={"port": 70000}), "server.port: must be between 1 and 65535, got 70000"),
        (config_with(server={"port": "80"}), "server.port: must be an integer, got '80'"),
        (config_with(server={"port": True}), "server.port: must be an integer, got 'True'"),
        (
            config_with(server={"trusted_proxies": ["10.0.0.1/8"]}),
            "server.trusted_proxies[0]: not an IP address or CIDR: '10.0.0.1/8' (10.0.0.1/8 has host bits set)",
        ),
        (config_with(postback={"tokens": []}), "postback.tokens: must list at least one token (run `tinytrack init`)"),
        ({"postback": {}}, "postback.tokens: must list at least one token (run `tinytrack init`)"),
        (
            config_with(postback={"tokens": ["short"]}),
            "postback.tokens[0]: must be 8-128 characters of A-Z a-z 0-9 . _ ~ -",
        ),
        (
            config_with(postback={"tokens": ["has space in it"]}),
            "postback.tokens[0]: must be 8-128 characters of A-Z a-z 0-9 . _ ~ -",
        ),
        (config_with(postback={"tokens": [7]}), "postback.tokens[0]: must be a string, got an integer"),
        (
            config_with(postback={"allow_ips": ["203.0.113.5/24"]}),
            "postback.allow_ips[0]: not an IP address or CIDR: '203.0.113.5/24' (203.0.113.5/24 has host bits set)",
        ),
        (
            config_with(postback={"allow_ips": ["garbage"]}),
            "postback.allow_ips[0]: not an IP address or CIDR: 'garbage' ('garbage' does not appear to be an IPv4 or IPv6 network)",
        ),
        (
            config_with(postback={"currency": "dollars"}),
            "postback.currency: must be a three-letter ISO 4217 code, got 'dollars'",
        ),
        (
            config_with(postback={"events": ["Sign Up"]}),
            "postback.events[0]: must match [a-z0-9_]{1,32}, got 'Sign Up'",
        ),
        (
            config_with(postback={"status_map": {"sale": "paid"}}),
            "postback.status_map.sale: must be one of approved, pending, rejected, got 'paid'",
        ),
        (config_with(postback={"hmac_secrets": ["short"]}), "postback.hmac_secrets[0]: must be at least 16 characters"),
        (config_with(admin={"token": "token-123456"}), "admin.token: must differ from every postback token"),
        (config_with(retention={"clicks_days": -1}), "retention.clicks_days: must be between 0 and 1000000000, got -1"),
        (config_with(forward={"allow_private": 1}), "forward.allow_private: must be true or false, got '1'"),
        (config_with(storage={"path": ""}), "storage.path: must not be empty"),
        (
            {**BASE, "sever": {}},
            "sever: unknown section; known: server, storage, postback, admin, retention, forward, money, fraud, attribution, pixel, alerts, geo, campaigns",
        ),
        ({**BASE, "campaigns": {"x": "https://a.com/"}}, "campaigns.x: must be a table, got 'https://a.com/'"),
        # Sections are checked in the file's usual order: campaigns last.
        (
            {**BASE, "campaigns": "x", "retention": {"clicks_days": -1}},
            "retention.clicks_days: must be between 0 and 1000000000, got -1",
        ),
    ],
)
def test_bad_config_names_key_and_value(data: dict, message: str):
    with pytest.raises(ConfigError) as caught:
        build_config(data)
    assert str(caught.value) == message


def test_ipv4_mapped_allowlist_entry_is_normalised():
    config = build_config(config_with(postback={"allow_ips": ["::ffff:203.0.113.0/120"]}))
    assert config.postback.allow_ips == (ipaddress.ip_network("203.0.113.0/24"),)


def test_status_map_words_are_case_insensitive():
    config = build_config(config_with(postback={"status_map": {"SALE": "approved"}}))
    assert config.postback.status_map == {"sale": "approved"}


def test_load_config_errors_name_the_file(tmp_path: Path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope.toml: no such file"):
        load_config(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nport = 1\n")
    with pytest.raises(ConfigError, match=r"broken.toml: invalid TOML: .*line 1"):
        load_config(broken)


def test_rendered_config_is_valid_and_has_fresh_tokens():
    first = tomllib.loads(tinytrack.render_config("x.toml"))
    second = tomllib.loads(tinytrack.render_config("x.toml"))
    config = build_config(first)
    assert config.postback.tokens != build_config(second).postback.tokens
    assert config.admin.token not in config.postback.tokens
    assert len(config.postback.tokens[0]) >= 32
    assert "example" in config.campaigns


@pytest.mark.parametrize("url", ["https://user:pw@offer.com/", "https:///nohost", "https://a b.com/", "http://"])
def test_offer_url_needs_a_plain_host(url: str):
    with pytest.raises(ConfigError, match=r"^campaigns\.x\.url: "):
        build_config(config_with(campaigns={"x": {"url": url}}))
