"""Human ranking round trip with Label Studio: answers out as tasks, rankings back as SFT and preference data.

Input rows hold several answers per prompt, from different models or sampling settings::

    {"id": "q1", "prompt": [{"role": "user", "content": "..."}],
     "answers": [{"text": "...", "source": "smollm2/t0.8"}, ...], ...other columns}

The round trip, by hand (Label Studio lives in its own venv: its pins conflict with the training stack)::

    python -m data_synthesis.label_studio export answers.jsonl outputs/ls/tasks.json
    python3 -m venv ~/.cache/alignment/label-studio-venv
    ~/.cache/alignment/label-studio-venv/bin/pip install -r requirements/label-studio.txt
    ~/.cache/alignment/label-studio-venv/bin/label-studio start --no-browser
    # In the browser: Create Project > Labeling Setup > Custom template > Code: paste
    # data_synthesis/label_studio_ranking.xml; Data Import: outputs/ls/tasks.json. Annotators drag the answers
    # best first and Submit (or Skip a task they cannot judge). Export > JSON (not JSON-MIN: it drops meta).
    python -m data_synthesis.label_studio import answers.jsonl export.json outputs/ls --pairs all

or over the API of a running server with ``LabelStudioClient(url, token)``: ``create_project``,
``import_tasks(project, to_tasks(rows))``, then (after the annotators) ``export_json(project)`` and
``read_export`` / ``rankings_to_data``. ``import`` writes ``sft.jsonl`` (``messages``: the prompt and the top
answer), ``preference.jsonl`` (``prompt``, ``chosen``, ``rejected``) and ``stats.json`` into OUT_DIR.

The labelling config (``label_studio_ranking.xml``) uses ``<List>`` with ``<Ranker>``: the annotator drags
the answers into one order and Label Studio saves ``{"type": "ranker", "from_name": "rank", "to_name":
"answers", "value": {"ranker": {"rank": [ids, best first]}}}``. Checked against label-studio 1.23.2: the tags
ship in its editor (``tags/control/Ranker.jsx``, ``tags/object/List.jsx``), its server parses the config as
a Ranker over a List (it accepts unknown tags too, so that alone proves little), and in Chromium the page
showed the prompt and the answers (line breaks kept), a keyboard drag reordered them and Submit saved the
result above. A per-answer ``<Rating>`` was not needed. A plain Ranker (no ``<Bucket>``) gives a strict
order, so the shipped config has no ties.

Blind ranking: the answers are shown in a seeded shuffled order under opaque ids (the Ranker prints each
item's id), titled "Answer 1..n"; the row id, each answer's index in the row and its source go into the
task's ``meta``, which Label Studio keeps, exports and never shows in the labelling view.

What Label Studio does that the reader must know: when an annotator submits without dragging anything, the
Ranker saves the order shown. That cannot be told apart from a ranking that agrees with it; ``read_export``
counts such rankings (``same_as_shown``; by chance 1 in n! of them), and the shuffle keeps that noise
unbiased between sources.

Rules in ``read_export``: a task without annotations or whose annotations are all cancelled (skipped) is
counted and left out; with several annotations the latest non-cancelled one (by ``updated_at``, then id) is
used and a note says so; anything else wrong (no ranker result, an unknown or missing answer id, a task
without our meta) raises ``RoundTripError`` naming the file, the task and the field. In ``rankings_to_data``,
an answer byte-identical to a better-ranked one is dropped before pairing (counted), so identical answers never
form a pair and never contradict each other.

Deliberate simplifications: one annotation per task is used (no aggregation across annotators); the client
covers the few API calls the round trip needs, with the standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_PATH = Path(__file__).with_name("label_studio_ranking.xml")
LABEL_CONFIG: str = CONFIG_PATH.read_text(encoding="utf-8")
# Names in LABEL_CONFIG that the export refers to.
RANKER_NAME = "rank"
LIST_NAME = "answers"

Pairs = Literal["all", "best_worst"]


class RoundTripError(ValueError):
    """Bad rows or a bad export. The message names the file, the row or task, and the field."""


# ---------------------------------------------------------------------------------------------------------
# Rows -> tasks
# ---------------------------------------------------------------------------------------------------------


def check_rows(rows: Sequence[dict], where: str = "rows") -> None:
    """Every row has a unique ``id``, a ``prompt`` list of messages and at least two ``answers`` with text."""
    seen: dict[Any, int] = {}
    for i, row in enumerate(rows, 1):
        at = f"{where}: row {i}"
        if not isinstance(row, dict):
            raise RoundTripError(f"{at}: expected a JSON object, got {type(row).__name__}")
        rid = row.get("id")
        if not isinstance(rid, str | int) or isinstance(rid, bool) or rid == "":
            raise RoundTripError(f"{at}: field 'id': expected a non-empty string or integer, got {rid!r}")
        if rid in seen:
            raise RoundTripError(f"{at}: field 'id': {rid!r} repeats row {seen[rid]}; row ids must be unique")
        seen[rid] = i
        prompt = row.get("prompt")
        if not isinstance(prompt, list) or not prompt:
            raise RoundTripError(f"{at}: field 'prompt': expected a non-empty list of messages")
        for j, m in enumerate(prompt):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise RoundTripError(f"{at}: field 'prompt[{j}]': expected {{'role': str, 'content': str}}")
        answers = row.get("answers")
        if not isinstance(answers, list) or len(answers) < 2:
            raise RoundTripError(f"{at}: field 'answers': expected a list of at least 2 answers to rank")
        for j, a in enumerate(answers):
            if not (isinstance(a, dict) and isinstance(a.get("text"), str)):
                raise RoundTripError(f"{at}: field 'answers[{j}].text': expected a string")
            if not isinstance(a.get("source", ""), str):
                raise RoundTripError(f"{at}: field 'answers[{j}].source': expected a string")


def render_prompt(prompt: list[dict]) -> str:
    """The prompt as the annotator reads it: a lone user turn as is, otherwise each turn under its role."""
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in prompt)


def _opaque_ids(row_id: str | int, n: int, seed: int) -> list[str]:
    """Short ids that say nothing about an answer's position or source (the Ranker shows them)."""
    ids = [hashlib.sha256(f"{seed}\0{row_id}\0{i}".encode()).hexdigest()[:8] for i in range(n)]
    if len(set(ids)) != n:  # 8 hex digits: about one row in 10^8 with 10 answers
        ids = [f"{x}{i}" for i, x in enumerate(ids)]
    return ids


def to_tasks(rows: Sequence[dict], seed: int = 0, where: str = "rows") -> list[dict]:
    """Label Studio import-format tasks, one per row, for ``LABEL_CONFIG``.

    ``data`` holds what the annotator sees: ``row_id``, the rendered ``prompt`` and ``answers`` as List items
    ``{"id", "title", "body"}`` in a shuffled order (seeded by ``seed`` and the row id). ``meta`` holds what
    maps a ranking back and must stay hidden: the row id, per answer id its index in the row and its source,
    and the order shown."""
    check_rows(rows, where)
    tasks = []
    for row in rows:
        answers = row["answers"]
        ids = _opaque_ids(row["id"], len(answers), seed)
        shown = list(range(len(answers)))
        random.Random(f"{seed}\0{row['id']}").shuffle(shown)
        items = [
            {"id": ids[i], "title": f"Answer {k}", "body": answers[i]["text"]} for k, i in enumerate(shown, 1)
        ]
        meta = {
            "row_id": row["id"],
            "answers": {ids[i]: {"index": i, "source": a.get("source", "")} for i, a in enumerate(answers)},
            "shown": [ids[i] for i in shown],
        }
        tasks.append(
            {
                "data": {"row_id": row["id"], "prompt": render_prompt(row["prompt"]), LIST_NAME: items},
                "meta": meta,
            }
        )
    return tasks


# ---------------------------------------------------------------------------------------------------------
# Export -> rankings
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankedAnswer:
    index: int  # position in the row's ``answers``
    text: str  # as shown to the annotator
    source: str


@dataclass(frozen=True)
class Ranking:
    """One task's ranking, best first (a strict order: the shipped config has no ties)."""

    row_id: str | int
    answers: tuple[RankedAnswer, ...]
    task: int  # 1-based position in the export
    task_id: Any  # Label Studio's task id
    annotation_id: Any


@dataclass
class ExportReading:
    rankings: list[Ranking]
    # tasks, ranked, unannotated, cancelled (all annotations cancelled), several_annotations, same_as_shown
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)  # one line per task where a choice was made


def _latest(annotations: list[dict]) -> dict:
    return max(
        annotations, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0)
    )


def _ranker_ids(ann: dict, at: str) -> list:
    """The ids in the annotation's one ``ranker`` result from ``RANKER_NAME``; anything else raises."""
    result = ann.get("result")
    if not isinstance(result, list):
        raise RoundTripError(f"{at}: field 'result': expected a list, got {type(result).__name__}")
    hits = [
        (k, r)
        for k, r in enumerate(result)
        if isinstance(r, dict) and r.get("type") == "ranker" and r.get("from_name") == RANKER_NAME
    ]
    if len(hits) != 1:
        raise RoundTripError(
            f"{at}: field 'result': expected one 'ranker' result from {RANKER_NAME!r}, found {len(hits)} "
            "(was the project set up with data_synthesis/label_studio_ranking.xml?)"
        )
    k, r = hits[0]
    ranker = r.get("value", {}).get("ranker") if isinstance(r.get("value"), dict) else None
    if not isinstance(ranker, dict) or set(ranker) != {RANKER_NAME}:
        got = sorted(ranker) if isinstance(ranker, dict) else ranker
        raise RoundTripError(
            f"{at}: field 'result[{k}].value.ranker': expected one key {RANKER_NAME!r}, got {got!r} "
            "(buckets are not part of the shipped config)"
        )
    ids = ranker[RANKER_NAME]
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
        raise RoundTripError(f"{at}: field 'result[{k}].value.ranker.{RANKER_NAME}': expected a list of ids")
    return ids


def _task_answers(task: dict, at: str) -> tuple[Any, dict[str, dict], dict[str, str], list]:
    """Row id, per answer id its meta entry, per answer id its shown text, and the order shown."""
    meta, data = task.get("meta"), task.get("data")
    if not isinstance(data, dict) or not isinstance(data.get(LIST_NAME), list):
        raise RoundTripError(f"{at}: field 'data.{LIST_NAME}': missing; not a task made by to_tasks")
    if not isinstance(meta, dict) or not isinstance(meta.get("answers"), dict) or "row_id" not in meta:
        raise RoundTripError(
            f"{at}: field 'meta': missing row_id or answers; export with Label Studio's JSON format (JSON-MIN "
            "and CSV drop meta) from tasks made by to_tasks"
        )
    texts = {}
    for j, item in enumerate(data[LIST_NAME]):
        if not (
            isinstance(item, dict) and isinstance(item.get("id"), str) and isinstance(item.get("body"), str)
        ):
            raise RoundTripError(f"{at}: field 'data.{LIST_NAME}[{j}]': expected {{'id': str, 'body': str}}")
        texts[item["id"]] = item["body"]
    if set(texts) != set(meta["answers"]):
        raise RoundTripError(f"{at}: field 'meta.answers': its ids differ from those in data.{LIST_NAME}")
    for x, entry in meta["answers"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("index"), int)):
            raise RoundTripError(f"{at}: field 'meta.answers.{x}': expected {{'index': int, 'source': str}}")
    return meta["row_id"], meta["answers"], texts, meta.get("shown", [])


def read_export(export: str | Path | list[dict]) -> ExportReading:
    """Rankings from Label Studio's JSON export (a path, or the list already loaded), in export order."""
    where = str(export) if isinstance(export, str | Path) else "export"
    if isinstance(export, str | Path):
        try:
            export = json.loads(Path(export).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RoundTripError(f"{where}: not JSON ({e})") from None
    if not isinstance(export, list):
        raise RoundTripError(f"{where}: expected a list of tasks (Label Studio's JSON export)")
    counts = dict.fromkeys(
        ("tasks", "ranked", "unannotated", "cancelled", "several_annotations", "same_as_shown"), 0
    )
    counts["tasks"] = len(export)
    rankings, notes = [], []
    for t, task in enumerate(export, 1):
        if not isinstance(task, dict):
            raise RoundTripError(f"{where}: task {t}: expected a JSON object")
        at = f"{where}: task {t} (id {task.get('id')})"
        row_id, meta_answers, texts, shown = _task_answers(task, at)
        annotations = task.get("annotations") or []
        if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
            raise RoundTripError(f"{at}: field 'annotations': expected a list of objects")
        if not annotations:
            counts["unannotated"] += 1
            continue
        live = [a for a in annotations if not a.get("was_cancelled")]
        if not live:
            counts["cancelled"] += 1
            continue
        ann = _latest(live)
        if len(live) > 1:
            counts["several_annotations"] += 1
            notes.append(
                f"{at}: {len(live)} annotations; used annotation {ann.get('id')} (the latest by updated_at)"
            )
        at = f"{at}: annotation {ann.get('id')}"
        ids = _ranker_ids(ann, at)
        unknown = [x for x in ids if x not in meta_answers]
        if unknown:
            raise RoundTripError(
                f"{at}: field 'result.value.ranker.{RANKER_NAME}': unknown answer ids {unknown}"
            )
        if len(set(ids)) != len(ids) or len(ids) != len(meta_answers):
            missing = sorted(set(meta_answers) - set(ids))
            raise RoundTripError(
                f"{at}: field 'result.value.ranker.{RANKER_NAME}': expected each of the {len(meta_answers)} "
                f"answers once, got {ids} (missing {missing})"
            )
        counts["same_as_shown"] += ids == shown
        ranked = tuple(
            RankedAnswer(meta_answers[x]["index"], texts[x], meta_answers[x].get("source", "")) for x in ids
        )
        rankings.append(Ranking(row_id, ranked, t, task.get("id"), ann.get("id")))
    counts["ranked"] = len(rankings)
    return ExportReading(rankings, counts, notes)


# ---------------------------------------------------------------------------------------------------------
# Rankings -> demonstrations and preference pairs
# ---------------------------------------------------------------------------------------------------------


def ranked_pairs(texts: Sequence[str], pairs: Pairs) -> list[tuple[str, str]]:
    """(better, worse) pairs from texts ranked best first, already free of duplicates.

    ``all``: every ordered pair, n(n-1)/2 of them; ``best_worst``: the top against the bottom."""
    if pairs == "all":
        return [(texts[i], texts[j]) for i in range(len(texts)) for j in range(i + 1, len(texts))]
    if pairs == "best_worst":
        return [(texts[0], texts[-1])] if len(texts) >= 2 else []
    raise ValueError(f"pairs must be 'all' or 'best_worst', got {pairs!r}")


def rankings_to_data(
    rows: Sequence[dict], rankings: Iterable[Ranking], pairs: Pairs = "all", where: str = "rows"
) -> tuple[list[dict], list[dict], dict]:
    """Demonstrations (the top answer), preference pairs and stats from rankings of ``rows``.

    Each ranking must name a row of ``rows`` and answers whose text still equals the row's (rows changed
    since the export raise). Rows without a ranking are counted (``rows_unranked``). Other columns of a row
    (its ``id`` too) are copied into its output rows; ``prompt`` and ``answers`` are consumed."""
    if pairs not in ("all", "best_worst"):
        raise ValueError(f"pairs must be 'all' or 'best_worst', got {pairs!r}")
    check_rows(rows, where)
    by_id = {row["id"]: row for row in rows}
    sft, pref, done = [], [], set()
    stats: dict[str, Any] = dict.fromkeys(("rankings", "demos", "pairs", "duplicate_answers", "no_pair"), 0)
    top_sources: Counter[str] = Counter()
    for r in rankings:
        at = f"ranking of task {r.task} (id {r.task_id})"
        row = by_id.get(r.row_id)
        if row is None:
            raise RoundTripError(f"{at}: field 'meta.row_id': {r.row_id!r} is not a row id in {where}")
        if r.row_id in done:
            raise RoundTripError(f"{at}: row {r.row_id!r} is ranked twice (were its tasks imported twice?)")
        done.add(r.row_id)
        for a in r.answers:
            if not 0 <= a.index < len(row["answers"]) or row["answers"][a.index]["text"] != a.text:
                raise RoundTripError(
                    f"{at}: row {r.row_id!r} field 'answers[{a.index}].text': differs from the text that was "
                    f"ranked; {where} changed since the tasks were made"
                )
        texts: list[str] = []
        for a in r.answers:  # best first: a duplicate keeps its best rank
            if a.text in texts:
                stats["duplicate_answers"] += 1
            else:
                texts.append(a.text)
        extra = {
            k: v for k, v in row.items() if k not in ("prompt", "answers", "messages", "chosen", "rejected")
        }
        sft.append({"messages": [*row["prompt"], {"role": "assistant", "content": texts[0]}], **extra})
        top_sources[r.answers[0].source] += 1
        got = ranked_pairs(texts, pairs)
        stats["no_pair"] += not got
        for chosen, rejected in got:
            pref.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}], **extra})  # fmt: skip
        stats["rankings"] += 1
    stats.update(rows=len(rows), rows_unranked=len(rows) - len(done), demos=len(sft), pairs=len(pref))
    stats["pairs_mode"] = pairs
    stats["top_answer_sources"] = dict(top_sources.most_common())
    return sft, pref, stats


# ---------------------------------------------------------------------------------------------------------
# A small client for a running server
# ---------------------------------------------------------------------------------------------------------


class LabelStudioAPIError(RuntimeError):
    """A Label Studio API call failed; the message has the method, the path, the status and the reply."""


class LabelStudioClient:
    """The API calls of the round trip, over urllib.

    ``token`` is either a legacy API token (sent as ``Authorization: Token ...``; a server needs legacy tokens
    enabled, e.g. ``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true`` at its first start) or a personal access
    token (a JWT refresh token from Account & Settings, exchanged at ``/api/token/refresh/`` for a short-lived
    access token, sent as ``Bearer``; renewed once on a 401)."""

    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.personal = token.count(".") == 2  # a JWT: header.payload.signature
        self._access: str | None = None

    def _auth(self) -> str:
        if not self.personal:
            return f"Token {self.token}"
        if self._access is None:
            self._access = self.call("POST", "/api/token/refresh/", {"refresh": self.token}, auth=False)[
                "access"
            ]
        return f"Bearer {self._access}"

    def call(self, method: str, path: str, body: Any = None, auth: bool = True, retry: bool = True) -> Any:
        """One API call (any route): the parsed JSON reply; a failure raises ``LabelStudioAPIError``."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = self._auth()
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as f:
                raw = f.read()
        except urllib.error.HTTPError as e:
            if e.code == 401 and auth and self.personal and retry:  # the access token expired: renew once
                self._access = None
                return self.call(method, path, body, auth, retry=False)
            reply = e.read().decode(errors="replace")[:1000]
            raise LabelStudioAPIError(f"{method} {path}: HTTP {e.code}: {reply}") from None
        except urllib.error.URLError as e:
            raise LabelStudioAPIError(f"{method} {path}: cannot reach {self.url}: {e.reason}") from None
        return json.loads(raw) if raw else None

    def create_project(self, title: str, label_config: str = LABEL_CONFIG) -> int:
        return self.call("POST", "/api/projects", {"title": title, "label_config": label_config})["id"]

    def import_tasks(self, project: int, tasks: list[dict]) -> list[int]:
        """Import tasks (the format ``to_tasks`` makes); returns the new task ids."""
        reply = self.call("POST", f"/api/projects/{project}/import?return_task_ids=true", tasks)
        return reply["task_ids"]

    def list_tasks(self, project: int, page_size: int = 100) -> list[dict]:
        tasks: list[dict] = []
        page = 1
        while True:
            reply = self.call("GET", f"/api/tasks?project={project}&page={page}&page_size={page_size}")
            tasks += reply["tasks"]
            if not reply["tasks"] or len(tasks) >= reply["total"]:
                return tasks
            page += 1

    def submit_annotation(self, task: int, result: list[dict], was_cancelled: bool = False) -> dict:
        body = {"result": result, "was_cancelled": was_cancelled}
        return self.call("POST", f"/api/tasks/{task}/annotations", body)

    def submit_ranking(self, task: int, ids_best_first: list[str]) -> dict:
        """The annotation the Ranker of ``LABEL_CONFIG`` saves when answers are dragged into this order."""
        value = {"ranker": {RANKER_NAME: list(ids_best_first)}}
        result = [{"from_name": RANKER_NAME, "to_name": LIST_NAME, "type": "ranker", "value": value}]
        return self.submit_annotation(task, result)

    def export_json(self, project: int, all_tasks: bool = True) -> list[dict]:
        """The project's JSON export; ``all_tasks`` includes unannotated tasks (``read_export`` counts them)."""
        flag = "true" if all_tasks else "false"
        return self.call("GET", f"/api/projects/{project}/export?exportType=JSON&download_all_tasks={flag}")


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RoundTripError(f"{path}: row {i}: not JSON ({e})") from None
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m data_synthesis.label_studio", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="rows -> Label Studio tasks (import format)")
    e.add_argument("rows")
    e.add_argument("tasks")
    e.add_argument("--seed", type=int, default=0, help="seeds the shown order and the answer ids")
    i = sub.add_parser("import", help="Label Studio JSON export -> sft.jsonl, preference.jsonl, stats.json")
    i.add_argument("rows")
    i.add_argument("export")
    i.add_argument("out_dir")
    i.add_argument("--pairs", choices=["all", "best_worst"], default="all")
    args = p.parse_args(argv)

    rows = read_jsonl(args.rows)
    if args.command == "export":
        tasks = to_tasks(rows, seed=args.seed, where=args.rows)
        Path(args.tasks).parent.mkdir(parents=True, exist_ok=True)
        Path(args.tasks).write_text(json.dumps(tasks, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"[label studio] {len(tasks)} tasks -> {args.tasks}; label config: {CONFIG_PATH}")
        return {"tasks": len(tasks)}

    reading = read_export(args.export)
    for note in reading.notes:
        print(f"[label studio] note: {note}")
    sft, pref, stats = rankings_to_data(rows, reading.rankings, args.pairs, where=args.rows)
    stats = {"export": reading.counts, **stats}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "sft.jsonl", sft)
    _write_jsonl(out / "preference.jsonl", pref)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    c = reading.counts
    print(
        f"[label studio] {c['ranked']}/{c['tasks']} tasks ranked ({c['unannotated']} unannotated, "
        f"{c['cancelled']} cancelled, {c['several_annotations']} with several annotations, "
        f"{c['same_as_shown']} left in the order shown); {len(sft)} demonstrations, {len(pref)} pairs "
        f"({args.pairs}); {stats['rows_unranked']} rows unranked -> {out}"
    )
    return stats


if __name__ == "__main__":
    try:
        main()
    except (RoundTripError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
