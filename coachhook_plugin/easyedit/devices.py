"""Hard-coded ``cuda`` in EasyEdit mapped to the CPU (scoped: active only inside :func:`cpu_fallback`)."""
from __future__ import annotations

import contextlib
import functools
import re
import sys
import threading
import types
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode


# --------------------------------------------------------------------------------------------------
# 2. hard-coded CUDA -> CPU
# --------------------------------------------------------------------------------------------------

_CUDA_STR = re.compile(r"^\s*cuda(:.*)?\s*$")


def _cpu_if_cuda(dev, *, ints_are_devices: bool = False):
    if isinstance(dev, str) and _CUDA_STR.match(dev):
        return torch.device("cpu")
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    if ints_are_devices and isinstance(dev, int) and not isinstance(dev, bool):
        return torch.device("cpu")
    return dev


def _map_load_location(loc):
    if loc is None:
        return "cpu"
    if isinstance(loc, dict):
        return {k: ("cpu" if _cpu_if_cuda(v, ints_are_devices=True) != v else v) for k, v in loc.items()}
    if callable(loc):
        return loc
    return _cpu_if_cuda(loc, ints_are_devices=True)


class CudaToCpuMode(TorchFunctionMode):
    """Torch-function mode that rewrites CUDA device arguments to CPU.

    Covered call forms (everything that reaches ``__torch_function__``):

    * any ``device=`` keyword: ``torch.zeros(..., device="cuda:0")``, ``torch.tensor(x, device=...)``,
      ``t.new_zeros(..., device=...)``, ``t.to(device=...)`` (``BatchEncoding.to`` uses this form);
    * positional devices of ``Tensor.to`` (``t.to("cuda:0")``, ``t.to(torch.device("cuda", 0))``,
      ``t.to(0)``) and of ``nn.Module.to``'s argument parser;
    * ``Tensor.cuda()``, hence also ``nn.Module.cuda()`` and ``nn.Module.to("cuda:N")``, which apply
      ``Tensor.cuda`` / ``Tensor.to`` to every parameter.

    ``torch.device("cuda:0")`` itself is only a value and stays as it is; it is mapped where it is
    used. ``torch.load`` is not a torch function: :func:`cpu_fallback` patches it separately.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0].to("cpu", non_blocking=bool(kwargs.get("non_blocking", False)))
        if "device" in kwargs:
            mapped = _cpu_if_cuda(kwargs["device"], ints_are_devices=True)
            if mapped is not kwargs["device"]:
                kwargs = dict(kwargs, device=mapped)
        if func is torch.Tensor.to or func is _PARSE_TO:
            if args:
                first_is_self = func is torch.Tensor.to
                head = args[:1] if first_is_self else ()
                rest = args[1:] if first_is_self else args
                if rest:
                    rest = (_cpu_if_cuda(rest[0], ints_are_devices=True),) + tuple(rest[1:])
                args = head + rest
        return func(*args, **kwargs)


_PARSE_TO = getattr(getattr(torch._C, "_nn", None), "_parse_to", None)

#: torch.cuda functions that raise without a GPU and are harmless to skip on CPU
_CUDA_NOOPS = ("synchronize", "set_device", "reset_peak_memory_stats", "reset_max_memory_allocated")
_fallback_state = threading.local()


# EasyEdit modules that build ``torch.device(f"cuda:{hparams.device}")`` themselves: with ``device: cpu`` (GitHub
# EasyEdit's spelling) that is "cuda:cpu", which torch.device refuses before any torch function runs.
_DEVICE_LITERAL_MODULES = ("easyeditor.models.ft.ft_main", "easyeditor.models.lora.lora_main",
                           "easyeditor.models.mend.mend_main", "easyeditor.models.serac.serac_main",
                           "easyeditor.models.ike.ike_main", "easyeditor.evaluate.evaluate")


class _CpuDeviceTorch(types.ModuleType):
    """``torch`` as those modules see it under :func:`cpu_fallback`: ``device("cuda…")`` is the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def device(*args, **kwargs):
        if args and isinstance(args[0], str) and _CUDA_STR.match(args[0]):
            return torch.device("cpu")
        return torch.device(*args, **kwargs)


@contextlib.contextmanager
def cpu_fallback(force: bool = False) -> Iterator[bool]:
    """Scoped CUDA -> CPU mapping for code that hard-codes ``cuda:{device}`` (EasyEdit does).

    Active only when ``torch.cuda.is_available()`` is False (or ``force=True``, for tests); on a GPU
    machine it is a no-op. Yields whether it is active. On exit the torch-function mode is popped and
    ``torch.load`` / the ``torch.cuda`` no-ops are restored. Nested use is cheap (the inner one does
    nothing).
    """
    if not force and torch.cuda.is_available():
        yield False
        return
    depth = getattr(_fallback_state, "depth", 0)
    if depth:
        _fallback_state.depth = depth + 1
        try:
            yield True
        finally:
            _fallback_state.depth -= 1
        return

    real_load = torch.load

    @functools.wraps(real_load)
    def load_on_cpu(*args, **kwargs):
        if len(args) >= 2:
            args = (args[0], _map_load_location(args[1])) + tuple(args[2:])
        else:
            kwargs["map_location"] = _map_load_location(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    saved_cuda = {n: getattr(torch.cuda, n) for n in _CUDA_NOOPS if hasattr(torch.cuda, n)}
    _fallback_state.depth = 1
    torch.load = load_on_cpu
    for n in saved_cuda:
        setattr(torch.cuda, n, lambda *a, **k: None)
    swapped = [m for m in (sys.modules.get(name) for name in _DEVICE_LITERAL_MODULES)
               if m is not None and getattr(m, "torch", None) is torch]
    for m in swapped:
        m.torch = _CpuDeviceTorch()
    try:
        with CudaToCpuMode():
            yield True
    finally:
        torch.load = real_load
        for n, fn in saved_cuda.items():
            setattr(torch.cuda, n, fn)
        for m in swapped:
            m.torch = torch
        _fallback_state.depth = 0
