"""Reading named tensors from checkpoint files into numpy, without copies where possible.

safetensors files are memory-mapped (bf16 via ml_dtypes, so no torch is needed);
PyTorch `.bin` files need torch, imported only when such a file is met.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Dict, Iterable

import ml_dtypes
import numpy as np

from ftjax.errors import CheckpointError

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# The safetensors library's limit on the JSON header (safetensors/src/tensor.rs).
MAX_HEADER_SIZE = 100_000_000


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Memory-maps every tensor of one safetensors file.

    The header is validated as the `safetensors` library validates it before any
    tensor is read: a header length inside the file and at most 100 MB, a JSON
    object of {name: {"dtype", "shape", "data_offsets"}} (and an optional
    "__metadata__" of strings), known dtypes, non-negative int shapes, and offsets
    that tile the data section exactly (in order, no gap, no overlap: two tensors
    sharing bytes would load silently wrong), each span the size its shape and dtype
    need, the last ending at the end of the file.

    Raises:
      CheckpointError: naming the file and, for a bad entry, the tensor.
    """
    size = _file_size(path)
    header = _safetensors_header(path, size)
    base = 8 + header.pop("__header_len__")
    entries = []
    for name, info in header.items():
        entries.append((name,) + _entry(path, name, info))
    entries.sort(key=lambda e: (e[3], e[4]))  # by data_offsets, as the library does
    expected = 0
    for name, dtype, shape, start, end in entries:
        if start != expected:
            kind = "overlaps the previous tensor" if start < expected else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {name!r} data_offsets [{start}, {end}] "
                                  f"{kind} (expected to start at {expected})")
        need = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
        if end - start != need:
            raise CheckpointError(f"{path}: tensor {name!r} data_offsets [{start}, {end}] span "
                                  f"{end - start} bytes but shape {shape} of {dtype.__name__} "
                                  f"needs {need}")
        if base + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} runs past the end of the file "
                                  f"(ends at byte {base + end} of {size}: truncated?)")
        expected = end
    if base + expected != size:
        raise CheckpointError(f"{path}: the tensors' data ends at byte {base + expected} but "
                              f"the file has {size} bytes (trailing data the header does not "
                              "describe)")
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
    return {name: mm[base + start:base + end].view(dtype).reshape(shape)
            for name, dtype, shape, start, end in entries}


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _safetensors_header(path: str, size: int) -> dict:
    """The parsed JSON header (with "__header_len__" added), checked to be an object."""
    if size < 8:
        raise CheckpointError(f"{path}: not a readable safetensors file ({size} bytes, shorter "
                              "than the 8-byte header length)")
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            limit = min(MAX_HEADER_SIZE, size - 8)
            if header_len > limit:
                raise CheckpointError(
                    f"{path}: not a readable safetensors file (header length {header_len} "
                    f"exceeds {limit} bytes: the {size}-byte file or the {MAX_HEADER_SIZE}-byte "
                    "limit)")
            raw = f.read(header_len)
        text = raw.decode("utf-8")
        header = json.loads(text)
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (the header is a "
                              f"{type(header).__name__}, not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    header["__header_len__"] = header_len
    return header


def _entry(path: str, name: str, info):
    """(numpy dtype, shape, start, end) of one header entry, each field checked."""
    def bad(what):
        return CheckpointError(f"{path}: tensor {name!r} {what}")

    if not isinstance(info, dict):
        raise bad(f"has header entry {info!r}, not an object with dtype, shape, data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise bad(f"lacks {missing} in the header")
    dtype = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise bad(f"has unsupported dtype {info['dtype']!r} (supported: {sorted(_ST_DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}, not a list of ints >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end] ints >= 0")
    start, end = offsets
    if end < start:
        raise bad(f"has reversed data_offsets [{start}, {end}]")
    return dtype, tuple(shape), start, end


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], metadata: dict = None):
    """Writes numpy arrays (any dtype in the safetensors table) to one file."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        header[name] = {"dtype": _NP_TO_ST[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def read_torch_bin(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path}: reading PyTorch .bin checkpoints needs torch "
            "(pip install torch==2.13.0, the CPU build), or convert it to safetensors") from e
    try:
        # torch's weights-only unpickler: tensors and containers, never code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if refused:
            raise CheckpointError(
                f"{path}: the pickle asks for the global {refused.group(1)}, which is not "
                "allowed (weights-only loading: a checkpoint must never run code)") from e
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of "
                              "tensors")
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = torch_to_numpy(t)
    return out


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as numpy (bfloat16 as ml_dtypes.bfloat16, which numpy lacks)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def _files_from_index(directory: str, index_name: str) -> Iterable[str]:
    path = os.path.join(directory, index_name)
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable shard index ({type(e).__name__}: {e})") from e
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: weight_map is a {type(weight_map).__name__}, not an "
                              "object of {tensor: shard file}")
    for name in set(weight_map.values()):
        # Shards are files of this directory: no paths that lead out of it.
        if not isinstance(name, str) or not name or name != os.path.basename(name) \
                or name in (".", ".."):
            raise CheckpointError(f"{path}: weight_map names shard {name!r}, which is not a "
                                  "file name inside the checkpoint directory")
    return sorted(set(weight_map.values()))


def read_checkpoint_tensors(directory: str) -> Dict[str, np.ndarray]:
    """All tensors of a HuggingFace-style directory (single file or sharded)."""
    candidates = [
        ("model.safetensors", read_safetensors, None),
        ("model.safetensors.index.json", read_safetensors, "index"),
        ("pytorch_model.bin", read_torch_bin, None),
        ("pytorch_model.bin.index.json", read_torch_bin, "index"),
    ]
    for name, reader, kind in candidates:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        files = _files_from_index(directory, name) if kind else [name]
        tensors: Dict[str, np.ndarray] = {}
        for fname in files:
            fpath = os.path.join(directory, fname)
            if not os.path.exists(fpath):
                raise CheckpointError(f"{path}: names shard {fname!r}, which does not exist")
            tensors.update(reader(fpath))
        return tensors
    raise CheckpointError(
        f"{directory}: no weights found (looked for model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)")
