"""`coachhook bench` end to end on a tiny trained GPT-2 (4 edits, 2 methods) and its pieces."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import easyedit_helpers as H  # noqa: E402

pytestmark = pytest.mark.easyedit  # also run against GitHub EasyEdit by `make test-github`

#: CounterFact-shaped records the tiny model can be edited on (subjects are the prompts' last words)
TINY_RECORDS = [
    dict(prompt="The capital of France", subject="France", target_new="Rome", ground_truth="Paris",
         rephrase_prompt="The capital city of France", locality_prompt="The capital of Japan",
         locality_ground_truth="Tokyo"),
    dict(prompt="The capital of Italy", subject="Italy", target_new="Berlin", ground_truth="Rome",
         rephrase_prompt="The capital city of Italy", locality_prompt="The capital of Russia",
         locality_ground_truth="Moscow"),
    dict(prompt="The capital of Germany", subject="Germany", target_new="Madrid", ground_truth="Berlin",
         rephrase_prompt="The capital city of Germany", locality_prompt="The capital of Japan",
         locality_ground_truth="Tokyo"),
    dict(prompt="The capital of Spain", subject="Spain", target_new="Paris", ground_truth="Madrid",
         rephrase_prompt="The capital city of Spain", locality_prompt="The capital of Russia",
         locality_ground_truth="Moscow"),
]

STATS = dict(mom2_dataset="tiny-wikitext", mom2_n_samples=60, mom2_dtype="float32")
MEMIT_LIKE = dict(layers=[1, 2], fact_token="subject_last", v_num_grad_steps=20, v_lr=0.5, v_loss_layer=3,
                  v_weight_decay=0.001, clamp_norm_factor=50, kl_factor=0.0625, mom2_adjustment=True,
                  mom2_update_weight=100, **STATS)


def tiny_method_hparams(stats_dir) -> dict:
    """hparams for every bench method on the tiny GPT-2 ({folder: fields}); model_name is set by the bench."""
    common = dict(model_name="tiny", device=0, **H.GPT2_LAYOUT)
    return {
        "CoachHooK": dict(common, alg_name="CoachHooK", **MEMIT_LIKE, stats_dir=str(stats_dir), alpha_z=1.0,
                          batch_size=2, max_length=40),
        "MEMIT": dict(common, alg_name="MEMIT", layer_selection="all", **MEMIT_LIKE, stats_dir=str(stats_dir),
                      batch_size=2),
        "AlphaEdit": dict(common, alg_name="AlphaEdit", **MEMIT_LIKE, stats_dir=str(stats_dir), batch_size=2,
                          nullspace_threshold=1e9, L2=1.0),  # tiny stats: keep every direction editable
        "ROME": dict(common, alg_name="ROME", layers=[1], fact_token="subject_last", v_num_grad_steps=20,
                     v_lr=0.5, v_loss_layer=3, v_weight_decay=0.001, clamp_norm_factor=50, kl_factor=0.0625,
                     mom2_adjustment=False, context_template_length_params=[[5, 5]], **STATS,
                     stats_dir=str(stats_dir)),
        "FT": dict(common, alg_name="FT", layers=[2], num_steps=20, lr=5e-3, weight_decay=0.0, kl_factor=0.0,
                   norm_constraint=5e-2, batch_size=2, max_length=40),
        "FT-M": dict(common, alg_name="FT-M", layers=[2], num_steps=20, lr=5e-3, norm_constraint=5e-2,
                     batch_size=2),
        "LoRA": dict(alg_name="LoRA", model_name="tiny", device=0, layers=[], num_steps=20, lr=5e-3,
                     weight_decay=0.0, kl_factor=0.0, norm_constraint=5e-2, target_modules=["c_attn", "c_proj"],
                     rank=8, lora_alpha=32, lora_dropout=0.0, batch_size=2, max_length=40),
        "GRACE": dict(alg_name="GRACE", model_name="tiny", device=0, layers=[2],
                      rewrite_module_tmp=H.GPT2_LAYOUT["rewrite_module_tmp"], eps=1.0, n_iter=40, edit_lr=0.5),
        "Unedited": dict(alg_name="Unedited", model_name="tiny", device=0),
    }


def write_tiny_hparams(root: Path, stats_dir) -> Path:
    for folder, fields in tiny_method_hparams(stats_dir).items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "tiny.yaml").write_text(yaml.safe_dump(fields))
    return root


def write_tiny_data(path: Path) -> Path:
    path.write_text(json.dumps([dict(r, case_id=i) for i, r in enumerate(TINY_RECORDS)]))
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with H.single_thread():
        yield


def bench_args(tmp_path, methods, out, protocol="consecutive", extra=()):
    data = write_tiny_data(tmp_path / "tiny-counterfact.json")
    hp_dir = write_tiny_hparams(tmp_path / "hparams", tmp_path / "stats")
    return [f"data={data}", f"methods=[{','.join(methods)}]", "num_edits=4", "batch_size=2",
            f"protocol={protocol}", f"model={H.tiny_model_dir()}", "model.hparams_name=tiny", f"out={out}",
            f"hparams_dir={hp_dir}", f"stats.corpus={H.shared_path('data', 'corpus', 'wikitext-2-raw-test.txt')}",
            "stats.max_length=64", "progress=false", "eval.max_new_tokens=3", *extra]


def test_bench_end_to_end_contract_and_checkpoints(tmp_path):
    """The contract: results.json (schema, plain floats in [0, 1]), results.md (best two marked), PNGs; and the
    checkpoint after the first batch is scored on the model *then*, not on the final model."""
    from coachhook_plugin.cli import main

    out = tmp_path / "run"
    args = bench_args(tmp_path, ["CoachHooK", "MEMIT"], out, extra=["protocol.checkpoint_every=2"])
    assert main(["bench", *args]) == 0

    res = json.loads((out / "results.json").read_text())
    assert res["config"]["protocol"] == "consecutive" and res["config"]["num_edits"] == 4
    assert set(res["methods"]) == {"CoachHooK", "MEMIT"}
    for name, m in res["methods"].items():
        assert "error" not in m, m.get("error")
        assert not m["failed_edits"], m["failed_edits"]
        for key in ("reliability", "generality", "locality", "average"):
            assert type(m["final"][key]) is float and 0.0 <= m["final"][key] <= 1.0
        assert [p["edits"] for p in m["curve"]] == [2, 4]
        for p in m["curve"]:
            assert {"edits", "reliability", "generality", "locality"} <= set(p)
        assert type(m["seconds_per_edit"]) is float and m["seconds_per_edit"] > 0
        assert type(m["peak_memory_bytes"]) is float and m["peak_memory_bytes"] > 0
        assert m["final"] == {k: v for k, v in m["curve"][-1].items() if k not in ("edits", "scored")}
        assert "generative_reliability" in m["final"]
    assert res["methods"]["MEMIT"]["final"]["reliability"] > 0.5  # the edits took

    # checkpoint after batch 1 (records 0–1, the model then) vs the final scores of the same records
    per_record = json.loads((out / "per_record.json").read_text())
    first, last = per_record["MEMIT"][0], per_record["MEMIT"][-1]
    assert first["edits"] == 2 and [r["index"] for r in first["records"]] == [0, 1]
    assert last["edits"] == 4 and len(last["records"]) == 4
    then = [r["target_prob"] for r in first["records"]]
    now = [r["target_prob"] for r in last["records"][:2]]
    assert then != now  # batch 2 changed MEMIT's weights, so the same records score differently

    md = (out / "results.md").read_text()
    assert "| Method | Reliability | Generality | Locality | Average |" in md
    assert "| CoachHooK |" in md and "| MEMIT |" in md and "**" in md
    for png in ("metrics_vs_edits.png", "time_per_edit.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # one method per run (a SLURM multirun) merges back into the same table; other experiments are refused
    from coachhook_plugin.bench.merge import MergeError, merge_dirs

    for name in res["methods"]:
        part = tmp_path / f"only-{name}"
        part.mkdir()
        (part / "results.json").write_text(json.dumps({"config": res["config"],
                                                       "methods": {name: res["methods"][name]}}))
    merged = merge_dirs([tmp_path / "only-MEMIT", tmp_path / "only-CoachHooK"], tmp_path / "merged")
    assert merged["methods"] == {"MEMIT": res["methods"]["MEMIT"], "CoachHooK": res["methods"]["CoachHooK"]}
    assert (tmp_path / "merged" / "results.md").read_text().count("| CoachHooK |") == 1
    # two runs of one method (say an earlier default and the current one) share a table once one is renamed
    (tmp_path / "again-CoachHooK").mkdir()
    (tmp_path / "again-CoachHooK" / "results.json").write_text((tmp_path / "only-CoachHooK" / "results.json").read_text())
    with pytest.raises(MergeError, match="'CoachHooK' appears in more than one run"):
        merge_dirs([tmp_path / "only-CoachHooK", tmp_path / "again-CoachHooK"], tmp_path / "merged-clash")
    both = merge_dirs([tmp_path / "only-CoachHooK", tmp_path / "again-CoachHooK"], tmp_path / "merged-both",
                      renames=[(str(tmp_path / "again-CoachHooK"), "CoachHooK", "CoachHooK (earlier)")])
    assert list(both["methods"]) == ["CoachHooK", "CoachHooK (earlier)"]
    assert both["methods"]["CoachHooK (earlier)"]["final"] == res["methods"]["CoachHooK"]["final"]
    assert "| CoachHooK (earlier) |" in (tmp_path / "merged-both" / "results.md").read_text()
    with pytest.raises(MergeError, match="only \\['CoachHooK'\\]"):
        merge_dirs([tmp_path / "only-CoachHooK"], tmp_path / "merged-bad",
                   renames=[(str(tmp_path / "only-CoachHooK"), "MEMIT", "x")])
    other = dict(res["config"], num_edits=8)
    (tmp_path / "only-MEMIT" / "results.json").write_text(json.dumps({"config": other, "methods": {}}))
    with pytest.raises(MergeError, match="differs from run 0 in 'num_edits'"):
        merge_dirs([tmp_path / "only-CoachHooK", tmp_path / "only-MEMIT"], tmp_path / "merged2")


def test_single_round_rolls_back_and_failures_are_reported(tmp_path):
    """single_round restores the base model after each batch (checked inside the bench by a weight checksum);
    a method that cannot run is reported in results.json, not dropped."""
    from coachhook_plugin.bench import main

    out = tmp_path / "single"
    args = bench_args(tmp_path, ["FT-M", "GRACE", "ROME"], out, protocol="single_round",
                      extra=["eval.generative=false", "method_settings.ROME.hparams=/nonexistent/ROME.yaml"])
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert "not found" in res["methods"]["ROME"]["error"]
    for name in ("FT-M", "GRACE"):
        m = res["methods"][name]
        assert "error" not in m, m.get("error")
        assert [p["edits"] for p in m["curve"]] == [2, 4]
        assert m["final"]["reliability"] > 0.5
    assert "failed" in (out / "results.md").read_text()


def test_overrides_shorthands(tmp_path):
    from coachhook_plugin.bench import rewrite_overrides

    zsre = tmp_path / "z.json"
    zsre.write_text(json.dumps([{"src": "q?", "alt": "a", "subject": "q", "answers": ["b"], "rephrase": "r",
                                 "loc": "nq question: x", "loc_ans": "y"}]))
    assert rewrite_overrides([f"data={zsre}", "model=/m/x", "data=counterfact", "model=smollm2-135m"]) == \
        ["data=zsre", f"data.path={zsre}", "model=custom", "model.name=/m/x", "data=counterfact",
         "model=smollm2-135m"]


def test_zsre_loader_strips_prefix_and_skips_unusable(tmp_path):
    from coachhook_plugin.bench.data import load_records

    raw = [{"src": "What is the product made by Acme?", "subject": "Acme", "alt": "rockets", "answers": ["anvils"],
            "rephrase": "What does Acme make?", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"},
           {"src": "Who founded Bcorp?", "subject": "Bcorp", "alt": "Ann", "answers": ["Ann"], "rephrase": "r",
            "loc": "nq question: q", "loc_ans": "a"}]
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(raw))
    recs, skipped = load_records(path, 1, fmt="auto", strip_locality_prefix="nq question: ")
    assert recs[0]["locality_prompt"] == "who wrote hamlet" and recs[0]["target_new"] == "rockets"
    recs, skipped = load_records(path, 1, skip_invalid=True)
    assert skipped == [] and len(recs) == 1  # stops after the first usable record
    with pytest.raises(ValueError, match="usable records"):
        load_records(path, 2)


def test_markdown_marks_best_two():
    from coachhook_plugin.bench.report import markdown_table

    res = {"config": {"protocol": "consecutive"}, "methods": {
        k: {"label": k, "final": {"reliability": v, "generality": v, "locality": v, "average": v},
            "seconds_per_edit": 1.0} for k, v in (("A", 0.9), ("B", 0.5), ("C", 0.1))}}
    md = markdown_table(res)
    assert "| A | **90.00**" in md and "| B | <u>50.00</u>" in md and "| C | 10.00" in md


def test_rome_writes_every_record_of_a_batch(tmp_path):
    """ROME's apply function reads ``requests[0]`` only: the bench must give it a batch one record per call
    (as ``BaseEditor.edit`` does), and roll all of them back in single_round (the bench checks the weights)."""
    from coachhook_plugin.bench import main

    out = tmp_path / "rome"
    args = bench_args(tmp_path, ["ROME"], out, protocol="single_round", extra=["eval.generative=false"])
    assert main(args) == 0
    m = json.loads((out / "results.json").read_text())["methods"]["ROME"]
    assert "error" not in m, m.get("error")
    assert not m["failed_edits"], m["failed_edits"]
    rows = [r for part in json.loads((out / "per_record.json").read_text())["ROME"] for r in part["records"]]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    # the second record of each batch of 2 was written too (before the fix it kept its pre-edit score)
    assert all(r["reliability"] == 1.0 for r in rows), rows


def test_bench_runs_every_easyedit_baseline_beside_coachhook(tmp_path):
    """MEMIT / ROME / FT / LoRA / AlphaEdit / GRACE beside CoachHooK in one `coachhook bench`, from yamls in the
    shipped (PyPI-era) form, with whichever EasyEdit is installed (GitHub's classes need fields those yamls lack,
    and GitHub's GRACE wants `inner_params`): every method runs, none is reported as failed."""
    from coachhook_plugin.bench import main

    out = tmp_path / "all"
    methods = ["CoachHooK", "MEMIT", "ROME", "FT-L", "LoRA", "AlphaEdit", "GRACE"]
    assert main(bench_args(tmp_path, methods, out, extra=["eval.generative=false"])) == 0
    res = json.loads((out / "results.json").read_text())
    for name in methods:
        m = res["methods"][name]
        assert "error" not in m, (name, m.get("error"))
        assert not m["failed_edits"], (name, m["failed_edits"])


def test_checkpoint_sample_scores_a_seeded_subset_before_the_last_checkpoint_and_all_at_it():
    from coachhook_plugin.bench.protocols import MethodRun, checkpoint_records, checkpoint_set

    records = [{"index": i} for i in range(30)]
    picked = checkpoint_records(records[:20], 5, seed=0)
    assert len(picked) == 5 and picked == sorted(picked, key=lambda r: r["index"])
    assert picked == checkpoint_records(records[:20], 5, seed=0)  # the same for every method of a run
    assert checkpoint_records(records[:4], 5, seed=0) == records[:4]
    assert checkpoint_records(records[:20], None, seed=0) == records[:20]

    class Runner:  # edits nothing; the evaluator records what it is asked to score
        key, batchable = "fake", True

        def edit(self, recs, single_round):
            return []

    class Evaluator:
        def __init__(self):
            self.asked = []

        def score(self, model, tok, recs, **kw):
            self.asked.append([r["index"] for r in recs])
            return [{"reliability": 1.0, "generality": 1.0, "locality": 1.0} for _ in recs]

    Runner.model = Runner.tok = Runner.hparams = None
    Runner.editor = type("E", (), {"model_name": "m"})
    ev = Evaluator()
    run = MethodRun(Runner(), ev, checkpoint_sample=4, seed=3)
    run.run("consecutive", records, 5, checkpoint_set(30, 10))
    assert [len(a) for a in ev.asked] == [4, 4, 30]
    assert all(set(a) <= set(range(n)) for a, n in zip(ev.asked, (10, 20)))
    assert [p["scored"] for p in run.curve] == [4, 4, 30] and [p["edits"] for p in run.curve] == [10, 20, 30]


def test_unedited_row_is_the_base_model_scored_like_the_others(tmp_path):
    """The Unedited row: locality exactly 1 (the reference is the base model), the same per-record scores at
    every checkpoint (nothing was written), and the edited method's reliability above it on the same records."""
    from coachhook_plugin.cli import main

    out = tmp_path / "run"
    assert main(["bench", *bench_args(tmp_path, ["MEMIT", "Unedited"], out,
                                      extra=["protocol.checkpoint_every=2"])]) == 0
    res = json.loads((out / "results.json").read_text())
    base, memit = res["methods"]["Unedited"], res["methods"]["MEMIT"]
    assert "error" not in base and not base["failed_edits"]
    assert base["label"] == "Unedited (base model)"
    assert base["final"]["locality"] == 1.0
    assert memit["final"]["reliability"] > base["final"]["reliability"] + 0.3
    per_record = json.loads((out / "per_record.json").read_text())["Unedited"]
    then = [r["target_prob"] for r in per_record[0]["records"]]
    now = [r["target_prob"] for r in per_record[-1]["records"][:2]]
    assert then == now
    md = (out / "results.md").read_text()  # a reference row: never marked best, even where it scores 100 %
    assert "| Unedited (base model) | " in md and "**100.00**" not in md.split("| Unedited (base model) |")[1].split("\n")[0]
    assert "reference row" in md


def test_scoring_shows_progress_in_chunks_of_whole_batches_and_scores_as_in_one_piece(gpt2_tok, monkeypatch):
    from coachhook_plugin.bench import evaluation
    from conftest import build_tiny

    model = build_tiny("gpt2", init_range=0.5)  # large weights: argmax tokens differ from prompt to prompt
    words = ["Paris", "Rome", "Berlin blue", "Oslo", "Lima town"]
    records = [{"index": i, "prompt": f"The city number {i} is", "target_new": w,
                "rephrase_prompt": f"City {i} is called", "locality_prompt": f"The sky over {w} is",
                "locality_ground_truth": "blue sky"} for i, w in enumerate(words)]
    ev = evaluation.Evaluator(batch_size=2, generative=True, max_new_tokens=2)
    ev.take_reference(model, gpt2_tok, records)
    seen = []

    def progress(chunks, **kw):
        seen.append(([[r["index"] for r in c] for c in chunks], kw["desc"]))
        return chunks

    monkeypatch.setattr(evaluation, "SCORE_CHUNK_BATCHES", 1)
    chunked = ev.score(model, gpt2_tok, records, progress=progress, desc="M scoring after 5 edits")
    assert seen == [([[0, 1], [2, 3], [4]], "M scoring after 5 edits (5 records, 2 per step)")]
    monkeypatch.setattr(evaluation, "SCORE_CHUNK_BATCHES", 100)
    whole = ev.score(model, gpt2_tok, records)
    assert chunked == whole and [r["index"] for r in whole] == [0, 1, 2, 3, 4]
    assert len({r["target_prob"] for r in whole}) == 5  # five records scored, not one repeated
