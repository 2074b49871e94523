"""Merge the results of bench runs that each ran some methods (one method per SLURM job, or a run cut into
pieces) into one results.json / results.md / plots — only when they ran the same experiment.

    python -m coachhook_plugin.bench.merge runs/cf-CoachHooK runs/cf-MEMIT ... --out runs/cf-all
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Sequence

from .report import markdown_table, plot, write_json

# what must agree for rows to be comparable (everything but the methods themselves)
SAME_EXPERIMENT = ("protocol", "model", "data", "data_format", "num_edits", "batch_size", "checkpoints",
                   "record_indices", "seed", "eval")


class MergeError(ValueError):
    pass


def merge_results(runs: Sequence[Dict]) -> Dict:
    if not runs:
        raise MergeError("nothing to merge")
    first = runs[0]["config"]
    merged = {"config": dict(first), "methods": {}}
    for i, run in enumerate(runs):
        cfg = run["config"]
        for key in SAME_EXPERIMENT:
            if cfg.get(key) != first.get(key):
                raise MergeError(f"run {i} differs from run 0 in {key!r} ({cfg.get(key)!r} vs {first.get(key)!r}); "
                                 f"only runs of the same experiment can share a table")
        for name, entry in run["methods"].items():
            if name in merged["methods"]:
                raise MergeError(f"method {name!r} appears in more than one run; keep one of them")
            merged["methods"][name] = entry
    merged["config"]["methods"] = list(merged["methods"])
    return merged


def merge_dirs(dirs: Sequence[Path], out: Path) -> Dict:
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    merged = merge_results(runs)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", merged)
    (out / "results.md").write_text(markdown_table(merged))
    plot(merged, out)
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="bench output folders (each with results.json)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        merge_dirs([Path(d) for d in args.runs], Path(args.out))
    except MergeError as exc:
        print(f"merge: {exc}")
        return 2
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
