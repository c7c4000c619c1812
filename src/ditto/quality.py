"""`ditto quality`: what each numerics mode costs in accuracy and memory, against fp32.

For one model and every requested numerics mode, a fixed text (MATH-500 solutions concatenated,
first N tokens) is teacher-forced in windows through ``LLM.score_batch`` and compared, token by
token, with the fp32 reference run on the same windows:

* perplexity of the text under the mode (and its change against fp32),
* mean (and max) KL(p_fp32 || p_mode) of the next-token distribution,
* top-1 agreement: how often the mode's argmax equals fp32's,
* weights memory (bytes of the converted model's parameters and buffers, shared tensors once),
  and KV-cache bytes per token.

All mode models stay loaded side by side (``--group`` bounds how many at a time; the reference
is then recomputed per group) and the text is walked window by window, so only one window of
logits per model is held in memory. ``--time-limit`` stops after the window during which the
budget ran out: every mode is then measured on the same (shorter) text, and the row says so.

    ditto quality --modes all --tokens 65536 --window 512 --json quality.json --markdown quality.md
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch

REFERENCE = "fp32"


# ------------------------------------------------------------------ text


def load_text(name: str = "math500", data: str | None = None) -> str:
    """The evaluation text: MATH-500 solutions (or GSM8K answers), concatenated with blank lines."""
    from ditto.eval.tasks.base import find_data_file, read_jsonl

    if name in ("math500", "math-500"):
        rows = read_jsonl(find_data_file(["math500.jsonl", "math500/test.jsonl"], data), ("solution",), "MATH-500")
        return "\n\n".join(str(r.get("solution", "")) for r in rows if r.get("solution"))
    if name in ("gsm8k", "gsm8k-train"):
        rows = read_jsonl(find_data_file(["gsm8k-train.jsonl", "gsm8k.jsonl"], data), ("question", "answer"), "GSM8K")
        return "\n\n".join(f"{r['question']}\n{r['answer']}" for r in rows)
    path = Path(name)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    raise ValueError(f"unknown text {name!r}: use math500, gsm8k or a path to a text file")


def token_windows(ids: list[int], window: int) -> list[list[int]]:
    """Consecutive windows of `window` tokens (the last may be shorter; windows under 2 tokens dropped)."""
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    out = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]


# ------------------------------------------------------------------ memory


def _module_tensors(mod: torch.nn.Module):
    """Tensors `mod` itself holds in memory: parameters, buffers and plain tensor attributes (integer
    modules). A module whose weight was released once packed (a meta tensor: InvariantLinear) counts
    the packed copy it computes from, a dataclass attribute, instead; a module that keeps both (a
    GGUF linear and its LUT copy of the same bytes) counts its own tensors once."""
    found = [*mod.parameters(recurse=False), *(b for b in mod.buffers(recurse=False) if b is not None)]
    found += [v for v in vars(mod).values() if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)]
    if any(t.is_meta for t in found):
        for v in vars(mod).values():
            if is_dataclass(v) and not isinstance(v, type):
                found.extend(t for t in vars(v).values() if isinstance(t, torch.Tensor))
    yield from (t for t in found if not t.is_meta)


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors of `model` (parameters, buffers, tensor attributes), each storage counted once."""
    seen = {_storage_key(t) for mod in model.modules() for t in _module_tensors(mod)}
    return sum(n for _, n in seen)


def decode_read_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every tensor except the embedding table's (a lookup
    reads one row; likewise rotary tables), unless the table is also used elsewhere (a tied lm_head
    reads all of it)."""
    seen = set()
    for mod in model.modules():
        kind = type(mod).__name__
        if isinstance(mod, torch.nn.Embedding) or "Embedding" in kind or "Rotary" in kind:
            continue  # lookup tables: a step reads a row of them
        tables = {id(v) for k, v in vars(mod).items() if k.strip("_") in ("cos", "sin")}
        seen.update(_storage_key(t) for t in _module_tensors(mod) if id(t) not in tables)
    return sum(n for _, n in seen)


# ------------------------------------------------------------------ comparison


@dataclass
class ModeStats:
    """Running sums for one mode over the windows seen so far."""

    tokens: int = 0
    nll: float = 0.0
    kl: float = 0.0
    kl_max: float = 0.0
    agree: int = 0
    seconds: float = 0.0

    def add(self, other: dict) -> None:
        self.tokens += other["tokens"]
        self.nll += other["nll"]
        self.kl += other["kl"]
        self.kl_max = max(self.kl_max, other["kl_max"])
        self.agree += other["agree"]


@torch.no_grad()
def compare(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Sums over the rows of one window: NLL of `targets` under `logits`, KL(ref || mode), top-1 agreement.

    Computed in float64 so that identical logits give a KL of exactly 0 and small differences are
    not drowned by rounding.
    """
    ref = torch.log_softmax(ref_logits.double(), dim=-1)
    lp = torch.log_softmax(logits.double(), dim=-1)
    rows = torch.arange(len(targets))
    nll = -lp[rows, targets]
    kl = (ref.exp() * (ref - lp)).sum(-1)
    # exp(ref) underflows to 0 where ref is -inf: 0 * (-inf - x) is nan; such terms contribute 0
    if torch.isnan(kl).any():
        p = ref.exp()
        kl = torch.where(p > 0, p * (ref - lp), torch.zeros_like(p)).sum(-1)
    agree = (ref_logits.argmax(-1) == logits.argmax(-1)).sum()
    return {
        "tokens": len(targets),
        "nll": float(nll.sum()),
        "kl": float(kl.sum()),
        "kl_max": float(kl.max()) if len(kl) else 0.0,
        "agree": int(agree),
    }


@dataclass
class QualityRow:
    mode: str
    tokens: int = 0
    perplexity: float | None = None
    ppl_change_pct: float | None = None
    kl_mean: float | None = None
    kl_max: float | None = None
    top1_agree_pct: float | None = None
    weights_bytes: int | None = None
    decode_read_bytes: int | None = None
    kv_bytes_per_token: int | None = None
    score_tok_s: float | None = None
    load_s: float | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QualityResult:
    rows: list[QualityRow]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": [r.to_dict() for r in self.rows]}


def expand_modes(spec: str | list[str] | None) -> list[str]:
    """`all` (or None) -> every registered mode; else the comma-separated names, fp32 first."""
    from ditto.numerics.base import list_modes

    if spec is None or spec == "all" or spec == ["all"]:
        modes = list_modes()
    elif isinstance(spec, str):
        modes = [m.strip() for m in spec.split(",") if m.strip()]
    else:
        modes = list(spec)
    out = []
    for m in [REFERENCE] + modes:
        if m not in out:
            out.append(m)
    return out


def run_quality(
    model: str,
    modes: list[str] | str | None = None,
    *,
    tokens: int = 65536,
    window: int = 512,
    batch: int = 2,
    text: str = "math500",
    data: str | None = None,
    group: int | None = None,
    time_limit: float | None = None,
    llm_options: dict | None = None,
    log=None,
) -> QualityResult:
    """Compare every mode in `modes` with fp32 on the first `tokens` tokens of `text`.

    `llm_options`: extra keyword arguments for ``LLM`` (threads, determinism, max_num_batched_tokens...).
    `group`: how many non-reference models are loaded at once (None: all).
    `time_limit`: seconds of scoring after which no new window is started.
    """
    from ditto.config import resolve_determinism
    from ditto.llm import LLM

    log = log or (lambda *a: None)
    modes = expand_modes(modes)
    opts = {"kv_cache_gb": 0.25, "progress": False}
    opts.update(llm_options or {})
    determinism = opts.pop("determinism", "auto")

    def make(mode: str):
        t0 = time.perf_counter()
        llm = LLM(model, numerics=mode, determinism=resolve_determinism(mode, determinism), **opts)
        return llm, time.perf_counter() - t0

    ref, ref_load = make(REFERENCE)
    ids = ref.encode(load_text(text, data), add_special_tokens=False)[:tokens]
    windows = token_windows(ids, window)
    rows: dict[str, QualityRow] = {m: QualityRow(m) for m in modes}
    stats: dict[str, ModeStats] = {m: ModeStats() for m in modes}
    rows[REFERENCE].load_s = ref_load
    others = [m for m in modes if m != REFERENCE]
    size = len(others) if not group else max(1, group)
    groups = [others[i : i + size] for i in range(0, len(others), size)] or [[]]
    started = time.perf_counter()
    limit_windows = len(windows)  # set by the first group when the time budget runs out
    truncated = False

    def describe(mode: str, llm) -> None:
        row = rows[mode]
        row.weights_bytes = model_bytes(llm.numerics.model)
        row.decode_read_bytes = decode_read_bytes(llm.numerics.model)
        row.kv_bytes_per_token = int(llm.numerics.kv_bytes_per_token(llm.loaded.config))

    describe(REFERENCE, ref)
    for gi, names in enumerate(groups):
        loaded = {}
        for m in names:
            try:
                llm, secs = make(m)
            except Exception as exc:  # a mode that cannot be built is reported, not fatal
                rows[m].note = f"skipped: {type(exc).__name__}: {exc}"[:200]
                log(f"[quality] {m}: {rows[m].note}")
                continue
            loaded[m] = llm
            rows[m].load_s = secs
            describe(m, llm)
        for wi in range(0, limit_windows, batch):
            if time_limit is not None and gi == 0 and time.perf_counter() - started > time_limit and wi > 0:
                limit_windows, truncated = wi, True
                break
            chunk = windows[wi : wi + batch]
            pairs = [(w[:1], w[1:]) for w in chunk]
            t0 = time.perf_counter()
            ref_out = ref.score_batch(pairs, keep_logits=True)
            if gi == 0:
                stats[REFERENCE].seconds += time.perf_counter() - t0
                for o in ref_out:
                    stats[REFERENCE].add(compare(o.logits, o.logits, torch.tensor(o.token_ids)))
            for m, llm in list(loaded.items()):
                t0 = time.perf_counter()
                try:
                    outs = llm.score_batch(pairs, keep_logits=True)
                except Exception as exc:
                    rows[m].note = f"failed: {type(exc).__name__}: {exc}"[:200]
                    log(f"[quality] {m}: {rows[m].note}")
                    del loaded[m]
                    continue
                stats[m].seconds += time.perf_counter() - t0
                for o, r in zip(outs, ref_out):
                    stats[m].add(compare(r.logits, o.logits, torch.tensor(o.token_ids)))
            done = sum(len(w) - 1 for w in windows[: wi + len(chunk)])
            log(f"[quality] group {gi + 1}/{len(groups)}: {done} tokens, {time.perf_counter() - started:.0f}s")
        del loaded
        gc.collect()

    ref_ppl = None
    for m in modes:
        s, row = stats[m], rows[m]
        if not s.tokens:
            continue
        row.tokens = s.tokens
        row.perplexity = math.exp(s.nll / s.tokens)
        row.kl_mean = s.kl / s.tokens
        row.kl_max = s.kl_max
        row.top1_agree_pct = 100.0 * s.agree / s.tokens
        row.score_tok_s = s.tokens / s.seconds if s.seconds else None
        if m == REFERENCE:
            ref_ppl = row.perplexity
        if truncated and not row.note:
            row.note = "time limit: fewer tokens than asked"
    for row in rows.values():
        if ref_ppl and row.perplexity is not None:
            row.ppl_change_pct = 100.0 * (row.perplexity / ref_ppl - 1.0)
    meta = {
        "model": model,
        "model_path": str(ref.loaded.path),
        "text": text,
        "tokens_requested": tokens,
        "tokens_scored": stats[REFERENCE].tokens,
        "window": window,
        "windows": limit_windows,
        "batch": batch,
        "reference": REFERENCE,
        "determinism": ref.config.determinism,  # as the reference ran it ("auto" settled for its device)
        "threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()),
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    return QualityResult([rows[m] for m in modes], meta)


# ------------------------------------------------------------------ output


def _mib(b: int | None) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


COLUMNS = [
    ("mode", lambda r: r.mode),
    ("tokens", lambda r: str(r.tokens) if r.tokens else ""),
    ("ppl", lambda r: _fmt(r.perplexity, ".4f")),
    ("Δppl %", lambda r: _fmt(r.ppl_change_pct, "+.3f")),
    ("KL mean", lambda r: _fmt(r.kl_mean, ".2e")),
    ("KL max", lambda r: _fmt(r.kl_max, ".2e")),
    ("top-1 agree %", lambda r: _fmt(r.top1_agree_pct, ".2f")),
    ("weights MiB", lambda r: _mib(r.weights_bytes)),
    ("read/step MiB", lambda r: _mib(r.decode_read_bytes)),
    ("KV B/token", lambda r: "" if r.kv_bytes_per_token is None else str(r.kv_bytes_per_token)),
    ("score tok/s", lambda r: _fmt(r.score_tok_s, ".0f")),
    ("note", lambda r: r.note),
]


def title(result: QualityResult) -> str:
    m = result.meta
    return (
        f"numerics quality vs {m['reference']}: {m['model']}, {m['text']} {m['tokens_scored']} tokens "
        f"(windows of {m['window']}), threads {m['threads']}, load {m['loadavg'][0]:.2f}"
    )


def rich_table(result: QualityResult):
    from rich.table import Table

    table = Table(title=title(result))
    for name, _ in COLUMNS:
        table.add_column(name, justify="left" if name in ("mode", "note") else "right")
    for row in result.rows:
        table.add_row(*[fn(row) for _, fn in COLUMNS])
    return table


def markdown(result: QualityResult) -> str:
    lines = [f"**{title(result)}**", "", "| " + " | ".join(n for n, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in result.rows:
        lines.append("| " + " | ".join(fn(row).replace("|", "/") for _, fn in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ CLI


def add_parser(subparsers, parents=()):
    p = subparsers.add_parser(
        "quality",
        parents=list(parents),
        help="perplexity, KL and top-1 agreement of numerics modes against fp32",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--modes", default="all", help="comma-separated numerics modes, or 'all' (default)")
    p.add_argument("--tokens", type=int, default=65536, help="tokens of text to score (default 65536)")
    p.add_argument("--window", type=int, default=512, help="tokens per teacher-forced window (default 512)")
    p.add_argument("--batch", type=int, default=2, help="windows per score_batch call (default 2)")
    p.add_argument("--text", default="math500", help="math500 (default), gsm8k or a text file")
    p.add_argument("--data", default=None, help="data folder or file (default: $DITTO_DATA, else the bundled sample)")
    p.add_argument("--group", type=int, default=None, help="mode models loaded at once (default: all)")
    p.add_argument("--time-limit", type=float, default=None, help="stop starting new windows after this many s")
    p.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON ('-': stdout)")
    p.add_argument("--markdown", default=None, help="write the table as markdown to this file")
    p.set_defaults(func=cmd_quality)
    return p


def check_args(args) -> None:
    """Every flag, the modes and the text, before any model loads (UsageError naming the flag)."""
    from ditto import cli_checks as check

    check.positive(args, "tokens", "batch", "group")
    check.check(args.window >= 2, "window", "at least 2 tokens", args.window)
    check.positive_number(args, "time_limit")
    known = check.numerics_names()
    bad = [m for m in expand_modes(args.modes) if m not in known]
    check.check(not bad, "modes", "'all' or a comma list of " + ", ".join(known), ",".join(bad))
    check.engine(args)
    check.output_file(args.json, "json", stdout_ok=True)
    check.output_file(args.markdown, "markdown")
    try:
        load_text(args.text, args.data)
    except (FileNotFoundError, ValueError) as exc:
        raise check.UsageError(f"argument {'--data' if args.data else '--text'}: {exc}") from None


def cmd_quality(args) -> int:
    import sys

    from rich.console import Console

    from ditto.bench import _fill_engine_defaults

    _fill_engine_defaults(args)
    check_args(args)
    opts = {
        "threads": args.threads,
        "determinism": args.determinism,
        "max_num_batched_tokens": max(args.max_num_batched_tokens, args.window),
        "prefill_chunk": args.prefill_chunk,
        "block_size": args.block_size,
    }
    if args.kv_dtype:
        opts["kv_dtype"] = args.kv_dtype
    result = run_quality(
        args.model,
        args.modes,
        tokens=args.tokens,
        window=args.window,
        batch=args.batch,
        text=args.text,
        data=args.data,
        group=args.group,
        time_limit=args.time_limit,
        llm_options=opts,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    out = sys.stderr if args.json == "-" else sys.stdout
    Console(file=out, width=max(160, Console(file=out).width)).print(rich_table(result))
    if args.json == "-":
        print(json.dumps(result.to_dict()))
    elif args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    return 0
