"""Evidence for the default model's settings: CoachHooK on SmolLM2-135M over CounterFact, one setting per run.

    python examples/smollm2_settings_sweep.py --layers 3,4,5,6,7 --templates memit --n 30
    python examples/smollm2_settings_sweep.py --layers 4,5,6,7,8 --templates none --steps 20 --lr 0.5

Each run edits the first N CounterFact records in consecutive batches, then scores all of them on the final
state (teacher-forced reliability / generality, locality against the pre-edit model, generative reliability
with the KV cache) and prints one JSON line (also appended to --out). Statistics come from the local
WikiText-2 text (computed first when missing; the time is reported separately).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COACHHOOK_SHARED", REPO.parent / "shared"))

# "none": no context prefixes; "short": three fixed neutral prefixes (the demo's setting); "memit": MEMIT's
# sampled templates ("{}" + five 10-token generations from the model, seeded)
TEMPLATE_SETS = {"none": ["{}"], "short": ["{}", "In short, {}", "As is known, {}", "Fact: {}"], "memit": None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hparams", default=str(REPO / "hparams/CoachHooK/smollm2-135m.yaml"))
    ap.add_argument("--layers", default=None, help="comma-separated edit layers (default: the yaml's)")
    ap.add_argument("--lam", type=float, default=None, help="λ (mom2_update_weight)")
    ap.add_argument("--templates", choices=sorted(TEMPLATE_SETS), default=None)
    ap.add_argument("--steps", type=int, default=None, help="v_num_grad_steps")
    ap.add_argument("--lr", type=float, default=None, help="v_lr")
    ap.add_argument("--n-samples", type=int, default=None, help="statistics budget (paragraphs)")
    ap.add_argument("--self-sampled", action="store_true", help="statistics from the model's own text")
    ap.add_argument("--gate", default=None)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--offset", type=int, default=0, help="skip this many records first")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--data", default=str(SHARED / "data/counterfact/counterfact-edit.json"))
    ap.add_argument("--out", default=None, help="append the JSON line to this file")
    args = ap.parse_args(argv)

    import torch
    from coachhook_plugin import CoachHooKHyperParams, apply_coachhook_to_model, get_state
    from coachhook_plugin.evaluate import evaluate_records, locality_reference
    from coachhook_plugin.models import load_model_and_tokenizer
    from coachhook_plugin.stats import ensure_stats, read_corpus, sample_texts

    hp = CoachHooKHyperParams.from_hparams(args.hparams)
    if args.layers:
        hp.layers = [int(x) for x in args.layers.split(",")]
    for field, value in (("mom2_update_weight", args.lam), ("v_num_grad_steps", args.steps), ("v_lr", args.lr),
                         ("mom2_n_samples", args.n_samples), ("gate", args.gate)):
        if value is not None:
            setattr(hp, field, value)
    if args.templates is not None:
        hp.context_templates = TEMPLATE_SETS[args.templates]
    model, tok = load_model_and_tokenizer(hp.model_name)
    t0 = time.time()
    if args.self_sampled:
        hp.mom2_dataset = "self-sampled"
        texts = sample_texts(model, tok, hp.mom2_n_samples, seed=0)
    else:
        texts = read_corpus(SHARED / "data/corpus/wikitext-2-raw-test.txt", max_texts=hp.mom2_n_samples)
    ensure_stats(model, tok, hp, texts)
    stats_s = time.time() - t0

    records = json.loads(Path(args.data).read_text())[args.offset:args.offset + args.n]
    loc_ref = locality_reference(model, tok, records)
    pre = evaluate_records(model, tok, records, loc_ref)
    t0 = time.time()
    for s in range(0, len(records), args.batch):
        batch = [dict(prompt=r["prompt"], subject=r["subject"], target_new=r["target_new"],
                      ground_truth=r.get("ground_truth")) for r in records[s:s + args.batch]]
        apply_coachhook_to_model(model, tok, batch, hp)
    edit_s = time.time() - t0
    post = evaluate_records(model, tok, records, loc_ref, generative=True)
    state = get_state(model)
    line = {"layers": hp.layers, "lam": hp.mom2_update_weight, "templates": args.templates or "yaml",
            "steps": hp.v_num_grad_steps, "lr": hp.v_lr, "n_samples": hp.mom2_n_samples,
            "stats": hp.mom2_dataset, "gate": hp.gate, "n": len(records), "batch": args.batch,
            "pre": pre, "post": post, "seconds_per_edit": edit_s / len(records), "stats_seconds": stats_s,
            "alpha": {str(l): h.alpha for l, h in state.layers.items()}, "threads": torch.get_num_threads()}
    print(json.dumps(line))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
