"""Request limits and graceful drain, as pure ASGI middleware in front of the API routes.

* Headers: at most `max_header_bytes` in all and `max_headers` fields (431), on every path. (uvicorn's
  h11 limit only applies to headers that arrive in pieces.)
* Body: at most `max_body_bytes` (413), read in full here (Content-Length or chunked) so nothing past the
  limit is ever buffered, then replayed to the app; JSON nesting deeper than `max_json_depth` is a 400
  (Python's parser would otherwise recurse until it raises).
* Drain: after SIGTERM (`Drain.begin`), `/ready` turns 503 and new API requests get 503 with
  `Retry-After`, while requests already in flight run to completion; `Drain.wait_idle` returns when
  the last one is done (the server then exits, see `app.server`).
"""

from __future__ import annotations

import asyncio
import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_body

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """True if the JSON text nests arrays/objects deeper than `limit` (strings are skipped)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for m in _BRACKETS.finditer(_STRINGS.sub(b'""', body)):
        if m.group() in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


class Drain:
    """In-flight API requests and the draining flag."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.draining = True

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


async def _send_error(send: Send, status: int, message: str, type_: str, code: str | None,
                      headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class RequestGuardMiddleware:
    def __init__(self, app: ASGIApp, drain: Drain, max_body_bytes: int, max_json_depth: int,
                 max_header_bytes: int, max_headers: int = 100) -> None:
        self.app = app
        self.drain = drain
        self.max_body = max_body_bytes
        self.max_depth = max_json_depth
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if len(headers) > self.max_headers or sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
            await _send_error(send, 431, f"Request headers exceed {self.max_headers} fields or "
                              f"{self.max_header_bytes} bytes.", "invalid_request_error", "headers_too_large",
                              [(b"connection", b"close")])
            return
        if not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await _send_error(send, 503, "The server is shutting down; retry on another replica.",
                              "server_error", "shutting_down", [(b"retry-after", b"5"), (b"connection", b"close")])
            return
        self.drain.enter()
        try:
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive, send)
                if body is None:
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                await self._too_large(send)
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._too_large(send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if json_depth_exceeds(body, self.max_depth):
            await _send_error(send, 400, f"The JSON body nests deeper than {self.max_depth} levels.",
                              "invalid_request_error", None)
            return None
        return body

    async def _too_large(self, send: Send) -> None:
        await _send_error(send, 413, f"The request body exceeds {self.max_body} bytes.", "invalid_request_error",
                          "request_too_large", [(b"connection", b"close")])


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would deliver it

    return replay


class Admission:
    """Bounded waiting queue of one model, counted on the API side where requests are accepted.

    A job (one choice of one prompt) holds a KV slot once running; jobs beyond the model's slots wait. A new
    request is refused with 429 when its jobs would make more than `max_waiting` jobs wait, or push the
    prompt tokens not yet prefilled past `max_waiting_tokens` (an empty queue always takes one request,
    whose size the context length already bounds). Memory for waiting work is thus bounded.
    """

    def __init__(self, slots: int, max_waiting: int, max_waiting_tokens: int) -> None:
        self.slots = slots
        self.max_waiting = max_waiting
        self.max_waiting_tokens = max_waiting_tokens
        self.open_jobs = 0
        self.pending_tokens = 0  # prompt tokens of open jobs that have not produced a token yet

    @property
    def waiting(self) -> int:
        return max(0, self.open_jobs - self.slots)

    def admit(self, prompt_lens: list[int]) -> Ticket:
        """Reserve queue room for a request's jobs now (429 if there is none), so a burst of requests
        can't all pass the check before any of them starts streaming."""
        self.check(len(prompt_lens), sum(prompt_lens))
        return Ticket(self, prompt_lens)

    def check(self, num_jobs: int, prompt_tokens: int) -> None:
        waiting_after = max(0, self.open_jobs + num_jobs - self.slots)
        over_tokens = self.pending_tokens > 0 and self.pending_tokens + prompt_tokens > self.max_waiting_tokens
        if waiting_after > self.max_waiting or over_tokens:
            from app.api.errors import RateLimitError

            retry = min(60, 1 + self.waiting // max(1, self.slots))
            raise RateLimitError(
                f"The model's queue is full ({self.waiting} requests waiting, {self.pending_tokens} prompt "
                f"tokens pending); retry after {retry}s.", headers={"Retry-After": str(retry)})



class Ticket:
    """A request's reservation in its model's queue. Each job gives back its prompt tokens at its first
    token and its place when done; `release()` (also run when the ticket is dropped, e.g. a stream that
    never started because the client left) gives back whatever is still held. Idempotent."""

    def __init__(self, admission: Admission, prompt_lens: list[int]) -> None:
        self._admission = admission
        self._pending = dict(enumerate(prompt_lens))  # job position -> prompt tokens not yet released
        self._open = set(self._pending)
        admission.open_jobs += len(prompt_lens)
        admission.pending_tokens += sum(prompt_lens)

    def first_token(self, job: int) -> None:
        self._admission.pending_tokens -= self._pending.pop(job, 0)

    def done(self, job: int) -> None:
        self.first_token(job)
        if job in self._open:
            self._open.discard(job)
            self._admission.open_jobs -= 1

    def release(self) -> None:
        for job in list(self._open):
            self.done(job)

    def __del__(self) -> None:
        self.release()
