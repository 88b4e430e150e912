"""Paged attention on CPU as an XLA FFI custom call: the pages are read in place.

XLA:CPU cannot fuse a gather into a dot, so its paged attention (`ftjax.paged_kv.
attend_pages`) copies every block of pages it visits before scoring it; on the serving
engine's decode step that copy and the small dots around it were ~40 ms of an ~80 ms
step at 8 rows of 50..600 tokens (gpt2-124m, 2-core AMD EPYC; `examples/
profile_engine_decode.py --profile`). This kernel (`cpu_paged_attention.cc`, beside this
file) walks each (row, kv head)'s pages through the page table with an online softmax,
items shared over XLA's intra-op thread pool.

It is C++ compiled on first use with the machine's C++ compiler (`c++`, or `$CXX`) against
the XLA FFI headers jaxlib ships (`jax.ffi.include_dir()`), `-O3 -march=native`, into a
per-user cache (`$FTJAX_CACHE_DIR`, else `~/.cache/ftjax`), keyed by the source, the
jaxlib version and the CPU; later processes load the cached library. Without a compiler
(or with `FTJAX_CPU_KERNELS=0`), `available()` is False and callers keep the XLA path.

Semantics are `ftjax.numerics.attend`'s over the row's keys in page order: float32
queries `[B, T, N, H]` at positions `[B, T]` (< 0: padding, zeros out) see the keys at
positions <= their own; float32 pools, or int8 pools with float32 per-(token, kv head)
scales; ALiBi slopes optional; MHA / GQA / MQA (N a multiple of K).
"""

from __future__ import annotations

import ctypes
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
import jax.numpy as jnp

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_paged_attention.cc")
TARGETS = {"float32": "FtjaxPagedAttentionF32", "int8": "FtjaxPagedAttentionI8"}
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
    """Where this machine's build of the kernel lives (built or not)."""
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read())
    key.update(jax.__version__.encode())
    key.update(jax.ffi.include_dir().encode())
    key.update(" ".join(FLAGS).encode())
    key.update(_cpu_id().encode())
    return os.path.join(_cache_dir(), f"cpu_paged_attention-{key.hexdigest()[:16]}.so")


def build(path: Optional[str] = None) -> str:
    """Compiles the kernel into `path` (default `library_path()`), atomically: a
    concurrent process sees the old file or the whole new one. Raises RuntimeError
    naming the compiler's complaint."""
    path = path or library_path()
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE} failed ({' '.join(cmd)}):\n"
                               f"{res.stderr[-4000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def available() -> bool:
    """True when the kernel is built (on first call: compiled, ~10 s) and registered
    with XLA for the CPU platform. False, with one warning naming why, when it cannot be
    built; False without a warning when `FTJAX_CPU_KERNELS=0`."""
    if os.environ.get("FTJAX_CPU_KERNELS", "1") == "0":
        return False
    with _lock:
        if "ok" not in _state:
            try:
                path = library_path()
                if not os.path.exists(path):
                    build(path)
                lib = ctypes.cdll.LoadLibrary(path)
                for name in TARGETS.values():
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                                platform="cpu")
                _state["ok"] = True
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                warnings.warn(f"ftjax: CPU paged-attention kernel unavailable, using the XLA "
                              f"path: {e}", RuntimeWarning, stacklevel=2)
                _state["ok"] = False
        return _state["ok"]


def supported(q, k_pool, k_scale=None) -> Optional[str]:
    """None if the kernel takes these arguments, else why not."""
    if q.dtype != jnp.float32:
        return f"queries are {q.dtype}, the kernel takes float32"
    if k_scale is None and k_pool.dtype != jnp.float32:
        return f"the pools are {k_pool.dtype}, the kernel takes float32 or int8 with scales"
    if k_scale is not None and k_pool.dtype != jnp.int8:
        return f"scaled pools are {k_pool.dtype}, the kernel takes int8"
    if q.shape[2] % k_pool.shape[2]:
        return f"{q.shape[2]} query heads are not a multiple of {k_pool.shape[2]} kv heads"
    return None


def paged_attention(q, k_pool, v_pool, page_table, q_pos, layer, slopes=None,
                    k_scale=None, v_scale=None):
    """Attention of `q [B, T, N, H]` (float32) at `q_pos [B, T]` over layer `layer`'s
    pages `k_pool`, `v_pool` `[L, P, K, page_size, H]` through `page_table [B, M]`.

    Args:
      slopes: ALiBi slopes `[N]` or None. k_scale, v_scale: `[L, P, K, page_size]` for
        int8 pools. layer: int32 scalar, may be traced. Table entries are clipped to the
        pool; keys past the table (M * page_size) are not seen.
    Returns:
      float32 `[B, T, N, H]`. RuntimeError when the kernel cannot be built / is off.
    """
    why = supported(q, k_pool, k_scale)
    if why:
        raise ValueError(f"cpu paged_attention: {why}")
    if not available():
        raise RuntimeError("cpu paged_attention: the kernel is not built on this machine "
                           "(see the warning above, or FTJAX_CPU_KERNELS=0)")
    n = q.shape[2]
    slopes = jnp.zeros((n,), jnp.float32) if slopes is None else slopes.astype(jnp.float32)
    common = (page_table.astype(jnp.int32), q_pos.astype(jnp.int32), slopes,
              jnp.asarray(layer, jnp.int32))
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    if k_scale is None:
        return jax.ffi.ffi_call(TARGETS["float32"], out)(q, k_pool, v_pool, *common)
    return jax.ffi.ffi_call(TARGETS["int8"], out)(
        q, k_pool, v_pool, k_scale.astype(jnp.float32), v_scale.astype(jnp.float32), *common)
