"""One engine loop for every client: a background thread owns the LLMEngine and steps it.

Request handlers (asyncio) never touch the engine. They `submit()` work through a thread-safe
queue and receive per-request events through an asyncio.Queue that the engine thread feeds with
`loop.call_soon_threadsafe`. All requests share one continuous batch. `call(fn)` runs any other
engine work (e.g. the teacher-forced replay of /v1/verify) on the engine thread too.

Events put on a handle's queue, as (kind, request_id, payload) tuples:
  ("delta", {sample_index: Delta})   new tokens of some samples (streaming: every step;
                                      otherwise once, when the request finishes)
  ("done", None)                      the request is finished; nothing follows
  ("error", ApiError)                 the request failed; nothing follows
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ditto.server.protocol import ApiError

log = logging.getLogger("ditto.server")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class QueueFull(Exception):
    pass


@dataclass
class Delta:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str | None = None  # the engine's final text when a stop string ended the sample
    fingerprints: list[list[float]] = field(default_factory=list)


@dataclass
class Handle:
    request_id: str
    prompt_ids: list[int]
    params: object  # SamplingParams
    stream: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent: dict[int, int] = field(default_factory=dict)  # sample index -> tokens already sent
    finished: set[int] = field(default_factory=set)  # sample indices whose finish was sent
    done: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


class Metrics:
    """Counters, gauges and histograms, rendered in the Prometheus text format (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.gauges: dict[str, float] = {}
        self.hists: dict[str, list] = {}  # name -> [bucket counts..., sum, count]

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0.0) + value

    def set(self, name: str, value: float) -> None:
        with self.lock:
            self.gauges[name] = value

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            h = self.hists.setdefault(name, [0] * len(LATENCY_BUCKETS) + [0.0, 0])
            for i, b in enumerate(LATENCY_BUCKETS):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def render(self) -> str:
        lines = []
        with self.lock:
            seen = set()
            for (name, labels), v in sorted(self.counters.items()):
                if name not in seen:
                    lines.append(f"# TYPE {name} counter")
                    seen.add(name)
                lab = ",".join(f'{k}="{val}"' for k, val in labels)
                lines.append(f"{name}{{{lab}}} {v:g}" if lab else f"{name} {v:g}")
            for name, v in sorted(self.gauges.items()):
                lines += [f"# TYPE {name} gauge", f"{name} {v:g}"]
            for name, h in sorted(self.hists.items()):
                lines.append(f"# TYPE {name} histogram")
                for b, c in zip(LATENCY_BUCKETS, h):
                    lines.append(f'{name}_bucket{{le="{b:g}"}} {c}')
                lines += [f'{name}_bucket{{le="+Inf"}} {h[-1]}', f"{name}_sum {h[-2]:g}", f"{name}_count {h[-1]}"]
        return "\n".join(lines) + "\n"


class EngineLoop:
    """The thread that owns `llm.engine`."""

    def __init__(self, llm, max_queue: int = 1024, metrics: Metrics | None = None):
        self.llm = llm
        self.engine = llm.engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cmds: queue.Queue = queue.Queue()
        self._active: dict[str, Handle] = {}  # engine thread only
        self._lock = threading.Lock()
        self._pending_adds = 0  # submitted, not yet added to the engine
        self._engine_waiting = 0  # sequences waiting in the scheduler (published by the engine thread)
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ditto-engine", daemon=True)
        self.error: BaseException | None = None

    # ---- any thread -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(("wake",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return self._pending_adds + self._engine_waiting

    def submit(
        self,
        prompt_ids: list[int],
        params,
        stream: bool,
        prompt: str | None = None,
        events: asyncio.Queue | None = None,
    ) -> Handle:
        """Queue a request (called from the event loop); raises QueueFull when too many are waiting.

        Events arrive on `events` (a new one unless given; several handles may share one) as
        (kind, request_id, payload) tuples."""
        if not self._thread.is_alive():
            raise ApiError(503, "the engine loop is not running", type="server_error", code="engine_down")
        with self._lock:
            if self._pending_adds + self._engine_waiting >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._pending_adds += 1
        handle = Handle(f"srv-{next(self._ids)}", prompt_ids, params, stream, asyncio.get_running_loop())
        if events is not None:
            handle.queue = events
        self._cmds.put(("add", handle, prompt))
        return handle

    def abort(self, handle: Handle) -> None:
        if not handle.done:
            self._cmds.put(("abort", handle.request_id))

    def call(self, fn) -> concurrent.futures.Future:
        """Run fn(llm) on the engine thread; the future gets its result or exception."""
        if not self._thread.is_alive():
            raise ApiError(503, "the engine loop is not running", type="server_error", code="engine_down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put(("call", fn, fut))
        return fut

    # ---- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._step()
                sched = self.engine.scheduler
                self._engine_waiting = len(sched.waiting)
                m = self.metrics
                m.set("ditto_queue_depth", self.waiting)
                m.set("ditto_running_sequences", len(sched.running))
                m.set("ditto_active_requests", len(self._active))
                m.set("ditto_kv_blocks_free", self.engine.blocks.num_free)
                m.set("ditto_kv_blocks_total", self.engine.blocks.num_blocks)
        except BaseException as e:  # pragma: no cover - a bug in the loop itself
            self.error = e
            log.exception("engine loop died")
            for h in list(self._active.values()):
                self._send(h, "error", ApiError(500, f"engine loop died: {e}", type="server_error"))
            raise
        finally:
            for rid in list(self._active):
                self.engine.abort(rid)
                self.engine.requests.pop(rid, None)

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=0.05) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, h, prompt = cmd
            with self._lock:
                self._pending_adds -= 1
            try:
                self.engine.add_request(h.request_id, h.prompt_ids, h.params, prompt=prompt)
            except ValueError as e:
                self._send(h, "error", ApiError(400, str(e), code="invalid_prompt"))
                return
            self._active[h.request_id] = h
        elif kind == "abort":
            rid = cmd[1]
            if rid in self._active:
                self.engine.abort(rid)
                self.engine.requests.pop(rid, None)
                self._active.pop(rid).done = True
                self.metrics.inc("ditto_requests_aborted_total")
        elif kind == "call":
            _, fn, fut = cmd
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.llm))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            for h in list(self._active.values()):  # fn may have stepped the engine
                self._emit(h, self.engine.requests.get(h.request_id))

    def _step(self) -> None:
        t0 = time.perf_counter()
        decoded0 = self.engine.stats["decode_tokens"] + self.engine.stats["prefill_tokens"]
        try:
            touched = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
            log.exception("engine step failed")
            for rid, h in list(self._active.items()):
                self.engine.abort(rid)
                self.engine.requests.pop(rid, None)
                self._active.pop(rid)
                self._send(h, "error", ApiError(500, f"engine step failed: {e}", type="server_error"))
            return
        m = self.metrics
        m.inc("ditto_engine_steps_total")
        m.inc("ditto_engine_step_seconds_total", time.perf_counter() - t0)
        m.inc(
            "ditto_engine_tokens_total",
            self.engine.stats["decode_tokens"] + self.engine.stats["prefill_tokens"] - decoded0,
        )
        for req in touched:
            h = self._active.get(req.request_id)
            if h is not None:
                self._emit(h, req)

    def _emit(self, h: Handle, req) -> None:
        if req is None:
            return
        finished = req.finished
        if h.stream or finished:
            deltas = {}
            for seq in req.seqs:
                i = seq.sample_index
                start, n = h.sent.get(i, 0), len(seq.output_ids)
                fin = seq.finished and i not in h.finished
                if n == start and not fin:
                    continue
                h.sent[i] = n
                if fin:
                    h.finished.add(i)
                deltas[i] = Delta(
                    seq.output_ids[start:n],
                    seq.logprobs[start:n],
                    seq.top_logprobs[start:n],
                    seq.finish_reason if fin else None,
                    seq.stop_reason if fin else None,
                    seq.text if fin and isinstance(seq.stop_reason, str) else None,
                    seq.fingerprints[start:n],
                )
            if deltas:
                if h.first_token is None:
                    h.first_token = time.perf_counter()
                self._send(h, "delta", deltas)
        if finished:
            self.engine.requests.pop(h.request_id, None)
            self._active.pop(h.request_id, None)
            h.done = True
            self._send(h, "done", None)

    def _send(self, h: Handle, kind: str, payload) -> None:
        if kind in ("done", "error"):
            h.done = True
        with contextlib.suppress(RuntimeError):  # RuntimeError: the client's event loop is gone
            h.loop.call_soon_threadsafe(h.queue.put_nowait, (kind, h.request_id, payload))
