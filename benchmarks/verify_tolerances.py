"""Make ditto's default `fast`-receipt tolerances from the calibration runs of verify_tolerances.sh.

    bash benchmarks/verify_tolerances.sh          # one `ditto verify calibrate` per numerics mode
    python benchmarks/verify_tolerances.py        # -> src/ditto/verify/tolerances.json + a table

Each mode's default is HEADROOM x the calibrated threshold (itself 1.5 x the largest honest value
over 32 honest runs: batch 1 and 8, all cores and 1 thread), and never below ditto's generic Token-DiFR
default. They were measured on SmolLM2-135M-Instruct: another model's honest noise can be larger,
which is what `ditto verify calibrate` is for.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "results" / "verify-tolerances"
OUT = ROOT / "src" / "ditto" / "verify" / "tolerances.json"
HEADROOM = 2.0


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from ditto.verify.verdict import DEFAULT_TOKEN_THRESHOLD

    modes, rows = {}, []
    for path in sorted(RUNS.glob("*.json")):
        doc = json.loads(path.read_text())
        tok, lp, act = doc["token_difr"], doc["logprob_abs"], doc["activation_difr"]
        modes[doc["numerics"]] = {
            "token": max(DEFAULT_TOKEN_THRESHOLD, HEADROOM * tok["threshold"]),
            "logprob_abs": HEADROOM * lp["threshold"],
            "activation": HEADROOM * act["threshold"],
        }
        rows.append((doc["numerics"], tok["honest_max"], lp["honest_max"], act["honest_max"], modes[doc["numerics"]]))
    if not modes:
        print(f"no calibration runs in {RUNS}; run benchmarks/verify_tolerances.sh first", file=sys.stderr)
        return 1
    doc = {
        "what": "tolerances of `fast` receipts per numerics mode: honest noise on SmolLM2-135M-Instruct x "
        f"{HEADROOM:g} headroom (benchmarks/verify_tolerances.py)",
        "modes": modes,
    }
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print("| numerics | honest max Token-DiFR | honest max \\|Δ logprob\\| | honest max fingerprint dist | defaults |")
    print("|---|---|---|---|---|")
    for mode, t, lp, a, d in rows:
        defaults = " / ".join(f"{d[k]:.3g}" for k in ("token", "logprob_abs", "activation"))
        print(f"| {mode} | {t:.3g} | {lp:.3g} | {a:.3g} | {defaults} |")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
