"""bench/_isa.py: `--isa avx2` really caps every math library torch uses, and says so.

A cap that silently does not take would make an AVX2 figure an AVX-512 one, so the check reads
what the libraries themselves report (oneDNN and MKL verbose output, ATen's capability) in a
child started under the caps.
"""
import platform

import pytest

from bench._isa import check_caps, isa_env, library_isas, parse_isas, with_isa

x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 only")


def test_isa_names_are_checked_and_listed_in_order():
    assert parse_isas("native,avx2") == ["native", "avx2"]
    with pytest.raises(SystemExit, match="choose from native, avx2"):
        parse_isas("avx512")


def test_native_drops_inherited_caps_and_avx2_sets_all_three():
    inherited = {"ONEDNN_MAX_CPU_ISA": "AVX2", "PATH": "/bin"}
    assert isa_env("native", inherited) == {"PATH": "/bin"}
    assert {k: v for k, v in isa_env("avx2", inherited).items() if k != "PATH"} == {
        "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_a_child_gets_exactly_one_isa_option():
    assert with_isa(["b.py", "--isa", "native,avx2", "--steps", "3"], "avx2") == ["b.py", "--steps", "3", "--isa=avx2"]
    assert with_isa(["b.py", "--isa=avx2"], "native") == ["b.py", "--isa=native"]


def test_a_library_above_avx2_under_the_cap_is_reported():
    libs = {"mkl": "Intel(R) AVX-512", "onednn": "Intel AVX2", "aten": "AVX2"}
    assert check_caps("avx2", libs) == ["mkl reports 'Intel(R) AVX-512' under --isa avx2"]
    assert check_caps("native", libs) == []


@x86
def test_under_the_avx2_cap_every_library_reports_avx2():
    libs = library_isas("avx2")
    assert check_caps("avx2", libs) == [], libs
    assert "AVX2" in libs["mkl"] and "AVX2" in libs["onednn"] and libs["aten"] == "AVX2"
