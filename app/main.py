"""Command line: `voxtral-server serve [flags]`, `eval DIR [flags]` (the quality gate) and `tiny-model DIR`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from app.config import Settings


def _serve(argv: list[str]) -> int:
    from app.api.auth import ApiKeyFileError, load_api_keys
    from app.config import Settings, cli_args
    from app.logs import configure_logging
    from app.model.compute.loader import ModelLoadError, preflight
    from app.server import build_server
    from app.wiring import Wiring

    try:
        settings = Settings(_cli_parse_args=cli_args(argv))  # type: ignore[call-arg]
        load_api_keys(settings)  # a bad key file fails now, not after minutes of model loading
    except (ValidationError, ApiKeyFileError) as exc:
        print(f"voxtral-server: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        preflight(settings)  # one clear line now, not a traceback once the server is up
    except ModelLoadError as exc:
        print(f"voxtral-server: {exc}", file=sys.stderr)
        return 2
    if settings.tensor_parallel_size > 1:
        return _serve_ranks(settings)
    wiring = Wiring(settings)  # the server listens at once; the model loads in the background
    build_server(wiring.app, settings, wiring.drain, wiring.failed).run()
    return 1 if wiring.failed() else 0


def _serve_ranks(settings: Settings) -> int:
    """`--tensor-parallel-size N`: start ranks 1..N-1, serve as rank 0; a lost rank stops the server (exit 1)."""
    from app.model.ranks import Ranks
    from app.server import build_server
    from app.wiring import Wiring

    ranks = Ranks(settings)
    try:
        wiring = Wiring(settings, load=ranks.load)
        ranks.on_lost(wiring.fail)  # /ready answers 503 at once, and the server stops
        build_server(wiring.app, settings, wiring.drain, wiring.failed).run()
    finally:
        ranks.stop()
    return 1 if wiring.failed() else 0


def _tiny(argv: list[str]) -> int:
    from app.model.tiny import build_tiny_model, build_tiny_realtime_model

    parser = argparse.ArgumentParser(prog="voxtral-server tiny-model", description="Build the random tiny Voxtral.")
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-version", default="v11", choices=["v7", "v11", "v13"])
    parser.add_argument(
        "--full-vocab",
        action="store_true",
        help="the real checkpoints' 131,072-token vocabulary (for benchmarks of per-token work); default 3,000",
    )
    parser.add_argument("--realtime", action="store_true", help="a random tiny Voxtral Realtime (streaming) instead")
    args = parser.parse_args(argv)
    if args.realtime:
        path = build_tiny_realtime_model(args.directory, seed=args.seed)
        print(f"tiny random Voxtral Realtime written to {path} (random weights, for tests and demos)")
        return 0
    path = build_tiny_model(
        args.directory, seed=args.seed, tokenizer_version=args.tokenizer_version, full_vocab=args.full_vocab
    )
    print(f"tiny random Voxtral written to {path} (random weights, for tests and demos)")
    return 0


def _eval(argv: list[str]) -> int:
    from app.eval.cli import main

    return main(argv)


def cli(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # `serve` replaces it from its settings
    commands = {"serve": _serve, "eval": _eval, "tiny-model": _tiny}
    if not argv or argv[0] not in commands:
        print(
            "usage: voxtral-server {serve,eval,tiny-model} [options]   (serve --help for every setting)",
            file=sys.stderr,
        )
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(cli())
