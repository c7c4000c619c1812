"""`ditto verify --ray`: the replays of many receipts over a Ray cluster.

The receipts that pass the model-free checks here are cut, per verifying model (model, numerics,
determinism, KV dtype), into units of UNIT receipts; a worker keeps the model of its last unit (one
engine per worker) and replays each receipt on the thread count the receipt records, exactly as
`ditto verify` does in one process, so each verdict is the one a single process gives. Verdicts are
printed as units finish; a unit whose worker died is replayed again on a fresh worker.
"""

from __future__ import annotations

import argparse
import gc
from functools import partial

from ditto.ray_pool import WorkerPool, ray_address, worker_args

UNIT = 8  # receipts per unit: one teacher-forced chunk of verify_receipts


class Verifier:
    """A worker's engine: the verifying model of the unit at hand (reloaded when the unit needs another)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.key, self.llm = args, None, None

    def verify(self, key: tuple, receipts: list, thresholds, public_key: str | None) -> list | str:
        """Verdicts of `receipts` on the model named by `key`, or why that model cannot load."""
        from ditto.cli import make_llm
        from ditto.verify.replay import verify_receipts

        if key != self.key:
            self.llm, self.key = None, None
            gc.collect()
            ns = argparse.Namespace(**vars(self.args))
            ns.model, ns.numerics, ns.determinism, ns.kv_dtype = key
            try:
                self.llm = make_llm(ns, progress=False)
            except (ValueError, OSError, RuntimeError) as e:
                return f"cannot load the verifying model {key[0]!r}: {e}"
            self.key = key
        return verify_receipts(self.llm, receipts, thresholds, public_key)


def _unit(thresholds, public_key: str | None, verifier: Verifier, payload: tuple):
    key, receipts = payload
    return verifier.verify(key, receipts, thresholds, public_key)


def verify_over_ray(args: argparse.Namespace, pending: dict[tuple, list], thresholds, report) -> None:
    """Replay `pending` ({model key: [(label, receipt)]}) over Ray, adding each verdict to `report`."""
    public_key = None
    if args.pubkey:  # its hex travels, not its file (the workers may run elsewhere)
        from ditto.verify.receipt import public_key_hex

        public_key = public_key_hex(args.pubkey)
    units, labels = [], {}
    for g, (key, items) in enumerate(pending.items()):
        for c in range(0, len(items), UNIT):
            name = f"g{g:03d}-u{c // UNIT:05d}"
            units.append((name, (key, [r for _, r in items[c : c + UNIT]])))
            labels[name] = [label for label, _ in items[c : c + UNIT]]
    if not units:
        return
    factory = partial(Verifier, worker_args(args))
    with WorkerPool(factory, address=ray_address(args), workers=args.ray_workers, max_workers=len(units)) as pool:
        for name, answer in pool.map(partial(_unit, thresholds, public_key), units):
            if isinstance(answer, str):  # the model did not load
                for label in labels[name]:
                    report.add(label, error=answer)
            else:
                for label, verdict in zip(labels[name], answer):
                    report.add(label, verdict)
