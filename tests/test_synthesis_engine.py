"""The data-synthesis engine: records, column checks, drop accounting, the generation cache (kill -9 included),
the OpenAI-compatible backend's retries and concurrency, the runner and its recipe errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alignment.config import ConfigError
from alignment.data import DataError
from alignment.generation import GenerationConfig, SamplingConfig
from data_synthesis.backends import BackendConfig, EndpointError, OpenAIBackend, ScriptedBackend
from data_synthesis.engine import (
    Context,
    Generate,
    GenerationCache,
    Instruction,
    Map,
    Pipeline,
    Record,
    Step,
    parse_json_answer,
    read_rows,
    render,
    template_fields,
)
from data_synthesis.runner import PIPELINES, load_recipe, pipeline_module

ROOT = Path(__file__).resolve().parents[1]
ECHO = [{"role": "user", "content": "Say: {instruction}"}]


def echo(conv, j):
    return f"{conv[-1]['content']} #{j}"


def records(n: int) -> list[Record]:
    return [Record(f"r{i}", {"instruction": f"row {i}"}) for i in range(n)]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_rows_names_file_and_row(tmp_path):
    good = write_rows(tmp_path / "a.jsonl", [{"id": "x", "prompt": "hi"}, {"prompt": "yo"}])
    recs = read_rows(good)
    assert [r.id for r in recs] == ["x", "a:2"] and recs[1].data == {"prompt": "yo"}
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"b.jsonl: row 2: not valid JSON"):
        read_rows(bad)
    write_rows(tmp_path / "c.jsonl", [{"prompt": "ok"}, ["not", "an", "object"]])
    with pytest.raises(DataError, match=r"c.jsonl: row 2: a row is a JSON object"):
        read_rows(tmp_path / "c.jsonl")


def test_template_fields_and_render():
    assert template_fields([{"role": "user", "content": "{a} and {b} but {{not}}"}]) == {"a", "b"}
    with pytest.raises(ValueError, match="write fields as"):
        template_fields("{0}")
    conv = render([{"role": "user", "content": "x={x} y={y}"}], {"x": "1", "y": [1, 2]})
    assert conv == [{"role": "user", "content": "x=1 y=[1, 2]"}]


def test_parse_json_answer():
    assert parse_json_answer('{"a": 1}') == {"a": 1}
    assert parse_json_answer('Sure:\n```json\n{"a": [1]}\n```\nthanks') == {"a": [1]}
    assert parse_json_answer('Here it is: {"a": 2} and more') == {"a": 2}
    with pytest.raises(ValueError):
        parse_json_answer("no json here")


def test_check_names_the_step_and_missing_field_before_any_generation():
    backend = ScriptedBackend(echo)
    gen = Generate("answer", [{"role": "user", "content": "{instruction} in {language}"}], "answer")
    with pytest.raises(ValueError, match=r"step 'answer' reads column\(s\) \['language'\]"):
        Pipeline([gen]).run(records(2), Context(backend, progress=False))
    assert backend.calls == 0


def test_instruction_step_drops_and_counts_rows_without_one():
    recs = [Record("a", {"prompt": [{"role": "user", "content": "hello"}]}), Record("b", {"prompt": []}),
            Record("c", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]}),
            Record("d", {"text": "no instruction column"})]  # fmt: skip
    result = Pipeline([Instruction()]).run(recs, Context(progress=False), input_columns=set())
    assert [r.data["instruction"] for r in result.records] == ["hello", "q"]
    assert [(d.record.id, d.reason) for d in result.dropped] == [
        ("b", "no_instruction"),
        ("d", "no_instruction"),
    ]
    assert result.stats["dropped"] == {"no_instruction": 2} and result.stats["rows_out"] == 2


def test_a_step_that_loses_a_row_is_an_error():
    class Loses(Step):
        name = "loses"

        def run(self, records, ctx):
            return records[1:]

    with pytest.raises(RuntimeError, match="lost 1 row"):
        Pipeline([Loses()]).run(records(3), Context(progress=False))


def test_a_step_must_write_what_it_promises():
    step = Map("noop", lambda r: None, makes=("answer",))
    with pytest.raises(RuntimeError, match=r"promised column\(s\) \['answer'\]"):
        Pipeline([step]).run(records(1), Context(progress=False))


def test_generate_writes_answers_with_provenance_and_batches():
    backend = ScriptedBackend(echo)
    gen = Generate("answer", ECHO, "answer", n=2, sampling=SamplingConfig(temperature=0.7, max_new_tokens=9))
    result = Pipeline([gen]).run(records(5), Context(backend, batch_size=2, progress=False))
    r = result.records[3]
    assert r.data["answer"] == ["Say: row 3 #0", "Say: row 3 #1"] and r.data["answer_finished"] == [
        True,
        True,
    ]
    prov = r.provenance["answer"]
    assert prov["step"] == "answer" and prov["model"] == "scripted" and prov["template"] == "answer"
    assert prov["settings"]["temperature"] == 0.7 and prov["settings"]["max_new_tokens"] == 9
    assert backend.batches == [2, 2, 1]
    assert result.stats["generated_samples"] == 10 and result.stats["cached_samples"] == 0


def test_cache_reuses_every_generation_and_fills_only_what_is_missing(tmp_path):
    db = tmp_path / "cache.sqlite"
    first = ScriptedBackend(echo)
    Pipeline([Generate("answer", ECHO, "answer", n=2)]).run(
        records(4), Context(first, GenerationCache(db), progress=False)
    )
    assert first.calls == 4
    # Same settings, a filter added after it: no sample is generated again.
    again = ScriptedBackend(lambda c, j: "NEW")
    keep_even = Map("even", lambda r: None if r.id[-1] in "02" else "odd", needs=("answer",))
    res = Pipeline([Generate("answer", ECHO, "answer", n=2), keep_even]).run(
        records(4), Context(again, GenerationCache(db), progress=False)
    )
    assert again.calls == 0 and res.records[0].data["answer"] == ["Say: row 0 #0", "Say: row 0 #1"]
    assert res.stats["dropped"] == {"odd": 2} and res.stats["cached_samples"] == 8
    # One more sample per row: only that one is generated, the two cached ones are kept.
    more = ScriptedBackend(lambda c, j: "third")
    res = Pipeline([Generate("answer", ECHO, "answer", n=3)]).run(
        records(4), Context(more, GenerationCache(db), progress=False)
    )
    assert more.calls == 4 and more.batches == [4]
    assert res.records[1].data["answer"] == ["Say: row 1 #0", "Say: row 1 #1", "third"]
    # Another temperature is another key.
    hotter = ScriptedBackend(echo)
    gen = Generate("answer", ECHO, "answer", n=2, sampling=SamplingConfig(temperature=0.5))
    Pipeline([gen]).run(records(4), Context(hotter, GenerationCache(db), progress=False))
    assert hotter.calls == 4


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {root!r})
from data_synthesis.backends import ScriptedBackend
from data_synthesis.engine import Context, GenerationCache, Generate, Pipeline, Record

batches = 0
def respond(conv, j):
    return "answer to " + conv[-1]["content"]

class Dies(ScriptedBackend):
    def chat(self, conversations, n, sampling, json_schema=None):
        global batches
        batches += 1
        if batches == 3:  # the third batch: die before answering, as kill -9 would
            os.kill(os.getpid(), signal.SIGKILL)
        return super().chat(conversations, n, sampling, json_schema)

recs = [Record(f"r{{i}}", {{"instruction": f"row {{i}}"}}) for i in range(10)]
tmpl = [{{"role": "user", "content": "Say: {{instruction}}"}}]
Pipeline([Generate("answer", tmpl, "answer")]).run(recs, Context(Dies(respond), GenerationCache({db!r}), batch_size=3))
"""


def test_a_run_killed_with_sigkill_resumes_without_redoing_or_losing_rows(tmp_path):
    db = tmp_path / "cache.sqlite"
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(root=str(ROOT), db=str(db)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    backend = ScriptedBackend(lambda c, j: "answer to " + c[-1]["content"])
    recs = [Record(f"r{i}", {"instruction": f"row {i}"}) for i in range(10)]
    res = Pipeline([Generate("answer", ECHO, "answer")]).run(
        recs, Context(backend, GenerationCache(db), batch_size=3, progress=False)
    )
    assert backend.calls == 4  # rows 6-9: the two batches before the kill (6 rows) came from the cache
    assert [r.data["answer"] for r in res.records] == [f"answer to Say: row {i}" for i in range(10)]


# -- the OpenAI-compatible backend against a local HTTP server ------------------------------------------------


class _Endpoint(BaseHTTPRequestHandler):
    fail_first = 0
    status = 500
    bodies: list = []
    in_flight = 0
    max_in_flight = 0
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def do_POST(self):
        cls = type(self)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with cls.lock:
            cls.bodies.append((body, self.headers.get("Authorization")))
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
            fail = cls.fail_first > 0
            cls.fail_first -= 1
        time.sleep(0.05)
        with cls.lock:
            cls.in_flight -= 1
        if fail:
            self.send_response(cls.status)
            self.end_headers()
            self.wfile.write(b"busy")
            return
        content = body["messages"][-1]["content"]
        choices = [
            {"index": j, "message": {"content": f"{content}/{j}"}, "finish_reason": "stop"}
            for j in range(body["n"])
        ]
        data = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def endpoint():
    handler = type("H", (_Endpoint,), {"bodies": [], "fail_first": 0, "in_flight": 0, "max_in_flight": 0,
                                       "lock": threading.Lock()})  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_backend_retries_server_errors_and_keeps_concurrency(endpoint, monkeypatch):
    handler, url = endpoint
    handler.fail_first = 2
    monkeypatch.setenv("TEST_KEY", "sekret")
    backend = OpenAIBackend(BackendConfig(kind="openai", model="big", url=url, concurrency=2, retries=3,
                                          api_key_env="TEST_KEY"))  # fmt: skip
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    out = backend.chat(
        convs, 2, SamplingConfig(temperature=0.3, max_new_tokens=7), json_schema={"type": "object"}
    )
    assert [[c.text for c in group] for group in out] == [[f"q{i}/0", f"q{i}/1"] for i in range(6)]
    assert backend.retried == 2 and handler.max_in_flight <= 2
    body, auth = handler.bodies[-1]
    assert auth == "Bearer sekret" and body["model"] == "big" and body["max_tokens"] == 7 and body["n"] == 2
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}


def test_openai_backend_does_not_retry_a_bad_request_and_says_why(endpoint):
    handler, url = endpoint
    handler.fail_first, handler.status = 5, 400
    backend = OpenAIBackend(BackendConfig(kind="openai", model="big", url=url, retries=3))
    with pytest.raises(EndpointError, match=r"HTTP 400: busy \(after 1 attempt"):
        backend.chat([[{"role": "user", "content": "q"}]], 1, SamplingConfig())


def test_openai_backend_gives_up_after_its_retries():
    backend = OpenAIBackend(BackendConfig(kind="openai", model="m", url="http://127.0.0.1:9/v1", retries=1))
    with pytest.raises(EndpointError, match=r"unreachable .*after 2 attempt"):
        backend.chat([[{"role": "user", "content": "q"}]], 1, SamplingConfig())


# -- the runner ------------------------------------------------------------------------------------------------


def test_every_registered_pipeline_has_config_steps_and_write():
    for name, module in PIPELINES.items():
        if not (ROOT / (module.replace(".", "/") + ".py")).is_file():
            pytest.fail(f"pipeline {name}: {module} does not exist")
        mod = pipeline_module(name)
        assert mod.Config().pipeline == name and callable(mod.steps) and callable(mod.write)


def test_recipe_errors_name_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline: tagging\nmin_cont: 3\n")
    with pytest.raises(ConfigError, match=r"r.yaml: min_cont: unknown key"):
        load_recipe([str(recipe)])
    recipe.write_text("pipeline: tagging\nbackend: {kind: openai}\n")
    with pytest.raises(ConfigError, match="needs backend.url"):
        load_recipe([str(recipe)])
    with pytest.raises(ConfigError, match="unknown pipeline 'nope'"):
        load_recipe(["pipeline=nope"])
    with pytest.raises(ConfigError, match="pipeline: required"):
        load_recipe(["input=x.jsonl"])


def test_cli_reports_a_bad_recipe_with_exit_code_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline: tagging\nmin_count: many\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "data_synthesis", str(recipe)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "min_count" in proc.stderr, proc.stderr[-1000:]


def test_recipes_under_recipes_data_load():
    for path in sorted((ROOT / "recipes" / "data").glob("*.yaml")):
        module, cfg = load_recipe([str(path)])
        assert cfg.pipeline == path.stem, f"{path}: pipeline {cfg.pipeline} but the file is {path.name}"


def test_generate_own_backend_is_closed_after_its_step():
    closed = []

    class Closing(ScriptedBackend):
        def close(self):
            closed.append(self.name)

    gen = Generate("answer", ECHO, "answer", backend=Closing(echo, name="other"))
    res = Pipeline([gen]).run(records(2), Context(ScriptedBackend(echo), progress=False))
    assert closed == ["other"] and res.records[0].provenance["answer"]["model"] == "other"


def test_dry_run_writes_apart_and_prints_rows(tmp_path, capsys):
    from data_synthesis import runner

    class Module:
        class Config(runner.SynthesisConfig):
            pass

        @staticmethod
        def steps(cfg):
            return [Instruction(), Generate("answer", ECHO, "answer")]

        @staticmethod
        def write(result, cfg, out):
            from data_synthesis.engine import write_jsonl

            return {"out.jsonl": write_jsonl(out / "out.jsonl", (r.to_row() for r in result.records))}

    src = write_rows(tmp_path / "in.jsonl", [{"instruction": f"i{k}"} for k in range(5)] + [{"x": 1}])
    cfg = Module.Config(pipeline="t", input=str(src), out_dir=str(tmp_path / "out"), dry_run=2, cache="none")
    stats = runner.run(Module, cfg, backend=ScriptedBackend(echo), progress=False)
    assert stats["rows_in"] == 2 and (tmp_path / "out" / "dry_run" / "out.jsonl").is_file()
    assert not (tmp_path / "out" / "out.jsonl").exists()
    assert '"answer": "Say: i0 #0"' in capsys.readouterr().out
    cfg = Module.Config(pipeline="t", input=str(src), out_dir=str(tmp_path / "out"), cache="none")
    stats = runner.run(Module, cfg, backend=ScriptedBackend(echo), progress=False)
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert stats["rows_out"] == 5 and stats["dropped"] == {"no_instruction": 1}
    assert dropped == [{"step": "instruction", "reason": "no_instruction", "detail": dropped[0]["detail"],
                        "row": {"id": "in:6", "x": 1, "provenance": {}}}]  # fmt: skip
    saved = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert saved["files"] == {"out.jsonl": 5} and saved["steps"][1]["rows_in"] == 5


def test_module_docstring_example_names_real_things():
    import data_synthesis.engine as engine

    for name in ("Pipeline", "Instruction", "Generate", "Context", "read_rows"):
        assert hasattr(engine, name) and name in engine.__doc__


def test_rows_with_the_same_conversation_share_their_samples_and_are_generated_once():
    backend = ScriptedBackend(echo)
    recs = [Record(f"r{i}", {"instruction": "same" if i % 2 else f"row {i}"}) for i in range(6)]
    res = Pipeline([Generate("answer", ECHO, "answer", n=2)]).run(
        recs, Context(backend, batch_size=4, progress=False)
    )
    # Batch 1: rows 0, 2 and one "same" (rows 1 and 3 share it) -> 3 conversations; batch 2: row 4, and "same"
    # again, now cached.
    assert backend.batches == [3, 1] and backend.calls == 4
    assert res.stats["generated_samples"] == 8 and res.stats["cached_samples"] == 4
    assert res.records[1].data["answer"] == res.records[5].data["answer"] == ["Say: same #0", "Say: same #1"]


@pytest.mark.slow
def test_a_fully_cached_run_loads_no_model(tmp_path, tiny_qwen2):
    """The local backend loads its model on the first sample the cache lacks: with every sample cached, never."""
    from data_synthesis.backends import LocalBackend

    cfg = BackendConfig(
        model=tiny_qwen2, generation=GenerationConfig(backend="transformers", max_model_len=256)
    )
    db = tmp_path / "c.sqlite"
    gen = Generate("answer", ECHO, "answer", n=2, sampling=SamplingConfig(temperature=1.0, max_new_tokens=4))
    first = LocalBackend(cfg)
    a = Pipeline([gen]).run(records(3), Context(first, GenerationCache(db), progress=False))
    assert first._generator is not None
    first.close()
    again = LocalBackend(cfg)
    b = Pipeline([gen]).run(records(3), Context(again, GenerationCache(db), progress=False))
    assert again._generator is None and b.stats["generated_samples"] == 0
    assert [r.data["answer"] for r in b.records] == [r.data["answer"] for r in a.records]


def test_the_default_cache_lives_under_alignment_cache(tmp_path, monkeypatch):
    """cache: null puts the generations under $ALIGNMENT_CACHE, with the built models: a run with that variable
    pointed at a new folder starts from an empty cache, and the next run with it reuses every sample."""
    from data_synthesis import runner

    class Module:
        class Config(runner.SynthesisConfig):
            pass

        @staticmethod
        def steps(cfg):
            return [Instruction(), Generate("answer", ECHO, "answer", n=2)]

        @staticmethod
        def write(result, cfg, out):
            from data_synthesis.engine import write_jsonl

            return {"out.jsonl": write_jsonl(out / "out.jsonl", (r.to_row() for r in result.records))}

    monkeypatch.setenv("ALIGNMENT_CACHE", str(tmp_path / "cache"))
    src = write_rows(tmp_path / "in.jsonl", [{"instruction": f"i{k}"} for k in range(3)])
    cfg = Module.Config(pipeline="t", input=str(src), out_dir=str(tmp_path / "out"))
    assert cfg.cache is None
    first = runner.run(Module, cfg, backend=ScriptedBackend(echo), progress=False)
    assert (tmp_path / "cache" / "synthesis" / "generations.sqlite").is_file()
    again = runner.run(Module, cfg, backend=ScriptedBackend(echo), progress=False)
    assert (first["generated_samples"], first["cached_samples"]) == (6, 0)
    assert (again["generated_samples"], again["cached_samples"]) == (0, 6)
    assert runner.generation_cache_path("none") is None
    assert runner.generation_cache_path("~/x.sqlite") == Path("~/x.sqlite").expanduser()
