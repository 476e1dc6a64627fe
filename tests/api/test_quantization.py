"""--quantization on the tiny model (CPU): the server's generator over int8 and NF4 weights decodes what an
unquantized float32 model carrying the same weights, dequantized, decodes; only the decoder's linear layers
change format; the weights' bytes shrink by part as `format_bytes` says; fp8 is refused on a CPU in one line;
an int8 model saved with save_pretrained loads back quantized; and a request runs through the real app."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from app.config import Settings
from app.model.compute.decoder import LeanDecoder, ModuleDecoder, decoder_for
from app.model.compute.features import LogMel
from app.model.compute.footprint import format_bytes, loaded_bytes, memory_table, params_by_part, voxtral_configs
from app.model.compute.generate import BatchGenerator, Row, sample
from app.model.compute.loader import LoadedModel, ModelLoadError, load_model, preflight
from app.model.text.prompts import Prompter
from app.types import SamplingParams
from tests.support.audio_fixtures import JFK
from tests.support.server import make_settings, serve

FORMATS = {"int8": "int8", "bitsandbytes": "nf4"}

LOGIT_TOL = 1e-3
"""float32 logits of the quantized model against the float32 model carrying its dequantized weights, at logits
of std ~4: the two compute the same products of the same numbers, only in another order (torchao's int8 kernel
scales after its matmul, bitsandbytes' CPU backend dequantizes blocks before it), so they differ by float32
summation rounding: up to 7e-5 seen (int8; NF4 1.6e-5, its layers kept in float32 by `keep_compute_dtype`).
A greedy token could differ only where its two best logits come closer than this: the prompts below never do
(their closest call is 4e-3, asserted), so the tokens must be equal."""


@pytest.fixture(scope="module", params=list(FORMATS))
def quantized(request: pytest.FixtureRequest, tiny_dir: Path, loaded: LoadedModel) -> LoadedModel:
    return load_model(make_settings(tiny_dir, quantization=request.param))


@pytest.fixture(scope="module")
def int8(tiny_dir: Path) -> LoadedModel:
    """The int8 model alone, for what one format shows for all: a saved checkpoint's round trip, the app."""
    return load_model(make_settings(tiny_dir, quantization="int8"))


@pytest.fixture(scope="module")
def dequantized(quantized: LoadedModel, tiny_dir: Path) -> Any:
    """A fresh float32 model of the same checkpoint, its decoder's linear weights replaced by the quantized
    model's, dequantized: the numbers the quantized kernels compute with."""
    reference = load_model(make_settings(tiny_dir)).model
    modules = dict(quantized.model.named_modules())
    with torch.no_grad():
        for name, module in reference.model.language_model.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(_dequantize(modules[f"model.language_model.{name}"].weight))
    return reference


def _dequantize(weight: Any) -> torch.Tensor:
    state = getattr(weight, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnb

        return bnb.dequantize_4bit(weight.data, state).float()
    return weight.dequantize().float()  # type: ignore[no-any-return]


def _requests(prompter: Prompter) -> list[Any]:
    return [
        prompter.chat([{"role": "user", "content": "Tell me about the weather in Paris."}]),
        prompter.transcription(JFK[: 16000 * 3], "en"),
    ]


def _greedy(model: Any, log_mel: LogMel, request: Any, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    gen = BatchGenerator(model, pad_token_id=11, log_mel=log_mel)
    row = Row(request.input_ids, request.audios, SamplingParams())
    state, logits = gen.prefill([row])
    seen = [logits.float()]
    for _ in range(steps):
        row.generated.append(sample(logits, state.rows)[0])
        logits = gen.step(state, torch.tensor(row.generated[-1:]))
        seen.append(logits.float())
    return row.generated, seen


def test_quantized_decodes_as_its_dequantized_weights(
    quantized: LoadedModel, dequantized: Any, prompter: Prompter, log_mel: LogMel
) -> None:
    for request in _requests(prompter):
        tokens, logits = _greedy(quantized.model, log_mel, request, 8)
        expected, reference = _greedy(dequantized, log_mel, request, 8)
        gaps = [float((a - b).abs().max()) for a, b in zip(logits, reference, strict=True)]
        assert max(gaps) < LOGIT_TOL, gaps
        assert min(float(t.topk(2).values.diff().abs()) for t in reference) > LOGIT_TOL  # decided, not a tie
        assert tokens == expected
    assert type(quantized.model.model.language_model.layers[0].mlp.down_proj.weight) is not torch.nn.Parameter
    assert type(decoder_for(quantized.model)) is ModuleDecoder and type(decoder_for(dequantized)) is LeanDecoder


def test_only_the_decoders_linear_layers_change(quantized: LoadedModel, loaded: LoadedModel) -> None:
    model, plain = quantized.model, loaded.model
    kept = [(m.model.audio_tower, m.model.multi_modal_projector, m.lm_head) for m in (model, plain)]
    for module, before in zip(*kept, strict=True):
        assert [type(m) for m in module.modules()] == [type(m) for m in before.modules()]
        assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in module.parameters())
    assert type(model.model.language_model.embed_tokens.weight) is torch.nn.Parameter


def test_weight_bytes_shrink_by_part_as_computed(quantized: LoadedModel, loaded: LoadedModel) -> None:
    """Measured from the tensors == computed from the config (float32 elsewhere: itemsize 4)."""
    fmt = "nf4" if quantized.model.config.quantization_config.quant_method == "bitsandbytes" else "int8"
    measured, plain = loaded_bytes(quantized.model), loaded_bytes(loaded.model)
    assert measured == format_bytes(loaded.model.config, fmt, itemsize=4)  # type: ignore[arg-type]
    assert plain == format_bytes(loaded.model.config, "bf16", itemsize=4)
    assert (measured.encoder, measured.projector, measured.embedding, measured.head) == (
        plain.encoder, plain.projector, plain.embedding, plain.head
    )  # fmt: skip
    assert measured.decoder < plain.decoder * (0.3 if fmt == "int8" else 0.2)


def test_the_pure_count_gives_voxtral_minis_figures() -> None:
    """The issue's figures for Voxtral Mini: 0.64 B audio encoder, 3.21 B decoder linears, 0.40 B embedding and
    head; and Small's 48.5 GB in bfloat16."""
    configs = voxtral_configs()
    mini = params_by_part(configs["Voxtral Mini"])
    assert [round(n / 1e9, 2) for n in (mini.encoder, mini.decoder, mini.embedding, mini.head)] == [
        0.64, 3.21, 0.40, 0.40
    ]  # fmt: skip
    assert round(format_bytes(configs["Voxtral Small"], "bf16").total / 1e9, 1) == 48.5
    nf4 = format_bytes(configs["Voxtral Mini"], "nf4").decoder
    assert nf4 > mini.decoder * (0.5 + 4 / 64)  # half a byte a weight and a float32 absmax a block, norms aside


def test_the_readme_table_is_computed_from_the_configs() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert memory_table(voxtral_configs()) in readme


def test_fp8_on_a_cpu_is_refused_before_loading(tiny_dir: Path) -> None:
    """`serve --quantization fp8` on a CPU: exit 2 and one line, before any model loads."""
    done = subprocess.run(
        [sys.executable, "-m", "app.main", "serve", "--model", "tiny", "--device", "cpu", "--quantization", "fp8"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=os.environ | {"VOXTRAL_CACHE_DIR": str(tiny_dir)},
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("voxtral-server:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith("voxtral-server: --quantization fp8 needs a CUDA GPU of compute capability 8.9")
    assert "this is a CPU: use --quantization int8" in lines[0]


def test_an_int8_checkpoint_saved_loads_quantized_and_refuses_another_format(
    int8: LoadedModel, tmp_path: Path, prompter: Prompter, log_mel: LogMel
) -> None:
    quantized = int8
    out = tmp_path / "int8"
    quantized.model.save_pretrained(out)
    quantized.processor.save_pretrained(out)
    for name in ("tekken.json",):
        (out / name).write_bytes((Path(quantized.path) / name).read_bytes())
    again = load_model(Settings(model=str(out)))  # no --quantization: as saved
    weight = again.model.model.language_model.layers[0].self_attn.q_proj.weight
    assert type(weight) is type(quantized.model.model.language_model.layers[0].self_attn.q_proj.weight)
    request = _requests(prompter)[1]
    assert _greedy(again.model, log_mel, request, 8)[0] == _greedy(quantized.model, log_mel, request, 8)[0]
    assert quantized.fingerprint != load_model(Settings(model=quantized.path)).fingerprint  # answers differ
    load_model(Settings(model=str(out), quantization="int8"))  # the same format: no objection
    with pytest.raises(ModelLoadError, match=r"already quantized \(int8"):
        preflight(Settings(model=str(out), quantization="bitsandbytes"))


def test_a_request_through_the_app_with_int8(int8: LoadedModel, tiny_dir: Path) -> None:
    with serve(int8, tiny_dir, quantization="int8") as server:
        answer = server.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0
        )
    assert answer.choices[0].message.content and answer.usage.completion_tokens == 6


def test_quantized_and_sharded_together_is_refused() -> None:
    """The quantized step calls each module's own forward, which transformers' plan all-reduces itself: the lean
    step's reduction on top would count every shard twice, so the pair is refused at the settings."""
    with pytest.raises(ValueError, match="exclusive"):
        Settings(tensor_parallel_size=2, quantization="int8")
    assert Settings(tensor_parallel_size=2).quantization == "none"


@pytest.mark.parametrize("decoder", ["plain", "int8"])
def test_a_checkpoint_with_a_quantized_head_decodes_as_its_dequantized_head(
    decoder: str, loaded: LoadedModel, int8: LoadedModel, prompter: Prompter, log_mel: LogMel
) -> None:
    """A checkpoint saved with its head quantized too (another tool's choice; ours keeps it): the decode step
    computes the head through its module (its format's kernel), where `weight.t()` is no operation a quantized
    tensor has; the logits are those of the same head dequantized, the tokens equal."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = copy.deepcopy((loaded if decoder == "plain" else int8).model)
    quantize_(model.lm_head, Int8WeightOnlyConfig())
    reference = copy.deepcopy(model)
    reference.lm_head.weight = torch.nn.Parameter(_dequantize(model.lm_head.weight), requires_grad=False)
    assert decoder_for(model).head_module is model.lm_head and decoder_for(reference).head_module is None
    for request in _requests(prompter):
        tokens, logits = _greedy(model, log_mel, request, 8)
        expected, want = _greedy(reference, log_mel, request, 8)
        gaps = [float((a - b).abs().max()) for a, b in zip(logits, want, strict=True)]
        assert max(gaps) < LOGIT_TOL, gaps
        assert min(float(t.topk(2).values.diff().abs()) for t in want) > LOGIT_TOL  # decided, not a tie
        assert tokens == expected
