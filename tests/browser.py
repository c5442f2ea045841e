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
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
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
