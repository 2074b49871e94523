"""Scoped fixes of EasyEdit's code for newer transformers / peft (decoder-block outputs, LoRA), and
:func:`editing_context`, which runs every scoped fix together (what the patched ``BaseEditor`` methods enter)."""
from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading
from typing import Any, Iterable, Iterator, Optional, Sequence, Tuple

import torch

from .devices import cpu_fallback
from .imports import easyeditor_module
from .learned_editors import learned_editor_compat
from .logs import results_file_compat


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
    nethook = easyeditor_module("easyeditor.util.nethook")
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
    lora_main = easyeditor_module("easyeditor.models.lora.lora_main")
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
    """All scoped fixes at once: :func:`cpu_fallback`, :func:`block_output_compat`, :func:`lora_compat`,
    :func:`.learned_editors.learned_editor_compat` (MEND/SERAC archives).

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
            stack.enter_context(learned_editor_compat())
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
    modules = {name: easyeditor_module(name) for name in caches}
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
