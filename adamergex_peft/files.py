"""Adapter folders in, adapter folder out: AdaMergeX without a base model.

Reads PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``, or a legacy
``adapter_model.bin`` read with ``torch.load(weights_only=True)``, never a full unpickle), merges
them with :func:`adamergex_peft.merge.merge_state_dicts`, and writes a standard PEFT adapter folder
atomically (a temporary folder beside the output, then a rename) with ``adamergex_config.json``
recording the settings and the inputs' checksums.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adamergex_peft.atomic import current_umask
from adamergex_peft.config import CONFIG_NAME, AdaMergeXConfig
from adamergex_peft.errors import AdaMergeXError

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
PT_WEIGHTS_NAME = "adapter_model.bin"


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
        raise AdaMergeXError(f"adapter {name!r}: cannot read {ADAPTER_CONFIG_NAME}: {err}") from None
    path = weights_file(adapter_dir)
    data = path.read_bytes()  # read once: hashed and parsed from the same bytes
    try:
        if path.name == SAFETENSORS_WEIGHTS_NAME:
            state_dict = load_safetensors(data)
        else:
            state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise AdaMergeXError(f"adapter {name!r}: cannot read {path.name} (corrupt or truncated?): {err}") from None
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

    Args:
        task_dir: task adapter, source language (T).
        source_reference_dir: reference adapter, source language (Rs).
        target_reference_dir: reference adapter, target language (Rg).
        output_dir: folder to create.
        config: ``t``, method and strategies; its adapter names are replaced by the folder paths.
            Default: ``AdaMergeXConfig`` defaults (``adamergex``, ``t=1``).
        overwrite: replace an existing ``output_dir``.

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`.

    Raises:
        AdaMergeXError: bad input (nothing is written) or an existing ``output_dir`` without ``overwrite``.
    """
    import peft
    import torch
    from safetensors.torch import save_file

    from adamergex_peft import __version__
    from adamergex_peft.merge import merge_state_dicts

    inputs = {
        "task_adapter": Path(task_dir),
        "source_reference_adapter": Path(source_reference_dir),
        "target_reference_adapter": Path(target_reference_dir),
    }
    output_dir = Path(output_dir)
    _check_paths(inputs, output_dir)
    if output_dir.exists() and not overwrite:
        raise AdaMergeXError(
            f"output folder {str(output_dir)!r} exists; pass overwrite=True (--overwrite) to replace it."
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise AdaMergeXError(f"output {str(output_dir)!r} exists and is not a folder.")

    names = {role: str(path) for role, path in inputs.items()}
    config = dataclasses.replace(config or AdaMergeXConfig(**names), **names)
    # The checksums are computed from the very bytes that are merged, in a worker thread while the
    # main thread parses and merges (hashlib releases the GIL on large buffers).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adamergex-sha256") as pool:
        adapters, digests = {}, {}
        for role, path in inputs.items():
            adapters[role], data = _read_adapter_folder(path)
            digests[role] = pool.submit(lambda b: hashlib.sha256(b).hexdigest(), data)
            del data
        result = merge_state_dicts(
            adapters["task_adapter"],
            adapters["source_reference_adapter"],
            adapters["target_reference_adapter"],
            config,
            device="cpu",
        )
        sha256 = {role: future.result() for role, future in digests.items()}
    record = {
        "config": config.to_dict(),
        "inputs": {
            role: {"path": str(path.resolve()), "weights_sha256": sha256[role]} for role, path in inputs.items()
        },
        "report": result.report,
        "versions": {"adamergex_peft": __version__, "peft": peft.__version__, "torch": torch.__version__},
    }

    parent = output_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{output_dir.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes a private 0o700 folder
        result.peft_config.save_pretrained(str(tmp))
        save_file(result.state_dict, str(tmp / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _replace_folder(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s adapter to %s (%s)", config.method, output_dir, result.report)
    return output_dir


def _check_paths(inputs: dict[str, Path], output_dir: Path) -> None:
    """Refuse an output that is (or contains) an input, and two roles given the same folder."""
    resolved = {role: path.resolve() for role, path in inputs.items()}
    out = output_dir.resolve()
    for role, path in resolved.items():
        if out == path or out in path.parents:
            raise AdaMergeXError(
                f"output folder {str(output_dir)!r} is or contains the {role} input {str(inputs[role])!r}; write elsewhere."
            )
    seen: dict[Path, str] = {}
    for role, path in resolved.items():
        if path in seen:
            raise AdaMergeXError(f"{role} and {seen[path]} are the same folder {str(inputs[role])!r}.")
        seen[path] = role


def _replace_folder(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is swapped out first and removed after."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.resolve().parent, prefix=f".{target.name}.old-"))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
