"""Hyperparameter loading/validation and EasyEdit-format covariance statistics."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from coachhook_plugin import CoachHooKHyperParams, HyperParamsError, StatsError, apply_coachhook_to_model, get_state
from coachhook_plugin.stats import (compute_second_moments, ensure_stats, load_second_moment, path_for,
                                    save_second_moment, second_moment_path)
from conftest import FACTS, build_tiny, tiny_hparams

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "hparams" / "CoachHooK").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_hparams_load(path):
    hp = CoachHooKHyperParams.from_hparams(path)
    assert hp.alg_name == "CoachHooK" and hp.alpha_z == 2.2
    # the paper's λ for the paper's models; SmolLM2's is measured (README)
    assert hp.mom2_update_weight == (1500 if path.stem == "smollm2-135m" else 15000)
    assert isinstance(hp.v_lr, float)  # "5e-1" in yaml is a float, as EasyEdit reads it


def test_shipped_layouts_match_paper_layers():
    gpt2 = CoachHooKHyperParams.from_hparams(REPO / "hparams/CoachHooK/gpt2-xl.yaml")
    gptj = CoachHooKHyperParams.from_hparams(REPO / "hparams/CoachHooK/gpt-j-6B.yaml")
    llama = CoachHooKHyperParams.from_hparams(REPO / "hparams/CoachHooK/llama3-8b.yaml")
    assert gpt2.layers == [13, 14, 15, 16, 17] and gpt2.rewrite_module_tmp == "transformer.h.{}.mlp.c_proj"
    assert gptj.layers == [3, 4, 5, 6, 7, 8] and gptj.rewrite_module_tmp == "transformer.h.{}.mlp.fc_out"
    assert llama.layers == [4, 5, 6, 7, 8] and llama.rewrite_module_tmp == "model.layers.{}.mlp.down_proj"


def _write(tmp_path, **changes):
    data = yaml.safe_load((REPO / "hparams/CoachHooK/gpt2-xl.yaml").read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    p = tmp_path / "hp.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("changes,message", [
    (dict(alg_name="MEMIT"), "alg_name is 'MEMIT'"),
    (dict(mom2_update_wieght=3), "did you mean 'mom2_update_weight'"),
    (dict(mom2_update_weight=0), "λ must be > 0"),
    (dict(mom2_update_weight=-5), "λ must be > 0"),
    (dict(alpha_z=0), "α_z must be > 0"),
    (dict(layers=[]), "non-empty list"),
    (dict(layers=[3, 3]), "duplicates"),
    (dict(rewrite_module_tmp="transformer.h.mlp"), "one '{}'"),
    (dict(gate="magic"), "'gate'"),
    (dict(layers=None), "missing required field"),
])
def test_bad_hparams_name_field_and_fix(tmp_path, changes, message):
    with pytest.raises(HyperParamsError, match=message):
        CoachHooKHyperParams.from_hparams(_write(tmp_path, **changes))


def test_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="hparams file"):
        CoachHooKHyperParams.from_hparams(tmp_path / "nope.yaml")


def test_stats_path_is_easyedit_scheme():
    p = second_moment_path("st", "gpt2-xl", "wikipedia", "transformer.h.13.mlp.c_proj", "float32", 100000)
    assert p == Path("st/gpt2-xl/wikipedia_stats/transformer.h.13.mlp.c_proj_float32_mom2_100000.npz")


def test_stats_roundtrip_and_format(tmp_path):
    x = torch.randn(50, 6, dtype=torch.float64)
    path = tmp_path / "a" / "s.npz"
    save_second_moment(path, x.t() @ x, 50, 1000)
    with np.load(path) as d:  # the keys EasyEdit's tally/load_cached_state read
        assert {"mom2.mom2", "mom2.count", "mom2.constructor", "sample_size"} <= set(d.files)
        assert int(d["sample_size"]) == 1000
    assert torch.allclose(load_second_moment(path, 6), x.t() @ x / 50)
    with pytest.raises(StatsError, match="belongs to another model or layer"):
        load_second_moment(path, 7)
    with pytest.raises(StatsError, match="coachhook stats"):
        load_second_moment(tmp_path / "missing.npz", 6)


def test_second_moments_exclude_padding(gpt2_tok):
    model = build_tiny("gpt2")
    name = "transformer.h.1.mlp.c_proj"
    texts = ["A short one.", "A rather longer sentence with quite a few more tokens in it."]
    both = compute_second_moments(model, gpt2_tok, texts, [name], batch_size=2, progress=False)[name]
    one = [compute_second_moments(model, gpt2_tok, [t], [name], batch_size=1, progress=False)[name] for t in texts]
    assert both[1] == one[0][1] + one[1][1]  # token counts: pads not counted
    assert torch.allclose(both[0], one[0][0] + one[1][0], rtol=1e-4, atol=1e-6)


def test_edit_reads_statistics_and_fails_cleanly_without(tmp_path, gpt2_tok):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_adjustment=True, stats_dir=str(tmp_path), mom2_dataset="tiny",
                      mom2_n_samples=7, mom2_update_weight=10.0)
    with pytest.raises(StatsError, match="covariance statistics not found"):
        apply_coachhook_to_model(model, gpt2_tok, FACTS[:1], hp, progress=None)
    assert get_state(model) is None
    paths = ensure_stats(model, gpt2_tok, hp, ["Some text about cities and rivers.", "Another line of text."],
                         progress=False)
    assert all(p.exists() for p in paths) and paths[0] == path_for(model, hp, "transformer.h.1.mlp.c_proj")
    mtime = paths[0].stat().st_mtime_ns
    ensure_stats(model, gpt2_tok, hp, ["different text"], progress=False)  # exists: skipped
    assert paths[0].stat().st_mtime_ns == mtime
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:1], hp, progress=None)
    state = get_state(model)
    prior = load_second_moment(paths[0], state.layers[1].d_in)
    assert torch.equal(state.priors[1], prior)
