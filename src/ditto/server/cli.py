"""`ditto serve`: the OpenAI-compatible server on one model (see ditto.server.app for the API)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys


def add_parser(subparsers, parents) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        parents=parents,
        help="OpenAI-compatible HTTP server (completions, chat, receipts, verify)",
        description="Serve one model over an OpenAI-compatible API. Every generation gets a receipt "
        "(GET /v1/receipts/{id}); POST /v1/verify replays one. Binds 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 routes (or set DITTO_API_KEY, which keeps it out of ps)",
    )
    p.add_argument("--sign-key", default=None, help="Ed25519 private key (PEM) that signs every receipt")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the model's name)")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting for a slot before answering 429")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (413 above it)")
    p.add_argument("--max-receipts", type=int, default=10_000, help="receipts kept in memory for /v1/receipts")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args) -> None:
    """Every flag and the key file, before the model loads (UsageError naming the flag)."""
    from ditto import cli_checks as check

    check.check(0 <= args.port <= 65535, "port", "in [0, 65535]", args.port)
    check.check(bool(args.host.strip()), "host", "an interface name or address", args.host)
    check.positive(args, "max_queue", "max_body_bytes", "max_receipts", allow_none=False)
    name = args.served_model_name
    check.check(name is None or bool(name.strip()), "served_model_name", "a non-empty name", name)
    check.sign_key(args.sign_key)
    check.engine(args)


def cmd_serve(args) -> int:
    check_args(args)
    import uvicorn

    from ditto.cli import make_llm
    from ditto.server.app import create_app

    api_key = args.api_key or os.environ.get("DITTO_API_KEY") or None
    if not _is_loopback(args.host) and api_key is None:
        print(
            f"ditto serve: warning: binding {args.host} without --api-key; anyone who can reach it can use it",
            file=sys.stderr,
        )
    llm = make_llm(args)
    app = create_app(
        llm,
        served_name=args.served_model_name,
        api_key=api_key,
        sign_key=args.sign_key,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_receipts=args.max_receipts,
    )
    st = app.state.ditto
    print(
        f"ditto serve: {st.name} ({llm.config.numerics}, {llm.config.determinism}) on http://{args.host}:{args.port}/v1"
        f"{' (API key required)' if api_key else ''}{' (receipts signed)' if st.sign_key else ''}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
