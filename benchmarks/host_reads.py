"""Count the host's reads of tensor data, by the library's line that asked.

On a GPU, the host reading a device value (``.item()``, ``bool(t)``, ``.tolist()``, a copy to
the CPU) waits for every kernel queued before it: the training loop stalls. This machine has
no GPU, so :class:`HostReads` counts every read of tensor data the host makes, whatever the
device, and names the innermost frame of ``sharded_rmsprop`` that asked: which of them would
be a GPU synchronisation is a property of that line (a value built on the host from Python
numbers never is; a gradient's norm is), recorded in ``tests/test_host_reads.py``'s table.

Counted: ``aten._local_scalar_dense`` (``item()``, ``bool()``, ``float()``, ``int()``),
``aten.is_nonzero``, ``aten.equal``, a copy of a non-CPU tensor to the CPU, and
``Tensor.tolist()`` / ``Tensor.numpy()``, which never dispatch on the CPU (they are wrapped
while counting). On a GPU, ``torch.cuda.set_sync_debug_mode`` counts the real ones
(``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReads"]

_PACKAGE = str(Path(__file__).resolve().parent.parent / "sharded_rmsprop")

#: aten operators that hand tensor data to the host.
_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def _asker() -> str:
    """``module.py:Class.function`` of the innermost sharded_rmsprop frame on the stack, or
    ``"(outside the package)"``."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_PACKAGE):
            relative = Path(path).relative_to(_PACKAGE).as_posix()
            code = frame.f_code
            return f"{relative}:{getattr(code, 'co_qualname', code.co_name)}"
        frame = frame.f_back
    return "(outside the package)"


def _copies_to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    if func is torch.ops.aten._to_copy.default:
        device = kwargs.get("device")
        to_cpu = device is not None and torch.device(device).type == "cpu"
        return to_cpu and args[0].device.type != "cpu"
    destination, source = args[0], args[1]
    return destination.device.type == "cpu" and source.device.type != "cpu"


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...``: ``reads.by_site`` counts the host reads of tensor
    data made inside, by the library's ``module.py:function`` that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.by_site: collections.Counter[str] = collections.Counter()
        self._wrapped: dict[str, Any] = {}

    def __enter__(self) -> HostReads:
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._wrapped[name] = original
            setattr(torch.Tensor, name, self._counting(original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in self._wrapped.items():
            setattr(torch.Tensor, name, original)
        self._wrapped.clear()

    def _counting(self, original: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.by_site[_asker()] += 1
            return original(tensor, *args, **kwargs)

        return read

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _READS or (func in _COPIES and _copies_to_host(func, args, kwargs)):
            self.by_site[_asker()] += 1
        return func(*args, **kwargs)
