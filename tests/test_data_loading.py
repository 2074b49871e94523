"""One reader of EasyEdit's CounterFact and ZsRE files: `coachhook edit` (edit_requests.load_requests) and the
bench (bench.data.load_records) see the same requests; the bench only filters, samples and strips ZsRE's prefix."""
import json

import pytest

from coachhook_plugin.bench.data import DataError, load_records, run_records
from coachhook_plugin.edit_requests import RequestError, load_requests
from conftest import shared_path

KEYS = ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
        "locality_ground_truth", "case_id")


@pytest.mark.parametrize("parts", [("counterfact", "counterfact-edit.json"), ("zsre", "zsre_mend_eval-1200.json")])
def test_both_loaders_read_the_same_requests(parts):
    path = shared_path("data", *parts)
    plain = load_requests(path, 40)
    bench, skipped = load_records(path, 30, strip_locality_prefix="")
    by_index = {r["index"]: r for r in bench}
    assert len(bench) == 30
    for i, rec in by_index.items():
        assert {k: rec[k] for k in KEYS} == {k: plain[i][k] for k in KEYS}
    assert {s["index"] for s in skipped} | set(by_index) == set(range(max(by_index) + 1))


def test_zsre_prefix_and_fallbacks(tmp_path):
    rec = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "alt": "Oxford",
           "answers": [], "pred": "Trinity College", "rephrase": "Which university did Watts Humphrey attend?",
           "loc": "nq question: who sang the song", "loc_ans": "Elvis"}
    path = tmp_path / "z.json"
    path.write_text(json.dumps([rec, dict(rec, src="Where did Watts Humphrey study?", alt="Yale")]))
    plain = load_requests(path)
    assert plain[0]["ground_truth"] == "Trinity College"  # empty answers: the file's prediction
    assert plain[0]["locality_prompt"] == "nq question: who sang the song"  # coachhook edit keeps the file's text
    recs, _ = load_records(path, 2)
    assert recs[0]["locality_prompt"] == "who sang the song" and recs[1]["case_id"] == 1


def test_a_record_missing_a_field_is_skipped_by_the_bench_and_named_by_validation(tmp_path):
    good = {"case_id": 7, "prompt": "The capital of Zorbia is", "subject": "Zorbia", "target_new": "Paris",
            "ground_truth": "Rome", "rephrase_prompt": "Zorbia's capital is", "locality_prompt": "The sky is",
            "locality_ground_truth": "blue"}
    broken = {k: v for k, v in good.items() if k != "rephrase_prompt"} | {"case_id": 8}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([broken, good]))
    recs, skipped = load_records(path, 1)
    assert [r["case_id"] for r in recs] == [7]
    assert skipped == [{"index": 0, "reason": "empty or missing rephrase_prompt"}]
    assert load_requests(path)[0]["rephrase_prompt"] is None
    path.write_text(json.dumps([good, {"src": "x", "alt": "y"}]))
    with pytest.raises(DataError, match="record 1 is not in the counterfact format"):
        load_records(path, 2)
    path.write_text(json.dumps([{"question": "?"}]))
    with pytest.raises(RequestError, match="expected CounterFact's"):
        load_requests(path)


def test_run_records_gives_back_a_runs_records_in_order_and_refuses_another_file(tmp_path):
    good = {"prompt": "The capital of Zorbia is", "subject": "Zorbia", "target_new": "Paris",
            "ground_truth": "Rome", "rephrase_prompt": "Zorbia's capital is", "locality_prompt": "The sky is",
            "locality_ground_truth": "blue"}
    same = dict(good, target_new="Rome")  # target equals the old answer: skipped by the bench
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([dict(good, case_id=0), dict(same, case_id=1), dict(good, case_id=2,
                                prompt="The capital city of Zorbia is")]))
    config = {"data": str(path), "record_indices": [0, 2]}
    assert [r["case_id"] for r in run_records(config)] == [0, 2]
    with pytest.raises(DataError, match="not the ones this run edited"):
        run_records(dict(config, record_indices=[0, 1]))
