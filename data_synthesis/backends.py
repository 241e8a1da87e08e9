"""Where data-synthesis pipelines sample from (``backend:`` in a recipe).

- ``local``: the generation interface online DPO and evaluation use (``alignment/generation.py``): vLLM in this
  process, transformers as the fallback, or a ``vllm_server`` it pushes nothing to. The model loads on the first
  sample that is not in the cache, so a run whose generations are all cached loads nothing.
- ``openai``: any OpenAI-compatible ``/v1/chat/completions`` endpoint (``vllm serve BIG-MODEL``, a hosted API),
  with retries on connection errors, 429 and 5xx (exponential backoff), a timeout, and at most ``concurrency``
  requests in flight. ``json_schema`` becomes ``response_format: json_schema``.
- ``ScriptedBackend`` (tests only, not a recipe setting): answers from a Python function, so a pipeline's logic is
  tested without a model.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from alignment.generation import Completion, GenerationConfig, SamplingConfig
from data_synthesis.engine import Backend, Messages, _sha


@dataclass
class BackendConfig:
    # local: the generation interface (vLLM / transformers); openai: an OpenAI-compatible HTTP endpoint.
    kind: Literal["local", "openai"] = "local"
    # local: a model folder or built-in name; openai: the model name the endpoint serves.
    model: str = "smollm2-135m-instruct"
    # local: backend (auto/vllm/transformers/vllm_server), engine size, seed.
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_model_len=2048))
    dtype: Literal["float32", "bfloat16"] = "float32"
    # openai: the base URL, e.g. http://127.0.0.1:8000/v1 for `vllm serve`; the API key is read from this
    # environment variable (unset: no Authorization header).
    url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    retries: int = 4
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.kind == "openai" and not self.url:
            raise ValueError("backend.kind openai needs backend.url (e.g. http://127.0.0.1:8000/v1)")
        if self.concurrency < 1 or self.retries < 0:
            raise ValueError("backend.concurrency must be >= 1 and backend.retries >= 0")


def make_backend(cfg: BackendConfig) -> Backend:
    if cfg.kind == "openai":
        return OpenAIBackend(cfg)
    return LocalBackend(cfg)


class LocalBackend(Backend):
    """The policy through ``make_generator``; conversations are rendered with the model's chat template and sent
    as token ids."""

    def __init__(self, cfg: BackendConfig):
        from alignment.models import resolve_model

        self.cfg = cfg
        self.path = resolve_model(cfg.model)
        self.name = cfg.model
        self._fingerprint: str | None = None
        self._generator = None
        self._tokenizer = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from alignment.evaluation import fingerprint_weights

            self._fingerprint = "local:" + fingerprint_weights(self.path)
        return self._fingerprint

    def chat(self, conversations, n, sampling, json_schema=None):
        from alignment.data import encode_prompt

        if self._generator is None:
            from alignment.generation import make_generator
            from alignment.models import load_tokenizer

            print(f"[synthesis] loading {self.cfg.model} ({self.cfg.generation.backend})", flush=True)
            self._tokenizer = load_tokenizer(self.path)
            # The engine's own tokenizer: synthesis asks for JSON-schema outputs and stop strings.
            self._generator = make_generator(
                self.cfg.generation, self.path, self._tokenizer, self.cfg.dtype, engine_tokenizer=True
            )
        ids = [encode_prompt(self._tokenizer, c) for c in conversations]
        limit = self.cfg.generation.max_model_len - sampling.max_new_tokens
        too_long = [i for i, p in enumerate(ids) if len(p) > limit]
        if too_long:
            raise ValueError(
                f"{len(too_long)} prompt(s) are longer than generation.max_model_len - max_new_tokens = {limit} "
                f"tokens (the first has {len(ids[too_long[0]])}): raise backend.generation.max_model_len"
            )
        return self._generator.generate(ids, n, sampling, json_schema=json_schema)

    def close(self) -> None:
        if self._generator is not None:
            self._generator.close()
            self._generator = None


class EndpointError(RuntimeError):
    pass


class OpenAIBackend(Backend):
    """``POST {url}/chat/completions``, one request per conversation (with ``n``), ``concurrency`` at a time."""

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        self.name = f"{cfg.model}@{self.url}"
        self.key = os.environ.get(cfg.api_key_env)
        self.retried = 0
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        # An endpoint's weights cannot be hashed from here: its URL and model name stand for them.
        return "openai:" + _sha([self.url, self.cfg.model])

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                with self._lock:
                    self.retried += 1
                time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)))
            req = urllib.request.Request(
                self.url + "/chat/completions", data=data, headers=headers, method="POST"
            )
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read().decode(errors='replace')[:300]}"
                if e.code != 429 and e.code < 500:  # a bad request does not get better by retrying
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"unreachable ({getattr(e, 'reason', e)})"
        raise EndpointError(f"endpoint {self.url}: {last} (after {attempt + 1} attempt(s))")

    def _one(self, conv: Messages, n: int, s: SamplingConfig, json_schema: dict | None) -> list[Completion]:
        body = {"model": self.cfg.model, "messages": conv, "n": n, "temperature": s.temperature,
                "top_p": s.top_p, "max_tokens": s.max_new_tokens}  # fmt: skip
        if s.stop:
            body["stop"] = list(s.stop)
        if s.top_k > 0:
            body["top_k"] = s.top_k  # vLLM's extension; other servers ignore unknown fields or reject them
        if json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": json_schema}}  # fmt: skip
        reply = self._post(body)
        try:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            out = [
                Completion(c["message"]["content"] or "", [], c.get("finish_reason") == "stop")
                for c in choices
            ]
        except (KeyError, TypeError) as e:
            raise EndpointError(f"endpoint {self.url}: unexpected reply ({type(e).__name__}: {e})") from None
        if len(out) != n:
            raise EndpointError(f"endpoint {self.url}: asked for n={n} answers, got {len(out)}")
        return out

    def chat(self, conversations, n, sampling, json_schema=None):
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(lambda c: self._one(c, n, sampling, json_schema), conversations))


class ScriptedBackend(Backend):
    """Answers from ``respond(conversation, sample_index) -> str`` (tests). ``calls`` counts conversations sent."""

    def __init__(
        self, respond: Callable[[Messages, int], str], name: str = "scripted", finished: bool = True
    ):
        self.respond = respond
        self.name = name
        self.finished = finished
        self.calls = 0
        self.batches: list[int] = []

    @property
    def fingerprint(self) -> str:
        return "scripted:" + self.name

    def chat(self, conversations, n, sampling, json_schema=None):
        self.calls += len(conversations)
        self.batches.append(len(conversations))
        return [[Completion(self.respond(c, j), [], self.finished) for j in range(n)] for c in conversations]
