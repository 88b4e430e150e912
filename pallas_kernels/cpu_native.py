"""Builds and loads ftjax's native CPU kernels (the `cpu_*.cc` files beside this one).

The kernels are XLA FFI custom calls in C++ (`cpu_paged_attention.cc`: paged attention
reading the pages in place; `cpu_matmul.cc`: few-row matmuls against float32 / bf16 / int8
weights), compiled together into one library on first use with the machine's C++
compiler (`c++`, or `$CXX`) against the XLA FFI headers jaxlib ships
(`jax.ffi.include_dir()`), `-O3 -march=native`, into a per-user cache
(`$FTJAX_CACHE_DIR`, else `~/.cache/ftjax`). The library's name keys every source and
header, the jax version and the CPU, so a changed source or another machine builds anew;
later processes load the cached library. Without a compiler, or with
`FTJAX_CPU_KERNELS=0`, `available()` is False and callers keep XLA's own paths (a
trusted per-user cache, as Triton's or torch's extension caches).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Optional

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(glob.glob(os.path.join(HERE, "cpu_*.cc")))
HEADERS = sorted(glob.glob(os.path.join(HERE, "cpu_*.h")))
TARGETS = ("FtjaxPagedAttentionF32", "FtjaxPagedAttentionI8", "FtjaxSmallMatmul")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fopenmp-simd"]

_lock = threading.Lock()
_state: dict = {}


def _cpu_id() -> str:
    """The CPU model and ISA flags (`-march=native` code is only valid on the same)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> str:
    return os.environ.get("FTJAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "ftjax")


def library_path() -> str:
    """Where this machine's build of the kernels lives (built or not)."""
    key = hashlib.sha256()
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            key.update(os.path.basename(path).encode() + b"\0" + f.read())
    key.update(jax.__version__.encode())
    key.update(jax.ffi.include_dir().encode())
    key.update(" ".join(FLAGS).encode())
    key.update(_cpu_id().encode())
    return os.path.join(_cache_dir(), f"ftjax_cpu-{key.hexdigest()[:16]}.so")


def build(path: Optional[str] = None) -> str:
    """Compiles the kernels into `path` (default `library_path()`), atomically: a
    concurrent process sees the old file or the whole new one. Raises RuntimeError
    naming the compiler's complaint."""
    path = path or library_path()
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), "-I", HERE, *SOURCES, "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {', '.join(SOURCES)} failed ({' '.join(cmd)}):\n"
                               f"{res.stderr[-4000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def available() -> bool:
    """True when the kernels are built (on first call: compiled, ~10 s) and registered
    with XLA for the CPU platform. False, with one warning naming why, when they cannot
    be built; False without a warning when `FTJAX_CPU_KERNELS=0`."""
    if os.environ.get("FTJAX_CPU_KERNELS", "1") == "0":
        return False
    with _lock:
        if "ok" not in _state:
            try:
                path = library_path()
                if not os.path.exists(path):
                    build(path)
                lib = ctypes.cdll.LoadLibrary(path)
                for name in TARGETS:
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                                platform="cpu")
                _state["ok"] = True
            except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as e:
                warnings.warn(f"ftjax: native CPU kernels unavailable, using XLA's paths: {e}",
                              RuntimeWarning, stacklevel=2)
                _state["ok"] = False
        return _state["ok"]
