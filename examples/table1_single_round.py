"""Paper Table 1 setting: single-round batch editing (each batch of 30 edited into the base model, scored,
rolled back), CoachHooK beside EasyEdit's baselines, through `coachhook bench`.

    python examples/table1_single_round.py --model smollm2-135m --data counterfact --num-edits 300   # CPU, here
    python examples/table1_single_round.py --model gpt2-xl --data zsre --num-edits 1000 --device 0    # GPU
    python examples/table1_single_round.py --model gpt-j-6B --data counterfact --num-edits 1000 --device 0

The paper uses λ = 5000 for single-round CoachHooK on GPT-2 XL / GPT-J (15000 consecutive); pass extra Hydra
overrides after `--`, e.g. `-- +method_settings.CoachHooK.overrides.mom2_update_weight=5000`.
"""
from __future__ import annotations

import argparse
import sys

METHODS = "CoachHooK,MEMIT,ROME,FT-L,FT-M,LoRA,GRACE,AlphaEdit"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gpt2-xl", "gpt-j-6B"])
    ap.add_argument("--data", default="counterfact", choices=["counterfact", "zsre"])
    ap.add_argument("--num-edits", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=30)
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--device", default=None, help="e.g. 0 for cuda:0 (default: each hparams file's)")
    ap.add_argument("--out", default=None)
    args, extra = ap.parse_known_args(argv)
    from coachhook_plugin.bench import main as bench

    overrides = [f"model={args.model}", f"data={args.data}", "protocol=single_round",
                 f"num_edits={args.num_edits}", f"batch_size={args.batch_size}", f"methods=[{args.methods}]",
                 f"out={args.out or f'results/table1-{args.model}-{args.data}'}"]
    if args.device is not None:
        overrides.append(f"device={args.device}")
    return bench(overrides + [e for e in extra if e != "--"])


if __name__ == "__main__":
    sys.exit(main())
