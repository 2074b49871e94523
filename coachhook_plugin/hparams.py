"""CoachHooKHyperParams: MEMIT's fields plus CoachHooK's, loadable from an EasyEdit-style yaml.

Validation happens twice: on construction (values that make no sense for any model) and in
`validate_for_model` (layers and module templates against the model actually being edited).
Every error names the field and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

ALG_NAME = "CoachHooK"
GATES = ("paper", "calibrated")  # see coachhook_plugin.hook: per-sequence z (Eq. 18) or z against reference statistics
ALPHA_RULES = ("running_min", "recomputed")  # see coachhook_plugin.gate: Eq. 19, or α over all stored edit prompts
FACT_TOKENS = ("subject_last", "last")


class HyperParamsError(ValueError):
    """A hyperparameter is wrong; the message names the field and how to fix it."""


@dataclass
class CoachHooKHyperParams:
    # --- which model and where (EasyEdit's fields) ---
    model_name: Any  # hub id, local path, alias, or an already-loaded (model, tok) pair
    layers: List[int]
    rewrite_module_tmp: str  # the FFN down-projection, e.g. "transformer.h.{}.mlp.c_proj"
    layer_module_tmp: str  # the transformer block, e.g. "transformer.h.{}"
    mlp_module_tmp: str = ""
    attn_module_tmp: str = ""
    ln_f_module: str = ""
    lm_head_module: str = ""
    alg_name: str = ALG_NAME
    device: Union[int, str] = 0
    model_parallel: bool = False
    fp16: bool = False
    max_length: int = 40
    batch_size: int = 10
    layer_selection: str = "all"

    # --- values v_i (MEMIT's compute_z) ---
    fact_token: str = "subject_last"  # keys and values at the subject's last token; "last": the prompt's (MEMIT)
    v_num_grad_steps: int = 20
    v_lr: float = 5e-1
    v_loss_layer: int = -1  # -1: the last layer (MEMIT always ties the loss to the last layer)
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    v_loss_stop: float = 5e-2  # MEMIT stops optimising a value once its loss is below this
    v_batched: bool = True  # optimise a batch's values together (false: one request at a time; same values, slower)

    # --- λ·E[kkᵀ] (covariance statistics, EasyEdit's file scheme) ---
    mom2_adjustment: bool = True
    mom2_update_weight: float = 15000.0  # λ (15000 consecutive, 5000 single-round in the paper)
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    stats_dir: str = "./data/stats"

    # --- CoachHooK ---
    alpha_z: float = 2.2
    consecutive: bool = True
    # "calibrated" (default, chosen from SmolLM2 measurements, README "The gate"): z against M's mean/std on
    # unedited calibration prompts, per token (works with a KV cache, any length, any padding); "paper": z over
    # the tokens of each forward call (Eq. 18)
    gate: str = "calibrated"
    gate_calibration_prompts: Optional[List[str]] = None  # None: gate.DEFAULT_CALIBRATION_PROMPTS (32 sentences)
    gate_ignore_padding: bool = True  # exclude pad tokens from the gate's statistics (the reference does not)
    # How α moves between batches (docs/method.md "The scope at scale"): "running_min" is Eq. 19 (α only falls,
    # so the scope only widens); "recomputed" (beyond the paper) sets α after every batch to the min over the
    # edit prompts of all batches so far of their max z under the current Δ, minus alpha_margin (it can rise)
    alpha_rule: str = "running_min"
    alpha_margin: float = 0.0  # recomputed only: fire this many z-units below the weakest stored edit prompt
    alpha_prompts_max: Optional[int] = 256  # recomputed only: prompts per α pass (newest half + seeded sample); null: all
    # Beyond the paper (docs/method.md "The key scope"): a token the gate swaps must also have a key with at least
    # this cosine to one of the layer's edited keys; null: the gate alone decides (the paper's scope)
    key_scope_cosine: Optional[float] = None
    context_templates: Optional[List[str]] = None  # None: MEMIT's generated templates ("{}" + 5 × 10 tokens)
    context_template_seed: int = 0
    verbose: bool = False
    undo_depth: int = 1  # batches undo_coachhook can take back; each costs one full copy of the hook state

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_hparams(cls, hparams_name_or_path: Union[str, Path]) -> "CoachHooKHyperParams":
        path = Path(hparams_name_or_path)
        if path.suffix not in (".yaml", ".yml"):
            path = path.with_name(path.name + ".yaml")
        if not path.exists():
            raise FileNotFoundError(f"hparams file {path} not found; pass the path of a yaml such as "
                                    f"hparams/CoachHooK/gpt2-xl.yaml")
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        return cls.from_dict(config, source=str(path))

    @classmethod
    def from_dict(cls, config: Dict[str, Any], source: str = "hparams") -> "CoachHooKHyperParams":
        config = dict(config)
        name = config.get("alg_name", ALG_NAME)
        if name != ALG_NAME:
            raise HyperParamsError(f"{source}: alg_name is {name!r}, but CoachHooKHyperParams needs "
                                   f"alg_name: {ALG_NAME} (load this file with {name}'s own HyperParams class)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in config if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, sorted(known), n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise HyperParamsError(f"{source}: unknown field(s) {', '.join(hints)}; remove them or fix the "
                                   f"spelling. Known fields: {', '.join(sorted(known))}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in config]
        if missing:
            raise HyperParamsError(f"{source}: missing required field(s) {', '.join(missing)}")
        for k, v in list(config.items()):  # EasyEdit's yaml convention: "5e-1" strings are floats
            if isinstance(v, str):
                try:
                    config[k] = float(v) if k not in ("model_name", "device") else v
                except ValueError:
                    pass
        return cls(**config)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if not isinstance(d["model_name"], (str, type(None))):
            d["model_name"] = repr(type(self.model_name))
        return d

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(field_name, msg):
            raise HyperParamsError(f"hparams field {field_name!r}: {msg}")

        if self.alg_name != ALG_NAME:
            fail("alg_name", f"is {self.alg_name!r}; set it to {ALG_NAME!r}")
        if not isinstance(self.layers, (list, tuple)) or not self.layers:
            fail("layers", "must be a non-empty list of layer indices, e.g. [13, 14, 15, 16, 17]")
        if any(not isinstance(l, int) or isinstance(l, bool) for l in self.layers):
            fail("layers", f"must contain integers, got {self.layers!r}")
        if len(set(self.layers)) != len(self.layers):
            fail("layers", f"contains duplicates: {self.layers!r}")
        self.layers = sorted(self.layers)
        for name in ("rewrite_module_tmp", "layer_module_tmp"):
            tmp = getattr(self, name)
            if not isinstance(tmp, str) or tmp.count("{}") != 1:
                fail(name, f"must be a module name with one '{{}}' for the layer index, got {tmp!r}")
        for name in ("mom2_update_weight", "alpha_z"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                fail(name, f"must be a number, got {v!r} ({type(v).__name__})")
        if not self.mom2_update_weight > 0:
            fail("mom2_update_weight", f"λ must be > 0 (paper: 15000 consecutive, 5000 single-round), "
                                       f"got {self.mom2_update_weight}")
        if not self.alpha_z > 0:
            fail("alpha_z", f"α_z must be > 0 (paper: 2.2), got {self.alpha_z}")
        if self.gate not in GATES:
            fail("gate", f"must be one of {GATES} ('paper': z over each sequence's own tokens, Eq. 18; "
                         f"'calibrated': z against statistics of unedited text, works in cached generation), "
                         f"got {self.gate!r}")
        if self.alpha_rule not in ALPHA_RULES:
            fail("alpha_rule", f"must be one of {ALPHA_RULES} ('running_min': Eq. 19, α only falls; 'recomputed': "
                               f"α over every edit prompt so far with the current Δ, can rise), got {self.alpha_rule!r}")
        if isinstance(self.alpha_margin, bool) or not isinstance(self.alpha_margin, numbers.Real) \
                or not (math.isfinite(self.alpha_margin) and self.alpha_margin >= 0):
            fail("alpha_margin", f"must be a finite number >= 0 (z-units below the weakest edit prompt; 0: exactly "
                                 f"at it), got {self.alpha_margin!r}")
        if self.alpha_margin and self.alpha_rule != "recomputed":
            fail("alpha_margin", f"is {self.alpha_margin}, but it only applies with alpha_rule: recomputed; set "
                                 f"alpha_rule: recomputed, or alpha_margin: 0 to keep Eq. 19 as published")
        if isinstance(self.alpha_prompts_max, float) and self.alpha_prompts_max.is_integer():
            self.alpha_prompts_max = int(self.alpha_prompts_max)  # "256" in a yaml arrives as 256.0 (from_dict)
        if self.alpha_prompts_max is not None and (isinstance(self.alpha_prompts_max, bool)
                                                   or not isinstance(self.alpha_prompts_max, int)
                                                   or self.alpha_prompts_max < 1):
            fail("alpha_prompts_max", f"must be an integer >= 1 (edit prompts in each α pass of alpha_rule: "
                                      f"recomputed), or null for all of them, got {self.alpha_prompts_max!r}")
        if self.key_scope_cosine is not None and (isinstance(self.key_scope_cosine, bool)
                                                  or not isinstance(self.key_scope_cosine, numbers.Real)
                                                  or not -1.0 < self.key_scope_cosine <= 1.0):
            fail("key_scope_cosine", f"must be a cosine in (-1, 1] (e.g. 0.4: a swapped token's key must be at least "
                                     f"that close to an edited key), or null for the gate alone, got "
                                     f"{self.key_scope_cosine!r}")
        if self.alpha_rule == "recomputed" and not self.gate_ignore_padding:
            fail("alpha_rule", "'recomputed' runs the stored edit prompts in one padded batch and needs "
                               "gate_ignore_padding: true; set gate_ignore_padding: true, or alpha_rule: running_min")
        if self.gate_calibration_prompts is not None:
            p = self.gate_calibration_prompts
            if (not isinstance(p, (list, tuple)) or len(p) < 2
                    or any(not isinstance(t, str) or not t.strip() for t in p)):
                fail("gate_calibration_prompts", "must be a list of at least two non-empty strings of unedited "
                                                 "text (the calibrated gate's reference), or null for the "
                                                 "built-in prompts")
        if self.fact_token not in FACT_TOKENS:
            fail("fact_token", f"must be one of {FACT_TOKENS}, got {self.fact_token!r}")
        if int(self.v_num_grad_steps) < 1:
            fail("v_num_grad_steps", "must be >= 1")
        if int(self.batch_size) < 1:
            fail("batch_size", "must be >= 1")
        if isinstance(self.undo_depth, float) and self.undo_depth.is_integer():
            self.undo_depth = int(self.undo_depth)  # "2" in a yaml arrives as 2.0 (see from_dict)
        if isinstance(self.undo_depth, bool) or not isinstance(self.undo_depth, int) or self.undo_depth < 0:
            fail("undo_depth", f"must be an integer >= 0 (batches that can be undone; 0 keeps no journal), "
                               f"got {self.undo_depth!r}")
        if self.context_templates is not None:
            if not self.context_templates or any(not isinstance(t, str) or t.count("{}") != 1
                                                 for t in self.context_templates):
                fail("context_templates", "must be a list of strings each with exactly one '{}', or null "
                                          "for MEMIT's generated templates")
        self.v_num_grad_steps = int(self.v_num_grad_steps)
        self.batch_size = int(self.batch_size)
        self.mom2_n_samples = int(self.mom2_n_samples)

    def validate_for_model(self, model) -> None:
        """Check layers and module templates against the model that is about to be edited."""
        from .models import num_layers

        n = num_layers(model)
        bad = [l for l in self.layers if not 0 <= l < n]
        if bad:
            raise HyperParamsError(f"hparams field 'layers': {bad} out of range for a model with {n} layers "
                                   f"(valid: 0..{n - 1})")
        names = dict(model.named_modules())
        for field_name in ("rewrite_module_tmp", "layer_module_tmp"):
            tmp = getattr(self, field_name)
            for l in self.layers:
                if tmp.format(l) not in names:
                    close = difflib.get_close_matches(tmp.format(l), list(names), n=1)
                    raise HyperParamsError(
                        f"hparams field {field_name!r}: module {tmp.format(l)!r} not found in the model"
                        + (f" (closest: {close[0]!r})" if close else "")
                        + "; use the model's layout, e.g. GPT-2 'transformer.h.{}.mlp.c_proj', GPT-J "
                          "'transformer.h.{}.mlp.fc_out', Llama 'model.layers.{}.mlp.down_proj'")
        if self.v_loss_layer not in (-1, n - 1):
            raise HyperParamsError(f"hparams field 'v_loss_layer': only the last layer ({n - 1}, or -1) is "
                                   f"supported, as in MEMIT's configurations; got {self.v_loss_layer}")
