"""Grading: extract a final answer from a model's text and decide whether it equals the gold answer.

Two checkers look at every answer:

* Math-Verify (huggingface ``math_verify``), the reference checker: ``verify(parse(gold), parse(pred))``,
  gold first (it is asymmetric). Its own ``signal.alarm`` timeouts are switched off; ditto enforces
  the deadline from outside instead.
* a normalised numeric/string fallback (Qwen2.5-Math style): numbers compared with relative
  tolerance 1e-4 (fractions, decimals, percentages, thousands separators, units stripped),
  tuples/intervals element-wise, sets order-free, anything else as a normalised string.

The verdict is Math-Verify's whenever it could parse both sides, else the fallback's. When the two
disagree the record says so (``disagreement``) and the runner logs it.

Every grading call runs in a worker process of a :class:`GraderPool` with a wall-clock deadline:
a hung call (sympy can spin for ever on e.g. ``9^{9^{9^{9}}}``) gets its worker killed and
replaced, and the answer is recorded with ``status="timeout"`` (counted as wrong). Nothing hangs.

Extraction order (first that matches): "final answer is $...$", the last ``\\boxed{}``/``\\fbox{}``,
"the answer is ...", GSM8K ``#### ...``, the last number in the text.

Modules: ditto.eval.answer_extraction (extract_answer), ditto.eval.answer_equivalence (normalisation,
the fallback and Math-Verify checkers, answer_key), ditto.eval.grading_worker (the worker process);
this one holds one grading call, the GraderPool and grader_info, and re-exports the public names.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from ditto.eval.answer_equivalence import (
    FALLBACK_RTOL,
    answer_key,
    fallback_equal,
    math_verify_equal,
    normalize_answer,
    parse_number,
)
from ditto.eval.answer_extraction import extract_answer

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "FALLBACK_RTOL",
    "GRADER_VERSION",
    "Grade",
    "GraderPool",
    "answer_key",
    "extract_answer",
    "fallback_equal",
    "grade_answer",
    "grade_response",
    "grader_info",
    "math_verify_equal",
    "normalize_answer",
    "parse_number",
]

GRADER_VERSION = "ditto-grader-1"
DEFAULT_TIMEOUT_S = 10.0

# ----------------------------------------------------------------------------------------------
# one grading call
# ----------------------------------------------------------------------------------------------


@dataclass
class Grade:
    correct: bool
    status: str  # "ok" | "no_answer" | "timeout" | "error"
    extracted: str | None
    method: str
    math_verify: bool | None
    fallback: bool | None
    disagreement: bool
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


_TEST_HANG_ENV = "DITTO_GRADER_TEST_HANG"  # test hook: a response containing this marker sleeps for ever


def grade_response(gold: str, response: str, hang_marker: str | None = None) -> Grade:
    """Extract and judge one response (runs inside a worker; may be slow on pathological input).

    `hang_marker` is a test hook: a response containing it, or a gold answer equal to it, sleeps for
    an hour (GraderPool.grade passes $DITTO_GRADER_TEST_HANG here).
    """
    t0 = time.perf_counter()
    if hang_marker and (hang_marker in (response or "") or hang_marker == gold.strip()):
        time.sleep(3600)
    extracted, method = extract_answer(response)
    if extracted is None:
        return Grade(False, "no_answer", None, method, None, None, False, time.perf_counter() - t0)
    return grade_answer(gold, extracted, method, t0)


def grade_answer(gold: str, extracted: str, method: str = "given", t0: float | None = None) -> Grade:
    t0 = time.perf_counter() if t0 is None else t0
    mv = math_verify_equal(gold, extracted)
    fb = fallback_equal(gold, extracted)
    verdict = mv if mv is not None else fb
    return Grade(
        correct=bool(verdict),
        status="ok",
        extracted=extracted,
        method=method,
        math_verify=mv,
        fallback=fb,
        disagreement=mv is not None and mv != fb,
        seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------------------------
# worker pool with deadlines
# ----------------------------------------------------------------------------------------------

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grading_worker.py")


class _Worker:
    """A grading worker: a plain `python grading_worker.py --worker` subprocess (the grading modules
    import only the standard library at top level, so it starts without importing ditto/torch; nothing
    re-imports the caller's __main__, unlike multiprocessing's spawn/forkserver)."""

    def __init__(self):
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-P", _WORKER_SCRIPT, "--worker"],  # -P: no script dir on sys.path
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self.ready = False
        self.job = None  # (job_id, deadline)

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, obj) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self):
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("grading worker exited")
        return json.loads(line)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


def _wait_readable(workers: list[_Worker], timeout: float) -> list[_Worker]:
    with selectors.DefaultSelector() as sel:
        for w in workers:
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        return [key.data for key, _ in sel.select(timeout=max(0.0, timeout))]


class GraderPool:
    """Worker processes that grade with a per-call deadline; a worker that overruns is killed and replaced.

    Use as a context manager::

        with GraderPool(workers=2, timeout=10) as pool:
            grades = pool.grade([(gold, response), ...])   # list[Grade], same order
    """

    def __init__(self, workers: int = 2, timeout: float = DEFAULT_TIMEOUT_S, start_timeout: float = 120.0):
        self.n_workers = max(1, int(workers))
        self.timeout = float(timeout)
        self.start_timeout = start_timeout
        self._workers: list[_Worker] = []
        self.timeouts = 0
        self.restarts = 0

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure_workers(self) -> None:
        while len(self._workers) < self.n_workers:
            self._workers.append(_Worker())

    def _wait_ready(self, w: _Worker) -> bool:
        if not w.ready and _wait_readable([w], self.start_timeout):
            try:
                w.ready = w.recv() == "ready"
            except (EOFError, ValueError):
                return False
        return w.ready

    def close(self) -> None:
        for w in self._workers:
            with contextlib.suppress(OSError):
                w.proc.stdin.close()
        for w in self._workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(timeout=2)
            w.kill()
        self._workers = []

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)
        self.restarts += 1
        self._ensure_workers()

    def grade(self, jobs: list[tuple[str, str]]) -> list[Grade]:
        """Grade (gold, response) pairs; returns one Grade per pair in order."""
        results: list[Grade | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))
        pending.reverse()
        marker = os.environ.get(_TEST_HANG_ENV) or None
        self._ensure_workers()
        while pending or any(w.job for w in self._workers):
            for w in list(self._workers):
                if w.job is None and pending:
                    if not self._wait_ready(w):
                        self._replace(w)
                        continue
                    jid = pending.pop()
                    try:
                        w.send([jid, jobs[jid][0], jobs[jid][1], marker])
                    except OSError:
                        pending.append(jid)
                        self._replace(w)
                        continue
                    w.job = (jid, time.monotonic() + self.timeout)
            busy = [w for w in self._workers if w.job]
            if not busy:
                continue
            next_deadline = min(w.job[1] for w in busy)
            ready = _wait_readable(busy, next_deadline - time.monotonic())
            for w in busy:
                jid = w.job[0]
                if w in ready:
                    try:
                        got_id, payload = w.recv()
                    except (EOFError, ValueError, OSError):
                        results[jid] = Grade(False, "error", None, "none", None, None, False, 0.0, "worker died")
                        w.job = None
                        self._replace(w)
                        continue
                    w.job = None
                    if "__error__" in payload:
                        err = payload["__error__"]
                        results[got_id] = Grade(False, "error", None, "none", None, None, False, 0.0, err)
                    else:
                        results[got_id] = Grade(**payload)
                elif time.monotonic() >= w.job[1]:
                    self.timeouts += 1
                    extracted, method = extract_answer(jobs[jid][1])
                    results[jid] = Grade(
                        False,
                        "timeout",
                        extracted,
                        method,
                        None,
                        None,
                        False,
                        self.timeout,
                        f"grading exceeded {self.timeout:g}s; worker killed",
                    )
                    w.job = None
                    self._replace(w)
        return results  # type: ignore[return-value]


def grader_info(timeout: float, workers: int) -> dict:
    try:
        from importlib.metadata import version

        mv_version = version("math-verify")
    except Exception:  # noqa: BLE001
        mv_version = None
    return {
        "version": GRADER_VERSION,
        "math_verify": mv_version,
        "fallback": f"normalised numeric (rel_tol {FALLBACK_RTOL}) / string",
        "verdict": "math_verify when it parses both sides, else fallback",
        "extraction": ["final answer is $..$", "last \\boxed{}", "the answer is", "####", "last number"],
        "timeout_s": timeout,
        "workers": workers,
        "timeout_policy": "worker killed and replaced; answer counted wrong with status=timeout",
    }
