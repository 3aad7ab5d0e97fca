"""Run a benchmark as an AVX2-only machine would, on any x86 machine; say which CPU it ran on.

Speed claims move with the instruction set: on an AVX-512 machine the fp32 matrix products run
twice as wide as on an AVX2-only one (most laptops, AMD before Zen 4), and the libraries that
run them do not agree on which is faster. So every figure is quoted with the CPU it came from,
and `--isa avx2` measures what an AVX2 machine sees by capping each math library torch uses:

    oneDNN   ONEDNN_MAX_CPU_ISA=AVX2          (its linears, the CPU flash attention's GEMMs)
    MKL      MKL_ENABLE_INSTRUCTIONS=AVX2     (torch.mm / sgemm)
    ATen     ATEN_CPU_CAPABILITY=avx2         (torch's own vectorised kernels: elementwise ops,
                                               softmax, the fused AdamW, attention's loops)

Each is read once, when the library loads, so the caps are set in a child process's
environment before it imports torch; `library_isas` then asks each library what it runs
(oneDNN and MKL verbose output for one product, `torch.backends.cpu.get_cpu_capability()`),
so a cap that did not take (an old library ignoring the variable) is seen, not assumed.
It is an emulation: the caches, clocks and memory system stay this machine's.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Literal, get_args

Isa = Literal["native", "avx2"]
ISAS: tuple[str, ...] = get_args(Isa)
CAPS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2"},
}
# the CPU flags a reader needs to place a figure (others: /proc/cpuinfo)
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def parse_isas(text: str) -> list[str]:
    """'native,avx2' -> ['native', 'avx2']; an unknown name is an error naming the choices."""
    isas = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in isas if s not in ISAS]
    if bad or not isas:
        raise SystemExit(f"--isa {text!r}: choose from {', '.join(ISAS)} (comma-separated)")
    return isas


def isa_env(isa: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that runs under `isa`'s caps (native: no caps at all)."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in CAPS["avx2"]}
    return {**env, **CAPS[isa]}


def cpu_description() -> dict:
    """Vendor, model name, family, model number and the FLAGS present, from /proc/cpuinfo."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    return {"vendor": info.get("vendor_id", "?"), "model_name": info.get("model name", "?"),
            "family": info.get("cpu family", "?"), "model": info.get("model", "?"),
            "cores": os.cpu_count(), "flags": [f for f in FLAGS if f in flags]}


def describe_cpu(cpu: dict) -> str:
    return (f"{cpu['model_name']} ({cpu['vendor']}, family {cpu['family']} model {cpu['model']}, "
            f"{cpu['cores']} cores; {' '.join(cpu['flags']) or 'no AVX2'})")


_PROBE = """
import torch
a, b = torch.randn(64, 64), torch.randn(64, 64)
a @ b
if torch.backends.mkldnn.is_available():
    try:
        torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    except Exception:
        pass
print("ATEN_CAPABILITY " + torch.backends.cpu.get_cpu_capability())
"""


def library_isas(isa: str, python: str = sys.executable) -> dict[str, str]:
    """What each math library reports it runs under `isa`'s caps, from one product each."""
    env = {**isa_env(isa), "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1", "OMP_NUM_THREADS": "1"}
    # cwd "/": `python -c` puts the working folder first on sys.path, where nothing of the
    # project may shadow a module the probe imports
    out = subprocess.run([python, "-c", _PROBE], env=env, capture_output=True, text=True, cwd="/").stdout
    mkl = re.search(r"MKL_VERBOSE oneMKL [^\n]*? for Intel\(R\) 64 architecture (.*?)(?:, Lnx|\n)", out)
    dnn = re.search(r"onednn_verbose,[^\n]*,info,cpu,isa:([^\n]*)", out)
    aten = re.search(r"ATEN_CAPABILITY (\S+)", out)
    return {"mkl": mkl.group(1).strip() if mkl else "?", "onednn": dnn.group(1).strip() if dnn else "?",
            "aten": aten.group(1) if aten else "?"}


def check_caps(isa: str, libs: dict[str, str]) -> list[str]:
    """Problems with `libs` (from library_isas) for `isa`: a library above AVX2 under the cap."""
    if isa == "native":
        return []
    wide = re.compile(r"512|AVX10|AMX", re.IGNORECASE)
    return [f"{lib} reports {what!r} under --isa {isa}" for lib, what in libs.items()
            if what == "?" or wide.search(what)]


def report_isa(isa: str, python: str = sys.executable) -> dict[str, str]:
    """Print what each library runs under `isa` (and any cap that did not take); return it."""
    libs = library_isas(isa, python)
    print(f"[{isa}] MKL: {libs['mkl']}; oneDNN: {libs['onednn']}; ATen kernels: {libs['aten']}")
    for problem in check_caps(isa, libs):
        print(f"  WARNING: {problem}: the cap did not take effect", file=sys.stderr)
    return libs


def runs_as(isa: str) -> bool:
    """Whether this process already runs under `isa`: native without a launcher, or the child
    that `run_capped` started for it."""
    return os.environ.get("SFT_BENCH_ISA", "native") == isa


def with_isa(argv: list[str], isa: str) -> list[str]:
    """argv with its --isa option (`--isa X` or `--isa=X`) replaced by `--isa=isa`."""
    args, skip = [], False
    for arg in argv:
        if not skip and not arg.startswith("--isa"):
            args.append(arg)
        skip = arg == "--isa"  # "--isa X": X goes too
    return args + [f"--isa={isa}"]


def run_capped(isa: str, argv: list[str]) -> subprocess.CompletedProcess:
    """This script again (`argv` = sys.argv) for `isa` alone, in a child under `isa`'s caps;
    its stdout is captured, its stderr passes through."""
    return subprocess.run([sys.executable, *with_isa(argv, isa)], text=True, stdout=subprocess.PIPE,
                          env={**isa_env(isa), "SFT_BENCH_ISA": isa})
