"""Adapter folders in, adapter folder out: AdaMergeX without a base model.

Reads PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``, or a legacy
``adapter_model.bin`` read with ``torch.load(weights_only=True)``, never a full unpickle), merges
them with :func:`adamergex_peft.merge.merge_state_dicts`, and writes a standard PEFT adapter folder
atomically (a temporary folder beside the output, then a create-if-absent rename or a recoverable
swap: :func:`adamergex_peft.atomic.publish_folder`) with ``adamergex_config.json`` recording the
settings and the inputs' checksums.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adamergex_peft.atomic import publish_folder, recover_folder
from adamergex_peft.config import ADAPTER_CONFIG_NAME, ADAPTER_FIELDS, CONFIG_NAME, AdaMergeXConfig
from adamergex_peft.errors import AdaMergeXError

logger = logging.getLogger(__name__)

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
PT_WEIGHTS_NAME = "adapter_model.bin"


def _first_line(err: object) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(path: Path, name: str) -> None:
    """Refuse a weights file that cannot be read: it is held as bytes and as tensors (about 2x its size)."""
    size = path.stat().st_size
    available = available_memory()
    if available is not None and 2 * size > available:
        raise AdaMergeXError(
            f"adapter {name!r}: {path.name} is {size / 2**30:.2f} GiB and reading it needs about "
            f"{2 * size / 2**30:.2f} GiB, but only {available / 2**30:.2f} GiB of memory is available."
        )


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (the digest ``adamergex_config.json`` records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def weights_file(adapter_dir: str | os.PathLike) -> Path:
    """The weights file of an adapter folder, preferring safetensors."""
    adapter_dir = Path(adapter_dir)
    for name in (SAFETENSORS_WEIGHTS_NAME, PT_WEIGHTS_NAME):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise AdaMergeXError(
        f"adapter {str(adapter_dir)!r}: no {SAFETENSORS_WEIGHTS_NAME} (or {PT_WEIGHTS_NAME}) in the folder."
    )


def load_adapter_folder(adapter_dir: str | os.PathLike, name: str | None = None):
    """Load a PEFT adapter folder as :class:`~adamergex_peft.merge.AdapterWeights` (tensors on CPU).

    The sha256 of the weights file, computed from the bytes read, is in ``AdapterWeights.sha256``.

    Args:
        adapter_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``
            (or ``adapter_model.bin``, loaded with ``torch.load(weights_only=True)``).
        name: how error messages name the adapter (default: the folder path).

    Raises:
        AdaMergeXError: missing folder or files, unreadable config, corrupt weights.
    """
    weights, data = _read_adapter_folder(adapter_dir, name)
    weights.sha256 = hashlib.sha256(data).hexdigest()
    return weights


def _read_adapter_folder(adapter_dir: str | os.PathLike, name: str | None = None):
    """:func:`load_adapter_folder` without the checksum; also returns the weights file's bytes."""
    import torch
    from peft import PeftConfig
    from safetensors.torch import load as load_safetensors

    from adamergex_peft.merge import AdapterWeights

    adapter_dir = Path(adapter_dir)
    name = name or str(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdaMergeXError(f"adapter {name!r}: {str(adapter_dir)!r} is not a folder.")
    if not (adapter_dir / ADAPTER_CONFIG_NAME).is_file():
        raise AdaMergeXError(f"adapter {name!r}: no {ADAPTER_CONFIG_NAME} in {str(adapter_dir)!r}.")
    try:
        peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as err:  # JSON errors, unknown peft_type, bad values
        raise AdaMergeXError(f"adapter {name!r}: cannot read {ADAPTER_CONFIG_NAME}: {_first_line(err)}") from None
    path = weights_file(adapter_dir)
    check_fits_in_memory(path, name)
    data = path.read_bytes()  # read once: hashed and parsed from the same bytes
    try:
        if path.name == SAFETENSORS_WEIGHTS_NAME:
            state_dict = load_safetensors(data)
        else:
            state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what torch raises when weights_only refuses an object
        raise AdaMergeXError(
            f"adapter {name!r}: cannot read {path.name} without unpickling arbitrary Python objects (refused); if you "
            "trust the file, load it yourself and save it with safetensors (PEFT: "
            "model.save_pretrained(dir, safe_serialization=True))."
        ) from None
    except Exception as err:
        raise AdaMergeXError(
            f"adapter {name!r}: cannot read {path.name} (corrupt or truncated?): {_first_line(err)}"
        ) from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise AdaMergeXError(f"adapter {name!r}: {path.name} does not hold a dict of tensors.")
    return AdapterWeights(name, peft_config, state_dict), data


def merge_adapter_files(
    task_dir: str | os.PathLike | None = None,
    source_reference_dir: str | os.PathLike | None = None,
    target_reference_dir: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    output_dir: str | os.PathLike | None = None,
    config: AdaMergeXConfig | None = None,
    *,
    overwrite: bool = False,
    base_model: str | os.PathLike | None = None,
    into_base: bool = False,
    dtype: str | None = None,
    model_card: bool = False,
    source_language: str | None = None,
    target_language: str | None = None,
    card_results: str | os.PathLike | None = None,
) -> Path | dict[str, Path]:
    """Merge three adapter folders with AdaMergeX into a new, standard PEFT adapter folder.

    No base model is loaded: the merge works on the adapter weights alone (see
    :func:`adamergex_peft.merge.merge_state_dicts` for the formulas). ``output_dir`` gets
    ``adapter_config.json`` + ``adapter_model.safetensors`` (loadable by plain PEFT, lm-eval's
    ``peft=``, vLLM) and ``adamergex_config.json`` (the settings, the input folders with the sha256
    of their weights files, the library versions, the merge report and the output options, enough
    for :func:`merge_from_record` to reproduce it bit for bit).

    Steps: load and hash the inputs, merge, record the provenance, publish the folder. The folder
    is written under a short temporary name beside ``output_dir`` and published atomically
    (:func:`adamergex_peft.atomic.publish_folder`): without ``overwrite``, a create-if-absent rename,
    so a folder that appears at ``output_dir`` meanwhile (e.g. a concurrent run) is never replaced;
    with it, a swap that the next run repairs if it was interrupted. On any error, interrupt or
    ``SystemExit`` the temporary folder is removed; temporary folders left by killed runs of the
    same output are removed by the next run. The model card, when asked for, is written inside the
    temporary folder, so it is published with the weights or not at all.

    Args:
        task_dir: task adapter, source language (T). ``None``: ``config.task_adapter``.
        source_reference_dir: reference adapter, source language (Rs). ``None``: ``config.source_reference_adapter``.
        target_reference_dir: reference adapter, target language (Rg). ``None``:
            ``config.target_reference_adapter``. A mapping ``{lang: folder}`` merges several target
            languages in one call: the task and source reference adapters are read (and hashed)
            once, and each language is written to ``output_dir/<lang>``, published atomically on
            its own. Every output path is checked before anything is read. If one language fails
            with bad input, the others are still merged and written (kept), then one
            :class:`AdaMergeXError` names the failed languages; rerun those alone. An ``OSError``
            or an interrupt stops the run; the languages already published are kept, the one being
            written leaves nothing.
        output_dir: folder to create; not inside an input folder, not a dangling symlink.
        config: ``t``, method, strategies, ``pad_rank``. Its three adapter fields are the folders
            when the arguments above are ``None``; given folders replace them
            (``dataclasses.replace``), and ``adamergex_config.json`` records the folders used.
            Default: ``AdaMergeXConfig`` defaults (``adamergex``, ``t=1``).
        overwrite: replace an existing ``output_dir`` (each ``output_dir/<lang>``).
        base_model: the base model (local folder, or Hub id in the local cache); needed for
            ``into_base``. Without ``into_base`` it only names the base in the model card.
        into_base: write a full transformers model (the base with the update merged into its
            weights, shard by shard: :func:`adamergex_peft.export.export_merged_model`) instead of
            an adapter folder. LoRA and (IA)^3.
        dtype: with ``into_base``: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (default: the base's).
        model_card: write ``README.md`` (:func:`adamergex_peft.card.build_model_card`: Hub
            metadata, provenance, how to load and serve it, citation). Upload with ``hf upload``.
        source_language, target_language: language codes for the card's ``language`` (with a
            mapping, the target language of each output is its key).
        card_results: a sweep's ``sweep_results.json``: its evaluation table goes into the card.

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`; with a mapping, ``{lang: output_dir/lang}``.

    Raises:
        AdaMergeXError: bad input (nothing is written), an existing output without ``overwrite``
            (checked before the merge and again, atomically, when publishing), or a weights file
            larger than the available memory allows.
    """
    if output_dir is None:
        raise AdaMergeXError("merge_adapter_files needs output_dir.")
    options = _output_options(base_model, into_base, dtype, model_card, source_language, target_language, card_results)
    folders = {
        "task_adapter": task_dir,
        "source_reference_adapter": source_reference_dir,
        "target_reference_adapter": target_reference_dir,
    }
    for role, folder in folders.items():
        if folder is None:
            folders[role] = getattr(config, role, None) if config is not None else None
            if folders[role] is None:
                raise AdaMergeXError(f"merge_adapter_files needs the {role} folder (an argument or config.{role}).")
    targets = folders.pop("target_reference_adapter")
    if isinstance(targets, Mapping):
        if options["target_language"] is not None:
            raise AdaMergeXError("target_language is taken from the keys of target_reference_dir; do not pass it.")
        _check_languages(targets)
        jobs = {lang: (Path(path), Path(output_dir) / lang) for lang, path in targets.items()}
    else:
        jobs = {None: (Path(targets), Path(output_dir))}
    written = _merge_jobs({role: Path(p) for role, p in folders.items()}, jobs, config, options, overwrite)
    return written if isinstance(targets, Mapping) else written[None]


_LANG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_languages(targets: Mapping) -> None:
    if not targets:
        raise AdaMergeXError("target_reference_dir is an empty mapping; give at least one {lang: folder}.")
    for lang in targets:
        if not isinstance(lang, str) or not _LANG_RE.match(lang) or lang in (".", ".."):
            raise AdaMergeXError(
                f"target language {lang!r} cannot name an output folder; use a code such as 'sw' or 'zh-Hans'."
            )


def _output_options(base_model, into_base, dtype, model_card, source_language, target_language, card_results) -> dict:
    """What to write (adapter or full model, card): checked before anything is read; recorded as ``output``."""
    if into_base and base_model is None:
        raise AdaMergeXError("into_base (--into-base) needs base_model (--base-model NAME_OR_PATH).")
    if dtype is not None and not into_base:
        raise AdaMergeXError("dtype (--dtype) applies to a full-model export only; add into_base (--into-base).")
    if dtype is not None:
        from adamergex_peft.export import _to_dtype

        _to_dtype(dtype)
    if card_results is not None and not model_card:
        raise AdaMergeXError("card_results (--card-results) needs a model card; do not combine it with --no-card.")
    if card_results is not None and not Path(card_results).is_file():
        raise AdaMergeXError(f"card_results {str(card_results)!r} is not a file (expected a sweep_results.json).")
    for name, value in (("source_language", source_language), ("target_language", target_language)):
        if value is not None and (not isinstance(value, str) or not _LANG_RE.match(value)):
            raise AdaMergeXError(f"{name} must be a language code such as 'sw', got {value!r}.")
    base_dir = None
    if into_base:
        from adamergex_peft.export import resolve_base_model

        base_dir = str(resolve_base_model(base_model).resolve())
    return {
        "into_base": bool(into_base),
        "base_model": None if base_model is None else str(base_model),
        "base_model_dir": base_dir,
        "dtype": dtype,
        "model_card": bool(model_card),
        "source_language": source_language,
        "target_language": target_language,
        "card_results": None if card_results is None else str(Path(card_results).resolve()),
    }


def _merge_jobs(
    common: dict[str, Path],
    jobs: dict[str | None, tuple[Path, Path]],
    config: AdaMergeXConfig | None,
    options: dict,
    overwrite: bool,
    expected_sha256: dict[str, str] | None = None,
) -> dict[str | None, Path]:
    """Merge ``common`` (T, Rs) with each job's Rg into the job's output; T and Rs are read once.

    Every output path is checked before anything is read; each output is published atomically on
    its own. A failing language (``AdaMergeXError``) does not stop the others; the failures are
    raised together at the end. ``expected_sha256``: refuse inputs whose weights changed.
    """
    for target, out in jobs.values():
        _check_paths({**common, "target_reference_adapter": target}, out, overwrite)
    if len(jobs) > 1:
        outs = [out.resolve() for _, out in jobs.values()]
        for lang, (target, _) in jobs.items():
            if any(o == target.resolve() or o in target.resolve().parents for o in outs):
                raise AdaMergeXError(f"the output of a target language contains the {lang} input {str(target)!r}.")
    written: dict[str | None, Path] = {}
    failed: list[str] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adamergex-sha256") as pool:
        # The checksums are computed from the very bytes that are merged, in a worker thread while the
        # main thread parses and merges (hashlib releases the GIL on large buffers).
        adapters, digests = _load_inputs(common, pool)
        for lang, (target, out) in jobs.items():
            inputs = {**common, "target_reference_adapter": target}
            names = {role: str(path) for role, path in inputs.items()}
            try:
                run_config = dataclasses.replace(config or AdaMergeXConfig(**names), **names)
                target_adapter, target_digest = _load_inputs({"target_reference_adapter": target}, pool)
                result = _merge({**adapters, **target_adapter}, run_config)
                sha256 = {role: future.result() for role, future in {**digests, **target_digest}.items()}
                _check_sha256(inputs, sha256, expected_sha256)
                job_options = {**options, "target_language": lang if lang is not None else options["target_language"]}
                record = _provenance(run_config, inputs, sha256, result)
                record["output"] = job_options
                _publish(out, result, record, job_options, overwrite)
            except AdaMergeXError as err:
                if len(jobs) == 1:
                    raise
                failed.append(f"{lang}: {err}")
                logger.error("target language %s failed: %s", lang, err)
                continue
            written[lang] = out
            logger.info(
                "wrote %s %s to %s (%s)",
                run_config.method,
                "model" if options["into_base"] else "adapter",
                out,
                result.report,
            )
    if failed:
        done = ", ".join(str(lang) for lang in written) or "none"
        raise AdaMergeXError(
            f"{len(failed)} of {len(jobs)} target languages failed (written and kept: {done}); " + " | ".join(failed)
        )
    return written


def _check_sha256(inputs: dict[str, Path], sha256: dict[str, str], expected: dict[str, str] | None) -> None:
    for role, digest in sha256.items():
        if expected is not None and role in expected and expected[role] != digest:
            raise AdaMergeXError(
                f"input {role} {str(inputs[role])!r} changed since the record: its weights have sha256 {digest[:12]}..., "
                f"the record says {expected[role][:12]}...; nothing was written."
            )


def _publish(out: Path, result, record: dict, options: dict, overwrite: bool) -> None:
    """Step 4: the adapter folder, or the full model, each with its card, published atomically."""
    card = _card_options(out, options)
    if options["into_base"]:
        from adamergex_peft.export import export_merged_model

        export_merged_model(
            options["base_model_dir"] or options["base_model"],
            result,
            out,
            dtype=options["dtype"],
            overwrite=overwrite,
            record=record,
            model_card=card,
        )
        return

    def write(folder: Path) -> None:
        _write_adapter(folder, result, record)
        if card is not None:
            from adamergex_peft.card import write_model_card

            write_model_card(folder, **card)

    publish_folder(out, write, overwrite=overwrite)


def _card_options(out: Path, options: dict) -> dict | None:
    """Keyword arguments of :func:`~adamergex_peft.card.build_model_card` (None: no card)."""
    if not options["model_card"]:
        return None
    from adamergex_peft.card import _hub_id

    base = options["base_model"]
    return {
        "base_model": base if base is not None and _hub_id(base) else None,
        "target_language": options["target_language"],
        "source_language": options["source_language"],
        "sweep_results": options["card_results"],
        "repo_id": str(out),
    }


def merge_from_record(
    record: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    model_card: bool | None = None,
) -> Path:
    """Re-run the merge recorded in an ``adamergex_config.json`` (bit-identical weights).

    All recorded settings are used (the config, and the output options: adapter or full model,
    dtype, ``pad_rank``, card and its languages), with the inputs read from their recorded
    (absolute) paths. Each input's weights must still have the recorded sha256; otherwise an
    :class:`AdaMergeXError` names the changed input and nothing is written. The base model of a
    full-model export is read from its recorded folder (it has no recorded checksum).

    Args:
        record: the ``adamergex_config.json`` file, or the folder holding it.
        output_dir: folder to create.
        overwrite: replace an existing ``output_dir``.
        model_card: ``False`` skips the card, ``True`` writes one; default: as recorded.

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`.
    """
    path = Path(record)
    if path.is_dir():
        path = path / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        config = AdaMergeXConfig.from_dict(data["config"])
        inputs = {role: Path(data["inputs"][role]["path"]) for role in ADAPTER_FIELDS}
        expected = {role: str(data["inputs"][role]["weights_sha256"]) for role in ADAPTER_FIELDS}
    except AdaMergeXError as err:
        raise AdaMergeXError(f"record {str(path)!r}: {err}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AdaMergeXError(
            f"cannot read the merge record {str(path)!r} ({type(err).__name__}: {_first_line(err)}); expected the "
            f"{CONFIG_NAME} that adamergex merge writes."
        ) from None
    recorded = data.get("output") or {}
    export = data.get("export") or {}
    into_base = bool(recorded.get("into_base") or export)
    base_model = recorded.get("base_model_dir") or export.get("base_model_dir") or recorded.get("base_model")
    dtype = recorded.get("dtype")
    if dtype is None and export.get("dtype") not in (None, "base"):
        dtype = export["dtype"]
    card = bool(recorded.get("model_card")) if model_card is None else model_card
    card_results = recorded.get("card_results") if card else None
    if card_results is not None and not Path(card_results).is_file():
        logger.warning("the recorded card results %s are gone; the card has no evaluation table", card_results)
        card_results = None
    options = _output_options(
        recorded.get("base_model") if not into_base else base_model,
        into_base,
        dtype,
        card,
        recorded.get("source_language"),
        recorded.get("target_language"),
        card_results,
    )
    if into_base:
        options["base_model"] = recorded.get("base_model") or export.get("base_model")
    common = {role: inputs[role] for role in ADAPTER_FIELDS[:2]}
    jobs = {None: (inputs["target_reference_adapter"], Path(output_dir))}
    written = _merge_jobs(common, jobs, config, options, overwrite, expected_sha256=expected)
    return written[None]


def _load_inputs(inputs: dict[str, Path], pool: ThreadPoolExecutor):
    """Step 1: read each adapter folder once; its sha256 is computed by ``pool`` from the same bytes."""
    adapters, digests = {}, {}
    for role, path in inputs.items():
        adapters[role], data = _read_adapter_folder(path)
        digests[role] = pool.submit(lambda b: hashlib.sha256(b).hexdigest(), data)
        del data
    return adapters, digests


def _merge(adapters: dict, config: AdaMergeXConfig):
    """Step 2: the merge itself (:func:`~adamergex_peft.merge.merge_state_dicts`, on the CPU)."""
    from adamergex_peft.merge import merge_state_dicts

    return merge_state_dicts(
        adapters["task_adapter"],
        adapters["source_reference_adapter"],
        adapters["target_reference_adapter"],
        config,
        device="cpu",
    )


def _provenance(config: AdaMergeXConfig, inputs: dict[str, Path], sha256: dict[str, str], result) -> dict:
    """Step 3: what ``adamergex_config.json`` records (settings, inputs and checksums, report, versions)."""
    import peft
    import torch

    from adamergex_peft import __version__

    return {
        "config": config.to_dict(),
        "inputs": {
            role: {"path": str(path.resolve()), "weights_sha256": sha256[role]} for role, path in inputs.items()
        },
        "report": result.report,
        "versions": {"adamergex_peft": __version__, "peft": peft.__version__, "torch": torch.__version__},
    }


def _write_adapter(folder: Path, result, record: dict) -> None:
    """Step 4 (inside the temporary folder that :func:`publish_folder` then publishes)."""
    from safetensors.torch import save_file

    result.peft_config.save_pretrained(str(folder))
    save_file(result.state_dict, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _check_paths(inputs: dict[str, Path], output_dir: Path, overwrite: bool) -> None:
    """Refuse, before anything is read or created, an output that is unusable or clashes with the inputs."""
    shown = str(output_dir)
    if os.path.islink(output_dir) and not output_dir.exists():
        raise AdaMergeXError(f"output {shown!r} is a dangling symlink (to {os.readlink(output_dir)!r}); remove it.")
    recover_folder(output_dir)  # an overwrite interrupted earlier may have left the previous output aside
    if output_dir.exists() and not overwrite:
        raise AdaMergeXError(f"output folder {shown!r} exists; pass overwrite=True (--overwrite) to replace it.")
    if output_dir.exists() and not output_dir.is_dir():
        raise AdaMergeXError(f"output {shown!r} exists and is not a folder.")
    resolved = {role: path.resolve() for role, path in inputs.items()}
    out = output_dir.resolve()
    for role, path in resolved.items():
        if out == path or out in path.parents:
            raise AdaMergeXError(
                f"output folder {shown!r} is or contains the {role} input {str(inputs[role])!r}; write elsewhere."
            )
        if path in out.parents:
            raise AdaMergeXError(
                f"output folder {shown!r} is inside the {role} input {str(inputs[role])!r}; write elsewhere."
            )
    seen: dict[Path, str] = {}
    for role, path in resolved.items():
        if path in seen:
            raise AdaMergeXError(f"{role} and {seen[path]} are the same folder {str(inputs[role])!r}.")
        seen[path] = role
