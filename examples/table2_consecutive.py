"""Paper Table 2 / Fig. 4 setting: consecutive batch editing (batches of 10, never rolled back), every edit
scored after the last batch and, at checkpoints, all edits so far on the model state at that checkpoint —
CoachHooK, its ablation without hook layers, and EasyEdit's baselines, through `coachhook bench`.

    python examples/table2_consecutive.py --model smollm2-135m --data counterfact --num-edits 200   # CPU, here
    python examples/table2_consecutive.py --model smollm2-135m --data zsre --num-edits 200
    python examples/table2_consecutive.py --model gpt2-xl --data counterfact --num-edits 1000 --device 0   # GPU
    python examples/table2_consecutive.py --model gpt-j-6B --data zsre --num-edits 1000 --device 0

Extra Hydra overrides go after `--` (e.g. `-- protocol.checkpoint_every=100 eval.backend=easyedit`).
"""
from __future__ import annotations

import argparse
import sys

METHODS = "CoachHooK,CoachHooK-noHK,MEMIT,ROME,FT-L,FT-M,LoRA,GRACE,AlphaEdit"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gpt2-xl", "gpt-j-6B"])
    ap.add_argument("--data", default="counterfact", choices=["counterfact", "zsre"])
    ap.add_argument("--num-edits", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--checkpoint-every", type=int, default=None, help="default: num_edits / 5")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--device", default=None, help="e.g. 0 for cuda:0 (default: each hparams file's)")
    ap.add_argument("--out", default=None)
    args, extra = ap.parse_known_args(argv)
    from coachhook_plugin.bench import main as bench

    every = args.checkpoint_every or max(args.batch_size, args.num_edits // 5)
    overrides = [f"model={args.model}", f"data={args.data}", "protocol=consecutive",
                 f"num_edits={args.num_edits}", f"batch_size={args.batch_size}", f"methods=[{args.methods}]",
                 f"protocol.checkpoint_every={every}",
                 f"out={args.out or f'results/table2-{args.model}-{args.data}'}"]
    if args.device is not None:
        overrides.append(f"device={args.device}")
    return bench(overrides + [e for e in extra if e != "--"])


if __name__ == "__main__":
    sys.exit(main())
