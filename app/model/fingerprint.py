"""`system_fingerprint`: one short id for the configuration that serves a chat answer.

OpenAI sends it so a client can tell when the backend changed under a model name and outputs may
change with it. Here it covers what changes outputs: the checkpoint's files, the dtype, the attention
kernel, the device type, and this server's version. Computed once at load.

Weights are not read whole (a real checkpoint is several GB): each file counts by name and size, and
by the hash of its contents where it is small (configs, tokenizer, the tiny model) or else of its
first and last MiB (the safetensors header, which names every tensor, and the last tensors' values),
enough to tell a fine-tune from its base.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

_WHOLE_FILE_BYTES = 16 * 2**20
_EDGE_BYTES = 2**20


def server_version() -> str:
    try:
        return importlib.metadata.version("voxtral-server")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "source"


def system_fingerprint(checkpoint: str, dtype: str, attention: str, device: str) -> str:
    """`fp_` and 10 hex digits, like OpenAI's."""
    identity = {
        "files": checkpoint_identity(checkpoint),
        "dtype": dtype,
        "attention": attention,
        "device": device,
        "server": server_version(),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"fp_{digest[:10]}"


def checkpoint_identity(checkpoint: str) -> Any:
    """Every file of a local checkpoint directory; a hub id as its resolved snapshot, if cached."""
    directory = Path(checkpoint)
    if not directory.is_dir():
        directory = _cached_snapshot(checkpoint) or directory
    if not directory.is_dir():
        return checkpoint
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [[str(p.relative_to(directory)), p.stat().st_size, _content_hash(p)] for p in files]


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= _WHOLE_FILE_BYTES:
            digest.update(f.read())
        else:
            digest.update(f.read(_EDGE_BYTES))
            f.seek(size - _EDGE_BYTES)
            digest.update(f.read(_EDGE_BYTES))
    return digest.hexdigest()


def _cached_snapshot(hub_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not a cached hub id: its name stands for it
        return None
