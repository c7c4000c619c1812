"""Tasks: a Problem dataclass, the Task interface and where evaluation data lives."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

DATA_ENV = "DITTO_DATA"


@dataclass(frozen=True)
class Problem:
    """One evaluation problem. `id` is stable across runs (used for resumption and pairing)."""

    id: str
    question: str
    answer: str  # gold final answer (text, graded by ditto.eval.grading)
    difficulty: str | int | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        return asdict(self)


def repo_root() -> Path:
    """The project root (the folder holding src/) of this checkout."""
    return Path(__file__).resolve().parents[4]


def data_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Candidate data folders, in priority order: explicit path, $DITTO_DATA, <repo>/../shared/data."""
    out = []
    if explicit:
        out.append(Path(explicit))
    if os.environ.get(DATA_ENV):
        out.append(Path(os.environ[DATA_ENV]))
    out.append(repo_root().parent / "shared" / "data")
    out.append(Path.cwd().parent / "shared" / "data")
    out.append(Path.cwd() / "shared" / "data")
    return out


def find_data_file(names: list[str], explicit: str | os.PathLike | None = None) -> Path:
    """The first existing file: `explicit` itself when it is a file, else one of `names` in data_dirs()."""
    if explicit and Path(explicit).is_file():
        return Path(explicit)
    tried = []
    for d in data_dirs(explicit):
        for name in names:
            p = d / name
            tried.append(str(p))
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"no data file ({' or '.join(names)}) found; tried: {', '.join(tried)}. "
        f"Pass --data PATH (a file or folder) or set ${DATA_ENV}."
    )


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Task:
    """A source of problems. Subclasses set `name` and implement `problems()`."""

    name: str = "task"

    def problems(self) -> list[Problem]:
        raise NotImplementedError

    def load(self, limit: int | None = None, offset: int = 0) -> list[Problem]:
        probs = self.problems()[offset:]
        return probs if limit is None else probs[:limit]

    def info(self) -> dict:
        """What identifies the task's data (recorded in manifests)."""
        return {"name": self.name}
