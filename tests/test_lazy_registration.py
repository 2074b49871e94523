"""Registration is lazy: ``import coachhook_plugin`` does not import EasyEdit (seconds), ``import easyeditor`` after
it registers CoachHooK, with the multimodal import guard in place, and an EasyEdit imported first is registered
with at once. Each case in a fresh interpreter: the order of imports is what is tested."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.easyedit  # also run against GitHub EasyEdit by `make test-github`


def _run(script: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_import_and_help_do_not_import_easyeditor():
    out = _run("""
        import sys
        import coachhook_plugin
        assert "easyeditor" not in sys.modules, "import coachhook_plugin imported EasyEdit"
        from coachhook_plugin.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
        print("easyeditor imported:", "easyeditor" in sys.modules)
    """)
    assert "easyeditor imported: False" in out


def test_importing_easyeditor_afterwards_registers_through_the_guard(ee):
    out = _run("""
        import sys
        import coachhook_plugin
        from coachhook_plugin.easyedit import import_hook, imports, registry
        import easyeditor  # a plain import: no import_easyeditor()
        from easyeditor.util.alg_dict import ALG_DICT
        assert registry.is_registered("CoachHooK") and "CoachHooK" in ALG_DICT
        assert import_hook._HOOK not in sys.meta_path  # done: the hook stepped aside
        assert not any(isinstance(f, imports._EasyEditImportGuard) for f in sys.meta_path)  # the guard is off again
        assert type(easyeditor.__loader__).__name__ != "_CallbacksAfterExec"
        print("stood in:", sorted(imports.STOOD_IN))
    """)
    assert "stood in:" in out


def test_easyeditor_imported_first_is_registered_with_at_once(ee):
    """With easyeditor already imported, the callback (the registration) runs at once, not at some later import."""
    from coachhook_plugin.easyedit import import_hook, registry

    calls = []
    import_hook.when_easyeditor_imported(lambda: calls.append(registry.is_registered("CoachHooK")))
    assert calls == [True] and import_hook._HOOK not in sys.meta_path


def test_registration_precedes_any_editor():
    """``from easyeditor import BaseEditor`` after the plugin: the class is patched and "CoachHooK" known."""
    _run("""
        import coachhook_plugin
        from easyeditor import BaseEditor
        from easyeditor.util.alg_dict import ALG_DICT
        assert getattr(BaseEditor.__init__, "__coachhook_patch__", False) and "CoachHooK" in ALG_DICT
    """)
