"""Run the app in a background thread on a free loopback port (tests, benchmarks, notebooks).

with LiveServer(create_app(settings)) as server:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        from flywheel.serve.app import uvicorn_options

        self.host = host
        self.port = port or free_port(host)
        ctx = getattr(getattr(app, "state", None), "ctx", None)  # a flywheel app: its settings' proxy trust
        options = uvicorn_options(ctx.settings) if ctx is not None else {}
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host=host, port=self.port, log_level="warning", access_log=False, lifespan="on", **options
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="flywheel-live-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
