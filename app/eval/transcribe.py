"""One configuration's pass over the evaluation set: load, start the engine the way the server does (warm-up,
the decode step's CUDA graphs), transcribe every file through `Serving.transcribe` (the call an HTTP upload
makes: the same decoding, prompts, queue, batcher and detokenizer) at temperature 0, then stop and free it all so
the next configuration's weights fit where these were. Files are cut as an upload with `chunking_strategy` is
(by default "auto": Silero VAD pieces of at most 30 s, app/chunking.py), so a file longer than the context is
transcribed in pieces, not refused; the hypothesis is the pieces' text joined as the HTTP answer joins it.
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import time
from dataclasses import dataclass

import torch

from app.config import Settings
from app.errors import VoxtralError
from app.eval.corpus import Sample
from app.metrics import Metrics
from app.model.compute.loader import load_model
from app.model.runtime import ModelRuntime
from app.serving.prep import Read
from app.serving.service import Serving
from app.serving.transcription import Upload
from app.serving.transcription_request import AudioForm
from app.wiring import build_engine

log = logging.getLogger(__name__)


class TranscriptionFailed(RuntimeError):
    """A file the server refused (undecodable audio, too long, ...): the eval stops, naming it."""


@dataclass(frozen=True)
class Hypothesis:
    sample_id: str
    text: str
    token_ids: list[int]
    """Every generated token of the file's pieces, in order, as the engine returned them."""


def transcribe_set(
    settings: Settings,
    samples: list[Sample],
    language: str | None = None,
    concurrency: int = 1,
    chunking_strategy: str | None = "auto",
) -> list[Hypothesis]:
    """Hypotheses in `samples`' order. `concurrency` files are in flight at once: 1 runs each alone, so no
    batch composition can differ between two configurations; more runs them as rows of shared batches.
    `chunking_strategy`: the HTTP field's value ("auto", a server_vad JSON object; None: each file whole)."""
    started = time.monotonic()
    loaded = load_model(settings)
    try:
        runtime = ModelRuntime.of(loaded, settings)
        out = asyncio.run(_run(settings, runtime, samples, language, concurrency, chunking_strategy))
    finally:
        del loaded
        _free()
    log.info("%d files transcribed in %.1f s (%s)", len(samples), time.monotonic() - started, settings.model)
    return out


async def _run(
    settings: Settings,
    runtime: ModelRuntime,
    samples: list[Sample],
    language: str | None,
    concurrency: int,
    chunking_strategy: str | None,
) -> list[Hypothesis]:
    engine = build_engine(settings, runtime, Metrics())
    serving = Serving(settings, engine, runtime)
    engine.start()
    try:
        await serving.warm_up()
        await asyncio.to_thread(runtime.generator.capture)
        form = AudioForm(
            model=settings.model_id,
            response_format="json",
            temperature=0.0,
            language=language,
            chunking_strategy=chunking_strategy,
        )
        slots = asyncio.Semaphore(concurrency)

        async def one(sample: Sample) -> Hypothesis:
            async with slots:
                return await _transcribe(serving, form, sample)

        return list(await asyncio.gather(*(one(s) for s in samples)))
    finally:
        engine.stop()
        serving.close()


async def _transcribe(serving: Serving, form: AudioForm, sample: Sample) -> Hypothesis:
    upload = Upload(_reader(sample.audio.read_bytes()), sample.audio.name)
    try:
        transcript = await (await serving.transcribe(form, upload, "transcribe")).result()
    except VoxtralError as exc:
        raise TranscriptionFailed(f"{sample.audio}: {exc}") from exc
    tokens = [token for piece in transcript.pieces for token in piece.token_ids]
    return Hypothesis(sample.id, transcript.text, tokens)


def _reader(data: bytes) -> Read:
    """An upload's `read(size)` over bytes already in memory."""
    stream = io.BytesIO(data)

    async def read(size: int) -> bytes:
        return stream.read(size)

    return read


def _free() -> None:
    """Drop what the finished configuration left (reference cycles included) and hand its GPU memory back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
