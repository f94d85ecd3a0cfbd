"""Kernels of our own in C++, compiled once on the user's machine (native/int8_attend.cpp): the
decode step's attention over the int8 window (`lminf::int8_decode_attend`), the window's int8 write
(`lminf::int8_write`), the RMSNorm of a few rows (`lminf::rms_norm`), and the scripted step's layer
loop itself (`lminf::llama_layers`, step_script.llama_layers operation for operation).

Why compiled here and not shipped: it is built with -march=native, so the same source becomes
AVX-512 or AVX2 code, whichever the CPU has, and it links against the torch that is installed.
The library goes to models.cache_dir()/native (~/.cache/lminf/native), named by a hash of the
source, the flags, the compiler, torch's version and this CPU's instruction set: a machine that
shares the home directory but not the CPU builds its own.  A build takes ~6 s (once; `make install`
does it); without a C++ compiler, or with $LMINF_NATIVE=off, the same arithmetic runs in torch ops
(step_script.int8_attend): slower, never wrong.

The operator's schema is defined here, always, so that TorchScript can compile code that names it
(step_script.llama_layers); the C++ library adds only its CPU kernel.  Callers ask `available()`
before calling it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ENV = "LMINF_NATIVE"
SOURCE = Path(__file__).with_name("native") / "int8_attend.cpp"
OP = "int8_decode_attend"
SCHEMA = (f"{OP}(Tensor ql, Tensor qg, Tensor k8, Tensor vt8, Tensor scales, int n, Tensor local_bias, "
          "Tensor k_global, Tensor v_global, Tensor? global_bias, float scale) -> (Tensor, Tensor)")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w"]

_LIB = torch.library.Library("lminf", "DEF")  # noqa: TOR901 - kept alive for the process
_LIB.define(SCHEMA)
_LIB.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_LIB.define("int8_write(Tensor k, Tensor v, Tensor(a!) k8, Tensor(b!) vt8, Tensor(c!) scales, int a, int b) -> ()")
_LIB.define("llama_layers(Tensor x, Tensor[] weights, Tensor?[] biases, int[] kinds, float[] eps, Tensor[] rings, "
            "Tensor step_mat, int slot, int n, Tensor local_bias, Tensor? global_bias, int n_global, float scale, "
            "int n_heads, int n_kv_heads, int head_dim, int group) -> Tensor")


def enabled() -> bool:
    """Whether native kernels may be used ($LMINF_NATIVE, read at every call)."""
    return os.environ.get(ENV, "on") != "off"


def available() -> bool:
    """The native kernels can be called: enabled, and built (or building now) and loaded."""
    return enabled() and _load() is None


def status() -> str:
    """One line for `lminf info`: what runs the decode step's attention, and why."""
    if not enabled():
        return f"torch ops (${ENV}=off)"
    problem = _load()
    return f"native kernel ({_library_path().name})" if problem is None else f"torch ops ({problem})"


def build() -> Path:
    """Compile the library for this machine's CPU if there is none yet; its path.  Raises
    RuntimeError with the compiler's first error when it cannot."""
    path = _library_path()
    if not path.exists():
        compile_to(path)
    return path


def compile_to(path: Path, march: str = "native") -> None:
    """Compile native/int8_attend.cpp into the library `path` for the instruction set `march` (gcc's
    -march: "native" for this CPU; tests build "x86-64-v3", AVX2 without AVX-512, to check the
    code paths this machine does not take)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [f"-march={march}" if f == "-march=native" else f for f in FLAGS]
    # Written beside its final name and renamed: a process that builds at the same time, or one
    # killed mid-build, never leaves a half-written library under the final name.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [compiler, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           "-I", str(torch_dir / "include"), "-I", str(torch_dir / "include" / "torch" / "csrc" / "api" / "include"),
           str(SOURCE), "-o", tmp, "-L", str(torch_dir / "lib"), "-lc10", "-ltorch_cpu"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise RuntimeError(f"the build failed: {errors[0].strip() if errors else done.returncode}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load() -> str | None:
    """Build (once per machine) and load the library, once per process: None, or why not."""
    if platform.system() != "Linux":
        return "built on Linux only"
    try:
        torch.ops.load_library(str(build()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


@functools.cache
def _library_path() -> Path:
    from .models import cache_dir  # models imports the step code, which imports this module

    root = cache_dir() / "native"
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update(" ".join(FLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(_cpu_flags().encode())
    compiler = _compiler()
    if compiler:
        h.update(compiler.encode())
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            h.update(subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout)
    return root / f"int8_attend-{h.hexdigest()[:16]}.so"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()
