"""How near an edited key is each prompt's key? The measurement behind `key_scope_cosine` (docs/method.md).

    python examples/key_scope_diagnostic.py --n 100

Edits the first N usable records of the CounterFact TRAIN split in consecutive batches of 10 with the shipped
SmolLM2 hparams (the key scope switched off unless --key-scope-cosine is given), then runs each record's edit
prompt, paraphrase and neighbourhood (locality) prompt one at a time and prints, per layer and kind of prompt:
quantiles of the max over the prompt's tokens (the first left out) of the cosine to the layer's stored edited keys,
the share of prompts on which the gate swaps any token, and the share on which it swaps a token whose cosine
is ≥ each threshold. `--whitened` also prints the cosine in the metric of C⁻¹ (C = E[kkᵀ], the statistics).
"""
from __future__ import annotations

import argparse
import os
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COACHHOOK_SHARED", REPO.parent / "shared"))
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hparams", default=str(REPO / "hparams/CoachHooK/smollm2-135m.yaml"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--gate", default=None)
    ap.add_argument("--key-scope-cosine", type=float, default=None)
    ap.add_argument("--whitened", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from coachhook_plugin import CoachHooKHyperParams, apply_coachhook_to_model, get_state
    from coachhook_plugin.bench.data import load_records
    from coachhook_plugin.models import get_module, load_model_and_tokenizer
    from coachhook_plugin.stats import ensure_stats, read_corpus

    hp = CoachHooKHyperParams.from_hparams(args.hparams)
    hp.key_scope_cosine = args.key_scope_cosine
    if args.gate:
        hp.gate = args.gate
    model, tok = load_model_and_tokenizer(hp.model_name)
    ensure_stats(model, tok, hp, read_corpus(SHARED / "data/corpus/wikitext-2-raw-test.txt",
                                             max_texts=hp.mom2_n_samples))
    records = load_records(SHARED / "data/counterfact/counterfact-train.json", args.n)[0]
    for s in range(0, len(records), 10):
        apply_coachhook_to_model(model, tok, [dict(prompt=r["prompt"], subject=r["subject"],
                                                   target_new=r["target_new"]) for r in records[s:s + 10]], hp)
    state = get_state(model)

    keys_seen = {}
    for l, h in state.layers.items():  # the input of each hooked down-projection, for the next forward call
        get_module(model, h.module_name).register_forward_pre_hook(
            lambda mod, a, l=l: keys_seen.__setitem__(l, a[0].detach().double().reshape(-1, a[0].shape[-1])))
    stored = {}
    for l, h in state.layers.items():
        keys = h._unit_keys.double() if h._unit_keys is not None else h._keys.double()
        inv = torch.linalg.inv(state.priors[l].double()) if args.whitened else None
        stored[l] = (keys / keys.norm(dim=0, keepdim=True), inv)

    def nearest(l):
        k = keys_seen[l]
        unit, inv = stored[l]
        out = {"cos": ((k / k.norm(dim=1, keepdim=True)) @ unit).max(dim=1).values}
        if inv is not None:
            kw, uw = k @ inv, inv @ unit
            out["whitened"] = ((kw @ unit) / ((kw * k).sum(1).sqrt()[:, None] * (unit * uw).sum(0).sqrt()[None])
                               ).max(dim=1).values
        return out

    kinds = {"edit": [r["prompt"] for r in records], "paraphrase": [r["rephrase_prompt"] for r in records],
             "neighbourhood": [r["locality_prompt"] for r in records]}
    for kind, prompts in kinds.items():
        rows = {l: {"cos": [], "whitened": [], "swap": [], "swap_cos": []} for l in state.layers}
        for p in prompts:
            with torch.no_grad(), ExitStack() as stack:
                dec = {l: stack.enter_context(h.recording_decisions()) for l, h in state.layers.items()}
                model(**tok(p, return_tensors="pt"))
            for l in state.layers:
                near, swap = nearest(l), dec[l][0]["swap"].reshape(-1)
                for name, v in near.items():
                    rows[l][name].append(float(v[1:].max()))
                rows[l]["swap"].append(bool(swap.any()))
                rows[l]["swap_cos"].append(float(near["cos"][swap].max()) if swap.any() else -1.0)
        print(f"\n{kind} prompts ({len(prompts)})")
        for l, r in rows.items():
            q = lambda v: " ".join(f"{x:.3f}" for x in np.quantile(v, [0.05, 0.5, 0.95]))  # noqa: E731
            line = f"  layer {l}: max cosine q05/median/q95 {q(r['cos'])}"
            if r["whitened"]:
                line += f" | whitened {q(r['whitened'])}"
            line += f" | gate swaps {np.mean(r['swap']):.2f} | and cosine >= " + " ".join(
                f"{t}: {np.mean([c >= t for c in r['swap_cos']]):.2f}" for t in THRESHOLDS)
            print(line)


if __name__ == "__main__":
    main()
