"""Save, load and undo the CoachHooK editor state (safetensors + JSON, never pickle).

File format (one file, written atomically: temporary file in the same folder, fsync, rename):
a safetensors file whose tensors are the hook layers' `state_tensors()` (stored under the names
`layer.<index>.<n>`, mapped back to the layer's own names by the manifest) and whose metadata entry
`"coachhook"` is one JSON document:

    {"format": "coachhook-state", "format_version": 1, "library_version": "...",
     "step": <batches written>, "context_templates": [...] | null, "hparams": {...},
     "alpha_prompts": [[token id, ...], ...],   # every edit prompt so far (alpha_rule recomputed); absent
                                                # in files written before it: read as none
     "fingerprint": {"architecture": sha256, "dtype": "...", "edited_modules": sha256, "sampled": sha256},
     "layers": {"<layer>": {"module": "<module name>", "tensors": {"<state name>": "<file key>"},
                            "extra": <extra_state()>}},
     "extra": {...}}            # caller data, e.g. the progress of `coachhook edit`

Only the HookLayer state contract is used (`state_tensors()`, `extra_state()`, `load_state()`), so whatever
names, shapes and dtypes a layer reports are saved and handed back unchanged. The base model is never
saved: the fingerprint identifies it, and loading onto another base model (or another dtype) is refused.

Undo: every successful batch pushes the state from before it (a `CoachHooKState.snapshot()`) onto a bounded
journal (`undo_depth` in the hparams, default 1; 0 keeps none). Undoing k batches restores the k-th newest
snapshot exactly. Memory: the journal holds up to `undo_depth` snapshots, each a full copy of the state tensors
at that point (`state_nbytes`, on the state's device), so undoing k batches costs k snapshots. The hook state
grows with the number of edits n until it is dense; for SmolLM2-135M's five edited layers (down_proj
1536 → 576) one snapshot is at most `snapshot_nbytes_for(576, 1536, 5, n)` bytes: 729,600 (n = 10),
7,296,000 (n = 100), 48,414,720 (n = 1,000) and 64,880,640 (61.9 MiB) from n = 1,536 on, the dense
maximum (float32 Δ 576×1536 + float32 Σkkᵀ 1536×1536 per layer). `journal_nbytes(model)` reports the live total.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ._version import __version__
from .files import atomic_write, atomic_write_json
from .hparams import CoachHooKHyperParams, HyperParamsError
from .method import ensure_state, get_state, remove_coachhook
from .models import get_module

FORMAT = "coachhook-state"
FORMAT_VERSION = 1
META_KEY = "coachhook"
FINGERPRINT_SAMPLES = 64  # elements sampled from every tensor of the model for the "sampled" fingerprint
CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "n_embd", "intermediate_size", "n_inner",
                 "num_hidden_layers", "n_layer", "num_attention_heads", "n_head", "num_key_value_heads",
                 "head_dim", "rotary_dim", "hidden_act", "activation_function", "layer_norm_epsilon",
                 "layer_norm_eps", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                 "max_position_embeddings", "n_positions")

PathLike = Union[str, os.PathLike]


class PersistenceError(ValueError):
    """A state file cannot be saved or loaded as asked; the message says why and how to fix it."""


class UndoError(ValueError):
    """More batches were asked to be undone than the journal holds; nothing was changed."""


# --------------------------------------------------------------------------- fingerprint
def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().reshape(-1).contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _update_tensor(h, name: str, t: torch.Tensor, data: bytes) -> None:
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(data)


def sample_indices(numel: int, count: int) -> torch.Tensor:
    """`count` evenly spaced indices into a tensor of `numel` elements, first and last included, in exact
    int64 arithmetic (a float32 linspace cannot hold indices past 2**24: the last one rounds past the end)."""
    count = min(count, numel)
    if count <= 1:
        return torch.zeros(count, dtype=torch.long)
    return torch.arange(count, dtype=torch.long) * (numel - 1) // (count - 1)


def fingerprint(model: torch.nn.Module, hparams: CoachHooKHyperParams) -> Dict[str, str]:
    """A cheap but distinguishing identity of the base model, in parts (so a mismatch can say what differs):

    architecture    model class, the structural config fields, every state-dict name and shape
    dtype           dtype of the edited modules' weights
    edited_modules  every byte of the edited modules' parameters (the weights the hooks copy; W_0 of the gate)
    sampled         name, shape, dtype and 64 evenly spaced elements of every state-dict tensor
    Hooks never change a parameter, so the fingerprint is the same before and after editing."""
    sd = model.state_dict()
    arch = hashlib.sha256()
    arch.update(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    fields = {k: getattr(cfg, k) for k in CONFIG_FIELDS if cfg is not None and getattr(cfg, k, None) is not None}
    arch.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, t in sd.items():
        arch.update(f"{name}|{tuple(t.shape)};".encode())

    edited = hashlib.sha256()
    dtypes = set()
    for l in sorted(hparams.layers):
        name = hparams.rewrite_module_tmp.format(l)
        for pname, p in sorted(get_module(model, name).named_parameters(recurse=False)):
            _update_tensor(edited, f"{name}.{pname}", p, _tensor_bytes(p))
            if pname == "weight":
                dtypes.add(str(p.dtype).replace("torch.", ""))

    sampled = hashlib.sha256()
    for name, t in sd.items():
        flat = t.detach().reshape(-1)
        if flat.numel():
            idx = sample_indices(flat.numel(), FINGERPRINT_SAMPLES)
            data = _tensor_bytes(flat[idx.to(flat.device)])
        else:
            data = b""
        _update_tensor(sampled, name, t, data)
    return {"architecture": arch.hexdigest(), "dtype": ",".join(sorted(dtypes)),
            "edited_modules": edited.hexdigest(), "sampled": sampled.hexdigest()}


# --------------------------------------------------------------------------- save
def hparams_json(hp: CoachHooKHyperParams) -> Dict[str, Any]:
    return json.loads(json.dumps(hp.to_dict(), default=str))


def save_coachhook(model: torch.nn.Module, path: PathLike, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write the model's CoachHooK state (hook state of every layer, α, step, context templates, hparams,
    base-model fingerprint) to `path` as one safetensors file, atomically. `extra`: JSON-able caller data
    stored with it (read back by `read_coachhook`)."""
    from safetensors.torch import save_file

    state = get_state(model)
    if state is None:
        raise PersistenceError("this model carries no CoachHooK state to save: edit it first "
                               "(apply_coachhook_to_model or an EasyEdit editor with alg_name CoachHooK)")
    tensors: Dict[str, torch.Tensor] = {}
    layers: Dict[str, Any] = {}
    for l, h in sorted(state.layers.items()):
        names = {}
        for i, (name, t) in enumerate(h.state_tensors().items()):
            key = f"layer.{l}.{i}"
            tensors[key] = t.detach().to("cpu", copy=True).contiguous()
            names[name] = key
        layers[str(l)] = {"module": h.module_name, "tensors": names, "extra": h.extra_state()}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": _library_version(),
              "step": int(state.step),
              "context_templates": list(state.context_templates) if state.context_templates is not None else None,
              "alpha_prompts": [list(p) for p in getattr(state, "alpha_prompts", ())],
              "hparams": hparams_json(state.hparams), "fingerprint": fingerprint(model, state.hparams),
              "layers": layers, "extra": extra or {}}
    try:
        meta = {META_KEY: json.dumps(header)}
    except (TypeError, ValueError) as e:
        raise PersistenceError(f"the CoachHooK state has a value JSON cannot hold ({e}); extra_state() and "
                               f"`extra` must be JSON-able") from e
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _library_version() -> str:
    return __version__


# --------------------------------------------------------------------------- read
def read_header(path: PathLike) -> Dict[str, Any]:
    """The JSON header of a state file, after checking that it is one and of a format this version reads."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CoachHooK state file {path} not found; write one with save_coachhook(model, path)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # not a safetensors file at all
        raise PersistenceError(f"{path} is not a CoachHooK state file (not readable as safetensors: {e}); "
                               f"pass a file written by save_coachhook") from e
    try:
        header = json.loads(meta[META_KEY])
    except (KeyError, ValueError) as e:
        raise PersistenceError(f"{path} is a safetensors file without a CoachHooK header; pass a file written "
                               f"by save_coachhook") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PersistenceError(f"{path} is not a CoachHooK state file (format {header.get('format')!r}); pass "
                               f"a file written by save_coachhook")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise PersistenceError(
            f"{path} is CoachHooK state format version {version} (written by coachhook-plugin "
            f"{header.get('library_version')}), but this coachhook-plugin ({_library_version()}) reads format "
            f"version {FORMAT_VERSION} only: load it with coachhook-plugin {header.get('library_version')}, "
            f"or rebuild the state by re-running its edits with this version")
    return header


def read_coachhook(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(header, snapshot) of a state file without any model: the snapshot has CoachHooKState.snapshot()'s layout
    ({"step", "layers": {layer: (tensors, extra)}}), tensors on the CPU exactly as saved."""
    from safetensors.torch import load_file

    header = read_header(path)
    stored = load_file(str(path), device="cpu")
    layers = {}
    for l, entry in header["layers"].items():
        missing = [k for k in entry["tensors"].values() if k not in stored]
        if missing:
            raise PersistenceError(f"{path} is damaged: tensors {missing} of layer {l} are missing; use another "
                                   f"checkpoint")
        layers[int(l)] = ({name: stored[key] for name, key in entry["tensors"].items()}, dict(entry["extra"]))
    return header, {"step": int(header["step"]), "alpha_prompts": _alpha_prompts_of(header, path), "layers": layers}


def _alpha_prompts_of(header: Dict[str, Any], path) -> Tuple[Tuple[int, ...], ...]:
    """The stored edit prompts' token ids; none in a file written before they were kept."""
    prompts = header.get("alpha_prompts", [])
    if not isinstance(prompts, list) or any(not isinstance(p, list) or not p or
                                            any(isinstance(i, bool) or not isinstance(i, int) for i in p)
                                            for p in prompts):
        raise PersistenceError(f"{path} is damaged: 'alpha_prompts' in its header is not a list of token-id lists; "
                               f"use another checkpoint")
    return tuple(tuple(p) for p in prompts)


def _hparams_from_header(header: Dict[str, Any], path) -> CoachHooKHyperParams:
    saved = dict(header["hparams"])
    known = {f.name for f in dataclasses.fields(CoachHooKHyperParams)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise PersistenceError(f"{path} was saved with hparams fields this coachhook-plugin does not know "
                               f"({', '.join(unknown)}); pass hparams=CoachHooKHyperParams(...) explicitly or "
                               f"load it with coachhook-plugin {header.get('library_version')}")
    try:
        return CoachHooKHyperParams(**saved)
    except (HyperParamsError, TypeError) as e:
        raise PersistenceError(f"{path}: the saved hparams are not valid for this version ({e}); pass "
                               f"hparams=... explicitly") from e


def _check_fingerprint(saved: Dict[str, str], now: Dict[str, str], header, path) -> None:
    differ = [k for k in saved if saved.get(k) != now.get(k)]
    if not differ:
        return
    name = header["hparams"].get("model_name")
    if differ == ["dtype"] or (saved.get("dtype") != now.get("dtype") and "architecture" not in differ):
        fix = (f"load the base model in {saved.get('dtype')} (it is {now.get('dtype')} now), as when the state "
               f"was saved")
    else:
        fix = f"load the state onto the base model it was saved from ({name!r}), with the same weights"
    raise PersistenceError(f"{path} was saved from a different base model: its fingerprint differs in "
                           f"{', '.join(differ)}. {fix[0].upper() + fix[1:]}; or pass check_fingerprint=False to "
                           f"load it anyway (outputs are then not guaranteed)")


# --------------------------------------------------------------------------- load
def load_coachhook(model: torch.nn.Module, path: PathLike, hparams: Optional[CoachHooKHyperParams] = None,
                   check_fingerprint: bool = True):
    """Put the CoachHooK state saved at `path` onto `model` (the same base model it was saved from) and
    return the CoachHooKState. `hparams`: used for further edits (default: the saved ones); its layers and
    module template must match the file. A model that already carries CoachHooK hooks on the same layers has
    its state replaced. Any failure leaves the model exactly as it was. The undo journal starts empty."""
    path = Path(path)
    header = read_header(path)
    hp = hparams if hparams is not None else _hparams_from_header(header, path)
    if not isinstance(hp, CoachHooKHyperParams):
        raise TypeError(f"hparams must be CoachHooKHyperParams, got {type(hp).__name__}")
    hp.validate()
    saved_layers = sorted(int(l) for l in header["layers"])
    saved_modules = {int(l): e["module"] for l, e in header["layers"].items()}
    wanted_modules = {l: hp.rewrite_module_tmp.format(l) for l in hp.layers}
    if saved_modules != wanted_modules:
        raise PersistenceError(f"{path} holds hooks on layers {saved_layers} ({sorted(saved_modules.values())}), "
                               f"but the hparams ask for layers {list(hp.layers)} ({hp.rewrite_module_tmp}); "
                               f"pass hparams with the saved layers and rewrite_module_tmp, or hparams=None to "
                               f"use the saved ones")
    hp.validate_for_model(model)
    if check_fingerprint:
        _check_fingerprint(header["fingerprint"], fingerprint(model, hp), header, path)
    existing = get_state(model)
    if existing is not None and [int(l) for l in existing.layers] != list(hp.layers):
        raise PersistenceError(f"this model already carries CoachHooK hooks on layers {list(existing.layers)}; "
                               f"call coachhook_plugin.remove_coachhook(model) before loading {path}")
    _, snap = read_coachhook(path)
    snap["layers"] = {l: ({n: t.to(get_module(model, saved_modules[l]).weight.device) for n, t in ts.items()}, ex)
                      for l, (ts, ex) in snap["layers"].items()}

    if existing is not None:
        before = (existing.snapshot(), existing.hparams, existing.context_templates, existing.priors,
                  _journal(existing))
    try:
        state = ensure_state(model, hp)
        state.restore(snap)
        state.context_templates = list(header["context_templates"]) if header["context_templates"] is not None \
            else None
        state.priors = {}  # read again from the hparams' statistics files at the next edit
        state.journal = []
    except BaseException:
        if existing is None:
            remove_coachhook(model)
        else:
            snap0, existing.hparams, existing.context_templates, existing.priors, existing.journal = before
            existing.restore(snap0)
        raise
    return state


# --------------------------------------------------------------------------- undo
def _journal(state) -> list:
    journal = getattr(state, "journal", None)
    if journal is None:
        journal = state.journal = []
    return journal


def undo_coachhook(model: torch.nn.Module, k: int = 1) -> int:
    """Undo the last k batches exactly (the state returns bit for bit to what it was before them) and return
    the new step count. At most `undo_depth` (hparams) batches are kept; asking for more raises UndoError and
    changes nothing."""
    state = get_state(model)
    if state is None:
        raise UndoError("this model carries no CoachHooK state: there is nothing to undo")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UndoError(f"k must be a positive integer (batches to undo), got {k!r}")
    journal = _journal(state)
    if k > len(journal):
        depth = getattr(state.hparams, "undo_depth", None)
        raise UndoError(f"cannot undo {k} batch(es): the undo journal holds {len(journal)} (undo_depth={depth}, "
                        f"step {state.step}); nothing was changed. Raise undo_depth in the hparams before editing "
                        f"to keep more, or load an earlier state saved with save_coachhook")
    target = journal[-k]
    with torch.no_grad():
        state.restore(target)
    del journal[-k:]
    return state.step


def state_nbytes(state_or_snapshot) -> int:
    """Bytes of the state tensors of a CoachHooKState (or of one snapshot): the cost of one journal entry."""
    if isinstance(state_or_snapshot, dict):
        return sum(t.numel() * t.element_size() for ts, _ in state_or_snapshot["layers"].values()
                   for t in ts.values())
    return sum(t.numel() * t.element_size() for h in state_or_snapshot.layers.values()
               for t in h.state_tensors().values())


def journal_nbytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's undo journal now (entries × snapshot size)."""
    state = get_state(model)
    return 0 if state is None else sum(state_nbytes(s) for s in _journal(state))


def snapshot_nbytes_for(d_out: int, d_in: int, n_layers: int, num_edits: int) -> int:
    """Bytes of one snapshot (= one undo-journal entry) after `num_edits` edits with `n_layers` hooked
    down-projections d_in → d_out, as the hook layers of this version would store it (their `layout_nbytes`,
    an upper bound: rank ≤ edits); e.g. SmolLM2-135M, layers 3–7: snapshot_nbytes_for(576, 1536, 5, 100)."""
    from .hook import HookLayer

    with torch.device("meta"):
        layer = HookLayer("probe", torch.nn.Linear(d_in, d_out, bias=False), 2.2)
    if hasattr(layer, "layout_nbytes"):
        return n_layers * int(layer.layout_nbytes(num_edits, num_edits))
    return n_layers * sum(t.numel() * t.element_size() for t in layer.state_tensors().values())


__all__ = ["save_coachhook", "load_coachhook", "read_coachhook", "read_header", "undo_coachhook", "fingerprint",
           "hparams_json", "state_nbytes", "journal_nbytes", "snapshot_nbytes_for", "atomic_write",
           "atomic_write_json", "PersistenceError", "UndoError", "FORMAT_VERSION"]
