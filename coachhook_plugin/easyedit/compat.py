"""The EasyEdit compatibility layer's public names in one place, for code written against the former single module.

Each concern lives in its own module; import from there in new code:

``imports``        :func:`import_easyeditor` (the multimodal import guard), ``easyeditor_module``
``devices``        :func:`cpu_fallback` (hard-coded ``cuda`` -> ``cpu``)
``patches``        :func:`block_output_compat`, :func:`lora_compat`, :func:`editing_context` (all scoped fixes),
                   :func:`memit_context_templates`
``logs``           :func:`set_log_dir`
``editor``         :func:`install` / :func:`uninstall` (``BaseEditor`` patches), :func:`make_editor`,
                   :func:`load_model_and_tokenizer`, the padding side
``evaluation``     EasyEdit's public evaluation functions run under :func:`editing_context`
``edit_kwargs``    :func:`is_batchable`, :func:`consecutive_edit_kwargs`, :func:`single_round_edit_kwargs`
``results``        :func:`to_builtin`, :func:`restore_weights`, :func:`unwrap_edited_model`
``hparams_files``  :func:`load_easyedit_hparams` and friends (yamls that load with either EasyEdit)

This module only re-exports; patching a name here changes nothing inside the modules above.
"""
from .devices import CudaToCpuMode, cpu_fallback
from .edit_kwargs import accepts_kwarg, consecutive_edit_kwargs, is_batchable, single_round_edit_kwargs
from .editor import (EDITOR_METHODS, ONE_REQUEST_PER_CALL_METHODS, RIGHT_PADDING_ALGS, apply_padding_side, install,
                     load_model_and_tokenizer, make_editor, model_display_name, set_padding_side_lookup, uninstall)
from .evaluation import PUBLIC_EVALUATION_FUNCTIONS
from .hparams_files import (EASYEDIT_FIELD_DEFAULTS, easyedit_hparams_class, easyedit_method_limits,
                            hparams_from_config, load_easyedit_hparams)
from .imports import (MULTIMODAL_MODULE_PREFIXES, MULTIMODAL_ONLY_MODULES, STOOD_IN, MissingMultimodalDependency,
                      easyeditor_available, easyeditor_import_error, easyeditor_module, easyeditor_not_installed,
                      import_easyeditor, is_multimodal_module)
from .logs import results_file_compat, set_log_dir
from .patches import (block_output_compat, editing_context, ensure_hparams_defaults, is_decoder_block, lora_compat,
                      memit_context_templates)
from .results import restore_weights, to_builtin, unwrap_edited_model
from ..models import stats_model_dir_names  # moved to the core: the method's statistics files use it

__all__ = [
    "CudaToCpuMode", "EASYEDIT_FIELD_DEFAULTS", "EDITOR_METHODS", "MULTIMODAL_MODULE_PREFIXES",
    "MULTIMODAL_ONLY_MODULES", "MissingMultimodalDependency", "ONE_REQUEST_PER_CALL_METHODS",
    "PUBLIC_EVALUATION_FUNCTIONS", "RIGHT_PADDING_ALGS", "STOOD_IN", "accepts_kwarg", "apply_padding_side",
    "block_output_compat", "consecutive_edit_kwargs", "cpu_fallback", "easyedit_hparams_class",
    "easyedit_method_limits", "easyeditor_available", "easyeditor_import_error", "easyeditor_module",
    "easyeditor_not_installed", "editing_context", "ensure_hparams_defaults", "hparams_from_config", "import_easyeditor",
    "install", "is_batchable", "is_decoder_block", "is_multimodal_module", "load_easyedit_hparams",
    "load_model_and_tokenizer", "lora_compat", "make_editor", "memit_context_templates", "model_display_name",
    "restore_weights", "results_file_compat", "set_log_dir", "set_padding_side_lookup", "single_round_edit_kwargs",
    "stats_model_dir_names", "to_builtin", "uninstall", "unwrap_edited_model",
]
