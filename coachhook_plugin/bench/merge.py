"""Merge the results of bench runs that each ran some methods (one method per SLURM job, or a run cut into
pieces) into one results.json / results.md / plots — only when they ran the same experiment.

    python -m coachhook_plugin.bench.merge runs/cf-CoachHooK runs/cf-MEMIT ... --out runs/cf-all

Two runs of one method with different hparams (an earlier default beside the current one) share a table once one
of them is renamed: `--rename runs/cf-CoachHooK-old CoachHooK "CoachHooK (earlier default)"`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Sequence, Tuple

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


def rename_method(run: Dict, old: str, new: str) -> None:
    """Give one run's method a new name (the table's row label); its scores and hparams stay as measured."""
    methods = run["methods"]
    if old not in methods:
        raise MergeError(f"cannot rename {old!r}: that run has only {sorted(methods)}")
    if new in methods:
        raise MergeError(f"cannot rename {old!r} to {new!r}: that run already has a method {new!r}")
    run["methods"] = {(new if k == old else k): ({**v, "label": new} if k == old else v) for k, v in methods.items()}


def merge_dirs(dirs: Sequence[Path], out: Path, renames: Sequence[Tuple[str, str, str]] = ()) -> Dict:
    """renames: (run folder, method, new name); the folder must be one of `dirs`."""
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    folders = [Path(d).resolve() for d in dirs]
    for folder, old, new in renames:
        where = Path(folder).resolve()
        if where not in folders:
            raise MergeError(f"--rename names {folder!r}, which is not one of the runs being merged")
        rename_method(runs[folders.index(where)], old, new)
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
    ap.add_argument("--rename", nargs=3, action="append", default=[], metavar=("RUN", "METHOD", "NEW_NAME"),
                    help="rename METHOD of the run folder RUN in the merged table (repeatable)")
    args = ap.parse_args(argv)
    try:
        merge_dirs([Path(d) for d in args.runs], Path(args.out), [tuple(r) for r in args.rename])
    except MergeError as exc:
        print(f"merge: {exc}")
        return 2
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
