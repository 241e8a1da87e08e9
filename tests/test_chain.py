"""The chain runner (alignment/chain.py) on stages that are tiny Python scripts writing files: a second run
skips what is up to date, a changed override reruns its stage and the ones after it, a failure stops the chain
and keeps what came before, a killed stage resumes from its checkpoint, evaluations run after the stages they
need. The shipped chain recipes load and point each stage at the one before. One slow test runs the real
chain (recipes/chain_smoke.yaml) on tiny-qwen2."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignment.chain import check_configs, load_chain, main, plan
from alignment.config import ConfigError
from alignment.fast_malloc import find_tcmalloc
from tests.conftest import REPO

# A stage: reads its config (argv[1]), logs the call, then fails, gets killed, or writes its "model":
# the upstream model's content plus its own name and value, so a change anywhere shows downstream.
STAGE = """
import json, os, signal, sys, yaml
cfg, extra = yaml.safe_load(open(sys.argv[1])), sys.argv[2:]
out = cfg["out"]
os.makedirs(out, exist_ok=True)
tcmalloc = "libtcmalloc" in open("/proc/self/maps").read()
with open(cfg["calls"], "a") as f:
    f.write(json.dumps({"stage": cfg["name"], "extra": extra, "tcmalloc": tcmalloc}) + "\\n")
print(f"stage {cfg['name']} value {cfg['value']}", flush=True)
if cfg.get("fail"):
    print(cfg["fail"], file=sys.stderr)
    sys.exit(3)
if cfg.get("crash") and os.path.exists(cfg["calls"] + ".crash"):  # once: the same config then runs through
    os.remove(cfg["calls"] + ".crash")
    if cfg["crash"] == "after_checkpoint":
        os.makedirs(f"{out}/checkpoint-1")
        open(f"{out}/checkpoint-1/trainer_state.json", "w").write("{}")
    os.kill(os.getpid(), signal.SIGKILL)
if cfg.get("linger"):  # leave a process behind that keeps the inherited file descriptors, as an orphan would
    import subprocess
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    pid = subprocess.Popen(sleeper, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    open(cfg["linger"], "w").write(str(pid))
upstream = open(cfg["upstream"]).read() if cfg.get("upstream") else ""
open(f"{out}/model.safetensors", "w").write(upstream + f"{cfg['name']}={cfg['value']};")
"""

# An evaluation: the length of the evaluated model's file (0 for the start model, which is a name).
EVAL = """
import json, os, sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
with open(cfg["calls"], "a") as f:
    f.write(json.dumps({"stage": "eval", "model": cfg["model"]}) + "\\n")
weights = os.path.join(cfg["model"], "model.safetensors")
size = len(open(weights).read()) if os.path.isfile(weights) else 0
json.dump({"eval/size": size}, open(cfg["output"], "w"))
"""


def make_chain(tmp_path: Path, with_eval: bool = False) -> Path:
    """Stages a -> b -> c, each a python script with its own recipe; b also reads a data file."""
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "eval.py").write_text(EVAL)
    (tmp_path / "data.txt").write_text("rows\n")
    calls = tmp_path / "calls.jsonl"
    stages = {}
    for name, upstream in (("a", None), ("b", "a"), ("c", "b")):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({"name": name, "value": 1, "calls": str(calls), "out": "unset"}))
        stages[name] = {
            "args": [str(tmp_path / "stage.py")],
            "recipe": str(recipe),
            "overrides": ["out=${stage_dir}"] + ([f"upstream=${{run}}/{upstream}/model.safetensors"] if upstream else []),
            "needs": [upstream] if upstream else [],
            "inputs": [str(tmp_path / "data.txt")] if name == "b" else [],
            "outputs": ["model.safetensors"],
        }  # fmt: skip
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"calls": str(calls), "model": None, "output": None}))
    chain = {
        "run_dir": str(tmp_path / "run"),
        "start_model": "start-model",
        "stages": stages,
        "report": False,
    }
    if with_eval:
        chain["eval"] = {
            "args": [str(tmp_path / "eval.py")],
            "recipe": str(tmp_path / "eval.yaml"),
            "overrides": ["model=${model}", "output=${stage_dir}/eval.json"],
            "needs": ["b"],
            "outputs": ["eval.json"],
        }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(chain, sort_keys=False))
    return path


def calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "calls.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    path.unlink(missing_ok=True)
    return rows


def ran(tmp_path: Path) -> list[str]:
    return [c["stage"] for c in calls(tmp_path)]


def record(tmp_path: Path, stage: str, prefix: str = "") -> dict:
    return json.loads((tmp_path / "run" / stage / f"{prefix}stage.json").read_text())


def model(tmp_path: Path, stage: str) -> str:
    return (tmp_path / "run" / stage / "model.safetensors").read_text()


def test_a_second_run_skips_every_stage(tmp_path, capsys):
    chain = make_chain(tmp_path)
    main([str(chain)])
    assert ran(tmp_path) == ["a", "b", "c"]
    assert model(tmp_path, "c") == "a=1;b=1;c=1;"
    run = tmp_path / "run"
    assert yaml.safe_load((run / "b" / "config.yaml").read_text())["out"] == str(run / "b")
    assert "stage b value 1" in (run / "b" / "log.txt").read_text()
    assert "stage b value 1" in capsys.readouterr().out  # streamed to the console too
    assert record(tmp_path, "b")["status"] == "done"
    assert str(tmp_path / "data.txt") in record(tmp_path, "b")["inputs"]["files"]

    main([str(chain)])
    assert ran(tmp_path) == []
    assert capsys.readouterr().out.count("up to date, skipped") == 3


@pytest.mark.skipif(find_tcmalloc({}) is None, reason="no tcmalloc here (make install fetches it)")
def test_stages_start_on_tcmalloc_unless_it_is_switched_off(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("ALIGNMENT_TCMALLOC", raising=False)
    chain = make_chain(tmp_path)
    main([str(chain)])
    assert [c["tcmalloc"] for c in calls(tmp_path)] == [True, True, True]
    assert f"[chain] stages run on tcmalloc ({find_tcmalloc({})})" in capsys.readouterr().out

    monkeypatch.setenv("ALIGNMENT_TCMALLOC", "0")
    main([str(chain), "stages.a.extra_overrides=[value=2]"])
    assert [c["tcmalloc"] for c in calls(tmp_path)] == [False, False, False]
    assert "[chain] stages run on glibc's malloc" in capsys.readouterr().out


def test_a_changed_override_reruns_that_stage_and_the_ones_after(tmp_path):
    chain = make_chain(tmp_path)
    main([str(chain)])
    calls(tmp_path)

    main([str(chain), "stages.b.extra_overrides=[value=2]"])
    assert ran(tmp_path) == ["b", "c"]
    assert model(tmp_path, "c") == "a=1;b=2;c=1;"
    main([str(chain), "stages.b.extra_overrides=[value=2]"])
    assert ran(tmp_path) == []

    (tmp_path / "data.txt").write_text("other rows\n")  # an input file of b
    main([str(chain), "stages.b.extra_overrides=[value=2]"])
    assert ran(tmp_path) == ["b", "c"]


def test_a_damaged_output_reruns_its_stage_and_only_it_when_the_rerun_gives_the_same_result(tmp_path):
    chain = make_chain(tmp_path)
    main([str(chain)])
    calls(tmp_path)
    (tmp_path / "run" / "a" / "model.safetensors").write_text("damaged")
    main([str(chain)])
    assert ran(tmp_path) == ["a"]  # the same output again: b and c still match their records
    assert model(tmp_path, "a") == "a=1;"


def test_a_failing_stage_stops_the_chain_and_keeps_what_came_before(tmp_path, capsys):
    chain = make_chain(tmp_path)
    with pytest.raises(SystemExit) as done:
        main([str(chain), "stages.b.extra_overrides=['fail=b cannot go on (boom)']"])
    assert done.value.code == 3
    assert ran(tmp_path) == ["a", "b"]
    err = capsys.readouterr().err
    assert "chain stopped at b (exit 3): b cannot go on (boom)" in err
    assert str(tmp_path / "run" / "b" / "log.txt") in err
    assert "b cannot go on (boom)" in (tmp_path / "run" / "b" / "log.txt").read_text()
    assert record(tmp_path, "b")["status"] == "failed" and record(tmp_path, "b")["exit_code"] == 3
    assert model(tmp_path, "a") == "a=1;" and not (tmp_path / "run" / "c").exists()

    main([str(chain)])  # fixed: a is kept, b and c run
    assert ran(tmp_path) == ["b", "c"]


def test_a_killed_stage_resumes_from_its_checkpoint(tmp_path):
    chain = make_chain(tmp_path)
    crash = "stages.b.extra_overrides=[crash=after_checkpoint]"
    (tmp_path / "calls.jsonl.crash").touch()  # b kills itself once, after writing a checkpoint
    with pytest.raises(SystemExit) as done:
        main([str(chain), crash])
    assert done.value.code == 128 + 9  # SIGKILL, as a shell reports it
    assert [c["extra"] for c in calls(tmp_path)] == [[], []]
    assert record(tmp_path, "b")["status"] == "failed"

    main([str(chain), crash])
    rows = calls(tmp_path)
    assert [(c["stage"], c["extra"]) for c in rows] == [
        ("b", ["training.resume_from_checkpoint=latest"]),
        ("c", []),
    ]
    assert (tmp_path / "run" / "b" / "checkpoint-1").is_dir()  # resumed in place, not emptied
    assert record(tmp_path, "b")["resumed"] is True
    assert "training.resume_from_checkpoint=latest" not in record(tmp_path, "b")["inputs"]["command"]
    main([str(chain), crash])
    assert ran(tmp_path) == []  # the resume flag is not part of the record


def test_a_stage_killed_before_its_first_checkpoint_starts_again(tmp_path):
    chain = make_chain(tmp_path)
    crash = "stages.b.extra_overrides=[crash=before_checkpoint]"
    (tmp_path / "calls.jsonl.crash").touch()
    with pytest.raises(SystemExit):
        main([str(chain), crash])
    calls(tmp_path)
    (tmp_path / "run" / "b" / "stale.txt").write_text("left by the killed run")
    main([str(chain), crash])
    assert [(c["stage"], c["extra"]) for c in calls(tmp_path)] == [("b", []), ("c", [])]
    assert not (tmp_path / "run" / "b" / "stale.txt").exists()


def test_evaluations_run_once_what_they_need_exists(tmp_path):
    chain = make_chain(tmp_path, with_eval=True)
    main([str(chain), "stages.c.evaluate=false"])
    rows = calls(tmp_path)
    # The eval needs b: the start model's and a's wait for it, c's is off.
    order = [c["stage"] if c["stage"] != "eval" else f"eval:{Path(c['model']).name}" for c in rows]
    assert order == ["a", "b", "eval:start-model", "eval:a", "eval:b", "c"]
    run = tmp_path / "run"
    assert json.loads((run / "start" / "eval.json").read_text()) == {"eval/size": 0}
    assert json.loads((run / "b" / "eval.json").read_text()) == {"eval/size": len("a=1;b=1;")}
    assert record(tmp_path, "b", prefix="eval.")["status"] == "done"
    assert not (run / "c" / "eval.json").exists()

    main([str(chain), "stages.c.evaluate=false"])
    assert ran(tmp_path) == []  # evaluations are skipped like stages
    main([str(chain), "stages.c.evaluate=false", "stages.a.extra_overrides=[value=3]"])
    # a changed, so b after it, and so every evaluation (all need b: its fingerprint is in their records).
    assert [c.get("model", c["stage"]).split("/")[-1] for c in calls(tmp_path)] == [
        "a", "b", "start-model", "a", "b", "c",
    ]  # fmt: skip


def test_the_start_models_evaluation_takes_its_own_overrides_and_needs(tmp_path):
    chain = make_chain(tmp_path, with_eval=True)
    # EVAL's recipe has no such key as "note": the override shows in the written config of that step only.
    own = ["start_eval_overrides=[note=start only]", "start_eval_needs=[a]"]
    main([str(chain), "stages.c.evaluate=false", *own])
    order = [c["stage"] if c["stage"] != "eval" else f"eval:{Path(c['model']).name}" for c in calls(tmp_path)]
    assert order == ["a", "eval:start-model", "b", "eval:a", "eval:b", "c"]  # start's waits only for a
    run = tmp_path / "run"
    assert yaml.safe_load((run / "start" / "eval.config.yaml").read_text())["note"] == "start only"
    assert "note" not in yaml.safe_load((run / "a" / "eval.config.yaml").read_text())
    # b changed: every evaluation that needs b reruns, the start model's does not.
    main([str(chain), "stages.c.evaluate=false", *own, "stages.b.extra_overrides=[value=2]"])
    assert [c.get("model", c["stage"]).split("/")[-1] for c in calls(tmp_path)] == ["b", "a", "b", "c"]
    with pytest.raises(ValueError, match="start_eval_needs: 'x' is not a stage"):
        load_chain(chain, ["start_eval_needs=[x]"])


def test_the_chain_runs_without_evaluation(tmp_path):
    chain = make_chain(tmp_path, with_eval=True)
    main([str(chain), "eval.enabled=false"])
    assert ran(tmp_path) == ["a", "b", "c"]
    assert not list((tmp_path / "run").rglob("eval.json"))


def test_the_chain_writes_its_report_at_the_end(tmp_path):
    chain = make_chain(tmp_path, with_eval=True)
    main([str(chain), "report=true"])
    text = (tmp_path / "run" / "report.md").read_text()
    assert "| eval/size | 0 | 4 | 8 | 12 |" in text


def test_folders_the_chain_did_not_make_are_left_alone(tmp_path, capsys):
    chain = make_chain(tmp_path)
    (tmp_path / "run" / "a").mkdir(parents=True)
    (tmp_path / "run" / "a" / "mine.txt").write_text("not the chain's")
    with pytest.raises(SystemExit) as done:
        main([str(chain)])
    assert done.value.code == 2 and "holds files the chain did not make" in capsys.readouterr().err
    assert (tmp_path / "run" / "a" / "mine.txt").is_file()


def test_a_run_folder_in_use_is_refused(tmp_path):
    chain = make_chain(tmp_path)
    (tmp_path / "run").mkdir()
    fd = os.open(tmp_path / "run" / "chain.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running chain, or the stage of a killed one, holds it
    try:
        with pytest.raises(SystemExit, match="is in use by another chain"):
            main([str(chain)])
    finally:
        os.close(fd)
    assert ran(tmp_path) == []
    main([str(chain)])
    assert ran(tmp_path) == ["a", "b", "c"]


def test_a_process_a_stage_left_running_keeps_the_folder_locked(tmp_path):
    # As after kill -9 of the chain: its stage lives on, holding the lock it inherited.
    chain = make_chain(tmp_path)
    pid_file = tmp_path / "sleeper.pid"
    main([str(chain), f"stages.c.extra_overrides=[linger={pid_file}]"])
    try:
        with pytest.raises(SystemExit, match="is in use by another chain"):
            main([str(chain), "stages.a.extra_overrides=[value=2]"])
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    fd = os.open(tmp_path / "run" / "chain.lock", os.O_RDWR)
    for _ in range(100):  # until the killed sleeper has let go of the lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.1)
    os.close(fd)
    calls(tmp_path)
    main([str(chain), "stages.a.extra_overrides=[value=2]"])
    assert ran(tmp_path) == ["a", "b", "c"]


def test_bad_chain_recipes_fail_with_the_key(tmp_path):
    chain = make_chain(tmp_path)
    with pytest.raises(ConfigError, match=r"stages\.a\.needs: 'c' is not a stage before a"):
        load_chain(chain, ["stages.a.needs=[c]"])
    with pytest.raises(ConfigError, match=r"stages\.b\.overide: unknown key"):
        load_chain(chain, ["stages.b.overide=[]"])
    with pytest.raises(
        ConfigError, match=r"chain step b: 'upstream=\$\{rn\}/x': unknown or malformed variable"
    ):
        plan(load_chain(chain, ["stages.b.overrides=['upstream=${rn}/x']"]))[1].resolved_config()


def test_the_command_line_runs_the_chain(tmp_path):
    chain = make_chain(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "alignment.chain", str(chain), "stages.c.enabled=false"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert ran(tmp_path) == ["a", "b"] and "[chain] b: done" in proc.stdout


# --------------------------------------------------------------------------------------------------------------
# The shipped chain recipes
# --------------------------------------------------------------------------------------------------------------


def steps_of(recipe: str, *overrides: str) -> dict:
    return {s.name: s for s in plan(load_chain(REPO / recipe, list(overrides))) if s.spec.enabled}


def test_the_shipped_chain_hands_each_stage_the_one_before(monkeypatch):
    monkeypatch.chdir(REPO)
    steps = steps_of("recipes/chain.yaml")
    assert list(steps) == [
        "data", "sft", "reward", "negatives", "dpo", "online_dpo", "start.eval", "sft.eval", "dpo.eval",
        "online_dpo.eval",
    ]  # fmt: skip
    config = {name: step.resolved_config() for name, step in steps.items()}
    assert config["sft"]["data"]["sources"] == [{"path": "outputs/chain/data/sft/train.jsonl"}]
    assert config["sft"]["training"]["output_dir"] == "outputs/chain/sft"
    negatives = steps["negatives"].command()
    assert negatives[negatives.index("-m") + 1 :][:2] == [
        "data_synthesis",
        "recipes/data/on_policy_negatives.yaml",
    ]
    assert {"backend.model=outputs/chain/sft", "input=outputs/chain/data/preference/train.jsonl",
            "out_dir=outputs/chain/negatives"} <= set(negatives)  # fmt: skip
    assert config["dpo"]["model"]["name_or_path"] == "outputs/chain/sft"
    assert config["dpo"]["data"]["sources"] == [{"path": "outputs/chain/negatives/preference.jsonl"}]
    assert steps["dpo"].needs == ["sft", "negatives"]
    assert config["online_dpo"]["model"]["name_or_path"] == "outputs/chain/dpo"
    assert config["online_dpo"]["rewards"][0]["params"] == {"name_or_path": "outputs/chain/reward"}
    assert config["online_dpo"]["optimizer"]["name"] == "ondare"
    assert config["online_dpo"]["optimizer"]["base"] == "smollm2-135m-instruct"
    assert (config["sft.eval"]["model"], config["sft.eval"]["output"]) == (
        "outputs/chain/sft",
        "outputs/chain/sft/eval.json",
    )
    assert config["start.eval"]["model"] == config["start.eval"]["start_model"] == "smollm2-135m-instruct"
    assert config["start.eval"]["reference_model"] is None  # no KL to SFT, which the start model comes before
    assert (
        steps["start.eval"].needs == ["reward"]
        and config["dpo.eval"]["reference_model"] == "outputs/chain/sft"
    )
    assert config["start.eval"]["reward_model"] == "outputs/chain/reward"
    assert steps["sft"].command() == [
        "accelerate",
        "launch",
        "alignment/sft.py",
        "outputs/chain/sft/config.yaml",
    ]


def test_the_adamw_chain_adds_online_dpo_with_adamw_in_its_own_folder(monkeypatch):
    monkeypatch.chdir(REPO)
    base, adamw = steps_of("recipes/chain.yaml"), steps_of("recipes/chain_adamw.yaml")
    assert set(adamw) - set(base) == {"online_dpo_adamw", "online_dpo_adamw.eval"}
    for name in base:  # every other stage is the same, so its record matches and it is skipped
        assert adamw[name].resolved_config() == base[name].resolved_config()
    ours, theirs = adamw["online_dpo_adamw"].resolved_config(), base["online_dpo"].resolved_config()
    assert (
        ours["optimizer"]["name"] == "adamw"
        and ours["training"]["output_dir"] == "outputs/chain/online_dpo_adamw"
    )
    ours["optimizer"]["name"], ours["training"]["output_dir"] = "ondare", "outputs/chain/online_dpo"
    assert ours == theirs


def test_the_rs_chain_trains_dpo_on_rejection_sampled_pairs_of_the_sft_model(monkeypatch):
    monkeypatch.chdir(REPO)
    base, rs = steps_of("recipes/chain.yaml"), steps_of("recipes/chain_rs.yaml")
    assert set(rs) - set(base) == {
        "rejection_sampling", "dpo_rs", "online_dpo_rs", "dpo_rs.eval", "online_dpo_rs.eval",
    }  # fmt: skip
    for name in base:  # the shipped-data stages are the same, so their records match and they are skipped
        assert rs[name].resolved_config() == base[name].resolved_config()
    sampling = rs["rejection_sampling"].command()
    assert sampling[sampling.index("-m") + 1 :][:2] == [
        "data_synthesis",
        "recipes/data/rejection_sampling.yaml",
    ]
    assert {"backend.model=outputs/chain/sft", "out_dir=outputs/chain/rejection_sampling"} <= set(sampling)
    assert "input=outputs/chain/data/preference/train.jsonl" in sampling
    dpo, online = rs["dpo_rs"].resolved_config(), rs["online_dpo_rs"].resolved_config()
    assert dpo["data"]["sources"] == [{"path": "outputs/chain/rejection_sampling/preference.jsonl"}]
    assert dpo["model"]["name_or_path"] == "outputs/chain/sft"
    assert dpo["training"]["output_dir"] == "outputs/chain/dpo_rs"
    dpo["data"], dpo["training"]["output_dir"] = base["dpo"].resolved_config()["data"], "outputs/chain/dpo"
    assert dpo == base["dpo"].resolved_config()  # the DPO recipe itself is the shipped chain's
    assert online["model"]["name_or_path"] == "outputs/chain/dpo_rs"
    assert online["training"]["output_dir"] == "outputs/chain/online_dpo_rs"
    online["model"]["name_or_path"], online["training"]["output_dir"] = (
        "outputs/chain/dpo",
        "outputs/chain/online_dpo",
    )
    assert online == base["online_dpo"].resolved_config()


@pytest.mark.parametrize(
    "recipe",
    ["recipes/chain.yaml", "recipes/chain_adamw.yaml", "recipes/chain_rs.yaml", "recipes/chain_smoke.yaml"],
)
def test_every_stage_of_the_shipped_chains_passes_its_schema(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    check_configs(plan(load_chain(REPO / recipe)))
    with pytest.raises(
        ConfigError, match=r"chain step dpo \(recipes/dpo.yaml \+ overrides\): loss\.bta: unknown"
    ):
        check_configs(plan(load_chain(REPO / recipe, ["stages.dpo.extra_overrides=[loss.bta=1]"])))


@pytest.mark.slow
def test_the_real_chain_on_tiny_models(tmp_path):
    """recipes/chain_smoke.yaml: data, SFT, reward model, the SFT model's negatives, DPO and online DPO on
    tiny-qwen2, two steps each;
    a second run skips them all."""
    run = tmp_path / "chain"
    cmd = [sys.executable, "-m", "alignment.chain", "recipes/chain_smoke.yaml", f"run_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("sft", "reward", "dpo", "online_dpo"):
        assert json.loads((run / stage / "stage.json").read_text())["status"] == "done"
        assert (run / stage / "model.safetensors").is_file() and (run / stage / "metrics.jsonl").is_file()
    negatives = [json.loads(line) for line in (run / "negatives" / "preference.jsonl").open()]
    assert len(negatives) == 16 and {r["rejected_source"] for r in negatives} <= {"policy", "row"}
    dpo = yaml.safe_load((run / "dpo" / "recipe.yaml").read_text())
    assert dpo["model"]["name_or_path"] == str(run / "sft")
    assert dpo["data"]["sources"][0]["path"] == str(run / "negatives" / "preference.jsonl")
    online = yaml.safe_load((run / "online_dpo" / "recipe.yaml").read_text())
    assert online["rewards"][0]["params"]["name_or_path"] == str(run / "reward")
    assert (run / "report.md").is_file() and (run / "plots" / "online_dpo.png").is_file()

    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.count("up to date, skipped") == 6, proc.stdout[-3000:]
