"""Math correctness: extract the completion's final answer and check it against the gold answer.

Reward, per completion (``MathReward``, registered as ``"math"``):

    r = 1.0   the final answer is equivalent to the gold answer (math-verify: 0.5 == 1/2 == \\frac{1}{2})
    r = 0.0   it is not, or the completion gives no answer at all
    r = None  cannot judge: no gold answer in the row, a gold answer math-verify cannot parse, or the check
              ran over its time limit or crashed (the reason says which)

The final answer is, in this order of preference: the last ``\\boxed{...}`` (or ``\\fbox{...}``), the last
"The answer is ..." / "Final answer: ...", else the last number in the text.

Why a separate process: math-verify turns answers into sympy expressions, and some inputs (``9^{9^{9}}``)
make sympy run for minutes inside C code that no Python signal can interrupt; its own signal-based time
limits also only work on the main thread. So we disable them and run the check in a long-lived worker
process that we kill and restart when an item runs over ``timeout_s``.

Columns read: ``answer`` (the gold answer; another column with ``answer_column=...``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reward.base import Prompt, RewardOutput
from reward.compose import register_reward

logger = logging.getLogger(__name__)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced (answers like \\frac{1}{2} nest them)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def _clean(answer: str) -> str:
    # Markdown bold, $...$ or \(...\) and a sentence's final period wrap answers but are not part of them.
    previous = None
    while answer != previous:
        previous = answer
        answer = answer.strip().strip("*").rstrip(".").strip()
        for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(answer) > len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
                answer = answer[len(left) : -len(right)]
    return answer


def extract_final_answer(text: str) -> tuple[str | None, str | None]:
    """(answer, how) with how in {"boxed", "answer_is", "last_number"}, or (None, None) if there is none."""
    boxed = _last_boxed(text)
    if boxed:
        return boxed, "boxed"
    said = [m.group(1) for m in _ANSWER_IS.finditer(text)]
    if said:
        answer = _clean(said[-1].splitlines()[0])
        if answer:
            return answer, "answer_is"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1], "last_number"
    return None, None


# --------------------------------------------------------------------------------------------------------
# The verifier worker: runs in its own process (see the module docstring).
# --------------------------------------------------------------------------------------------------------


def _worker_loop() -> None:
    """Read {"gold", "pred"} lines on stdin, answer {"equal"} or {"error"} lines on stdout."""
    logging.disable(logging.WARNING)  # math-verify warns once that its timeouts are off: we know
    from math_verify import parse, verify

    def parse_any(s: str) -> list:
        if "$" in s or "\\boxed" in s:
            return parse(s, parsing_timeout=None)
        # Bare LaTeX (x+1, \sqrt{2}) only parses between dollars; plain "1,000" parses either way.
        return parse(f"${s}$", parsing_timeout=None) or parse(s, parsing_timeout=None)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold = parse_any(request["gold"])
            if not gold:
                reply = {"error": f"math-verify cannot parse the gold answer {request['gold']!r}"}
            else:
                pred = parse_any(request["pred"])
                reply = {"equal": bool(pred) and verify(gold, pred, timeout_seconds=None)}
        except Exception as e:  # noqa: BLE001 - one bad item must not end the worker
            reply = {"error": f"math-verify raised {type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.stdin.close()
    proc.stdout.close()


class _VerifyWorker:
    """The parent's handle on the worker: one request at a time, each with a deadline."""

    def __init__(self, startup_timeout_s: float = 120.0) -> None:
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._stop = None  # a weakref.finalize that kills the worker, also when we are garbage-collected
        self._buffer = b""
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._stop is not None:
            self._stop()
        self._proc, self._stop, self._buffer = None, None, b""

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parents[1])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        cmd = [sys.executable, "-c", "from reward.math_reward import _worker_loop; _worker_loop()"]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._stop = weakref.finalize(self, _stop, self._proc)
        if self._read_line(time.monotonic() + self.startup_timeout_s) != {"ready": True}:
            self.close()
            raise RuntimeError(f"the math-verify worker did not start within {self.startup_timeout_s:g} s")

    def _read_line(self, deadline: float) -> dict | None:
        """One JSON line from the worker, or None on timeout or if it died."""
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def check(self, gold: str, pred: str, timeout_s: float) -> dict:
        """{"equal": bool} | {"error": str} | {"timeout": True}; restarts the worker after a timeout."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self.close()
                try:
                    self._start()
                except (OSError, RuntimeError) as e:
                    return {"error": f"cannot start the math-verify worker: {e}"}
            self._proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
            self._proc.stdin.flush()
            reply = self._read_line(time.monotonic() + timeout_s)
            if reply is None:
                died = self._proc.poll() is not None
                self.close()
                return {"error": "the math-verify worker died"} if died else {"timeout": True}
            return reply


@register_reward("math")
class MathReward:
    """1.0 when the final answer is equivalent to the gold answer, else 0.0; None when it cannot judge."""

    name = "math"

    def __init__(self, answer_column: str = "answer", timeout_s: float = 5.0) -> None:
        if not isinstance(answer_column, str) or not answer_column:
            raise ValueError(f"MathReward: answer_column must be a column name, got {answer_column!r}")
        if not isinstance(timeout_s, int | float) or timeout_s <= 0:
            raise ValueError(f"MathReward: timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.answer_column = answer_column
        self.timeout_s = float(timeout_s)
        self._worker = _VerifyWorker()

    def close(self) -> None:
        self._worker.close()

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[str], **columns: Sequence[Any]
    ) -> RewardOutput:
        golds = columns.get(self.answer_column)
        if golds is None:
            reason = f"no column {self.answer_column!r} with the gold answers (columns: {sorted(columns)})"
            return RewardOutput([None] * len(completions), [reason] * len(completions))
        if len(golds) != len(completions):
            raise ValueError(f"MathReward: {len(completions)} completions but {len(golds)} gold answers")
        scores, reasons, details = [], [], []
        for completion, gold in zip(completions, golds):
            score, reason, detail = self.score_one(completion, gold)
            scores.append(score)
            reasons.append(reason)
            details.append(detail)
        return RewardOutput(scores, reasons, details)

    def score_one(self, completion: str, gold: Any) -> tuple[float | None, str | None, dict]:
        if gold is None or not str(gold).strip():
            return None, "the row has no gold answer", {}
        gold = str(gold).strip()
        answer, how = extract_final_answer(completion or "")
        detail = {"extracted": answer, "how": how, "gold": gold}
        if answer is None:
            return 0.0, None, detail
        if answer == gold:  # no need for sympy to tell that "42" is "42"
            return 1.0, None, detail
        reply = self._worker.check(gold, answer, self.timeout_s)
        if "equal" in reply:
            return float(reply["equal"]), None, detail
        if reply.get("timeout"):
            return None, f"math-verify ran over {self.timeout_s:g} s", detail
        return None, reply["error"], detail


@register_reward("format_boxed")
class BoxedFormatReward:
    """r = 1.0 if the completion puts a non-empty final answer in \\boxed{...}, else 0.0."""

    name = "format_boxed"

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[str], **columns: Sequence[Any]
    ) -> RewardOutput:
        return RewardOutput([float(bool(_last_boxed(c or ""))) for c in completions])
