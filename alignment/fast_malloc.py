"""tcmalloc under the training, evaluation and generation processes: the same results, less time in the kernel.

PyTorch on a CPU allocates and frees the same large activation buffers every step. glibc's malloc hands the big
ones back to the kernel and faults them in again, page by page; tcmalloc keeps freed memory for the next step.
On this project's 2-core AMD EPYC, SFT of SmolLM2-135M ran 1.34x the tokens/s on tcmalloc (system time 16 -> 7 s
of a run's 91 -> 75 CPU seconds; ``bench/bench_malloc.py``), and the chain took 29 min 20 s where it had taken
37 min; vLLM's generation did not change. vLLM's CPU build asks for it too (its worker warns "libtcmalloc is
not found in LD_PRELOAD"). The allocator does not touch the arithmetic: weights are bit-identical with and
without it (``tests/test_fast_malloc.py``; the chain's four models too).

A preload has to be in a process's environment when it starts, so this module finds the library and builds that
environment; the chain runner starts every stage with it and the Makefile's stage targets do the same.
``make install`` fetches Debian's ``libtcmalloc-minimal4`` (gperftools 2.10, BSD-3-Clause) from the Debian
archive into ``<venv>/lib/native/``, checked against its sha256; a copy the system has also counts.

    python -m alignment.fast_malloc            # the library's path if there is one (the Makefile's LD_PRELOAD)
    python -m alignment.fast_malloc --install  # fetch it into this environment (what make install runs)

``ALIGNMENT_TCMALLOC=0`` turns it off; ``ALIGNMENT_TCMALLOC=/path/libtcmalloc.so`` uses that library.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import os
import platform
import subprocess
import sys
import tarfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path

LIBRARY = "libtcmalloc_minimal.so.4"
# Debian 12 (bookworm), main: the package keeps this file in the archive's pool for bookworm's lifetime.
DEB_URL = "http://deb.debian.org/debian/pool/main/g/google-perftools/libtcmalloc-minimal4_2.10-1_amd64.deb"
DEB_SHA256 = "464aa2e804b0d48300ad71edfe525599deed8765db4af7a8d9de60326dc8e4c7"
DEB_MEMBER = "./usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10"
SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def installed_path(prefix: str | os.PathLike = sys.prefix) -> Path:
    """Where ``--install`` puts the library in the environment at ``prefix``."""
    return Path(prefix) / "lib" / "native" / LIBRARY


def find_tcmalloc(
    environ: Mapping[str, str] = os.environ, prefix: str | os.PathLike = sys.prefix
) -> str | None:
    """The tcmalloc to preload: ``ALIGNMENT_TCMALLOC`` (a path, or 0/off/none/false for none), else this
    environment's copy, else the system's; None when there is none."""
    asked = environ.get("ALIGNMENT_TCMALLOC", "").strip()
    if asked.lower() in ("0", "off", "none", "false", "no"):
        return None
    if asked:
        if not Path(asked).is_file():
            raise FileNotFoundError(f"ALIGNMENT_TCMALLOC={asked}: no such file")
        return str(Path(asked).resolve())
    for candidate in (installed_path(prefix), *(Path(d) / LIBRARY for d in SYSTEM_DIRS)):
        if candidate.is_file():
            return str(candidate.resolve())
    return None


def preload_env(environ: Mapping[str, str] = os.environ, library: str | None = None) -> dict[str, str]:
    """A copy of ``environ`` whose LD_PRELOAD starts with tcmalloc (``library``, else ``find_tcmalloc``); unchanged
    when there is none or a tcmalloc is preloaded already. What was in LD_PRELOAD stays, after it."""
    env = dict(environ)
    library = library or find_tcmalloc(environ)
    current = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    if library is None or any("tcmalloc" in Path(p).name for p in current):
        return env
    env["LD_PRELOAD"] = ":".join([library, *current])
    return env


def loaded(maps: str | os.PathLike = "/proc/self/maps") -> bool:
    """Whether this process runs on tcmalloc (a tcmalloc library is mapped into it). False where unreadable."""
    try:
        return "libtcmalloc" in Path(maps).read_text()
    except OSError:
        return False


NO_TCMALLOC = (
    "no tcmalloc found: `python -m alignment.fast_malloc --install` (part of make install) fetches it"
)


def status_line() -> str:
    """One line for a process's log: which allocator it runs on and, if glibc's, how to change that."""
    if loaded():
        return "malloc: tcmalloc"
    found = find_tcmalloc()
    how = f"start it with LD_PRELOAD={found}" if found else NO_TCMALLOC
    return f"malloc: glibc's; on a CPU, training runs faster on tcmalloc ({how})"


def extract_from_deb(deb: bytes, member: str) -> bytes:
    """The bytes of ``member`` in a Debian package (an ar archive around ``data.tar.xz``)."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package: no ar archive header")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are padded to an even offset
        if name.startswith("data.tar"):
            data = lzma.decompress(body) if name.endswith(".xz") else body
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                try:
                    found = tar.extractfile(member)
                except KeyError:
                    found = None
                if found is None:
                    raise ValueError(f"{member} is not a file in the package's {name}")
                return found.read()
    raise ValueError("no data.tar member in the Debian package")


def check_preloads(library: str | os.PathLike) -> None:
    """Start a Python with ``library`` preloaded; raise if the loader refuses it (a C library older than the one
    the package was built for makes ld.so skip it with a message on every start)."""
    env = {**os.environ, "LD_PRELOAD": str(library)}
    proc = subprocess.run(
        [sys.executable, "-c", "print('ok')"], env=env, capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0 or proc.stdout.strip() != "ok" or "preload" in proc.stderr:
        raise RuntimeError(
            f"{library} does not preload here: {proc.stderr.strip()[-400:] or proc.returncode}"
        )


def install(
    prefix: str | os.PathLike = sys.prefix, url: str = DEB_URL, sha256: str = DEB_SHA256, check: bool = True
) -> Path:
    """Fetch the pinned package, check its sha256, write the library to ``installed_path(prefix)`` and, with
    ``check``, make sure a process starts with it preloaded; nothing is left behind when a step fails."""
    target = installed_path(prefix)
    with urllib.request.urlopen(url, timeout=60) as response:
        deb = response.read()
    digest = hashlib.sha256(deb).hexdigest()
    if digest != sha256:
        raise ValueError(f"{url}: sha256 {digest}, expected {sha256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(extract_from_deb(deb, DEB_MEMBER))
    try:
        if check:
            check_preloads(partial)
    except Exception:
        partial.unlink()
        raise
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m alignment.fast_malloc", description=__doc__.split("\n\n")[0])
    ap.add_argument("--install", action="store_true", help="fetch tcmalloc into this environment")
    args = ap.parse_args(argv)
    if not args.install:
        print(find_tcmalloc() or "")
        return 0
    if installed_path().is_file():
        print(f"tcmalloc: {installed_path()} (already there)")
        return 0
    if sys.platform != "linux" or platform.machine() != "x86_64":
        print(
            f"tcmalloc: not fetched on {sys.platform}/{platform.machine()} (the pinned package is x86_64 Linux)"
        )
        return 0
    try:
        path = install()
    except Exception as e:  # noqa: BLE001 - an optional speed-up: say why and go on
        print(
            f"tcmalloc: not installed ({type(e).__name__}: {e}); everything runs on glibc's malloc, slower on CPU"
        )
        return 0
    print(f"tcmalloc: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
