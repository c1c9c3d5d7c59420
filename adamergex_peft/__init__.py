"""AdaMergeX cross-lingual adapter merging for Hugging Face PEFT.

``import adamergex_peft`` is cheap: it imports neither torch nor peft. The public names below are
loaded on first use (PEP 562), and ``PeftModel.merge_crosslingual`` /
``PeftModel.merge_crosslingual_into_base`` are attached as soon as ``peft`` is imported (now, if
it already is; otherwise right after ``peft.peft_model`` executes, by the distribution's one
post-import hook, see :mod:`adamergex_peft._peft_hook`). ``ImportError`` if ``PeftModel`` already
has one of these names for something else.

>>> import adamergex_peft
>>> from adamergex_peft import AdaMergeXConfig
>>> cfg = AdaMergeXConfig(task_adapter="task_en", source_reference_adapter="ref_en",
...                       target_reference_adapter="ref_sw", t=1.0)
>>> # model.merge_crosslingual(cfg, adapter_name="task_sw")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adamergex_peft import _peft_hook

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "AdaMergeXConfig": "adamergex_peft.config",
    "AdaMergeXError": "adamergex_peft.errors",
    "AdapterWeights": "adamergex_peft.merge",
    "MergeResult": "adamergex_peft.merge",
    "merge_state_dicts": "adamergex_peft.merge",
    "merge_crosslingual": "adamergex_peft.model",
    "merge_crosslingual_into_base": "adamergex_peft.model",
    "BaseMergeHandle": "adamergex_peft.model",
    "load_adapter_folder": "adamergex_peft.files",
    "merge_adapter_files": "adamergex_peft.files",
    "merge_from_record": "adamergex_peft.files",
    "METHODS": "adamergex_peft.methods",
    "MergeMethod": "adamergex_peft.methods",
    "register_method": "adamergex_peft.methods",
    "export_merged_model": "adamergex_peft.export",
    "build_model_card": "adamergex_peft.card",
    "write_model_card": "adamergex_peft.card",
    "vllm_max_lora_rank": "adamergex_peft.serving",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover (re-exports for type checkers)
    from adamergex_peft.card import build_model_card, write_model_card  # noqa: F401
    from adamergex_peft.config import AdaMergeXConfig  # noqa: F401
    from adamergex_peft.errors import AdaMergeXError  # noqa: F401
    from adamergex_peft.export import export_merged_model  # noqa: F401
    from adamergex_peft.files import load_adapter_folder, merge_adapter_files, merge_from_record  # noqa: F401
    from adamergex_peft.merge import AdapterWeights, MergeResult, merge_state_dicts  # noqa: F401
    from adamergex_peft.methods import METHODS, MergeMethod, register_method  # noqa: F401
    from adamergex_peft.model import BaseMergeHandle, merge_crosslingual, merge_crosslingual_into_base  # noqa: F401
    from adamergex_peft.serving import vllm_max_lora_rank  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adamergex_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_peft_hook.install()
