"""Locality split by whether the neighbourhood prompt asks for a fact that the same run edited.

    python examples/locality_edited_facts.py RUN/per_record.json      # RUN: a `coachhook bench` out= folder

Over many edits CounterFact's neighbourhood prompts (another subject, the same relation) start to name subjects
that other records of the run edit: record 343 edits "Internet Explorer 5 was developed by -> Sega" and probes
"Windows 98, a product of -> Microsoft", while record 288 edits "Windows 98 was a product of -> IBM". An editor
that keeps record 288's edit changes that probe's answer, and locality counts it as a failure. This script reads a
bench run's per_record.json (every method in it, the scores after the last batch), finds the records whose
locality prompt names the subject of another edited record (whole words, case-sensitive) and expects that
record's old answer (so it asks for the edited fact, "Windows 98" and "Microsoft" above), and prints locality on
those records and on the rest. A diagnostic: the bench's locality stays the metric of record.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def edited_facts_asked(record: dict, edited: list) -> list:
    """The other edited records whose subject `record`'s locality prompt names (whole words) and whose old answer
    it expects: the locality prompt asks for a fact that the run edited."""
    prompt, answer = record["locality_prompt"], record["locality_ground_truth"]
    return [e["subject"] for e in edited
            if e["index"] != record["index"] and e.get("ground_truth") == answer
            and re.search(r"(?<!\w)" + re.escape(e["subject"]) + r"(?!\w)", prompt)]


def mean_locality(rows) -> float:
    return 100 * sum(r["locality"] for r, _, _ in rows) / len(rows) if rows else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("per_record", help="per_record.json written by `coachhook bench` (or bench.merge)")
    ap.add_argument("--results", default=None, help="its results.json (default: next to per_record.json)")
    ap.add_argument("--show", type=int, default=0, help="print this many records asking an edited fact, per method")
    args = ap.parse_args(argv)

    from coachhook_plugin.bench.data import run_records

    per_record = json.loads(Path(args.per_record).read_text())
    results = json.loads(Path(args.results or Path(args.per_record).with_name("results.json")).read_text())
    config = results["config"]
    by_index = {r["index"]: r for r in run_records(config)}
    print(f"{config['data']}: {len(config['record_indices'])} records")
    print("| method | edits | locality (all) | records asking an edited fact | their locality | other records | "
          "their locality |")
    print("|---|---|---|---|---|---|---|")
    for method, curve in per_record.items():
        final = curve[-1]
        edited = [by_index[r["index"]] for r in final["records"]]
        named, rest = [], []
        for r in final["records"]:
            rec = by_index[r["index"]]
            hit = edited_facts_asked(rec, edited)
            (named if hit else rest).append((r, rec, hit))

        print(f"| {method} | {final['edits']} | {mean_locality(named + rest):.2f} | {len(named)} | "
              f"{mean_locality(named):.1f} | {len(rest)} | {mean_locality(rest):.2f} |")
        for r, rec, hit in named[:args.show]:
            print(f"    {rec['index']}: locality {r['locality']:.2f}  {rec['locality_prompt']!r} "
                  f"asks the edited fact of {hit}")


if __name__ == "__main__":
    main()
