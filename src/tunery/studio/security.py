"""The Studio's guards: the auth token, Host and CSRF checks, and confining paths to allowed roots.

Every request passes `guard` (an ASGI middleware). Paths that arrive over the network go through
`confine`, which resolves symlinks and `..` first and then checks the result lies inside an allowed root.
"""

from __future__ import annotations

import hmac
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from .settings import StudioSettings

COOKIE = "tunery_studio_token"
CSRF_HEADER = "x-tunery"


class PathNotAllowed(PermissionError):
    """A path outside every allowed root (HTTP 403)."""


class BadPath(ValueError):
    """A path that is malformed (HTTP 400)."""


def confine(path: str | Path, roots: list[Path], base: Path | None = None) -> Path:
    """Resolve `path` (relative ones against `base`) and return it if it lies inside one of `roots`."""
    text = str(path)
    if not text.strip() or "\x00" in text:
        raise BadPath(f"not a valid path: {text!r}")
    p = Path(text).expanduser()
    if not p.is_absolute():
        if base is None:
            raise BadPath(f"give an absolute path: {text}")
        p = base / p
    try:
        p = p.resolve()
    except (OSError, RuntimeError) as e:
        raise BadPath(f"cannot resolve {text}: {e}") from None
    for root in roots:
        if p == root or p.is_relative_to(root):
            return p
    shown = ", ".join(str(r) for r in roots)
    raise PathNotAllowed(f"{text} is outside the folders the Studio may use ({shown}); "
                         "start the Studio with TUNERY_STUDIO_DATA_ROOTS / TUNERY_STUDIO_MODEL_ROOTS naming its folder to allow it")


# A dotted import path naming a callable, e.g. `mypkg.rewards:score`.
CALLABLE_RE = re.compile(r"^\s*[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\s*:\s*[A-Za-z_]\w*\s*$")


def token_ok(settings: StudioSettings, candidate: str | None) -> bool:
    if not settings.auth_token:
        return True
    return bool(candidate) and hmac.compare_digest(candidate.encode(), settings.auth_token.encode())


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


def _cookie(scope, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    for part in raw.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Tunery Studio: sign in</title><style>body{font:16px system-ui,sans-serif;display:grid;place-items:center;min-height:90vh;
background:#f5f6f8;color:#1d2330}form{background:#fff;padding:28px;border-radius:12px;box-shadow:0 2px 12px #0001;
display:grid;gap:12px;width:min(360px,90vw)}input,button{font:inherit;padding:10px;border-radius:8px;border:1px solid #c8ccd4}
button{background:#3b5bdb;color:#fff;border:0;cursor:pointer}</style></head><body><form method="get" action="/">
<b>Tunery Studio</b><label>Access token<br><input name="token" type="password" autofocus required style="width:100%;box-sizing:border-box"></label>
<button>Sign in</button><small>Start the server with <code>--auth-token</code> to set it.</small></form></body></html>"""


class Guard:
    """ASGI middleware: Host check (DNS rebinding), token (header, cookie or ?token= login), CSRF header."""

    def __init__(self, app, settings: StudioSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        s = self.settings
        if s.allowed_hosts is not None:
            host = (_header(scope, b"host") or "").strip()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in s.allowed_hosts:
                return await _plain(send, 400, "unexpected Host header")
        if s.auth_token:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            given = query.get("token")
            if given is not None and scope.get("method") == "GET" and token_ok(s, given):
                # Login link: remember the token in a cookie and drop it from the address bar.
                rest = urlencode([(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode()) if k != "token"])
                path = scope.get("path", "/")
                path = path if path.startswith("/") and not path.startswith("//") else "/"  # no open redirect
                location = path + (f"?{rest}" if rest else "")
                cookie = f"{COOKIE}={s.auth_token}; Path=/; HttpOnly; SameSite=Strict"
                return await _send(send, 303, b"", [(b"location", location.encode()), (b"set-cookie", cookie.encode())])
            auth = _header(scope, b"authorization") or ""
            bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            cand = bearer or _header(scope, b"x-tunery-token") or _cookie(scope, COOKIE)
            if not token_ok(s, cand):
                accept = _header(scope, b"accept") or ""
                if scope.get("method") == "GET" and "text/html" in accept:
                    return await _send(send, 401, LOGIN_PAGE.encode(), [(b"content-type", b"text/html; charset=utf-8")])
                return await _plain(send, 401, "missing or wrong access token (header Authorization: Bearer TOKEN)")
        if scope.get("method") not in ("GET", "HEAD", "OPTIONS") and _header(scope, CSRF_HEADER.encode()) is None:
            # A custom header cannot be sent cross-site without a CORS preflight, which this server never grants.
            return await _plain(send, 403, f"state-changing requests need the {CSRF_HEADER} header")
        return await self.app(scope, receive, send)


async def _plain(send, status: int, text: str):
    body = ('{"detail": ' + _json_str(text) + "}").encode()
    await _send(send, status, body, [(b"content-type", b"application/json")])


def _json_str(s: str) -> str:
    import json

    return json.dumps(s)


async def _send(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]):
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
