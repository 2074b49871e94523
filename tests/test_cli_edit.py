"""`coachhook edit`: consecutive batches from a data file, atomic checkpoints, SIGKILL and --resume."""
import json
import signal

import pytest
import yaml

from coachhook_plugin import cli
from coachhook_plugin.edit_requests import load_requests
from coachhook_plugin.persistence import read_coachhook
from conftest import build_tiny, same_state, shared_path, start_edit_killed_at_first_checkpoint, tiny_hparams

NAMES = ["Zorbia", "Kelvar", "Ostrel", "Quenby", "Marlo Vance", "Tessaly", "Brindle", "Corvath", "Ulmsey",
         "Pemberly Shaw", "Drask", "Yolanda Fitch"]
TARGETS = ["Paris", "Peru", "French", "pilot", "Tokyo", "violin"]


def _records():
    return [dict(case_id=100 + i, prompt=f"The home country of {name} is", subject=name,
                 target_new=TARGETS[i % len(TARGETS)], ground_truth="Nowhere",
                 rephrase_prompt=f"{name} comes from", locality_prompt="The sky is",
                 locality_ground_truth="blue") for i, name in enumerate(NAMES)]


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory, gpt2_tok):
    root = tmp_path_factory.mktemp("edit_run")
    model_dir = root / "tiny-gpt2"
    build_tiny("gpt2").save_pretrained(model_dir)
    gpt2_tok.save_pretrained(model_dir)
    hp = tiny_hparams("gpt2", model_name=str(model_dir), mom2_update_weight=1e-2, v_num_grad_steps=6,
                      batch_size=2).to_dict()
    (root / "hp.yaml").write_text(yaml.safe_dump(hp))
    (root / "data.json").write_text(json.dumps(_records()))
    return root


def _args(root, out, *extra):
    return ["edit", "--hparams", str(root / "hp.yaml"), "--data", str(root / "data.json"), "--out", str(out),
            *extra]


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(run_setup, capsys):
    root = run_setup
    total = len(NAMES) // 2
    out = root / "killed"
    proc, watcher, killed = start_edit_killed_at_first_checkpoint(_args(root, out), out, cwd=root)
    try:
        assert cli.main(_args(root, root / "full")) == 0  # meanwhile, the reference: one uninterrupted run
        watcher.join(timeout=240)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and "progress" in killed
    progress = json.loads((out / "progress.json").read_text())
    assert 1 <= progress["batches_done"] < total, "the run finished before it could be killed"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind as state
    full_header, full = read_coachhook(root / "full" / "state.safetensors")
    assert full["step"] == total
    capsys.readouterr()

    # resume: a new run of the command, from what is on disk only (model from its folder, state, progress)
    assert cli.main(_args(root, out, "--resume")) == 0
    assert f"resuming {out}: {progress['batches_done']}/{total} batches done" in capsys.readouterr().out
    header, state = read_coachhook(out / "state.safetensors")
    assert same_state(state, full) and state["step"] == total
    final = json.loads((out / "progress.json").read_text())
    ids = [i for batch in final["done_ids"] for i in batch]
    assert ids == [r["case_id"] for r in _records()] and len(set(ids)) == len(ids)  # none lost, none twice
    assert final["complete"] and final["batches_done"] == total == final["step"]
    assert header["extra"]["edit_run"]["done_ids"] == final["done_ids"]

    # resuming a finished run applies nothing
    assert cli.main(_args(root, out, "--resume")) == 0
    assert "already done" in capsys.readouterr().out
    assert same_state(read_coachhook(out / "state.safetensors")[1], full)


def test_edit_refuses_to_overwrite_or_resume_a_different_run(run_setup, capsys):
    root = run_setup
    out = root / "short"
    assert cli.main(_args(root, out, "--num-edits", "2")) == 0
    assert cli.main(_args(root, out, "--num-edits", "2")) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main(_args(root, out, "--num-edits", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert "num_edits" in err and "same data file" in err
    changed = yaml.safe_load((root / "hp.yaml").read_text())
    changed["mom2_update_weight"] = 5.0
    (root / "hp2.yaml").write_text(yaml.safe_dump(changed))
    args = _args(root, out, "--num-edits", "2", "--resume")
    args[2] = str(root / "hp2.yaml")
    assert cli.main(args) == 2
    assert "hparams mom2_update_weight differ" in capsys.readouterr().err
    assert read_coachhook(out / "state.safetensors")[1]["step"] == 1


def test_edit_checks_every_batch_before_the_first_edit(run_setup, tmp_path, capsys):
    recs = _records()[:4]
    recs[3] = dict(recs[3], subject="Nobody")  # batch 2 is bad
    (tmp_path / "bad.json").write_text(json.dumps(recs))
    args = _args(run_setup, tmp_path / "out")
    args[4] = str(tmp_path / "bad.json")
    assert cli.main(args) == 2
    assert "batch 2 (case_ids [102, 103])" in capsys.readouterr().err
    assert not (tmp_path / "out" / "state.safetensors").exists()


def test_load_requests_reads_counterfact_and_zsre():
    path = shared_path("data", "counterfact", "counterfact-edit.json")
    cf = load_requests(path, num_edits=3)
    assert [r["case_id"] for r in cf] == [r["case_id"] for r in json.loads(path.read_text())[:3]]
    assert cf[0]["prompt"] == "The mother tongue of Danielle Darrieux is" and cf[0]["target_new"] == "English"
    zs = load_requests(shared_path("data", "zsre", "zsre_mend_train-1k.json"), num_edits=2)
    assert zs[0] == dict(prompt="What is the product made by UniFirst?", subject="UniFirst",
                         target_new="unmanned aircraft", ground_truth="uniform",
                         rephrase_prompt="What will be the product of UniFirst?",
                         locality_prompt="nq question: john goodman's character in the big lebowski",
                         locality_ground_truth="Walter Sobchak", case_id=0)
