"""EasyEdit integration: method registration (:mod:`.registry`) and the EasyEdit fixes, one module per concern
(:mod:`.imports`, :mod:`.devices`, :mod:`.patches`, :mod:`.logs`, :mod:`.editor`, :mod:`.evaluation`,
:mod:`.edit_kwargs`, :mod:`.results`, :mod:`.hparams_files`, :mod:`.learned_editors`, :mod:`.archives` and
:mod:`.serac_memory` (MEND/SERAC);
:mod:`.compat` re-exports their public names; :mod:`.training` runs EasyEdit's trainer).

Typical use::

    from coachhook_plugin.easyedit import register, make_editor, to_builtin
    register()                                    # CoachHooK in EasyEdit's tables + BaseEditor fixes
    editor = make_editor(hparams)                 # or BaseEditor.from_hparams(hparams)
    metrics, model, _ = editor.edit(prompts=..., target_new=..., subject=...)
    json.dump(to_builtin(metrics), fh)

Importing this package does not import easyeditor; the functions do, on first use.
"""
from .devices import cpu_fallback
from .edit_kwargs import consecutive_edit_kwargs, single_round_edit_kwargs
from .editor import install, load_model_and_tokenizer, make_editor, uninstall
from .imports import MissingMultimodalDependency, import_easyeditor
from .logs import set_log_dir
from .patches import block_output_compat, editing_context, lora_compat
from .results import restore_weights, to_builtin
from .registry import RestoreHandle, register, register_method, unregister_method

__all__ = [
    "MissingMultimodalDependency", "RestoreHandle", "block_output_compat", "consecutive_edit_kwargs",
    "cpu_fallback", "editing_context", "single_round_edit_kwargs",
    "import_easyeditor", "install", "load_model_and_tokenizer", "lora_compat", "make_editor", "register",
    "register_method", "restore_weights", "set_log_dir", "to_builtin", "uninstall", "unregister_method",
]
