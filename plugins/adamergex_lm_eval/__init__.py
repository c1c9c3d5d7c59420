"""lm-evaluation-harness integration of adamergex-peft: the ``adamergex`` model.

``lm_eval --model adamergex --model_args pretrained=...,task_adapter=...,source_reference_adapter=...,
target_reference_adapter=...,t=...`` evaluates the AdaMergeX target-language adapter built from three
PEFT adapters (see :class:`adamergex_lm_eval.model.AdaMergeXLM`).

This package is imported at interpreter start by ``adamergex_lm_eval.pth`` (to install
:mod:`adamergex_lm_eval._hook`), so it must stay empty: no imports here.
"""

__all__: list[str] = []
