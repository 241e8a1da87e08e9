"""Sampling from a policy behind one small interface: online DPO, evaluation and data synthesis all use it.

    generator = make_generator(GenerationConfig(), model_path, tokenizer)
    answers = generator.generate(prompt_ids, n=8, sampling=SamplingConfig(temperature=0.8))
    # answers[i][j]: the j-th of n answers to prompt i, a Completion(text, token_ids, finished)
    generator.load_weights(model.state_dict().items())     # after an optimizer step, before sampling again

Prompts go in as token ids, never as text: a template that renders its own BOS would get a second one from
the engine's tokenizer (TRL issue: online DPO with text prompts). Answers come back as the sampled token ids,
so training sees exactly the tokens that were sampled (no re-tokenization drift) and their text for rewards.

Backends:
- ``vllm``: vLLM in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Weights are pushed with
  ``collective_rpc("reload_weights", weights_iterator=...)`` and the prefix cache is reset (writing into the
  vLLM model directly fails on vLLM's CPU build). The engine is seeded once; a call with ``sampling.seed``
  restarts its stream from that seed and puts it back after (per-request seeds crash vLLM's CPU build when a
  prompt is prefilled in chunks). The engine starts without a tokenizer of its own (``skip_tokenizer_init``) and
  the answers are decoded here, with the caller's tokenizer and the same incremental decoder vLLM uses
  (``DecodeStream`` primed with the prompt), so the text is vLLM's: vLLM 0.32 otherwise loads the tokenizer
  and deep-copies it twice for its renderer pool, 12 of the 16 s an engine took to start on a 151k-token
  vocabulary here (tiny-qwen2; 8.1 -> 5.3 s on SmolLM2). Stop strings and JSON-schema outputs need the
  engine's tokenizer: ``engine_tokenizer=True`` (data synthesis passes it; asking without it is an error).
- ``vllm_server``: a separate ``vllm serve`` (other GPUs or another host), started with
  ``VLLM_SERVER_DEV_MODE=1``. Sampling goes through its OpenAI-compatible ``/v1/completions`` with token-id
  prompts and ``return_token_ids``; a push writes the weights as safetensors into ``weights_dir`` (a path the
  server can read: the same machine or a shared file system), then calls ``/collective_rpc`` with
  ``reload_weights(weights_path=...)`` and ``/reset_prefix_cache``.
- ``transformers``: ``model.generate`` on a private copy of the policy; the fallback when vLLM is absent. With
  ``model_cfg`` it loads through ``load_causal_lm`` with those settings: Dual Chunk Attention and YaRN for
  prompts past the native window (``model.attn_implementation: dca``) run on this backend only.

``sequence_logprobs`` gives the engine's own log-probabilities of given answers, so a caller can check that
the engine samples from the weights it was last given (online DPO logs the difference).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    # 0: no top-k filtering.
    top_k: int = 0
    max_new_tokens: int = 256
    # Extra stop strings; the model's end-of-turn token always stops.
    stop: list[str] = field(default_factory=list)
    # A seeded call: its answers depend on the weights, the prompts and this seed alone, never on what the
    # sampler ran before, and two models asked the same prompts draw the same random numbers (common random
    # numbers: evaluations set it). transformers: answer j of the i-th prompt from seed + i * n, exactly;
    # vLLM in this process: the engine's stream restarts from the seed for the call (its CPU sampler takes each
    # step's per-row seeds from it in batch order, so two models' answers share their draws until their
    # batches differ; per-request seeds would couple them exactly but crash vLLM's CPU build when a prompt is
    # prefilled in chunks: "CPU Generator does not use offset"); a vLLM server: per-request seeds, seed + i * n
    # (a CPU-build server crashes the same way: leave it null there). null: the running stream.
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"sampling.max_new_tokens must be positive, got {self.max_new_tokens}")


@dataclass
class GenerationConfig:
    # auto: vllm when it imports, else transformers (said once in the log).
    backend: Literal["auto", "vllm", "vllm_server", "transformers"] = "auto"
    # Engine precision; auto: the policy's dtype; bf16_if_fast: bfloat16 where this machine runs it fast (a CUDA
    # GPU with bf16, a CPU with AVX512-BF16 or AMX), float32 elsewhere (see resolve_engine_dtype).
    dtype: Literal["auto", "float32", "bfloat16", "bf16_if_fast"] = "auto"
    # Longest prompt + answer the engine holds.
    max_model_len: int = 2048
    # vLLM's KV cache: GiB on CPU (VLLM_CPU_KVCACHE_SPACE), a share of GPU memory on CUDA.
    kv_cache_gib: float = 2.0
    gpu_memory_utilization: float = 0.3
    seed: int = 0
    # vllm_server: the server's base URL (e.g. http://127.0.0.1:8000) and a folder it can read weights from.
    server_url: str | None = None
    weights_dir: str | None = None
    # vllm_server: seconds to wait for one request.
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.backend == "vllm_server" and not (self.server_url and self.weights_dir):
            raise ValueError(
                "generation.backend: vllm_server needs generation.server_url and generation.weights_dir"
            )


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # as sampled, the end-of-turn token included when the answer reached it
    finished: bool  # stopped by the end-of-turn token or a stop string, not cut at max_new_tokens


class Generator(Protocol):
    name: str

    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig, json_schema: dict | None = None
    ) -> list[list[Completion]]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sequence_logprobs(self, prompt_ids: list[int], answer_ids: list[int]) -> list[float]: ...

    def close(self) -> None: ...


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is as absent as a missing one
        return False
    return True


def resolve_engine_dtype(requested: str, policy_dtype: str = "float32", fast_bf16: bool | None = None) -> str:
    """The dtype an engine runs in: ``auto`` is the policy's dtype, ``bf16_if_fast`` is bfloat16 where this
    machine has fast bf16 (``fast_bf16``; None: ask it, as ``training.mixed_precision: auto`` does) and float32
    elsewhere; "float32" and "bfloat16" are kept as asked. A CPU without AVX512-BF16 or AMX runs bf16 10-100x
    slower than fp32; on one with them the evaluation's greedy answers took 54 s in bf16 against 75 s in fp32
    (recipes/eval.yaml)."""
    if requested == "auto":
        return policy_dtype
    if requested != "bf16_if_fast":
        return requested
    if fast_bf16 is None:
        from alignment.training import resolve_mixed_precision

        fast_bf16 = resolve_mixed_precision("auto") == "bf16"
    return "bfloat16" if fast_bf16 else "float32"


def make_generator(
    cfg: GenerationConfig,
    model_path: str,
    tokenizer,
    policy_dtype: str = "float32",
    model_cfg=None,
    engine_tokenizer: bool = False,
) -> Generator:
    """The backend the config names; ``auto`` falls back to transformers when vLLM does not import.

    ``model_cfg`` (a ``ModelConfig``): how the transformers backend loads the model (attention, YaRN).
    ``engine_tokenizer``: an in-process vLLM engine loads its own tokenizer, for stop strings and JSON-schema
    outputs (see the module docstring); without it the engine starts faster and the text is the same.
    """
    backend = cfg.backend
    if model_cfg is not None and backend != "transformers":
        raise ValueError(
            f"generation.backend {backend}: model settings (attn_implementation {model_cfg.attn_implementation}) "
            "apply to the transformers backend only; set generation.backend: transformers"
        )
    if backend == "auto":
        backend = "vllm" if vllm_available() else "transformers"
        if backend == "transformers":
            print(
                "[generation] vLLM is not installed: sampling with transformers generate (slower)", flush=True
            )
    dtype = resolve_engine_dtype(cfg.dtype, policy_dtype)
    if backend == "vllm":
        return VLLMGenerator(cfg, model_path, tokenizer, dtype, engine_tokenizer=engine_tokenizer)
    if backend == "vllm_server":
        return VLLMServerGenerator(cfg, tokenizer)
    return TransformersGenerator(cfg, model_path, tokenizer, dtype, model_cfg)


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


# --------------------------------------------------------------------------------------------------------------
# vLLM in this process
# --------------------------------------------------------------------------------------------------------------


class VLLMGenerator:
    name = "vllm"

    def __init__(
        self, cfg: GenerationConfig, model_path: str, tokenizer, dtype: str, engine_tokenizer: bool = False
    ):
        # Must be set before vLLM starts its engine: the engine runs in this process, so weights can be pushed.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.kv_cache_gib))))
        from vllm import LLM

        quiet = _WarmupWithoutTokenizer() if not engine_tokenizer else None
        if quiet:
            logging.getLogger("vllm.renderers.base").addFilter(quiet)
        self._casts = _AskedForCasts(dtype)
        logging.getLogger(_AskedForCasts.LOGGER).addFilter(self._casts)
        try:
            self.llm = LLM(
                model=model_path,
                dtype=dtype,
                max_model_len=cfg.max_model_len,
                enforce_eager=True,
                seed=cfg.seed,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                enable_prefix_caching=True,
                skip_tokenizer_init=not engine_tokenizer,
            )
        except BaseException:  # no engine, so no close(): the casts' filter goes now
            logging.getLogger(_AskedForCasts.LOGGER).removeFilter(self._casts)
            raise
        finally:
            if quiet:
                logging.getLogger("vllm.renderers.base").removeFilter(quiet)
        self._casts.report(f"loading {model_path}")
        self.engine_tokenizer = engine_tokenizer
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op once it has bound its threads: the
        # engine and the training steps between samplings share the thread count this process started with.
        self.tokenizer = tokenizer
        self.stop_ids = _stop_ids(tokenizer)

    def _params(self, n: int, s: SamplingConfig, **extra):
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            max_tokens=s.max_new_tokens,
            stop=list(s.stop) or None,
            stop_token_ids=self.stop_ids,
            **extra,
        )

    def _run(self, prompts, params):
        from vllm.inputs import TokensPrompt

        return self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )

    def generate(self, prompt_ids, n, sampling, json_schema=None):
        if not self.engine_tokenizer and (sampling.stop or json_schema is not None):
            raise ValueError(
                f"the vLLM engine was started without its tokenizer: {'stop strings' if sampling.stop else 'a JSON schema'}"
                " need it (make_generator(..., engine_tokenizer=True))"
            )
        extra = {}
        if json_schema is not None:  # vLLM's structured outputs (xgrammar): the answer parses as the schema
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = StructuredOutputsParams(json=json_schema)
        if sampling.seed is None:
            outs = self._run(prompt_ids, self._params(n, sampling, **extra))
        else:  # the engine's stream from the seed, then back where it was (see SamplingConfig.seed)
            state = torch.get_rng_state()
            torch.manual_seed(sampling.seed)
            try:
                outs = self._run(prompt_ids, self._params(n, sampling, **extra))
            finally:
                torch.set_rng_state(state)
        result = []
        for prompt, out in zip(prompt_ids, outs, strict=True):
            answers = []
            for o in out.outputs:
                ids, finished = list(o.token_ids), o.finish_reason == "stop"
                text = o.text if self.engine_tokenizer else self._decode(prompt, ids, finished)
                answers.append(Completion(text, ids, finished))
            result.append(answers)
        return result

    def _decode(self, prompt: list[int], ids: list[int], finished: bool) -> str:
        """The text vLLM's own detokenizer would give (``FastIncrementalDetokenizer``): a ``DecodeStream``
        primed with the prompt, stepped token by token, special tokens skipped, the stop token left out; a
        multi-byte character cut off by ``max_new_tokens`` gives nothing (a whole decode would give U+FFFD)."""
        from tokenizers.decoders import DecodeStream

        if finished and ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer has no DecodeStream: one whole decode
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        stream = DecodeStream(ids=list(prompt), skip_special_tokens=True)
        parts = []
        for token in ids:
            try:
                piece = stream.step(backend, token)
            except Exception as e:  # noqa: BLE001 - vLLM's recovery: a fresh stream after an invalid prefix
                if not str(e).startswith("Invalid prefix encountered"):
                    raise
                stream = DecodeStream(skip_special_tokens=True)
                piece = stream.step(backend, token)
            parts.append(piece or "")
        return "".join(parts)

    def load_weights(self, named_tensors):
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        self.llm.reset_prefix_cache()
        self._casts.report("a weight push")

    def sequence_logprobs(self, prompt_ids, answer_ids):
        seq = list(prompt_ids) + list(answer_ids)
        out = self._run(
            [seq], self._params(1, SamplingConfig(temperature=0.0, max_new_tokens=1), prompt_logprobs=0)
        )
        lp = out[0].prompt_logprobs
        return [lp[t][seq[t]].logprob for t in range(len(prompt_ids), len(seq))]

    def close(self) -> None:
        """Shut the engine down now: its distributed state (vLLM's world group, torch.distributed's default
        group) goes with it, whoever still holds a reference to the engine. Left to the garbage collector, a
        later ``accelerator.end_training()`` destroyed the default group under a live world group, and the next
        engine in the process failed to start ("not initialized in the world group map")."""
        logging.getLogger(_AskedForCasts.LOGGER).removeFilter(self._casts)
        llm = self.__dict__.pop("llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()


class _WarmupWithoutTokenizer(logging.Filter):
    """``LLM()`` warms up a chat template, which needs the tokenizer the engine was started without: vLLM logs
    "Chat template warmup failed" with a traceback on every start. Dropped while such an engine starts: the
    record's traceback held the frames of ``LLM.__init__`` (the engine) for as long as a handler kept it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")


class _AskedForCasts(logging.Filter):
    """vLLM warns once per tensor ("Attempted to load weight ... with dtype torch.float32 into parameter with dtype
    torch.bfloat16") when it casts a checkpoint's weights to the engine's dtype: 122 lines for SmolLM2 at every
    bf16 engine start, a third of a chain's console output. A cast into the dtype the engine was asked for is
    what was asked: those records are counted and said in one line (``report``); any other mismatch still warns."""

    LOGGER = "vllm.model_executor.models.utils"

    def __init__(self, dtype: str):
        super().__init__()
        self.into = f"torch.{dtype}"
        self.count: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if not (str(record.msg).startswith("Attempted to load weight %s with dtype") and len(args) == 3):
            return True
        if str(args[2]) != self.into:
            return True
        source = str(args[1]).removeprefix("torch.")
        self.count[source] = self.count.get(source, 0) + 1
        return False

    def report(self, where: str) -> None:
        if self.count:
            casts = ", ".join(f"{n} {source}" for source, n in sorted(self.count.items()))
            print(
                f"[generation] {where}: vLLM cast {casts} tensors to {self.into.removeprefix('torch.')}, the engine's dtype"
            )
            self.count.clear()


# --------------------------------------------------------------------------------------------------------------
# A separate `vllm serve`
# --------------------------------------------------------------------------------------------------------------


class VLLMServerGenerator:
    """Talks to ``VLLM_SERVER_DEV_MODE=1 vllm serve MODEL ...``; see the module docstring for the push."""

    name = "vllm_server"

    def __init__(self, cfg: GenerationConfig, tokenizer):
        self.url = cfg.server_url.rstrip("/")
        self.weights_dir = Path(cfg.weights_dir)
        self.timeout = cfg.request_timeout_s
        self.tokenizer = tokenizer
        self.stop_ids = _stop_ids(tokenizer)
        models = self._request("GET", "/v1/models")
        self.model = models["data"][0]["id"]
        self.version = 0

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            raise RuntimeError(
                f"vllm server {self.url}{path}: HTTP {e.code}: {e.read().decode()[:500]}"
            ) from None
        except urllib.error.URLError as e:
            raise RuntimeError(f"vllm server {self.url}{path}: unreachable ({e.reason})") from None
        return json.loads(text) if text.strip() else {}

    def _completions(
        self, prompt: list[int], n: int, s: SamplingConfig, seed: int | None = None, **extra
    ) -> dict:
        if seed is not None:
            extra["seed"] = seed  # vLLM gives answer j of the request seed + j (its parallel sampling)
        body = {
            "model": self.model,
            "prompt": list(prompt),
            "n": n,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k if s.top_k > 0 else -1,
            "max_tokens": s.max_new_tokens,
            "stop": list(s.stop) or None,
            "stop_token_ids": self.stop_ids,
            "skip_special_tokens": True,
            "return_token_ids": True,
            **extra,
        }
        return self._request("POST", "/v1/completions", body)

    def generate(self, prompt_ids, n, sampling, json_schema=None):
        from concurrent.futures import ThreadPoolExecutor

        extra = {} if json_schema is None else {"structured_outputs": {"json": json_schema}}
        # One request per prompt, sent together: the server batches them.
        with ThreadPoolExecutor(max_workers=min(32, max(1, len(prompt_ids)))) as pool:
            seeds = [None if sampling.seed is None else sampling.seed + i * n for i in range(len(prompt_ids))]
            try:
                replies = list(
                    pool.map(
                        lambda p, seed: self._completions(p, n, sampling, seed, **extra), prompt_ids, seeds
                    )
                )
            except RuntimeError as e:
                if sampling.seed is None:
                    raise
                raise RuntimeError(
                    f"{e}\n(a seeded call: a vLLM server on vLLM's CPU build fails on per-request seeds once a "
                    "prompt is prefilled in chunks; sample unseeded there, e.g. eval.seed=null)"
                ) from None
        out = []
        for reply in replies:
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            out.append(
                [Completion(c["text"], list(c["token_ids"]), c["finish_reason"] == "stop") for c in choices]
            )
        return out

    def load_weights(self, named_tensors):
        from safetensors.torch import save_file

        # A fresh folder per push: the server never reads a half-written file.
        self.version += 1
        folder = self.weights_dir / f"push-{self.version:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        # Tied weights (embeddings = output head) share memory, which safetensors refuses: copy the second name
        # (the engine needs both: with the output head left out it keeps the old one).
        tensors, seen = {}, set()
        for k, v in named_tensors:
            v = v.detach().to("cpu").contiguous()
            tensors[k] = v.clone() if v.data_ptr() in seen else v
            seen.add(v.data_ptr())
        save_file(tensors, str(folder / "model.safetensors"))
        self._request(
            "POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}
        )
        self._request("POST", "/reset_prefix_cache")
        old = self.weights_dir / f"push-{self.version - 1:06d}"
        if old.is_dir():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def sequence_logprobs(self, prompt_ids, answer_ids):
        seq = list(prompt_ids) + list(answer_ids)
        reply = self._completions(
            seq, 1, SamplingConfig(temperature=0.0, max_new_tokens=1), prompt_logprobs=0
        )
        lp = reply["choices"][0].get("prompt_logprobs") or reply.get("prompt_logprobs")
        return [_entry_logprob(lp[t], seq[t]) for t in range(len(prompt_ids), len(seq))]

    def close(self) -> None:
        pass


def _entry_logprob(entry: dict, token: int) -> float:
    value = entry[str(token)] if str(token) in entry else entry[token]
    return value["logprob"] if isinstance(value, dict) else float(value)


def wait_for_server(url: str, timeout_s: float = 600.0, proc=None) -> None:
    """Block until ``url``/health answers (a just-started ``vllm serve`` loads for a while)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"vllm server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1.0)
    raise TimeoutError(f"vllm server at {url} not ready after {timeout_s:.0f} s")


# --------------------------------------------------------------------------------------------------------------
# transformers generate: the fallback
# --------------------------------------------------------------------------------------------------------------


class TransformersGenerator:
    name = "transformers"

    def __init__(self, cfg: GenerationConfig, model_path: str, tokenizer, dtype: str, model_cfg=None):
        from transformers import AutoModelForCausalLM

        if model_cfg is None:
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
        else:  # generate keeps its KV cache although load_causal_lm sets config.use_cache = False
            from dataclasses import replace

            from alignment.models import load_causal_lm

            model_cfg = replace(model_cfg, dtype=dtype)
            self.model = load_causal_lm(model_cfg, cfg.max_model_len, model_path, trainable=False)
        self.tokenizer = tokenizer
        self.stop_ids = _stop_ids(tokenizer)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.warned_schema = False

    @torch.no_grad()
    def generate(self, prompt_ids, n, sampling, json_schema=None):
        if json_schema is not None and not self.warned_schema:
            print("[generation] transformers backend: the JSON schema is not enforced (vLLM enforces it); "
                  "answers that do not parse are the caller's to drop and count", flush=True)  # fmt: skip
            self.warned_schema = True
        out = []
        # One prompt at a time: no padding inside a prompt's n answers.
        for i, prompt in enumerate(prompt_ids):
            ids = torch.tensor([list(prompt)] * n)
            greedy = sampling.temperature == 0
            if sampling.seed is None:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
            else:
                torch.manual_seed(sampling.seed + i * n)
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=not greedy,
                temperature=sampling.temperature if not greedy else None,
                top_p=sampling.top_p if not greedy else None,
                top_k=sampling.top_k if sampling.top_k > 0 and not greedy else None,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad,
                stop_strings=list(sampling.stop) or None,
                tokenizer=self.tokenizer if sampling.stop else None,
            )[:, ids.shape[1] :]
            answers = []
            for row in gen.tolist():
                cut = next((k + 1 for k, t in enumerate(row) if t in self.stop_ids), None)
                tokens = row[:cut] if cut else row
                finished = cut is not None
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if sampling.stop and not finished:
                    hit = min((text.find(s) for s in sampling.stop if s in text), default=-1)
                    if hit >= 0:
                        text, finished = text[:hit], True
                answers.append(Completion(text, tokens, finished))
            out.append(answers)
        return out

    @torch.no_grad()
    def load_weights(self, named_tensors):
        self.model.load_state_dict(dict(named_tensors), strict=False)

    @torch.no_grad()
    def sequence_logprobs(self, prompt_ids, answer_ids):
        seq = torch.tensor([list(prompt_ids) + list(answer_ids)])
        logp = self.model(seq).logits[0].float().log_softmax(-1)
        p = len(prompt_ids)
        return [logp[t - 1, seq[0, t]].item() for t in range(p, seq.shape[1])]

    def close(self) -> None:
        del self.model
