"""Everything that depends on which EasyEdit (and which transformers / peft / torch) is installed.

The plugin supports two flavours of EasyEdit, both imported as ``easyeditor``:

* the PyPI release ``easyeditor==0.0.1.dev0`` (what ``make setup`` installs and the tests exercise);
* a GitHub checkout on ``PYTHONPATH`` (newer API: ``sequential_edit``, ``CALLABLE_RESTORE_ALGS``,
  GRACE/WISE/AlphaEdit, ``device: cpu``).

Nothing here compares version strings: every fix detects the feature it needs (``hasattr``,
try-import, the shape of a value) and does nothing when the feature is absent or already right.
Every runtime patch is *scoped*: it is active only inside :func:`editing_context` (which the patched
``BaseEditor`` methods enter for the duration of one call) and is undone on exit.

Public entry points (re-exported by :mod:`coachhook_plugin.easyedit`):

``import_easyeditor()``      import ``easyeditor`` even where its multimodal-only code cannot be imported
``cpu_fallback()``           scoped torch-function mode that maps hard-coded ``cuda`` devices to ``cpu``
``block_output_compat()``    scoped: EasyEdit's tracer sees transformers-5 decoder-block outputs as tuples
``lora_compat()``            scoped: EasyEdit LoRA fixes (AdaLoRA ``total_step``, eos-as-pad labels, eval mode)
``editing_context()``        all scoped fixes together (what the patched ``BaseEditor`` methods run under)
``install()``                patch ``BaseEditor`` once so that ``BaseEditor.from_hparams(h).edit(...)`` works
``make_editor()``            build a ``BaseEditor`` from hparams and a HF id, a local path or a ready (model, tok)
``load_model_and_tokenizer()``  the loader ``make_editor`` uses (Auto classes, any architecture, CPU friendly)
``to_builtin()``             numpy / torch values in EasyEdit metrics -> plain Python (json-serialisable)
``restore_weights()``        undo an edit from the ``weights_copy`` an EasyEdit method returned
``set_log_dir()``            where EasyEdit's ``run.log`` goes (default: nowhere; EasyEdit writes ``./logs``)
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import inspect
import logging
import math
import os
import re
import sys
import threading
import types
from dataclasses import asdict, is_dataclass
from pathlib import PurePath
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode

LOG = logging.getLogger(__name__)

#: EasyEdit methods that locate subject tokens by position and therefore want right padding
#: (EasyEdit's own rule: every other method gets left padding on decoder-only tokenizers).
RIGHT_PADDING_ALGS = frozenset({"ROME", "MEMIT", "EMMET", "EAMET", "R-ROME", "AlphaEdit", "CORE", "SPHERE"})

#: model-name substrings for which EasyEdit's own loader must be used (remote code, API models)
_EASYEDIT_LOADED_FAMILIES = ("chatglm", "internlm", "baichuan", "gpt-3.5", "qwen-api", "-api")

# --------------------------------------------------------------------------------------------------
# 1. importing easyeditor
# --------------------------------------------------------------------------------------------------

#: third-party modules that only EasyEdit's *multimodal* code (BLIP-2 / MiniGPT-4 trainers, image
#: processors) imports at import time, with what needs them (used in error messages).
MULTIMODAL_ONLY_MODULES: Dict[str, str] = {
    "timm": "the BLIP-2 / MiniGPT-4 vision towers (easyeditor.trainer.blip2_models)",
    "torchvision": "the BLIP image processors and BLIP-2 download helpers",
    "cv2": "RandAugment in the BLIP image processors (easyeditor.dataset.processor.randaugment)",
    "iopath": "the BLIP-2 checkpoint download / file helpers",
    "fairscale": "activation checkpointing in the CLIP vision tower (easyeditor.trainer.blip2_models.clip_vit)",
}

#: EasyEdit submodules that belong to its multimodal (image) editing: only these may be stood in for.
MULTIMODAL_MODULE_PREFIXES = ("easyeditor.trainer.blip2_models", "easyeditor.dataset.processor")
_MULTIMODAL_SEGMENT = re.compile(r"(blip|minigpt|llava|qwen_?vl|multimodal|vision|image|processor)", re.I)
#: EasyEdit modules wrapping hosted-model APIs (``ft_api``, ``deepedit_api``: OpenAI / ZhipuAI clients)
_API_SEGMENT = re.compile(r"(^|_)api($|_)", re.I)


def is_multimodal_module(fullname: str) -> bool:
    """Is ``fullname`` part of EasyEdit's optional code that local text editing never runs: its
    multimodal (image) modules, and (newer EasyEdit) its hosted-API methods such as ``deepedit_api``?"""
    if not fullname.startswith("easyeditor."):
        return False
    if any(fullname == p or fullname.startswith(p + ".") for p in MULTIMODAL_MODULE_PREFIXES):
        return True
    return any(_MULTIMODAL_SEGMENT.search(seg) or _API_SEGMENT.search(seg) for seg in fullname.split(".")[1:])


class MissingMultimodalDependency(ImportError):
    """Raised when code actually uses something from an EasyEdit multimodal module the plugin stood in for."""


def _describe_import_failure(exc: BaseException) -> Tuple[str, str]:
    """(what is needed, why it is missing) for an exception raised while importing a module."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        root = exc.name.partition(".")[0]
        return repr(root), "it is not installed"
    m = re.search(r"cannot import name '([^']+)' from '([^']+)'", str(exc))
    if m:
        return f"{m.group(2)}.{m.group(1)}", f"the installed {m.group(2).partition('.')[0]} no longer provides it"
    if isinstance(exc, MissingMultimodalDependency):
        return getattr(exc, "needs", "a multimodal dependency"), getattr(exc, "why", str(exc))
    if isinstance(exc, ImportError) and exc.name:
        return repr(exc.name), f"it does not import here ({exc})"
    return "their third-party dependencies", f"importing them fails here ({type(exc).__name__}: {exc})"


def _stand_in_message(needs: str, path: str, why: str) -> str:
    root = needs.strip("'").partition(".")[0]
    used_by = MULTIMODAL_ONLY_MODULES.get(root)
    where = f"; it is used by {used_by}" if used_by else ""
    return (f"multimodal EasyEdit features need {needs} (tried to use {path}{where}); coachhook-plugin "
            f"stands in for EasyEdit's multimodal modules because {why}, and text-only editing never "
            f"uses them. Install a working {root!r} (and a matching EasyEdit) to use this feature.")


class _StandIn:
    """A placeholder for a name from a stood-in module: importable, but unusable.

    ``from .blip2_models import Blip2OPT`` must succeed at import time, so attribute access returns
    further placeholders; *using* one (calling, subclassing, iterating, entering, truth-testing...)
    raises :class:`MissingMultimodalDependency` with an explanation.
    """

    __slots__ = ("_path", "_needs", "_why")

    def __init__(self, path: str, needs: str, why: str):
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_needs", needs)
        object.__setattr__(self, "_why", why)

    def _fail(self, *_a, **_k):
        err = MissingMultimodalDependency(_stand_in_message(self._needs, self._path, self._why))
        err.needs, err.why = self._needs, self._why
        raise err

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _StandIn(f"{self._path}.{name}", self._needs, self._why)

    __call__ = _fail
    __iter__ = _fail
    __enter__ = _fail
    __bool__ = _fail
    __getitem__ = _fail
    __mro_entries__ = _fail

    def __setattr__(self, name, value):
        self._fail()

    def __repr__(self):
        return f"<coachhook-plugin stand-in for {self._path}>"


def _turn_into_stand_in(module: types.ModuleType, exc: BaseException) -> None:
    """Keep what the module defined before failing; every other attribute becomes a placeholder."""
    needs, why = _describe_import_failure(exc)
    name = module.__name__

    def __getattr__(attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _StandIn(f"{name}.{attr}", needs, why)

    module.__getattr__ = __getattr__
    module.__coachhook_stand_in__ = {"needs": needs, "why": why, "error": f"{type(exc).__name__}: {exc}"}
    STOOD_IN[name] = module.__coachhook_stand_in__


class _GuardedLoader(importlib.abc.Loader):
    """Runs the real loader; if a multimodal module fails to execute, keeps it as a stand-in."""

    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        try:
            self.real.exec_module(module)
        except Exception as exc:  # ImportError, or e.g. RuntimeError from a torchvision built for another torch
            if not is_multimodal_module(module.__name__):
                raise
            _turn_into_stand_in(module, exc)

    def __getattr__(self, name):  # get_resource_reader, get_source, ... of the real loader
        return getattr(self.real, name)


class _EasyEditImportGuard(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path`` while ``easyeditor`` is imported; finds ``easyeditor.*`` modules
    with the normal machinery and guards the multimodal ones with :class:`_GuardedLoader`."""

    def find_spec(self, fullname, path=None, target=None):
        if not is_multimodal_module(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _GuardedLoader):
                    spec.loader = _GuardedLoader(spec.loader)
                return spec
        return None


#: EasyEdit modules the plugin stood in for, with what they needed (filled by import_easyeditor)
STOOD_IN: Dict[str, Dict[str, str]] = {}
_IMPORT_LOCK = threading.RLock()


def import_easyeditor():
    """Import and return ``easyeditor`` even where its multimodal-only code cannot be imported.

    PyPI ``easyeditor`` imports its BLIP-2 / MiniGPT-4 code eagerly from ``import easyeditor``; that
    code needs timm, torchvision, cv2, iopath and fairscale (PyPI torchvision does not even import
    next to a CPU-only torch) and transformers-4-only helpers (``apply_chunking_to_forward`` ...).

    While ``easyeditor`` is being imported, a guard on ``sys.meta_path`` watches EasyEdit's multimodal
    submodules only (:func:`is_multimodal_module`). One that fails to import is kept as a *stand-in*:
    what it defined before failing stays, every other name is a placeholder that raises
    :class:`MissingMultimodalDependency` (an ``ImportError`` saying what is missing and why) when
    used. No third-party module is ever shadowed or faked, so e.g. transformers' availability checks
    still tell the truth, and an installed, working timm/torchvision is simply used. Text-editing
    modules that fail still raise. The guard is removed afterwards; :data:`STOOD_IN` records what was
    stood in for.
    """
    with _IMPORT_LOCK:
        mod = sys.modules.get("easyeditor")
        if mod is not None and hasattr(mod, "BaseEditor"):
            return mod
        guard = _EasyEditImportGuard()
        sys.meta_path.insert(0, guard)
        ok = False
        try:
            module = importlib.import_module("easyeditor")
            ok = True
        finally:
            sys.meta_path.remove(guard)
            if not ok:  # do not leave a half-imported easyeditor behind
                for name in list(sys.modules):
                    if name == "easyeditor" or name.startswith("easyeditor."):
                        del sys.modules[name]
        if STOOD_IN:
            LOG.debug("easyeditor imported; stood in for %s", ", ".join(sorted(STOOD_IN)))
        return module


_import_failure: Dict[str, BaseException] = {}  # the last failed `import easyeditor`, for registration warnings


def easyeditor_available() -> bool:
    try:
        import_easyeditor()
        _import_failure.clear()
        return True
    except Exception as exc:  # not installed, or broken beyond what we fix
        LOG.debug("easyeditor is not importable: %s", exc)
        _import_failure["error"] = exc
        return False


def easyeditor_import_error() -> Optional[BaseException]:
    """Why the last attempt to import ``easyeditor`` failed (None if it did not fail)."""
    return _import_failure.get("error")


def easyeditor_not_installed(exc: Optional[BaseException]) -> bool:
    """Is ``exc`` "there is no easyeditor at all" (as opposed to an easyeditor that fails to import)?"""
    return isinstance(exc, ModuleNotFoundError) and exc.name == "easyeditor"


def _ee_module(name: str):
    """An ``easyeditor`` submodule, or None when this EasyEdit has no such module."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def stats_model_dir_names(name_or_path: str) -> List[str]:
    """The folder names under ``stats_dir`` where EasyEdit's statistics readers look for a model whose
    ``config._name_or_path`` is ``name_or_path``, most widely used first (deduplicated, never empty).

    Both EasyEdits' MEMIT/ROME/AlphaEdit covariance helpers key their caches by ``name.replace("/", "_")``;
    the file itself is named by ``layer_stats``, which uses that name in PyPI EasyEdit and
    ``name.rsplit("/")[-1]`` (the last path component) in newer EasyEdit. For a hub id or a local path the two
    differ (``org/model`` -> ``org_model`` vs ``model``); a file under every name is found by both."""
    name = str(name_or_path)
    names = []
    for candidate in (name.replace("/", "_"), name.rsplit("/")[-1]):
        if candidate and candidate not in names:
            names.append(candidate)
    return names or [name]


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


# --------------------------------------------------------------------------------------------------
# 3. transformers-5 decoder blocks return a bare tensor
# --------------------------------------------------------------------------------------------------
#
# transformers <= 4.x decoder blocks returned ``(hidden_states, present, attentions)``; EasyEdit's
# ROME/MEMIT code reads block outputs through ``nethook.Trace`` as ``output[0]`` and edits them in
# place as ``cur_out[0][i, idx, :] += delta``. transformers 5 blocks return the bare hidden-state
# tensor, so ``output[0]`` silently selects the first *batch row* (or raises IndexError).
#
# Least invasive fix: leave the model alone (its forward, the model's own use of block outputs and
# every non-EasyEdit hook keep seeing the tensor) and change only what EasyEdit's tracer sees. While
# :func:`block_output_compat` is active, a ``nethook.Trace`` attached to a decoder block hands its
# hook the 1-tuple ``(hidden_states,)`` (the old contract) and unwraps whatever the hook returns.
# In-place edits hit the real tensor. Blocks that still return tuples and every other module (MLPs,
# projections, whose outputs were always tensors) are untouched.


def _decoder_layer_classes() -> Tuple[type, ...]:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
        return (GradientCheckpointingLayer,)
    except ImportError:
        return ()


def is_decoder_block(root: Any, module: Any) -> bool:
    """Heuristic: is ``module`` (inside model ``root``) a transformer block?"""
    names = getattr(root, "_no_split_modules", None) or []
    if type(module).__name__ in names:
        return True
    classes = _decoder_layer_classes()
    return bool(classes) and isinstance(module, classes)


class _TupleViewHookTarget:
    """Stands in for a decoder block while ``Trace.__init__`` registers its hook."""

    def __init__(self, module):
        self._module = module

    def register_forward_hook(self, hook, *args, **kwargs):
        if kwargs.get("with_kwargs", False):
            def wrapped(mod, inputs, kw, output):
                if isinstance(output, torch.Tensor):
                    return _unwrap(hook(mod, inputs, kw, (output,)))
                return hook(mod, inputs, kw, output)
        else:
            def wrapped(mod, inputs, output):
                if isinstance(output, torch.Tensor):
                    return _unwrap(hook(mod, inputs, (output,)))
                return hook(mod, inputs, output)
        functools.update_wrapper(wrapped, hook)
        return self._module.register_forward_hook(wrapped, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _unwrap(result):
    if isinstance(result, tuple) and len(result) == 1 and isinstance(result[0], torch.Tensor):
        return result[0]
    return result


def _patched_trace_init(orig_init):
    @functools.wraps(orig_init)
    def __init__(self, module, layer=None, *args, **kwargs):
        nethook = sys.modules.get("easyeditor.util.nethook")
        try:
            target = nethook.get_module(module, layer) if (layer is not None and nethook) else module
        except Exception:
            target = None
        if target is not None and isinstance(target, torch.nn.Module) and is_decoder_block(module, target):
            orig_init(self, _TupleViewHookTarget(target), None, *args, **kwargs)
            self.layer = layer
        else:
            orig_init(self, module, layer, *args, **kwargs)

    __init__.__coachhook_patch__ = True
    return __init__


@contextlib.contextmanager
def block_output_compat() -> Iterator[None]:
    """Scoped: EasyEdit's ``nethook.Trace`` sees decoder-block outputs as ``(hidden_states,)``."""
    nethook = _ee_module("easyeditor.util.nethook")
    trace = getattr(nethook, "Trace", None)
    if trace is None or getattr(trace.__init__, "__coachhook_patch__", False):
        yield
        return
    orig = trace.__init__
    trace.__init__ = _patched_trace_init(orig)
    try:
        yield
    finally:
        trace.__init__ = orig


# --------------------------------------------------------------------------------------------------
# 4. LoRA
# --------------------------------------------------------------------------------------------------

_lora_state = threading.local()


def _spare_pad_id(tok, texts: Iterable[str]) -> Optional[int]:
    """A token id usable as padding that is neither eos/bos nor occurs in ``texts``."""
    taken = {tok.eos_token_id, tok.bos_token_id}
    for t in texts:
        taken.update(tok(t, add_special_tokens=True)["input_ids"])
    specials = [i for i in getattr(tok, "all_special_ids", []) if i not in taken]
    if specials:
        return specials[0]
    for i in range(len(tok) - 1, -1, -1):
        if i not in taken:
            return i
    return None


def _checkpointing_enabled(model) -> bool:
    # transformers 5 renamed gradient -> activation checkpointing (the old name warns)
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def _adalora_config_factory(real_cls):
    params = getattr(real_cls, "__dataclass_fields__", {})

    @functools.wraps(real_cls, updated=())
    def make(*args, **kwargs):
        if "total_step" in params and kwargs.get("total_step") is None:
            kwargs["total_step"] = getattr(_lora_state, "total_step", None) or 1
        return real_cls(*args, **kwargs)

    return make


def _patched_execute_lora(orig):
    @functools.wraps(orig)
    def execute_lora(model, tok, requests, hparams, *args, **kwargs):
        bs = max(1, int(getattr(hparams, "batch_size", 1) or 1))
        steps = max(1, int(getattr(hparams, "num_steps", 1) or 1))
        _lora_state.total_step = steps * max(1, math.ceil(len(requests) / bs))
        # EasyEdit appends eos to "{prompt} {target}" and then treats every pad-id token as padding;
        # with pad == eos (GPT-2, Llama) the eos counts as padding, the prompt mask shifts by one onto
        # the (first) target token and nothing is trained. Pad with an unused id for the duration.
        old_pad = getattr(tok, "pad_token", None)
        swap = tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id
        if swap:
            texts = [f"{r['prompt']} {r['target_new']}" for r in requests]
            texts += [r["prompt"] for r in requests]
            spare = _spare_pad_id(tok, texts)
            swap = spare is not None
            if swap:
                tok.pad_token = tok.convert_ids_to_tokens(spare)
        use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        had_gc = _checkpointing_enabled(model)
        try:
            peft_model = orig(model, tok, requests, hparams, *args, **kwargs)
        finally:
            _lora_state.total_step = None
            if swap:
                tok.pad_token = old_pad
        # peft leaves the model in train mode: dropout would be on during EasyEdit's evaluation
        if isinstance(peft_model, torch.nn.Module):
            peft_model.eval()
        if not had_gc and _checkpointing_enabled(model):  # EasyEdit turned it on for training only
            disable = getattr(model, "activation_checkpointing_disable", None) or \
                getattr(model, "gradient_checkpointing_disable", None)
            with contextlib.suppress(Exception):
                disable()
        if use_cache is not None:
            model.config.use_cache = use_cache
        return peft_model

    execute_lora.__coachhook_patch__ = True
    return execute_lora


@contextlib.contextmanager
def lora_compat() -> Iterator[None]:
    """Scoped fixes for EasyEdit's LoRA (see :func:`_patched_execute_lora`)."""
    lora_main = _ee_module("easyeditor.models.lora.lora_main")
    execute = getattr(lora_main, "execute_lora", None)
    if execute is None or getattr(execute, "__coachhook_patch__", False):
        yield
        return
    saved = {"execute_lora": lora_main.execute_lora}
    lora_main.execute_lora = _patched_execute_lora(lora_main.execute_lora)
    for name in ("AdaLoraConfig",):
        real = getattr(lora_main, name, None)
        if isinstance(real, type):
            saved[name] = real
            setattr(lora_main, name, _adalora_config_factory(real))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(lora_main, name, value)


def ensure_hparams_defaults(hparams) -> None:
    """Attributes ``BaseEditor`` reads that some EasyEdit hparams classes lack (e.g. PyPI LoRA:
    ``model_parallel``)."""
    if not hasattr(hparams, "model_parallel"):
        hparams.model_parallel = False


# --------------------------------------------------------------------------------------------------
# 5./6. the editor: loading, logging, scoped fixes around every call
# --------------------------------------------------------------------------------------------------

_ctx_state = threading.local()


@contextlib.contextmanager
def editing_context(force_cpu: bool = False) -> Iterator[None]:
    """All scoped fixes at once: :func:`cpu_fallback`, :func:`block_output_compat`, :func:`lora_compat`.

    Re-entrant (nested calls, e.g. ``edit`` -> ``edit_requests``, enter it once).
    """
    if getattr(_ctx_state, "depth", 0):
        _ctx_state.depth += 1
        try:
            yield
        finally:
            _ctx_state.depth -= 1
        return
    _ctx_state.depth = 1
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(cpu_fallback(force=force_cpu))
            stack.enter_context(block_output_compat())
            stack.enter_context(lora_compat())
            stack.enter_context(results_file_compat())
            yield
    finally:
        _ctx_state.depth = 0


@contextlib.contextmanager
def memit_context_templates(templates: Sequence[str]) -> Iterator[None]:
    """Make EasyEdit's MEMIT (and its relatives that share `memit_main`) and ROME use these context templates.

    EasyEdit generates MEMIT's and ROME's templates once per process with the model itself and caches them in
    module globals; there is no hparams field for them. Comparing methods fairly needs the same templates on
    every side, so the caches are set for the duration (``templates[0]`` must be "{}"; MEMIT's grouped as
    EasyEdit does: the raw prompt alone, then the rest; ROME's a flat list) and put back afterwards."""
    if not templates or templates[0] != "{}":
        raise ValueError("the first context template must be the raw prompt '{}'")
    caches = {"easyeditor.models.memit.memit_main": [["{}"]] + ([list(templates[1:])] if len(templates) > 1 else []),
              "easyeditor.models.rome.rome_main": list(templates)}
    modules = {name: _ee_module(name) for name in caches}
    modules = {name: m for name, m in modules.items() if m is not None and hasattr(m, "CONTEXT_TEMPLATES_CACHE")}
    if not modules:
        raise ImportError("this EasyEdit has no CONTEXT_TEMPLATES_CACHE in memit_main or rome_main; run MEMIT "
                          "and ROME with their own templates (drop the templates argument)")
    saved = {name: m.CONTEXT_TEMPLATES_CACHE for name, m in modules.items()}
    for name, m in modules.items():
        m.CONTEXT_TEMPLATES_CACHE = caches[name]
    try:
        yield
    finally:
        for name, m in modules.items():
            m.CONTEXT_TEMPLATES_CACHE = saved[name]


_LOG_DIR: Optional[str] = None
_LOGS_DIR_NAMES = ("logs", "./logs", "logs/", "./logs/")


class _LogsDirPath(types.ModuleType):
    """``os.path`` as EasyEdit's ``summary_metrics`` sees it under :func:`results_file_compat`."""

    def __init__(self, target: Optional[str]):
        super().__init__("os.path")
        self._target = target

    def __getattr__(self, name):
        return getattr(os.path, name)

    def exists(self, path):
        if path in _LOGS_DIR_NAMES:
            return True if self._target is None else os.path.exists(self._target)
        return os.path.exists(path)

    def join(self, path, *rest):
        if path in _LOGS_DIR_NAMES:
            return os.devnull if self._target is None else os.path.join(self._target, *rest)
        return os.path.join(path, *rest)


class _LogsDirOs(types.ModuleType):
    """``os`` as EasyEdit's ``summary_metrics`` sees it: ``./logs`` is the configured log directory, or
    nowhere (the results file goes to ``os.devnull``)."""

    def __init__(self, target: Optional[str]):
        super().__init__("os")
        self._target = target
        self.path = _LogsDirPath(target)

    def __getattr__(self, name):
        return getattr(os, name)

    def makedirs(self, path, *args, **kwargs):
        if path in _LOGS_DIR_NAMES:
            if self._target is not None:
                os.makedirs(self._target, exist_ok=True)
            return None
        return os.makedirs(path, *args, **kwargs)


@contextlib.contextmanager
def results_file_compat() -> Iterator[None]:
    """Scoped: newer EasyEdit's ``summary_metrics`` (called by ``edit``) writes ``./logs/results.json`` into
    the working directory; like ``run.log`` it goes to :func:`set_log_dir`'s directory, or nowhere."""
    utils = _ee_module("easyeditor.editors.utils")
    summary = getattr(utils, "summary_metrics", None)
    module_globals = getattr(summary, "__globals__", None)
    if module_globals is None or module_globals.get("os") is not os:
        yield
        return
    module_globals["os"] = _LogsDirOs(_log_dir())
    try:
        yield
    finally:
        module_globals["os"] = os
_log_handlers: Dict[str, logging.Handler] = {}


def set_log_dir(path: Optional[os.PathLike]) -> None:
    """Where EasyEdit's ``run.log`` goes. ``None`` (the default, unless ``COACHHOOK_EASYEDIT_LOG_DIR``
    is set) writes no file; EasyEdit itself writes ``./logs/run.log`` relative to the cwd."""
    global _LOG_DIR
    _LOG_DIR = None if path is None else os.fspath(path)


def _log_dir() -> Optional[str]:
    return _LOG_DIR if _LOG_DIR is not None else (os.environ.get("COACHHOOK_EASYEDIT_LOG_DIR") or None)


def _make_logs_replacement(editor_module):
    """EasyEdit's ``make_logs`` adds a file handler on ``./logs/run.log`` and a stream handler to its
    logger on *every* editor construction. Ours adds each handler at most once and writes the file
    only when a log directory is configured."""

    def make_logs():
        logger = getattr(editor_module, "LOG", None)
        if logger is None:
            return
        fmt = logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s")
        if "stream" not in _log_handlers:
            _log_handlers["stream"] = logging.StreamHandler()
            _log_handlers["stream"].setFormatter(fmt)
        if _log_handlers["stream"] not in logger.handlers:
            logger.addHandler(_log_handlers["stream"])
        target = _log_dir()
        if target:
            os.makedirs(target, exist_ok=True)
            path = os.path.abspath(os.path.join(target, "run.log"))
            if path not in _log_handlers:
                _log_handlers[path] = logging.FileHandler(path)
                _log_handlers[path].setFormatter(fmt)
            if _log_handlers[path] not in logger.handlers:
                logger.addHandler(_log_handlers[path])

    return make_logs


def load_model_and_tokenizer(name_or_path: str, hparams: Any = None, **model_kwargs):
    """Load any HF id or local path with the Auto classes (EasyEdit picks classes by substrings of the
    name and uses ``LlamaTokenizer``, which mis-tokenizes e.g. SmolLM2). Sets ``pad = eos`` when the
    tokenizer has no pad token (as EasyEdit does)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from ..models import MODEL_ALIASES, resolve_model_path

    alias = name_or_path if isinstance(name_or_path, str) and name_or_path.lower() in MODEL_ALIASES else None
    name_or_path = resolve_model_path(name_or_path)  # 'smollm2-135m' → the cached local checkpoint
    config = AutoConfig.from_pretrained(name_or_path)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    if hparams is not None:
        if getattr(hparams, "model_parallel", False):
            model_kwargs.setdefault("device_map", "auto")
        if getattr(hparams, "fp16", False):
            model_kwargs.setdefault("dtype", torch.float16)
    model = cls.from_pretrained(name_or_path, **model_kwargs)
    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token_id = tok.eos_token_id
    if alias is not None:  # statistics files are found under the alias, as for a hub id
        model.config._name_or_path = alias
    return model.eval(), tok


def model_display_name(model) -> str:
    """A string EasyEdit can use as ``model_name`` (it calls ``.lower()`` and looks for 't5', 'llama')."""
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "") or type(model).__name__
    name = str(name)
    if "t5" in name.lower() and not getattr(cfg, "is_encoder_decoder", False):
        name = getattr(cfg, "model_type", None) or type(model).__name__
    return name


def apply_padding_side(tok, alg_name: str, model=None) -> None:
    """EasyEdit's padding rule, extended by the registry: right for locate-by-position methods
    (ROME, MEMIT, ... and registered methods that ask for it), left for the other methods, on
    decoder-only models."""
    if tok is None or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return
    from . import registry

    side = registry.padding_side_for(alg_name)
    if side is None:
        side = "right" if alg_name in RIGHT_PADDING_ALGS else "left"
    tok.padding_side = side


def _should_use_own_loader(name: str) -> bool:
    low = name.lower()
    return not any(fam in low for fam in _EASYEDIT_LOADED_FAMILIES)


def _patched_editor_init(orig_init, editor_module):
    @functools.wraps(orig_init)
    def __init__(self, hparams, *args, **kwargs):
        if hparams is None:
            return orig_init(self, hparams, *args, **kwargs)
        ensure_hparams_defaults(hparams)
        name = hparams.model_name
        loaded_here = False
        if isinstance(name, str) and _should_use_own_loader(name):
            model, tok = load_model_and_tokenizer(name, hparams)
            display, loaded_here = name, True
        elif isinstance(name, (tuple, list)) and len(name) == 2:
            model, tok = name
            display = model_display_name(model)
        else:
            model = tok = None
        real_make_logs = getattr(editor_module, "make_logs", None)
        if real_make_logs is not None:
            editor_module.make_logs = _make_logs_replacement(editor_module)
        try:
            with editing_context():
                if model is None:
                    return orig_init(self, hparams, *args, **kwargs)
                hparams.model_name = (model, tok)
                try:
                    orig_init(self, hparams, *args, **kwargs)
                finally:
                    # evaluation calls model_name.lower(); LoRA calls hparams.model_name.lower()
                    hparams.model_name = display
                self.model_name = display
                if loaded_here:
                    apply_padding_side(self.tok, hparams.alg_name, self.model)
                else:
                    from . import registry

                    side = registry.padding_side_for(hparams.alg_name)
                    if side is not None and self.tok is not None:
                        self.tok.padding_side = side
        finally:
            if real_make_logs is not None:
                editor_module.make_logs = real_make_logs

    __init__.__coachhook_patch__ = True
    return __init__


def _scoped_method(orig):
    @functools.wraps(orig)
    def method(self, *args, **kwargs):
        with editing_context():
            return orig(self, *args, **kwargs)

    method.__coachhook_patch__ = True
    return method


def _patched_edit(orig):
    """``edit`` in :func:`editing_context`, and the editor's ``hparams.batch_size`` as it was afterwards: PyPI
    EasyEdit's ``edit`` sets it to 1 for good ("singleton editing"), so a later ``batch_edit`` on the same editor
    silently edited one record per batch."""
    @functools.wraps(orig)
    def edit(self, *args, **kwargs):
        hparams = getattr(self, "hparams", None)
        batch_size = getattr(hparams, "batch_size", None)
        try:
            with editing_context():
                return orig(self, *args, **kwargs)
        finally:
            if batch_size is not None:
                hparams.batch_size = batch_size

    edit.__coachhook_patch__ = True
    return edit


#: BaseEditor methods that hand the method one request per call (``[request]``) in every EasyEdit. GitHub
#: EasyEdit asserts ``hparams.batch_size == 1`` in them, PyPI EasyEdit sets it to 1 for good; the shipped
#: hparams carry the batch size ``batch_edit`` uses (CoachHooK: 10).
ONE_REQUEST_PER_CALL_METHODS = ("edit", "edit_requests", "generate_edit")


def _one_request_per_call(orig):
    """While ``orig`` runs, the editor's ``hparams.batch_size`` reads 1 (what these methods do anyway: one
    request per call), so GitHub EasyEdit's "Single Editing: batch_size should be set to 1" assertion holds
    with the shipped hparams; the user's value is put back afterwards, also on error. Nested calls
    (``edit`` -> ``edit_requests``) are handled by the outermost one."""
    @functools.wraps(orig)
    def method(self, *args, **kwargs):
        hparams = getattr(self, "hparams", None)
        batch_size = getattr(hparams, "batch_size", None)
        if batch_size is None or batch_size == 1:
            return orig(self, *args, **kwargs)
        hparams.batch_size = 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            hparams.batch_size = batch_size

    method.__coachhook_patch__ = True
    return method


#: EasyEdit's public evaluation functions: user code calls them after editing with ``hparams.device`` (an int, or
#: "cpu" in GitHub EasyEdit's hparams), and they build ``f"cuda:{device}"`` themselves.
PUBLIC_EVALUATION_FUNCTIONS = ("compute_edit_quality", "compute_rewrite_or_rephrase_quality",
                               "compute_locality_quality", "compute_portability_quality",
                               "compute_icl_edit_quality")
_wrapped_evaluation: Dict[int, Tuple[Callable, Callable]] = {}  # id(original) -> (original, wrapper)


def _scoped_function(orig):
    @functools.wraps(orig)
    def function(*args, **kwargs):
        with editing_context():
            return orig(*args, **kwargs)

    function.__coachhook_patch__ = True
    return function


def _easyeditor_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "easyeditor" or name.startswith("easyeditor."))]


def _wrap_public_evaluation() -> None:
    """Run EasyEdit's public evaluation functions inside :func:`editing_context`, in every EasyEdit module that
    holds them (``from .evaluate import *`` copies the reference into ``easyeditor``, ``easyeditor.evaluate`` and
    the editor module), so ``compute_edit_quality(..., hparams.device)`` works on a machine without a GPU."""
    for module in _easyeditor_modules():
        for name in PUBLIC_EVALUATION_FUNCTIONS:
            fn = module.__dict__.get(name)
            if not callable(fn) or getattr(fn, "__coachhook_patch__", False):
                continue
            if id(fn) not in _wrapped_evaluation:
                _wrapped_evaluation[id(fn)] = (fn, _scoped_function(fn))
            setattr(module, name, _wrapped_evaluation[id(fn)][1])


def _unwrap_public_evaluation() -> None:
    wrappers = {id(w): orig for orig, w in _wrapped_evaluation.values()}
    for module in _easyeditor_modules():
        for name in PUBLIC_EVALUATION_FUNCTIONS:
            fn = module.__dict__.get(name)
            if id(fn) in wrappers:
                setattr(module, name, wrappers[id(fn)])
    _wrapped_evaluation.clear()


#: BaseEditor methods that run EasyEdit editing / evaluation code (whichever exist)
EDITOR_METHODS = ("edit", "batch_edit", "edit_dataset", "edit_requests", "sequential_edit",
                  "normal_edit", "generate_edit")
_installed: Dict[str, Any] = {}


def install() -> bool:
    """Patch EasyEdit's ``BaseEditor`` (once; idempotent) so that it loads any model on CPU and runs
    every edit / evaluation call inside :func:`editing_context`. Returns False if easyeditor is not
    importable. Undo with :func:`uninstall`."""
    if _installed:
        return True
    if not easyeditor_available():
        return False
    editor_module = _ee_module("easyeditor.editors.editor")
    base = getattr(editor_module, "BaseEditor", None)
    if base is None:
        return False
    init = base.__dict__.get("__init__")
    if init is not None and not getattr(init, "__coachhook_patch__", False):
        _installed["__init__"] = init
        base.__init__ = _patched_editor_init(init, editor_module)
    for name in EDITOR_METHODS:
        fn = base.__dict__.get(name)
        if callable(fn) and not getattr(fn, "__coachhook_patch__", False):
            _installed[name] = fn
            patched = _patched_edit(fn) if name == "edit" else _scoped_method(fn)
            if name in ONE_REQUEST_PER_CALL_METHODS:
                patched = _one_request_per_call(patched)
            setattr(base, name, patched)
    _installed["__class__"] = base
    _wrap_public_evaluation()
    return True


def uninstall() -> None:
    """Undo :func:`install`."""
    base = _installed.pop("__class__", None)
    for name, fn in list(_installed.items()):
        if base is not None:
            setattr(base, name, fn)
    _installed.clear()
    _unwrap_public_evaluation()


def make_editor(hparams, model=None, tok=None):
    """Build an EasyEdit ``BaseEditor`` for ``hparams`` on whatever device is available.

    * ``model=None``: ``hparams.model_name`` (any HF id or local path) is loaded with the Auto classes;
    * ``model`` given: that model (and ``tok``, loaded from ``hparams.model_name`` /
      ``model.config._name_or_path`` if omitted) is used as is.

    ``hparams.model_name`` / ``editor.model_name`` end up as a *string* in both cases (EasyEdit's
    evaluation calls ``model_name.lower()``).
    """
    if not install():
        raise ImportError("easyeditor is not importable; install it (pip install --no-deps easyeditor)")
    from easyeditor.editors.editor import BaseEditor

    if model is not None:
        if tok is None:
            from transformers import AutoTokenizer

            src = hparams.model_name if isinstance(hparams.model_name, str) else model.config._name_or_path
            tok = AutoTokenizer.from_pretrained(src)
            if tok.pad_token_id is None and tok.eos_token_id is not None:
                tok.pad_token_id = tok.eos_token_id
        hparams.model_name = (model, tok)
    return BaseEditor(hparams)


# Batchable in GitHub EasyEdit's ``BatchEditor`` (LoRA, QLoRA, PMET, EMMET) but not in PyPI's older list,
# plus AlphaEdit (MEMIT's request loop, whatever the list says); their apply functions write every request
# of a list in both flavours. GRACE/WISE are left to ``BatchEditor`` (one request per call unless it says so).
_BATCHABLE_SINCE_PYPI = frozenset({"LoRA", "QLoRA", "PMET", "EMMET", "AlphaEdit"})


def is_batchable(alg_name: str) -> bool:
    """Whether EasyEdit's ``apply_<alg>_to_model`` writes every request it is given.

    ROME and KN read ``requests[0]`` only (EasyEdit's ``edit`` calls them once per request; its
    ``batch_edit`` refuses them): passing them a batch silently drops all but its first edit.
    """
    if alg_name in _BATCHABLE_SINCE_PYPI:
        return True
    install()  # the registry's own methods answer through the patched is_batchable_method
    mod = _ee_module("easyeditor.editors.batch_editor")
    cls = getattr(mod, "BatchEditor", None)
    if cls is None:
        return alg_name not in ("ROME", "KN", "R-ROME")
    return bool(cls.is_batchable_method(alg_name))


# --------------------------------------------------------------------------------------------------
# 7. results and weights
# --------------------------------------------------------------------------------------------------


def to_builtin(obj: Any) -> Any:
    """Recursively convert EasyEdit results (numpy scalars/arrays, tensors, tuples, dataclasses,
    paths) to plain ``json``-serialisable Python values. Dict keys become strings when they are not
    str/int/float/bool/None."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if np is not None:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return to_builtin(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return to_builtin(obj.detach().cpu().tolist())
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            k = to_builtin(k)
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                k = str(k)
            out[k] = to_builtin(v)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_builtin(v) for v in obj]
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_builtin(asdict(obj))
    if isinstance(obj, (PurePath, torch.device, torch.dtype)):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        with contextlib.suppress(Exception):
            return to_builtin(obj.item())
    return str(obj)


def unwrap_edited_model(model, edited):
    """The model to keep editing after ``edited, weights_copy = apply_algo(model, ...)``.

    Newer EasyEdit's GRACE returns its editor wrapper (an ``nn.Module`` holding the model as ``.model``,
    which it edited in place: the adapter is inside ``model``); keeping the wrapper would make the next call
    look for ``transformer`` inside the wrapper. Every other method returns the model (or a PEFT model)."""
    inner = getattr(edited, "model", None) if edited is not model else None
    if isinstance(edited, torch.nn.Module) and inner is model:
        return model
    return edited


def restore_weights(model, weights_copy) -> None:
    """Undo an edit from what an EasyEdit ``apply_*_to_model`` returned as ``weights_copy``:
    a ``{param_name: original_tensor}`` dict (copied back onto each parameter's own device), a
    callable (GRACE/WISE/KN-style restore function; called) or None/empty (nothing to do)."""
    if weights_copy is None:
        return
    if callable(weights_copy):  # a restore function, or the registry's RestoreHandle (an empty dict)
        owner = getattr(weights_copy, "__self__", None)
        if getattr(weights_copy, "__name__", "") == "reset_layer" and owner is not None and \
                hasattr(owner, "original_layer") and owner.original_layer is None:
            # newer EasyEdit's GRACE: this call found GRACE's adapter already in the model (an earlier call of the
            # same batch put it there) and kept no original layer; its reset_layer would put None into the model.
            # The earliest call's handle restores the layer.
            return
        weights_copy()
        return
    if isinstance(weights_copy, dict):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights_copy.items():
                p = params.get(name)
                if p is None:
                    nethook = _ee_module("easyeditor.util.nethook")
                    p = nethook.get_parameter(model, name)
                p[...] = value.to(device=p.device, dtype=p.dtype)
        return
    raise TypeError(f"cannot restore from {type(weights_copy).__name__}")


# --------------------------------------------------------------------------------------------------
# 8. hparams files that load with either EasyEdit's classes
# --------------------------------------------------------------------------------------------------

#: Fields newer EasyEdit's hparams classes *require* that yamls written for PyPI EasyEdit (the plugin's shipped
#: hparams/{FT,LoRA,AlphaEdit,GRACE}) lack, with the value EasyEdit's own hparams/<ALG>/*.yaml ship; where PyPI
#: EasyEdit had one behaviour only, that behaviour.
EASYEDIT_FIELD_DEFAULTS: Dict[str, Any] = {
    "objective_optimization": "prompt_last",  # FT: loss on the target from the last prompt position (PyPI's FT = FT-L)
    "lora_type": "adalora",                   # LoRA: PyPI's LoRA is AdaLoRA
    "P_loc": "null_space_project.pt",         # AlphaEdit: its cached null-space projection (computed when absent)
    "layer_selection": "all",                 # MEMIT family: every layer in `layers` (all EasyEdit's yamls)
    # GRACE (GraceHyperParams): EasyEdit's hparams/GRACE yamls
    "dist_fn": "euc", "val_init": "cold", "val_train": "sgd", "val_reg": None, "reg": "early_stop",
    "replacement": "replace_last", "eps_expand": "coverage", "num_pert": 8, "dropout": 0.0,
}


def _derived_fields(config: Dict[str, Any]) -> Dict[str, Any]:
    """Fields newer EasyEdit names differently, derived from the ones the yaml has."""
    out = {}
    layers, template = config.get("layers"), config.get("rewrite_module_tmp")
    if isinstance(layers, list) and isinstance(template, str) and "{}" in template:
        # GRACE: the module's weight in EasyEdit's GRACE spelling, "transformer.h[35].mlp.c_proj.weight" (its
        # GRACE eval()s the module path, so a layer index must be written as an item, not an attribute)
        indexed = template.replace(".{}", "[{}]")
        out["inner_params"] = [f"{indexed.format(layer)}.weight" for layer in layers]
    return out


def easyedit_hparams_class(alg_name: str) -> Optional[type]:
    """The installed EasyEdit's hparams class for ``alg_name`` (``GRACEHyperParams`` in PyPI-era code is
    ``GraceHyperParams`` in newer EasyEdit: matched without regard to case or '-'), or None."""
    ee = import_easyeditor()
    want = f"{alg_name}HyperParams".replace("-", "").lower()
    for name in dir(ee):
        if name.lower() == want and isinstance(getattr(ee, name, None), type):
            return getattr(ee, name)
    return None


def _required_fields(cls: type) -> List[str]:
    import dataclasses

    if not dataclasses.is_dataclass(cls):
        return []
    return [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]


def easyedit_method_limits(alg_name: str) -> Optional[str]:
    """Why the installed EasyEdit's own ``alg_name`` cannot edit an arbitrary model, or None when it can.

    Newer EasyEdit's AlphaEdit (recognised by its required ``P_loc``, a precomputed projection file) picks the
    projection matrices' shapes by substrings of ``model_name`` (llama / qwen / gpt-j-6b / gpt2-xl: any other
    name, SmolLM2's included, fails with ``NameError: P``), writes ``null_space_project.pt`` into the working
    directory and keeps the projection in module globals, reused for the next model."""
    if alg_name == "AlphaEdit":
        cls = easyedit_hparams_class(alg_name)
        if cls is not None and "P_loc" in _required_fields(cls):
            return ("the installed EasyEdit's AlphaEdit sizes its null-space projection by the model's name "
                    "(llama/qwen/gpt-j-6b/gpt2-xl only), writes null_space_project.pt into the working directory "
                    "and reuses it across models")
    return None


def hparams_from_config(cls: type, config: Dict[str, Any], source: str = "hparams") -> Any:
    """Build the EasyEdit hparams dataclass ``cls`` from a yaml's fields so that one yaml loads with either
    EasyEdit's classes: required fields the yaml lacks are derived (:func:`_derived_fields`) or filled with
    :data:`EASYEDIT_FIELD_DEFAULTS`, fields ``cls`` does not know are dropped; each change is logged. A required
    field with no documented default is an error naming it."""
    import dataclasses

    config = dict(config)
    if not dataclasses.is_dataclass(cls):
        return cls(**config)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    changes = []
    derived = _derived_fields(config)
    for name in required:
        if name in config:
            continue
        if name in derived:
            config[name] = derived[name]
            changes.append(f"{name}={config[name]!r} (derived)")
        elif name in EASYEDIT_FIELD_DEFAULTS:
            config[name] = EASYEDIT_FIELD_DEFAULTS[name]
            changes.append(f"{name}={config[name]!r} (EasyEdit's default)")
    missing = [n for n in required if n not in config]
    if missing:
        raise ValueError(f"{source}: {cls.__name__} of the installed EasyEdit requires {', '.join(missing)}, which "
                         f"the yaml lacks and which have no documented default; add them to the yaml")
    dropped = sorted(k for k in config if k not in fields)
    for k in dropped:
        del config[k]
    if dropped:
        changes.append(f"dropped {', '.join(dropped)} (not fields of {cls.__name__})")
    if changes:
        LOG.info("%s loaded as %s: %s", source, cls.__name__, "; ".join(changes))
    convert = getattr(cls, "construct_float_from_scientific_notation", None)
    if callable(convert):  # what EasyEdit's from_hparams does: "5e-4" (a yaml string) -> 0.0005
        config = convert(config)
    return cls(**config)


def load_easyedit_hparams(path: os.PathLike, alg_name: Optional[str] = None) -> Any:
    """Load an EasyEdit-method yaml (ROME, MEMIT, FT, LoRA, AlphaEdit, GRACE, ...) with the installed EasyEdit's
    class for its ``alg_name``, whichever EasyEdit that is (see :func:`hparams_from_config`)."""
    import yaml

    config = yaml.safe_load(open(os.fspath(path)).read()) or {}
    alg_name = alg_name or config.get("alg_name")
    cls = easyedit_hparams_class(alg_name) if alg_name else None
    if cls is None:
        raise ValueError(f"{path}: the installed EasyEdit has no hparams class for alg_name {alg_name!r}")
    return hparams_from_config(cls, config, source=os.fspath(path))


def _editor_parameter(method: str, name: str) -> bool:
    """Whether this EasyEdit's ``BaseEditor.<method>`` declares the parameter ``name`` (not via ``**kwargs``)."""
    editor_module = _ee_module("easyeditor.editors.editor")
    fn = getattr(getattr(editor_module, "BaseEditor", None), method, None)
    if fn is None:
        return False
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def consecutive_edit_kwargs(method: str = "batch_edit") -> Dict[str, bool]:
    """Keyword arguments that make ``BaseEditor.edit`` / ``batch_edit`` *keep* each call's edit, so that
    repeated calls accumulate (consecutive editing), in whichever EasyEdit is installed.

    Newer EasyEdit rolls every call back unless ``sequential_edit=True``; PyPI EasyEdit keeps edits unless
    ``keep_original_weight=True``. Use as ``editor.batch_edit(..., **consecutive_edit_kwargs())``."""
    if _editor_parameter(method, "sequential_edit"):
        return {"sequential_edit": True}
    return {"keep_original_weight": False}


def single_round_edit_kwargs(method: str = "batch_edit") -> Dict[str, bool]:
    """Keyword arguments that make ``edit`` / ``batch_edit`` roll each call back after its evaluation
    (single-round editing): ``sequential_edit=False`` (newer EasyEdit), ``keep_original_weight=True`` (PyPI)."""
    if _editor_parameter(method, "sequential_edit"):
        return {"sequential_edit": False}
    return {"keep_original_weight": True}


def accepts_kwarg(fn: Callable, name: str) -> bool:
    """Whether ``fn`` accepts keyword ``name`` (directly or through ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    return name in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
