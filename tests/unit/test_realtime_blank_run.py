"""The blank-token rut rule (app/serving/realtime/streamer.py: `blank_run`): frames of speech audio without text,
never the model's delay nor the flush's padding."""

from __future__ import annotations

from app.serving.realtime.streamer import blank_run

DELAY = 6  # a stream's first token has frame == DELAY and speaks for audio frame 0


def test_the_first_token_speaks_for_the_first_audio_frame() -> None:
    assert blank_run(DELAY, DELAY, 10, None) == 1
    assert blank_run(DELAY + 9, DELAY, 10, None) == 10


def test_the_delay_is_no_audio() -> None:
    assert blank_run(DELAY - 1, DELAY, 10, None) == 0
    assert blank_run(0, DELAY, 10, None) == 0


def test_the_flush_padding_is_no_audio() -> None:
    """Tokens past the whole frames fed speak for the right padding: never a run, however long."""
    assert [blank_run(frame, DELAY, 10, None) for frame in range(DELAY + 10, DELAY + 40)] == [0] * 30


def test_a_run_starts_after_the_last_text() -> None:
    assert blank_run(DELAY + 3, DELAY, 10, DELAY + 3) == 0  # (the guard does not ask for a token with text)
    assert blank_run(DELAY + 4, DELAY, 10, DELAY + 3) == 1
    assert blank_run(DELAY + 9, DELAY, 10, DELAY + 3) == 6


def test_runs_over_a_token_sequence() -> None:
    """A guard's view of one stream: text at audio frames 0 and 2, then 7 frames of speech without text, then the
    padding: the longest run is 7 frames, whatever the padding adds."""
    texts = [True, False, True] + [False] * 7 + [False] * 20
    longest, last = 0, None
    for audio, has_text in enumerate(texts):
        frame = DELAY + audio
        if has_text:
            last = frame
        else:
            longest = max(longest, blank_run(frame, DELAY, 10, last))
    assert longest == 7
