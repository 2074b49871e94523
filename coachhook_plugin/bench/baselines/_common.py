"""What the plugin's baselines share: loading EasyEdit-style yaml hparams, weight access (their restore functions
are plain callables; the registry's RestoreHandle serves them to either EasyEdit)."""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterable, List, Sequence, Tuple, Type, TypeVar, Union

import torch
import yaml

T = TypeVar("T")


def load_hparams(cls: Type[T], path: Union[str, Path], alg_name: str) -> T:
    """Read an EasyEdit-style yaml into the dataclass ``cls`` (``5e-4`` strings become floats, as EasyEdit's
    ``construct_float_from_scientific_notation`` does); unknown fields are an error naming the closest one."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_name(path.name + ".yaml")
    if not path.exists():
        raise FileNotFoundError(f"hparams file {path} not found; pass the path of a yaml such as "
                                f"hparams/{alg_name}/smollm2-135m.yaml")
    config = yaml.safe_load(path.read_text()) or {}
    return from_dict(cls, config, alg_name, source=str(path))


def from_dict(cls: Type[T], config: Dict[str, Any], alg_name: str, source: str = "hparams") -> T:
    config = dict(config)
    if config.get("alg_name", alg_name) != alg_name:
        raise ValueError(f"{source}: alg_name is {config['alg_name']!r}; {cls.__name__} loads alg_name: {alg_name}")
    config["alg_name"] = alg_name
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in config if k not in known]
    if unknown:
        hints = [k + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, sorted(known), n=1)) else "")
                 for k in unknown]
        raise ValueError(f"{source}: unknown field(s) {', '.join(hints)} for {cls.__name__}; remove or fix them")
    for k, v in list(config.items()):
        if isinstance(v, str) and k not in ("model_name", "device", "alg_name"):
            try:
                config[k] = float(v)
            except ValueError:
                pass
    return cls(**config)


@dataclasses.dataclass(kw_only=True)
class BaselineHyperParams:
    """The fields EasyEdit's editor reads from every hparams object, and loading from a yaml or a dict. A
    subclass names its method in ``ALG_NAME``; its own fields come first in its constructor, these after."""
    ALG_NAME: ClassVar[str] = ""
    alg_name: str = ""
    model_name: Any = None
    device: Any = 0
    batch_size: int = 1
    max_length: int = 40
    model_parallel: bool = False
    fp16: bool = False

    def __post_init__(self):
        self.alg_name = self.alg_name or self.ALG_NAME

    @classmethod
    def from_hparams(cls, path):
        return load_hparams(cls, path, cls.ALG_NAME)

    @classmethod
    def from_dict(cls, config, source: str = "hparams"):
        """From a yaml's fields (the bench's loader): "1e-3" strings become floats, unknown fields are an error."""
        return from_dict(cls, config, cls.ALG_NAME, source=source)


def module_parameters(model: torch.nn.Module, module_tmp: str, layers: Iterable[int]) -> Dict[str, torch.nn.Parameter]:
    """Parameters (weight and bias) of ``module_tmp`` at ``layers``, by their full names in ``model``."""
    out = {}
    for layer in layers:
        name = module_tmp.format(layer)
        module = model.get_submodule(name)
        for pname, p in module.named_parameters(recurse=False):
            out[f"{name}.{pname}"] = p
    if not out:
        raise ValueError(f"no parameters found for {module_tmp!r} at layers {list(layers)}; check rewrite_module_tmp")
    return out


def clone_parameters(params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def put_back(model: torch.nn.Module, saved: Dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def target_batch(tok, prompts: Sequence[str], targets: Sequence[str], device) -> Tuple[torch.Tensor, ...]:
    """Right-padded ``prompt + " target"`` ids, attention mask and labels that score only the target tokens
    (teacher forcing). The target is tokenised on its own, so padding never shifts the prompt/target split."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows: List[Tuple[List[int], List[int]]] = []
    for p, t in zip(prompts, targets):
        p_ids = list(tok(p)["input_ids"])
        t_ids = list(tok(t if t.startswith(" ") else " " + t, add_special_tokens=False)["input_ids"])
        rows.append((p_ids, t_ids))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(t)
    return ids.to(device), mask.to(device), labels.to(device)


def target_nll(model, ids, mask, labels) -> torch.Tensor:
    """Mean negative log-likelihood of the labelled (target) tokens, predicted from the previous position."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    gold = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), gold.reshape(-1),
                                             ignore_index=-100)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
