"""The Label Studio ranking round trip: tasks out, JSON export in, SFT rows and preference pairs out.

Fast tests use hand-made rows and exports shaped like label-studio 1.23.2's JSON export; the slow test runs a
real Label Studio server (its own venv, SQLite) and goes through its API. Times seen on 2 cores: a fresh venv
installs in 70-155 s, a new server starts in 75-100 s (mostly migrating a new SQLite database), the round trip
takes a few seconds; with the venv cached the slow test takes about 85 s.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_synthesis.label_studio import (
    CONFIG_PATH,
    LABEL_CONFIG,
    LabelStudioAPIError,
    LabelStudioClient,
    RankedAnswer,
    Ranking,
    RoundTripError,
    main,
    ranked_pairs,
    rankings_to_data,
    read_export,
    render_prompt,
    to_tasks,
)
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "What is 2 + 2?"}]


def make_rows() -> list[dict]:
    return [
        {
            "id": "q1",
            "prompt": USER,
            "answers": [
                {"text": "4", "source": "model-alpha/greedy"},
                {"text": "5", "source": "model-beta/t0.8"},
                {"text": "2 + 2 = 4", "source": "model-gamma/t1.0"},
            ],
            "split": "train",
        },
        {
            "id": 7,
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
            "answers": [{"text": "Hi!", "source": "model-alpha/greedy"}, {"text": "Hello.", "source": "model-beta/t0.8"}],
        },
    ]  # fmt: skip


def ids_of(task: dict) -> dict[str, str]:
    """Answer text -> the id the annotator's Ranker saves (texts are unique in these tests)."""
    return {item["body"]: item["id"] for item in task["data"]["answers"]}


def annotation(ids: list[str] | None, ann_id: int, updated_at: str = "2026-01-01T00:00:00Z", **kw) -> dict:
    """One annotation as Label Studio exports it; ``ids=None`` makes a cancelled (skipped) one."""
    result = [] if ids is None else [
        {"from_name": "rank", "to_name": "answers", "type": "ranker", "value": {"ranker": {"rank": ids}}}
    ]  # fmt: skip
    return {"id": ann_id, "result": result, "was_cancelled": ids is None, "completed_by": 1,
            "created_at": updated_at, "updated_at": updated_at, **kw}  # fmt: skip


def exported(task: dict, task_id: int, annotations: list[dict]) -> dict:
    """A task as Label Studio's JSON export holds it: our data and meta plus its own fields."""
    return {"id": task_id, "annotations": annotations, "drafts": [], "predictions": [], "data": task["data"],
            "meta": task["meta"], "project": 1, "inner_id": task_id}  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# The shipped config
# --------------------------------------------------------------------------------------------------------


def test_label_config_is_the_shipped_file_and_fits_the_tasks():
    assert LABEL_CONFIG == CONFIG_PATH.read_text() and CONFIG_PATH.name == "label_studio_ranking.xml"
    view = ET.fromstring(LABEL_CONFIG)
    ranker, lst, text = view.find("Ranker"), view.find("List"), view.find("Text")
    assert ranker.get("name") == "rank" and ranker.get("toName") == lst.get("name") == "answers"
    assert lst.get("value") == "$answers" and text.get("value") == "$prompt"
    assert ranker.find("Bucket") is None  # a plain Ranker: one strict order, no ties
    data_keys = set(to_tasks(make_rows())[0]["data"])
    assert {lst.get("value")[1:], text.get("value")[1:]} <= data_keys


# --------------------------------------------------------------------------------------------------------
# to_tasks
# --------------------------------------------------------------------------------------------------------


def test_render_prompt():
    assert render_prompt(USER) == "What is 2 + 2?"
    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    assert render_prompt(two) == "[system]\nBe brief.\n\n[user]\nSay hi."


def test_to_tasks_maps_every_answer_back_and_keeps_the_ranking_blind():
    rows = make_rows()
    tasks = to_tasks(rows)
    assert len(tasks) == 2 and set(tasks[0]) == {"data", "meta"}
    for row, task in zip(rows, tasks):
        data, meta = task["data"], task["meta"]
        assert data["row_id"] == meta["row_id"] == row["id"]
        assert data["prompt"] == render_prompt(row["prompt"])
        items = data["answers"]
        assert [it["title"] for it in items] == [f"Answer {k}" for k in range(1, len(items) + 1)]
        assert sorted(it["body"] for it in items) == sorted(a["text"] for a in row["answers"])
        assert meta["shown"] == [it["id"] for it in items]
        for it in items:  # the hidden map leads from the shown id to the row's answer and its source
            a = row["answers"][meta["answers"][it["id"]]["index"]]
            assert a["text"] == it["body"] and meta["answers"][it["id"]]["source"] == a["source"]
        shown = json.dumps(data)
        assert "model-" not in shown and "source" not in shown  # blind: no source in what the view reads
        assert all(re.fullmatch(r"[0-9a-f]{8}", it["id"]) for it in items)  # opaque ids
    assert tasks[0]["data"]["prompt"] == "What is 2 + 2?"


def test_to_tasks_is_seeded_and_shuffles():
    rows = [
        {"id": f"r{i}", "prompt": USER, "answers": [{"text": str(k)} for k in range(4)]} for i in range(10)
    ]
    assert to_tasks(rows, seed=3) == to_tasks(rows, seed=3)
    assert to_tasks(rows, seed=3) != to_tasks(rows, seed=4)
    shown_orders = [[it["body"] for it in t["data"]["answers"]] for t in to_tasks(rows)]
    assert any(order != ["0", "1", "2", "3"] for order in shown_orders)  # not always the row's order
    assert len({o for t in to_tasks(rows) for o in [tuple(t["meta"]["shown"])]}) == 10
    # the ids say nothing about the answer's index either (the Ranker prints them)
    index_of = {x: e["index"] for t in to_tasks(rows) for x, e in t["meta"]["answers"].items()}
    assert len(index_of) == 40 and not all(x.endswith(str(i)) for x, i in index_of.items())


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": USER, "answers": [{"text": "a"}, {"text": "b"}]}, "row 2: field 'id'"),
        ({"id": "q1", "prompt": USER, "answers": [{"text": "a"}, {"text": "b"}]}, "'q1' repeats row 1"),
        ({"id": "x", "prompt": USER, "answers": [{"text": "a"}]}, "row 2: field 'answers': expected a list of at least 2"),
        ({"id": "x", "prompt": USER, "answers": [{"text": "a"}, {"txt": "b"}]}, "row 2: field 'answers[1].text'"),
        ({"id": "x", "prompt": USER, "answers": [{"text": "a"}, {"text": "b", "source": 3}]}, "'answers[1].source'"),
        ({"id": "x", "prompt": "hi", "answers": [{"text": "a"}, {"text": "b"}]}, "row 2: field 'prompt'"),
        ({"id": "x", "prompt": [{"role": "user"}], "answers": [{"text": "a"}, {"text": "b"}]}, "'prompt[0]'"),
    ],
)  # fmt: skip
def test_to_tasks_names_the_bad_row_and_field(bad, message):
    with pytest.raises(RoundTripError, match=re.escape(message)) as e:
        to_tasks([make_rows()[0], bad], where="answers.jsonl")
    assert str(e.value).startswith("answers.jsonl: row 2")


# --------------------------------------------------------------------------------------------------------
# read_export
# --------------------------------------------------------------------------------------------------------


def test_read_export_returns_the_submitted_order():
    rows = make_rows()
    tasks = to_tasks(rows)
    q1, hi = ids_of(tasks[0]), ids_of(tasks[1])
    export = [
        exported(tasks[0], 11, [annotation([q1["2 + 2 = 4"], q1["4"], q1["5"]], 1)]),
        exported(tasks[1], 12, [annotation([hi["Hello."], hi["Hi!"]], 2)]),
    ]
    reading = read_export(export)
    left_as_shown = sum(t["meta"]["shown"] == e["annotations"][0]["result"][0]["value"]["ranker"]["rank"]
                        for t, e in zip(tasks, export))  # fmt: skip
    assert reading.counts == {"tasks": 2, "ranked": 2, "unannotated": 0, "cancelled": 0,
                              "several_annotations": 0, "same_as_shown": left_as_shown}  # fmt: skip
    first, second = reading.rankings
    assert first == Ranking(
        "q1",
        (RankedAnswer(2, "2 + 2 = 4", "model-gamma/t1.0"), RankedAnswer(0, "4", "model-alpha/greedy"),
         RankedAnswer(1, "5", "model-beta/t0.8")),
        task=1, task_id=11, annotation_id=1,
    )  # fmt: skip
    assert second.row_id == 7 and [a.text for a in second.answers] == ["Hello.", "Hi!"]
    assert [a.index for a in second.answers] == [1, 0]


def test_read_export_counts_what_it_leaves_out_and_uses_the_latest_annotation():
    tasks = to_tasks(make_rows() + [{"id": "q3", "prompt": USER, "answers": [{"text": "x"}, {"text": "y"}]}])
    q1, q3 = ids_of(tasks[0]), ids_of(tasks[2])
    export = [
        exported(tasks[0], 11, []),  # never annotated
        exported(tasks[1], 12, [annotation(None, 5)]),  # skipped by the annotator
        exported(tasks[2], 13, [
            annotation([q3["x"], q3["y"]], 9, "2026-01-01T10:00:00Z"),
            annotation([q3["y"], q3["x"]], 8, "2026-01-02T10:00:00Z"),  # later, though a smaller id
            annotation(None, 10, "2026-01-03T10:00:00Z"),  # a later cancellation does not count
        ]),
        exported(tasks[0], 14, [annotation(None, 6), annotation([q1["5"], q1["4"], q1["2 + 2 = 4"]], 7)]),
    ]  # fmt: skip
    reading = read_export(export)
    assert {k: reading.counts[k] for k in ("tasks", "ranked", "unannotated", "cancelled", "several_annotations")} == {
        "tasks": 4, "ranked": 2, "unannotated": 1, "cancelled": 1, "several_annotations": 1}  # fmt: skip
    assert [r.task for r in reading.rankings] == [3, 4]
    assert [a.text for a in reading.rankings[0].answers] == ["y", "x"]
    assert reading.rankings[0].annotation_id == 8
    assert [a.text for a in reading.rankings[1].answers] == ["5", "4", "2 + 2 = 4"]
    assert len(reading.notes) == 1 and "task 3 (id 13): 2 annotations; used annotation 8" in reading.notes[0]


def test_read_export_counts_rankings_left_in_the_order_shown():
    tasks = to_tasks(make_rows())
    export = [exported(tasks[0], 1, [annotation(tasks[0]["meta"]["shown"], 1)]),
              exported(tasks[1], 2, [annotation(list(reversed(tasks[1]["meta"]["shown"])), 2)])]  # fmt: skip
    assert read_export(export).counts["same_as_shown"] == 1


def _bad_exports():
    tasks = to_tasks(make_rows())
    good = [exported(tasks[0], 11, [annotation(tasks[0]["meta"]["shown"], 1)])]
    ids = tasks[1]["meta"]["shown"]
    ranker = {"from_name": "rank", "to_name": "answers", "type": "ranker"}

    def with_task2(change) -> list[dict]:
        t = copy.deepcopy(exported(tasks[1], 12, [annotation(list(ids), 2)]))
        change(t)
        return good + [t]

    return [
        (with_task2(lambda t: t["annotations"][0]["result"][0]["value"]["ranker"]["rank"].append("deadbeef")),
         "field 'result.value.ranker.rank': unknown answer ids ['deadbeef']"),
        (with_task2(lambda t: t["annotations"][0]["result"][0]["value"]["ranker"]["rank"].pop()),
         f"expected each of the 2 answers once, got ['{ids[0]}'] (missing ['{ids[1]}'])"),
        (with_task2(lambda t: t["annotations"][0]["result"][0]["value"]["ranker"]["rank"].__setitem__(1, ids[0])),
         "expected each of the 2 answers once"),
        (with_task2(lambda t: t["annotations"][0].__setitem__("result", [])),
         "field 'result': expected one 'ranker' result from 'rank', found 0"),
        (with_task2(lambda t: t["annotations"][0]["result"][0].__setitem__("from_name", "other")),
         "found 0"),
        (with_task2(lambda t: t["annotations"][0]["result"].append(dict(t["annotations"][0]["result"][0]))),
         "found 2"),
        (with_task2(lambda t: t["annotations"][0]["result"][0].__setitem__(
            "value", {"ranker": {"best": ids[:1], "_": ids[1:]}})),
         "field 'result[0].value.ranker': expected one key 'rank', got ['_', 'best']"),
        (with_task2(lambda t: t["annotations"][0]["result"][0]["value"]["ranker"].__setitem__("_", [])),
         "expected one key 'rank', got ['_', 'rank']"),
        (with_task2(lambda t: t["annotations"][0]["result"][0].__setitem__("value", {"ranker": {"rank": "a b"}})),
         "field 'result[0].value.ranker.rank': expected a list of ids"),
        (with_task2(lambda t: t["annotations"][0].__setitem__("result", {"x": 1})),
         "field 'result': expected a list"),
        (with_task2(lambda t: t.pop("meta")), "field 'meta': missing row_id or answers"),
        (with_task2(lambda t: t["meta"]["answers"].pop(ids[0])), "field 'meta.answers': its ids differ"),
        (with_task2(lambda t: t["meta"]["answers"][ids[0]].__setitem__("index", "0")),
         f"field 'meta.answers.{ids[0]}'"),
        (with_task2(lambda t: t["data"].pop("answers")), "field 'data.answers': missing"),
        (with_task2(lambda t: t.__setitem__("annotations", {"a": 1})), "field 'annotations'"),
        (good + [[ranker]], "task 2: expected a JSON object"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_exports())))
def test_read_export_names_the_file_task_and_field(tmp_path, case):
    export, message = _bad_exports()[case]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    with pytest.raises(RoundTripError, match=re.escape(message)) as e:
        read_export(path)
    assert str(e.value).startswith(f"{path}: task 2")


def test_read_export_rejects_a_file_that_is_not_an_export(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(RoundTripError, match=r"a\.json: not JSON"):
        read_export(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"tasks": []}')
    with pytest.raises(RoundTripError, match=r"b\.json: expected a list of tasks"):
        read_export(str(tmp_path / "b.json"))


# --------------------------------------------------------------------------------------------------------
# rankings_to_data
# --------------------------------------------------------------------------------------------------------


def ranking(row_id, texts: list[str], task: int = 1, indices: list[int] | None = None) -> Ranking:
    indices = indices if indices is not None else list(range(len(texts)))
    answers = tuple(RankedAnswer(i, t, f"src{i}") for i, t in zip(indices, texts))
    return Ranking(row_id, answers, task, 100 + task, 200 + task)


ROW = {
    "id": "r",
    "prompt": USER,
    "answers": [{"text": "A"}, {"text": "B"}, {"text": "C"}, {"text": "D"}],
    "lang": "en",
}


def test_ranked_pairs():
    assert ranked_pairs(["A", "B", "C", "D"], "all") == [
        ("A", "B"), ("A", "C"), ("A", "D"), ("B", "C"), ("B", "D"), ("C", "D")]  # fmt: skip
    assert ranked_pairs(["A", "B", "C", "D"], "best_worst") == [("A", "D")]
    assert ranked_pairs(["A"], "all") == [] and ranked_pairs(["A"], "best_worst") == []
    with pytest.raises(ValueError, match="'all' or 'best_worst'"):
        ranked_pairs(["A", "B"], "some")


def test_rankings_to_data_all_pairs_and_best_worst():
    r = ranking("r", ["C", "A", "D", "B"], indices=[2, 0, 3, 1])
    sft, pref, stats = rankings_to_data([ROW], [r], "all")
    assert sft == [{"messages": [*USER, {"role": "assistant", "content": "C"}], "id": "r", "lang": "en"}]
    got = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pref]
    assert got == [("C", "A"), ("C", "D"), ("C", "B"), ("A", "D"), ("A", "B"), ("D", "B")]
    assert pref[0] == {"prompt": USER, "chosen": [{"role": "assistant", "content": "C"}],
                       "rejected": [{"role": "assistant", "content": "A"}], "id": "r", "lang": "en"}  # fmt: skip
    assert stats["pairs"] == 6 and stats["demos"] == 1 and stats["top_answer_sources"] == {"src2": 1}
    _, pref, stats = rankings_to_data([ROW], [r], "best_worst")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pref] == [("C", "B")]
    assert stats["pairs"] == 1 and stats["pairs_mode"] == "best_worst"


def test_identical_answers_never_form_a_pair_nor_contradict():
    row = {"id": "d", "prompt": USER, "answers": [{"text": "A"}, {"text": "B"}, {"text": "A"}]}
    # B > A > A: the copy of A ranked last is dropped, not paired with B a second time
    _, pref, stats = rankings_to_data([row], [ranking("d", ["B", "A", "A"], indices=[1, 0, 2])], "all")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pref] == [("B", "A")]
    assert stats["duplicate_answers"] == 1
    # A > B > A: the later copy would say B beats A; it is dropped
    _, pref, _ = rankings_to_data([row], [ranking("d", ["A", "B", "A"], indices=[0, 1, 2])], "best_worst")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pref] == [("A", "B")]
    same = {"id": "s", "prompt": USER, "answers": [{"text": "A"}, {"text": "A"}]}
    sft, pref, stats = rankings_to_data([same], [ranking("s", ["A", "A"])], "all")
    assert pref == [] and len(sft) == 1 and stats["no_pair"] == 1


def test_rankings_to_data_counts_unranked_rows():
    other = {**ROW, "id": "other"}
    _, _, stats = rankings_to_data([ROW, other], [ranking("r", ["A", "B", "C", "D"])], "all")
    assert stats["rows"] == 2 and stats["rows_unranked"] == 1 and stats["rankings"] == 1


@pytest.mark.parametrize(
    "rankings, message",
    [
        ([ranking("nope", ["A", "B", "C", "D"], task=3)], "ranking of task 3 (id 103): field 'meta.row_id': 'nope' is not a row id in rows.jsonl"),
        ([ranking("r", ["A", "B", "C", "X"])], "row 'r' field 'answers[3].text': differs"),
        ([ranking("r", ["A", "B", "C", "D"], indices=[0, 1, 2, 9])], "field 'answers[9].text'"),
        ([ranking("r", ["A", "B", "C", "D"]), ranking("r", ["A", "B", "C", "D"], task=2)], "ranked twice"),
    ],
)  # fmt: skip
def test_rankings_to_data_errors(rankings, message):
    with pytest.raises(RoundTripError, match=re.escape(message)):
        rankings_to_data([ROW], rankings, "all", where="rows.jsonl")


def test_rankings_to_data_rejects_an_unknown_pairs_mode():
    with pytest.raises(ValueError, match="'all' or 'best_worst'"):
        rankings_to_data([ROW], [], "every")


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


def test_cli_round_trip(tmp_path):
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in make_rows()))
    main(["export", str(rows_path), str(tmp_path / "out" / "tasks.json")])
    tasks = json.loads((tmp_path / "out" / "tasks.json").read_text())
    assert tasks == to_tasks(make_rows())
    q1 = ids_of(tasks[0])
    export = [exported(tasks[0], 1, [annotation([q1["4"], q1["2 + 2 = 4"], q1["5"]], 1)]),
              exported(tasks[1], 2, [annotation(None, 2)])]  # fmt: skip
    (tmp_path / "export.json").write_text(json.dumps(export))
    stats = main(["import", str(rows_path), str(tmp_path / "export.json"), str(tmp_path / "data"),
                  "--pairs", "best_worst"])  # fmt: skip
    sft = [json.loads(x) for x in (tmp_path / "data" / "sft.jsonl").read_text().splitlines()]
    pref = [json.loads(x) for x in (tmp_path / "data" / "preference.jsonl").read_text().splitlines()]
    assert sft == [{"messages": [*USER, {"role": "assistant", "content": "4"}], "id": "q1", "split": "train"}]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pref] == [("4", "5")]
    on_disk = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert on_disk == stats and on_disk["export"]["cancelled"] == 1 and on_disk["rows_unranked"] == 1


def test_cli_reports_bad_data_in_one_line(tmp_path):
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text(json.dumps({"id": "a", "prompt": USER, "answers": [{"text": "x"}]}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "data_synthesis.label_studio", "export", str(rows_path),
                           str(tmp_path / "t.json")], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"error: {rows_path}: row 1: field 'answers': expected a list of at least 2 answers to rank"
    )


# --------------------------------------------------------------------------------------------------------
# The client, against a stand-in server
# --------------------------------------------------------------------------------------------------------


class FakeLabelStudio(BaseHTTPRequestHandler):
    """Answers the few routes the client calls; records (method, path, Authorization, body)."""

    calls: list = []
    access = "access-1"

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body) -> None:
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        auth = self.headers.get("Authorization")
        self.calls.append((self.command, self.path, auth, body))
        if self.path == "/api/token/refresh/":
            return self._reply(200, {"access": self.access})
        if auth not in ("Token legacy-token", f"Bearer {self.access}"):
            return self._reply(401, {"detail": "bad token"})
        if self.path == "/api/projects" and body.get("title") == "":
            return self._reply(400, {"validation_errors": {"title": ["too short"]}})
        if self.path == "/api/projects":
            return self._reply(201, {"id": 3})
        if self.path.startswith("/api/projects/3/import"):
            return self._reply(201, {"task_count": len(body), "task_ids": [10, 11, 12]})
        if self.path.startswith("/api/tasks?project=3"):
            page = int(re.search(r"page=(\d+)", self.path).group(1))
            tasks = [{"id": 10}, {"id": 11}, {"id": 12}][(page - 1) * 2 : page * 2]
            return self._reply(200, {"total": 3, "tasks": tasks})
        if self.path.startswith("/api/tasks/") and self.path.endswith("/annotations"):
            return self._reply(201, {"id": 99, **body})
        if self.path.startswith("/api/projects/3/export"):
            return self._reply(200, [{"id": 10}])
        return self._reply(404, {"detail": "no route"})

    do_GET = do_POST = _handle


@pytest.fixture
def fake_server():
    FakeLabelStudio.calls = []
    FakeLabelStudio.access = "access-1"
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLabelStudio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_client_calls_with_a_legacy_token(fake_server):
    c = LabelStudioClient(fake_server, "legacy-token")
    assert c.create_project("ranking") == 3
    assert FakeLabelStudio.calls[-1] == ("POST", "/api/projects", "Token legacy-token",
                                         {"title": "ranking", "label_config": LABEL_CONFIG})  # fmt: skip
    tasks = to_tasks(make_rows())
    assert c.import_tasks(3, tasks) == [10, 11, 12]
    assert FakeLabelStudio.calls[-1][1] == "/api/projects/3/import?return_task_ids=true"
    assert FakeLabelStudio.calls[-1][3] == tasks
    assert [t["id"] for t in c.list_tasks(3, page_size=2)] == [10, 11, 12]  # two pages
    assert c.submit_ranking(11, ["b", "a"])["id"] == 99
    assert FakeLabelStudio.calls[-1][1:] == ("/api/tasks/11/annotations", "Token legacy-token", {
        "result": [{"from_name": "rank", "to_name": "answers", "type": "ranker",
                    "value": {"ranker": {"rank": ["b", "a"]}}}], "was_cancelled": False})  # fmt: skip
    assert c.export_json(3) == [{"id": 10}]
    assert FakeLabelStudio.calls[-1][1] == "/api/projects/3/export?exportType=JSON&download_all_tasks=true"
    with pytest.raises(LabelStudioAPIError, match=r"POST /api/projects: HTTP 400: .*too short"):
        c.create_project("")


def test_client_exchanges_a_personal_access_token_and_renews_it(fake_server):
    pat = "eyJhbGciOi.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln"
    c = LabelStudioClient(fake_server, pat)
    c.export_json(3)
    assert [x[:3] for x in FakeLabelStudio.calls] == [
        ("POST", "/api/token/refresh/", None),
        ("GET", "/api/projects/3/export?exportType=JSON&download_all_tasks=true", "Bearer access-1"),
    ]
    assert FakeLabelStudio.calls[0][3] == {"refresh": pat}
    FakeLabelStudio.access = "access-2"  # the short-lived access token expired
    FakeLabelStudio.calls = []
    c.export_json(3)
    assert [x[2] for x in FakeLabelStudio.calls] == ["Bearer access-1", None, "Bearer access-2"]
    with pytest.raises(LabelStudioAPIError, match="HTTP 401"):
        LabelStudioClient(fake_server, "wrong-token").export_json(3)


def test_client_names_an_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(
        LabelStudioAPIError, match=f"GET /api/projects/1/export.*cannot reach http://127.0.0.1:{port}"
    ):
        LabelStudioClient(f"http://127.0.0.1:{port}", "t", timeout=5).export_json(1)


# --------------------------------------------------------------------------------------------------------
# The real server
# --------------------------------------------------------------------------------------------------------

LS_VENV = Path.home() / ".cache" / "alignment" / "label-studio-venv"
LS_REQUIREMENTS = REPO / "requirements" / "label-studio.txt"


def _pinned_version() -> str:
    pins = re.findall(r"^label-studio==(\S+)", LS_REQUIREMENTS.read_text(), flags=re.M)
    assert len(pins) == 1, f"{LS_REQUIREMENTS}: expected one label-studio==VERSION pin"
    return pins[0]


def _installed_version() -> str | None:
    python = LS_VENV / "bin" / "python"
    if not python.exists():
        return None
    proc = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
                          capture_output=True, text=True)  # fmt: skip
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_label_studio_venv() -> Path:
    """The venv with the pinned Label Studio: reused when it has the pin, else (re)built from PyPI."""
    pin = _pinned_version()
    if _installed_version() == pin:
        return LS_VENV / "bin" / "label-studio"
    if not (LS_VENV / "bin" / "pip").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(LS_VENV)], check=True)
    pip = str(LS_VENV / "bin" / "pip")
    probe = subprocess.run(
        [pip, "index", "versions", "label-studio"], capture_output=True, text=True, timeout=120
    )
    if probe.returncode != 0:
        pytest.skip(f"PyPI cannot be reached to install label-studio=={pin}: {probe.stderr.strip()[-300:]}")
    assert pin in probe.stdout, f"label-studio=={pin} is not on the index: {probe.stdout.strip()}"
    t0 = time.perf_counter()
    proc = subprocess.run([pip, "install", "-q", "-r", str(LS_REQUIREMENTS)], capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"[label studio] installed label-studio=={pin} into {LS_VENV} in {time.perf_counter() - t0:.0f} s")
    assert _installed_version() == pin
    return LS_VENV / "bin" / "label-studio"


@pytest.fixture
def label_studio_server(tmp_path):
    """A fresh Label Studio on SQLite in tmp_path, with a preset user and legacy API token; yields (url, token)."""
    exe = ensure_label_studio_venv()
    port, token = free_port(), "test-token-0123456789abcdef0123456789"
    data_dir = tmp_path / "ls-data"
    data_dir.mkdir()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),  # database and media here, not in ~/.local/share
        "LABEL_STUDIO_USERNAME": "ranker@example.com",
        "LABEL_STUDIO_PASSWORD": "ranker-password-1",
        "LABEL_STUDIO_USER_TOKEN": token,
        # 1.23 sends the preset token as a legacy token: the organization must allow those
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
    }
    log = open(tmp_path / "label-studio.log", "w")
    cmd = [str(exe), "start", "--no-browser", "--data-dir", str(data_dir), "--port", str(port),
           "--internal-host", "127.0.0.1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    try:
        while True:  # the first start migrates a new SQLite database: about two minutes on 2 cores
            if proc.poll() is not None:
                pytest.fail(
                    f"label-studio exited with {proc.returncode}:\n{_tail(tmp_path / 'label-studio.log')}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > 600:
                pytest.fail(
                    f"label-studio not up on {url} after 600 s:\n{_tail(tmp_path / 'label-studio.log')}"
                )
            time.sleep(2)
        print(f"[label studio] server up on {url} after {time.perf_counter() - t0:.0f} s")
        yield url, token
    finally:
        os.killpg(proc.pid, 15)  # its own session: the server and anything it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def _tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-40:])


@pytest.mark.slow
def test_round_trip_through_a_real_label_studio(label_studio_server):
    url, token = label_studio_server
    t0 = time.perf_counter()
    client = LabelStudioClient(url, token)
    project = client.create_project("Rank answers (test)")
    parsed = client.call("GET", f"/api/projects/{project}")["parsed_label_config"]
    assert parsed["rank"]["type"] == "Ranker" and parsed["rank"]["to_name"] == ["answers"]
    assert parsed["rank"]["inputs"] == [{"type": "List", "valueType": None, "value": "answers"}]

    rows = make_rows() + [
        {"id": "q3", "prompt": USER, "answers": [{"text": "four", "source": "a"}, {"text": "4", "source": "b"},
                                                {"text": "four", "source": "c"}, {"text": "22", "source": "d"}]},
        {"id": "skipped", "prompt": USER, "answers": [{"text": "x"}, {"text": "y"}]},
        {"id": "untouched", "prompt": USER, "answers": [{"text": "x"}, {"text": "y"}]},
    ]  # fmt: skip
    task_ids = client.import_tasks(project, to_tasks(rows))
    assert len(task_ids) == 5
    tasks = {t["data"]["row_id"]: t for t in client.list_tasks(project, page_size=2)}
    assert set(tasks) == {"q1", 7, "q3", "skipped", "untouched"} and tasks["q1"]["meta"]["answers"]

    def ids(row_id, texts: list[str]) -> list[str]:
        by_text = {it["body"]: it["id"] for it in tasks[row_id]["data"]["answers"]}
        return [by_text[t] for t in texts]

    client.submit_ranking(tasks["q1"]["id"], ids("q1", ["2 + 2 = 4", "4", "5"]))
    client.submit_ranking(tasks[7]["id"], ids(7, ["Hi!", "Hello."]))
    client.submit_ranking(tasks[7]["id"], ids(7, ["Hello.", "Hi!"]))  # a second opinion, later: it wins
    q3 = [it["id"] for it in tasks["q3"]["data"]["answers"] if it["body"] == "four"]
    (four_a, four_b), (id4,), (id22,) = q3, ids("q3", ["4"]), ids("q3", ["22"])
    client.submit_ranking(tasks["q3"]["id"], [four_a, id22, four_b, id4])
    client.submit_annotation(tasks["skipped"]["id"], [], was_cancelled=True)

    # Export with a personal access token (JWT), the other way a user authenticates
    pat = client.call("POST", "/api/token/", {})["token"]
    export = LabelStudioClient(url, pat).export_json(project)
    reading = read_export(export)
    assert reading.counts == {"tasks": 5, "ranked": 3, "unannotated": 1, "cancelled": 1,
                              "several_annotations": 1, "same_as_shown": reading.counts["same_as_shown"]}  # fmt: skip
    got = {r.row_id: [a.text for a in r.answers] for r in reading.rankings}
    assert got == {"q1": ["2 + 2 = 4", "4", "5"], 7: ["Hello.", "Hi!"], "q3": ["four", "22", "four", "4"]}
    assert [a.source for a in reading.rankings[0].answers] == ["model-gamma/t1.0", "model-alpha/greedy",
                                                               "model-beta/t0.8"]  # fmt: skip

    sft, pref, stats = rankings_to_data(rows, reading.rankings, "all")
    assert [s["messages"][-1]["content"] for s in sft] == ["2 + 2 = 4", "Hello.", "four"]
    assert [(p["id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pref] == [
        ("q1", "2 + 2 = 4", "4"), ("q1", "2 + 2 = 4", "5"), ("q1", "4", "5"), (7, "Hello.", "Hi!"),
        ("q3", "four", "22"), ("q3", "four", "4"), ("q3", "22", "4"),
    ]  # fmt: skip
    assert stats["duplicate_answers"] == 1 and stats["rows_unranked"] == 2
    _, pref, _ = rankings_to_data(rows, reading.rankings, "best_worst")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pref] == [
        ("2 + 2 = 4", "5"), ("Hello.", "Hi!"), ("four", "4")]  # fmt: skip
    print(f"[label studio] round trip through the API in {time.perf_counter() - t0:.1f} s")
