"""EasyEdit integration: compatibility layer (:mod:`.compat`) and method registration (:mod:`.registry`).

Typical use::

    from coachhook_plugin.easyedit import register, make_editor, to_builtin
    register()                                    # CoachHooK in EasyEdit's tables + BaseEditor fixes
    editor = make_editor(hparams)                 # or BaseEditor.from_hparams(hparams)
    metrics, model, _ = editor.edit(prompts=..., target_new=..., subject=...)
    json.dump(to_builtin(metrics), fh)

Importing this package does not import easyeditor; the functions do, on first use.
"""
from .compat import (MissingMultimodalDependency, block_output_compat, consecutive_edit_kwargs, cpu_fallback,
                     editing_context, import_easyeditor, install, load_model_and_tokenizer, lora_compat, make_editor,
                     restore_weights, set_log_dir, single_round_edit_kwargs, to_builtin, uninstall)
from .registry import RestoreHandle, register, register_method, unregister_method

__all__ = [
    "MissingMultimodalDependency", "RestoreHandle", "block_output_compat", "consecutive_edit_kwargs",
    "cpu_fallback", "editing_context", "single_round_edit_kwargs",
    "import_easyeditor", "install", "load_model_and_tokenizer", "lora_compat", "make_editor", "register",
    "register_method", "restore_weights", "set_log_dir", "to_builtin", "uninstall", "unregister_method",
]
