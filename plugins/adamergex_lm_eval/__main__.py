"""Fallback launcher: ``python -m adamergex_lm_eval <lm_eval arguments>``.

Runs lm-eval's own command line (``lm_eval.__main__.cli_evaluate``) after registering the
``adamergex`` model and adding the ``adamergex_*`` tasks to lm-eval's task index: the route
lm-eval's maintainers document for out-of-tree models. Use it where the start-up hook
``adamergex_lm_eval.pth`` is not active: ``pip install --target`` or ``PYTHONPATH`` set-ups (no
``.pth`` is read there), ``python -S``, ``ADAMERGEX_LM_EVAL_HOOK=0``. (Wheel and editable installs
both have the hook: in an editable install site.py reads the ``.pth`` files in name order, and
hatchling's ``_editable_impl_adamergex_peft.pth``, which puts ``plugins/`` on the path, sorts
before ``adamergex_lm_eval.pth``.) E.g.::

    python -m adamergex_lm_eval --model adamergex --model_args pretrained=...,task_adapter=... --tasks ...
    accelerate launch -m adamergex_lm_eval --model adamergex ...
"""

from __future__ import annotations


def main() -> None:
    """Register the model and the tasks, then hand over to lm-eval's CLI (which reads ``sys.argv``)."""
    from adamergex_lm_eval import _hook

    _hook.register_model()
    _hook.patch_task_manager()
    from lm_eval.__main__ import cli_evaluate

    import adamergex_lm_eval.model  # noqa: F401  (the class itself, registered under "adamergex")

    cli_evaluate()


if __name__ == "__main__":
    main()
