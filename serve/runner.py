"""``trace-ray serve`` as a long-running process: deploy, pick up new adapters and policies, stop
gracefully.

- **Reload.** Every ``reload_s`` seconds the policy and adapter sources are read again
  (``serve.app.resolve_state``: a folder's new files included). When the result differs, the app
  is redeployed with the same init arguments and a new ``user_config``: Serve reconfigures the
  running replicas in place (``serve/app.py``), requests in flight finish. A source that became
  invalid (bad YAML, a half-written adapter) is reported and the app keeps what it serves.
- **Shutdown.** SIGTERM or SIGINT: the Gateway stops taking requests (503 + ``Retry-After``;
  ``/healthz`` too), requests in flight get up to ``grace_s`` seconds to finish, then Serve and the
  local Ray are shut down and the process exits 0. A second signal skips the rest of the wait.
"""

from __future__ import annotations

import signal
import threading
import time

APP_NAME = "trace-ray"


class _Interrupted(BaseException):
    """A stop signal while the app was still being deployed."""


def _log(msg: str) -> None:
    print(f"trace-ray serve: {msg}", flush=True)


def _changes(old, new) -> str:
    parts = []
    for kind, a, b in (("adapter", old.adapters, new.adapters),
                       ("policy", {n: p.fingerprint for n, p in old.policies.items()},
                        {n: p.fingerprint for n, p in new.policies.items()})):
        parts += [f"+{kind} {n}" for n in b if n not in a] + [f"-{kind} {n}" for n in a if n not in b]
        parts += [f"~{kind} {n}" for n in b if n in a and a[n] != b[n]]
    return ", ".join(parts) or "adapter files or run configs changed"


def serve_forever(settings, *, host: str, port: int, address: str | None = None, reload_s: float = 5.0,
                  grace_s: float = 20.0, block: bool = True) -> int:
    from ray import serve

    from serve.app import build_from_settings, resolve_state
    from serve.state import config_key
    from trace_ray.ray_utils import ensure_ray

    state = resolve_state(settings)  # validates model, adapters and policies before Ray starts
    app = build_from_settings(settings, state=state)
    ensure_ray(address)
    stop = threading.Event()
    received: list[int] = []
    starting = [block]

    def on_signal(signum, frame):  # runs in the main thread, between its waits
        received.append(signum)
        stop.set()
        if starting[0]:  # still deploying: abandon it
            raise _Interrupted()

    if block:  # replaces Ray's handlers (SIGTERM: a stack dump and an abort)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        starting[0] = False
    except _Interrupted:
        return shutdown(grace_s, signal.Signals(received[0]).name, received)
    _log(f"ready at http://{host}:{port} (GET /v1/models, /v1/policies, POST /v1/chat/completions, "
         f"/v1/completions, /v1/triage; GET /healthz)")
    if not block:
        return 0
    key = config_key(state.user_configs())
    while not stop.wait(reload_s if reload_s > 0 else None):
        try:
            new = resolve_state(settings)
            new_key = config_key(new.user_configs())
            if new_key != key:
                serve.run(build_from_settings(settings, state=new), name=APP_NAME, route_prefix="/")
                _log(f"reloaded: {_changes(state, new)}")
                state, key = new, new_key
        except Exception as e:  # keep serving what was loaded
            _log(f"reload skipped, still serving the previous set: {type(e).__name__}: {e}")
    return shutdown(grace_s, signal.Signals(received[0]).name, received)


def shutdown(grace_s: float, why: str, received: list | None = None) -> int:
    """Drain the Gateway (at most ``grace_s`` s), then stop Serve and the local Ray."""
    import ray
    from ray import serve

    received = received if received is not None else []
    first = len(received)
    try:
        gateway = serve.get_deployment_handle("Gateway", app_name=APP_NAME)
        n = gateway.drain.remote().result(timeout_s=10)
        _log(f"{why} received: not taking new requests; {n} in flight, waiting up to {grace_s:g} s "
             "(a second signal stops now)")
        deadline = time.monotonic() + grace_s
        while n and time.monotonic() < deadline and len(received) == first:
            time.sleep(0.1)
            n = gateway.inflight.remote().result(timeout_s=10)
        if n:
            _log(f"stopping with {n} request(s) still in flight")
    except Exception as e:  # the app is already gone or broken: nothing to drain
        _log(f"{why} received; could not drain ({type(e).__name__}: {e})")
    serve.shutdown()
    ray.shutdown()
    _log("stopped")
    return 0
