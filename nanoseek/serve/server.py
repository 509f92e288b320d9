"""Running the app: `nanoseek serve` in the foreground, or a server in a thread (tests, bench)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import uvicorn

from nanoseek.checkpoint import CheckpointError, load_model
from nanoseek.infer.engine import Engine
from nanoseek.serve.app import Limits, create_app


def build(ckpt: str, api_key: str | None = None, max_seqs: int = 32, context: int | None = None,
          mtp: bool = False, model_name: str | None = None, device: str = "cpu", limits: Limits | None = None,
          compile: bool = False):
    model, tok, folder = load_model(ckpt, device)
    if tok is None:
        raise CheckpointError(f"{folder} has no nanoseek tokenizer (tokenizer.json with the chat tokens)")
    engine = Engine(model, tok, max_seqs=max_seqs, context=context, speculative=mtp, compile=compile)
    engine.warm()  # compiled steps built or loaded before the first request, not during it
    return create_app(engine, model_name or "nanoseek", api_key, limits), folder


def serve_forever(app, host: str, port: int, folder) -> int:
    url = f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}/"
    print(f"nanoseek: serving {folder} at {url}  (OpenAI API at {url}v1, Ctrl-C to stop)", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    print("nanoseek: stopped", file=sys.stderr)
    return 0


class ThreadedServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def api_key_from_env(given: str | None) -> str | None:
    return given or os.environ.get("NANOSEEK_API_KEY") or None
