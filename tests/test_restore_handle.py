"""One restore handle, owned by the registry's adapter; the baselines registered by the bench, not by the import."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.easyedit  # also run against GitHub EasyEdit by `make test-github`

from coachhook_plugin.easyedit import registry


def _counted():
    calls = []
    return calls, (lambda: calls.append(True))


def test_pypi_items_restores_only_when_the_caller_kept_the_original_weights():
    calls, restore = _counted()
    consecutive = registry.as_weights_copy(restore, callable_restore=True, restore_on_items=False)
    assert isinstance(consecutive, dict) and list(consecutive.items()) == [] and calls == []  # PyPI: edit kept
    single_round = registry.as_weights_copy(restore, callable_restore=True, restore_on_items=True)
    assert list(single_round.items()) == [] and calls == [True] and single_round.restored and not single_round
    single_round()  # at most once
    consecutive()  # GitHub EasyEdit calls weights_copy() when it rolls back, whatever was asked
    assert calls == [True, True]


def test_nothing_to_restore_and_tensor_dicts():
    assert registry.as_weights_copy(None, callable_restore=False) == {}
    noop = registry.as_weights_copy(None, callable_restore=True)
    assert isinstance(noop, registry.RestoreHandle) and noop() is None  # GitHub calls it unconditionally
    weights = {"w": object()}
    assert registry.as_weights_copy(weights) is weights  # EasyEdit's own protocol passes through


def test_a_failing_restore_leaves_the_handle_unrestored():
    def stale():
        raise RuntimeError("stale")

    handle = registry.RestoreHandle(stale, restore_on_items=True)
    with pytest.raises(RuntimeError, match="stale"):
        list(handle.items())
    assert not handle.restored


def test_the_adapter_reads_keep_original_weight_by_keyword_or_position():
    calls, restore = _counted()
    dispatch = registry._dispatch_adapter("Nobody", lambda *a, **k: ("model", restore))
    _, kept = dispatch("m", "t", [], None, keep_original_weight=True)
    _, by_position = dispatch("m", "t", [], None, False, False, True)
    _, consecutive = dispatch("m", "t", [], None)
    assert kept.restore_on_items and by_position.restore_on_items and not consecutive.restore_on_items


def test_the_core_returns_a_plain_restore_callable(gpt2_tok):
    from coachhook_plugin import apply_coachhook_to_model, get_state
    from conftest import FACTS, build_tiny, tiny_hparams

    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2)
    _, handle = apply_coachhook_to_model(model, gpt2_tok, [FACTS[0]], hp, progress=None)
    assert callable(handle) and not isinstance(handle, dict) and not hasattr(handle, "items")
    assert get_state(model).step == 1
    handle()
    assert get_state(model).step == 0


def test_import_registers_coachhook_only_and_the_bench_its_baselines(ee):
    script = textwrap.dedent("""
        import coachhook_plugin
        import easyeditor  # registration is lazy: when EasyEdit is imported
        from coachhook_plugin.easyedit import registry
        print(sorted(registry.registered_methods()))
        from coachhook_plugin.bench.baselines import register_baselines
        register_baselines()
        print(sorted(registry.registered_methods()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    after_import, after_bench = out.stdout.strip().splitlines()[-2:]
    assert after_import == "['CoachHooK']"
    assert "FT-M" in after_bench and "CoachHooK-noHK" in after_bench
