"""Drive Debian's headless Chromium from tests (a helper module, not a test file).

    dom = render(basic_auth_url(f"{base}/admin", "admin", ADMIN_TOKEN), tmp_path / "admin.png")

One `chromium` process per call, plain command-line flags, no extra Python
dependency. Things learned by experiment (Chromium 150, Debian 12):

- Basic auth works with credentials in the URL (http://user:pass@host/...), for
  --dump-dom and --screenshot alike. Chromium first sends no Authorization header;
  it retries with the URL's credentials only if the 401 carries
  `WWW-Authenticate: Basic ...`. If the credentials are refused, or the challenge
  is missing or not Basic, it exits 0 with a blank page (or the 401 body).
- Chromium exits 0 even when the page could not be loaded (connection refused...):
  it then dumps its own error page. Hence the checks in render().
- --virtual-time-budget fast-forwards timers: JS scheduled within the budget has
  run before the DOM is dumped / the screenshot taken, and it costs no wall time.
- Debian's /usr/bin/chromium wrapper may print a harmless shell error to stderr
  ("[: ...: unexpected operator" from /etc/chromium.d/dev-shm when /dev/shm is
  mounted twice), and Chromium logs D-Bus errors unless --log-level=3.
- inspect() speaks the DevTools protocol (CDP) over --remote-debugging-pipe
  instead: Chromium reads commands from fd 3 and writes replies/events to fd 4,
  each message one JSON object terminated by a NUL byte (no port, no websockets).
  Runtime.evaluate is not subject to the page's CSP, so it can measure pages that
  forbid all scripts. Page.navigate returns errorText for
  connection errors, for an error status with an empty body
  (net::ERR_HTTP_RESPONSE_CODE_FAILURE) and for a `WWW-Authenticate: Basic` 401
  when the Authorization header is missing or refused
  (net::ERR_INVALID_AUTH_CREDENTIALS: headless never shows the 401 body). Any
  other status (404 page, 401 without challenge) loads normally: it shows only in
  Network.responseReceived. With `mobile` emulation a page without
  <meta name="viewport" content="width=device-width"> lays out 980px wide.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

CHROMIUM = shutil.which("chromium")


class BrowserError(RuntimeError):
    """Chromium failed, timed out, or did not render the page."""


def basic_auth_url(url: str, user: str, password: str) -> str:
    """`url` with percent-encoded Basic-auth credentials in it (user:pass@host)."""
    parts = urlsplit(url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def render(
    url: str,
    screenshot: Path | None = None,
    width: int = 1200,
    height: int = 900,
    timeout: float = 60,
    js_budget_ms: int = 5000,
) -> str:
    """Load `url` in headless Chromium; return the DOM after JS ran (serialized HTML).

    If `screenshot` is given, also write a `width` x `height` PNG of the viewport
    there (in the same run). Raises BrowserError with Chromium's stderr on failure.
    """
    shown = _redact(url)  # for error messages: no password in test logs
    if CHROMIUM is None:
        raise BrowserError("chromium not found on PATH (apt-get install chromium)")
    # ignore_cleanup_errors: a dying child may still be writing to the profile.
    with tempfile.TemporaryDirectory(prefix="tinytrack-chromium-", ignore_cleanup_errors=True) as tmp:
        cmd = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # needed as root (CI containers)
            "--disable-gpu",
            "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
            f"--user-data-dir={tmp}/profile",  # fresh profile: no cache, no cookies
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-crash-reporter",
            "--disable-breakpad",
            "--log-level=3",  # only fatal errors on stderr (no D-Bus noise)
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={js_budget_ms}",
            "--dump-dom",
        ]
        if screenshot is not None:
            screenshot = Path(screenshot)
            screenshot.unlink(missing_ok=True)  # so a stale file can't pass the check
            cmd.append(f"--screenshot={screenshot}")
        cmd.append(url)
        # Chromium writes "Crash Reports" and dconf state under $HOME / XDG dirs
        # whatever --user-data-dir says: keep them in the temporary directory too.
        env = {**os.environ, "HOME": tmp, "XDG_CONFIG_HOME": tmp, "XDG_CACHE_HOME": tmp}
        # Own process group, so a timeout kills the renderer/zygote children as well
        # (otherwise they keep the pipes open and communicate() never returns).
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            _, err = proc.communicate()
            raise BrowserError(f"chromium timed out after {timeout}s on {shown}\n{err}") from None
        finally:
            if proc.poll() is None:  # e.g. KeyboardInterrupt: don't leave it running
                _kill_group(proc)
                proc.wait()

    if proc.returncode != 0:
        raise BrowserError(f"chromium exited {proc.returncode} on {shown}\n{err}")
    # With --screenshot, a "N bytes written to file ..." line may land on stdout.
    dom = re.sub(r"(?m)^\d+ bytes written to file .*\n?", "", out)
    if 'id="main-frame-error"' in dom:  # Chromium's own "This site can't be reached"
        code = re.search(r'"errorCode":"(\w+)"', dom)
        raise BrowserError(f"chromium could not load {shown}: {code and code[1]}")
    if re.fullmatch(r"\s*<html><head></head><body></body></html>\s*", dom):
        raise BrowserError(
            f"chromium rendered a blank page for {shown}: Basic auth refused, or the 401 "
            "lacked 'WWW-Authenticate: Basic'?"
        )
    if screenshot is not None and not (screenshot.is_file() and screenshot.stat().st_size):
        raise BrowserError(f"chromium wrote no screenshot to {screenshot}\n{err}")
    return dom


class _Cdp:
    """One CDP connection over Chromium's debugging pipe (NUL-terminated JSON)."""

    def __init__(self, to_chrome: int, from_chrome: int, deadline: float) -> None:
        self.out = os.fdopen(to_chrome, "wb")
        self.fd, self.deadline = from_chrome, deadline
        self.buf = b""
        self.events: list[dict] = []  # events read while waiting for something else
        self.last_id = 0
        self.session: str | None = None  # set after Target.attachToTarget

    def _read(self) -> dict:
        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                raise BrowserError("chromium closed the DevTools pipe")
            self.buf += chunk
        msg, _, self.buf = self.buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method: str, **params: Any) -> dict:
        """Send a command and return its result (events meanwhile are queued)."""
        self.last_id += 1
        msg: dict[str, Any] = {"id": self.last_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        try:
            self.out.write(json.dumps(msg).encode() + b"\0")
            self.out.flush()
        except BrokenPipeError:
            raise BrowserError("chromium closed the DevTools pipe") from None
        while True:
            reply = self._read()
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def event(self, method: str) -> dict:
        """Params of the first (queued or next) event called `method`."""
        while True:
            for i, ev in enumerate(self.events):
                if ev["method"] == method:
                    return self.events.pop(i).get("params", {})
            ev = self._read()
            if "method" in ev:
                self.events.append(ev)


def _on_fds_3_and_4(to_chrome: int, from_chrome: int):
    """preexec_fn putting the pipe ends on fds 3 (Chromium reads) and 4 (it writes)."""

    def setup() -> None:
        # Stage above 4 first, in case a source fd is itself 3 or 4.
        r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 5) for fd in (to_chrome, from_chrome))
        os.dup2(r, 3)
        os.dup2(w, 4)

    return setup


def inspect(
    url: str,
    expression: str,
    *,
    width: int,
    height: int,
    headers: dict[str, str] | None = None,
    screenshot: Path | None = None,
    timeout: float = 60,
) -> Any:
    """Load url in headless Chromium at width x height (CSS px, device scale 1, `mobile`
    emulation when width < 600), wait for the load event, evaluate the JS `expression`
    (returnByValue) and return its value; optionally write a full-page PNG screenshot
    (Page.captureScreenshot with captureBeyondViewport and the page's full height) to
    `screenshot`.

    `headers` are sent with every request (e.g. Authorization for Basic auth).
    Raises BrowserError if the page did not load with status 200, if the expression
    threw, or on timeout. Needs <meta name="viewport"> for innerWidth == width on mobile.
    """
    if CHROMIUM is None:
        raise BrowserError("chromium not found on PATH (apt-get install chromium)")
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="tinytrack-chromium-", ignore_cleanup_errors=True) as tmp:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        cmd += [f"--user-data-dir={tmp}/profile", "--no-first-run", "--no-default-browser-check"]
        cmd += ["--disable-crash-reporter", "--disable-breakpad", "--log-level=3", "--hide-scrollbars"]
        cmd += ["--remote-debugging-pipe", "about:blank"]
        env = {**os.environ, "HOME": tmp, "XDG_CONFIG_HOME": tmp, "XDG_CACHE_HOME": tmp}
        # Two pipes take the lowest free fds, so fds 3 and 4 are open in this process
        # afterwards: pass_fds=(3, 4) is then valid, and keeps the child's new 3 and 4.
        chrome_in, to_chrome = os.pipe()
        from_chrome, chrome_out = os.pipe()
        with open(f"{tmp}/stderr", "w+") as err:
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=env,
                    pass_fds=(3, 4),
                    preexec_fn=_on_fds_3_and_4(chrome_in, chrome_out),
                    start_new_session=True,  # own group: kill renderers too
                )
            except BaseException:
                os.close(to_chrome)
                os.close(from_chrome)
                raise
            finally:
                os.close(chrome_in)
                os.close(chrome_out)
            cdp = _Cdp(to_chrome, from_chrome, deadline)
            try:
                return _inspect(cdp, url, expression, width, height, headers, screenshot)
            except TimeoutError:
                err.seek(0)
                raise BrowserError(f"chromium timed out after {timeout}s on {_redact(url)}\n{err.read()}") from None
            except BrowserError as exc:
                err.seek(0)
                raise BrowserError(f"{exc}\n{err.read()}".rstrip()) from None
            finally:
                with contextlib.suppress(OSError, BrowserError, TimeoutError):
                    cdp.session = None
                    cdp.deadline = time.monotonic() + 2
                    cdp.call("Browser.close")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2)
                _kill_group(proc)  # also stray children, even if Chromium exited
                proc.wait()
                with contextlib.suppress(OSError):
                    cdp.out.close()
                os.close(from_chrome)


def _inspect(cdp: _Cdp, url, expression, width, height, headers, screenshot) -> Any:
    target = cdp.call("Target.createTarget", url="about:blank")["targetId"]
    cdp.session = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        width=width,
        height=height,
        deviceScaleFactor=1,
        mobile=width < 600,
    )
    cdp.call("Network.enable")  # for the status of the main document
    if headers:
        cdp.call("Network.setExtraHTTPHeaders", headers=headers)
    cdp.call("Page.enable")
    cdp.events.clear()  # nothing so far is about `url`
    nav = cdp.call("Page.navigate", url=url)
    if nav.get("errorText"):
        raise BrowserError(f"chromium could not load {_redact(url)}: {nav['errorText']}")
    cdp.event("Page.loadEventFired")
    statuses = [
        ev["params"]["response"]["status"]
        for ev in cdp.events
        if ev["method"] == "Network.responseReceived"
        and ev["params"].get("loaderId") == nav.get("loaderId")
        and ev["params"].get("type") == "Document"
    ]
    if statuses != [200]:
        raise BrowserError(f"{_redact(url)} answered HTTP {statuses or 'nothing'}, not 200")
    cdp.events.clear()
    res = cdp.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
    if "exceptionDetails" in res:
        exc = res["exceptionDetails"].get("exception", {})
        raise BrowserError(f"expression threw: {exc.get('description') or exc.get('value')}")
    if screenshot is not None:
        full = cdp.call("Page.getLayoutMetrics")["cssContentSize"]["height"]
        clip = {"x": 0, "y": 0, "width": width, "height": max(math.ceil(full), height), "scale": 1}
        png = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        Path(screenshot).write_bytes(base64.b64decode(png["data"]))
    return res["result"].get("value")
