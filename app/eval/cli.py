"""`voxtral-server eval DIRECTORY [serve flags] [--against key=value ...] [--json]`.

The baseline is the serve flags given (`--model`, `--dtype`, ...); `--against` names a candidate as overrides
of them. The baseline is loaded, run over every file and freed, then the candidate is (real weights do not fit
twice). Without `--against`, only the baseline's WER is reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from app.config import Settings, cli_args
from app.errors import VoxtralError
from app.eval.configs import OverrideError, candidate, parse_overrides
from app.eval.corpus import CorpusError, find_samples
from app.eval.report import Report, Run, render_json, render_text
from app.eval.transcribe import TranscriptionFailed, transcribe_set
from app.model.compute.loader import ModelLoadError
from app.serving.transcription_request import AudioForm, chunking


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxtral-server eval",
        usage="voxtral-server eval DIRECTORY [--against KEY=VALUE ...] [--language L] [--concurrency N] "
        "[--chunking-strategy auto|none|JSON] [--json] [serve flags]",
        allow_abbrev=False,
        description="Word error rate of a configuration, and the token agreement of a second one with it, over a "
        "directory of audio with reference texts (NAME.txt beside each audio file, or LibriSpeech's *.trans.txt). "
        "Every other flag is a serve flag (voxtral-server serve --help) and sets the baseline.",
    )
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the candidate configuration that differs from the baseline (repeatable), "
        "e.g. --against dtype=bfloat16",
    )
    parser.add_argument("--language", default=None, help="the language of every file (default: the model detects)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="files in flight at once (default 1: each decoded alone, so both configurations see the same batches)",
    )
    parser.add_argument(
        "--chunking-strategy",
        default="auto",
        help='how each file is cut, as the HTTP field chunking_strategy: "auto" (default: pieces of at most 30 s '
        'around the speech, so a file longer than the context is transcribed), a server_vad JSON object, or "none" '
        "(each file whole, one request: refused where it does not fit --context-length)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON, with every file's tokens")
    return parser


def main(argv: list[str]) -> int:
    parser = _parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_known_args(argv[:1])  # -h, --help: the help, and exit
        parser.error("the DIRECTORY of audio and reference texts comes first")
    directory, (args, serve_flags) = Path(argv[0]), parser.parse_known_args(argv[1:])
    try:
        baseline = Settings(_cli_parse_args=cli_args(serve_flags))  # type: ignore[call-arg]
        other = candidate(baseline, parse_overrides(args.against)) if args.against else None
        samples = find_samples(directory)
        chunks = None if args.chunking_strategy == "none" else args.chunking_strategy
        chunking(AudioForm(baseline.model_id, "json", 0.0, chunking_strategy=chunks))  # refused before loading
    except (ValidationError, OverrideError, CorpusError, VoxtralError) as exc:
        print(f"voxtral-server eval: {exc}", file=sys.stderr)
        return 2
    if args.concurrency < 1:
        print("voxtral-server eval: --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        hypotheses = transcribe_set(baseline, samples, args.language, args.concurrency, chunks)
        runs = [Run.score("baseline", samples, hypotheses)]
        if other is not None:
            hypotheses = transcribe_set(other, samples, args.language, args.concurrency, chunks)
            runs.append(Run.score(" ".join(args.against), samples, hypotheses))
    except (ModelLoadError, TranscriptionFailed) as exc:
        print(f"voxtral-server eval: {exc}", file=sys.stderr)
        return 1
    report = Report(samples, *runs)
    print(render_json(report) if args.json else render_text(report))
    return 0
