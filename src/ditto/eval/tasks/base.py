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


def bundled_data_dir() -> Path:
    """The small samples shipped inside the package (ditto/data: GSM8K, MATH-500, with their licences)."""
    from ditto.data import DATA_DIR

    return DATA_DIR


def data_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Candidate data folders, in priority order: explicit path, $DITTO_DATA, the bundled samples.

    Only these: nothing outside the package is read unless the user names it."""
    out = []
    if explicit:
        out.append(Path(explicit))
    if os.environ.get(DATA_ENV):
        out.append(Path(os.environ[DATA_ENV]))
    out.append(bundled_data_dir())
    unique: list[Path] = []
    for d in out:
        if d not in unique:
            unique.append(d)
    return unique


def find_data_file(names: list[str], explicit: str | os.PathLike | None = None) -> Path:
    """The first existing file: `explicit` itself when it is a file, else one of `names` in data_dirs().

    An explicit path that does not exist is an error (never silently replaced by the bundled sample)."""
    if explicit:
        path = Path(explicit)
        if path.is_file():
            return path
        if not path.is_dir():
            raise FileNotFoundError(f"--data {str(explicit)!r}: no such file or folder")
    dirs = data_dirs(explicit)
    if explicit:
        dirs = dirs[:1]  # a folder the user named must hold the file
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    raise FileNotFoundError(
        f"no data file ({' or '.join(names)}) in {', '.join(str(d) for d in dirs)}. "
        f"Pass --data PATH (a file or folder) or set ${DATA_ENV}."
    )


def read_jsonl(path: Path, required: tuple[str, ...] = (), what: str = "JSONL") -> list[dict]:
    """One JSON object per non-blank line. Errors name the file, the line and what was expected
    (`required`: fields every row must have; `what`: the kind of file, for messages)."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit in a string
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); expected a {what} file") from None
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} line {lineno}: not JSON ({e.msg} at column {e.colno}); "
                f"expected a {what} file with one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(
                f"{path} line {lineno}: no {', '.join(repr(k) for k in missing)} field "
                f"(a {what} file has {', '.join(required)} on every line)"
            )
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows (expected a {what} file with one JSON object per line)")
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
