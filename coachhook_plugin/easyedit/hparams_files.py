"""Hparams yamls that load with either EasyEdit's classes (required fields filled, unknown ones dropped)."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional


from .imports import import_easyeditor

LOG = logging.getLogger(__name__)

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
    ``GraceHyperParams`` in newer EasyEdit: matched without regard to case or '-'; SERAC's is ``SERACHparams``),
    or None."""
    ee = import_easyeditor()
    # SERAC's class is SERACHparams in both EasyEdits (every other method's: <ALG>HyperParams)
    for suffix in ("HyperParams", "Hparams"):
        want = f"{alg_name}{suffix}".replace("-", "").lower()
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
