"""OpenAI-compatible peer servers for benchmarks: vLLM's CPU build (.venv-vllm from `make peers`) and
llama-cpp-python's server, each started in its own process group on a free loopback port, ready when
/v1/models answers, and stopped with its whole group on exit.

vLLM loads an HF folder (benchmarks/export_hf.py makes one from the bundled GGUF); it takes ~100 s to
start on a small CPU and its idle workers spin on the cores while it runs, so nothing else should be
timed meanwhile. Nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An OpenAI-compatible server process of ours: started in its own process group, ready when
    /v1/models answers, stopped (its whole group) on exit."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict, timeout: float):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        fd, log = tempfile.mkstemp(prefix=f"ditto-{name.replace(' ', '_')}-", suffix=".log")
        self.log = Path(log)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=fd, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True, cwd=ROOT
        )
        os.close(fd)
        while True:
            if self.proc.poll() is not None:
                tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-5:])
                raise RuntimeError(f"{name} exited ({self.proc.returncode}); log {self.log}: {tail}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > timeout:
                self.close()
                raise TimeoutError(f"{name}: not ready in {timeout:.0f} s (log {self.log})")
            time.sleep(2)
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]
        print(f"{name}: ready in {time.monotonic() - t0:.0f} s at {self.url} (log {self.log})", flush=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def vllm_server(model_dir: Path, dtype: str, threads: int, max_num_seqs: int = 8) -> Server:
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} is missing (`make peers` sets up vLLM's CPU build)")
    port = _port()
    env = {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--dtype", dtype]
    cmd += ["--port", str(port), "--host", "127.0.0.1", "--max-model-len", "2048", "--seed", "0"]
    cmd += ["--served-model-name", "m", "--max-num-seqs", str(max_num_seqs), "--enforce-eager"]
    return Server(f"vllm-{dtype}", cmd, port, env, timeout=900)


def llamacpp_server(gguf: Path, threads: int) -> Server:
    port = _port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--n_threads", str(threads), "--n_ctx", "2048", "--model_alias", "m"]
    return Server("llama.cpp", cmd, port, {}, timeout=300)
