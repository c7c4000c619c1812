"""Answer extraction: the final answer of a model's response, and which rule found it.

Extraction order (first that matches): "final answer is $...$", the last ``\\boxed{}``/``\\fbox{}``,
"the answer is ...", GSM8K ``#### ...``, the last number in the text.

Imports only the standard library: the grading worker (ditto.eval.grading_worker) loads it without torch.
"""

from __future__ import annotations

import re

_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}, or \\boxed x) with balanced braces."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth == 0:
                best = text[i + 1 : j]
        else:  # "\boxed 5"
            m2 = re.match(r"[^\s$]+", text[i:])
            if m2:
                best = m2.group(0)
    return best


def _clean_tail(ans: str) -> str:
    ans = ans.strip()
    ans = re.sub(r"^[:\s]+", "", ans)
    ans = ans.strip().rstrip(".").strip()
    if len(ans) >= 2 and ans[0] == "$" and ans[-1] == "$":
        ans = ans.strip("$").strip()
    return ans


def extract_answer(text: str) -> tuple[str | None, str]:
    """Final answer of a model response: (answer or None, method used)."""
    if text is None:
        return None, "none"
    m = list(re.finditer(r"final answer is\s*:?\s*\$([^$]+)\$", text, flags=re.I))
    if m:
        return _clean_tail(m[-1].group(1)), "final_answer_is"
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return _clean_tail(boxed), "boxed"
    m = list(re.finditer(r"the (?:final )?answer is\s*:?\s*([^\n]+)", text, flags=re.I))
    if m:
        tail = m[-1].group(1).strip()
        if tail.startswith("$"):
            inner = re.match(r"\$([^$]+)\$", tail)
            if inner:
                return _clean_tail(inner.group(1)), "answer_is"
        # up to the end of the sentence: a period followed by a space/end (not a decimal point)
        tail = re.split(r"\.(?:\s|$)", tail)[0]
        num = _NUMBER_RE.search(tail)
        if num and not re.search(r"\\|[{}()\[\]]", tail):
            return num.group(0), "answer_is"
        if tail.strip():
            return _clean_tail(tail), "answer_is"
    m = list(re.finditer(r"####\s*([^\n]+)", text))
    if m:
        return _clean_tail(m[-1].group(1)), "gsm8k_hashes"
    nums = _NUMBER_RE.findall(text)
    if nums:
        return nums[-1], "last_number"
    return None, "none"
