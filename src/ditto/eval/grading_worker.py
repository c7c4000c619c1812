"""The grading worker process: ``python -u -P grading_worker.py --worker``, started by GraderPool.

``import ditto`` imports torch, so the worker first registers ``ditto`` and ``ditto.eval`` as bare
packages (their folders, without running their ``__init__``): the grading modules import only the
standard library (and math_verify), so a worker starts fast, and nothing re-imports the caller's
__main__, unlike multiprocessing's spawn/forkserver.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types


def _bare_packages() -> None:
    """Make ditto.eval.* importable without running ditto/__init__.py (which imports torch)."""
    eval_dir = os.path.dirname(os.path.abspath(__file__))
    for name, path in (("ditto", os.path.dirname(eval_dir)), ("ditto.eval", eval_dir)):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg


def _stdio_worker() -> None:  # pragma: no cover - runs in the worker process
    """Worker loop: one JSON job per stdin line -> one JSON result per stdout line."""
    from ditto.eval.grading import grade_response

    with contextlib.suppress(ImportError):  # warm the import before the first deadline starts
        import math_verify  # noqa: F401
    out = sys.stdout
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        job_id, gold, response, marker = json.loads(line)
        try:
            payload = grade_response(gold, response, marker).to_dict()
        except Exception as e:  # noqa: BLE001
            payload = {"__error__": f"{type(e).__name__}: {e}"}
        out.write(json.dumps([job_id, payload]) + "\n")
        out.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _bare_packages()
    _stdio_worker()
