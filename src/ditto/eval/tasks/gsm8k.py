"""GSM8K from JSONL (`question`, `answer` with the final answer after `#### `)."""

from __future__ import annotations

import re

from ditto.eval.tasks.base import Problem, Task, find_data_file, read_jsonl, sha256_file

FILES = ["gsm8k-test.jsonl", "gsm8k.jsonl", "gsm8k-train.jsonl"]


def gold_from_solution(solution: str) -> str:
    m = re.search(r"####\s*(.+?)\s*$", solution.strip())
    if not m:
        raise ValueError(f"GSM8K answer without '####': {solution[-80:]!r}")
    return m.group(1).replace(",", "").strip()


class GSM8K(Task):
    """Grade-school math word problems; difficulty = number of calculation steps in the reference."""

    name = "gsm8k"

    def __init__(self, data: str | None = None):
        self.path = find_data_file(FILES, data)

    def problems(self) -> list[Problem]:
        out = []
        for i, row in enumerate(read_jsonl(self.path, ("question", "answer"), "GSM8K")):
            sol = str(row["answer"])
            try:
                gold = gold_from_solution(sol)
            except ValueError as e:
                raise ValueError(f"{self.path} row {i + 1}: {e}") from None
            steps = max(1, len(re.findall(r"<<[^>]*>>", sol)))
            out.append(
                Problem(
                    id=f"gsm8k-{i:05d}",
                    question=str(row["question"]).strip(),
                    answer=gold,
                    difficulty=min(steps, 8),
                    meta={"steps": steps, "split_file": self.path.name},
                )
            )
        return out

    def info(self) -> dict:
        return {"name": self.name, "file": str(self.path), "sha256": sha256_file(self.path)}
