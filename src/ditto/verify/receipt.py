"""Receipts: one canonical, hashed and optionally Ed25519-signed JSON document per generation.

A receipt holds everything a third party needs to replay a generation and check it: model and
tokenizer digests, numerics mode, determinism level, the full sampling record (seed, sample index,
processing order), prompt and output token ids, optional logprobs and Activation-DiFR
fingerprints, and the hardware it ran on.

Canonical JSON (what the content hash is computed over), "ditto-canonical-json-v1":
  * an object with keys sorted by code point, no whitespace (separators "," and ":"), UTF-8,
    non-ASCII characters written as themselves, strings escaped as Python's json module does;
  * integers in plain decimal; booleans and null as JSON literals; tuples as arrays;
  * a float is written as its shortest round-trip decimal (Python's repr(float): "0.1", "1e-07",
    "-0.0", "100.0"), so parsing it gives back the exact IEEE-754 binary64 value;
  * non-finite floats are only allowed in `output_logprobs`, where they are the strings
    "Infinity", "-Infinity" or "NaN"; anywhere else they are an error.
The content hash is "sha256:" + hex(SHA-256(canonical JSON of every field except
`content_hash` and `signature`)). The signature is Ed25519 over the UTF-8 bytes of the content hash
string, stored as hex; `public_key` (raw 32 bytes, hex) is part of the hashed body.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SCHEMA_VERSION = "ditto.receipt/v1"
CANONICAL_JSON = "ditto-canonical-json-v1"
_UNSIGNED_FIELDS = ("content_hash", "signature")
_NONFINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _ditto_version() -> str:
    from ditto import __version__

    return __version__


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _plain(obj, where: str):
    """A deep copy of `obj` made only of JSON types (numpy/torch scalars become int/float)."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{where}: non-finite float {obj!r} cannot go in a receipt")
        return float(obj)
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise ValueError(f"{where}: object keys must be strings")
        return {k: _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalar
        return _plain(obj.item(), where)
    raise TypeError(f"{where}: {type(obj).__name__} is not a JSON type")


def _no_constants(name):
    raise ValueError(f"receipt JSON contains the non-standard constant {name}")


def canonical_json(obj) -> bytes:
    """The canonical JSON bytes of a JSON-typed object (see the module docstring)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def _float_out(x: float):
    return x if math.isfinite(x) else ("NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity"))


def _float_in(x) -> float:
    if isinstance(x, str):
        if x not in _NONFINITE:
            raise ValueError(f"bad float string {x!r} in receipt")
        return _NONFINITE[x]
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise ValueError(f"expected a number in receipt, got {x!r}")
    return float(x)


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware_info(device: str = "cpu") -> dict:
    """What the generation ran on: CPU model, torch version, device, thread count, OS."""
    import torch

    info = {
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def digest_files(paths: Iterable[str | os.PathLike]) -> str:
    """ "sha256:<hex>" of one file, or of the sorted (file name, file sha256) list for several."""
    paths = sorted(Path(p) for p in paths)
    if not paths:
        raise ValueError("digest_files needs at least one file")
    per_file = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        per_file.append((p.name, h.hexdigest()))
    if len(per_file) == 1:
        return "sha256:" + per_file[0][1]
    return "sha256:" + hashlib.sha256(canonical_json([list(x) for x in per_file])).hexdigest()


# ---------------------------------------------------------------------------------------- keys


def generate_keypair(path: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """`ditto keygen`: write an Ed25519 key pair as PEM: `path` (private, mode 0600), `path`.pub."""
    priv_path, pub_path = Path(path), Path(str(path) + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass overwrite=True (or --force) to replace it")
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for p, data, mode in ((priv_path, priv_pem, 0o600), (pub_path, pub_pem, 0o644)):
        if p.exists():
            p.unlink()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # never readable by others, not even briefly
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(p, mode)  # the umask may have removed bits
    return priv_path, pub_path


def _pem_bytes(src) -> bytes:
    if isinstance(src, bytes):
        return src
    if isinstance(src, str) and src.lstrip().startswith("-----BEGIN"):
        return src.encode()
    return Path(src).expanduser().read_bytes()


def load_private_key(src) -> Ed25519PrivateKey:
    """An Ed25519 private key from a key object, PEM bytes/text or a PEM file path."""
    if isinstance(src, Ed25519PrivateKey):
        return src
    key = serialization.load_pem_private_key(_pem_bytes(src), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("receipts are signed with Ed25519 keys; create one with `ditto keygen`")
    return key


def load_public_key(src) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, raw hex (64 chars), PEM bytes/text or a PEM file."""
    if isinstance(src, Ed25519PublicKey):
        return src
    if isinstance(src, Ed25519PrivateKey):
        return src.public_key()
    if isinstance(src, str) and len(src) == 64 and all(c in "0123456789abcdefABCDEF" for c in src):
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(src))
    key = serialization.load_pem_public_key(_pem_bytes(src))
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("receipts are signed with Ed25519 keys; expected an Ed25519 public key")
    return key


def public_key_hex(key) -> str:
    raw = load_public_key(key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


# ------------------------------------------------------------------------------------- receipt


@dataclass(frozen=True)
class Receipt:
    """One generation (one sample of one request). Build it, then `seal()` it before publishing."""

    model_digest: str
    tokenizer_digest: str
    numerics: str
    determinism: str
    sampling: dict  # SamplingParams.record(): seed, temperature, filters, processing order, noise
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sample_index: int = 0
    output_logprobs: tuple[float, ...] | None = None
    finish_reason: str | None = None
    fingerprint_seed: int | None = None
    fingerprint_k: int = 0
    fingerprints: tuple[tuple[float, ...], ...] | None = None  # (T, k): h.P per output token
    model: str = ""  # informative name / path; the digest is what counts
    hardware: dict = field(default_factory=hardware_info)
    created: str = field(default_factory=_now)
    ditto_version: str = field(default_factory=_ditto_version)
    schema: str = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)
    public_key: str | None = None  # signer's raw Ed25519 key (hex); set by seal()
    content_hash: str | None = None
    signature: str | None = None

    def __post_init__(self) -> None:
        s = object.__setattr__
        for name in ("sampling", "hardware", "extra"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise TypeError(f"Receipt.{name} must be a dict, got {type(value).__name__}")
            s(self, name, _plain(value, name))
        for name in ("prompt_token_ids", "output_token_ids"):
            ids = tuple(_plain(list(getattr(self, name)), name))
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise ValueError(f"Receipt.{name} must hold non-negative integers")
            s(self, name, ids)
        n_out = len(self.output_token_ids)
        if self.output_logprobs is not None:
            lps = tuple(float(x) for x in self.output_logprobs)
            if len(lps) != n_out:
                raise ValueError(f"output_logprobs has {len(lps)} entries for {n_out} output tokens")
            s(self, "output_logprobs", lps)
        if self.fingerprints is not None:
            fps = tuple(tuple(_plain([float(x) for x in row], "fingerprints")) for row in self.fingerprints)
            if len(fps) != n_out or any(len(row) != self.fingerprint_k for row in fps):
                raise ValueError(f"fingerprints must be {n_out} rows of fingerprint_k={self.fingerprint_k} floats")
            s(self, "fingerprints", fps)
            if self.fingerprint_seed is None:
                raise ValueError("fingerprints need the fingerprint_seed of their projection")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (
                f.type in ("str", "str | None")
                and not isinstance(value, str)
                and (value is not None or f.type == "str")
            ):
                raise TypeError(f"Receipt.{f.name} must be a string")
        for name in ("sample_index", "fingerprint_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Receipt.{name} must be a non-negative integer")
        if self.fingerprint_seed is not None and (
            not isinstance(self.fingerprint_seed, int) or isinstance(self.fingerprint_seed, bool)
        ):
            raise ValueError("Receipt.fingerprint_seed must be an integer")

    # -- canonical form ------------------------------------------------------------------
    def _doc(self) -> dict:
        doc = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "output_logprobs" and v is not None:
                v = [_float_out(x) for x in v]
            elif isinstance(v, tuple):
                v = [list(x) if isinstance(x, tuple) else x for x in v]
            doc[f.name] = v
        return doc

    def body(self) -> dict:
        """Every field except the content hash and the signature (what the hash covers)."""
        return {k: v for k, v in self._doc().items() if k not in _UNSIGNED_FIELDS}

    def compute_hash(self) -> str:
        return "sha256:" + hashlib.sha256(canonical_json(self.body())).hexdigest()

    def to_json(self, indent: int | None = None) -> str:
        """Canonical JSON of the whole receipt (or indented, for people; both parse back the same)."""
        if indent is None:
            return canonical_json(self._doc()).decode("utf-8")
        return json.dumps(self._doc(), sort_keys=True, indent=indent, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Receipt:
        return cls.from_dict(json.loads(text, parse_constant=_no_constants))

    @classmethod
    def from_dict(cls, doc: dict) -> Receipt:
        """A receipt from its parsed JSON document (the fields must be exactly the schema's)."""
        if not isinstance(doc, dict):
            raise ValueError("a receipt is a JSON object")
        if doc.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"unsupported receipt schema {doc.get('schema')!r}; this ditto reads {SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(doc) != names:
            missing, unknown = sorted(names - set(doc)), sorted(set(doc) - names)
            raise ValueError(f"receipt fields do not match {SCHEMA_VERSION}: missing {missing}, unknown {unknown}")
        doc = dict(doc)
        if doc["output_logprobs"] is not None:
            doc["output_logprobs"] = [_float_in(x) for x in doc["output_logprobs"]]
        if doc["fingerprints"] is not None:
            doc["fingerprints"] = [[_float_in(x) for x in row] for row in doc["fingerprints"]]
        return cls(**doc)

    @classmethod
    def parse(cls, data: str | bytes | dict, source: str = "receipt") -> Receipt:
        """A receipt from file contents or a parsed document, bare or wrapped as {"receipt": {...}}.

        Every problem is a ValueError that names `source` and says what was expected.
        """
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{source}: not a receipt: the file is not UTF-8 text (a binary file?)") from None
        if isinstance(data, str):
            try:
                data = json.loads(data, parse_constant=_no_constants)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{source}: not a receipt: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
                ) from None
            except ValueError as e:  # NaN / Infinity constants
                raise ValueError(f"{source}: not a valid receipt: {e}") from None
        if isinstance(data, dict) and set(data) == {"receipt"} and isinstance(data["receipt"], dict):
            data = data["receipt"]
        if not isinstance(data, dict):
            raise ValueError(f"{source}: not a receipt: a receipt is a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: not a valid receipt: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Receipt:
        """Read a receipt file (bare or wrapped); a clear ValueError naming the file if it is not one."""
        return cls.parse(Path(path).read_bytes(), source=str(path))

    # -- sealing and checking -------------------------------------------------------------
    def seal(self, private_key=None) -> Receipt:
        """A copy with the content hash set and, given an Ed25519 key (object, PEM or path), signed."""
        if private_key is None:
            sealed = dataclasses.replace(self, public_key=None, content_hash=None, signature=None)
            return dataclasses.replace(sealed, content_hash=sealed.compute_hash())
        key = load_private_key(private_key)
        sealed = dataclasses.replace(self, public_key=public_key_hex(key), content_hash=None, signature=None)
        digest = sealed.compute_hash()
        return dataclasses.replace(sealed, content_hash=digest, signature=key.sign(digest.encode()).hex())

    @property
    def signed(self) -> bool:
        return self.signature is not None

    def check_integrity(self, public_key=None) -> list[str]:
        """Problems with this receipt's hash and signature ([] = intact).

        With `public_key` (the key you expect the issuer to use) the receipt must be signed by it;
        without one, a signature is checked against the embedded key, which proves the document
        was not edited after signing, not who signed it.
        """
        problems = []
        if self.content_hash is None:
            problems.append("receipt is not sealed (no content hash)")
        elif self.content_hash != self.compute_hash():
            problems.append("content hash mismatch: the receipt was edited after it was sealed")
        expected = None
        if public_key is not None:
            try:
                expected = public_key_hex(public_key)
            except (ValueError, TypeError, OSError) as e:
                return problems + [f"cannot load the expected public key: {e}"]
        if self.signature is None:
            if expected is not None:
                problems.append("receipt is not signed, but a signature by the given key was required")
            return problems
        if self.public_key is None:
            return problems + ["receipt has a signature but no public key"]
        if expected is not None and expected != self.public_key.lower():
            problems.append("receipt was signed by a different key than the one expected")
        try:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.public_key))
            key.verify(bytes.fromhex(self.signature), (self.content_hash or "").encode())
        except (InvalidSignature, ValueError):
            problems.append("signature invalid: it does not match the content hash and public key")
        return problems

    # -- building from engine outputs -----------------------------------------------------
    @classmethod
    def from_completion(cls, request_output, completion, params, **fields) -> Receipt:
        """A receipt for one CompletionOutput of a RequestOutput (ditto.outputs) sampled with `params`.

        `fields` supplies the rest: model_digest, tokenizer_digest, numerics, determinism, and
        optionally model, fingerprint_seed, hardware, extra.
        """
        if not params.greedy and params.seed is None:
            raise ValueError("resolve the seed (SamplingParams.with_seed()) before building a receipt")
        fps = completion.fingerprints
        return cls(
            sampling=params.record(),
            sample_index=completion.index,
            prompt_token_ids=tuple(request_output.prompt_token_ids),
            output_token_ids=tuple(completion.token_ids),
            output_logprobs=tuple(completion.logprobs) if completion.logprobs else None,
            finish_reason=completion.finish_reason,
            fingerprint_k=len(fps[0]) if fps else 0,
            fingerprints=tuple(tuple(r) for r in fps) if fps else None,
            **fields,
        )
