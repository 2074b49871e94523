"""EasyEdit's example-script pattern (`examples/run_zsre_llama2.py` and its siblings) for any registered method,
CoachHooK included: edit `--ds_size` records of a ZsRE (MEND format) or CounterFact file through `BaseEditor.edit`,
then score every record with EasyEdit's own `compute_edit_quality` on the state after the last edit.

    python examples/run_easyedit.py --editing_method CoachHooK --hparams_dir hparams/CoachHooK/smollm2-135m.yaml \
        --data_dir ../shared/data/zsre/zsre_mend_eval-1200.json --ds_size 10 --sequential_edit
    python examples/run_easyedit.py --editing_method MEMIT --hparams_dir hparams/MEMIT/smollm2-135m.yaml \
        --data_dir ../shared/data/zsre/zsre_mend_eval-1200.json --ds_size 10 --sequential_edit

Works with PyPI `easyeditor` and with a GitHub EasyEdit checkout first on PYTHONPATH. `--sequential_edit` keeps
every edit (consecutive editing); without it each edit is rolled back after EasyEdit scores it (GitHub EasyEdit's
default; on PyPI EasyEdit, `keep_original_weight=True`). Statistics for λ·E[kkᵀ] are computed from local text first
when missing (`--corpus`), so nothing is downloaded. To run CoachHooK from EasyEdit's own scripts instead, add
`import coachhook_plugin` before `from easyeditor import ...` and one branch to their if/elif chain:
`elif args.editing_method == 'CoachHooK': editing_hparams = coachhook_plugin.CoachHooKHyperParams`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COACHHOOK_SHARED", REPO.parent / "shared"))


def ensure_statistics(editor, hp, corpus: Path) -> None:
    """λ·E[kkᵀ] files in EasyEdit's format, from local text, for methods that read them (MEMIT family, CoachHooK)."""
    if not getattr(hp, "mom2_adjustment", False) or not hasattr(hp, "mom2_n_samples"):
        return
    from coachhook_plugin.stats import ensure_stats, read_corpus

    ensure_stats(editor.model, editor.tok, hp, read_corpus(corpus, max_texts=hp.mom2_n_samples))


def load_hparams(editing_method: str, path):
    """The method's hparams: the plugin registry's class (CoachHooK, ...), else the installed EasyEdit's class for
    `editing_method` through the plugin's loader (the shipped yamls load with either EasyEdit's classes) — what
    EasyEdit's scripts spell out in their if/elif chain."""
    from coachhook_plugin.easyedit import import_easyeditor, registry
    from coachhook_plugin.easyedit.hparams_files import load_easyedit_hparams

    import_easyeditor()  # first: the plugin registers its methods when EasyEdit is imported
    cls = registry.hparams_class(editing_method)
    if cls is not None:
        return cls.from_hparams(str(path))
    return load_easyedit_hparams(path, alg_name=editing_method)


def _record(r):
    """An EasyEdit evaluation record for `compute_edit_quality`."""
    return {"prompt": r["prompt"], "target_new": r["target_new"], "ground_truth": r["ground_truth"],
            "rephrase_prompt": r["rephrase_prompt"],
            "locality": {"neighborhood": {"prompt": r["locality_prompt"], "ground_truth": r["locality_ground_truth"]}}}


def _mean(values):
    values = [sum(v) / len(v) if isinstance(v, (list, tuple)) else float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def run(editing_method, hparams_dir, data_dir, ds_size=10, sequential_edit=False, corpus=None, metrics_save_dir=None):
    import coachhook_plugin  # noqa: F401  (CoachHooK and the plugin's fixes registered when EasyEdit is imported)
    from coachhook_plugin.easyedit import to_builtin
    from coachhook_plugin.edit_requests import load_requests
    from easyeditor import BaseEditor
    from easyeditor.evaluate import compute_edit_quality

    hp = load_hparams(editing_method, hparams_dir)
    records = load_requests(data_dir, ds_size)
    editor = BaseEditor.from_hparams(hp)
    ensure_statistics(editor, hp, Path(corpus or SHARED / "data" / "corpus" / "wikitext-2-raw-test.txt"))

    def score():
        return [compute_edit_quality(editor.model, editor.model_name, hp, editor.tok, _record(r), hp.device)
                for r in records]

    pre = score()
    accepted = inspect.signature(editor.edit).parameters
    mode = {}
    if "sequential_edit" in accepted:  # GitHub EasyEdit
        mode["sequential_edit"] = sequential_edit
    elif not sequential_edit:  # PyPI EasyEdit: single-round is asked for by keeping the original weights
        mode["keep_original_weight"] = True
    metrics, _, _ = editor.edit(prompts=[r["prompt"] for r in records], target_new=[r["target_new"] for r in records],
                                ground_truth=[r["ground_truth"] for r in records],
                                rephrase_prompts=[r["rephrase_prompt"] for r in records],
                                subject=[r["subject"] for r in records], **mode)
    post = score()
    agree = [_mean([[float(x == y) for x, y in zip(a["locality"]["neighborhood_output"],
                                                   b["locality"]["neighborhood_output"])]])
             for a, b in zip(post, pre)]
    summary = {"method": editing_method, "hparams": str(hparams_dir), "data": str(data_dir), "ds_size": len(records),
               "sequential_edit": sequential_edit,
               "pre": {"rewrite_acc": _mean(p["rewrite_acc"] for p in pre),
                       "rephrase_acc": _mean(p["rephrase_acc"] for p in pre)},
               "after_all_edits": {"rewrite_acc": _mean(p["rewrite_acc"] for p in post),
                                   "rephrase_acc": _mean(p["rephrase_acc"] for p in post),
                                   "locality": _mean(agree)}}
    if metrics_save_dir:
        out = Path(metrics_save_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{editing_method}_results.json").write_text(json.dumps(to_builtin(metrics), indent=1))
        (out / f"{editing_method}_summary.json").write_text(json.dumps(to_builtin(summary), indent=1))
    return to_builtin(summary)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editing_method", required=True, help="CoachHooK, MEMIT, ROME, FT, ... (any registered method)")
    ap.add_argument("--hparams_dir", required=True, help="the method's hparams yaml")
    ap.add_argument("--data_dir", required=True, help="ZsRE (MEND format) or CounterFact JSON file")
    ap.add_argument("--ds_size", type=int, default=10, help="first N records")
    ap.add_argument("--sequential_edit", action="store_true", help="keep every edit (consecutive editing)")
    ap.add_argument("--corpus", default=None, help="text for missing statistics (default: ../shared WikiText-2)")
    ap.add_argument("--metrics_save_dir", default=None, help="write EasyEdit's metrics and the summary here")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.editing_method, args.hparams_dir, args.data_dir, args.ds_size, args.sequential_edit,
                         args.corpus, args.metrics_save_dir), indent=2))


if __name__ == "__main__":
    sys.exit(main())
