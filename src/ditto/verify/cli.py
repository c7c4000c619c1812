"""`ditto verify` and `ditto keygen`.

  ditto verify RECEIPT... [--threshold X | --threshold-file F] [--pubkey PEM] [--json]
  ditto verify --claims claims.jsonl [--from-openai saved.jsonl] [--model M] [--numerics N] [--json]
  ditto verify calibrate --out thresholds.json [--prompts N] [--max-tokens L]
  ditto keygen PATH [--force]

Checks that need no model (reading, content hash, signature, the receipt's claims against each
other) answer first; a receipt that fails one never loads a model. The verifying LLM is built from
each receipt's own model (its path, or the bundled name recorded in `extra.model_name`), numerics,
determinism and KV-cache dtype, unless --model / --numerics / --determinism / --kv-dtype are given
(a verifier that then differs from the receipt's claim makes it `unverifiable`, never `exact`).
Exit status: 1 when any receipt or claim is inconsistent (or tampered); else 2 when any could not
be verified (unreadable, unverifiable, model missing); else 0 (every one exact or consistent).
--json prints one JSON document: {"exit_status": N, "results": [{"file", "status", ...}, ...]}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from ditto.ray_pool import add_ray_args

CLAIMS_EPILOG = """\
claims (what another engine served; no receipt):
  ditto verify --claims claims.jsonl                  # reference: smollm2-135m-instruct, fp32
  ditto verify --from-openai saved.jsonl --json       # one JSON document with a "summary"
  ditto verify --claims c.jsonl --model DIR --numerics fp32 --threshold-file th.json

  a flat claim line (ditto's claim format; see ditto.verify.claims for every field):
    {"id": "q1", "prompt": "What is 17 * 23?", "output_text": "391",
     "temperature": 0.7, "top_p": 0.95, "seed": 5, "logprobs": [-0.01, ...]}
    prompt: "prompt" (text), "prompt_token_ids" or "messages" (chat template applied);
    output: "output_token_ids" or "output_text" (re-tokenised; the report says if it round-trips)
  a saved exchange (--claims or --from-openai):
    {"request": {"model": ..., "messages": [...], "temperature": 0.7, "logprobs": true},
     "response": {"choices": [{"message": {"content": ...}, "logprobs": {"content": [...]}}]}}

  checks, each claim: T = 0 -> the claimed tokens must be the reference argmax (rank, margin);
  T > 0 with ditto's seed (a flat claim, or a response with ditto's `ditto` extension) ->
  Token-DiFR; T > 0 otherwise -> the claimed top-k/top-p/min-p and a surprise z-test of the
  temperature (another engine's seed drives another generator); claimed logprobs -> mean
  |claimed - reference| <= the logprob threshold (1e-3 nats against the fp32 reference: vLLM fp32
  measured 5e-6, its bf16 0.013-0.042; 0.05 against other references). Unreadable lines are reported by
  line number; the other lines still verify. A summary ends the report: how many consistent,
  the worst claim and its first divergence.
"""

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
        epilog=CLAIMS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    v.add_argument(
        "--claims", action="append", default=[], metavar="FILE",
        help="JSONL claims without receipts, flat or {request, response} lines (see below); repeatable",
    )  # fmt: skip
    v.add_argument(
        "--from-openai", action="append", default=[], metavar="FILE",
        help="JSONL of saved OpenAI API exchanges, one {\"request\": ..., \"response\": ...} per line; repeatable",
    )  # fmt: skip
    v.add_argument("--json", action="store_true", help="print one JSON object per receipt/claim")
    v.add_argument("--margins", action="store_true", help="include per-token margins in --json output")
    add_ray_args(
        v,
        "receipts (units of 8 receipts of one verifying model)",
        worker="keeps the verifying model of its last unit and replays each receipt on the thread count the "
        "receipt records, as one process does",
        results="verdicts are printed as units finish (--json: one document at the end)",
    )
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
    ns.determinism = args.determinism or determinism or "auto"
    ns.kv_dtype = args.kv_dtype or kv_dtype
    return ns


def _receipt_model(receipt) -> str:
    """The model a receipt names: a bundled one by name (whatever path it had there), else its file here."""
    from ditto.loader.registry import ALIASES, BUNDLED

    for candidate in (receipt.extra.get("model_name"), receipt.model):
        if candidate and (candidate in BUNDLED or candidate in ALIASES):
            return candidate
    if receipt.model and Path(receipt.model).exists():
        return receipt.model
    raise FileNotFoundError(
        f"the receipt's model {receipt.model!r} is not on this machine; pass --model with the model whose "
        f"digest is {receipt.model_digest}"
    )


def _thresholds(args):
    from ditto.verify.replay import Thresholds

    if args.threshold_file:
        return Thresholds.load(args.threshold_file)
    return Thresholds.coerce(args.threshold)


def _error(label: str, message: str) -> dict:
    return {"file": label, "status": "error", "reason": message}


class _Report:
    """Collects every answer; prints each at once for people, or one JSON document at the end (--json)."""

    def __init__(self, args) -> None:
        self.args, self.results, self.exit_status = args, [], 0
        self.summary: dict | None = None

    def add(self, label: str, verdict=None, error: str | None = None, **extra) -> None:
        doc = _error(label, error) if verdict is None else {"file": label, **verdict.to_dict(margins=self.args.margins)}
        doc.update(extra)
        self.results.append(doc)
        if not self.args.json:
            print(f"{label}: ERROR: {error}" if verdict is None else f"{label}: {verdict.summary()}", flush=True)

    def finish(self) -> int:
        statuses = {d["status"] for d in self.results}
        self.exit_status = 1 if "inconsistent" in statuses else (2 if statuses & {"error", "unverifiable"} else 0)
        if self.args.json:
            doc = {"exit_status": self.exit_status, "results": self.results}
            if self.summary is not None:
                doc["summary"] = self.summary
            print(json.dumps(doc))
        return self.exit_status


def cmd_verify(args) -> int:
    if args.receipts[:1] == ["calibrate"] and not Path("calibrate").exists():
        return cmd_calibrate(args)
    if not args.receipts and not args.claims and not args.from_openai:
        print("ditto verify: give receipt files, --claims FILE, --from-openai FILE or `calibrate`", file=sys.stderr)
        return 2
    from ditto.verify.receipt import Receipt
    from ditto.verify.replay import precheck_receipt, verify_receipts

    try:
        th = _thresholds(args)
    except (OSError, ValueError) as e:
        print(f"ditto verify: cannot read the thresholds: {e}", file=sys.stderr)
        return 2
    if args.threshold is not None and not args.threshold >= 0:
        print(f"ditto verify: --threshold must be >= 0, got {args.threshold}", file=sys.stderr)
        return 2
    from ditto.cli_checks import UsageError
    from ditto.ray_pool import check_ray_args

    try:
        check_ray_args(args)
    except UsageError as e:
        print(f"ditto verify: {e}", file=sys.stderr)
        return 2
    if args.pubkey:
        from ditto.verify.receipt import load_public_key

        try:
            load_public_key(args.pubkey)
        except (ValueError, TypeError, OSError) as e:
            print(f"ditto verify: --pubkey {args.pubkey}: not an Ed25519 public key: {e}", file=sys.stderr)
            return 2
    report = _Report(args)
    # 1. what needs no model: reading, hash, signature, the receipt's claims against each other
    pending: dict[tuple, list[tuple[str, Receipt]]] = {}
    for path in args.receipts:
        try:
            receipt = Receipt.load(path)
        except (ValueError, OSError) as e:
            report.add(path, error=str(e))
            continue
        early = precheck_receipt(receipt, args.pubkey)
        if early is not None:
            report.add(path, early)
            continue
        try:
            ns = _receipt_llm_args(args, receipt)
        except (FileNotFoundError, ValueError) as e:
            report.add(path, _unverifiable(receipt, str(e)))
            continue
        pending.setdefault((ns.model, ns.numerics, ns.determinism, ns.kv_dtype), []).append((path, receipt))
    # 2. one replay model per (model, numerics, determinism, KV dtype); --ray: units of receipts over a cluster
    if args.ray is not None:
        from ditto.verify.ray_verify import verify_over_ray

        verify_over_ray(args, pending, th, report)
        pending = {}
    for key, items in pending.items():
        try:
            llm = _load(args, key)
        except (ValueError, OSError, RuntimeError) as e:
            for path, _ in items:
                report.add(path, error=f"cannot load the verifying model {key[0]!r}: {e}")
            continue
        for (path, _), verdict in zip(items, verify_receipts(llm, [r for _, r in items], th, args.pubkey)):
            report.add(path, verdict)
    if args.claims or args.from_openai:
        _verify_claims(args, th, report)
    return report.finish()


def _receipt_llm_args(args, receipt) -> argparse.Namespace:
    """The verifying LLM's options: what the receipt records, unless the command line says otherwise."""
    from ditto.config import kv_dtype_name, resolve_numerics

    kv = receipt.extra.get("kv_dtype")
    ns = _llm_args(args, args.model or _receipt_model(receipt), receipt.numerics, receipt.determinism)
    ns.kv_dtype = args.kv_dtype or (kv_dtype_name(kv) if kv else None)
    if not args.numerics:
        ns.numerics = resolve_numerics(ns.numerics, ns.determinism)
    return ns


def _unverifiable(receipt, reason: str):
    from ditto.verify.verdict import Verdict

    return Verdict("unverifiable", reason, id=receipt.content_hash or "", method="precheck", signed=receipt.signed)


_LLMS: dict[tuple, object] = {}


def _load(args, key: tuple):
    from ditto.cli import make_llm

    if key not in _LLMS:
        model, numerics, determinism, kv_dtype = key
        ns = argparse.Namespace(**vars(args))
        ns.model, ns.numerics, ns.determinism, ns.kv_dtype = model, numerics, determinism, kv_dtype
        _LLMS.clear()  # one verifying model in memory at a time
        _LLMS[key] = make_llm(ns, progress=False)
    return _LLMS[key]


def _verify_claims(args, th, report: _Report) -> None:
    """Every claim of every --claims / --from-openai file against one reference model; a summary last."""
    from ditto.verify.claims import load_claims
    from ditto.verify.claims_summary import summarize, summary_text
    from ditto.verify.replay import verify_claims

    first = len(report.results)
    todo = []
    for path, openai in [(p, False) for p in args.claims] + [(p, True) for p in args.from_openai]:
        errors = []
        try:
            claims = load_claims(path, errors, openai=openai)
        except (OSError, UnicodeDecodeError) as e:
            report.add(path, error=f"cannot read the claims: {e}")
            continue
        for e in errors:
            line = str(e).split(":", 1)[0].removeprefix("line ")
            report.add(f"{path}:{line}", error=str(e), line=int(line) if line.isdigit() else None)
        todo += [(path, c) for c in claims]
    if todo:
        ns = _llm_args(args)
        try:
            llm = _load(args, (ns.model, ns.numerics, ns.determinism, ns.kv_dtype))
        except (ValueError, OSError, RuntimeError) as e:
            for path, c in todo:
                report.add(f"{path}#{c.id}", error=f"cannot load the reference model {ns.model!r}: {e}", line=c.line)
            todo = []
        else:
            verdicts = verify_claims(llm, [c for _, c in todo], th)
            for (path, c), verdict in zip(todo, verdicts):
                report.add(f"{path}#{c.id}", verdict, line=c.line, sampler=c.sampler)
    report.summary = summarize(report.results[first:])
    report.summary["reference"] = {"model": _llm_args(args).model, "numerics": _llm_args(args).numerics}
    if not args.json:
        print(summary_text(report.summary), flush=True)


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
