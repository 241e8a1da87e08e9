"""The generation interface: vLLM in this process (the CPU build here) and transformers, behind one API.

Tolerances for "the engine samples from the weights it was given" (max abs difference of per-token log-probs of
a fixed answer between the engine and the policy): 1e-4 in float32 (seen: about 1e-6), 0.25 in bfloat16 (seen:
below 0.1; bf16 keeps 8 bits of mantissa and the two stacks use different kernels).
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from alignment.data import encode_prompt
from alignment.evaluation import answer_sequence
from alignment.generation import GenerationConfig, SamplingConfig, TransformersGenerator, make_generator
from alignment.logprobs import TokenLogProbs

PROMPT = [{"role": "user", "content": "What is 12 plus 30?"}]


def policy_logps(model, prompt_ids, answer_ids):
    seq = answer_sequence(prompt_ids, answer_ids)
    with torch.no_grad():
        lp = TokenLogProbs(model)(
            torch.tensor([seq.input_ids]), torch.arange(len(seq.input_ids))[None], torch.tensor([seq.labels])
        )
    return lp.double()


def perturb(model, seed, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def check_sync(generator, model, tokenizer, tol):
    prompt_ids = encode_prompt(tokenizer, PROMPT)
    answer = generator.generate([prompt_ids], 2, SamplingConfig(temperature=1.0, max_new_tokens=12))[0]
    assert len(answer) == 2 and all(1 <= len(a.token_ids) <= 12 for a in answer)
    ids = answer[0].token_ids
    before = torch.tensor(generator.sequence_logprobs(prompt_ids, ids), dtype=torch.float64)
    assert (before - policy_logps(model, prompt_ids, ids)).abs().max() < tol  # same weights at the start
    perturb(model, 0)
    stale = torch.tensor(generator.sequence_logprobs(prompt_ids, ids), dtype=torch.float64)
    assert (stale - policy_logps(model, prompt_ids, ids)).abs().max() > 4 * tol  # the check can fail
    generator.load_weights(model.state_dict().items())
    after = torch.tensor(generator.sequence_logprobs(prompt_ids, ids), dtype=torch.float64)
    diff = (after - policy_logps(model, prompt_ids, ids)).abs().max().item()
    assert diff < tol, diff
    return diff


@pytest.mark.vllm
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.25)])
def test_vllm_engine_follows_pushed_weights(tiny_qwen2, qwen_tokenizer, dtype, tol, capfd):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=getattr(torch, dtype))
    generator = make_generator(
        GenerationConfig(backend="vllm", max_model_len=256, kv_cache_gib=1), tiny_qwen2, qwen_tokenizer, dtype
    )
    try:
        assert generator.name == "vllm"
        # tiny-qwen2 is stored in float32: a bfloat16 engine casts its tensors (vLLM warned once per tensor that
        # it loads one by one: 10 here, 122 for SmolLM2), said in one line.
        out = "".join(capfd.readouterr())
        assert "Attempted to load weight" not in out
        said = re.search(r"vLLM cast ([0-9]+) float32 tensors to bfloat16, the engine's dtype", out)
        assert (said is not None) == (dtype == "bfloat16"), out[-2000:]
        assert said is None or int(said.group(1)) > 0
        check_sync(generator, model, qwen_tokenizer, tol)
    finally:
        generator.close()


def test_an_engine_that_fails_to_start_leaves_no_filter_behind(monkeypatch, qwen_tokenizer):
    vllm = pytest.importorskip("vllm")
    from alignment.generation import VLLMGenerator, _AskedForCasts

    def refuse(**kwargs):
        raise RuntimeError("no engine today")

    monkeypatch.setattr(vllm, "LLM", refuse)
    with pytest.raises(RuntimeError, match="no engine today"):
        VLLMGenerator(GenerationConfig(backend="vllm"), "some/model", qwen_tokenizer, "bfloat16")
    assert not any(isinstance(f, _AskedForCasts) for f in logging.getLogger(_AskedForCasts.LOGGER).filters)


def test_only_casts_into_the_engines_dtype_are_counted_instead_of_warned():
    from alignment.generation import _AskedForCasts

    def record(source, into):
        msg = "Attempted to load weight %s with dtype %s into parameter with dtype %s"
        return logging.LogRecord("vllm", logging.WARNING, "utils.py", 1, msg, ("w", source, into), None)

    casts = _AskedForCasts("bfloat16")
    assert not casts.filter(record(torch.float32, torch.bfloat16))
    assert not casts.filter(record(torch.float16, torch.bfloat16))
    assert casts.filter(record(torch.bfloat16, torch.float16))  # not what the engine was asked for: warns
    other = logging.LogRecord("vllm", logging.WARNING, "utils.py", 1, "something else %s", ("x",), None)
    assert casts.filter(other)
    assert casts.count == {"float32": 1, "float16": 1}


def test_transformers_fallback_follows_pushed_weights(tiny_qwen2, qwen_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    generator = TransformersGenerator(
        GenerationConfig(backend="transformers"), tiny_qwen2, qwen_tokenizer, "float32"
    )
    check_sync(generator, model, qwen_tokenizer, 1e-4)


def test_auto_falls_back_to_transformers_without_vllm(monkeypatch, tiny_qwen2, qwen_tokenizer, capsys):
    import alignment.generation as G

    monkeypatch.setattr(G, "vllm_available", lambda: False)
    generator = G.make_generator(GenerationConfig(), tiny_qwen2, qwen_tokenizer)
    assert generator.name == "transformers"
    assert "vLLM is not installed" in capsys.readouterr().out


def test_engine_dtype_bf16_if_fast_follows_the_hardware_and_the_rest_is_kept(monkeypatch):
    import alignment.training as T
    from alignment.generation import resolve_engine_dtype

    assert resolve_engine_dtype("auto", "float32") == "float32"
    assert resolve_engine_dtype("auto", "bfloat16") == "bfloat16"
    assert resolve_engine_dtype("float32", "bfloat16") == "float32"
    assert resolve_engine_dtype("bfloat16", "float32") == "bfloat16"
    assert resolve_engine_dtype("bf16_if_fast", "float32", fast_bf16=True) == "bfloat16"
    assert resolve_engine_dtype("bf16_if_fast", "bfloat16", fast_bf16=False) == "float32"
    # Unsaid, it asks the machine as training.mixed_precision: auto does (a CPU without AVX512-BF16: fp32).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(T, "cpu_has_fast_bf16", lambda cpuinfo=None: False)
    assert resolve_engine_dtype("bf16_if_fast") == "float32"
    monkeypatch.setattr(T, "cpu_has_fast_bf16", lambda cpuinfo=None: True)
    assert resolve_engine_dtype("bf16_if_fast") == "bfloat16"


def test_prompts_go_in_as_ids_without_a_second_bos(qwen_tokenizer):
    from alignment.models import load_tokenizer, resolve_model

    ids = encode_prompt(qwen_tokenizer, PROMPT)
    text = qwen_tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert qwen_tokenizer.decode(ids) == text and text.endswith("<|im_start|>assistant\n")
    # SmolLM2's BOS is <|im_start|>, which its template writes itself: exactly the rendered tokens, no extra one.
    smol = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    sids = encode_prompt(smol, PROMPT)
    stext = smol.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert smol.decode(sids) == stext and sids == smol(stext, add_special_tokens=False).input_ids
    assert (
        sids.count(smol.bos_token_id) == stext.count(smol.bos_token) and sids[:2] != [smol.bos_token_id] * 2
    )


def test_greedy_transformers_answers_are_deterministic_and_marked_finished_or_clipped(
    tiny_qwen2, qwen_tokenizer
):
    generator = TransformersGenerator(GenerationConfig(), tiny_qwen2, qwen_tokenizer, "float32")
    ids = encode_prompt(qwen_tokenizer, PROMPT)
    a = generator.generate([ids], 2, SamplingConfig(temperature=0.0, max_new_tokens=6))[0]
    assert a[0].token_ids == a[1].token_ids
    assert all(c.finished == (c.token_ids[-1] in generator.stop_ids) for c in a)
    assert all(len(c.token_ids) == 6 for c in a if not c.finished)


@pytest.mark.vllm
def test_an_engine_without_its_tokenizer_gives_vllms_own_text(tiny_qwen2, qwen_tokenizer):
    """The engine starts without a tokenizer (faster) and the answers are decoded here: the text must be what
    vLLM's own detokenizer gives, answer for answer. tiny-qwen2's random answers are the hard case: characters
    of several bytes split across tokens and cut off by max_new_tokens, where a whole-sequence decode differs."""
    prompts = [
        encode_prompt(qwen_tokenizer, [{"role": "user", "content": f"Say a word about {i}."}])
        for i in range(16)
    ]
    runs = {}
    for engine_tokenizer in (True, False):
        gen = make_generator(GenerationConfig(backend="vllm", max_model_len=256, kv_cache_gib=1), tiny_qwen2,
                             qwen_tokenizer, "float32", engine_tokenizer=engine_tokenizer)  # fmt: skip
        try:
            answers = gen.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=24))
            runs[engine_tokenizer] = [c for per_prompt in answers for c in per_prompt]
            if not engine_tokenizer:
                with pytest.raises(ValueError, match="stop strings need it"):
                    gen.generate(prompts[:1], 1, SamplingConfig(stop=["."]))
        finally:
            gen.close()
    theirs, ours = runs[True], runs[False]
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]  # one seed: the same samples
    assert [c.text for c in ours] == [c.text for c in theirs]
    assert [c.finished for c in ours] == [c.finished for c in theirs]
    whole = [qwen_tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in theirs]
    assert sum(w != c.text for w, c in zip(whole, theirs)) > 0  # a plain decode would fail the check above


@pytest.mark.vllm
def test_a_closed_engine_takes_its_distributed_state_with_it(tiny_qwen2, qwen_tokenizer):
    """An in-process run ends with accelerate's ``end_training``, which destroys torch.distributed's default
    group. A closed engine that something still referenced kept vLLM's world group, and the next engine in the
    process failed to start ("not initialized in the world group map"). In CI a kept log record held it: the
    start-up warning's traceback. ``close`` shuts the engine down whoever holds it, and that warning is gone."""
    import logging

    import torch.distributed as dist
    from vllm.distributed import parallel_state

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vllm.renderers.base").addHandler(handler)
    try:
        cfg = GenerationConfig(backend="vllm", max_model_len=256, kv_cache_gib=1)
        gen = make_generator(cfg, tiny_qwen2, qwen_tokenizer, "float32")
        held = gen.llm  # what a kept traceback did
        gen.close()
        assert parallel_state._WORLD is None and not dist.is_initialized()
        assert not any(r.exc_info for r in records), [r.getMessage() for r in records]
        if dist.is_initialized():  # what end_training does
            dist.destroy_process_group()
        gen = make_generator(cfg, tiny_qwen2, qwen_tokenizer, "float32")
        try:
            ids = encode_prompt(qwen_tokenizer, PROMPT)
            assert gen.generate([ids], 1, SamplingConfig(max_new_tokens=4))[0][0].token_ids
        finally:
            gen.close()
        del held
    finally:
        logging.getLogger("vllm.renderers.base").removeHandler(handler)


def test_answers_of_a_slow_tokenizer_are_decoded_whole_without_the_stop_token(qwen_tokenizer):
    from alignment.generation import VLLMGenerator

    class Slow:  # a Python tokenizer: no Rust backend (``_tokenizer``) to stream from
        def decode(self, ids, skip_special_tokens):
            return qwen_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    gen = object.__new__(VLLMGenerator)
    gen.tokenizer, gen.stop_ids = Slow(), [qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids = qwen_tokenizer("Forty-two.", add_special_tokens=False).input_ids
    assert gen._decode([1, 2], ids + gen.stop_ids, finished=True) == "Forty-two."
    gen.tokenizer = qwen_tokenizer  # the streaming path gives the same here
    assert gen._decode([1, 2], ids + gen.stop_ids, finished=True) == "Forty-two."


def seeded_runs(generator, tokenizer):
    """Answers to 12 prompts x 4 under seed 7, then again after unseeded sampling moved the engine's own stream,
    then the same prompts under seed 8, and the last 6 prompts alone under seed 7 + 6 x 4."""
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": f"Count to {i}."}]) for i in range(12)]
    s = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=7)
    ids = lambda out: [[c.token_ids for c in per_prompt] for per_prompt in out]  # noqa: E731
    first = ids(generator.generate(prompts, 4, s))
    generator.generate(prompts[:3], 5, SamplingConfig(temperature=1.0, max_new_tokens=16))
    again = ids(generator.generate(prompts, 4, s))
    other = ids(generator.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=8)))
    tail = ids(
        generator.generate(prompts[6:], 4, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=7 + 24))
    )
    return first, again, other, tail


def check_seeded(first, again, other):
    assert again == first  # the same draws whatever ran between
    assert other != first  # another seed, other draws
    assert all(len({tuple(a) for a in per_prompt}) > 1 for per_prompt in first)  # a prompt's answers differ


@pytest.mark.vllm
def test_a_seeded_vllm_call_repeats_whatever_ran_before_and_puts_the_stream_back(tiny_qwen2, qwen_tokenizer):
    generator = make_generator(
        GenerationConfig(backend="vllm", max_model_len=256, kv_cache_gib=1),
        tiny_qwen2,
        qwen_tokenizer,
        "float32",
    )
    try:
        first, again, other, _ = seeded_runs(generator, qwen_tokenizer)
        check_seeded(first, again, other)
        state = torch.get_rng_state()
        generator.generate([[1, 2, 3]], 2, SamplingConfig(temperature=1.0, max_new_tokens=4, seed=3))
        # Training's stream goes on as if nothing was sampled.
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        generator.close()


def test_seeded_transformers_sampling_repeats_per_prompt_whatever_ran_before(tiny_qwen2, qwen_tokenizer):
    generator = TransformersGenerator(GenerationConfig(), tiny_qwen2, qwen_tokenizer, "float32")
    first, again, other, tail = seeded_runs(generator, qwen_tokenizer)
    check_seeded(first, again, other)
    assert tail == first[6:]  # prompt i's answers follow seed + i * n alone, not its neighbours in the call


def test_a_seeded_call_to_a_vllm_server_seeds_each_request_and_names_the_cpu_builds_limit(qwen_tokenizer):
    """A fake server: it records each /v1/completions body and fails the request whose seed is 13."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from alignment.generation import VLLMServerGenerator

    bodies = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code, payload):
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.reply(200, {"data": [{"id": "m"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            if body.get("seed") == 13:
                return self.reply(500, {"error": "RuntimeError: CPU Generator does not use offset"})
            choices = [
                {"index": j, "text": "hi", "token_ids": [5], "finish_reason": "stop"}
                for j in range(body["n"])
            ]
            self.reply(200, {"choices": choices})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = GenerationConfig(
            backend="vllm_server",
            server_url=f"http://127.0.0.1:{server.server_port}",
            weights_dir="/nonexistent",
        )
        gen = VLLMServerGenerator(cfg, qwen_tokenizer)
        out = gen.generate([[1], [2], [3]], 2, SamplingConfig(seed=5))
        assert [len(a) for a in out] == [2, 2, 2]
        assert sorted((b["prompt"][0], b["seed"]) for b in bodies) == [(1, 5), (2, 7), (3, 9)]  # seed + i * n
        bodies.clear()
        gen.generate([[1]], 2, SamplingConfig())
        assert "seed" not in bodies[0]  # unseeded: the server's own stream
        with pytest.raises(RuntimeError, match=r"HTTP 500(.|\n)*a seeded call(.|\n)*eval.seed=null"):
            gen.generate(
                [[1], [2], [3], [4], [5]], 2, SamplingConfig(seed=5)
            )  # the 5th prompt: 5 + 4 x 2 = 13
    finally:
        server.shutdown()
