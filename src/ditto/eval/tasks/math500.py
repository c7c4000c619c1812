"""MATH-500 from JSONL (`problem`, `solution`, `answer`, `subject`, `level`, `unique_id`)."""

from __future__ import annotations

from ditto.eval.tasks.base import Problem, Task, find_data_file, read_jsonl, sha256_file

FILES = ["math500.jsonl", "math-500.jsonl", "MATH-500.jsonl"]


class Math500(Task):
    """Competition math; difficulty = the MATH level (1-5)."""

    name = "math500"

    def __init__(self, data: str | None = None):
        self.path = find_data_file(FILES, data)

    def problems(self) -> list[Problem]:
        out = []
        for i, row in enumerate(read_jsonl(self.path, ("problem", "answer"), "MATH-500")):
            out.append(
                Problem(
                    id=row.get("unique_id") or f"math500-{i:03d}",
                    question=str(row["problem"]).strip(),
                    answer=str(row["answer"]).strip(),
                    difficulty=row.get("level"),
                    meta={"subject": row.get("subject")},
                )
            )
        return out

    def info(self) -> dict:
        return {"name": self.name, "file": str(self.path), "sha256": sha256_file(self.path)}
