"""ditto vs HF transformers vs llama.cpp vs vLLM (CPU) on the same model and prompts, side by side in one run.

    .venv/bin/python benchmarks/engine_vs_peers.py --threads 1 [--prompts 64] [--new-tokens 256]
        [--single-tokens 128] [--engines ditto-fp32,ditto-bf16,hf-fp32,hf-bf16,llama.cpp,vllm-fp32,vllm-bf16]
        [--json out.json]

A ditto engine is `ditto-<numerics>[@<determinism>]`: `ditto-fp32@batch_invariant`, `ditto-gguf` (the
file's own Q4_1 blocks, batch invariant by construction), `ditto-integer@exact`; without `@` the
level is `fast`.

Model: the bundled SmolLM2-135M-Instruct Q4_1 GGUF (``--model``), loaded by ditto (dequantised to the
mode's dtype), by transformers' GGUF loader (``from_pretrained(dir, gguf_file=name)``, dequantised to
fp32 or bf16), by llama-cpp-python (runs the Q4_1 weights as they are) and by vLLM's CPU build (an HF
folder that benchmarks/export_hf.py writes from ditto's own fp32 weights, run as float32 or bfloat16;
vLLM lives in its own venv, .venv-vllm from `make peers`, and runs as a worker process,
benchmarks/vllm_peer.py; without that venv the vllm engines are skipped with the reason printed).
Every engine gets the same token ids (GSM8K questions in the chat template), greedy decoding, EOS
ignored, the same number of new tokens and the same thread count.

Workloads, each run on every engine in turn (engines interleaved, ``--reps`` rounds, best kept):

(a) single stream: one prompt, ``--single-tokens`` new tokens; decode tok/s (after the first token)
    and time to first token.
(b) batched: ``--prompts`` prompts x ``--new-tokens`` new tokens. ditto: all submitted at once;
    transformers: one left-padded batch (``--hf-batch`` rows per generate call); llama.cpp: its
    high-level API has no batching, so prompts run one after another (``--llama-prompts`` of them:
    its throughput is its single-stream rate) and both its total and its best single stream are shown;
    vLLM: all submitted at once (one ``LLM.generate`` call, its own scheduler).
(c) greedy agreement in the batched run: how many outputs are token-identical to ditto's of the same
    dtype (and to ditto-fp32), and the mean length of the common prefix.

Then the roofline: measured memory bandwidth (a 512 MB torch copy and sum) against the bytes of
weights each engine reads per decode step -> the single-stream decode tok/s that bandwidth allows.
The machine may be shared: thread count and load average are printed with every number; compare
ratios within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ditto.bench import make_prompts  # noqa: E402
from ditto.quality import decode_read_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALL_ENGINES = ["ditto-fp32", "ditto-bf16", "hf-fp32", "hf-bf16", "llama.cpp", "vllm-fp32", "vllm-bf16"]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"  # `make peers`


def load() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------ engines


class DittoEngine:
    def __init__(self, model: str, spec: str, threads: int, max_num_seqs: int):
        """spec: `<numerics>[@<determinism>]` (fp32, bf16@batch_invariant, gguf, integer@exact ...)."""
        from ditto import LLM

        numerics, _, determinism = spec.partition("@")
        self.name = f"ditto-{spec}"
        self.dtype = numerics
        self.llm = LLM(
            model,
            numerics=numerics,
            determinism=determinism or "fast",
            progress=False,
            threads=threads,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=False,  # repeated rounds must not reuse the prompt's KV
            kv_cache_gb=1.0,
        )

    def read_bytes(self) -> int:
        return decode_read_bytes(self.llm.numerics.model)

    def _params(self, new_tokens: int):
        from ditto.sampling import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, seed=0)

    def single(self, ids: list[int], new_tokens: int) -> dict:
        t0 = time.perf_counter()
        out = self.llm.generate([ids], self._params(new_tokens))[0]
        total = time.perf_counter() - t0
        n = len(out.outputs[0].token_ids)
        ttft = out.metrics["ttft_s"]
        return {"tokens": n, "ttft_s": ttft, "decode_tok_s": (n - 1) / (out.metrics["latency_s"] - ttft), "s": total}

    def batched(self, prompts: list[list[int]], new_tokens: int) -> dict:
        s0 = dict(self.llm.engine.stats)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, self._params(new_tokens))
        dt = time.perf_counter() - t0
        ids = [list(o.outputs[0].token_ids) for o in outs]
        n = sum(map(len, ids))
        stats = {k: self.llm.engine.stats[k] - s0[k] for k in s0}
        return {"tokens": n, "s": dt, "tok_s": n / dt, "engine_stats": stats, "token_ids": ids}


class HFEngine:
    def __init__(self, gguf: Path, dtype: str, pad_id: int):
        from transformers import AutoModelForCausalLM

        self.name = f"hf-{dtype}"
        self.dtype = dtype
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch_dtype, local_files_only=True
        ).eval()
        self.pad_id = pad_id

    def read_bytes(self) -> int:
        seen = {}
        for mod in self.model.modules():
            if isinstance(mod, torch.nn.Embedding):
                continue
            for t in mod.parameters(recurse=False):
                st = t.untyped_storage()
                seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return sum(seen.values())

    def _generate(self, batch: list[list[int]], new_tokens: int, stamps: list[float] | None = None):
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        procs = None
        if stamps is not None:
            from transformers import LogitsProcessorList

            def stamp(input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

            procs = LogitsProcessorList([stamp])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                logits_processor=procs,
            )
        return out[:, width:]

    def single(self, ids: list[int], new_tokens: int) -> dict:
        stamps: list[float] = []
        t0 = time.perf_counter()
        out = self._generate([ids], new_tokens, stamps)
        total = time.perf_counter() - t0
        n = out.shape[1]
        decode = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
        return {"tokens": n, "ttft_s": stamps[0] - t0, "decode_tok_s": 1.0 / decode, "s": total}

    def batched(self, prompts: list[list[int]], new_tokens: int, batch_size: int) -> dict:
        t0 = time.perf_counter()
        ids: list[list[int]] = []
        for i in range(0, len(prompts), batch_size):
            ids += self._generate(prompts[i : i + batch_size], new_tokens).tolist()
        dt = time.perf_counter() - t0
        n = sum(map(len, ids))
        return {"tokens": n, "s": dt, "tok_s": n / dt, "token_ids": ids}


class LlamaCppEngine:
    def __init__(self, gguf: Path, threads: int, n_ctx: int = 2048):
        from llama_cpp import Llama

        self.name = "llama.cpp"
        self.dtype = "Q4_1 (gguf)"
        self.gguf = gguf
        self.llm = Llama(
            str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0, n_batch=512
        )

    def read_bytes(self) -> int:
        return self.gguf.stat().st_size  # Q4_1 weights, tied table read by the output layer

    def _run(self, ids: list[int], new_tokens: int, out: list[int] | None = None) -> tuple[int, float, float]:
        self.llm.reset()
        t0 = time.perf_counter()
        first = None
        n = 0
        for tok in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            n += 1
            if out is not None:
                out.append(int(tok))
            if first is None:
                first = time.perf_counter()
            if n >= new_tokens:
                break
        return n, first - t0, time.perf_counter() - t0

    def single(self, ids: list[int], new_tokens: int) -> dict:
        n, ttft, total = self._run(ids, new_tokens)
        return {"tokens": n, "ttft_s": ttft, "decode_tok_s": (n - 1) / (total - ttft), "s": total}

    def batched(self, prompts: list[list[int]], new_tokens: int) -> dict:
        t0 = time.perf_counter()
        n, best = 0, 0.0
        ids: list[list[int]] = []
        for p in prompts:
            ids.append([])
            k, ttft, total = self._run(p, new_tokens, ids[-1])
            n += k
            best = max(best, (k - 1) / (total - ttft))
        dt = time.perf_counter() - t0
        return {
            "tokens": n,
            "s": dt,
            "tok_s": n / dt,
            "best_single_decode_tok_s": best,
            "prompts_run": len(prompts),
            "token_ids": ids,
        }


class VllmEngine:
    """vLLM's CPU build in its own venv: a benchmarks/vllm_peer.py worker process that loads the model
    once and answers one JSON request a line (stdin -> a result pipe); its log goes to a file."""

    def __init__(self, gguf: Path, dtype: str, threads: int, max_num_seqs: int, python: Path, eager: bool = False):
        if not python.exists():
            raise FileNotFoundError(f"{python} is missing: `make peers` sets up vLLM's CPU build there")
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from export_hf import export

        self.name = f"vllm-{dtype}"
        self.dtype = dtype
        self.model_dir = export(gguf)
        torch_dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        fd, log = tempfile.mkstemp(prefix=f"ditto-{self.name}-", suffix=".log")
        self.log = Path(log)
        r, w = os.pipe()
        cmd = [str(python), str(ROOT / "benchmarks" / "vllm_peer.py"), "--model", str(self.model_dir)]
        cmd += ["--dtype", torch_dtype, "--threads", str(threads), "--max-num-seqs", str(max_num_seqs)]
        cmd += ["--serve", "--result-fd", str(w)] + (["--eager"] if eager else [])
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=fd,
            stderr=subprocess.STDOUT,
            pass_fds=(w,),
            start_new_session=True,  # its own process group: close() ends vLLM's children too
            text=True,
            cwd=ROOT,
        )
        os.close(w)
        os.close(fd)
        self.results = os.fdopen(r, "r")
        atexit.register(self.close)
        ready = self._recv(timeout=900)
        self.info = ready

    def _recv(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.results], [], [], 1.0)
            if ready:
                line = self.results.readline()
                if line:
                    msg = json.loads(line)
                    if "error" in msg:
                        raise RuntimeError(f"{self.name}: {msg['error']} (log: {self.log})")
                    return msg
            if self.proc.poll() is not None or (ready and not line):
                tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
                why = f"{self.name} worker exited ({self.proc.poll()}); log {self.log}: "
                raise RuntimeError(why + " | ".join(tail))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no answer in {timeout:.0f}s (log: {self.log})")

    def _ask(self, mode: str, prompts: list[list[int]], new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"mode": mode, "prompts": prompts, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._recv(timeout=1800)

    def read_bytes(self) -> int:
        """Every weight of the exported folder once (the tied embedding is read whole by lm_head), at the
        dtype vLLM runs."""
        from safetensors import safe_open

        total = 0
        with safe_open(str(self.model_dir / "model.safetensors"), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                total += _numel(f.get_slice(key).get_shape())
        return total * (4 if self.dtype == "fp32" else 2)

    def single(self, ids: list[int], new_tokens: int) -> dict:
        r = self._ask("single", [ids], new_tokens)
        return {k: r[k] for k in ("tokens", "ttft_s", "decode_tok_s", "s", "timing")}

    def batched(self, prompts: list[list[int]], new_tokens: int) -> dict:
        r = self._ask("batched", prompts, new_tokens)
        return {k: r[k] for k in ("tokens", "s", "tok_s", "token_ids")}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"mode": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the worker's group: what vLLM left
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ------------------------------------------------------------------ roofline


def bandwidth(mb: int = 512, reps: int = 5) -> dict:
    """Best-of-`reps` GB/s of a torch copy (read + write counted) and sum (read) of an `mb` MB fp32 tensor."""
    n = mb * 2**20 // 4
    a = torch.rand(n)
    b = torch.empty_like(a)
    copy_t, sum_t = float("inf"), float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        copy_t = min(copy_t, time.perf_counter() - t0)
        t0 = time.perf_counter()
        a.sum()
        sum_t = min(sum_t, time.perf_counter() - t0)
    nbytes = n * 4
    del a, b
    gc.collect()
    return {"copy_GBps": 2 * nbytes / copy_t / 1e9, "sum_GBps": nbytes / sum_t / 1e9, "tensor_MB": mb}


# ------------------------------------------------------------------ output


SAME_DTYPE_DITTO = {
    "hf-fp32": "ditto-fp32",
    "hf-bf16": "ditto-bf16",
    "vllm-fp32": "ditto-fp32",
    "vllm-bf16": "ditto-bf16",
}


def _compare(a: list[list[int]], b: list[list[int]]) -> dict:
    """Outputs of two engines on the same prompts (the first min(len) of them): how many are
    token-identical, and the mean length of their common prefix."""
    pairs = list(zip(a, b))
    prefixes = []
    for x, y in pairs:
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefixes.append(k)
    same = sum(x == y for x, y in pairs)
    return {"identical": same, "of": len(pairs), "mean_common_prefix": sum(prefixes) / max(1, len(prefixes))}


def agreement(ids: dict[str, list[list[int]]]) -> dict:
    """Greedy outputs of the batched run of every engine against ditto's of the same dtype and ditto-fp32."""
    out = {}
    for name, mine in ids.items():
        if name == "ditto-fp32":
            continue
        same = SAME_DTYPE_DITTO.get(name) or (base(name) if base(name) != name else None)
        refs = dict.fromkeys(r for r in (same, "ditto-fp32") if r in ids and r != name)
        for ref in refs:
            out[f"{name} vs {ref}"] = _compare(mine, ids[ref])
    if "vllm-fp32" in ids and "hf-fp32" in ids:
        out["vllm-fp32 vs hf-fp32"] = _compare(ids["vllm-fp32"], ids["hf-fp32"])
    for name in ids:  # the engines that run the file's own blocks
        if base(name) == "ditto-gguf" and "llama.cpp" in ids:
            out[f"{name} vs llama.cpp"] = _compare(ids[name], ids["llama.cpp"])
    return out


def base(name: str) -> str:
    """An engine's name without its determinism level: ditto-fp32@batch_invariant -> ditto-fp32."""
    return name.partition("@")[0]


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else ""


def print_tables(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(160, Console().width))
    meta = res["meta"]
    head = f"threads {meta['threads']}, load {meta['load_start']:.2f}->{meta['load_end']:.2f}"
    single = res.get("single", {})
    batched = res.get("batched", {})
    hf_of = {"ditto-fp32": "hf-fp32", "ditto-bf16": "hf-bf16"}
    vllm_of = {"ditto-fp32": "vllm-fp32", "ditto-bf16": "vllm-bf16"}

    if single:
        t = Table(title=f"(a) single stream, {meta['single_tokens']} new tokens, best of {meta['reps']} rounds; {head}")
        for c in (
            "engine",
            "decode tok/s",
            "TTFT ms",
            "roofline tok/s",
            "% of roofline",
            "vs HF same dtype",
            "vs vLLM same dtype",
            "vs llama.cpp",
        ):
            t.add_column(c, justify="left" if c == "engine" else "right")
        llama = single.get("llama.cpp", {}).get("decode_tok_s")
        for name, r in single.items():
            roof = res["roofline"].get(name, {}).get("sum_tok_s")
            hf = single.get(hf_of.get(base(name), ""), {}).get("decode_tok_s")
            vl = single.get(vllm_of.get(base(name), ""), {}).get("decode_tok_s")
            t.add_row(
                name,
                f"{r['decode_tok_s']:.1f}",
                f"{r['ttft_s'] * 1e3:.0f}",
                f"{roof:.1f}" if roof else "",
                f"{100 * r['decode_tok_s'] / roof:.0f}%" if roof else "",
                ratio(r["decode_tok_s"], hf) if name.startswith("ditto") else "",
                ratio(r["decode_tok_s"], vl) if name.startswith("ditto") else "",
                ratio(r["decode_tok_s"], llama) if name != "llama.cpp" else "",
            )
        con.print(t)
    if batched:
        t = Table(
            title=f"(b) batched, {meta['prompts']} GSM8K prompts x {meta['new_tokens']} new tokens "
            f"(llama.cpp: {meta['llama_prompts']} prompts, sequential); {head}"
        )
        for c in (
            "engine",
            "output tok/s",
            "elapsed s",
            "vs HF same dtype",
            "vs vLLM same dtype",
            "vs llama.cpp total",
            "note",
        ):
            t.add_column(c, justify="left" if c in ("engine", "note") else "right")
        llama = batched.get("llama.cpp", {}).get("tok_s")
        for name, r in batched.items():
            hf = batched.get(hf_of.get(base(name), ""), {}).get("tok_s")
            vl = batched.get(vllm_of.get(base(name), ""), {}).get("tok_s")
            note = ""
            if name == "llama.cpp":
                note = f"best single stream {r['best_single_decode_tok_s']:.1f} tok/s"
            elif "engine_stats" in r:
                st = r["engine_stats"]
                note = f"steps {st['steps']}, preemptions {st['preemptions']}"
            t.add_row(
                name,
                f"{r['tok_s']:.1f}",
                f"{r['s']:.1f}",
                ratio(r["tok_s"], hf) if name.startswith("ditto") else "",
                ratio(r["tok_s"], vl) if name.startswith("ditto") else "",
                ratio(r["tok_s"], llama) if name != "llama.cpp" else "",
                note,
            )
        con.print(t)
    if res.get("agreement"):
        t = Table(title=f"(c) greedy agreement, batched run ({meta['new_tokens']} tokens each, EOS ignored)")
        for c in ("engines", "token-identical outputs", "mean common prefix (tokens)"):
            t.add_column(c, justify="left" if c == "engines" else "right")
        for pair, a in res["agreement"].items():
            t.add_row(pair, f"{a['identical']} / {a['of']}", f"{a['mean_common_prefix']:.1f}")
        con.print(t)
    bw = res["bandwidth"]
    t = Table(
        title=f"roofline: copy {bw['copy_GBps']:.1f} GB/s (read+write), sum {bw['sum_GBps']:.1f} GB/s (read); "
        f"{bw['tensor_MB']} MB fp32 tensor"
    )
    for c in ("engine", "weights read / decode step MiB", "roofline tok/s (sum bw)", "roofline tok/s (copy bw)"):
        t.add_column(c, justify="left" if c == "engine" else "right")
    for name, r in res["roofline"].items():
        t.add_row(name, f"{r['bytes'] / 2**20:.1f}", f"{r['sum_tok_s']:.1f}", f"{r['copy_tok_s']:.1f}")
    con.print(t)


# ------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="bundled name or a .gguf file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engines", default=",".join(ALL_ENGINES), help=f"comma-separated subset of {ALL_ENGINES}")
    ap.add_argument("--prompts", type=int, default=64, help="prompts in the batched workload")
    ap.add_argument("--new-tokens", type=int, default=256, help="new tokens per prompt in the batched workload")
    ap.add_argument("--single-tokens", type=int, default=128, help="new tokens in the single-stream workload")
    ap.add_argument("--llama-prompts", type=int, default=None, help="prompts llama.cpp runs (default: all)")
    ap.add_argument("--hf-batch", type=int, default=None, help="rows per transformers generate call (default: all)")
    ap.add_argument("--reps", type=int, default=2, help="rounds of the single-stream workload (best kept)")
    ap.add_argument("--batched-reps", type=int, default=1, help="rounds of the batched workload")
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--skip-batched", action="store_true")
    ap.add_argument("--json", default=None, help="write all numbers to this JSON file")
    ap.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="python of the vLLM venv (`make peers`)")
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (faster start)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ditto.loader.registry import resolve_model

    gguf = resolve_model(args.model)
    if gguf.suffix != ".gguf":
        raise SystemExit("engine_vs_peers needs a .gguf model (all three engines load the same file)")
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    load_start = load()
    engines = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            if name.startswith("ditto-"):
                engines[name] = DittoEngine(args.model, name.split("-", 1)[1], args.threads, max(args.prompts, 1))
            elif name.startswith("hf-"):
                pad = None
                ref = next((e for e in engines.values() if isinstance(e, DittoEngine)), None)
                if ref is not None:
                    pad = ref.llm.engine.cfg.eos_token_ids[0] if ref.llm.engine.cfg.eos_token_ids else 0
                engines[name] = HFEngine(gguf, name.split("-", 1)[1], pad if pad is not None else 0)
            elif name == "llama.cpp":
                engines[name] = LlamaCppEngine(gguf, args.threads)
            elif name in ("vllm-fp32", "vllm-bf16"):
                engines[name] = VllmEngine(
                    gguf,
                    name.split("-", 1)[1],
                    args.threads,
                    max(args.prompts, 1),
                    Path(args.vllm_python),
                    eager=args.vllm_eager,
                )
            else:
                raise ValueError(f"unknown engine {name!r}")
        except Exception as exc:
            print(f"[peers] {name}: not run ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        print(f"[peers] loaded {name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    torch.set_num_threads(args.threads)  # loaders may reset it

    # the same token ids for everyone: GSM8K questions in the chat template, tokenised by ditto
    from ditto import LLM

    tok_src = next((e.llm for e in engines.values() if isinstance(e, DittoEngine)), None) or LLM(
        args.model, progress=False
    )
    prompts = make_prompts(tok_src, max(args.prompts, 1))
    res: dict = {
        "meta": {
            "model": str(gguf),
            "threads": args.threads,
            "torch_threads": torch.get_num_threads(),
            "prompts": args.prompts,
            "new_tokens": args.new_tokens,
            "single_tokens": args.single_tokens,
            "llama_prompts": args.llama_prompts or args.prompts,
            "reps": args.reps,
            "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
            "load_start": load_start,
            "torch": torch.__version__,
            "vllm": {n: e.info for n, e in engines.items() if isinstance(e, VllmEngine)},
        },
        "single": {},
        "batched": {},
        "batched_token_ids": {},
        "loads": [],
    }

    if not args.skip_single:
        for e in engines.values():  # warm-up
            e.single(prompts[0], 4)
        for rep in range(args.reps):
            for name, e in engines.items():
                r = e.single(prompts[0], args.single_tokens)
                r["load"] = load()
                print(f"[peers] single round {rep} {name}: {r['decode_tok_s']:.1f} tok/s, load {r['load']:.2f}")
                best = res["single"].get(name)
                if best is None or r["decode_tok_s"] > best["decode_tok_s"]:
                    res["single"][name] = r
    if not args.skip_batched:
        for rep in range(args.batched_reps):
            for name, e in engines.items():
                if isinstance(e, HFEngine):
                    r = e.batched(prompts, args.new_tokens, args.hf_batch or len(prompts))
                elif isinstance(e, LlamaCppEngine):
                    r = e.batched(prompts[: args.llama_prompts or len(prompts)], args.new_tokens)
                else:
                    r = e.batched(prompts, args.new_tokens)
                r["load"] = load()
                ids = r.pop("token_ids", None)
                print(f"[peers] batched round {rep} {name}: {r['tok_s']:.1f} tok/s, load {r['load']:.2f}")
                best = res["batched"].get(name)
                if best is None or r["tok_s"] > best["tok_s"]:
                    res["batched"][name] = r
                    if ids is not None:
                        res["batched_token_ids"][name] = ids
        res["agreement"] = agreement(res["batched_token_ids"])

    bw = bandwidth()
    res["bandwidth"] = bw
    res["roofline"] = {}
    for name, e in engines.items():
        b = e.read_bytes()
        res["roofline"][name] = {
            "bytes": b,
            "sum_tok_s": bw["sum_GBps"] * 1e9 / b,
            "copy_tok_s": bw["copy_GBps"] * 1e9 / b,  # copy GB/s counts bytes read + written
        }
    res["meta"]["load_end"] = load()
    for e in engines.values():
        if isinstance(e, VllmEngine):
            e.close()
    print_tables(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
