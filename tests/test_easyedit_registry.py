"""Registering a method with EasyEdit through the plugin: dispatch by BaseEditor.edit / batch_edit."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import easyedit_helpers as H  # noqa: E402

from coachhook_plugin.easyedit import compat, registry  # noqa: E402

pytestmark = pytest.mark.easyedit  # also run against GitHub EasyEdit by `make test-github`

NAME = "DummyDelta"
PARAM = "transformer.ln_f.bias"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with H.single_thread():
        yield


@pytest.fixture()
def hparams_cls(ee):
    from easyeditor.util.hparams import HyperParams

    @dataclass
    class DummyHyperParams(HyperParams):
        alg_name: str
        model_name: object
        device: int = 0
        delta: float = 0.5
        batch_size: int = 8
        max_length: int = 40

    return DummyHyperParams


@pytest.fixture()
def dummy(ee):
    """A throwaway method: adds ``delta`` to one weight, records its calls."""
    calls = []

    def apply_dummy(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                    keep_original_weight=False, **kwargs):
        p = dict(model.named_parameters())[PARAM]
        orig = p.detach().clone()
        with torch.no_grad():
            p += hparams.delta
        calls.append([r["prompt"] for r in requests])
        # the originals go back to the editor when it will restore them: PyPI restores whatever it gets (so only
        # with keep_original_weight), GitHub decides itself (sequential_edit) and asks with return_orig_weights
        editor_decides = "sequential_edit" in compat.consecutive_edit_kwargs()
        wanted = return_orig_weights if editor_decides else keep_original_weight
        return model, ({PARAM: orig} if wanted else {})

    registry.register_method(NAME, apply_dummy, batchable=True, callable_restore=False)
    yield apply_dummy, calls
    registry.unregister_method(NAME)


def test_register_method_updates_easyedit_tables_idempotently(ee, dummy):
    from easyeditor.editors.batch_editor import BatchEditor
    from easyeditor.editors import editor as editor_mod
    from easyeditor.util import alg_dict

    apply_dummy, _ = dummy
    dispatch = alg_dict.ALG_DICT[NAME]
    assert editor_mod.ALG_DICT is alg_dict.ALG_DICT and editor_mod.ALG_DICT[NAME] is dispatch
    assert BatchEditor.is_batchable_method(NAME)
    assert BatchEditor.is_batchable_method("MEMIT") and not BatchEditor.is_batchable_method("ROME")
    n = len(alg_dict.ALG_DICT)
    for _ in range(3):
        assert registry.register_method(NAME, apply_dummy, batchable=True, callable_restore=False)
    assert len(alg_dict.ALG_DICT) == n and alg_dict.ALG_DICT[NAME] is dispatch
    assert registry.is_registered(NAME)
    registry.register_method(NAME, apply_dummy, batchable=False, callable_restore=False)
    assert not BatchEditor.is_batchable_method(NAME)
    registry.register_method(NAME, apply_dummy, batchable=True, callable_restore=False)
    assert BatchEditor.is_batchable_method(NAME)
    for mod in registry._callable_restore_tables():  # only in newer EasyEdit
        assert NAME not in mod.CALLABLE_RESTORE_ALGS


def test_unregister_restores_tables(ee):
    from easyeditor.util import alg_dict

    before = dict(alg_dict.ALG_DICT)
    registry.register_method("TmpAlg", lambda *a, **k: (a[0], {}))
    assert "TmpAlg" in alg_dict.ALG_DICT
    registry.unregister_method("TmpAlg")
    assert alg_dict.ALG_DICT == before
    # replacing an EasyEdit method and unregistering puts the original back
    registry.register_method("FT", lambda *a, **k: (a[0], {}))
    registry.unregister_method("FT")
    assert alg_dict.ALG_DICT["FT"] is before["FT"]


def test_base_editor_dispatches_registered_method(ee, dummy, hparams_cls, tmp_path, monkeypatch):
    from easyeditor import BaseEditor

    monkeypatch.chdir(tmp_path)
    _, calls = dummy
    hparams = hparams_cls(alg_name=NAME, model_name=H.tiny_model_dir())
    editor = BaseEditor.from_hparams(hparams)  # a local path without 'gpt'/'llama' in it loads fine
    assert isinstance(editor.model_name, str) and hparams.model_name == editor.model_name
    before = editor.model.get_parameter(PARAM).detach().clone()
    metrics, edited, weights_copy = editor.edit(prompts="The capital of France", target_new="Rome",
                                                ground_truth="Paris", verbose=False,
                                                **compat.consecutive_edit_kwargs("edit"))
    assert calls == [["The capital of France"]]
    after = edited.get_parameter(PARAM)
    assert torch.allclose(after, before + 0.5)  # the edit stayed (keep_original_weight=False)
    assert compat.to_builtin(metrics)[0]["post"]["rewrite_acc"] is not None
    assert not (tmp_path / "logs").exists()

    # single-round (keep_original_weight=True on PyPI, sequential_edit=False on GitHub): EasyEdit restores from
    # the returned weights dict
    editor.edit(prompts="The capital of Italy", target_new="Paris", verbose=False,
                **compat.single_round_edit_kwargs("edit"))
    assert torch.allclose(editor.model.get_parameter(PARAM), before + 0.5)


def test_batch_edit_dispatches_registered_method(ee, dummy, hparams_cls):
    from coachhook_plugin.easyedit import make_editor

    _, calls = dummy
    model, tok = H.tiny_model()
    hparams = hparams_cls(alg_name=NAME, model_name="ignored-when-a-model-is-given", batch_size=2)
    editor = make_editor(hparams, model=model, tok=tok)
    assert editor.model is model and editor.tok is tok
    assert editor.model_name == H.MODEL_TAG and hparams.model_name == H.MODEL_TAG
    prompts = [p for p, _, _ in H.FACTS[:3]]
    metrics, _, _ = editor.batch_edit(prompts=prompts, target_new=["Rome", "Paris", "Tokyo"], verbose=False,
                                      **compat.consecutive_edit_kwargs())
    assert calls == [prompts[:2], prompts[2:]]  # chunks of batch_size, one dispatch each
    # PyPI quirk: batch_edit returns the metrics of the last chunk only; GitHub EasyEdit returns every record's
    assert len(metrics) == (len(prompts) if "sequential_edit" in compat.consecutive_edit_kwargs() else 1)
    assert "pre" in metrics[0] and "post" in metrics[0]


def test_callable_restore_works_with_either_editor(ee, hparams_cls):
    """PyPI EasyEdit restores through ``weights_copy.items()``, GitHub EasyEdit (CALLABLE_RESTORE_ALGS) calls
    ``weights_copy()``; a registered hook method's restore callable serves both, and a method that returns
    nothing to restore must not crash GitHub's unconditional ``weights_copy()``."""
    from easyeditor import BaseEditor

    restored = []
    returns_nothing = []
    editor_decides = "sequential_edit" in compat.consecutive_edit_kwargs()

    def apply_hooked(model, tok, requests, hparams, keep_original_weight=False, return_orig_weights=False,
                     **kwargs):
        handle = model.transformer.ln_f.register_forward_hook(lambda m, i, o: o + 0.0)

        def restore():
            handle.remove()
            restored.append(True)

        wanted = (return_orig_weights if editor_decides else keep_original_weight) and not returns_nothing
        return model, (restore if wanted else None)

    registry.register_method("DummyHook", apply_hooked, batchable=False, callable_restore=True)
    try:
        model, tok = H.tiny_model()
        editor = BaseEditor.from_hparams(hparams_cls(alg_name="DummyHook", model_name=(model, tok)))
        _, _, weights_copy = editor.edit(prompts="The capital of Spain", target_new="Rome", verbose=False,
                                         **compat.single_round_edit_kwargs("edit"))
        assert restored == [True]  # PyPI's `.items()` loop / GitHub's `weights_copy()` ran the restore callable
        assert isinstance(weights_copy, registry.RestoreHandle) and weights_copy.restored
        weights_copy()  # at most once
        assert restored == [True]
        returns_nothing.append(True)
        editor.edit(prompts="The capital of Spain", target_new="Rome", verbose=False,
                    **compat.single_round_edit_kwargs("edit"))  # None -> an empty, callable no-op handle
        assert restored == [True]
        from easyeditor.editors.batch_editor import BatchEditor

        assert not BatchEditor.is_batchable_method("DummyHook")
        for mod in registry._callable_restore_tables():
            assert "DummyHook" in mod.CALLABLE_RESTORE_ALGS
    finally:
        registry.unregister_method("DummyHook")


def test_register_is_safe_without_easyeditor(monkeypatch):
    assert isinstance(registry.register(), bool)  # CoachHooK may or may not be importable yet

    def no_easyeditor():  # not installed at all: quiet (one that fails to import warns, see test_easyedit_flavours)
        raise ModuleNotFoundError("No module named 'easyeditor'", name="easyeditor")

    from coachhook_plugin.easyedit import editor, imports

    monkeypatch.setattr(editor, "_installed", {})
    monkeypatch.setattr(imports, "import_easyeditor", no_easyeditor)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", registry.RegistrationWarning)
        assert registry.register() is False
