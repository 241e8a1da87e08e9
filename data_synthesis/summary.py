"""One table of what every synthesis run made: ``python -m data_synthesis.summary [outputs/data]``.

Reads each ``<dir>/*/stats.json`` the runner wrote and prints a Markdown table: rows in and out, the files
written, why rows were dropped, why items of rows (solutions, tests, functions, cases, answers) were dropped,
samples generated and taken from the cache, and seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(root: str | Path) -> str:
    lines = ["| pipeline | rows in | rows out | written | rows dropped (by reason) | items dropped (by reason) | "
             "samples (cached) | seconds |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for path in sorted(Path(root).glob("*/stats.json")):
        s = json.loads(path.read_text())
        written = ", ".join(f"{k} {v}" for k, v in s.get("files", {}).items())
        dropped, items = (
            ", ".join(f"{k} {v}" for k, v in sorted(s.get(key, {}).items(), key=lambda kv: -kv[1])) or "-"
            for key in ("dropped", "dropped_items")
        )
        lines.append(f"| {s.get('pipeline', path.parent.name)} | {s.get('rows_in')} | {s.get('rows_out')} | "
                     f"{written} | {dropped} | {items} | {s.get('generated_samples', 0)} ({s.get('cached_samples', 0)}) | "
                     f"{s.get('seconds', 0):.0f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "outputs/data"))
