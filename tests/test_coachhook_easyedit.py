"""CoachHooK through EasyEdit's own BaseEditor (PyPI easyeditor, CPU, tiny GPT-2)."""
import numpy as np
import pytest
import torch

import coachhook_plugin
from coachhook_plugin import CoachHooKHyperParams, get_state
from conftest import FACTS, build_tiny, same_state, tiny_hparams

pytestmark = pytest.mark.easyedit  # also run against GitHub EasyEdit by `make test-github`

easyedit = pytest.importorskip("coachhook_plugin.easyedit")


@pytest.fixture
def editor(gpt2_tok):
    assert coachhook_plugin.register()
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, batch_size=2)
    return easyedit.make_editor(hp, model=model, tok=gpt2_tok)


def _lists(facts):
    return dict(prompts=[f["prompt"] for f in facts], target_new=[f["target_new"] for f in facts],
                subject=[f["subject"] for f in facts])


def test_registered_in_easyedit_tables():
    from easyeditor.editors.batch_editor import BatchEditor
    from easyeditor.util.alg_dict import ALG_DICT

    assert coachhook_plugin.register() and coachhook_plugin.register()  # idempotent
    assert "CoachHooK" in ALG_DICT and BatchEditor.is_batchable_method("CoachHooK")


def _consecutive():
    """edit/batch_edit keep their edits: sequential_edit=True on GitHub EasyEdit, the default on PyPI."""
    return easyedit.consecutive_edit_kwargs()


def test_batch_edit_returns_easyedit_metrics_and_is_consecutive(editor):
    metrics, model, _ = editor.batch_edit(**_lists(FACTS[:2]), rephrase_prompts=["Zorbia's capital is",
                                                                                  "Alice Moreau's job is"],
                                          **_consecutive())
    assert len(metrics) == 2 and {"pre", "post", "case_id", "requested_rewrite"} <= set(metrics[0])
    post = metrics[0]["post"]
    assert "rewrite_acc" in post and "rephrase_acc" in post
    state = get_state(editor.model)
    assert state.step == 1
    editor.batch_edit(**_lists(FACTS[2:]), **_consecutive())
    assert state.step == 2 and all(h.num_keys == 4 for h in state.layers.values())  # accumulated
    out = easyedit.to_builtin(metrics)
    assert isinstance(out[0]["post"]["rewrite_acc"][0], float)


def test_edit_single_requests_are_consecutive_and_keep_original_weight_is_single_round(editor):
    assert editor.hparams.batch_size == 2  # GitHub's edit asserts batch_size == 1: presented for the call only
    editor.edit(prompts=FACTS[0]["prompt"], target_new=FACTS[0]["target_new"], subject=FACTS[0]["subject"],
                **easyedit.consecutive_edit_kwargs("edit"))
    editor.edit(prompts=FACTS[1]["prompt"], target_new=FACTS[1]["target_new"], subject=FACTS[1]["subject"],
                **easyedit.consecutive_edit_kwargs("edit"))
    assert editor.hparams.batch_size == 2
    state = get_state(editor.model)
    assert state.step == 2
    before = {k: v.clone() for k, v in editor.model.state_dict().items()}
    snap = state.snapshot()
    editor.edit(prompts=FACTS[2]["prompt"], target_new=FACTS[2]["target_new"], subject=FACTS[2]["subject"],
                **easyedit.single_round_edit_kwargs("edit"))
    if "keep_original_weight" in easyedit.single_round_edit_kwargs("edit"):
        # PyPI: the edit started from the base model and was rolled back to it after evaluation
        assert state.step == 0 and all(h.num_keys == 0 for h in state.layers.values())
    else:
        # GitHub (sequential_edit=False): the edit was rolled back through CALLABLE_RESTORE_ALGS, bit-exact
        assert same_state(state.snapshot(), snap) and state.step == 2
    assert all(torch.equal(v, before[k]) for k, v in editor.model.state_dict().items())


def test_bad_request_through_easyedit_leaves_state(editor):
    editor.batch_edit(**_lists(FACTS[:2]), **_consecutive())
    snap = get_state(editor.model).snapshot()
    with pytest.raises(ValueError, match="empty or whitespace"):
        editor.batch_edit(prompts=["The capital of Zorbia is"], target_new=["  "], subject=["Zorbia"])
    after = get_state(editor.model).snapshot()
    assert same_state(after, snap)


def test_from_hparams_yaml_loads_a_local_model_and_edits(tmp_path, gpt2_tok):
    """The user's path: an hparams yaml naming a local checkpoint → BaseEditor.from_hparams → batch_edit."""
    import yaml
    from easyeditor import BaseEditor

    assert coachhook_plugin.register()
    ckpt = tmp_path / "tiny-gpt2"
    build_tiny("gpt2").save_pretrained(ckpt)
    gpt2_tok.save_pretrained(ckpt)
    fields = tiny_hparams("gpt2", mom2_update_weight=1e-2, batch_size=2).to_dict()
    fields["model_name"] = str(ckpt)
    (tmp_path / "hp.yaml").write_text(yaml.safe_dump(fields))
    hp = CoachHooKHyperParams.from_hparams(tmp_path / "hp.yaml")
    editor = BaseEditor.from_hparams(hp)
    assert isinstance(editor.model_name, str) and editor.model.device.type == "cpu"
    metrics, model, _ = editor.batch_edit(**_lists(FACTS[:2]), **_consecutive())
    assert len(metrics) == 2 and "rewrite_acc" in metrics[0]["post"]
    assert get_state(model).step == 1
