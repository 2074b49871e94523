"""Scores split by whether another record of the same run gives the same subject a different new answer.

    python examples/conflicting_edits.py RUN/per_record.json      # RUN: a `coachhook bench` out= folder

ZsRE's evaluation file asks for the same fact several times with different new answers: records 11, 14, 15 and 17
of zsre_mend_eval-1200.json edit who designed Toodyay Fire Station to Woods Bagot, Wong Tung & Sons, Kohn
Pedersen Fox and Wong Tung & Sons again, each with its own question. In the first 1,000 usable records, 616 share
their subject with another record that gives it a different answer, and 126 of those 164 subjects fall into one
batch of 10. An editor keyed on the subject
(MEMIT, AlphaEdit, CoachHooK) cannot hold contradicting answers to one fact at once, while a memory of the edit
texts (SERAC) answers each question from its own record. This script reads a bench run's per_record.json (every
method in it, the scores after the last batch) and prints the scores of three parts:

* records whose subject no other record of the run gives a different answer (repeats of one answer included);
* of a subject edited more than once with different answers, the last record in the run's order;
* the earlier records of such a subject, superseded by a later edit;

and the last two again by whether the subject's records fall into one batch or several.

A diagnostic: the bench's scores stay the metric of record.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

METRICS = ("reliability", "generality", "locality")
PARTS = ("single", "latest", "superseded")


def conflict_parts(records: list) -> dict:
    """Record index -> "single", "latest" or "superseded", over records in the order they were edited: a subject
    edited with more than one distinct new answer is in conflict, and its last record is the latest."""
    by_subject = defaultdict(list)
    for rec in records:
        by_subject[rec["subject"]].append(rec)
    part = {}
    for group in by_subject.values():
        conflicting = len({rec["target_new"].strip() for rec in group}) > 1
        for position, rec in enumerate(group):
            part[rec["index"]] = ("single" if not conflicting else
                                  "latest" if position == len(group) - 1 else "superseded")
    return part


def mean_scores(rows: list) -> list:
    if not rows:
        return [float("nan")] * (len(METRICS) + 1)
    means = [100 * sum(r[m] for r in rows) / len(rows) for m in METRICS]
    return means + [sum(means) / len(means)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("per_record", help="per_record.json written by `coachhook bench` (or bench.merge)")
    ap.add_argument("--results", default=None, help="its results.json (default: next to per_record.json)")
    args = ap.parse_args(argv)

    from coachhook_plugin.bench.data import run_records

    per_record = json.loads(Path(args.per_record).read_text())
    results = json.loads(Path(args.results or Path(args.per_record).with_name("results.json")).read_text())
    config = results["config"]
    records = run_records(config)
    part = conflict_parts(records)
    batch = config.get("batch_size") or 1
    batch_of = {rec["index"]: position // batch for position, rec in enumerate(records)}
    groups = defaultdict(set)
    for rec in records:
        if part[rec["index"]] != "single":
            groups[rec["subject"]].add(batch_of[rec["index"]])
    # a contradicted subject whose records are all in one batch is solved at once (a compromise); across batches
    # the later batch is written on top of the earlier one
    labels = {}  # record index -> the rows of the table it counts in
    for rec in records:
        own = part[rec["index"]]
        labels[rec["index"]] = {"all", own} if own == "single" else {
            "all", own, f"{own}, {'one batch' if len(groups[rec['subject']]) == 1 else 'across batches'}"}
    print(f"{config['data']}: {len(records)} records; {sum(p != 'single' for p in part.values())} in {len(groups)} "
          f"subjects edited with different answers, {sum(len(b) == 1 for b in groups.values())} of these subjects "
          f"within one batch of {batch}")
    print("| method | part | records | reliability | generality | locality | average |")
    print("|---|---|---|---|---|---|---|")
    names = ["all", *PARTS] + [f"{name}, {w}" for name in PARTS[1:] for w in ("one batch", "across batches")]
    for method, curve in per_record.items():
        final = curve[-1]["records"]
        for name in names:
            rows = [r for r in final if name in labels[r["index"]]]
            print(f"| {method} | {name} | {len(rows)} | " + " | ".join(f"{x:.2f}" for x in mean_scores(rows)) + " |")

if __name__ == "__main__":
    main()
