"""Save / load / undo / detach of the CoachHooK state on tiny random models (CPU, seconds)."""
import json
import os

import pytest
import torch

import coachhook_plugin
from coachhook_plugin import (PersistenceError, UndoError, apply_coachhook_to_model, get_state, load_coachhook,
                              remove_coachhook, save_coachhook, undo_coachhook)
from coachhook_plugin.hook import HookLayer
from coachhook_plugin.persistence import (FORMAT_VERSION, META_KEY, atomic_write_json, fingerprint, journal_nbytes,
                                          read_coachhook, read_header, snapshot_nbytes_for, state_nbytes)
from conftest import FACTS, build_tiny, same_state, tiny_hparams

NOPROG = dict(progress=None)
TEXTS = ["The capital of Zorbia is a city", "Alice Moreau works as a pilot in Peru and Zorbia"]


def _logits(model, tok):
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def _edited(arch, tok, batches=2, **over):
    model = build_tiny(arch)
    hp = tiny_hparams(arch, mom2_update_weight=1e-2, **over)
    for b in range(batches):
        apply_coachhook_to_model(model, tok, FACTS[2 * b % 4:2 * b % 4 + 2], hp, **NOPROG)
    return model, hp


def _no_hooks(model):
    return get_state(model) is None and not model._forward_pre_hooks and not model._forward_hooks and \
        all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_load_onto_fresh_copy_is_bit_identical(arch, gpt2_tok, tmp_path):
    model, hp = _edited(arch, gpt2_tok)
    path = save_coachhook(model, tmp_path / "s.safetensors")
    fresh = build_tiny(arch)  # same seed: the same base model, a separate object
    base = _logits(fresh, gpt2_tok)
    state = load_coachhook(fresh, path)
    assert same_state(state.snapshot(), get_state(model).snapshot())
    assert state.step == 2 and state.context_templates == get_state(model).context_templates
    assert state.hparams.to_dict() == hp.to_dict()
    out = _logits(fresh, gpt2_tok)
    assert torch.equal(out, _logits(model, gpt2_tok))
    assert not torch.equal(out, base)  # the hooks do act on these texts
    # the file is safetensors + a JSON header, no pickle anywhere
    header = read_header(path)
    assert header["format_version"] == FORMAT_VERSION and header["step"] == 2
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = json.loads(f.read(n))
    assert json.loads(raw["__metadata__"][META_KEY])["layers"].keys() == {"1", "2"}


def test_loaded_state_continues_editing_exactly_like_the_original(gpt2_tok, tmp_path):
    """Generated context templates and every state tensor survive: one more batch gives the same state."""
    model, hp = _edited("gpt2", gpt2_tok, batches=1, context_templates=None)
    assert len(get_state(model).context_templates) == 6  # MEMIT's generated templates
    save_coachhook(model, tmp_path / "s.safetensors")
    twin = build_tiny("gpt2")
    load_coachhook(twin, tmp_path / "s.safetensors")
    for m in (model, twin):
        apply_coachhook_to_model(m, gpt2_tok, FACTS[2:], hp, **NOPROG)
    assert same_state(get_state(model).snapshot(), get_state(twin).snapshot())
    assert torch.equal(_logits(model, gpt2_tok), _logits(twin, gpt2_tok))


def test_fingerprint_is_stable_and_distinguishing(gpt2_tok):
    hp = tiny_hparams("gpt2")
    a, b = build_tiny("gpt2"), build_tiny("gpt2")
    assert fingerprint(a, hp) == fingerprint(b, hp)
    apply_coachhook_to_model(a, gpt2_tok, FACTS[:2], hp, **NOPROG)
    assert fingerprint(a, hp) == fingerprint(b, hp)  # hooks never change a parameter
    other = fingerprint(build_tiny("gpt2", seed=1), hp)
    assert other["edited_modules"] != fingerprint(b, hp)["edited_modules"]
    with torch.no_grad():  # one weight outside the edited layers changed: still noticed
        b.transformer.h[3].mlp.c_fc.weight[0, 0] += 1.0
    assert fingerprint(b, hp)["sampled"] != fingerprint(a, hp)["sampled"]


def test_load_onto_a_different_base_model_is_refused_and_leaves_it_untouched(gpt2_tok, tmp_path):
    model, _ = _edited("gpt2", gpt2_tok)
    path = save_coachhook(model, tmp_path / "s.safetensors")
    other = build_tiny("gpt2", seed=1)
    before = _logits(other, gpt2_tok)
    with pytest.raises(PersistenceError, match=r"different base model.*edited_modules.*base model it was saved from"):
        load_coachhook(other, path)
    assert _no_hooks(other) and torch.equal(_logits(other, gpt2_tok), before)
    with pytest.raises(PersistenceError, match=r"dtype.*Load the base model in float32 \(it is float16 now\)"):
        load_coachhook(build_tiny("gpt2").half(), path)
    with pytest.raises(PersistenceError, match="different base model"):  # another architecture altogether
        load_coachhook(build_tiny("gpt2", n_layer=5), path)
    load_coachhook(other, path, check_fingerprint=False)  # the documented override
    assert get_state(other).step == 2


def _rewrite_header(src, dst, **changes):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()[META_KEY])
    header.update(changes)
    save_file(load_file(str(src)), str(dst), metadata={META_KEY: json.dumps(header)})
    return dst


def test_other_format_version_is_refused_with_the_fix(gpt2_tok, tmp_path):
    model, _ = _edited("gpt2", gpt2_tok, batches=1)
    path = save_coachhook(model, tmp_path / "s.safetensors")
    future = _rewrite_header(path, tmp_path / "v2.safetensors", format_version=FORMAT_VERSION + 1,
                             library_version="9.9.9")
    fresh = build_tiny("gpt2")
    with pytest.raises(PersistenceError, match=rf"format version {FORMAT_VERSION + 1}.*coachhook-plugin 9\.9\.9"):
        load_coachhook(fresh, future)
    assert _no_hooks(fresh)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PersistenceError, match="without a CoachHooK header"):
        load_coachhook(fresh, tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file format at all")
    with pytest.raises(PersistenceError, match="not a CoachHooK state file"):
        load_coachhook(fresh, tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="save_coachhook"):
        load_coachhook(fresh, tmp_path / "missing.safetensors")
    assert _no_hooks(fresh)


def test_failed_load_leaves_an_edited_model_exactly_as_it_was(gpt2_tok, tmp_path, monkeypatch):
    src, _ = _edited("gpt2", gpt2_tok, batches=2)
    path = save_coachhook(src, tmp_path / "s.safetensors")
    model, hp = _edited("gpt2", gpt2_tok, batches=1)
    snap, templates, logits = get_state(model).snapshot(), get_state(model).context_templates, _logits(model, gpt2_tok)
    journal = list(get_state(model).journal)
    # layout mismatch: refused before anything is touched
    with pytest.raises(PersistenceError, match=r"hparams ask for layers \[2\]"):
        load_coachhook(model, path, hparams=tiny_hparams("gpt2", layers=[2]))
    # a failure half-way through putting the state back (second layer): rolled back
    real = HookLayer.load_state
    calls = {"n": 0}

    def fail_second(self, tensors, extra):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk gremlin")
        return real(self, tensors, extra)

    monkeypatch.setattr(HookLayer, "load_state", fail_second)
    with pytest.raises(RuntimeError, match="disk gremlin"):
        load_coachhook(model, path)
    monkeypatch.undo()
    state = get_state(model)
    assert same_state(state.snapshot(), snap) and state.context_templates == templates
    assert state.journal == journal and state.hparams is hp
    assert torch.equal(_logits(model, gpt2_tok), logits)
    # and a fresh model that fails half-way keeps no hooks
    calls["n"] = 0
    monkeypatch.setattr(HookLayer, "load_state", fail_second)
    fresh = build_tiny("gpt2")
    with pytest.raises(RuntimeError, match="disk gremlin"):
        load_coachhook(fresh, path)
    assert _no_hooks(fresh)


def test_save_is_atomic(gpt2_tok, tmp_path, monkeypatch):
    model, _ = _edited("gpt2", gpt2_tok, batches=1)
    path = save_coachhook(model, tmp_path / "s.safetensors")
    good = path.read_bytes()
    apply_coachhook_to_model(model, gpt2_tok, FACTS[2:], tiny_hparams("gpt2", mom2_update_weight=1e-2), **NOPROG)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed during the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_coachhook(model, path)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(tmp_path / "p.json", {"a": 1})
    monkeypatch.undo()
    assert path.read_bytes() == good  # the previous checkpoint, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]  # no temporary files left
    with pytest.raises(PersistenceError, match="no CoachHooK state"):
        save_coachhook(build_tiny("gpt2"), tmp_path / "x.safetensors")


def test_undo_last_k_batches_exactly(gpt2_tok):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, undo_depth=3)
    base = _logits(model, gpt2_tok)
    snaps, logits = [], []
    batches = [FACTS[:2], FACTS[2:], [FACTS[0], FACTS[3]]]
    for batch in batches:
        apply_coachhook_to_model(model, gpt2_tok, batch, hp, **NOPROG)
        snaps.append(get_state(model).snapshot())
        logits.append(_logits(model, gpt2_tok))
    state = get_state(model)
    assert len(state.journal) == 3
    sizes = [state_nbytes(s) for s in state.journal]  # k snapshots, each the state as it was before its batch
    assert journal_nbytes(model) == sum(sizes)
    assert sizes[1:] == [state_nbytes(snaps[0]), state_nbytes(snaps[1])] and max(sizes) <= state_nbytes(state)
    assert undo_coachhook(model) == 2
    assert same_state(state.snapshot(), snaps[1]) and torch.equal(_logits(model, gpt2_tok), logits[1])
    apply_coachhook_to_model(model, gpt2_tok, batches[2], hp, **NOPROG)  # redo: the same state again
    assert same_state(state.snapshot(), snaps[2])
    assert undo_coachhook(model, k=2) == 1
    assert same_state(state.snapshot(), snaps[0]) and torch.equal(_logits(model, gpt2_tok), logits[0])
    with pytest.raises(UndoError, match=r"cannot undo 2 batch\(es\): the undo journal holds 1.*nothing was changed"):
        undo_coachhook(model, k=2)
    assert same_state(state.snapshot(), snaps[0])
    assert undo_coachhook(model) == 0  # back to before the first batch: the hooks do nothing
    assert torch.equal(_logits(model, gpt2_tok), base)
    with pytest.raises(UndoError, match="holds 0"):
        undo_coachhook(model)
    with pytest.raises(UndoError, match="positive integer"):
        undo_coachhook(model, k=0)
    with pytest.raises(UndoError, match="no CoachHooK state"):
        undo_coachhook(build_tiny("gpt2"))


def test_undo_journal_is_bounded_by_undo_depth(gpt2_tok):
    model, hp = _edited("gpt2", gpt2_tok, batches=3)  # default undo_depth = 1
    assert hp.undo_depth == 1 and len(get_state(model).journal) == 1
    with pytest.raises(UndoError, match="undo_depth=1"):
        undo_coachhook(model, k=2)
    assert get_state(model).step == 3
    model, _ = _edited("gpt2", gpt2_tok, batches=2, undo_depth=0)
    assert get_state(model).journal == [] and journal_nbytes(model) == 0


def test_rolled_back_batch_leaves_the_journal(gpt2_tok):
    model, hp = _edited("gpt2", gpt2_tok, batches=1, undo_depth=3)
    _, restore = apply_coachhook_to_model(model, gpt2_tok, FACTS[2:], hp, **NOPROG)
    assert len(get_state(model).journal) == 2
    restore()  # EasyEdit's roll-back of the batch
    assert len(get_state(model).journal) == 1 and get_state(model).step == 1


def test_snapshot_cost_bound_matches_the_real_state(gpt2_tok):
    """The documented journal cost (snapshot_nbytes_for, used for SmolLM2's numbers) bounds a real snapshot."""
    model, _ = _edited("gpt2", gpt2_tok, batches=2)  # 4 edits on 2 layers of a 256 → 64 down-projection
    state = get_state(model)
    assert 0 < state_nbytes(state) <= snapshot_nbytes_for(64, 256, 2, 4)
    assert snapshot_nbytes_for(576, 1536, 5, 10) <= snapshot_nbytes_for(576, 1536, 5, 10_000)


def test_detach_after_load_and_after_undo_gives_the_base_model(gpt2_tok, tmp_path):
    model, _ = _edited("gpt2", gpt2_tok, batches=2, undo_depth=2)
    base = _logits(build_tiny("gpt2"), gpt2_tok)
    path = save_coachhook(model, tmp_path / "s.safetensors")
    undo_coachhook(model)
    assert get_state(model).step == 1 and not torch.equal(_logits(model, gpt2_tok), base)
    remove_coachhook(model)
    assert _no_hooks(model) and torch.equal(_logits(model, gpt2_tok), base)
    load_coachhook(model, path)  # the same (now bare) model takes the saved state back
    assert get_state(model).step == 2 and not torch.equal(_logits(model, gpt2_tok), base)
    remove_coachhook(model)
    assert _no_hooks(model) and torch.equal(_logits(model, gpt2_tok), base)


def test_public_api_exported():
    for name in ("save_coachhook", "load_coachhook", "undo_coachhook", "PersistenceError", "UndoError"):
        assert name in coachhook_plugin.__all__ and hasattr(coachhook_plugin, name)


def test_read_coachhook_without_a_model(gpt2_tok, tmp_path):
    model, _ = _edited("gpt2", gpt2_tok, batches=1)
    path = save_coachhook(model, tmp_path / "s.safetensors", extra={"note": "hello"})
    header, snap = read_coachhook(path)
    assert header["extra"] == {"note": "hello"} and same_state(snap, get_state(model).snapshot())


def test_fingerprint_sample_indices_are_exact_past_float32_range():
    """SmolLM2's embedding has 28,311,552 elements: a float32 linspace rounded its last index past the end."""
    from coachhook_plugin.persistence import sample_indices

    for numel in (1, 2, 63, 64, 65, 2 ** 24 + 1, 28_311_552, 50_257 * 1_600):
        idx = sample_indices(numel, 64)
        assert idx.dtype == torch.long and len(idx) == min(64, numel)
        assert idx[0] == 0 and idx[-1] == numel - 1
        assert bool((idx[1:] > idx[:-1]).all())
        assert idx.tolist() == [i * (numel - 1) // max(1, min(64, numel) - 1) for i in range(min(64, numel))]
    assert len(sample_indices(0, 64)) == 0
    big = torch.zeros(28_311_552, dtype=torch.int8)
    big[-1] = 7
    assert big[sample_indices(big.numel(), 64)][-1] == 7  # the last element is sampled, not out of bounds
