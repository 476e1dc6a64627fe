"""Voxtral Realtime streaming at the model layer: audio streams in, one token per 80 ms out, many streams
batched in one forward a tick.

What the serving layer calls (`engine.RealtimeEngine`, built from the loaded model and its processor):

    engine = RealtimeEngine(model, processor, max_streams=32)   # every stream cache allocated here, once
    sid = engine.open(delay)         # delay: "minimal".."xhigh" (OpenAI's session enum), ms (80..2400, a
                                     # multiple of 80) or None (the checkpoint's 480 ms); ValueError, RuntimeError
    engine.feed(sid, samples)        # float32 mono 16 kHz, any length; resampling happens before
    engine.flush(sid)                # commit / end of speech: the model's right-padding flush
    result = engine.tick()           # TickResult: steps (StreamStep per stepped stream), rows, padded_rows, gathered
    engine.close(sid)                # frees the slot at once; the other streams do not notice
    engine.ready(), engine.backlog(sid), engine.held_samples(sid), engine.cache_bytes()

A tick steps every stream that holds a new token-frame of audio (1,280 samples and the half window the log-mel
reads past it) by ONE token: streams past their first frame share one forward (rows padded to the slot
cache's batch sizes, padding rows on a scratch slot); a stream's first frame runs its prompt (BOS, 32
left-pad and `delay` streaming-pad tokens) in a forward of its own, one per delay among the streams starting.
Different delays share the step forward: the delay conditions each row through its own `t_cond`. A
`StreamStep` carries the token id, its text piece (UTF-8 safe: incremental byte decoding), the audio frame
that produced it and `final` (the last token after a flush; the stream is then finished: close it, open a new
one for the next utterance). A stream that holds several frames (it fell behind) gets one token a tick.
Token ids are the model's raw greedy choices: [STREAMING_PAD] (and [STREAMING_WORD]) carry no text; an EOS is
returned like any token.

Threading: not thread-safe. One worker thread owns the engine and makes every call; the event loop hands it
audio and takes results through queues.

Memory: `StreamPool` allocates, per slot, the convolutions' left context and rings of the last
`sliding_window - 1 + step` keys and values per layer (a steady forward writes its keys into the ring, then
attends over it in place) (encoder and decoder windows as the checkpoint defines them),
so caches are constant over a stream's life (`cache_bytes`); the host keeps per stream only audio not yet
read (about one step's window while the ticks keep up: `backlog` says when they do not).

Equal to the reference: for each stream, the tokens are those of transformers'
`VoxtralRealtimeForConditionalGeneration.generate` fed the same audio through an `input_features` generator
(transformers' documented streaming recipe) after the same right padding (tests/unit/test_realtime_engine.py).
"""
