"""What users of either EasyEdit do (PyPI ``easyeditor`` in ``make test``, GitHub EasyEdit in ``make test-github``):
registration that fails loudly, ``edit`` with the shipped hparams, consecutive and single-round ``batch_edit``,
stale restore handles, statistics files both EasyEdits find."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import coachhook_plugin
from coachhook_plugin import StaleRestoreError, apply_coachhook_to_model, get_state, undo_coachhook
from conftest import FACTS, build_tiny, same_state, tiny_hparams

pytestmark = pytest.mark.easyedit  # also run against GitHub EasyEdit by `make test-github`

easyedit = pytest.importorskip("coachhook_plugin.easyedit")
REPO = Path(__file__).resolve().parents[1]


def _lists(facts):
    return dict(prompts=[f["prompt"] for f in facts], target_new=[f["target_new"] for f in facts],
                subject=[f["subject"] for f in facts])


def _run_python(code: str, tmp_path, extra_path=()):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([*map(str, extra_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


# ------------------------------------------------------------------------------------------------ registration

def test_a_failing_easyedit_import_is_a_visible_warning_with_the_error(tmp_path):
    broken = tmp_path / "broken" / "easyeditor"
    broken.mkdir(parents=True)
    # what the plugin's own venv sees with GitHub EasyEdit on the path (its `unke` module, transformers 5.24)
    (broken / "__init__.py").write_text("import transformers.modeling_attn_mask_utils_removed\n")
    out = _run_python("import coachhook_plugin; print('registered:', coachhook_plugin.register())", tmp_path,
                      extra_path=[broken.parent])
    assert out.returncode == 0, out.stderr
    assert "registered: False" in out.stdout
    assert "RegistrationWarning" in out.stderr and "CoachHooK is NOT registered" in out.stderr
    assert "transformers.modeling_attn_mask_utils_removed" in out.stderr  # the import error itself


def test_no_easyedit_installed_stays_quiet(tmp_path):
    hide = textwrap.dedent("""
        import sys
        class NoEasyEdit:  # as if easyeditor were not installed at all
            def find_spec(self, name, path=None, target=None):
                if name == "easyeditor" or name.startswith("easyeditor."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoEasyEdit())
        import coachhook_plugin
        print('registered:', coachhook_plugin.register())
    """)
    out = _run_python(hide, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "registered: False" in out.stdout and "Warning" not in out.stderr


# ------------------------------------------------------------------------------------------------ editing

@pytest.fixture
def shipped_batch_size():
    """The batch size the shipped CoachHooK hparams carry (10): GitHub's `edit` asserts batch_size == 1."""
    sizes = {yaml.safe_load(p.read_text())["batch_size"] for p in (REPO / "hparams" / "CoachHooK").glob("*.yaml")}
    assert sizes == {10}
    return 10


@pytest.fixture
def editor(gpt2_tok, shipped_batch_size):
    assert coachhook_plugin.register()
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, batch_size=shipped_batch_size)
    return easyedit.make_editor(hp, model=build_tiny("gpt2"), tok=gpt2_tok)


def test_edit_with_the_shipped_batch_size_is_consecutive(editor, shipped_batch_size, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for fact in FACTS[:3]:
        metrics, _, _ = editor.edit(prompts=fact["prompt"], target_new=fact["target_new"], subject=fact["subject"],
                                    verbose=False, **easyedit.consecutive_edit_kwargs("edit"))
        assert "post" in metrics[0]
    assert get_state(editor.model).step == 3  # one request per call, every call kept
    assert editor.hparams.batch_size == shipped_batch_size  # presented as 1 for the call only
    assert not (tmp_path / "logs").exists()  # no ./logs/results.json (GitHub) or run.log


def test_batch_edit_consecutive_then_single_round_rolls_back_bit_exact(editor, gpt2_tok):
    editor.batch_edit(**_lists(FACTS[:1]), verbose=False, **easyedit.consecutive_edit_kwargs())
    editor.batch_edit(**_lists(FACTS[1:3]), verbose=False, **easyedit.consecutive_edit_kwargs())
    state = get_state(editor.model)
    assert state.step == 2 and all(h.num_keys == 3 for h in state.layers.values())  # the hooks persisted
    snap = state.snapshot()
    batch = gpt2_tok([f["prompt"] for f in FACTS], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = editor.model(**batch).logits
    single_round = easyedit.single_round_edit_kwargs()
    editor.batch_edit(**_lists(FACTS[3:]), verbose=False, **single_round)
    if "sequential_edit" in single_round:
        # GitHub: the batch was rolled back through CALLABLE_RESTORE_ALGS to exactly the state before it
        assert same_state(state.snapshot(), snap)
        with torch.no_grad():
            assert torch.equal(editor.model(**batch).logits, logits)
    else:
        # PyPI (keep_original_weight): a single-round batch starts from the base model and is rolled back to it
        assert state.step == 0 and all(h.num_keys == 0 for h in state.layers.values())


# ------------------------------------------------------------------------------------------------ stale handles

def test_a_stale_restore_handle_refuses_and_changes_nothing(gpt2_tok):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, undo_depth=5)
    handles = [apply_coachhook_to_model(model, gpt2_tok, [fact], hp)[1] for fact in FACTS[:4]]
    state = get_state(model)
    snap = state.snapshot()
    with pytest.raises(StaleRestoreError, match=r"undo_coachhook\(model, k\)"):
        handles[0]()  # from the first batch, three batches later: it would roll all of them back
    assert same_state(state.snapshot(), snap) and not handles[0].restored
    handles[-1]()  # the newest batch's handle still rolls back exactly its own batch
    assert state.step == 3
    with pytest.raises(StaleRestoreError):
        handles[-2]()  # the state changed (a restore) since that batch too: refused
    undo_coachhook(model, 1)
    assert state.step == 2
    handles[-1]()  # restored already: calling again does nothing
    assert state.step == 2


def test_a_failed_batch_keeps_the_previous_handle_valid(gpt2_tok):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2)
    _, handle = apply_coachhook_to_model(model, gpt2_tok, [FACTS[0]], hp)
    with pytest.raises(ValueError):
        apply_coachhook_to_model(model, gpt2_tok, [dict(FACTS[1], target_new="  ")], hp)
    handle()
    assert get_state(model).step == 0


# ------------------------------------------------------------------------------------------------ statistics

@pytest.mark.parametrize("name_or_path", ["some-org/tiny-gpt2", "LOCAL"])
def test_statistics_files_are_found_by_either_easyedit(name_or_path, tmp_path, gpt2_tok, monkeypatch):
    """`coachhook stats` writes each file under every model folder name an EasyEdit reads (PyPI:
    name.replace('/', '_'), GitHub: name.rsplit('/')[-1]); the installed EasyEdit's own layer_stats loads it
    without touching a dataset, and the plugin's reader finds a file written under either name."""
    from coachhook_plugin.stats import ensure_stats, path_for, paths_for, save_second_moment

    ee = easyedit.import_easyeditor()  # noqa: F841  (the installed EasyEdit, whichever it is)
    from easyeditor.models.rome import layer_stats as ls

    model = build_tiny("gpt2")
    model.config._name_or_path = str(tmp_path / "models" / "tiny-gpt2") if name_or_path == "LOCAL" else name_or_path
    hp = tiny_hparams("gpt2", stats_dir=str(tmp_path / "stats"), mom2_dataset="corpus", mom2_n_samples=20,
                      mom2_dtype="float32")
    layer = hp.rewrite_module_tmp.format(hp.layers[0])
    ensure_stats(model, gpt2_tok, hp, ["The capital of France is Paris."] * 4, layer_names=[layer])
    name = model.config._name_or_path
    written = {p.parent.parent.name for p in paths_for(model, hp, layer) if p.exists()}
    assert {name.replace("/", "_"), name.rsplit("/")[-1]} <= written

    def refuse(*a, **k):
        raise AssertionError("EasyEdit did not find the statistics file and tried to load a dataset")

    monkeypatch.setattr(ls, "load_dataset", refuse)
    with easyedit.editing_context():
        stat = ls.layer_stats(model, gpt2_tok, layer, hp.stats_dir, "corpus", to_collect=["mom2"], sample_size=20,
                              precision="float32")
    assert stat.mom2.moment().shape == (256, 256)

    # the plugin's reader: a file that exists under only one of the names (written by one EasyEdit) is found
    for keep in paths_for(model, hp, layer):
        for p in paths_for(model, hp, layer):
            p.unlink(missing_ok=True)
        save_second_moment(keep, torch.eye(256, dtype=torch.float64), 1, 20)
        assert path_for(model, hp, layer) == keep
