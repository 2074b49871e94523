"""examples/conflicting_edits.py: records that give one subject different new answers, and the latest of them."""
import json

from conftest import load_example


def record(index, subject, target):
    return {"prompt": f"Who designed {subject}? ({index})", "subject": subject, "target_new": target, "ground_truth": "Nobody",
            "rephrase_prompt": f"Who was the architect of {subject}?", "locality_prompt": "Who sang Thriller?",
            "locality_ground_truth": "Michael Jackson", "index": index}


def test_parts_follow_the_edit_order_and_agreeing_repeats_are_not_a_conflict():
    parts = load_example("conflicting_edits").conflict_parts
    records = [record(11, "Toodyay", "Woods Bagot"), record(3, "Eiffel", "Gustave"),
               record(14, "Toodyay", "Wong Tung"), record(4, "Eiffel", "Gustave "), record(2, "Toodyay", "Kohn")]
    assert parts(records) == {11: "superseded", 14: "superseded", 2: "latest", 3: "single", 4: "single"}


def test_the_script_splits_each_methods_final_scores(tmp_path, capsys):
    data = [record(i, s, t) for i, (s, t) in enumerate([("A", "x"), ("B", "y"), ("A", "z"), ("C", "w")])]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([{k: v for k, v in r.items() if k != "index"} for r in data]))
    (tmp_path / "results.json").write_text(json.dumps(
        {"config": {"data": str(path), "record_indices": [0, 1, 2, 3], "batch_size": 2}}))
    scores = [1.0, 0.5, 0.0, 0.25]  # reliability per record; generality and locality 1
    final = [{"index": i, "reliability": s, "generality": 1.0, "locality": 1.0} for i, s in enumerate(scores)]
    (tmp_path / "per_record.json").write_text(json.dumps({"M": [{"edits": 4, "records": final}]}))
    load_example("conflicting_edits").main([str(tmp_path / "per_record.json")])
    out = capsys.readouterr().out
    assert "2 in 1 subjects edited with different answers, 0 of these subjects within one batch of 2" in out
    rows = {line.split(" | ")[1]: line.split(" | ")[2:4] for line in out.splitlines() if line.startswith("| M |")}
    assert rows == {"all": ["4", "43.75"], "single": ["2", "37.50"], "latest": ["1", "0.00"],
                    "superseded": ["1", "100.00"], "latest, one batch": ["0", "nan"],
                    "latest, across batches": ["1", "0.00"], "superseded, one batch": ["0", "nan"],
                    "superseded, across batches": ["1", "100.00"]}
