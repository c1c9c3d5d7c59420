"""Shared test set-up: the Hugging Face libraries offline, once for every test file and subprocess.

Set here (not in test files): the tests build tiny models and tokenizers in code
(:mod:`adamergex_peft.testing`) and must never reach the hub. Subprocesses inherit these variables.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
