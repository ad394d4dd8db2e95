"""Graceful shutdown at the front door: requests in flight are counted, and once the replica is
draining every new request (``/healthz`` included, so load balancers stop sending) gets a 503
with ``Retry-After`` while those in flight run to their end.

A pure ASGI middleware, so a streamed answer counts until its last byte is sent. The counters
live on the serving app's ``state`` (``Gateway.drain`` / ``Gateway.inflight`` read the same object;
a module global would not do: Serve ships the middleware class to the replica by value).
``serve/runner.py`` calls ``Gateway.drain`` and polls ``Gateway.inflight`` on SIGTERM / SIGINT.

A client that leaves mid-answer makes Serve cancel the request: the ``TaskCancelledError`` that
comes up from the generator is ended here (logged at INFO, the answer closed), not left to
Starlette's last-resort handler, which logs a traceback for every exception it sees and re-raises.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("ray.serve")

_BODY = json.dumps({"error": {"message": "the server is shutting down; retry shortly (another replica may answer)",
                              "type": "service_unavailable", "param": None, "code": 503}}).encode()
_LEFT = json.dumps({"error": {"message": "client closed the request", "type": "client_closed", "param": None,
                              "code": 499}}).encode()


class Drain:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = scope["app"].state
        if getattr(st, "draining", False):
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"connection", b"close"), (b"content-length", str(len(_BODY)).encode())]})
            await send({"type": "http.response.body", "body": _BODY})
            return
        st.inflight = getattr(st, "inflight", 0) + 1
        started = False

        async def send_(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except Exception as exc:
            if not client_left(exc):
                raise
            log.info("client left during %s", scope.get("path"))
            if not started:
                await send({"type": "http.response.start", "status": 499,
                            "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": _LEFT if not started else b""})
        finally:
            st.inflight -= 1


def client_left(exc: BaseException) -> bool:
    """The client disconnected mid-answer and Serve cancelled the request: nothing is wrong here."""
    from ray.exceptions import TaskCancelledError

    if isinstance(exc, BaseExceptionGroup):
        return all(client_left(e) for e in exc.exceptions)
    return isinstance(exc, TaskCancelledError)
