"""``adamergex demo``: the whole AdaMergeX pipeline on a small synthetic multilingual world, on CPU.

Modules: :mod:`.world` (the languages and the task), :mod:`.tokenizer` (a word-level tokenizer
built locally), :mod:`.lm` (a tiny Llama pretrained from scratch), :mod:`.pipeline` (training the
adapters, merging, lm-eval evaluation) and :mod:`.report` (table, JSON, PNG).
"""
