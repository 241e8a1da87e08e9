"""The saved SFT model loads and generates in vLLM (the CPU build here), as online DPO will need."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO
from tests.test_sft import run_sft

VLLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    msgs = [[{"role": "user", "content": "What is 2 plus 2?"}]]
    out = llm.chat(msgs, SamplingParams(max_tokens=8, temperature=0.0))
    print("RESULT " + json.dumps({"text": out[0].outputs[0].text, "n": len(out[0].outputs[0].token_ids)}))
"""


def test_sft_output_loads_and_generates_in_vllm(tmp_path):
    out = run_sft(tmp_path, "run", "training.max_steps=1")
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    script = tmp_path / "load.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), out], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    result = json.loads(line[len("RESULT ") :])
    assert 1 <= result["n"] <= 8
