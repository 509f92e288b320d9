"""The engine in its own thread: requests come in from the event loop, events go back to it.

The HTTP handlers never run the model. `submit` hands a request to the engine (thread-safe)
and returns an asyncio queue; the worker thread steps the engine whenever it has work and
puts each event on its request's queue with `call_soon_threadsafe`. A handler whose client
went away calls `abort`, and the request's rows are free at the next step.
"""

from __future__ import annotations

import asyncio
import threading

from nanoseek.infer.engine import Engine, Event, Request
from nanoseek.infer.sampling import SamplingParams


class EngineWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.wake = threading.Event()
        self.stopping = False
        self.queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[Request, asyncio.Queue]:
        """Raises EngineError / EngineBusy at once if the engine cannot take it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            req = self.engine.submit(prompt_ids, params)
            self.queues[req.id] = (loop, queue)
        self.wake.set()
        return req, queue

    def abort(self, req: Request) -> None:
        with self.lock:
            self.queues.pop(req.id, None)
        if not req.finished:
            self.engine.abort(req)
            self.wake.set()

    def _loop(self) -> None:
        while not self.stopping:
            if not self.engine.has_work():
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                events = self.engine.step()
            except BaseException as e:  # never leave a client waiting on a dead worker
                self.error = e
                self._fail_all(e)
                continue
            self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        """One wake-up of each event loop per step, however many requests it serves."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self.lock:
            for e in events:  # (a request may have several events in a step: a tool call, then its end)
                target = self.queues.get(e.request.id)
                if target is not None:
                    batches.setdefault(target[0], []).append((target[1], e))
            for e in events:
                if e.request.finished:
                    self.queues.pop(e.request.id, None)
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, error: BaseException) -> None:
        with self.lock:
            targets, self.queues = list(self.queues.values()), {}
        for loop, queue in targets:
            loop.call_soon_threadsafe(queue.put_nowait, error)
        self.engine.running.clear()
        self.engine.waiting.clear()


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, e in items:
        queue.put_nowait(e)
