"""training.mixed_precision: auto follows the hardware (bf16 only where it is fast)."""

from __future__ import annotations

from alignment.training import cpu_has_fast_bf16, resolve_mixed_precision

EPYC_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
EPYC_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
SAPPHIRE = "flags\t\t: avx512f amx_bf16 amx_tile\n"


def test_cpu_flags():
    assert cpu_has_fast_bf16(EPYC_BF16)
    assert cpu_has_fast_bf16(SAPPHIRE)
    assert not cpu_has_fast_bf16(EPYC_AVX2)
    # A flag name that only contains the word is not the flag.
    assert not cpu_has_fast_bf16("flags\t\t: avx512_bf16x\n")


def test_auto_follows_the_cpu_and_explicit_choices_stay():
    assert resolve_mixed_precision("auto", EPYC_BF16, cuda=False) == "bf16"
    assert resolve_mixed_precision("auto", EPYC_AVX2, cuda=False) == "no"
    assert resolve_mixed_precision("bf16", EPYC_AVX2, cuda=False) == "bf16"
    assert resolve_mixed_precision("no", EPYC_BF16, cuda=False) == "no"
