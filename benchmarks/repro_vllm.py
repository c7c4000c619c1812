"""`ditto repro` with vLLM's CPU build beside ditto: the cross-engine reproducibility table.

    .venv/bin/python benchmarks/repro_vllm.py [--out benchmarks/results/repro_vllm] [--limit 32] [--max-tokens 128]

One workload (GSM8K chat prompts from ../shared/data or $DITTO_DATA, greedy) through:
  vLLM fp32 and bf16 servers (benchmarks/peer_servers.py; batch 1 and 32 = requests in flight), talked
  to through ditto's openai backend (`--server vllm-fp32=URL`, configs openai:vllm-fp32:-:B);
  ditto fp32 / bf16 / gguf under fast and batch_invariant, batch 1 and 32, in process.
The vLLM servers run one at a time (their idle workers spin on the cores) and each is started only when
one of its configs is missing, so the study resumes: finished configs are reused, nothing is redone.
The last call renders the report over every config (reference: ditto fp32 batch_invariant, batch 32).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from peer_servers import vllm_server  # noqa: E402

DITTO = [
    "ditto:fp32:batch_invariant:1",
    "ditto:fp32:batch_invariant:32",
    "ditto:fp32:fast:32",
    "ditto:bf16:fast:32",
    "ditto:bf16:batch_invariant:32",
    "ditto:gguf:batch_invariant:32",
]
REFERENCE = "ditto-fp32-batch_invariant-b32-t{threads}"


def repro(args, configs: list[str], servers: dict[str, str]) -> int:
    from ditto.cli import main

    argv = ["repro", "--model", args.model, "--task", "gsm8k", "--limit", str(args.limit), "--temperature", "0"]
    argv += ["--max-tokens", str(args.max_tokens), "--threads", str(args.threads), "--no-matrix", "--out", args.out]
    argv += ["--configs", ",".join(configs), "--reference", REFERENCE.format(threads=args.threads)]
    for label, url in servers.items():
        argv += ["--server", f"{label}={url}"]
    return main(argv)


def done(out: str, name: str) -> bool:
    import json

    manifest = Path(out) / "configs" / name / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("complete", False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "repro_vllm"))
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,32", help="vLLM requests in flight")
    ap.add_argument("--skip-vllm", action="store_true", help="ditto configs only")
    args = ap.parse_args()
    os.environ.setdefault("DITTO_DATA", str(ROOT.parent / "shared" / "data"))
    from export_hf import export

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    vllm_configs = []
    for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        label = f"vllm-{short}"
        mine = [f"openai:{label}:-:{b}" for b in sizes]
        vllm_configs += mine
        if args.skip_vllm or all(done(args.out, f"openai-{label}-server-b{b}-t{args.threads}") for b in sizes):
            continue
        with vllm_server(export(args.model), dtype, args.threads, max_num_seqs=max(sizes)) as srv:
            rc = repro(args, mine, {label: srv.url + "/v1"})
            if rc:
                return rc
    rc = repro(args, DITTO, {})
    if rc:
        return rc
    # the report over everything (the vLLM configs are complete, so their servers are not contacted)
    placeholders = {f"vllm-{s}": "http://127.0.0.1:9/v1" for s in ("fp32", "bf16")}
    return repro(args, vllm_configs * (not args.skip_vllm) + DITTO, placeholders)


if __name__ == "__main__":
    raise SystemExit(main())
