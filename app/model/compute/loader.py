"""Load a Voxtral checkpoint (local directory, hub id or the built-in tiny model) onto its device.

The same `from_pretrained` calls serve every checkpoint, so the tiny test model exercises the
code path a real Voxtral-Small deployment runs. `preflight` checks in a second what would otherwise
fail minutes into a load (device, dtype, the checkpoint's files), each failure one line saying what to do.

On a GPU the whole model goes on one (`placement`): spread over several, accelerate runs one GPU at a time and
pays its per-module hooks every step, so the model is spread only when told (`--device-map auto`).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlparse

import torch

from app.config import TINY_MODEL, TINY_REALTIME_MODEL, Settings
from app.model.compute.footprint import Format, format_bytes, loaded_bytes
from app.model.compute.parallel import Followers
from app.model.compute.quantization import (
    Quantization,
    keep_compute_dtype,
    load_config,
    refusal,
    saved_quantization,
)
from app.model.compute.slots import CacheShape
from app.model.fingerprint import system_fingerprint
from app.model.tiny import build_tiny_model, build_tiny_realtime_model, is_tiny

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded; the message says what to do instead."""


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    path: str
    random_weights: bool
    load_seconds: float
    fingerprint: str
    """`system_fingerprint` of every chat answer: files, dtype, attention kernel, device, server version."""
    followers: Followers | None = None
    """Rank 0 of a tensor-parallel load: its pipes to the other ranks (app/model/ranks.py); None: one process."""


CHECKPOINT_FILES = ("config.json", "tekken.json")
"""Files every Voxtral checkpoint directory holds, besides its processor config and its weights."""
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
WEIGHTS_INDEX = "model.safetensors.index.json"


def preflight(settings: Settings) -> None:
    """Raise `ModelLoadError` (one line: what is wrong, what to do) on what can be known before loading:
    a device this torch cannot use, a dtype the device cannot compute in, a checkpoint missing files."""
    try:
        device = torch.device(resolve_device(settings.device))
    except RuntimeError as exc:
        raise ModelLoadError(f"--device {settings.device!r} is not a device: use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda":
        _check_cuda(settings.device, device)
        if settings.tensor_parallel_size > torch.cuda.device_count():
            raise ModelLoadError(
                f"--tensor-parallel-size {settings.tensor_parallel_size} needs as many GPUs; this machine shows "
                f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES decides which)."
            )
    elif settings.tensor_parallel_size > 1 and torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator()
        raise ModelLoadError(
            f"--device {settings.device} --tensor-parallel-size {settings.tensor_parallel_size}: transformers puts "
            f"tensor-parallel shards on the machine's accelerator ({accelerator}), whatever --device says; use "
            "--device cuda, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to shard over CPU processes."
        )
    _check_dtype(resolve_dtype(settings.dtype, device.type), device)
    if settings.model not in (TINY_MODEL, TINY_REALTIME_MODEL):
        check_model_source(settings.model)
        if Path(settings.model).is_dir():
            check_checkpoint_files(Path(settings.model))
    _check_quantization(settings, device)
    check_sharding(settings, settings.model)


def check_sharding(settings: Settings, model: str) -> None:
    """Refuse what a Voxtral Realtime checkpoint (`model`: its name, directory or hub id; one not cached yet is
    checked again once loaded) cannot run with: `--tensor-parallel-size` > 1 (its streams run in rank 0's
    realtime engine, which no other rank repeats, so the first sharded step would wait in an all-reduce for
    ever), and an attention other than sdpa (its rings are attended in ring order under a boolean mask of
    [rows, 1, new, ring] that eager attention would add as 0/1 instead of masking, and FlashAttention-2 would
    read as a padding mask)."""
    if not is_realtime(model):
        return
    if settings.tensor_parallel_size > 1:
        raise ModelLoadError(
            f"--tensor-parallel-size {settings.tensor_parallel_size}: {model} is a Voxtral Realtime checkpoint, "
            "which is served by one process; use --tensor-parallel-size 1."
        )
    if settings.attn_implementation != "sdpa":
        raise ModelLoadError(
            f"--attn-implementation {settings.attn_implementation}: {model} is a Voxtral Realtime checkpoint, "
            "whose streams are attended with sdpa only; use --attn-implementation sdpa."
        )


def is_realtime(model: str) -> bool:
    """`model` (`tiny-realtime`, a directory or a cached hub id) is a Voxtral Realtime checkpoint."""
    if model in (TINY_MODEL, TINY_REALTIME_MODEL):
        return model == TINY_REALTIME_MODEL
    local = Path(model) if Path(model).is_dir() else _cached(model)
    return local is not None and _config(local).get("model_type") == REALTIME_MODEL_TYPE


def _check_quantization(settings: Settings, device: torch.device) -> str | None:
    """--quantization this device can run, not contradicting what a local checkpoint was saved as (returned:
    `saved_quantization`)."""
    local = None if settings.model == TINY_MODEL else Path(settings.model)
    if local is not None and not local.is_dir():
        local = _cached(settings.model)  # a hub id: its config where it is cached (else checked once fetched)
    saved = saved_quantization(_config(local)) if local is not None else None
    why = refusal(settings.quantization, saved, device)
    if why is not None:
        raise ModelLoadError(why)
    return saved


def _check_cuda(flag: str, device: torch.device) -> None:
    if torch.version.cuda is None and torch.version.hip is None:
        raise ModelLoadError(
            f"--device {flag}: this torch ({torch.__version__}) is a CPU-only build; install torch's CUDA build "
            "(README, 'On a GPU') or use --device cpu."
        )
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"--device {flag}: no CUDA GPU is visible (no driver, or CUDA_VISIBLE_DEVICES hides them); "
            "check nvidia-smi, or use --device cpu."
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {flag}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0.")


def _check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"--dtype {name}: this GPU cannot compute in bfloat16; use --dtype float16.")
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_supports(dtype):
        raise ModelLoadError(
            f"--dtype {name}: this CPU has no {name} instructions (torch would emulate them, many times slower "
            "than float32); use --dtype float32 (the default on a CPU)."
        )


def cpu_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN computes in `dtype` natively on this CPU (AVX-512 BF16/FP16, AMX, Arm BF16)."""
    probe = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):  # a torch without the probe: let the load try
        return True


def check_checkpoint_files(path: Path) -> None:
    """A local checkpoint directory has its config, tokenizer, processor config and every weight file."""
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        missing.append(PROCESSOR_FILES[0])
    missing += _missing_weights(path)
    if missing:
        raise ModelLoadError(
            f"Checkpoint directory {str(path)!r} is missing {', '.join(missing)}: download the whole "
            "checkpoint (e.g. `hf download mistralai/Voxtral-Mini-3B-2507 --local-dir DIR`)."
        )


def _missing_weights(path: Path) -> list[str]:
    index = path / WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        return [shard for shard in shards if not (path / shard).is_file()]
    return [] if (path / "model.safetensors").is_file() else ["model.safetensors (or its shards and index)"]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[dtype]


def resolve_model_path(settings: Settings) -> str:
    """`tiny` (and `tiny-realtime`) become a directory built once under the cache; anything else is passed
    through."""
    if settings.model == TINY_REALTIME_MODEL:
        target = settings.cache_dir / f"tiny-realtime-seed{settings.tiny_seed}"
        if not is_tiny(target):
            build_tiny_realtime_model(target, seed=settings.tiny_seed)
        return str(target)
    if settings.model != TINY_MODEL:
        return settings.model
    target = settings.cache_dir / f"tiny-seed{settings.tiny_seed}"
    if not is_tiny(target):
        build_tiny_model(target, seed=settings.tiny_seed)
    return str(target)


def check_model_source(model: str) -> None:
    """Fail fast, before any heavy import, on a path that cannot be a checkpoint."""
    path = Path(model)
    looks_local = model.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ModelLoadError(
            f"Model path {model!r} does not exist or is not a directory. "
            "Give a local checkpoint directory, a hub id such as mistralai/Voxtral-Mini-3B-2507, "
            "or --model tiny for the random demo model."
        )
    if not looks_local:
        _check_hub(model)


def _check_hub(model: str) -> None:
    """A hub id must be cached or the hub reachable; otherwise say so now instead of retrying for minutes."""
    from huggingface_hub import constants, snapshot_download

    try:
        snapshot_download(model, local_files_only=True, allow_patterns=["*.json"])
        return
    except Exception:  # not cached: fall through to the reachability check
        pass
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        if constants.HF_HUB_OFFLINE:
            raise OSError("HF_HUB_OFFLINE is set")
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        raise ModelLoadError(
            f"Model {model!r} is not in the local Hugging Face cache and the hub ({host}) cannot be reached "
            f"({exc}). Download it on a machine with network access, pass a local directory, "
            "or use --model tiny for the random demo model."
        ) from exc


GIB = 1 << 30
RESERVE_BYTES = 2 * GIB
"""Room a GPU keeps beyond the weights and the KV budget: the CUDA context, prefill activations, workspaces."""


def placement(weights_bytes: int, kv_bytes: int, free_per_device: list[int], requested: str | None) -> str:
    """Where the model goes (transformers' `device_map`): "cpu" without a GPU, "auto" (spread over every GPU)
    when `requested` so and there are several, else "cuda:0" (the whole model on GPU 0). Raises
    `ModelLoadError` where the weights alone (plus `RESERVE_BYTES`) do not fit GPU 0's free memory but several
    GPUs could hold them: spreading is never silent. Weights that fit beside less than the KV cache the settings
    ask for (`kv_bytes`) still go on GPU 0: the cache then gets fewer slots, so fewer rows decode at once
    (app/model/compute/budget.py); the caller warns. Pure: sizes in bytes, `free_per_device` as
    `torch.cuda.mem_get_info` gives them."""
    if not free_per_device:
        return "cpu"
    if requested == "auto" and len(free_per_device) > 1:
        return "auto"
    if len(free_per_device) > 1 and weights_bytes + RESERVE_BYTES > free_per_device[0]:
        raise ModelLoadError(
            f"The weights ({weights_bytes / GIB:.1f} GiB) do not fit GPU 0 ({free_per_device[0] / GIB:.1f} GiB "
            f"free); pass --device-map auto to spread the model over the {len(free_per_device)} GPUs."
        )
    return "cuda:0"


def weights_bytes(path: Path, dtype: torch.dtype) -> int | None:
    """The checkpoint's weights in `dtype`, from its safetensors files' sizes (the sharded index's shards, else
    model.safetensors: a Mistral-format consolidated.safetensors beside them is not counted twice); None where
    they are not on disk."""
    index = path / WEIGHTS_INDEX
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        files = [path / shard for shard in shards]
    else:
        files = [path / "model.safetensors"]
    if not files or not all(f.is_file() for f in files):
        return None
    stored = sum(f.stat().st_size for f in files)
    saved = str(_config(path).get("torch_dtype") or _config(path).get("dtype") or "bfloat16")
    ratio = _itemsize(dtype) / _itemsize(_DTYPES.get(saved, torch.bfloat16))
    return int(stored * ratio)


QUANTIZED_FORMAT: dict[str, Format] = {"int8": "int8", "bitsandbytes": "nf4", "fp8": "fp8"}
"""The weight format (app/model/compute/footprint.py) each --quantization loads the decoder's linears in."""


def expected_weights(path: Path, dtype: torch.dtype, quantization: Quantization) -> int | None:
    """The weights as they will be loaded: `weights_bytes` of the files, unless --quantization converts them at
    load (a checkpoint saved quantized is its files' size), then `footprint.format_bytes` of the checkpoint's
    config in that format, the rest in `dtype`. A Voxtral Realtime checkpoint keeps its files' size: an upper
    bound, as its parts are not named in the footprint."""
    config = _config(path)
    if quantization == "none" or saved_quantization(config) is not None or "text_config" not in config:
        return weights_bytes(path, dtype)
    if config.get("model_type") == REALTIME_MODEL_TYPE:
        return weights_bytes(path, dtype)
    from transformers import VoxtralConfig

    voxtral = VoxtralConfig.from_dict(config)
    return format_bytes(voxtral, QUANTIZED_FORMAT[quantization], _itemsize(dtype)).total


def kv_bytes(path: Path, dtype: torch.dtype, tokens: int) -> int:
    """The KV cache of `tokens` positions: keys and values of every layer, read from the checkpoint's config
    before the model is loaded (a 7B-sized Mistral where it says nothing)."""
    text = {"num_attention_heads": 32, "hidden_size": 4096, "num_hidden_layers": 32}
    text |= _config(path).get("text_config", {})
    return CacheShape.of(SimpleNamespace(**text), dtype).token_bytes * tokens


def _config(path: Path) -> dict[str, Any]:
    config = path / "config.json"
    return dict(json.loads(config.read_text(encoding="utf-8"))) if config.is_file() else {}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _device_map(settings: Settings, path: str, device: str, dtype: torch.dtype) -> str:
    """`placement` on this machine (GPU 0's free memory, the checkpoint's sizes), logged with why."""
    if device != "cuda":
        return device
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    local = Path(path) if Path(path).is_dir() else _cached(path)
    weights = expected_weights(local, dtype, settings.quantization) if local is not None else None
    kv = kv_wanted(settings, local, dtype)
    chosen = placement(weights or 0, kv, free, settings.device_map)
    size = "unknown" if weights is None else f"{weights / GIB:.1f} GiB"
    quantized = "" if settings.quantization == "none" else f" as --quantization {settings.quantization} loads them"
    sizes = f"weights {size}{quantized}, KV cache {kv / GIB:.1f} GiB"
    gpus = ", ".join(f"cuda:{i} {f / GIB:.1f} GiB free" for i, f in enumerate(free))
    log.info("placing the model on %s (%s at most; %s)", chosen, sizes, gpus)
    room = min(free[0], int(settings.gpu_memory_utilization * torch.cuda.mem_get_info(0)[1]))
    if chosen == "cuda:0" and (weights or 0) + kv + RESERVE_BYTES > room:
        log.warning(
            "the weights and %d KV cache slots of %d positions (--max-batch-size, --context-length) do not fit "
            "GPU 0 together: fewer slots will, so fewer rows decode at once (logged once loaded); lower "
            "--context-length%s",
            settings.max_batch_size,
            settings.context_length,
            " or pass --device-map auto" if len(free) > 1 else "",
        )
    return chosen


def kv_wanted(settings: Settings, path: Path | None, dtype: torch.dtype) -> int:
    """The most KV cache the settings ask for: --kv-cache-memory-bytes, else --max-batch-size slots (and the
    scratch slot padding rows write to) of --context-length positions (app/model/compute/slots.py); 0 where
    the checkpoint's config is unknown."""
    if settings.kv_cache_memory_bytes is not None:
        return settings.kv_cache_memory_bytes
    if path is None:
        return 0
    return kv_bytes(path, dtype, (settings.max_batch_size + 1) * settings.context_length)


def _cached(model: str) -> Path | None:
    """A hub checkpoint's directory in the local cache, where it is there already."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached: its size is unknown before the download
        return None


def log_memory(model: Any) -> None:
    """Each GPU the model uses: what torch holds there and what is free."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    for index in devices:
        free, total = torch.cuda.mem_get_info(index)
        held = torch.cuda.memory_allocated(index)
        log.info("cuda:%d: model %.1f GiB, %.1f GiB free of %.1f GiB", index, held / GIB, free / GIB, total / GIB)


REALTIME_MODEL_TYPE = "voxtral_realtime"


def model_class(path: str) -> Any:
    """The transformers class of a checkpoint: Voxtral Realtime where its config.json says `voxtral_realtime`
    (a local directory or a cached hub id), else Voxtral."""
    from transformers import VoxtralForConditionalGeneration, VoxtralRealtimeForConditionalGeneration

    if is_realtime(path):
        return VoxtralRealtimeForConditionalGeneration
    return VoxtralForConditionalGeneration


def _sharded(ranks: int) -> dict[str, Any]:
    """transformers' tensor-parallel plan over `ranks` ranks (torch.distributed already set up: app/model/ranks.py),
    or nothing for one process."""
    if ranks == 1:
        return {}
    from transformers.distributed.configuration_utils import DistributedConfig

    return {"distributed_config": DistributedConfig(tp_size=ranks)}


def _quantized_as(model: Any) -> str:
    """The weights' format as the fingerprint's suffix ("+int8", "+bitsandbytes", ...; answers differ with it),
    or the empty string where they are not quantized."""
    saved = getattr(model.config, "quantization_config", None)
    if saved is None:
        return ""
    return "+" + str(saved_quantization({"quantization_config": saved.to_dict()}))


def load_model(settings: Settings) -> LoadedModel:
    from transformers import AutoProcessor

    started = time.perf_counter()
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    path = resolve_model_path(settings)
    check_model_source(path)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    ranks = settings.tensor_parallel_size
    device_map = _device_map(settings, path, device, dtype) if ranks == 1 else None
    saved = _check_quantization(settings.model_copy(update={"model": path}), torch.device(device))
    quantization = load_config(settings.quantization, dtype) if saved is None else None  # as saved, else asked
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = model_class(path).from_pretrained(
            path,
            dtype=dtype,
            device_map=device_map,
            attn_implementation=settings.attn_implementation,
            quantization_config=quantization,
            **_sharded(ranks),
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load model {path!r}: {exc}. If this is a hub id, the machine may have no network "
            "access or no cached copy; download it first or pass a local directory. "
            "For a demo without weights use --model tiny."
        ) from exc
    check_sharding(settings, path)  # a hub id is known only once fetched
    model.eval()
    keep_compute_dtype(model, dtype)
    log_memory(model)
    log.info("weights by part (MiB): %s", loaded_bytes(model).describe())
    first_device = next(model.parameters()).device
    attention = str(getattr(model.config, "_attn_implementation", settings.attn_implementation))
    precision = str(dtype).removeprefix("torch.") + _quantized_as(model)
    fingerprint = system_fingerprint(path, precision, attention, first_device.type)
    elapsed = time.perf_counter() - started
    return LoadedModel(model, processor, first_device, dtype, path, is_tiny(path), elapsed, fingerprint)
