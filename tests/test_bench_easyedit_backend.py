"""`eval.backend=easyedit`: the bench scores with EasyEdit's own `compute_edit_quality`, one record at a time, and
gets the numbers of its default batched evaluator (same metric definitions)."""
import json

import pytest

from test_bench import bench_args

pytestmark = pytest.mark.easyedit


def test_easyedit_backend_matches_the_batched_evaluator(tmp_path):
    from coachhook_plugin.cli import main

    finals = {}
    for backend in ("plugin", "easyedit"):
        out = tmp_path / backend
        (tmp_path / f"in-{backend}").mkdir()
        assert main(["bench", *bench_args(tmp_path / f"in-{backend}", ["MEMIT"], out,
                                          extra=[f"eval.backend={backend}", "eval.generative=false"])]) == 0
        method = json.loads((out / "results.json").read_text())["methods"]["MEMIT"]
        assert "error" not in method, method.get("error")
        finals[backend] = method["final"]
    for key in ("reliability", "generality", "locality"):
        assert finals["easyedit"][key] == pytest.approx(finals["plugin"][key], abs=1e-6), key
    assert finals["plugin"]["reliability"] > 0.5  # the edits took: the comparison is not between two zeros
