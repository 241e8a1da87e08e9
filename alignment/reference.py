"""Reference log-probs for DPO: from a frozen copy, from the LoRA base, or computed once and cached on disk.

The cache is keyed by everything that changes the numbers: the reference weights (a hash of every tensor),
the tokenized pairs (which covers the data, the chat template, tokenization and truncation settings), the
dtype and mixed precision. The same key reuses the file; any change computes a new one. A damaged or partial
file (it fails to load, its key or checksum does not match, or its shape is off) is reported and rebuilt,
never trusted. Files are written to a temporary name and renamed, so a crash leaves no half-written cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from alignment.data import PairSequences

# Bumped when the log-probs' arithmetic changes (2: log_softmax + gather instead of logit - logsumexp, equal
# to about 2e-6), so that no reference computed by other code is reused.
CACHE_VERSION = 2


def fingerprint_model(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, shapes, dtypes, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_pairs(pairs: list[PairSequences]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        for s in (p.chosen, p.rejected):
            h.update(torch.tensor(s.input_ids, dtype=torch.int64).numpy().tobytes())
            h.update(torch.tensor(s.labels, dtype=torch.int64).numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()


def cache_key(model_fp: str, pairs_fp: str, settings: dict) -> str:
    text = f"v{CACHE_VERSION}|{model_fp}|{pairs_fp}|{sorted(settings.items())}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def load_cache(path: Path, key: str, n_pairs: int) -> torch.Tensor | None:
    """The cached (n_pairs, 2) reference log-probs, or None (with the reason printed) when unusable."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        logps = blob["logps"]
        ok = blob["key"] == key and logps.shape == (n_pairs, 2) and blob["digest"] == _digest(logps)
    except Exception as e:  # truncated zip, wrong format, missing fields: all mean rebuild
        print(f"[reference] cache {path} is damaged ({type(e).__name__}); rebuilding", flush=True)
        return None
    if not ok:
        print(f"[reference] cache {path} does not match its key or checksum; rebuilding", flush=True)
        return None
    return logps


def save_cache(path: Path, key: str, logps: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"key": key, "logps": logps, "digest": _digest(logps)}, tmp)
    os.replace(tmp, path)


def cached_reference_logps(
    path: Path, key: str, n_pairs: int, compute: Callable[[], torch.Tensor], accelerator
) -> tuple[torch.Tensor, bool]:
    """Load from ``path`` or compute (every process its share, inside ``compute``) and save. -> (logps, hit)."""
    logps = load_cache(path, key, n_pairs)
    hit = logps is not None
    accelerator.wait_for_everyone()
    # Every process must agree on hit/miss, or some would wait in compute's collectives forever.
    hits = accelerator.gather(torch.tensor([int(hit)], device=accelerator.device))
    if bool(hits.min().item()):
        return logps, True
    logps = compute()
    if accelerator.is_main_process:
        save_cache(path, key, logps)
    accelerator.wait_for_everyone()
    return logps, False
