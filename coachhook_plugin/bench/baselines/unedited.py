"""The reference row: the base model, never edited. Its scores are what every editor starts from (for example
MEND's and SERAC's reliability must be judged against the base model's on the same records).

It goes through the same dispatch, protocols and evaluator as every method, so its row is scored exactly like
theirs; ``apply`` changes nothing and returns a restore callable that has nothing to restore.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch

from ._common import from_dict, load_hparams

ALG_NAME = "Unedited"


@dataclass
class UneditedHyperParams:
    alg_name: str = ALG_NAME
    model_name: Any = None
    device: Any = 0
    batch_size: int = 1
    max_length: int = 40
    model_parallel: bool = False
    fp16: bool = False

    @classmethod
    def from_hparams(cls, path) -> "UneditedHyperParams":
        return load_hparams(cls, path, ALG_NAME)

    @classmethod
    def from_dict(cls, config, source: str = "hparams") -> "UneditedHyperParams":
        return from_dict(cls, config, ALG_NAME, source=source)


def _nothing_to_restore() -> None:
    return None


def apply_unedited_to_model(model, tok, requests: List[Dict], hparams: UneditedHyperParams, copy: bool = False,
                            return_orig_weights: bool = False, keep_original_weight: bool = False,
                            **kwargs) -> Tuple[torch.nn.Module, Callable[[], None]]:
    """EasyEdit's apply contract, writing nothing: the model comes back as it went in."""
    return model, _nothing_to_restore
