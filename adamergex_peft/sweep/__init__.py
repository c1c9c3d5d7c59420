"""Choose ``t``: merge at several values, evaluate each through lm-evaluation-harness, keep the best.

:func:`run_sweep` loads the base model once with the adapters in one ``PeftModel``: the task
adapter, the source reference and one target reference per target language. For every *cell*
(target language, method, t) it adds the merged update into the base weights in place
(:func:`adamergex_peft.merge_crosslingual_into_base`), evaluates the base model with the adapters
disabled through lm-eval's Python API (an ``HFLM`` wrapped around the in-memory model), and takes
the update out again (``handle.undo()``). Methods that do not use ``t`` (``METHODS[m].uses_t``
false: ``task_only``, ``arimerge``) are evaluated once per language.

**Languages.** ``target_reference`` is one adapter folder (one target language, as before) or a
mapping ``{lang: folder}``; ``{lang}`` in a task name is replaced by each language's code
(``adamergex_xcopa_mc_{lang}``). Every point then records its ``lang``.

**Outputs** in ``output_dir`` (rewritten atomically after every cell, so an interrupted sweep
resumes from the cells already done):

* ``sweep_results.json``: the settings; per point the language, method, ``t``, the score, every
  task's metrics, the calibrated metrics and the label-free statistics (below); at the top level
  ``best`` and ``best_label_free`` (for several languages: the (method, t) with the best mean over
  the languages, and both per language in ``best_per_lang`` / ``best_label_free_per_lang``);
  ``selected`` (one of the two, as ``select`` says) and, with a reference task, ``reference``;
* ``sweep_results.csv``: one row per point;
* ``sweep_plot.png``: score and calibrated score against ``t``, one line per method (and language);
* ``sweep_table.csv`` / ``sweep_table.md``: languages x (method, t);
* ``sweep_heatmap.png``: the score table as a heat map.

The score of a point is the mean over the requested tasks of one metric per task: ``metric`` if
given, else the first of ``acc``, ``exact_match``, ``rougeL``, ``f1``, ``bleu`` that the task
reports, else its first numeric metric.

**Label-free statistics** (multiple-choice tasks; lm-eval's per-item choice log-likelihoods
``L`` (n x k), read from its logged samples, which are not stored). Per task, reading no labels:

* ``distribution``: the shares of the plain predictions ``argmax_j L[i, j]``
  (:func:`~adamergex_peft.calibration.predicted_distribution`);
* ``tv``: their total-variation distance ``1/2 sum_j |p_j - r_j|`` to the reference ``r``:
  uniform, or (``reference_task``) the shares the task adapter alone (the ``task_only`` merge)
  predicts on a source-language task, evaluated once per sweep and stored under ``reference``
  (:func:`~adamergex_peft.calibration.least_prior_shift`);
* ``entropy``: the mean entropy of the normalised choice probabilities ``softmax(L[i])``
  (:func:`~adamergex_peft.calibration.mean_choice_entropy`);
* ``calibrated_confidence``: the mean probability of the calibrated prediction,
  ``1/n sum_i max_j softmax_j(L[i] + b)`` with ``b`` the label-free offsets that make the
  predicted shares match ``r`` (:func:`~adamergex_peft.calibration.calibrated_confidence`).

Each point's ``label_free`` holds them per task and their means over tasks. The *labelled*
calibrated metrics sit with the other labelled ones: ``calibrated`` (per task ``acc_calibrated``:
the accuracy of the predictions calibrated to ``r``, and ``auc`` for two choices) and
``calibrated_score`` (the mean ``acc_calibrated``).

**Choosing t without target labels** (``select="label-free"``): :data:`LABEL_FREE_RULES`. The
default rule is ``calibrated_confidence`` (highest wins): the sweep's calibrated score is what the
language-gap update improves (issue 10: AUC and calibrated accuracy rise with ``t`` while the plain
answer prior drifts), and this rule scores the calibrated predictions, so it is not fooled by the
prior shift. ``least_prior_shift`` (smallest ``tv`` wins) keeps the merge whose *uncalibrated*
answers look most like the reference: the rule for a merge deployed without calibration; it
favours small ``t`` whenever the update shifts the prior. Ties (equal up to :data:`TIE_TOLERANCE`,
the round-off of merge/undo) go to the first point in plan order.
Which rule (and which ``select``) is the better default is an empirical question (BENCHMARKS.md);
``select`` defaults to ``"labelled"`` for now.

**Several processes** (one node or several): launch the same command under ``torchrun`` or
``accelerate launch``. The environment variables ``RANK`` and ``WORLD_SIZE`` (both launchers set
them) split the grid's cells round-robin over the ranks (cell ``i`` of the plan goes to rank
``i % WORLD_SIZE``). Every rank loads its own model copy (on ``cuda:LOCAL_RANK`` when CUDA is
there and no ``device`` is given), evaluates whole cells (lm-eval sees one process: the model
object is passed to ``HFLM``, which then uses no data parallelism of its own) and writes its
finished cells atomically to ``output_dir/.shards/rank<k>.json``. Rank 0 then waits for every
planned cell to be in some shard file (a ``torch.distributed`` barrier first, if a process group
is initialised), gathers them and writes the usual outputs. An interrupted run resumes on any
number of ranks: cells found in ``sweep_results.json`` or any shard file are skipped. Several
nodes need ``output_dir`` on a filesystem every node sees (NFS, Lustre, ...), with atomic
``rename``; the model and adapter folders must be readable on every node.

    # 8 GPUs, one node
    torchrun --nproc_per_node 8 -m adamergex_peft sweep ... --output OUT
    accelerate launch --multi_gpu --num_processes 8 -m adamergex_peft sweep ... --output OUT
    # 2 nodes x 8 GPUs (OUT on a shared filesystem); on node NODE (0 or 1), HEAD = node 0's address:
    torchrun --nnodes 2 --node_rank $NODE --nproc_per_node 8 --master_addr $HEAD --master_port 29500 \\
        -m adamergex_peft sweep ... --output OUT
    accelerate launch --multi_gpu --num_machines 2 --machine_rank $NODE --num_processes 16 \\
        --main_process_ip $HEAD --main_process_port 29500 -m adamergex_peft sweep ... --output OUT

(``accelerate config`` can store the launch settings instead.) Rank 0 polls the shard files, so
on NFS a finished rank's file may show after the client's attribute-cache delay (seconds).

**Layout** (one module per concern; every name above is importable from ``adamergex_peft.sweep``):
:mod:`~adamergex_peft.sweep.plan` (the grid), :mod:`~adamergex_peft.sweep.evaluation` (lm-eval and the
statistics of its samples), :mod:`~adamergex_peft.sweep.selection` (the rules that pick a point),
:mod:`~adamergex_peft.sweep.results` (the record and its files), :mod:`~adamergex_peft.sweep.plots`,
:mod:`~adamergex_peft.sweep.loop` (merge, evaluate, undo), :mod:`~adamergex_peft.sweep.distributed`
(ranks and shard files) and :mod:`~adamergex_peft.sweep.run` (:func:`run_sweep`).
"""

from adamergex_peft.sweep.distributed import REFERENCE_JSON, SHARDS_DIR, distributed_env
from adamergex_peft.sweep.evaluation import (
    PREFERRED_METRICS,
    calibrated_metrics,
    choice_logliks,
    label_free_statistics,
    make_evaluator,
    pooled_distribution,
    summarize_lm_eval,
    summarize_samples,
)
from adamergex_peft.sweep.loop import ADAPTER_NAMES, evaluate_points, load_sweep_model, target_adapter_name
from adamergex_peft.sweep.plan import (
    LANG_PLACEHOLDER,
    SweepPoint,
    parse_target_references,
    plan_points,
    tasks_for_lang,
)
from adamergex_peft.sweep.results import (
    HEATMAP_PNG,
    PLOT_PNG,
    RESULTS_CSV,
    RESULTS_JSON,
    TABLE_CSV,
    TABLE_MD,
    SweepResults,
)
from adamergex_peft.sweep.run import run_sweep
from adamergex_peft.sweep.selection import (
    DEFAULT_LABEL_FREE_RULE,
    LABEL_FREE_RULES,
    SELECT_CHOICES,
    TIE_TOLERANCE,
    LabelFreeRule,
)

__all__ = [
    "ADAPTER_NAMES",
    "DEFAULT_LABEL_FREE_RULE",
    "HEATMAP_PNG",
    "LABEL_FREE_RULES",
    "LANG_PLACEHOLDER",
    "PLOT_PNG",
    "PREFERRED_METRICS",
    "REFERENCE_JSON",
    "RESULTS_CSV",
    "RESULTS_JSON",
    "SELECT_CHOICES",
    "SHARDS_DIR",
    "TABLE_CSV",
    "TABLE_MD",
    "TIE_TOLERANCE",
    "LabelFreeRule",
    "SweepPoint",
    "SweepResults",
    "calibrated_metrics",
    "choice_logliks",
    "distributed_env",
    "evaluate_points",
    "label_free_statistics",
    "load_sweep_model",
    "make_evaluator",
    "parse_target_references",
    "plan_points",
    "pooled_distribution",
    "run_sweep",
    "summarize_lm_eval",
    "summarize_samples",
    "target_adapter_name",
    "tasks_for_lang",
]
