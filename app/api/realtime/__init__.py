"""OpenAI's realtime transcription session over a WebSocket (`GET /v1/realtime`): the route and the wire
protocol (client events parsed into the session's commands, its events rendered as server events). The
session itself is a use case of the serving layer (`app.serving.realtime`)."""
