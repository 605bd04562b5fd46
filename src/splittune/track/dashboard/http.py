"""The dashboards' web server: one page, its assets (shipped in the package, nothing fetched at view time) and the
JSON endpoints the page polls, on the standard library's ``ThreadingHTTPServer`` (no dependency).

Loopback by default, where no token is needed but the ``Host`` header must name loopback (a web page elsewhere
cannot read the dashboard by rebinding its own name to 127.0.0.1). Any other address needs a token: a browser
presents it once (``/?token=…``) and gets an HttpOnly cookie derived from it, never the token itself, so the page
and its scripts hold no secret; a script sends ``Authorization: Bearer <token>``. Compared in constant time. No
request line is logged, so a token in a URL stays out of logs.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import json
import math
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from ...errors import SplittuneError

ASSETS = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
COOKIE = "splittune_dashboard"
TOKEN_ENV = "SPLITTUNE_DASHBOARD_TOKEN"
MIN_TOKEN = 16
HEADERS = {  # the page runs only its own scripts and talks only to this server
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
}

Endpoint = Callable[[dict[str, str]], Any]  # the query's parameters -> a JSON-able value


class DashboardError(SplittuneError, RuntimeError):
    """A dashboard that cannot start (its address, its token, its run directory)."""


def read_token(path: Path | None, environ: dict[str, str], flag: str) -> str | None:
    """The token from ``path`` (``flag``), else from ``$SPLITTUNE_DASHBOARD_TOKEN``, else None; at least 16 characters."""
    if path is not None:
        try:
            token = Path(path).read_text().strip()
        except OSError as err:
            raise DashboardError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None
        where = f"{flag} {path}"
    else:
        token, where = environ.get(TOKEN_ENV, "").strip() or None, f"${TOKEN_ENV}"
    if token is not None and len(token) < MIN_TOKEN:
        raise DashboardError(f"{where}: the dashboard token must be at least {MIN_TOKEN} characters")
    return token


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6); port 0: any free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise DashboardError(f"{flag} must be HOST:PORT with a port in 0..65535 (0: any free port), got {text!r}")
    return host.strip("[]"), int(port)


def cookie_of(token: str) -> str:
    """What the browser keeps: a digest of the token, not the token (a cookie read off a disk is no password)."""
    return hmac.new(token.encode(), b"splittune dashboard cookie", hashlib.sha256).hexdigest()


def finite(value: Any) -> Any:
    """JSON the browser parses: NaN and infinities (an overflowed float16 loss) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


@dataclass
class Running:
    """A dashboard being served: its ``url`` (the page), ``stop()`` to end it."""

    httpd: ThreadingHTTPServer
    url: str
    port: int

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(page: str, endpoints: dict[str, Endpoint], token: str | None, loopback_hosts: set[str] | None):
    class Handler(BaseHTTPRequestHandler):
        server_version = "splittune"
        sys_version = ""

        def log_message(self, *args) -> None:  # request lines may carry a token: none is logged
            pass

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if loopback_hosts is not None and self.headers.get("Host", "").lower() not in loopback_hosts:
                return self._send(403, {"error": "this dashboard answers only to a loopback Host"})
            if token is not None:
                refused = self._refused(url.path, query)
                if refused is not None:
                    return refused
            if url.path in ("/", "/index.html"):
                return self._asset(page)
            if url.path.startswith("/static/"):
                return self._asset(url.path.removeprefix("/static/"))
            endpoint = endpoints.get(url.path.removeprefix("/api/")) if url.path.startswith("/api/") else None
            if endpoint is None:
                return self._send(404, {"error": f"no such path: {url.path[:100]}"})
            try:
                body = endpoint(query)
            except DashboardError as err:  # not ready yet (a server loading its model)
                return self._send(503, {"error": str(err)})
            except Exception as err:  # a file mid-write, a state mid-change: the next poll asks again
                return self._send(500, {"error": f"{type(err).__name__}: {str(err)[:200]}"})
            self._send(200, body)

        def _refused(self, path: str, query: dict[str, str]):
            given = query.get("token")
            if given is not None:  # a browser presenting the token: a cookie, and the same page without it in the URL
                if not hmac.compare_digest(given.encode(), token.encode()):
                    return self._send(403, {"error": "wrong dashboard token"})
                self.send_response(303)
                self.send_header("Location", path if path.startswith("/") else "/")
                self.send_header("Set-Cookie", f"{COOKIE}={cookie_of(token)}; HttpOnly; SameSite=Strict; Path=/")
                self._headers(0)
                return True
            bearer = self.headers.get("Authorization", "")
            if bearer.startswith("Bearer "):
                ok = hmac.compare_digest(bearer.removeprefix("Bearer ").encode(), token.encode())
                return None if ok else self._send(403, {"error": "wrong dashboard token"})
            cookies = dict(part.strip().partition("=")[::2] for part in self.headers.get("Cookie", "").split(";") if "=" in part)
            if COOKIE in cookies:
                ok = hmac.compare_digest(cookies[COOKIE].encode(), cookie_of(token).encode())
                return None if ok else self._send(403, {"error": "wrong dashboard token"})
            return self._send(401, {"error": "this dashboard needs its token: open /?token=… once, or send "
                                             "Authorization: Bearer …"})

        def _asset(self, name: str) -> None:
            path = ASSETS / name
            if "/" in name or name.startswith(".") or path.suffix not in TYPES or not path.is_file():
                return self._send(404, {"error": "no such asset"})
            self._send(200, path.read_bytes(), TYPES[path.suffix])

        def _send(self, code: int, body, kind: str = "application/json") -> bool:
            data = body if isinstance(body, bytes) else json.dumps(finite(body), allow_nan=False).encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self._headers(len(data))
            self.wfile.write(data)
            return True

        def _headers(self, length: int) -> None:
            for key, value in HEADERS.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(length))
            self.end_headers()

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a browser that went away mid-reply is no fault
        pass


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve(listen: str, page: str, endpoints: dict[str, Endpoint], token: str | None, flag: str = "--listen") -> Running:
    """Serve ``page`` (an asset's name) and ``endpoints`` (``/api/<name>``) on ``listen`` (HOST:PORT; port 0: any
    free one) in a thread of this process. Off loopback a token is required."""
    host, port = parse_listen(listen, flag)
    loopback = is_loopback(host)
    if not loopback and token is None:
        raise DashboardError(f"{flag} {listen}: a dashboard off loopback needs a token (set ${TOKEN_ENV} or give a token "
                             "file); on 127.0.0.1 it needs none")
    try:
        httpd = (_Server6 if ":" in host else _Server)((host, port), _handler(page, endpoints, token, None))  # (hosts: below)
    except OSError as err:
        why = {errno.EADDRINUSE: "the port is already in use", errno.EADDRNOTAVAIL: f"{host} is not an address of this machine",
               errno.EACCES: "permission denied (ports below 1024 need privileges)"}.get(err.errno, err.strerror or str(err))
        raise DashboardError(f"{flag} {listen}: cannot listen there: {why}") from None
    except (socket.gaierror, UnicodeError):
        raise DashboardError(f"{flag} {listen}: cannot resolve {host!r}") from None
    port = httpd.server_address[1]
    if loopback and token is None:  # only loopback names may reach it (DNS rebinding)
        names = {"127.0.0.1", "localhost", "[::1]", host.lower(), f"[{host.lower()}]"}
        httpd.RequestHandlerClass = _handler(page, endpoints, token, {f"{n}:{port}" for n in names})
    shown = f"[{host}]" if ":" in host else host
    threading.Thread(target=httpd.serve_forever, args=(0.1,), name="splittune-dashboard", daemon=True).start()
    return Running(httpd, f"http://{shown}:{port}/", port)
