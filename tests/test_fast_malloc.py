"""tcmalloc for the stages (alignment/fast_malloc.py): where the library is looked for, the environment a stage
starts with, the Debian package it is taken from, and that training on it gives the very same weights."""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from alignment import fast_malloc
from alignment.fast_malloc import extract_from_deb, find_tcmalloc, install, installed_path, preload_env
from tests.conftest import REPO

REAL = find_tcmalloc({})  # what make install fetched, or the system's copy


@pytest.fixture
def no_system_copy(monkeypatch):
    monkeypatch.setattr(fast_malloc, "SYSTEM_DIRS", ())


def test_the_environments_copy_is_found_and_the_switch_turns_it_off(tmp_path, no_system_copy):
    assert find_tcmalloc({}, prefix=tmp_path) is None
    lib = installed_path(tmp_path)
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF")
    assert find_tcmalloc({}, prefix=tmp_path) == str(lib.resolve())
    for off in ("0", "off", "None", "false"):
        assert find_tcmalloc({"ALIGNMENT_TCMALLOC": off}, prefix=tmp_path) is None


def test_a_library_named_by_the_variable_wins_and_a_missing_one_is_an_error(tmp_path, no_system_copy):
    mine = tmp_path / "libtcmalloc.so"
    mine.write_bytes(b"\x7fELF")
    assert find_tcmalloc({"ALIGNMENT_TCMALLOC": str(mine)}, prefix=tmp_path / "venv") == str(mine.resolve())
    with pytest.raises(FileNotFoundError, match="ALIGNMENT_TCMALLOC=.*nowhere.so"):
        find_tcmalloc({"ALIGNMENT_TCMALLOC": str(tmp_path / "nowhere.so")})


def test_the_preload_goes_first_keeps_what_was_there_and_is_not_doubled():
    lib = "/venv/lib/native/libtcmalloc_minimal.so.4"
    assert preload_env({"A": "1"}, lib) == {"A": "1", "LD_PRELOAD": lib}
    assert preload_env({"LD_PRELOAD": "/x/libfoo.so"}, lib)["LD_PRELOAD"] == f"{lib}:/x/libfoo.so"
    theirs = {"LD_PRELOAD": "/opt/libtcmalloc.so.4"}
    assert preload_env(theirs, lib) == theirs
    assert preload_env({"A": "1", "ALIGNMENT_TCMALLOC": "0"}) == {"A": "1", "ALIGNMENT_TCMALLOC": "0"}


def ar_member(name: str, body: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
    return header + body + (b"\n" if len(body) % 2 else b"")


def make_deb(files: dict[str, bytes]) -> bytes:
    """A Debian package as dpkg-deb writes one: debian-binary, control.tar.xz, data.tar.xz in an ar archive."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for path, body in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return (
        b"!<arch>\n"
        + ar_member("debian-binary", b"2.0\n")
        + ar_member("control.tar.xz", lzma.compress(b"odd"))  # an odd size: the next member is padded
        + ar_member("data.tar.xz", lzma.compress(data.getvalue()))
    )


def test_the_library_is_read_out_of_the_debian_package():
    deb = make_deb({"./usr/share/doc/x": b"doc", fast_malloc.DEB_MEMBER: b"\x7fELF the library"})
    assert extract_from_deb(deb, fast_malloc.DEB_MEMBER) == b"\x7fELF the library"
    with pytest.raises(ValueError, match="other.so is not a file"):
        extract_from_deb(deb, "./usr/lib/other.so")
    with pytest.raises(ValueError, match="not a Debian package"):
        extract_from_deb(b"PK\x03\x04", fast_malloc.DEB_MEMBER)


def test_install_checks_the_sha256_and_that_the_library_preloads_and_leaves_nothing_otherwise(tmp_path):
    deb = make_deb({fast_malloc.DEB_MEMBER: b"\x7fELF the library"})
    (tmp_path / "p.deb").write_bytes(deb)
    url = (tmp_path / "p.deb").as_uri()
    with pytest.raises(ValueError, match="sha256"):
        install(tmp_path / "venv", url=url, sha256="0" * 64)
    assert not (tmp_path / "venv").exists()
    sha = hashlib.sha256(deb).hexdigest()
    with pytest.raises(RuntimeError, match="does not preload here"):  # not a library the loader takes
        install(tmp_path / "venv", url=url, sha256=sha)
    assert not any((tmp_path / "venv").rglob("*tcmalloc*"))
    path = install(tmp_path / "venv", url=url, sha256=sha, check=False)
    assert path == installed_path(tmp_path / "venv") and path.read_bytes() == b"\x7fELF the library"


@pytest.mark.skipif(REAL is None, reason="no tcmalloc here (make install fetches it)")
def test_the_real_library_preloads(tmp_path):
    fast_malloc.check_preloads(REAL)


def sft_weights(out: Path, env: dict[str, str]) -> tuple[bytes, str]:
    """Three SFT steps of tiny-qwen2 on the shipped demonstrations (bf16 autocast where the CPU runs it fast), in
    a process started with ``env``; (the saved weights, the run's console)."""
    cmd = [
        sys.executable, str(REPO / "alignment/sft.py"), str(REPO / "recipes/sft.yaml"),
        "model.name_or_path=tiny-qwen2", "model.rope_scaling=null", "data.max_length=256",
        "training.max_steps=3", "training.save_steps=0", "logging.report_to=[]", "logging.progress_bar=false",
        f"training.output_dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return (out / "model.safetensors").read_bytes(), proc.stdout + proc.stderr


@pytest.mark.skipif(REAL is None, reason="no tcmalloc here (make install fetches it)")
def test_training_on_tcmalloc_gives_the_same_weights_bit_for_bit(tmp_path, tiny_qwen2):
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ALIGNMENT_TCMALLOC")}
    fast, fast_log = sft_weights(tmp_path / "tcmalloc", preload_env(base, REAL))
    slow, slow_log = sft_weights(tmp_path / "glibc", base)
    assert "[train] malloc: tcmalloc" in fast_log
    assert "[train] malloc: glibc's" in slow_log and f"LD_PRELOAD={REAL}" in slow_log
    assert hashlib.sha256(fast).hexdigest() == hashlib.sha256(slow).hexdigest()


def test_the_benchmark_sets_and_removes_variables_of_its_children(monkeypatch):
    """bench/bench_malloc.py runs its glibc side without LD_PRELOAD and its tcmalloc side with it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_machine", REPO / "bench" / "machine.py")
    machine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(machine)
    monkeypatch.setenv("LD_PRELOAD", "/nowhere/libinherited.so")
    monkeypatch.setenv("KEEP", "kept")
    show = "import json, os; print('RESULT ' + json.dumps({k: os.environ.get(k) for k in ('LD_PRELOAD', 'KEEP', 'NEW')}))"
    result = machine.run_child(
        [sys.executable, "-c", show], "env", env_overrides={"LD_PRELOAD": None, "NEW": "1"}
    )
    assert (result["LD_PRELOAD"], result["KEEP"], result["NEW"]) == (None, "kept", "1")
