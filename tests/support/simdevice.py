"""A simulated CUDA device on the CPU that records every host sync and host-to-device copy with its call site.

Tensors "on the device" are `SimTensor`s: wrappers that report `cuda:0` over CPU data, so the code under test
takes its accelerator paths (`not tensor.is_cpu`, `device.type != "cpu"`) and computes the same numbers it
computes on the CPU. `SimDevice` (a context manager) runs every op of a `SimTensor` on its CPU data and keeps
a log of `Transfer`s:

- `read`: the host waits for the device: `.item()`, `int()`/`float()`/`bool()` of a tensor (an `if tensor`),
  `.tolist()`, `.cpu()`/`.to("cpu")`, `torch.equal`, and the ops whose output size depends on the data
  (`nonzero` without a size, boolean indexing, `masked_select`, `unique`, `repeat_interleave` without an
  output size);
- `upload`: a host tensor copied to the device: `torch.tensor(..., device=)`, `.to(device)`, `copy_` into a
  device tensor; `pinned` and `non_blocking` say whether the host goes on at once (both true) or waits (a
  pageable copy is synchronous whatever `non_blocking` says).

A host tensor (not 0-dim) mixed into a device op would raise on CUDA: here it raises too, so a test cannot
pass by accident. CUDA itself is never touched; `torch.cuda._lazy_init` is stubbed while the mode is on.
"""

from __future__ import annotations

import traceback
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("cuda", 0)
ROOT = Path(__file__).resolve().parents[2]
aten = torch.ops.aten
_TRANSFER = ROOT / "app" / "model" / "compute" / "transfer.py"
"""The decode path's upload helper: a transfer is reported at its caller."""

_DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.equal.default,
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
}
"""Ops whose result the host must wait for (a value, or an output size that depends on the data)."""


@dataclass(frozen=True)
class Transfer:
    kind: str
    """"read" (the host waits for the device) or "upload" (host to device)."""
    op: str
    site: str
    """The innermost frame outside torch and this module: `path:line function`."""
    pinned: bool = False
    non_blocking: bool = False

    @property
    def waits(self) -> bool:
        """Whether the host stops here: every read, and every upload that is not pinned and non-blocking."""
        return self.kind == "read" or not (self.pinned and self.non_blocking)

    def __str__(self) -> str:
        how = "" if self.kind == "read" else (" pinned" if self.pinned else " pageable")
        return f"{self.kind}{how} {self.op} at {self.site}"


class SimTensor(torch.Tensor):
    """A tensor that says it lives on `DEVICE` and holds its data in a CPU tensor (`elem`)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> SimTensor:
        assert type(elem) is torch.Tensor and elem.device.type == "cpu", type(elem)
        with torch.inference_mode(False):  # a view of a normal tensor must be one too
            out = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
                cls,
                elem.size(),
                strides=elem.stride(),
                storage_offset=elem.storage_offset(),
                dtype=elem.dtype,
                layout=elem.layout,
                device=DEVICE,
                requires_grad=elem.requires_grad,
            )
        out.elem = elem
        return out  # type: ignore[no-any-return]

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"SimTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Outside `SimDevice` (building a model, a test's own checks): computed, not logged."""
        return _Dispatch(SimDevice()).__torch_dispatch__(func, types, args, kwargs)


def _set_device(device: Any) -> None:
    if torch.device("cuda", 0) != torch.device(device if not isinstance(device, int) else f"cuda:{device}"):
        raise RuntimeError(f"the simulated device is cuda:0, not {device}")


@dataclass
class SimDevice:
    """While entered, `SimTensor`s compute on their CPU data and every transfer is logged in `transfers`."""

    transfers: list[Transfer] = field(default_factory=list)
    _pinned: dict[int, weakref.ref[torch.Tensor]] = field(default_factory=dict)
    _stack: Any = None

    @contextmanager
    def on(self) -> Iterator[SimDevice]:
        """The simulated device is `cuda:0` and the current CUDA device (`set_device` to it is a no-op)."""
        saved = torch.cuda._lazy_init, torch.cuda.current_device, torch.cuda.set_device
        torch.cuda._lazy_init = lambda: None  # type: ignore[assignment]
        torch.cuda.current_device = lambda: 0
        torch.cuda.set_device = _set_device
        try:
            with _Functions(self), _Dispatch(self):
                yield self
        finally:
            torch.cuda._lazy_init, torch.cuda.current_device, torch.cuda.set_device = saved  # type: ignore[assignment]

    @contextmanager
    def off(self) -> Iterator[None]:
        """Inside `on`: plain torch again, for a reference computed on the CPU."""
        with torch.utils._python_dispatch._disable_current_modes(), torch._C.DisableTorchFunction():
            yield

    @contextmanager
    def window(self) -> Iterator[list[Transfer]]:
        """The transfers logged inside the block."""
        start = len(self.transfers)
        out: list[Transfer] = []
        yield out
        out.extend(self.transfers[start:])

    def log(self, kind: str, op: str, pinned: bool = False, non_blocking: bool = False) -> None:
        self.transfers.append(Transfer(kind, op, call_site(), pinned, non_blocking))

    def upload(self, host: torch.Tensor, non_blocking: bool, op: str) -> SimTensor:
        self.log("upload", op, pinned=self.pinned(host), non_blocking=non_blocking)
        return SimTensor(host.detach().clone())

    def pin(self, host: torch.Tensor) -> torch.Tensor:
        out = host.clone()
        self._pinned[id(out)] = weakref.ref(out)
        return out

    def pinned(self, host: Any) -> bool:
        ref = self._pinned.get(id(host))
        return ref is not None and ref() is host


def to_device(module: torch.nn.Module) -> torch.nn.Module:
    """`module`'s parameters and buffers, in place, as `SimTensor`s (nothing logged)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(SimTensor(param.detach()), requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = SimTensor(buffer)
    return module


def call_site() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename)
        if path == Path(__file__) or path == _TRANSFER or "/torch/" in frame.filename:
            continue
        parts = path.parts
        if "site-packages" in parts:  # a library's, wherever its venv lies (CI's is inside the clone)
            where = "/".join(parts[parts.index("site-packages") + 1 :])
        elif path.is_relative_to(ROOT):
            where = str(path.relative_to(ROOT))
        else:
            where = str(path)
        return f"{where}:{frame.lineno} {frame.name}"
    return "?"


def _is_device(value: Any) -> bool:
    return value is not None and torch.device(value).type == DEVICE.type


class _Functions(TorchFunctionMode):
    """What must be caught before torch's C++ looks for a CUDA runtime: moves between host and device."""

    def __init__(self, sim: SimDevice) -> None:
        super().__init__()
        self.sim = sim

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.tensor or func is torch.as_tensor:
            if _is_device(kwargs.get("device")):
                host = func(*args, **{**kwargs, "device": "cpu"})
                return self.sim.upload(host, False, func.__name__)
        elif func is torch.Tensor.to:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            return self._to(args[0], device, dtype, non_blocking, "to")
        elif func is torch.Tensor.cuda:
            return self._to(args[0], DEVICE, None, bool(kwargs.get("non_blocking")), "cuda")
        elif func is torch.Tensor.cpu:
            return self._to(args[0], torch.device("cpu"), None, False, "cpu")
        elif func is torch.Tensor.tolist and isinstance(args[0], SimTensor):
            self.sim.log("read", "tolist")
            return args[0].elem.tolist()
        elif func is torch.Tensor.pin_memory:
            return self.sim.pin(args[0])
        elif func is torch.Tensor.is_pinned:
            return self.sim.pinned(args[0])
        elif func is torch.Tensor.item and isinstance(args[0], SimTensor):
            self.sim.log("read", "item")
            return args[0].elem.item()
        elif func is torch.Tensor.numpy and isinstance(args[0], SimTensor):
            raise TypeError("can't convert cuda:0 device type tensor to numpy")
        elif func is torch.Tensor.__getitem__ and isinstance(args[0], SimTensor):
            return self._getitem(args[0], args[1])
        elif func is torch.Tensor.__setitem__ and isinstance(args[0], SimTensor):
            return self._setitem(args[0], args[1], args[2])
        try:
            return func(*args, **kwargs)
        except RuntimeError as exc:
            if "not linked with support for cuda" not in str(exc):
                raise
        return self._on_data(func, args, kwargs)

    def _on_data(self, func: Any, args: Any, kwargs: Any) -> Any:
        """A binding that looks for a CUDA device guard before dispatching (`nonzero`, ...): run it on the CPU
        data and wrap what comes back."""
        if getattr(func, "__name__", "") in ("nonzero", "argwhere", "unique", "masked_select"):
            self.sim.log("read", func.__name__)
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        return tree_map(lambda t: SimTensor(t) if isinstance(t, torch.Tensor) else t, out)

    def _getitem(self, tensor: SimTensor, index: Any) -> torch.Tensor:
        """Indexing in C++ looks for a CUDA device guard: index the CPU data instead (views stay views)."""
        if _has_bool_tensor(index):
            self.sim.log("read", "__getitem__ by a boolean mask")
        with _Dispatch(self.sim):
            out = tensor.elem[tree_map(_unwrap, index)]
        return SimTensor(out)

    def _setitem(self, tensor: SimTensor, index: Any, value: Any) -> None:
        if _has_bool_tensor(index):
            self.sim.log("read", "__setitem__ by a boolean mask")
        if isinstance(value, torch.Tensor) and not isinstance(value, SimTensor) and value.dim() > 0:
            self.sim.log("upload", "__setitem__", pinned=self.sim.pinned(value))
        with _Dispatch(self.sim):
            tensor.elem[tree_map(_unwrap, index)] = _unwrap(value)

    def _to(self, tensor: torch.Tensor, device: Any, dtype: Any, non_blocking: bool, op: str) -> torch.Tensor:
        on_device = isinstance(tensor, SimTensor)
        if dtype is not None:
            tensor = tensor.to(dtype)
        if device is None or _is_device(device) == on_device:
            return tensor
        if on_device:
            self.sim.log("read", op)
            assert isinstance(tensor, SimTensor)
            return tensor.elem.clone()
        return self.sim.upload(tensor, non_blocking, op)


class _Dispatch(TorchDispatchMode):
    """Every aten op: device tensors computed on their CPU data, device factories made on the CPU."""

    def __init__(self, sim: SimDevice) -> None:
        super().__init__()
        self.sim = sim

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func.overloadpacket in (aten._pin_memory, aten.pin_memory):
            return self.sim.pin(args[0])
        if func.overloadpacket is aten.is_pinned:
            return self.sim.pinned(args[0])
        flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_device = any(isinstance(a, SimTensor) for a in flat) or _is_device(kwargs.get("device"))
        if not on_device:
            return func(*args, **kwargs)
        if func is aten.copy_.default:
            return self._copy(*args, **kwargs)
        host = [a for a in flat if not isinstance(a, SimTensor) and a.dim() > 0]
        if host:
            raise RuntimeError(f"{func}: a host tensor mixed with device tensors at {call_site()}")
        if func in _DATA_DEPENDENT or _bool_index(func, args):
            self.sim.log("read", func.__name__)
        if func is aten._to_copy.default and kwargs.get("device") is not None and not _is_device(kwargs["device"]):
            self.sim.log("read", "_to_copy")
            return func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if _is_device(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        unwrapped = tree_map(_unwrap, args)
        out = func(*unwrapped, **tree_map(_unwrap, kwargs))
        inputs = {id(_unwrap(a)): a for a in flat}
        return tree_map(lambda t: _rewrap(t, inputs), out)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        if isinstance(dst, SimTensor) and not isinstance(src, SimTensor):
            pinned = self.sim.pinned(src)
            self.sim.log("upload", "copy_", pinned=pinned, non_blocking=non_blocking)
        elif isinstance(src, SimTensor) and not isinstance(dst, SimTensor):
            self.sim.log("read", "copy_")
        _unwrap(dst).copy_(_unwrap(src))
        return dst


def _unwrap(value: Any) -> Any:
    return value.elem if isinstance(value, SimTensor) else value


def _rewrap(value: Any, inputs: dict[int, Any]) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if id(value) in inputs:  # an in-place op or out= returns its argument
        return inputs[id(value)]
    return SimTensor(value)


def _has_bool_tensor(index: Any) -> bool:
    leaves = torch.utils._pytree.tree_leaves(index)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in leaves)


def _bool_index(func: Any, args: Any) -> bool:
    """Indexing by a boolean mask: the kernel counts the mask's True values on the host first."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        return False
    return any(i is not None and i.dtype == torch.bool for i in args[1])
