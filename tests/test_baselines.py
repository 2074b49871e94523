"""The plugin's baselines (FT-M, GRACE, AlphaEdit, CoachHooK w/o HK) on a tiny trained GPT-2, through
EasyEdit's BaseEditor where it matters, and every shipped baseline hparams file."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import easyedit_helpers as H  # noqa: E402
from test_bench import tiny_method_hparams  # noqa: E402

from coachhook_plugin.easyedit import compat  # noqa: E402

pytestmark = pytest.mark.easyedit  # also run against GitHub EasyEdit by `make test-github`

REPO = Path(__file__).resolve().parents[1]
EDIT = dict(prompt="The capital of France", subject="France", target_new="Rome", ground_truth="Paris")
OTHER = "The capital of Japan"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with H.single_thread():
        yield


def _hparams(cls, name, tmp_path, **over):
    fields = dict(tiny_method_hparams(tmp_path / "stats")[name], **over)
    return cls.from_hparams(H.write_yaml(tmp_path, name, fields))


def _next_token_logits(model, tok, prompt):
    with torch.no_grad():
        return model(**tok(prompt, return_tensors="pt")).logits[0, -1]


def test_ft_m_edits_through_base_editor_and_restores(tmp_path, ee):
    from coachhook_plugin.bench.methods import register_bench_methods
    from coachhook_plugin.bench.baselines.ft_m import FTMHyperParams
    from coachhook_plugin.easyedit import make_editor

    assert register_bench_methods()
    model, tok = H.tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = make_editor(_hparams(FTMHyperParams, "FT-M", tmp_path), model=model, tok=tok)
    metrics, edited, _ = editor.edit(prompts=[EDIT["prompt"]], target_new=[EDIT["target_new"]],
                                     ground_truth=[EDIT["ground_truth"]], verbose=False,
                                     **compat.single_round_edit_kwargs("edit"))
    assert metrics[0]["post"]["rewrite_acc"] == [1.0] and metrics[0]["pre"]["rewrite_acc"] == [0.0]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # single edit rolled back
    hp = editor.hparams
    from coachhook_plugin.bench.baselines.ft_m import apply_ft_m_to_model

    apply_ft_m_to_model(model, tok, [EDIT], hp)
    assert H.predict_next(model, tok, EDIT["prompt"]) == " Rome"
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("transformer.h.2.mlp.c_proj") for k in changed)
    delta = max(float((model.state_dict()[k] - before[k]).abs().max()) for k in changed)
    assert delta <= hp.norm_constraint + 1e-6  # EasyEdit's L∞ norm constraint


def test_ft_m_norm_constraint_false_means_unconstrained(tmp_path):
    """EasyEdit's Llama FT yaml writes ``norm_constraint: false``; FT-M must read it as "no clamp", not a clamp
    of 0 (which would leave the weights untouched)."""
    from coachhook_plugin.bench.baselines.ft_m import FTMHyperParams, apply_ft_m_to_model

    hp = _hparams(FTMHyperParams, "FT-M", tmp_path, norm_constraint=False)
    assert hp.norm_constraint is None
    model, tok = H.tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_ft_m_to_model(model, tok, [EDIT], hp)
    delta = max(float((v - before[k]).abs().max()) for k, v in model.state_dict().items())
    assert delta > 5e-2  # beyond the tiny config's clamp: nothing held the update back


def test_grace_codebook_edits_defers_and_splits(tmp_path):
    from coachhook_plugin.bench.baselines import grace

    model, tok = H.tiny_model()
    hp = _hparams(grace.GRACEHyperParams, "GRACE", tmp_path)
    other_before = _next_token_logits(model, tok, OTHER)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _, handle = grace.apply_grace_to_model(model, tok, [EDIT], hp)
    book = grace.get_codebook(model)
    assert len(book) == 1 and book.last_actions == ["add"]
    assert H.predict_next(model, tok, EDIT["prompt"]) == " Rome"
    assert torch.allclose(_next_token_logits(model, tok, OTHER), other_before)  # outside the ball: untouched
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # weights never change
    # the same prompt with another answer replaces the entry; the same answer again expands (nothing new)
    grace.apply_grace_to_model(model, tok, [dict(EDIT, target_new="Tokyo")], hp)
    assert book.last_actions == ["replace"] and len(book) == 1
    assert H.predict_next(model, tok, EDIT["prompt"]) == " Tokyo"
    grace.apply_grace_to_model(model, tok, [dict(EDIT, target_new="Tokyo")], hp)
    assert book.last_actions == ["expand"] and len(book) == 1
    # a near key with another answer (a huge ε makes them overlap) splits the ball: each keeps its answer
    wide = _hparams(grace.GRACEHyperParams, "GRACE", tmp_path, eps=1e4)
    italy = dict(prompt="The capital of Italy", subject="Italy", target_new="Berlin", ground_truth="Rome")
    grace.apply_grace_to_model(model, tok, [italy], wide)
    assert book.last_actions == ["split"] and len(book) == 2 and book.radii[0] == book.radii[1]
    assert H.predict_next(model, tok, italy["prompt"]) == " Berlin"
    assert H.predict_next(model, tok, EDIT["prompt"]) == " Tokyo"
    # single-round: starts empty, the handle empties the codebook again
    _, handle = grace.apply_grace_to_model(model, tok, [EDIT], hp, keep_original_weight=True)
    assert len(book) == 1 and book.labels == ["Rome"]
    handle()  # what EasyEdit's single-round roll-back calls (through the registry's RestoreHandle)
    assert len(book) == 0
    grace.remove_grace(model)
    assert H.predict_next(model, tok, EDIT["prompt"]) == " Paris"


def test_alphaedit_projection_keeps_preserved_keys():
    from coachhook_plugin.bench.baselines.alphaedit import null_space_projection, projected_update

    torch.manual_seed(0)
    d_in, d_out, n = 12, 5, 3
    basis = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64))[0]
    eig = torch.tensor([5.0] * 7 + [1e-4] * 5, dtype=torch.float64)  # 7 preserved directions, 5 free
    cov = basis @ torch.diag(eig) @ basis.t()
    P = null_space_projection(cov, threshold=1e-2)
    assert torch.allclose(P @ P, P, atol=1e-10) and round(float(torch.trace(P))) == 5
    keys, resid = torch.randn(d_in, n, dtype=torch.float64), torch.randn(d_out, n, dtype=torch.float64)
    delta = projected_update(resid, keys, torch.zeros(d_in, d_in, dtype=torch.float64), P, l2=1e-3)
    preserved = basis[:, :7]
    assert float((delta @ preserved).abs().max()) < 1e-8 * float(delta.abs().max())
    assert float(delta.abs().max()) > 1e-3  # and it does update
    with pytest.raises(ValueError, match="nullspace_threshold"):
        null_space_projection(cov, threshold=1e-6)


def test_alphaedit_edits_and_leaves_preserved_outputs(tmp_path, ee, monkeypatch):
    from coachhook_plugin.bench.methods import register_bench_methods
    from coachhook_plugin.bench.baselines import alphaedit
    from coachhook_plugin.easyedit import editing_context

    assert register_bench_methods()
    from easyeditor.models.rome import layer_stats

    monkeypatch.setattr(layer_stats, "load_dataset", lambda *a, **k: pytest.fail("tried to download"))
    model, tok = H.tiny_model()
    model.config._name_or_path = "tiny-alphaedit"  # its own statistics cache entry
    stats_dir = tmp_path / "stats"
    H.write_mom2_stats(model, tok, stats_dir, [1, 2], H.GPT2_LAYOUT["rewrite_module_tmp"],
                       mom2_dataset="tiny-wikitext", mom2_n_samples=60)
    # free directions: the eigenvalues below the median (a tiny corpus has no true null space)
    cov = _mean_cov(stats_dir, 2)
    threshold = float(torch.linalg.eigvalsh(cov).median())
    # a small ridge term: the edit must succeed on the tiny model whichever transformers trained it (its weights
    # differ between the PyPI and the GitHub EasyEdit environments)
    hp = _hparams(alphaedit.AlphaEditHyperParams, "AlphaEdit", tmp_path, nullspace_threshold=threshold, L2=1e-4)
    w_before = model.get_submodule("transformer.h.2.mlp.c_proj").weight.detach().clone()
    tok.padding_side = "right"
    with editing_context():
        _, handle = alphaedit.apply_alphaedit_to_model(model, tok, [EDIT], hp)
    assert H.predict_next(model, tok, EDIT["prompt"]) == " Rome"
    state = alphaedit.get_state(model)
    assert state.step == 1 and set(state.key_grams) == {1, 2}
    # preserved keys (eigenvectors of E[kkᵀ] above the threshold) map exactly as before
    eigvals, eigvecs = torch.linalg.eigh(cov.double())
    # (well above the threshold: EasyEdit's get_cov hands over a float32 matrix, which blurs the boundary)
    preserved = eigvecs[:, eigvals >= 3 * threshold].float()
    assert preserved.shape[1] >= 10
    w_after = model.get_submodule("transformer.h.2.mlp.c_proj").weight.detach()  # Conv1D: (in, out)
    moved = (preserved.t() @ (w_after - w_before)).abs().max()
    assert float(moved) < 1e-3 * float((w_after - w_before).abs().max())  # float32 statistics: not 1e-8
    handle()  # roll back: weights and key Gram matrices
    assert torch.equal(model.get_submodule("transformer.h.2.mlp.c_proj").weight, w_before)


def _mean_cov(stats_dir, layer):
    import numpy as np

    f = next(Path(stats_dir).rglob(f"transformer.h.{layer}.mlp.c_proj_*.npz"))
    d = np.load(f)
    return torch.tensor(d["mom2.mom2"]).double() / float(d["mom2.count"])


def test_coachhook_without_hooks_writes_the_update_into_the_weights(tmp_path):
    from coachhook_plugin import get_state
    from coachhook_plugin.bench.baselines import coachhook_no_hooks as nohk
    from conftest import tiny_hparams

    model, tok = H.tiny_model()
    hp = nohk.as_no_hooks(tiny_hparams("gpt2", alpha_z=1.0, mom2_update_weight=1e-2, batch_size=1))
    assert hp.alg_name == "CoachHooK-noHK"
    w_before = model.get_submodule("transformer.h.2.mlp.c_proj").weight.detach().clone()
    _, handle = nohk.apply_coachhook_no_hooks_to_model(model, tok, [EDIT], hp, keep_original_weight=True)
    state = get_state(model)
    assert all(float(h.delta.abs().max()) == 0.0 for h in state.layers.values())  # no hook update left ...
    assert all(h.num_keys == 1 and float(h.key_gram.abs().max()) > 0 for h in state.layers.values())  # ... Σkkᵀ kept
    assert not torch.equal(model.get_submodule("transformer.h.2.mlp.c_proj").weight, w_before)
    assert H.predict_next(model, tok, EDIT["prompt"]) == " Rome"
    handle()  # single-round roll-back (what the registry's RestoreHandle calls): weights and hook state
    assert torch.equal(model.get_submodule("transformer.h.2.mlp.c_proj").weight, w_before)
    assert get_state(model) is None  # there was no hook state before this batch


BASELINE_FOLDERS = ("ROME", "FT", "FT-M", "LoRA", "GRACE", "AlphaEdit", "MEMIT")


@pytest.mark.parametrize("path", sorted(p for f in BASELINE_FOLDERS for p in (REPO / "hparams" / f).glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_hparams_load(path, ee):
    """Every shipped baseline yaml loads the way `coachhook bench` loads it, with either EasyEdit's classes."""
    from coachhook_plugin.bench.methods import register_bench_methods
    from coachhook_plugin.bench.methods import load_hparams

    assert register_bench_methods()
    config = yaml.safe_load(path.read_text())
    hp = load_hparams(config["alg_name"], path, {})
    assert hp.alg_name == config["alg_name"]
    # the edited layers survive, whatever the class calls them (GitHub's GRACE: inner_params)
    edited = hp.layers if hasattr(hp, "layers") else hp.inner_params
    assert edited == [] == config["layers"] or edited and all(str(l) in str(edited) for l in config["layers"])


@pytest.mark.parametrize("alg", ["AlphaEdit", "GRACE", "FT-M"])
def test_shipped_smollm2_yaml_loads_numbers_as_numbers_in_the_bench(alg, ee):
    """YAML reads 1e-3 as a string; the bench's loader must turn it into a float, as EasyEdit's loader does (the
    SmolLM2 AlphaEdit file has v_weight_decay: 1e-3, and a string there fails every edit)."""
    import dataclasses
    from pathlib import Path

    from coachhook_plugin.bench.methods import load_hparams, register_bench_methods

    register_bench_methods()
    repo = Path(__file__).resolve().parents[1]
    hp = load_hparams(alg, repo / "hparams" / alg / "smollm2-135m.yaml", {})
    for f in dataclasses.fields(hp):
        value = getattr(hp, f.name)
        if f.type in (float, "float"):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (f.name, value)
