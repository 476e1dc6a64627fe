"""Where the model goes (app/model/compute/loader.py: `placement`): the CPU without a GPU, the whole model on
GPU 0 when it fits, spread over several GPUs only when told, refused in one line when the weights need
spreading and nobody said so; and the sizes it decides on, read from a checkpoint's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import VoxtralConfig

from app.model.compute.footprint import Format, format_bytes
from app.model.compute.loader import (
    GIB,
    RESERVE_BYTES,
    LoadedModel,
    ModelLoadError,
    expected_weights,
    kv_bytes,
    placement,
    weights_bytes,
)
from app.model.compute.quantization import Quantization

WEIGHTS, KV = 8 * GIB, 16 * GIB
"""Voxtral Mini in bfloat16 and its default KV budget (131,072 positions)."""
H100 = 79 * GIB


def test_no_gpu_is_the_cpu_whatever_is_asked() -> None:
    assert placement(WEIGHTS, KV, [], None) == "cpu"
    assert placement(WEIGHTS, KV, [], "auto") == "cpu"


@pytest.mark.parametrize("gpus", [1, 2])
def test_a_model_that_fits_goes_on_gpu_0(gpus: int) -> None:
    assert placement(WEIGHTS, KV, [H100] * gpus, None) == "cuda:0"


def test_one_gpu_takes_the_model_even_when_it_does_not_fit_there_is_nowhere_else() -> None:
    assert placement(WEIGHTS, KV, [4 * GIB], None) == "cuda:0"
    assert placement(WEIGHTS, KV, [4 * GIB], "auto") == "cuda:0"  # spreading over one GPU is no spreading


def test_weights_that_fit_beside_less_than_the_kv_budget_stay_on_one_gpu() -> None:
    assert placement(WEIGHTS, KV, [WEIGHTS + RESERVE_BYTES, H100], None) == "cuda:0"


def test_weights_too_big_for_gpu_0_are_spread_only_when_told() -> None:
    small = [40 * GIB, 40 * GIB]  # Voxtral Small (48 GB in bfloat16) on two 40 GB cards
    with pytest.raises(ModelLoadError, match=r"pass --device-map auto to spread the model over the 2 GPUs"):
        placement(48 * GIB, KV, small, None)
    assert placement(48 * GIB, KV, small, "auto") == "auto"


def test_spread_when_told_even_when_it_would_fit() -> None:
    assert placement(WEIGHTS, KV, [H100, H100], "auto") == "auto"


def test_sizes_read_from_the_checkpoint(tmp_path: Path) -> None:
    text = {"num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "text_config": text}))
    assert weights_bytes(tmp_path, torch.bfloat16) is None  # no weights on disk: unknown
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    (tmp_path / shards["a"]).write_bytes(b"0" * 1000)
    (tmp_path / shards["b"]).write_bytes(b"0" * 500)
    (tmp_path / "consolidated.safetensors").write_bytes(b"0" * 1500)  # the Mistral-format copy: not counted
    assert weights_bytes(tmp_path, torch.bfloat16) == 1500
    assert weights_bytes(tmp_path, torch.float32) == 3000  # loaded in float32: twice the stored bfloat16
    # Voxtral Mini's text model: 2 x 30 layers x 8 KV heads x 128 x 2 bytes = 120 KiB a position
    assert kv_bytes(tmp_path, torch.bfloat16, 131_072) == 2 * 30 * 8 * 128 * 2 * 131_072


@pytest.mark.parametrize(("quantization", "fmt"), [("int8", "int8"), ("bitsandbytes", "nf4"), ("fp8", "fp8")])
def test_quantization_at_load_is_planned_at_its_formats_size(
    loaded: LoadedModel, quantization: Quantization, fmt: Format
) -> None:
    """The tiny checkpoint on disk (float32 when loaded on a CPU): --quantization X is planned at what
    `format_bytes` gives for X (what the loaded model then holds: tests/api/test_quantization.py), not at the
    unquantized files' size, so start-up does not warn about room it will not use."""
    path = Path(loaded.path)
    files = weights_bytes(path, torch.float32)
    assert expected_weights(path, torch.float32, "none") == files
    planned = expected_weights(path, torch.float32, quantization)
    assert planned == format_bytes(VoxtralConfig.from_pretrained(path), fmt, itemsize=4).total
    assert files is not None and planned is not None and planned < files


def test_a_checkpoint_saved_quantized_is_planned_at_its_files_size(tmp_path: Path) -> None:
    saved = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    config = {"torch_dtype": "bfloat16", "text_config": {}, "quantization_config": saved}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"0" * 1000)
    assert expected_weights(tmp_path, torch.bfloat16, "bitsandbytes") == 1000
