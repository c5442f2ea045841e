"""The shipped deploy files, for real: nginx/tinytrack.conf in front of a real
`tinytrack serve` on a unix socket (nginx as an unprivileged process), and
systemd/tinytrack.service through `systemd-analyze verify` and `security`."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import POSTBACK_TOKEN, Server, free_port, write_config

import tinytrack

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "nginx" / "tinytrack.conf"
UNIT = ROOT / "systemd" / "tinytrack.service"

SHIPPED_SOCKET = "/run/tinytrack/tinytrack.sock"
SHIPPED_BINARY = "/opt/tinytrack/bin/tinytrack"
IS_ROOT = os.geteuid() == 0


# --- nginx: finding it, running it unprivileged ---------------------------------


def find_nginx() -> str:
    """nginx's path; as root (CI) install Debian's package when it is missing."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which("nginx", path=search)
    if found:
        return found
    if not IS_ROOT or not shutil.which("apt-get"):
        pytest.skip("nginx is not installed (CI installs it with `apt-get install -y nginx`; needs root here)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in (
        ["apt-get", "install", "-y", "nginx"],
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "nginx"],
    ):
        done = subprocess.run(attempt, env=env, capture_output=True, text=True, timeout=600)
        if attempt[1] == "install" and done.returncode == 0:
            break
    found = shutil.which("nginx", path=search)
    if not found:
        pytest.skip(f"nginx is missing and `apt-get install -y nginx` failed: {done.stderr[-500:]}")
    return found


def nginx_user() -> tuple[int, int] | None:
    """(uid, gid) nginx runs as: `nobody` and its primary group when the test is
    root; None (no switch, the current user) otherwise."""
    if not IS_ROOT:
        return None
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv (util-linux): cannot start nginx unprivileged")
    nobody = pwd.getpwnam("nobody")
    return nobody.pw_uid, nobody.pw_gid


def unprivileged(argv: list[str]) -> list[str]:
    user = nginx_user()
    if user is None:
        return argv
    uid, gid = user
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv]


def replace_once(text: str, old: str, new: str, count: int | None = 1) -> str:
    """`str.replace`, loudly: the shipped file must hold `old` exactly `count` times
    (at least once for None), so an edit to it breaks this test instead of silently
    testing something else."""
    found = text.count(old)
    expected = found >= 1 if count is None else found == count
    assert expected, f"nginx/tinytrack.conf: expected {count or 'some'}x {old!r}, found {found}"
    return text.replace(old, new)


@dataclass
class Site:
    """The shipped site rendered for a test directory, wrapped in a main nginx.conf."""

    directory: Path  # readable by nginx's user
    state: Path  # writable by nginx's user: pid, logs, temp files
    main_conf: Path
    http_port: int
    https_port: int
    socket: Path
    nginx: str

    @property
    def access_log(self) -> Path:
        return self.state / "tinytrack.access.log"

    def command(self, *args: str) -> list[str]:
        argv = [self.nginx, "-p", str(self.state), "-c", str(self.main_conf)]
        # Before reading the conf nginx opens its built-in error log, which is
        # /var/log/nginx/error.log in some builds (not writable unprivileged);
        # `-e` (nginx >= 1.19.5) moves it too.
        usage = subprocess.run([self.nginx, "-h"], capture_output=True, text=True, timeout=30)
        if "-e filename" in usage.stdout + usage.stderr:
            argv += ["-e", str(self.state / "error.log")]
        return unprivileged([*argv, *args])

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.state.glob("*.log")))


def render_site(
    text: str, *, http_port: int, https_port: int, sock: Path, cert: Path, key: Path, logs: Path, webroot: Path
) -> str:
    """Only addresses, paths, certificates and the server name change; every other
    directive is the shipped one."""
    # The test host may have no IPv6, and a second `listen 127.0.0.1:<port>` in the
    # same server is a duplicate: the [::] listeners are dropped, the IPv4 ones
    # moved to loopback on free ports.
    text = replace_once(text, "    listen [::]:80;\n", "")
    text = replace_once(text, "    listen [::]:443 ssl http2;\n", "")
    text = replace_once(text, "listen 80;", f"listen 127.0.0.1:{http_port};")
    text = replace_once(text, "listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;")
    text = replace_once(text, "server_name tracker.example.com;", "server_name localhost;", count=2)
    text = replace_once(text, f"server unix:{SHIPPED_SOCKET};", f"server unix:{sock};")
    text = replace_once(text, "/etc/letsencrypt/live/tracker.example.com/fullchain.pem;", f"{cert};")
    text = replace_once(text, "/etc/letsencrypt/live/tracker.example.com/privkey.pem;", f"{key};")
    # Log paths may be set in more than one server or location.
    text = replace_once(text, "/var/log/nginx/tinytrack.access.log", str(logs / "tinytrack.access.log"), count=None)
    text = replace_once(text, "/var/log/nginx/tinytrack.error.log", str(logs / "tinytrack.error.log"), count=None)
    text = replace_once(text, "root /var/www/html;", f"root {webroot};")
    # Nothing of the production host is left outside comments.
    live = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for leftover in ("/etc/", "/var/", "/run/", "example.com", "listen 80", "listen 443", "[::]"):
        assert leftover not in live, f"unrendered {leftover!r} in the site"
    return text


MAIN_CONF = """\
# A minimal main nginx.conf around the shipped site; Debian's sets the same kind of
# things (pid, logs, temp paths) and includes sites-enabled/* inside http {{}}.
worker_processes 1;
pid {state}/nginx.pid;
error_log {state}/error.log warn;
events {{
    worker_connections 256;
}}
http {{
    client_body_temp_path {state}/client_body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    # Debian's nginx.conf has `access_log /var/log/nginx/access.log;` here: the log
    # of every server that sets none (the site's port-80 server).
    access_log {state}/access.log;
    include {site};
}}
"""


@pytest.fixture
def site() -> Iterator[Site]:
    nginx = find_nginx()
    user = nginx_user()
    # pytest's tmp_path sits under 0700 directories when run as root: nobody could
    # not read the conf or reach the socket there.
    directory = Path(tempfile.mkdtemp(prefix="tinytrack-e2e-"))
    try:
        directory.chmod(0o755)
        state, webroot = directory / "nginx", directory / "www"
        state.mkdir(mode=0o755)
        webroot.mkdir(mode=0o755)
        cert, key = directory / "cert.pem", directory / "key.pem"
        made = subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        cert.chmod(0o644)
        key.chmod(0o600)
        if user:
            os.chown(state, *user)
            os.chown(key, *user)  # as certbot's privkey.pem is readable by nginx's master only
        http_port, https_port = free_port(), free_port()
        sock = directory / "tt.sock"
        rendered = directory / "tinytrack.conf"
        rendered.write_text(
            render_site(
                SITE.read_text(),
                http_port=http_port,
                https_port=https_port,
                sock=sock,
                cert=cert,
                key=key,
                logs=state,
                webroot=webroot,
            )
        )
        main_conf = directory / "nginx.conf"
        main_conf.write_text(MAIN_CONF.format(state=state, site=rendered))
        yield Site(directory, state, main_conf, http_port, https_port, sock, nginx)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def nginx_check(site: Site) -> subprocess.CompletedProcess:
    return subprocess.run(site.command("-t"), capture_output=True, text=True, timeout=60)


def test_nginx_t_passes_on_the_shipped_site(site: Site):
    checked = nginx_check(site)
    print(checked.stderr)
    assert checked.returncode == 0, checked.stderr
    assert "syntax is ok" in checked.stderr
    assert "test is successful" in checked.stderr


# --- end to end: client -> nginx (TLS) -> unix socket -> tinytrack ---------------


@pytest.fixture
def tracker(site: Site) -> Iterator[Server]:
    config = write_config(site.directory)
    text = config.read_text()
    assert "[postback]\n" in text and "[server]\n" in text
    # Postbacks only from 127.0.0.2; tinytrack's own access log on, to check it too.
    text = text.replace("[postback]\n", '[postback]\nallow_ips = ["127.0.0.2"]\n')
    text += "\n[pixel]\nenabled = true\n"  # for the pixel's location
    config.write_text(text.replace("[server]\n", "[server]\naccess_log = true\n"))
    server = Server(site.directory, config, 0, uds=site.socket)
    try:
        server.start()
        user = nginx_user()
        if user:
            # Stand-in for `usermod -aG tinytrack www-data`: the 0660 socket's group is
            # nginx's group, so nginx (and only the owner and that group) may connect.
            os.chown(site.socket, -1, user[1])
        yield server
    finally:
        if server.process and server.process.poll() is None:
            server.stop(signal.SIGKILL)


@pytest.fixture
def nginx(site: Site, tracker: Server) -> Iterator[subprocess.Popen]:
    checked = nginx_check(site)
    assert checked.returncode == 0, checked.stderr
    output = open(site.directory / "nginx.out", "wb")
    process = subprocess.Popen(
        site.command("-g", "daemon off;"), stdout=output, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 20
        while not listening(site.https_port):
            if process.poll() is not None or time.monotonic() > deadline:
                started = (site.directory / "nginx.out").read_text()
                raise RuntimeError(f"nginx did not start ({process.poll()}): {started}\n{site.logs()}")
            time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)  # graceful: finish requests, flush logs
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the session nginx leads: master and workers
                process.wait(5)
        output.close()


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def https(site: Site, source: str) -> httpx.Client:
    """A client whose packets come from `source`: Linux loopback answers on all of
    127.0.0.0/8, so nginx's $remote_addr is whichever one the test picks."""
    transport = httpx.HTTPTransport(local_address=source, verify=False)  # the test's self-signed cert
    return httpx.Client(transport=transport, base_url=f"https://127.0.0.1:{site.https_port}", timeout=10)


def click_id(answer: httpx.Response) -> str:
    assert answer.status_code == 302, (answer.status_code, answer.text)
    found = re.search(r"[?&]cid=([0-9a-f-]{36})", answer.headers["location"])
    assert found, answer.headers["location"]
    return found.group(1)


UA = {"user-agent": "Mozilla/5.0 (e2e)"}


def until_429(request, limit: int = 2000) -> list[int]:
    """Statuses of `request()` sent back to back until nginx answers 429 (or
    `limit` requests, a machine too slow to outrun the rate). No timing asserted."""
    statuses: list[int] = []
    while len(statuses) < limit and 429 not in statuses:
        statuses.append(request())
    assert statuses[-1] == 429, f"no 429 after {len(statuses)} requests: {sorted(set(statuses))}"
    assert len(set(statuses)) == 2, statuses  # only the one success code, then 429
    return statuses


def assert_no_token_in_nginx_logs(site: Site) -> None:
    """Every log nginx wrote: the site's access and error logs, and the main ones
    (where Debian's packaged nginx.conf logs servers that set no log of their own)."""
    logs = sorted(site.state.glob("*.log"))
    assert {p.name for p in logs} >= {"access.log", "error.log", "tinytrack.access.log", "tinytrack.error.log"}
    for path in logs:
        leaks = [line for line in path.read_text(errors="replace").splitlines() if POSTBACK_TOKEN in line]
        assert not leaks, f"nginx wrote the postback token to {path.name}:\n" + "\n".join(leaks[:3])


def test_through_real_nginx(site: Site, tracker: Server, nginx: subprocess.Popen):
    # Port 80 only redirects to TLS.
    with httpx.Client(base_url=f"http://127.0.0.1:{site.http_port}", timeout=10) as plain:
        moved = plain.get("/c/spring", headers=UA)
    assert moved.status_code == 301
    assert moved.headers["location"].startswith("https://") and moved.headers["location"].endswith("/c/spring")

    with https(site, "127.0.0.1") as visitor, https(site, "127.0.0.2") as network:
        # A click: the offer URL with the click id.
        click = visitor.get("/c/spring", params={"sub1": "x"}, headers=UA)
        first = click_id(click)
        assert click.headers["location"].startswith("https://offer.example.com/lp?cid=")
        second = click_id(visitor.get("/c/spring", params={"sub1": "y"}, headers=UA))
        assert click.headers.get("strict-transport-security") == "max-age=31536000"

        # The postback allowlist sees the address nginx saw. 127.0.0.1 is also one of
        # tinytrack's trusted proxies, so if nginx appended to the client's header
        # ("127.0.0.2, 127.0.0.1") tinytrack would believe 127.0.0.2: the spoof test
        # fails unless nginx overwrites X-Forwarded-For.
        spoofed = visitor.get(
            "/postback", params={"click_id": second, "token": POSTBACK_TOKEN}, headers={"x-forwarded-for": "127.0.0.2"}
        )
        assert spoofed.status_code == 403, spoofed.text
        allowed = network.get("/postback", params={"click_id": first, "token": POSTBACK_TOKEN, "payout": "2.50"})
        assert allowed.status_code == 200, allowed.text
        assert allowed.json() == {"status": "created", "id": 1}
        bearer = network.post(
            "/postback",
            json={"click_id": second, "payout": "1.50"},
            headers={"authorization": f"Bearer {POSTBACK_TOKEN}"},
        )
        assert bearer.status_code == 200, bearer.text
        assert bearer.json() == {"status": "created", "id": 2}

        # A big body: refused (nginx's 1k limit on /postback, or tinytrack's 1024 bytes).
        # The token rides in the query, as most networks send it.
        big = json.dumps({"click_id": first, "note": "x" * 5000}).encode()
        too_big = network.post(
            "/postback", params={"token": POSTBACK_TOKEN}, content=big, headers={"content-type": "application/json"}
        )
        assert too_big.status_code == 413

        # Postbacks have their own, larger limit (burst=100 nodelay: at least 101 pass).
        answers = until_429(
            lambda: network.get("/postback", params={"click_id": first, "token": POSTBACK_TOKEN}).status_code
        )
        assert answers[:100] == [200] * 100, answers

    # Clicks from one fresh address: a flood guard only (burst=200 nodelay lets at least
    # 201 through; carrier-grade NAT puts many visitors behind one address).
    with https(site, "127.0.0.3") as burst:
        statuses = until_429(lambda: burst.get("/c/spring", params={"sub1": "burst"}, headers=UA).status_code)
    assert statuses[:200] == [302] * 200, statuses

    # Stopping nginx (SIGQUIT, graceful) closes its logs; lines are written unbuffered anyway.
    nginx.send_signal(signal.SIGQUIT)
    nginx.wait(15)
    logged = site.access_log.read_text()
    print(logged[:3000])
    assert "/c/spring?sub1=x" in logged  # other requests keep their query
    assert re.search(r'^127\.0\.0\.2 .*"GET /postback" 200 ', logged, re.M), "the allowed postback, path only"
    assert re.search(r'^127\.0\.0\.2 .*"POST /postback" 200 ', logged, re.M), "the bearer postback"
    assert re.search(r'^127\.0\.0\.1 .*"GET /postback" 403 ', logged, re.M), "the spoofed postback, as nginx saw it"
    assert re.search(r'^127\.0\.0\.2 .*"POST /postback" 413 ', logged, re.M)
    assert re.search(r'^127\.0\.0\.2 .*"GET /postback" 429 ', logged, re.M)
    assert re.search(r'^127\.0\.0\.3 .*"GET /c/spring\?sub1=burst" 429 ', logged, re.M)
    assert_no_token_in_nginx_logs(site)

    assert tracker.stop() == 0
    output = tracker.output()
    print(output[-3000:])
    assert POSTBACK_TOKEN not in output
    assert "postback 403 forbidden" in output  # tinytrack's log is really being written


def test_the_pixel_through_real_nginx_is_always_the_gif(site: Site, tracker: Server, nginx: subprocess.Popen):
    """Stored through nginx; over the pixel's tight limit nginx answers the same GIF
    itself (no 429 reaches a browser), and with tinytrack down too."""
    gif = tinytrack.PIXEL_GIF
    with https(site, "127.0.0.5") as browser:
        cid = click_id(browser.get("/c/spring", headers=UA))
        first = browser.get("/pixel.gif", params={"cid": cid, "txid": "PX-1", "payout": "9"}, headers=UA)
        assert (first.status_code, first.content, first.headers["cache-control"]) == (200, gif, "no-store")
        assert first.headers["x-content-type-options"] == "nosniff"  # tinytrack's own answer
        answers = []
        while len(answers) < 2000 and all(a.headers.get("x-content-type-options") for a in answers):
            answers.append(browser.get("/pixel", params={"cid": cid, "txid": "PX-1"}, headers=UA))
        limited = answers[-1]
        assert "x-content-type-options" not in limited.headers, f"no limit after {len(answers)} hits"
        assert len(answers) >= 20  # burst=20 nodelay
        for answer in answers:
            assert (answer.status_code, answer.content, answer.headers["content-type"]) == (200, gif, "image/gif")
        assert limited.headers["cache-control"] == "no-store"
    with closing(sqlite3.connect(site.directory / "tinytrack.db")) as con:
        assert con.execute("SELECT status, source, payout FROM conversions").fetchall() == [
            ("pending", "pixel", 9_000_000)
        ]
    assert tracker.stop() == 0
    with https(site, "127.0.0.6") as browser:
        down = browser.get("/pixel", params={"cid": cid}, headers=UA)
    assert (down.status_code, down.content) == (200, gif)
    nginx.send_signal(signal.SIGQUIT)
    nginx.wait(15)
    logged = site.access_log.read_text()
    assert re.search(r'^127\.0\.0\.5 .*"GET /pixel.gif" 200 43 ', logged, re.M), logged[-2000:]
    assert cid not in logged  # the pixel's query is not logged


def test_a_token_sent_over_plain_http_is_not_logged(site: Site, tracker: Server, nginx: subprocess.Popen):
    """A network configured with http:// gets a 301 on port 80; the token in that
    request's query must not land in an access log either (Debian's default
    access_log logs $request, query included, for servers that set no log)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{site.http_port}", timeout=10) as plain:
        moved = plain.get("/postback", params={"click_id": "0" * 32, "token": POSTBACK_TOKEN})
    assert moved.status_code == 301
    nginx.send_signal(signal.SIGQUIT)
    nginx.wait(15)
    print(site.logs())
    assert "/postback" in site.logs()  # the request was logged somewhere
    assert_no_token_in_nginx_logs(site)


# --- systemd ------------------------------------------------------------------------


def unit_lines(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_unit_runs_serve_on_the_socket_nginx_uses():
    unit = unit_lines(UNIT.read_text())
    assert unit["Type"] == ["exec"]
    serve = [SHIPPED_BINARY, "serve", "-c", "/etc/tinytrack/config.toml", "--uds", SHIPPED_SOCKET]
    assert shlex.split(unit["ExecStart"][0]) == serve
    assert len(unit["ExecReload"]) == 1 and "-HUP" in unit["ExecReload"][0] and "$MAINPID" in unit["ExecReload"][0]
    assert unit["Restart"] == ["on-failure"]
    assert unit["RuntimeDirectory"] == [Path(SHIPPED_SOCKET).parent.name]  # /run/tinytrack
    assert unit["StateDirectory"] == ["tinytrack"]
    assert f"server unix:{SHIPPED_SOCKET};" in SITE.read_text()  # nginx looks where the unit listens


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if not found:
        pytest.skip("systemd-analyze is not installed")
    return found


def console_script() -> str:
    script = Path(sys.executable).parent / "tinytrack"
    found = str(script) if script.exists() else shutil.which("tinytrack")
    if not found:
        pytest.skip("the `tinytrack` console script is not installed (pip install -e .)")
    return found


@pytest.fixture
def rendered_unit(tmp_path: Path) -> Path:
    """The shipped unit with only ExecStart's binary pointed at this interpreter's
    console script (verify checks that the binary exists and is executable)."""
    text = UNIT.read_text()
    assert text.count(SHIPPED_BINARY) == 1
    path = tmp_path / "tinytrack.service"  # the unit's name comes from the file name
    path.write_text(text.replace(SHIPPED_BINARY, console_script()))
    return path


def run_analyze(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}
    return subprocess.run([systemd_analyze(), *args], capture_output=True, text=True, timeout=60, env=env)


def test_systemd_analyze_verify_is_clean(rendered_unit: Path):
    # User=tinytrack need not exist: verify does not resolve users (checked: clean
    # on a host without that user), so User/Group are left as shipped.
    checked = run_analyze("verify", str(rendered_unit))
    lines = (checked.stdout + checked.stderr).splitlines()
    print("\n".join(lines))
    assert checked.returncode == 0, lines
    # On a booted host verify may also warn about other installed units it loads
    # (multi-user.target's dependencies); nothing may be about this one.
    ours = [line for line in lines if "tinytrack" in line or str(rendered_unit.parent) in line]
    assert ours == []


def test_systemd_analyze_security_rates_the_unit_ok(rendered_unit: Path):
    if "--offline" not in run_analyze("--help").stdout:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    checked = run_analyze("security", "--no-pager", "--offline=yes", str(rendered_unit))
    print(checked.stdout, checked.stderr)
    found = re.search(r"Overall exposure level for tinytrack\.service: (\d+\.\d+)", checked.stdout)
    assert found, (checked.returncode, checked.stdout[-2000:], checked.stderr)
    assert float(found.group(1)) <= 2.0


# --- the backup service and its timer ---------------------------------------------

BACKUP_UNIT = ROOT / "systemd" / "tinytrack-backup.service"
BACKUP_TIMER = ROOT / "systemd" / "tinytrack-backup.timer"


def render_timed(unit: Path, timer: Path, directory: Path) -> tuple[Path, Path]:
    """A oneshot service (its binary pointed at this venv's console script) and its timer, side by side."""
    text = unit.read_text()
    assert text.count(SHIPPED_BINARY) == 1
    service = directory / unit.name
    service.write_text(text.replace(SHIPPED_BINARY, console_script()))
    (directory / timer.name).write_text(timer.read_text())
    return service, directory / timer.name


@pytest.fixture
def rendered_backup(tmp_path: Path) -> tuple[Path, Path]:
    return render_timed(BACKUP_UNIT, BACKUP_TIMER, tmp_path)


def test_backup_unit_backs_up_the_database_the_tracker_uses():
    unit, tracker = unit_lines(BACKUP_UNIT.read_text()), unit_lines(UNIT.read_text())
    command = shlex.split(unit["ExecStart"][0])
    assert command[:4] == [SHIPPED_BINARY, "backup", "-c", "/etc/tinytrack/config.toml"]
    assert command[4].startswith("/var/lib/tinytrack-backups") and command[5:] == ["--keep", "14"]
    assert unit["Type"] == ["oneshot"] and unit["User"] == tracker["User"]
    assert "tinytrack" in unit["StateDirectory"][0].split() and "tinytrack-backups" in unit["StateDirectory"][0].split()
    timer = unit_lines(BACKUP_TIMER.read_text())
    assert timer["OnCalendar"] and timer["Persistent"] == ["true"]


def test_systemd_analyze_verify_is_clean_for_the_backup_timer(rendered_backup: tuple[Path, Path]):
    service, timer = rendered_backup
    checked = run_analyze("verify", str(service), str(timer))
    lines = (checked.stdout + checked.stderr).splitlines()
    print("\n".join(lines))
    assert checked.returncode == 0, lines
    assert [line for line in lines if "tinytrack" in line or str(service.parent) in line] == []


def test_systemd_analyze_security_rates_the_backup_unit_ok(rendered_backup: tuple[Path, Path]):
    if "--offline" not in run_analyze("--help").stdout:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    checked = run_analyze("security", "--no-pager", "--offline=yes", str(rendered_backup[0]))
    found = re.search(r"Overall exposure level for tinytrack-backup\.service: (\d+\.\d+)", checked.stdout)
    assert found, (checked.returncode, checked.stdout[-2000:], checked.stderr)
    print(found.group(0))
    assert float(found.group(1)) <= 2.0


# --- the self-test service and its timer ------------------------------------------

SELFTEST_UNIT = ROOT / "systemd" / "tinytrack-selftest.service"
SELFTEST_TIMER = ROOT / "systemd" / "tinytrack-selftest.timer"


@pytest.fixture
def rendered_selftest(tmp_path: Path) -> tuple[Path, Path]:
    return render_timed(SELFTEST_UNIT, SELFTEST_TIMER, tmp_path)


def test_selftest_unit_tests_the_socket_nginx_uses():
    unit, tracker = unit_lines(SELFTEST_UNIT.read_text()), unit_lines(UNIT.read_text())
    command = shlex.split(unit["ExecStart"][0])
    serve = shlex.split(tracker["ExecStart"][0])
    assert command == [SHIPPED_BINARY, "selftest", "-c", serve[3], "--url", f"unix:{serve[serve.index('--uds') + 1]}"]
    assert unit["Type"] == ["oneshot"] and unit["User"] == tracker["User"]
    timer = unit_lines(SELFTEST_TIMER.read_text())
    assert timer["OnUnitActiveSec"] == ["15min"]


def test_systemd_analyze_verify_is_clean_for_the_selftest_timer(rendered_selftest: tuple[Path, Path]):
    service, timer = rendered_selftest
    checked = run_analyze("verify", str(service), str(timer))
    lines = (checked.stdout + checked.stderr).splitlines()
    print("\n".join(lines))
    assert checked.returncode == 0, lines
    assert [line for line in lines if "tinytrack" in line or str(service.parent) in line] == []


def test_systemd_analyze_security_rates_the_selftest_unit_ok(rendered_selftest: tuple[Path, Path]):
    if "--offline" not in run_analyze("--help").stdout:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    checked = run_analyze("security", "--no-pager", "--offline=yes", str(rendered_selftest[0]))
    found = re.search(r"Overall exposure level for tinytrack-selftest\.service: (\d+\.\d+)", checked.stdout)
    assert found, (checked.returncode, checked.stdout[-2000:], checked.stderr)
    print(found.group(0))
    assert float(found.group(1)) <= 2.0
