"""`ditto models`: the bundled models, where their files are, their sizes and full sha256 digests."""

from __future__ import annotations

import json
import sys


def bundled_models() -> list[dict]:
    """One record per bundled model: name, description, path, size_bytes, sha256 (full), or the error."""
    from ditto.loader.digest import file_digest
    from ditto.loader.registry import BUNDLED, resolve_model

    rows = []
    for name, info in BUNDLED.items():
        row = {"name": name, "description": info.description, "chat": info.chat}
        try:
            path = resolve_model(name)
            row.update(path=str(path), size_bytes=path.stat().st_size, sha256=file_digest(path), available=True)
        except Exception as exc:  # a missing package is reported, not fatal
            row.update(path=None, size_bytes=None, sha256=None, available=False, error=str(exc))
        rows.append(row)
    return rows


def cmd_models(args) -> int:
    rows = bundled_models()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cells = [
        [
            r["name"],
            r["description"],
            r["path"] or f"unavailable: {r['error']}",
            f"{r['size_bytes'] / 2**20:.0f} MiB" if r["size_bytes"] else "",
            r["sha256"] or "",
        ]
        for r in rows
    ]
    header = ["name", "description", "path", "size", "sha256"]
    if not sys.stdout.isatty():  # piped: plain columns, nothing cut or wrapped
        widths = [max(len(c) for c in col) for col in zip(header, *cells)]
        for line in [header, *cells]:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bundled models")
    for col in header:
        table.add_column(col, overflow="fold")  # long paths and digests wrap, never end in "…"
    for line in cells:
        table.add_row(*line)
    Console().print(table)
    return 0


def add_parser(subparsers, parents=()):
    p = subparsers.add_parser(
        "models", parents=list(parents), help="list bundled models, their files and full sha256 digests"
    )
    p.add_argument("--json", action="store_true", help="print the list as one JSON document")
    p.set_defaults(func=cmd_models)
    return p
