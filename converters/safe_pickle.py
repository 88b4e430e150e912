"""Restricted unpickling of torch training checkpoints: no checkpoint runs code.

A pickle names Python globals (functions and classes) that the unpickler imports and
calls; an ordinary unpickler imports any of them, so a crafted checkpoint whose
`__reduce__` names `os.system` runs a command on load. Megatron-LM and NeMo pickle
their argparse `Namespace` (with Megatron's enums inside) next to the weights, which
torch's `weights_only=True` refuses, so these files are read with the same idea as
torch's weights-only unpickler (and the "restricting globals" recipe of Python's
`pickle` documentation): `find_class` resolves only

- an allowlist: torch's tensor / storage rebuild functions, dtypes, `torch.Size`,
  `torch.device`; `collections.OrderedDict`, `argparse.Namespace`, numpy's array /
  scalar / dtype reconstructors, `_codecs.encode`, `io.BytesIO` (TransformerEngine's
  `_extra_state`) and builtin containers (set, frozenset, bytearray, complex, slice);
- names under the training frameworks' packages (Megatron, NeMo, apex,
  TransformerEngine, omegaconf, Lightning): an inert stand-in class, created here and
  never imported, whose constructor and `__setstate__` only store their arguments;

and anything else raises `CheckpointError` naming the global and the file. The
stand-ins only matter inside `args` (hyper-parameters ftjax reads as plain values);
weights are tensors.
"""

from __future__ import annotations

import argparse
import builtins
import codecs
import collections
import io
import pickle
import types

from ftjax.errors import CheckpointError

# Top-level packages whose classes become inert stand-ins (never imported).
STAND_IN_PACKAGES = frozenset({"megatron", "nemo", "apex", "transformer_engine", "omegaconf",
                               "pytorch_lightning", "lightning", "lightning_fabric"})

_TORCH_REBUILD = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                  "_rebuild_parameter", "_rebuild_parameter_with_state",
                  "_rebuild_device_tensor_from_cpu_tensor",
                  "_rebuild_device_tensor_from_numpy")


class StandIn:
    """An inert object standing for an instance of a class that is not imported.

    Attributes:
      args: the positional arguments it was constructed with (an enum's value).
      state: what `__setstate__` received (a plain object's `__dict__`).
    """

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __reduce__(self):  # never re-pickled as the class it stands for
        raise TypeError(f"{type(self).__qualname__} is a stand-in and cannot be pickled")


_stand_ins: dict = {}
_PY2_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def stand_in(module: str, name: str) -> type:
    """The (cached) StandIn subclass for `module.name`."""
    key = (module, name)
    if key not in _stand_ins:
        _stand_ins[key] = type(name.rsplit(".", 1)[-1], (StandIn,),
                               {"__module__": "converters.safe_pickle.standin",
                                "__qualname__": f"StandIn[{module}.{name}]"})
    return _stand_ins[key]


def _bytearray(*args):
    """`bytearray` from bytes only: `bytearray(10**12)` would allocate a terabyte."""
    if args and not isinstance(args[0], (bytes, bytearray, str)):
        raise pickle.UnpicklingError(f"bytearray({type(args[0]).__name__}) is refused: only "
                                     "bytearray(bytes) is read")
    return bytearray(*args)


def _allowed() -> dict:
    out = {("collections", "OrderedDict"): collections.OrderedDict,
           ("argparse", "Namespace"): argparse.Namespace,
           ("_codecs", "encode"): codecs.encode, ("codecs", "encode"): codecs.encode,
           ("_io", "BytesIO"): io.BytesIO, ("io", "BytesIO"): io.BytesIO}
    for name in ("set", "frozenset", "complex", "slice"):
        out[("builtins", name)] = getattr(builtins, name)
    out[("builtins", "bytearray")] = _bytearray
    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    for mod in ("numpy.core", "numpy._core"):
        out[(mod + ".multiarray", "_reconstruct")] = multiarray._reconstruct
        out[(mod + ".multiarray", "scalar")] = multiarray.scalar
        out[(mod + ".numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5 arrays
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    for name in dir(np.dtypes):  # numpy >= 1.25 pickles dtypes by their class
        if name.endswith("DType"):
            out[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    try:
        import torch
    except ImportError:
        return out
    out[("torch", "Size")] = torch.Size
    out[("torch", "device")] = torch.device
    out[("torch", "Tensor")] = torch.Tensor
    out[("torch._tensor", "Tensor")] = torch.Tensor
    out[("torch.nn.parameter", "Parameter")] = torch.nn.Parameter
    out[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    out[("torch._tensor", "_rebuild_from_type_v2")] = torch._tensor._rebuild_from_type_v2
    for name in _TORCH_REBUILD:
        if hasattr(torch._utils, name):
            out[("torch._utils", name)] = getattr(torch._utils, name)
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout)):
            out[("torch", name)] = value
    for name in ("UntypedStorage", "TypedStorage"):
        out[("torch.storage", name)] = getattr(torch.storage, name)
        out[("torch", name)] = getattr(torch.storage, name)
    return out


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` resolving only allowlisted globals and inert stand-ins.

    Attributes:
      where: the file named in errors.
    """

    where = "<pickle>"
    _table = None

    def find_class(self, module, name):
        module = _PY2_NAMES.get(module, module)  # protocol 2 (torch.save) writes Python 2 names
        table = RestrictedUnpickler._table
        if table is None:
            table = RestrictedUnpickler._table = _allowed()
        if (module, name) in table:
            return table[(module, name)]
        if module.split(".", 1)[0] in STAND_IN_PACKAGES:
            return stand_in(module, name)
        raise CheckpointError(
            f"{self.where}: the pickle asks for the global {module}.{name}, which is not "
            "allowed (only tensors, containers and inert stand-ins for Megatron/NeMo classes "
            "are read: a checkpoint must never run code)")


def pickle_module(where: str) -> types.SimpleNamespace:
    """What `torch.load(pickle_module=...)` uses: `Unpickler` (zip checkpoints) and
    `load` (legacy ones), naming `where` in errors."""
    cls = type("RestrictedUnpickler", (RestrictedUnpickler,), {"where": where})
    return types.SimpleNamespace(__name__="ftjax_restricted_pickle", Unpickler=cls,
                                 load=lambda f, **kw: cls(f, **kw).load())


def loads(data: bytes, where: str = "<pickle>"):
    """Restricted `pickle.loads` (no torch storages)."""
    cls = type("RestrictedUnpickler", (RestrictedUnpickler,), {"where": where})
    try:
        return cls(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated, corrupt, or a refused constructor argument
        raise CheckpointError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from e


def torch_load(path, where: str | None = None):
    """Loads a torch `.pt` / `.ckpt` / `.bin` (a path, or a file object named `where`
    in messages) through the restricted unpickler, onto the CPU.

    Raises:
      CheckpointError: torch is missing, the file is unreadable, or its pickle names
        a global outside the allowlist (the message names the global and the file).
    """
    where = where or str(path)
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{where}: reading PyTorch checkpoints needs torch "
                              "(pip install torch==2.13.0, the CPU build)") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=pickle_module(where))
    except CheckpointError:
        raise
    except Exception as e:  # torch raises many types for corrupt or truncated files
        cause = e.__context__ if isinstance(e.__context__, CheckpointError) else None
        if cause is not None:
            raise cause from e
        raise CheckpointError(f"{where}: not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {e})") from e
