"""Counts, not times: host syncs and bytes allocated by the torch operations run inside a block.

A host sync is an operation whose result the Python side must wait for: reading a value (`.item()`,
`bool()`, `int()`, `.tolist()`) or an operation whose output size depends on the data (`nonzero`, boolean
indexing, `masked_select`, `repeat_interleave` with tensor repeats). On CPU nothing waits, but the same
program on a GPU would stall there; counting them is how tests guard the decode step without timing it.
Bytes allocated are the storage sizes of the new tensors the operations return (views and in-place
results allocate nothing).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
                "unique_consecutive"}


def _is_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: "OpCounter"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        syncs = name in _SYNCING_OPS or (name in ("index", "index_put", "index_put_") and _is_bool_index(args)) or (
            name == "repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor)
            and len(args) > 1 and isinstance(args[1], torch.Tensor) and kwargs.get("output_size") is None
        )
        if syncs:
            self.owner.syncs[name] += 1
        out = func(*args, **kwargs)
        if not name.endswith("_") and "out" not in kwargs and not func._schema.is_mutable:
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor) and tensor._base is None and not _is_alias(func):
                    self.owner.bytes_allocated += tensor.untyped_storage().nbytes()
        return out


def _is_alias(func) -> bool:
    return any(r.alias_info is not None for r in func._schema.returns)


class _Function(TorchFunctionMode):
    def __init__(self, owner: "OpCounter"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == "tolist":  # reads values without a dispatched op
            self.owner.syncs["tolist"] += 1
        return func(*args, **(kwargs or {}))


class OpCounter:
    """``with OpCounter() as c: ...`` then ``c.host_syncs`` (total), ``c.syncs`` (by op) and ``c.bytes_allocated``."""

    def __init__(self):
        self.syncs: Counter = Counter()
        self.bytes_allocated = 0
        self._modes = (_Function(self), _Dispatch(self))

    @property
    def host_syncs(self) -> int:
        return sum(self.syncs.values())

    def __enter__(self) -> "OpCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


__all__ = ["OpCounter"]
