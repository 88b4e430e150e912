"""The engine loop on its own thread; HTTP handlers talk to it through queues.

One thread owns the `ftjax.LLMEngine` (the engine has one driver): it takes commands
from a thread-safe queue (add, abort, or a function to run between steps), steps the
engine while any request is unfinished, and hands every output to its request's
asyncio queue with `loop.call_soon_threadsafe` (asyncio queues are not thread-safe).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Dict, List, Optional

log = logging.getLogger("ftjax.server")


@dataclasses.dataclass
class Handle:
    """One engine request as the HTTP side sees it.

    `events` (an asyncio queue, which several handles may share) receives
    (handle, "added", rid), then (handle, "output", RequestOutput) items, or one
    (handle, "error", exception). `abort()` may be called at any time (idempotent).
    """

    loop: asyncio.AbstractEventLoop
    prompt: List[int]
    sampling: object
    max_new: int
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    rid: Optional[str] = None
    runner: Optional["EngineRunner"] = None
    done: bool = False
    finished: int = 0                    # samples finished (engine thread only)
    arrival: float = dataclasses.field(default_factory=time.monotonic)

    index: int = 0                       # which prompt of the HTTP request
    times: dict = dataclasses.field(default_factory=dict)   # sample -> last token time

    def put(self, item):
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self,) + tuple(item))

    def abort(self):
        if not self.done and self.runner is not None:
            self.done = True
            self.runner.commands.put(("abort", self))


class EngineRunner:
    """Steps an `LLMEngine` on a daemon thread.

    Args:
      make_engine: builds the engine (called on the thread, so the compile in its
        `warmup()` does not hold the HTTP side); `ready` is set after it returns.
      observer: optional, with `added(handle)` and `output(handle, RequestOutput)`,
        called on the engine thread (e.g. the metrics: timings taken where the
        tokens appear, not where a client reads them).
    """

    def __init__(self, make_engine: Callable, observer=None):
        self.commands: "queue.Queue" = queue.Queue()
        self.ready = threading.Event()
        self.failed: Optional[BaseException] = None
        self.engine = None
        self.observer = observer
        self._make_engine = make_engine
        self._handles: Dict[str, Handle] = {}
        self._stats: dict = {}
        self._stop = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="ftjax-engine", daemon=True)

    def start(self) -> "EngineRunner":
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0):
        self._stop = True
        self.commands.put(("wake", None))
        self.thread.join(timeout)

    # -- called from the HTTP side ------------------------------------------------

    def submit(self, handle: Handle) -> Handle:
        handle.runner = self
        self.commands.put(("add", handle))
        return handle

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Runs fn(engine, *args) on the engine thread between steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.commands.put(("call", (fn, args, fut)))
        return fut

    def stats(self) -> dict:
        """The engine's last `stats()` (read between steps) plus commands not yet taken."""
        return dict(self._stats, submitted=self.commands.qsize())

    # -- the engine thread ----------------------------------------------------------

    def _run(self):
        try:
            self.engine = self._make_engine()
            self._stats = self.engine.stats()
        except BaseException as e:  # reported by /health and every request
            log.exception("ftjax serve: the engine failed to start")
            self.failed = e
            self.ready.set()
            return
        self.ready.set()
        while not self._stop:
            busy = self.engine.has_unfinished()
            try:
                cmd = self.commands.get(block=not busy, timeout=None if busy else 0.5)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._command(*cmd)
                try:
                    cmd = self.commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.engine.has_unfinished():
                self._step()
            self._stats = self.engine.stats()

    def _command(self, kind: str, arg):
        if kind == "add":
            h: Handle = arg
            if h.done:           # aborted before it was added
                return
            try:
                h.rid = self.engine.add_request(h.prompt, h.sampling, h.max_new)
            except ValueError as e:
                h.done = True
                h.put(("error", e))
                return
            self._handles[h.rid] = h
            if self.observer is not None:
                self.observer.added(h)
            h.put(("added", h.rid))
        elif kind == "abort":
            h = arg
            if h.rid is not None and self._handles.pop(h.rid, None) is not None:
                try:
                    self.engine.abort(h.rid)
                except KeyError:  # it finished in the step that just ran
                    pass
        elif kind == "call":
            fn, args, fut = arg
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine, *args))
                except BaseException as e:
                    fut.set_exception(e)

    def _step(self):
        try:
            outputs = self.engine.step()
        except Exception as e:  # an internal error fails the requests in flight, not the server
            log.exception("ftjax serve: engine step failed; failing requests %s",
                          sorted(self._handles))
            for rid, h in list(self._handles.items()):
                h.put(("error", RuntimeError(f"internal error in the engine (request {rid}): "
                                             f"{type(e).__name__}")))
                try:
                    self.engine.abort(rid)
                except Exception:
                    pass
            self._handles.clear()
            return
        self.steps += 1
        for o in outputs:
            h = self._handles.get(o.request_id)
            if h is None:
                continue
            if self.observer is not None:
                self.observer.output(h, o)
            h.put(("output", o))
            if o.finished:
                h.finished += 1
                if h.finished == h.sampling.n:  # every sample reported its finish
                    self._handles.pop(o.request_id)
                    h.done = True
