"""OpenAI's realtime transcription session over a WebSocket (`GET /v1/realtime`): wire schemas, input audio
formats, turn detection, the session's state machine and the route."""
