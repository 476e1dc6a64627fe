"""Realtime transcription sessions as a use case of the serving layer: typed commands in, typed events out.

`RealtimeServing` (service.py) admits sessions and owns what they share; `Session` (session.py) is one
session's state machine; the wire (OpenAI's realtime JSON) is parsed and rendered in `app.api.realtime`.
"""
