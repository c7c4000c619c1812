"""`ditto verify` and `ditto keygen`.

  ditto verify RECEIPT... [--threshold X | --threshold-file F] [--pubkey PEM] [--json]
  ditto verify --claims claims.jsonl [--model M] [--threshold X]
  ditto verify calibrate --out thresholds.json [--prompts N] [--max-tokens L]
  ditto keygen PATH [--force]

The verifying LLM is built from each receipt's own model (its path, or the bundled name recorded
in `extra.model_name`), numerics, determinism and KV-cache dtype, unless --model / --numerics /
--determinism / --kv-dtype are given. Exit status: 0 when every receipt/claim is exact or
consistent, 1 when any is inconsistent (or tampered), 2 on errors (unreadable receipt, model
mismatch).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

_KV_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8"}
_CAL_PROMPTS = [
    "Explain why the sky is blue.",
    "What is 17 * 23? Think step by step.",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Summarise the plot of Hamlet in two sentences.",
    "def fibonacci(n):",
    "Translate 'good morning' into French and Spanish.",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in total?",
    "Give me a short motivational quote.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Describe a cat to someone who has never seen one.",
    "How do vaccines work?",
    "Write a limerick about a programmer.",
    "What are prime numbers? Give five examples.",
    "Tell me a fun fact about octopuses.",
    "Why do we have seasons?",
]


def add_parser(subparsers, parents=()) -> None:
    v = subparsers.add_parser(
        "verify",
        help="verify receipts or claims: exact / consistent / inconsistent (also: verify calibrate)",
        description="Replay receipts (or receipt-less JSONL claims) with a trusted teacher-forced pass. "
        "`ditto verify calibrate --out F` measures honest scores and writes a threshold file.",
    )
    # the engine options, copied (argparse shares Action objects with every parser built from the same
    # parent, so changing their defaults in place would change `ditto generate` too)
    eng = v.add_argument_group("model and engine (default: what the receipt records)")
    for parent in parents:
        for action in parent._actions:
            if action.dest != "help":
                eng._add_action(copy.copy(action))
    v.add_argument("receipts", nargs="*", help="receipt JSON files, or `calibrate` to calibrate thresholds")
    t = v.add_mutually_exclusive_group()
    t.add_argument("--threshold", type=float, default=None, help="Token-DiFR threshold (mean clipped margin)")
    t.add_argument("--threshold-file", default=None, help="thresholds JSON written by `ditto verify calibrate`")
    v.add_argument("--pubkey", default=None, help="require receipts signed by this Ed25519 public key (PEM or hex)")
    v.add_argument("--claims", default=None, help="JSONL claims without receipts (prompt, output, sampling)")
    v.add_argument("--json", action="store_true", help="print one JSON object per receipt/claim")
    v.add_argument("--margins", action="store_true", help="include per-token margins in --json output")
    c = v.add_argument_group("calibrate")
    c.add_argument("--out", default="thresholds.json", help="where `calibrate` writes the thresholds")
    c.add_argument("--prompts", type=int, default=16, help="honest prompts to calibrate on")
    c.add_argument("--max-tokens", type=int, default=64, help="tokens per calibration generation")
    c.add_argument("--temperature", type=float, default=0.7, help="calibration sampling temperature")
    c.add_argument("--seed", type=int, default=0, help="first calibration seed (one per prompt)")
    c.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate")
    c.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes for honest runs")
    c.add_argument("--thread-counts", default="0,1", help="comma-separated torch thread counts (0 = default)")
    # None = "take it from the receipt": only what the user types overrides the receipt's record
    v.set_defaults(func=cmd_verify, model=None, numerics=None, determinism=None)

    k = subparsers.add_parser("keygen", help="create an Ed25519 key pair for signing receipts")
    k.add_argument("path", help="private key file (PEM, mode 0600); the public key goes to PATH.pub")
    k.add_argument("--force", action="store_true", help="overwrite existing key files")
    k.set_defaults(func=cmd_keygen)


def cmd_keygen(args) -> int:
    from ditto.verify.receipt import generate_keypair, public_key_hex

    try:
        priv, pub = generate_keypair(args.path, overwrite=args.force)
    except FileExistsError as e:
        print(f"ditto keygen: {e}", file=sys.stderr)
        return 1
    print(f"private key: {priv}\npublic key:  {pub}\npublic key (hex): {public_key_hex(pub)}")
    return 0


def _llm_args(args, model=None, numerics=None, determinism=None, kv_dtype=None) -> argparse.Namespace:
    ns = argparse.Namespace(**vars(args))
    ns.model = args.model or model or "smollm2-135m-instruct"
    ns.numerics = args.numerics or numerics or "fp32"
    ns.determinism = args.determinism or determinism or "fast"
    ns.kv_dtype = args.kv_dtype or kv_dtype
    return ns


def _receipt_model(receipt) -> str:
    if receipt.model and Path(receipt.model).exists():
        return receipt.model
    name = receipt.extra.get("model_name")
    from ditto.loader.registry import ALIASES, BUNDLED

    for candidate in (name, receipt.model):
        if candidate and (candidate in BUNDLED or candidate in ALIASES):
            return candidate
    raise FileNotFoundError(
        f"the receipt's model {receipt.model!r} is not on this machine; pass --model with the model whose "
        f"digest is {receipt.model_digest}"
    )


def _thresholds(args):
    from ditto.verify.replay import Thresholds

    if args.threshold_file:
        return Thresholds.load(args.threshold_file)
    return Thresholds.coerce(args.threshold)


def _emit(args, label: str, verdict) -> None:
    if args.json:
        print(json.dumps({"file": label, **verdict.to_dict(margins=args.margins)}))
    else:
        print(f"{label}: {verdict.summary()}")


def cmd_verify(args) -> int:
    if args.receipts[:1] == ["calibrate"] and not Path("calibrate").exists():
        return cmd_calibrate(args)
    if not args.receipts and not args.claims:
        print("ditto verify: give receipt files, --claims FILE, or `calibrate`", file=sys.stderr)
        return 2
    from ditto.cli import make_llm
    from ditto.verify.receipt import Receipt
    from ditto.verify.replay import ModelMismatchError, verify_claims, verify_receipt

    th = _thresholds(args)
    llms: dict[tuple, object] = {}

    def llm_for(ns):
        key = (ns.model, ns.numerics, ns.determinism, ns.kv_dtype)
        if key not in llms:
            llms[key] = make_llm(ns, progress=False)
        return llms[key]

    worst = 0
    for path in args.receipts:
        try:
            receipt = Receipt.load(path)
            kv = _KV_NAMES.get(str(receipt.extra.get("kv_dtype")))
            ns = _llm_args(args, _receipt_model(receipt), receipt.numerics, receipt.determinism, kv)
            if ns.determinism == "exact":
                ns.numerics = "integer"
            verdict = verify_receipt(llm_for(ns), receipt, th, public_key=args.pubkey)
        except (ModelMismatchError, ValueError, TypeError, FileNotFoundError, OSError) as e:
            kind = "model mismatch" if isinstance(e, ModelMismatchError) else "error"
            if args.json:
                print(json.dumps({"file": path, "status": "error", "reason": f"{kind}: {e}"}))
            else:
                print(f"{path}: ERROR ({kind}): {e}")
            worst = max(worst, 2)
            continue
        _emit(args, path, verdict)
        if not verdict.ok and verdict.status != "unverifiable":
            worst = max(worst, 1)
    if args.claims:
        from ditto.verify.claims import load_claims

        claims = load_claims(args.claims)
        llm = llm_for(_llm_args(args))
        for claim, verdict in zip(claims, verify_claims(llm, claims, th)):
            _emit(args, f"{args.claims}#{claim.id}", verdict)
            if verdict.status == "inconsistent":
                worst = max(worst, 1)
    return worst


def cmd_calibrate(args) -> int:
    from ditto import SamplingParams
    from ditto.cli import make_llm
    from ditto.verify.replay import calibrate

    llm = make_llm(_llm_args(args, determinism="batch_invariant"), progress=False)
    n = max(1, args.prompts)
    base = [_CAL_PROMPTS[i % len(_CAL_PROMPTS)] for i in range(n)]
    use_chat = llm.tokenizer.chat_template is not None
    prompts = [
        llm.encode(llm.chat_prompt([{"role": "user", "content": p}]), add_special_tokens=False) if use_chat else p
        for p in base
    ]
    params = [
        SamplingParams(temperature=args.temperature, seed=args.seed + i, max_tokens=args.max_tokens, fingerprint_k=8)
        for i in range(n)
    ]
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    threads = [int(x) or None for x in args.thread_counts.split(",") if x.strip()]
    doc = calibrate(llm, prompts, params, batch_sizes=batch_sizes, threads=threads, fpr=args.fpr, out=args.out)
    tok = doc["token_difr"]
    print(
        f"thresholds written to {args.out}: token_difr {tok['threshold']:.4g} "
        f"(honest max {tok['honest_max']:.4g} over {tok['n_honest']} runs)"
        + (f", activation_difr {doc['activation_difr']['threshold']:.4g}" if "activation_difr" in doc else "")
    )
    return 0
