"""`ditto` command line: generate | chat | models | bench | quality | eval | repro | verify | keygen | serve."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from ditto.config import DETERMINISM_CHOICES, KV_DTYPES, EngineConfig, resolve_determinism, resolve_numerics

EXAMPLES = """examples:
  ditto generate "What is 17 * 23?"                       bundled SmolLM2, chat template, greedy, streamed
  ditto generate --model model.gguf --temperature 0.7 --seed 3 --max-tokens 200 "..."
  ditto generate --model path/to/hf_dir --receipt out.json "..."   also write a verifiable receipt
  ditto chat                                              multi-turn REPL (ctrl-d to leave)
  ditto models                                            bundled models, where they live, digests
  ditto bench --prompts 64 --output-len 256               throughput / latency table
  ditto eval --task arith --limit 200 --out runs/arith    math evaluation with CIs and a report
  ditto verify receipt.json                               replay a receipt: exact / consistent / inconsistent
"""


def engine_parent() -> argparse.ArgumentParser:
    """Options shared by every command that runs a model; defaults come from EngineConfig."""
    d = EngineConfig()
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        "-m",
        default="smollm2-135m-instruct",
        help="bundled name (smollm2-135m-instruct, gemma3-270m), a .gguf file or an HF directory",
    )
    g.add_argument(
        "--numerics",
        default=d.numerics,
        help="fp32 | bf16 | fp16 | layercast | int8 | w8a8 | w4 | w4-g128 | w4-asym | mxint8 | integer | "
        "gguf (a GGUF file run on its own quantised blocks, as llama.cpp does; batch invariant at no cost)",
    )
    g.add_argument(
        "--determinism",
        default=d.determinism,
        choices=DETERMINISM_CHOICES,
        help="auto (default): batch_invariant on CPU, where the fixed-order kernels make it free, fast on CUDA, "
        "exact for --numerics integer; fast: no promise across batches; batch_invariant: same bits whatever the "
        "batch; exact: integer-only, same bits on any machine (implies --numerics integer)",
    )
    g.add_argument("--kv-dtype", default=None, choices=list(KV_DTYPES), help="KV-cache precision")
    g.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: all cores)")
    g.add_argument(
        "--device",
        default=d.device,
        help="cpu (default), cuda, cuda:N or auto; numerics integer (exact) gives the same bits on every device",
    )
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences per engine step")
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="token budget per step")
    g.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk, help="longest prefill piece per step")
    g.add_argument("--block-size", type=int, default=d.block_size, help="KV-cache block size (tokens)")
    g.add_argument("--kv-cache-gb", type=float, default=d.kv_cache_gb, help="KV-cache memory")
    g.add_argument("--no-prefix-caching", action="store_true", help="recompute shared prefixes")
    return p


def sampling_parent() -> argparse.ArgumentParser:
    """Sampling flags. Their defaults are read from SamplingParams, the one set of defaults for the
    Python API, the CLI and the server (README, "Defaults")."""
    from ditto.sampling_params import DEFAULTS as d

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group(
        "sampling",
        "Applied in this order: penalties, temperature, top-k, top-p, min-p. Defaults (those of SamplingParams): "
        f"temperature {d.temperature:g} = greedy, at most {d.max_tokens} new tokens, no filters, and a fresh "
        "seed per run that is printed and recorded, so a sampled output can be replayed with --seed.",
    )
    g.add_argument("--temperature", "-t", type=float, default=d.temperature, help="0 = greedy (default %(default)s)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="0 = off (default %(default)s)")
    g.add_argument("--top-p", type=float, default=d.top_p, help="1 = off (default %(default)s)")
    g.add_argument("--min-p", type=float, default=d.min_p, help="0 = off (default %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty, help="1 = off (%(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="sampling seed (default: a fresh one, printed)")
    g.add_argument("--max-tokens", "-n", type=int, default=d.max_tokens, help="new tokens at most (%(default)s)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    return p


def server_parent() -> argparse.ArgumentParser:
    """The `openai` backend's server flags (eval and repro)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("openai backend (any OpenAI-compatible server)")
    g.add_argument("--base-url", default=None, help="the server, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--api-key", default=None, help="bearer key (default: $OPENAI_API_KEY)")
    g.add_argument("--served-model", default=None, help="model id to request (default: the server's first)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request before a retry")
    return p


def backend_parent() -> argparse.ArgumentParser:
    """--backend (eval, eval --strategy) with the `openai` backend's flags."""
    p = argparse.ArgumentParser(add_help=False, parents=[server_parent()])
    g = p.add_argument_group("backend")
    g.add_argument(
        "--backend",
        default="ditto",
        choices=["ditto", "transformers", "llama_cpp", "openai"],
        help="engine that runs the model (peers for comparison); openai: any OpenAI-compatible server "
        "(vLLM, llama.cpp, `ditto serve`) at --base-url, with --model naming its tokenizer",
    )
    g.add_argument("--max-concurrency", type=int, default=8, help="openai backend: requests in flight")
    return p


def make_llm(args, progress: bool = True):
    from ditto import LLM

    numerics = resolve_numerics(args.numerics, args.determinism)  # --determinism exact: numerics integer
    return LLM(
        args.model,
        numerics=numerics,
        determinism=resolve_determinism(numerics, args.determinism),  # --numerics integer: determinism exact
        progress=progress,
        kv_dtype=args.kv_dtype,
        threads=args.threads,
        device=getattr(args, "device", "cpu"),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_chunk=args.prefill_chunk,
        block_size=args.block_size,
        kv_cache_gb=args.kv_cache_gb,
        enable_prefix_caching=not args.no_prefix_caching,
    )


def make_backend(args):
    """Backend for eval/repro/strategies: ditto itself or a peer engine."""
    backend = getattr(args, "backend", "ditto")
    if backend == "ditto":
        return make_llm(args)
    if backend == "transformers":
        from ditto.backends.transformers import TransformersBackend
        from ditto.loader.registry import resolve_model

        numerics = getattr(args, "numerics", "fp32")
        if numerics not in ("fp32", "bf16", "fp16"):
            raise SystemExit(f"--backend transformers runs fp32, bf16 or fp16 weights, not --numerics {numerics}")
        return TransformersBackend(str(resolve_model(args.model)), dtype=numerics)
    if backend == "llama_cpp":
        from ditto.backends.llama_cpp import LlamaCppBackend
        from ditto.loader.registry import resolve_model

        return LlamaCppBackend(str(resolve_model(args.model)), threads=args.threads)
    if backend == "openai":
        from ditto.backends.openai import OpenAIBackend

        return OpenAIBackend(
            args.base_url,
            tokenizer=args.model,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None,
            served_model=args.served_model,
            max_concurrency=args.max_concurrency,
            timeout_s=args.request_timeout,
        )
    raise SystemExit(f"unknown backend {backend!r}")


def sampling_from(args, **overrides):
    """SamplingParams from the sampling flags; UsageError naming the flag when one is out of range."""
    from ditto.cli_checks import sampling_params

    return sampling_params(args, **overrides)


def cmd_generate(args) -> int:
    from ditto import cli_checks as check

    params = sampling_from(args, fingerprint_k=args.fingerprint_k).with_seed()  # the seed is known, so printed
    check.engine(args)
    check.output_file(args.receipt, "receipt")
    check.sign_key(args.sign_key)
    if args.sign_key and not args.receipt:
        raise check.UsageError("argument --sign-key: signs a receipt; give --receipt FILE too")
    prompt = check.prompt_text(args.prompt)
    llm = make_llm(args)
    use_chat = not args.raw and llm.tokenizer.chat_template is not None
    text = llm.chat_prompt([{"role": "user", "content": prompt}]) if use_chat else prompt
    ids = llm.encode(text, add_special_tokens=not use_chat)
    if args.receipt or args.json:
        out = llm.generate([ids], params)[0]
        comp = out.outputs[0]
        record = {
            "text": comp.text,
            "token_ids": comp.token_ids,
            "finish_reason": comp.finish_reason,
            "prompt_token_ids": list(ids),
            "chat_template": use_chat,
            "model": args.model,
            "metrics": out.metrics,
        }
        if args.receipt:
            from ditto.verify.build import receipt_for

            receipt = receipt_for(llm, out, comp, params, sign_key=args.sign_key)
            receipt.save(args.receipt)
            record["receipt"] = {"path": args.receipt, "content_hash": receipt.content_hash}
            print(f"receipt written to {args.receipt} ({receipt.content_hash})", file=sys.stderr)
        print(json.dumps(record, default=str) if args.json else comp.text)  # --json: one document, nothing else
        return 0
    t0, n = time.perf_counter(), 0
    for _, text_delta, new in llm.stream(ids, params):
        n += len(new)
        sys.stdout.write(text_delta)
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    how = "greedy" if params.greedy else f"T={params.temperature:g}, seed={params.seed}"
    print(
        f"\n[{n} tokens, {n / dt:.1f} tok/s, {how}, numerics={llm.config.numerics}, "
        f"determinism={llm.config.determinism}]",
        file=sys.stderr,
    )
    return 0


def cmd_chat(args) -> int:
    from ditto import cli_checks as check

    params = sampling_from(args).with_seed()
    check.engine(args)
    llm = make_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    how = "greedy" if params.greedy else f"T={params.temperature:g}, seed {params.seed}"
    print(f"ditto chat ({how}) — empty line or ctrl-d to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        ids = llm.encode(llm.chat_prompt(messages), add_special_tokens=False)
        reply = []
        for _, delta, _ in llm.stream(ids, params):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ditto",
        description="Reproducible, verifiable LLM inference for reasoning workloads.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    eng, samp = engine_parent(), sampling_parent()

    g = sub.add_parser("generate", parents=[eng, samp], help="generate text for one prompt (streams)")
    g.add_argument("prompt", nargs="*", help="the prompt (read from stdin when absent)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--receipt", help="write a verifiable JSON receipt to this file")
    g.add_argument("--sign-key", help="Ed25519 private key (PEM) to sign the receipt (see `ditto keygen`)")
    g.add_argument(
        "--fingerprint-k",
        type=int,
        default=0,
        choices=[0, 8, 16, 32],
        help="record Activation-DiFR fingerprints of this width in the receipt",
    )
    g.add_argument("--json", action="store_true", help="print a JSON record instead of streaming")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", parents=[eng, samp], help="interactive multi-turn chat (streams)")
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=cmd_chat)

    backend = backend_parent()
    plugins = {
        "ditto.models_cmd": [],
        "ditto.bench": [eng],
        "ditto.quality": [eng],
        "ditto.eval.cli": [eng, backend],
        "ditto.repro.cli": [eng, server_parent()],
        "ditto.verify.cli": [eng],
        "ditto.server.cli": [eng],
    }
    from_command_line = argv is None  # the `ditto` script, not a caller that goes on after main() returns
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["generate"], ["chat"]):  # built-in commands: no other command's module on their start-up path
        plugins = {}
    for module, parents in plugins.items():
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ImportError as exc:
            if exc.name != module:
                raise
            continue
        mod.add_parser(sub, parents=parents)

    args = parser.parse_args(argv)
    import rich

    from ditto.cli_checks import UsageError

    rich.reconfigure(stderr=True)  # progress bars and load messages: stderr; stdout carries only results
    try:
        if args.command == "eval":
            from ditto.eval.cli import run as run_eval

            return run_eval(args, make_backend)
        rc = args.func(args)
        if from_command_line and args.command in ("generate", "chat"):
            _leave_now(rc)
        return rc
    except KeyboardInterrupt:
        return 130
    except UsageError as exc:
        print(f"ditto {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"ditto: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # a server behind --backend openai failed (run folders resume)
        hint = "; finished problems are kept: run the same command again to resume" if args.command == "eval" else ""
        print(f"ditto {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 1


def _leave_now(rc: int) -> None:
    """The answer is out and nothing is left to write: leave without tearing the interpreter down (freeing
    the model's and tokenizer's objects one by one costs ~0.6 s after the answer)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
