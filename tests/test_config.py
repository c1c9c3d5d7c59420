"""AdaMergeXConfig validation and serialisation; the package import stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adamergex_peft import AdaMergeXConfig, AdaMergeXError

NAMES = dict(task_adapter="task_en", source_reference_adapter="ref_en", target_reference_adapter="ref_sw")


def test_defaults_and_round_trip(tmp_path):
    cfg = AdaMergeXConfig(**NAMES, t=0.25, method="arimerge", arimerge_weights=[0.4, 0.6])
    assert cfg.lora_strategy == "exact" and cfg.ia3_strategy == "linear" and cfg.arimerge_weights == (0.4, 0.6)
    assert AdaMergeXConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adamergex_config.json").read_text())
    assert data["t"] == 0.25 and data["method"] == "arimerge"
    assert AdaMergeXConfig.from_pretrained(tmp_path) == cfg
    assert AdaMergeXConfig(**NAMES, t=2).t == 2.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"t": float("nan")}, "t must be a finite number"),
        ({"t": float("inf")}, "t must be a finite number"),
        ({"t": "1"}, "t must be a finite number"),
        ({"t": True}, "t must be a finite number"),
        ({"method": "ties"}, "method must be one of"),
        ({"lora_strategy": "cat"}, "lora_strategy must be one of"),
        ({"ia3_strategy": "log"}, "ia3_strategy must be one of"),
        ({"svd_rank": 0}, "svd_rank must be a positive int"),
        ({"arimerge_weights": (0.5,)}, "arimerge_weights must be two finite numbers"),
        ({"arimerge_weights": 0.5}, "arimerge_weights must be two finite numbers"),
        ({"arimerge_weights": None}, "arimerge_weights must be two finite numbers"),
        ({"svd_rank": 2.0}, "svd_rank must be a positive int"),
        ({"task_adapter": ""}, "task_adapter must be a non-empty adapter name"),
        ({"target_reference_adapter": None}, "target_reference_adapter must be a non-empty"),
        ({"target_reference_adapter": "ref_en"}, "are the same adapter"),
        ({"task_adapter": "ref_sw"}, "also used as a reference"),
    ],
)
def test_invalid_values_are_clear_errors(kwargs, message):
    with pytest.raises(AdaMergeXError, match=message):
        AdaMergeXConfig(**{**NAMES, **kwargs})
    assert issubclass(AdaMergeXError, ValueError)


def test_numpy_scalars_are_accepted():
    import numpy as np  # a transformers dependency

    cfg = AdaMergeXConfig(**NAMES, t=np.float32(0.5), svd_rank=np.int64(4), arimerge_weights=np.array([0.2, 0.8]))
    assert (cfg.t, cfg.svd_rank, cfg.arimerge_weights) == (0.5, 4, (0.2, 0.8))
    assert type(cfg.t) is float and type(cfg.svd_rank) is int


def test_unknown_keys_are_refused():
    with pytest.raises(AdaMergeXError, match="unknown keys.*'alpha'"):
        AdaMergeXConfig.from_dict({**NAMES, "alpha": 1})


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_import_is_light_and_method_attached_either_order():
    # Two interpreters (one per import order); the light-import check shares the first.
    out = run(
        "import sys, adamergex_peft; "
        "from adamergex_peft import AdaMergeXConfig; "
        "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules)); "
        "from peft import PeftModel; print(hasattr(PeftModel, 'merge_crosslingual'))"
    )
    assert out.splitlines() == ["[]", "True"]
    assert (
        run(
            "from peft import PeftModel; import adamergex_peft; print(hasattr(PeftModel, 'merge_crosslingual_into_base'))"
        )
        == "True"
    )
