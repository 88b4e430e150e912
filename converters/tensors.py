"""Reading named tensors from checkpoint files into numpy, without copies where possible.

safetensors files are memory-mapped (bf16 via ml_dtypes, so no torch is needed);
PyTorch `.bin` files need torch, imported only when such a file is met.
"""

from __future__ import annotations

import json
import os
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


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Memory-maps every tensor of one safetensors file."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    base = 8 + header_len
    size = os.path.getsize(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if base + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} runs past the end of the file")
        out[name] = mm[base + start:base + end].view(dtype).reshape(info["shape"])
    return out


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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    return {name: torch_to_numpy(t) for name, t in state.items()}


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
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable shard index ({e})") from e
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
