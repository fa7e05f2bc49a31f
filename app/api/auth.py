"""API-key check as pure ASGI middleware, decided on `scope["path"]` (never on a Host-derived URL).

Keys are compared as SHA-256 digests with `hmac.compare_digest` against every configured key (no early
exit), so timing reveals neither which key nor how much of it matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import AuthenticationError, error_body

OPEN_PATHS = frozenset({"/health", "/ready"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: Iterable[str], open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app = app
        self._digests = [_digest(k) for k in api_keys]
        self._open = frozenset(open_paths)

    def is_authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        supplied = None
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    supplied = token.strip()
            elif name == b"x-api-key" and supplied is None:
                supplied = value.decode("latin-1").strip()
        if not supplied:
            return False
        d = _digest(supplied)
        ok = False
        for known in self._digests:
            ok |= hmac.compare_digest(d, known)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._digests or scope["path"] in self._open \
                or scope.get("method") == "OPTIONS" or self.is_authorized(scope["headers"]):
            await self.app(scope, receive, send)
            return
        exc = AuthenticationError()
        body = json.dumps(error_body(exc.message, exc.type, exc.param, exc.code)).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
