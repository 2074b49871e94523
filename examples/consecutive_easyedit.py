"""Consecutive batch editing of CounterFact records through EasyEdit's own BaseEditor, scored with EasyEdit's
own `compute_edit_quality` on the model state *after the last batch* (all edits at once, paper Table 2).

    python examples/consecutive_easyedit.py --hparams hparams/CoachHooK/smollm2-135m.yaml --n 30 --batch 10
    python examples/consecutive_easyedit.py --hparams hparams/MEMIT/smollm2-135m.yaml --n 30 --batch 10

Statistics for λ·E[kkᵀ] are computed from the local WikiText-2 text first when missing (no download).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COACHHOOK_SHARED", REPO.parent / "shared"))


def load_hparams(path):
    import coachhook_plugin  # CoachHooK is registered when easyeditor is imported
    from coachhook_plugin.easyedit import import_easyeditor

    alg = yaml.safe_load(Path(path).read_text())["alg_name"]
    if alg == "CoachHooK":
        return coachhook_plugin.CoachHooKHyperParams.from_hparams(path)
    ee = import_easyeditor()
    return getattr(ee, f"{alg}HyperParams").from_hparams(str(path))


def ensure_statistics(editor, hp, corpus: Path):
    if not getattr(hp, "mom2_adjustment", True) and hp.alg_name == "CoachHooK":
        return
    from coachhook_plugin.stats import ensure_stats, read_corpus

    texts = read_corpus(corpus, max_texts=hp.mom2_n_samples)
    ensure_stats(editor.model, editor.tok, hp, texts)


def run(hparams_path, n=30, batch=10, data=None, corpus=None, out=None):
    import coachhook_plugin  # first: registers CoachHooK and makes `import easyeditor` work on a text-only set-up
    from easyeditor.evaluate import compute_edit_quality
    from coachhook_plugin.easyedit.editor import make_editor
    from coachhook_plugin.easyedit.patches import editing_context
    from coachhook_plugin.easyedit.results import to_builtin

    data = Path(data or SHARED / "data/counterfact/counterfact-edit.json")
    corpus = Path(corpus or SHARED / "data/corpus/wikitext-2-raw-test.txt")
    records = json.loads(data.read_text())[:n]
    hp = load_hparams(hparams_path)
    hp.batch_size = batch
    editor = make_editor(hp)
    ensure_statistics(editor, hp, corpus)

    def lists(recs):
        return dict(prompts=[r["prompt"] for r in recs], target_new=[r["target_new"] for r in recs],
                    ground_truth=[r["ground_truth"] for r in recs], subject=[r["subject"] for r in recs],
                    rephrase_prompts=[r["rephrase_prompt"] for r in recs])

    def locality(recs):
        return {"neighborhood": {"prompt": [r["locality_prompt"] for r in recs],
                                 "ground_truth": [r["locality_ground_truth"] for r in recs]}}

    everything = lists(records)
    subjects = everything.pop("subject")
    requests = editor._prepare_requests(**everything, locality_inputs=locality(records), subject=subjects)

    def score():
        with editing_context():
            return [compute_edit_quality(editor.model, editor.model_name, hp, editor.tok, r, hp.device)
                    for r in requests]

    pre = score()
    start = time.time()
    for s in range(0, n, batch):
        chunk = records[s:s + batch]
        # PyPI batch_edit passes its 5th positional argument on as locality_inputs; GitHub EasyEdit names it
        named = inspect.signature(editor.batch_edit).parameters
        slot = "locality_inputs" if "locality_inputs" in named else "locality_prompts"
        editor.batch_edit(**lists(chunk), **{slot: locality(chunk)})
        print(f"batch {s // batch + 1}/{-(-n // batch)} done, {time.time() - start:.0f} s", file=sys.stderr)
    seconds = time.time() - start
    post = score()

    def mean(key, src):
        return float(np.mean([np.mean(p[key]) for p in src]))

    loc = [float(np.mean(np.equal(a["locality"]["neighborhood_output"], b["locality"]["neighborhood_output"])))
           for a, b in zip(post, pre)]
    result = {"method": hp.alg_name, "hparams": str(hparams_path), "n": n, "batch_size": batch,
              "pre": {"rewrite_acc": mean("rewrite_acc", pre), "rephrase_acc": mean("rephrase_acc", pre)},
              "post": {"rewrite_acc": mean("rewrite_acc", post), "rephrase_acc": mean("rephrase_acc", post),
                       "locality": float(np.mean(loc))},
              "seconds_per_edit": seconds / n}
    state = coachhook_plugin.get_state(editor.model)
    if state is not None:
        result["alpha"] = {str(l): h.alpha for l, h in state.layers.items()}
    result = to_builtin(result)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hparams", required=True)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--data", default=None)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    print(json.dumps(run(args.hparams, args.n, args.batch, args.data, args.corpus, args.out), indent=2))


if __name__ == "__main__":
    main()
