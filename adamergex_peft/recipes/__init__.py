"""Training recipes: JSON files of :class:`adamergex_peft.train.TrainConfig` settings.

Each ``<name>.json`` is ``{"description": "...", "source": "...", "settings": {...}}``; load one with
:func:`adamergex_peft.train.load_recipe` or ``adamergex train --recipe <name>``.
"""
