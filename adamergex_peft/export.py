"""Full-model export: a base checkpoint plus a merged adapter in, a plain transformers folder out.

:func:`export_merged_model` folds an adapter (the :class:`~adamergex_peft.merge.MergeResult` of an
AdaMergeX merge, or any merged LoRA/(IA)^3 adapter folder) into the base weights **shard by
shard**: each ``*.safetensors`` file of the base is opened with ``safe_open``, the tensors of
merged modules are updated, the shard is written to the new folder and freed. Peak memory is about
one shard plus the adapter, never the whole model. The output (safetensors shards with the base's
shard names and index, ``config.json``, ``generation_config.json``, tokenizer files) loads with
``AutoModelForCausalLM.from_pretrained`` alone: no PEFT, no adamergex_peft.

Per module (checkpoint key ``<module>.weight`` for PEFT key ``base_model.model.<module>...``):

* LoRA: ``W <- W + s B A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` under rsLoRA), computed in
  float32 and rounded once to the output dtype; ``fan_in_fan_out`` (GPT-2 ``Conv1D``, weight stored
  ``in x out``): ``W <- W + s (B A)^T``.
* (IA)^3: ``W <- W * l`` broadcast as PEFT's ``IA3Layer.merge`` does (``l`` is ``out x 1`` for a
  non-feed-forward module, ``1 x in`` for a feed-forward one, transposed under ``fan_in_fan_out``);
  the bias of a non-feed-forward module is scaled too (``b <- b * l``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adamergex_peft.atomic import publish_folder
from adamergex_peft.config import CONFIG_NAME
from adamergex_peft.errors import AdaMergeXError

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: Files of the base folder that are not copied: weights (rewritten), the base's own model card.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_COPIED_NAMES = {
    SAFE_WEIGHTS_INDEX_NAME,
    "pytorch_model.bin.index.json",
    "README.md",
    ".gitattributes",
    CONFIG_NAME,
}
_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
_DTYPES.update({"fp16": "float16", "float16": "float16", "half": "float16", "float": "float32"})


# ------------------------------------------------------------------------------------- the plan
@dataclass
class _Update:
    """One base tensor to change: ``key`` in ``shard``; LoRA (``left @ right * scaling``) or (IA)^3."""

    module: str
    key: str
    shard: str
    kind: str  # "lora" | "ia3"
    left: Any = None  # LoRA: out x r (or in x r under fan_in_fan_out)
    right: Any = None  # LoRA: r x in (or r x out)
    scaling: float = 1.0
    scale: Any = None  # (IA)^3: float32, broadcastable to the weight (or reshaped to the bias)


def resolve_base_model(base_model: str | os.PathLike) -> Path:
    """A local model folder, or a Hub id already in the local cache (never downloads).

    Raises:
        AdaMergeXError: not a folder and not a cached Hub snapshot.
    """
    path = Path(base_model)
    if path.is_dir():
        return path
    if path.exists():
        raise AdaMergeXError(f"base model {str(base_model)!r} is not a folder.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(base_model), local_files_only=True))
    except Exception as err:
        raise AdaMergeXError(
            f"base model {str(base_model)!r} is neither a local folder nor a Hub snapshot in the local cache "
            f"({type(err).__name__}); download it first (hf download {base_model})."
        ) from None


def _shard_map(base_dir: Path) -> tuple[dict[str, str], dict | None]:
    """``checkpoint key -> shard file name`` and the index's own JSON (None for a single file)."""
    index_path = base_dir / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = dict(index["weight_map"])
        except (ValueError, KeyError, TypeError) as err:
            raise AdaMergeXError(
                f"base model {str(base_dir)!r}: unreadable {SAFE_WEIGHTS_INDEX_NAME}: {err}"
            ) from None
        for shard in set(weight_map.values()):
            if Path(shard).name != shard or not (base_dir / shard).is_file():
                raise AdaMergeXError(
                    f"base model {str(base_dir)!r}: shard {shard!r} named in {SAFE_WEIGHTS_INDEX_NAME} is missing."
                )
        return weight_map, index
    if (base_dir / SAFE_WEIGHTS_NAME).is_file():
        with _safe_open(base_dir / SAFE_WEIGHTS_NAME) as fh:
            return dict.fromkeys(fh.keys(), SAFE_WEIGHTS_NAME), None
    raise AdaMergeXError(
        f"base model {str(base_dir)!r}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}; export needs a "
        "safetensors checkpoint (re-save the base with save_pretrained(safe_serialization=True))."
    )


def _tensor_info(base_dir: Path, shard: str, keys: Iterable[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and safetensors dtype string (``F32``, ``BF16``...) of ``keys``, read from the header only."""
    info = {}
    with _safe_open(base_dir / shard) as fh:
        present = set(fh.keys())
        for key in keys:
            if key in present:
                sl = fh.get_slice(key)
                info[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return info


def _find_key(module: str, suffix: str, weight_map: dict[str, str]) -> str | None:
    """The checkpoint key of ``<module>.<suffix>``: as is, or without the model's prefix.

    PEFT names modules from the task model (``transformer.h.0.attn.c_attn``); some checkpoints
    store the bare backbone's names (``h.0.attn.c_attn``).
    """
    key = f"{module}.{suffix}"
    if key in weight_map:
        return key
    if "." in module:
        bare = f"{module.split('.', 1)[1]}.{suffix}"
        if bare in weight_map:
            return bare
    return None


def _load_merged(merged) -> tuple[Any, dict, str, dict | None]:
    """``(peft_config, state_dict, name, provenance record or None)`` of a MergeResult or adapter folder."""
    from adamergex_peft.merge import AdapterWeights, MergeResult

    if isinstance(merged, MergeResult):
        return merged.peft_config, merged.state_dict, "merged adapter", None
    if isinstance(merged, AdapterWeights):
        return merged.peft_config, merged.state_dict, merged.name, None
    if isinstance(merged, (str, os.PathLike)):
        from adamergex_peft.files import load_adapter_folder

        folder = Path(merged)
        weights = load_adapter_folder(folder)
        record = None
        if (folder / CONFIG_NAME).is_file():
            try:
                record = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
            except ValueError as err:
                raise AdaMergeXError(f"adapter {str(folder)!r}: unreadable {CONFIG_NAME}: {err}") from None
        return weights.peft_config, weights.state_dict, str(folder), record
    raise AdaMergeXError(f"expected a MergeResult, AdapterWeights or an adapter folder, got {type(merged).__name__}.")


def _plan(peft_config, state_dict: dict, name: str, weight_map: dict[str, str], base_dir: Path) -> list[_Update]:
    """Resolve and check every module against the checkpoint before anything is written."""
    import torch
    from peft.tuners.ia3 import IA3Model

    from adamergex_peft import merge as engine

    adapter = engine.AdapterWeights(name, peft_config, state_dict)
    engine._check_config(adapter)
    fan_in_fan_out = bool(getattr(peft_config, "fan_in_fan_out", False))
    updates: list[_Update] = []
    if peft_config.peft_type.value == "LORA":
        for module, lora in engine._parse_lora(adapter).items():
            target = engine.module_target_name(module)
            key = _require_key(name, target, "weight", weight_map, base_dir)
            a, b = lora.a.float(), lora.b.float()
            left, right = (a.T, b.T) if fan_in_fan_out else (b, a)
            # lora.scaling: alpha (alpha_pattern included) over the factors' rank (or its sqrt under rsLoRA)
            updates.append(_Update(target, key, weight_map[key], "lora", left, right, lora.scaling))
    else:
        for module, vec in engine._parse_ia3(adapter).items():
            target = engine.module_target_name(module)
            key = _require_key(name, target, "weight", weight_map, base_dir)
            vec = vec.to(torch.float32)
            is_ff = IA3Model._check_target_module_feedforward(peft_config, target)  # PEFT's own rule
            scale = vec.T if fan_in_fan_out else vec
            updates.append(_Update(target, key, weight_map[key], "ia3", scale=scale))
            bias_key = _find_key(target, "bias", weight_map)
            if not is_ff and bias_key is not None:
                updates.append(_Update(target, bias_key, weight_map[bias_key], "ia3", scale=vec.reshape(-1)))

    # shapes and dtypes, from the shard headers only
    by_shard: dict[str, list[_Update]] = {}
    for update in updates:
        by_shard.setdefault(update.shard, []).append(update)
    for shard, shard_updates in by_shard.items():
        info = _tensor_info(base_dir, shard, [u.key for u in shard_updates])
        for u in shard_updates:
            if u.key not in info:
                raise AdaMergeXError(
                    f"adapter {name!r}, module {u.module!r}: {u.key!r} is in the index but not in shard {shard!r}."
                )
            shape, st_dtype = info[u.key]
            if st_dtype not in ("F32", "F16", "BF16", "F64"):
                raise AdaMergeXError(
                    f"adapter {name!r}, module {u.module!r}: base tensor {u.key!r} has dtype {st_dtype} "
                    "(quantized?); export needs a floating-point base."
                )
            if u.kind == "lora":
                expected = (u.left.shape[0], u.right.shape[1])
                ok = shape == expected
            elif u.key.endswith(".bias"):
                expected, ok = (u.scale.numel(),), shape == (u.scale.numel(),)
            else:  # (out, 1) or (1, in) against the 2-D weight (transposed under fan_in_fan_out)
                expected = tuple(u.scale.shape)
                ok = len(shape) == 2 and expected in ((shape[0], 1), (1, shape[1]))
            if not ok:
                what = "update" if u.kind == "lora" else "(IA)^3 vector"
                raise AdaMergeXError(
                    f"adapter {name!r}, module {u.module!r}: {what} of shape {expected} does not fit the base "
                    f"tensor {u.key!r} of shape {shape}; was the adapter trained on this base model?"
                )
    return updates


def _require_key(name: str, module: str, suffix: str, weight_map: dict[str, str], base_dir: Path) -> str:
    key = _find_key(module, suffix, weight_map)
    if key is None:
        raise AdaMergeXError(
            f"adapter {name!r}, module {module!r}: no tensor {module + '.' + suffix!r} in the base checkpoint "
            f"{str(base_dir)!r}; was the adapter trained on this base model?"
        )
    return key


# ------------------------------------------------------------------------------------ the writer
def _apply(tensor, update: _Update, out_dtype):
    """The updated tensor in ``out_dtype``: float32 arithmetic, one rounding."""
    import torch

    from adamergex_peft.model import _add_low_rank_

    if update.kind == "lora":
        if tensor.dtype == out_dtype:
            _add_low_rank_(tensor, update.left, update.right, update.scaling)  # in place, fp32 row blocks
            return tensor
        work = tensor.to(torch.float32)
        work.addmm_(update.left, update.right, alpha=update.scaling)
        return work.to(out_dtype)
    scale = update.scale.reshape(tensor.shape) if tensor.dim() == 1 else update.scale
    return torch.mul(tensor.to(torch.float32), scale).to(out_dtype)


def _safe_open(path: Path):
    """``safetensors.safe_open`` on a base model file; a corrupt or unreadable file is one AdaMergeXError."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise AdaMergeXError(f"base model file {str(path)!r} is not a readable safetensors file: {err}") from None


_ST_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
_ST_SIZES.update({"I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1})
_ST_FLOATS = ("F64", "F32", "F16", "BF16")


def _st_dtype(dtype) -> str:
    """safetensors' name of a torch floating-point dtype."""
    import torch

    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]


def _write_shard(src: Path, dst: Path, by_key: dict[str, _Update], dtype, name: str) -> int:
    """Stream one shard from ``src`` to ``dst``, one tensor at a time; returns the bytes of tensor data.

    The safetensors file is written directly: ``u64`` header length, JSON header (tensor dtypes,
    shapes and byte offsets, known from the source header and the output dtype; padded to 8 bytes),
    then each tensor's bytes. Tensors are ordered by element size (largest first), then name, as
    ``safetensors`` does, so that every tensor is aligned to its element size. Peak memory: the
    source shard's memory-mapped pages plus one tensor (and its float32 work copy).
    """
    import struct

    import torch

    from adamergex_peft.merge import _all_finite as engine_all_finite

    with _safe_open(src) as fh:
        metadata = {**(fh.metadata() or {}), "format": "pt"}
        layout = []
        for key in fh.keys():
            sl = fh.get_slice(key)
            st = sl.get_dtype()
            if dtype is not None and st in _ST_FLOATS:
                st = _st_dtype(dtype)
            if st not in _ST_SIZES:
                raise AdaMergeXError(f"base model: tensor {key!r} in {src.name!r} has unsupported dtype {st}.")
            layout.append((key, st, list(sl.get_shape())))
        layout.sort(key=lambda item: (-_ST_SIZES[item[1]], item[0]))
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for key, st, shape in layout:
            size = _ST_SIZES[st]
            for dim in shape:
                size *= dim
            header[key] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(dst, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for key, _, _ in layout:
                tensor = fh.get_tensor(key)
                out_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
                update = by_key.get(key)
                if update is not None:
                    tensor = _apply(tensor, update, out_dtype)
                    if not engine_all_finite(tensor):
                        raise AdaMergeXError(
                            f"adapter {name!r}, module {update.module!r}: the merged tensor {key!r} has NaN/Inf "
                            f"values in {out_dtype} (overflow?); export in float32 or check the adapter."
                        )
                elif tensor.dtype != out_dtype:
                    tensor = tensor.to(out_dtype)
                data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
                expected = header[key]["data_offsets"]
                if data.nbytes != expected[1] - expected[0]:  # cannot happen unless the source header lies
                    raise AdaMergeXError(f"base model: tensor {key!r} in {src.name!r} does not match its header.")
                out.write(memoryview(data))
                del tensor, data
    return offset


def _write_shards(base_dir: Path, tmp: Path, weight_map: dict[str, str], updates: list[_Update], dtype, name: str):
    """Rewrite every shard into ``tmp``; returns the total size in bytes of the tensors written."""
    from tqdm.auto import tqdm

    by_key = {update.key: update for update in updates}
    shards = sorted(set(weight_map.values()))
    total = 0
    for shard in tqdm(shards, desc="export", unit="shard", disable=len(shards) < 2):
        total += _write_shard(base_dir / shard, tmp / shard, by_key, dtype, name)
    return total


def _copy_side_files(base_dir: Path, tmp: Path, dtype) -> None:
    """config.json (dtype updated when changed), generation config, tokenizer and other small files."""
    for entry in sorted(base_dir.iterdir()):
        if not entry.is_file() or entry.name in _NOT_COPIED_NAMES or entry.name.endswith(_NOT_COPIED_SUFFIXES):
            continue
        if entry.name == "config.json" and dtype is not None:
            config = json.loads(entry.read_text(encoding="utf-8"))
            dtype_name = str(dtype).removeprefix("torch.")
            for field_name in ("dtype", "torch_dtype"):
                if field_name in config:
                    config[field_name] = dtype_name
            if "dtype" not in config and "torch_dtype" not in config:
                config["dtype"] = dtype_name
            (tmp / entry.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(entry, tmp / entry.name)


def _to_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise AdaMergeXError(f"dtype {dtype!r} is not one of float32, bfloat16, float16 (fp32, bf16, fp16).")
    return getattr(torch, name)


def export_merged_model(
    base_model_path: str | os.PathLike,
    merged,
    output_dir: str | os.PathLike,
    *,
    dtype=None,
    overwrite: bool = False,
    record: dict | None = None,
    model_card: dict | None = None,
) -> Path:
    """Write ``base + merged adapter`` as a plain transformers model folder, shard by shard.

    Args:
        base_model_path: local folder of the base model (safetensors, one file or sharded with
            ``model.safetensors.index.json``), or a Hub id that is already in the local cache.
        merged: a :class:`~adamergex_peft.merge.MergeResult` (e.g. from
            :func:`~adamergex_peft.merge_state_dicts`), an ``AdapterWeights``, or a PEFT adapter
            folder (e.g. written by :func:`~adamergex_peft.merge_adapter_files`). LoRA or (IA)^3.
        output_dir: folder to create: the base's shards (same names and index) with the merged
            weights, its ``config.json``, ``generation_config.json``, tokenizer and other small
            files, and ``adamergex_config.json`` (the adapter's provenance record, if any, plus an
            ``export`` section).
        dtype: dtype of the floating-point tensors written (``torch.dtype`` or ``"bf16"``,
            ``"float16"``...); default: each tensor's dtype in the base. The update is computed in
            float32 from the base tensor and rounded once.
        overwrite: replace an existing ``output_dir``.
        record: the provenance record to carry into ``adamergex_config.json`` (default: the one in
            the adapter folder, if ``merged`` is one; :func:`~adamergex_peft.merge_adapter_files`
            passes the record of its in-memory merge).
        model_card: keyword arguments of :func:`adamergex_peft.card.build_model_card` to write
            ``README.md`` inside the folder before it is published (``None``: no card).

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`.

    Raises:
        AdaMergeXError: a module of the adapter not in the checkpoint, a shape that does not fit,
            a non-float base tensor, NaN/Inf after the merge (in the output dtype), an existing
            ``output_dir`` without ``overwrite``. Nothing is written then (the output is built in a
            temporary folder beside it and renamed at the end).
    """
    from adamergex_peft import __version__

    output_dir = Path(output_dir)
    out_dtype = _to_dtype(dtype)
    base_dir = resolve_base_model(base_model_path)
    if output_dir.exists() and not overwrite:
        raise AdaMergeXError(
            f"output folder {str(output_dir)!r} exists; pass overwrite=True (--overwrite) to replace it."
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise AdaMergeXError(f"output {str(output_dir)!r} exists and is not a folder.")
    out_resolved, base_resolved = output_dir.resolve(), base_dir.resolve()
    if out_resolved == base_resolved or out_resolved in base_resolved.parents or base_resolved in out_resolved.parents:
        raise AdaMergeXError(f"output folder {str(output_dir)!r} overlaps the base model folder {str(base_dir)!r}.")
    peft_config, state_dict, name, folder_record = _load_merged(merged)
    record = record if record is not None else folder_record
    weight_map, index = _shard_map(base_dir)
    updates = _plan(peft_config, state_dict, name, weight_map, base_dir)

    def write(tmp: Path) -> None:
        total = _write_shards(base_dir, tmp, weight_map, updates, out_dtype, name)
        if index is not None:
            new_index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total}}
            (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(new_index, indent=2) + "\n", encoding="utf-8")
        _copy_side_files(base_dir, tmp, out_dtype)
        export_record = {
            "base_model": str(base_model_path),
            "base_model_dir": str(base_resolved),
            "adapter": name,
            "adapter_base_model": getattr(peft_config, "base_model_name_or_path", None),
            "peft_type": peft_config.peft_type.value,
            "modules": len({u.module for u in updates}),
            "dtype": str(out_dtype).removeprefix("torch.") if out_dtype is not None else "base",
            "adamergex_peft": __version__,
        }
        full_record = {**(record or {}), "export": export_record}
        (tmp / CONFIG_NAME).write_text(json.dumps(full_record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if model_card is not None:  # part of the folder's content: published with it or not at all
            from adamergex_peft.card import write_model_card

            write_model_card(tmp, **{"repo_id": str(output_dir), **model_card})

    # The same publisher as adapter outputs: temporary folder, create-if-absent rename (or a
    # recoverable swap with ``overwrite``); nothing is left behind on failure.
    publish_folder(output_dir, write, overwrite=overwrite)
    logger.info("exported %s merged into %s to %s (%d tensors updated)", name, base_dir, output_dir, len(updates))
    return output_dir
