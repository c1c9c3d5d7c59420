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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adamergex_peft.atomic import publish_folder, recover_folder
from adamergex_peft.config import CONFIG_NAME, AdaMergeXConfig
from adamergex_peft.errors import AdaMergeXError

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
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
    task_dir: str | os.PathLike,
    source_reference_dir: str | os.PathLike,
    target_reference_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: AdaMergeXConfig | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Merge three adapter folders with AdaMergeX into a new, standard PEFT adapter folder.

    No base model is loaded: the merge works on the adapter weights alone (see
    :func:`adamergex_peft.merge.merge_state_dicts` for the formulas). ``output_dir`` gets
    ``adapter_config.json`` + ``adapter_model.safetensors`` (loadable by plain PEFT, lm-eval's
    ``peft=``, vLLM) and ``adamergex_config.json`` (the settings, the input folders with the sha256
    of their weights files, the library versions and the merge report).

    Steps: load and hash the inputs, merge, record the provenance, publish the folder. The folder
    is written under a short temporary name beside ``output_dir`` and published atomically
    (:func:`adamergex_peft.atomic.publish_folder`): without ``overwrite``, a create-if-absent rename,
    so a folder that appears at ``output_dir`` meanwhile (e.g. a concurrent run) is never replaced;
    with it, a swap that the next run repairs if it was interrupted. On any error, interrupt or
    ``SystemExit`` the temporary folder is removed; temporary folders left by killed runs of the
    same output are removed by the next run.

    Args:
        task_dir: task adapter, source language (T).
        source_reference_dir: reference adapter, source language (Rs).
        target_reference_dir: reference adapter, target language (Rg).
        output_dir: folder to create; not inside an input folder, not a dangling symlink.
        config: ``t``, method and strategies. Its three adapter names are ignored: they are replaced
            (``dataclasses.replace``) by the folder paths above, which ``adamergex_config.json`` records.
            Default: ``AdaMergeXConfig`` defaults (``adamergex``, ``t=1``).
        overwrite: replace an existing ``output_dir``.

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`.

    Raises:
        AdaMergeXError: bad input (nothing is written), an existing ``output_dir`` without
            ``overwrite`` (checked before the merge and again, atomically, when publishing), or a
            weights file larger than the available memory allows.
    """
    inputs = {
        "task_adapter": Path(task_dir),
        "source_reference_adapter": Path(source_reference_dir),
        "target_reference_adapter": Path(target_reference_dir),
    }
    output_dir = Path(output_dir)
    _check_paths(inputs, output_dir, overwrite)
    names = {role: str(path) for role, path in inputs.items()}
    config = dataclasses.replace(config or AdaMergeXConfig(**names), **names)
    # The checksums are computed from the very bytes that are merged, in a worker thread while the
    # main thread parses and merges (hashlib releases the GIL on large buffers).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adamergex-sha256") as pool:
        adapters, digests = _load_inputs(inputs, pool)
        result = _merge(adapters, config)
        sha256 = {role: future.result() for role, future in digests.items()}
    record = _provenance(config, inputs, sha256, result)
    publish_folder(output_dir, lambda folder: _write_adapter(folder, result, record), overwrite=overwrite)
    logger.info("wrote %s adapter to %s (%s)", config.method, output_dir, result.report)
    return output_dir


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
