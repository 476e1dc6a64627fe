"""The tiny model builder, settings from flags and env, and start-up errors a person can act on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.config import GROUPS, Settings, cli_args
from app.model.compute import loader
from app.model.compute.loader import LoadedModel, load_model
from app.model.tiny import build_tiny_model
from tests.support.server import make_settings


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    a = load_file(build_tiny_model(tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(build_tiny_model(tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(build_tiny_model(tmp_path / "c", seed=2) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert 0.5e6 < sum(t.numel() for t in a.values()) < 1e6


def test_tiny_checkpoint_loads_through_the_real_classes(loaded: object) -> None:
    from transformers import VoxtralForConditionalGeneration, VoxtralProcessor

    assert isinstance(loaded.model, VoxtralForConditionalGeneration)  # type: ignore[attr-defined]
    assert isinstance(loaded.processor, VoxtralProcessor)  # type: ignore[attr-defined]
    assert loaded.random_weights  # type: ignore[attr-defined]


def test_system_fingerprint_names_the_serving_configuration(loaded: LoadedModel, tiny_dir: Path) -> None:
    assert re.fullmatch(r"fp_[0-9a-f]{10}", loaded.fingerprint)
    assert load_model(make_settings(tiny_dir)).fingerprint == loaded.fingerprint  # a restart keeps it
    others = [
        load_model(make_settings(tiny_dir, **change)).fingerprint
        for change in ({"dtype": "bfloat16"}, {"attn_implementation": "eager"}, {"tiny_seed": 5})
    ]
    assert len({loaded.fingerprint, *others}) == 4  # dtype, attention kernel, weights: each changes it


@pytest.mark.parametrize("version", ["v7", "v13"])
def test_other_tokenizer_versions_build(tmp_path: Path, version: str) -> None:
    out = build_tiny_model(tmp_path, tokenizer_version=version)
    assert json.loads((out / "tekken.json").read_text())["config"]["version"] == version


def test_settings_from_env_and_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXTRAL_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("VOXTRAL_API_KEYS", "a,b")
    s = Settings(_cli_parse_args=["--port", "9001", "--served-model-name", "voxtral"])  # type: ignore[call-arg]
    assert (s.max_batch_size, s.port, s.api_keys, s.model_id) == (7, 9001, ["a", "b"], "voxtral")


def test_vllm_flag_spellings_carry_over() -> None:
    """A `vllm serve` command line for Voxtral works here: its spellings map to ours, the Mistral-format
    flags the model card asks vLLM for are accepted and need nothing."""
    argv = ["--api-key", "k1", "--max_num_seqs=4", "--max-num-batched-tokens", "2048", "--max-model-len", "8192"]
    argv += ["--tokenizer_mode", "mistral", "--config-format=mistral", "--load_format", "mistral", "--port", "9"]
    s = Settings(_cli_parse_args=cli_args(argv))  # type: ignore[call-arg]
    assert (s.api_keys, s.max_batch_size, s.max_batch_tokens, s.context_length, s.port) == (["k1"], 4, 2048, 8192, 9)
    kv = ["--gpu_memory_utilization", "0.5", "--kv-cache-memory-bytes=1073741824", "--enforce_eager"]
    s = Settings(_cli_parse_args=cli_args(kv))  # type: ignore[call-arg]
    assert (s.gpu_memory_utilization, s.kv_cache_memory_bytes, s.enforce_eager) == (0.5, 2**30, True)
    assert Settings(_cli_parse_args=cli_args(["--enforce-eager"])).enforce_eager  # type: ignore[call-arg]
    assert Settings().enable_prefix_caching  # on by default, as in vLLM
    for off in (["--no-enable-prefix-caching"], ["--no_enable_prefix_caching"]):
        assert not Settings(_cli_parse_args=cli_args(off)).enable_prefix_caching  # type: ignore[call-arg]
    assert cli_args(["--max-batch-size", "3", "--log_level", "info"]) == [
        "--max-batch-size",
        "3",
        "--log_level",
        "info",
    ]


def test_settings_are_the_groups_fields_in_order_and_every_groups_checks_run() -> None:
    """`Settings` is flat, but each field belongs to one group, and `--help` lists them group by group."""
    grouped = [name for group in GROUPS for name in group.__annotations__ if name in Settings.model_fields]
    assert grouped == list(Settings.model_fields)
    bad = {"max_connections": 0, "realtime_max_utterance_s": 31.0, "max_queue": 0, "gpu_memory_utilization": 1.5}
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            Settings.model_validate({name: value})


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.main", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_line_exit_2(done: subprocess.CompletedProcess[str]) -> str:
    """A start-up refused before the server listens: exit code 2 and one line saying what to do."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("voxtral-server:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_missing_model_path_exits_2_with_advice(tmp_path: Path) -> None:
    line = one_line_exit_2(_serve("--model", str(tmp_path / "nope")))
    assert "does not exist" in line and "--model tiny" in line


def test_unreachable_hub_id_exits_2_with_advice(tmp_path: Path) -> None:
    line = one_line_exit_2(_serve("--model", "mistralai/Voxtral-Mini-3B-2507", "--cache-dir", str(tmp_path)))
    assert "--model tiny" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
def test_device_cuda_without_cuda_exits_2_in_one_line() -> None:
    line = one_line_exit_2(_serve("--model", "tiny", "--device", "cuda"))
    assert "--device cuda" in line and "--device cpu" in line
    assert ("CPU-only build" in line) == (torch.version.cuda is None and torch.version.hip is None)


def test_a_checkpoint_missing_files_exits_2_naming_them(loaded: LoadedModel, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(loaded.path, checkpoint)
    (checkpoint / "tekken.json").unlink()
    (checkpoint / "model.safetensors").unlink()
    line = one_line_exit_2(_serve("--model", str(checkpoint)))
    assert "missing tekken.json, model.safetensors" in line, line
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(Path(loaded.path) / "tekken.json", checkpoint / "tekken.json")
    shutil.copy(Path(loaded.path) / "model.safetensors", checkpoint / "model-00001-of-00002.safetensors")
    line = one_line_exit_2(_serve("--model", str(checkpoint)))
    assert "missing model-00002-of-00002.safetensors:" in line, line


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_dtype_the_cpu_cannot_compute_in_is_refused_before_loading(
    dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The capability probe (oneDNN's) answers differently on AVX2 and AVX-512 machines: both answers are
    checked here, so every CPU runs both branches (the exit code is `serve`'s for every preflight refusal)."""
    settings = Settings(model="tiny", device="cpu", dtype=dtype)  # type: ignore[arg-type]
    monkeypatch.setattr(loader, "cpu_supports", lambda dtype: False)
    with pytest.raises(loader.ModelLoadError) as refused:
        loader.preflight(settings)
    message = str(refused.value)
    assert message.startswith(f"--dtype {dtype}:") and "--dtype float32" in message and "\n" not in message
    monkeypatch.setattr(loader, "cpu_supports", lambda dtype: True)
    loader.preflight(settings)  # supported: no objection


def test_the_cpu_probe_answers_for_both_half_precisions() -> None:
    assert isinstance(loader.cpu_supports(torch.bfloat16), bool)
    assert isinstance(loader.cpu_supports(torch.float16), bool)


def test_invalid_setting_exits_2() -> None:
    done = _serve("--max-batch-size", "0")
    assert done.returncode == 2 and "max_batch_size" in done.stderr
