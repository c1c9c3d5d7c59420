"""Sub-commands of the ``adamergex`` CLI, one module each (see :mod:`adamergex_peft.cli`)."""
