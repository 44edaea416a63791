"""Running the app on uvicorn: in the foreground (``minirerank serve``) or in a background thread (tests,
benchmarks, notebooks). Shutdown is graceful: the listening socket closes, requests in flight finish (up to the
request time limit plus a margin), then the process exits with status 0."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

GRACE_MARGIN_S = 5.0  # on top of the request time limit: the longest a request in flight can still need


class Server(uvicorn.Server):
    """uvicorn's server that marks the service as draining when shutdown begins (/ready answers 503, new model
    requests are refused) and knows the port it bound (``port=0`` picks a free one)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[str], None] | None = None) -> None:
        super().__init__(config)
        self.url: str | None = None
        self._on_started = on_started

    @property
    def service(self) -> Any:
        return getattr(getattr(self.config.app, "state", None), "service", None)

    def drain(self) -> None:
        if self.service is not None:
            self.service.draining = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the signal once it has shut down (SIGTERM then kills the process with -15); a
            # graceful stop is a normal exit for a service manager
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
            if self._on_started is not None:
                self._on_started(self.url)


def make_config(app: Any, host: str = "127.0.0.1", port: int = 8080, *, log_level: str = "info",
                quiet_logs: bool = False) -> uvicorn.Config:
    service = getattr(app.state, "service", None)
    limit = service.limits.request_timeout_s if service is not None else 60.0
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=limit + GRACE_MARGIN_S,
        # in a host process (tests, notebooks) leave its logging configuration alone
        **({"log_config": None, "access_log": False} if quiet_logs else {}),
    )


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8080, *, log_level: str = "info") -> None:
    """Serve ``app`` until SIGINT / SIGTERM, then finish the requests in flight and return."""

    def started(url: str) -> None:
        print(f"minirerank: serving on {url}", file=sys.stderr, flush=True)

    Server(make_config(app, host, port, log_level=log_level), on_started=started).run()


class BackgroundServer:
    """The app on a uvicorn server in a daemon thread, on a free localhost port by default.

        with BackgroundServer(create_app(pipeline)) as server:
            httpx.post(server.url + "/v1/rerank", json=...)
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, start_timeout_s: float = 60.0) -> None:
        self.server = Server(make_config(app, host, port, log_level="warning", quiet_logs=True))
        self.start_timeout_s = start_timeout_s
        self._thread = threading.Thread(target=self._run, name="minirerank-server", daemon=True)
        self._error: BaseException | None = None
        self._started = threading.Event()

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
        finally:
            self._started.set()

    @property
    def url(self) -> str:
        if self.server.url is None:
            raise RuntimeError("the server is not started")
        return self.server.url

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = self.start_timeout_s
        while not self.server.started and self._thread.is_alive() and deadline > 0:
            self._started.wait(0.05)
            deadline -= 0.05
        if not self.server.started:
            self.server.should_exit = True
            raise RuntimeError(f"the server did not start: {self._error!r}")
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Graceful: stop accepting, let requests in flight finish, shut down (what SIGTERM does)."""
        self.server.drain()
        self.server.should_exit = True
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["GRACE_MARGIN_S", "BackgroundServer", "Server", "make_config", "run_server"]
