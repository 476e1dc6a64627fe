"""`voxtral-server eval`: the quality gate. Transcribe a directory of audio with reference texts under two
configurations, one after the other, through the server's own transcription path, and report each one's word
error rate and how far their tokens agree (`app.eval.cli`).

A composition root of its own, beside `app.wiring`: it builds the model, engine and serving layer the way the
server does, without HTTP.
"""
