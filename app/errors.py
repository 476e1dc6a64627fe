"""Typed domain errors, and the one table that maps them to HTTP status and OpenAI's error shape.

Every layer raises these; only the API edge turns them into responses, so a worker
or the audio decoder never needs to know about HTTP.
"""

from __future__ import annotations


class VoxtralError(Exception):
    """Base of every error a client may see. `message` must be safe to show a user."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def error_object(self) -> dict[str, object]:
        return error_object(self.message, self.type, self.param, self.code)

    def error_body(self) -> dict[str, object]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(VoxtralError):
    status = 400
    type = "invalid_request_error"


class AudioDecodeError(InvalidRequest):
    code = "invalid_audio"


class AudioTooLong(InvalidRequest):
    code = "audio_too_long"


class UnsupportedFeature(InvalidRequest):
    code = "unsupported"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationError(VoxtralError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(VoxtralError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ResponseNotFound(VoxtralError):
    """A stored response (/v1/responses/{id}) that does not exist, was deleted or has expired."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(VoxtralError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class QueueFull(VoxtralError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(QueueFull):
    """One client (an API key, a realtime session) already holds its share of the queue: the others still
    have room. A 429 with `Retry-After`, as `queue_full`; OpenAI's code for a client over its limit."""

    code = "rate_limit_exceeded"


class TooManySessions(VoxtralError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_sessions"
    retry_after_s = 1
    """A slot frees whenever any session ends: worth asking again soon (the refusal costs no model work)."""


class InternalError(VoxtralError):
    status = 500
    type = "server_error"
    code = "internal_error"


class ModelNotReady(VoxtralError):
    status = 503
    type = "server_error"
    code = "model_not_ready"


class ShuttingDown(VoxtralError):
    status = 503
    type = "server_error"
    code = "shutting_down"


class DeviceFailed(VoxtralError):
    """The accelerator failed beyond repair (app/engine/fatal.py): the process exits to be restarted."""

    status = 503
    type = "server_error"
    code = "device_failed"


class TooManyConnections(VoxtralError):
    status = 503
    type = "server_error"
    code = "too_many_connections"


class RequestTimeout(VoxtralError):
    status = 504
    type = "timeout_error"
    code = "request_timeout"


class GrammarError(ValueError):
    """A tool or response_format schema cannot be compiled for constrained decoding; the message says why
    and is safe to show (the chat use case turns it into an InvalidRequest naming the parameter)."""


def error_object(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, object]:
    """OpenAI's error object: message, type, param, code (realtime events carry it bare)."""
    return {"message": message, "type": type_, "param": param, "code": code}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, object]:
    """OpenAI's error envelope: {"error": {"message", "type", "param", "code"}}."""
    return {"error": error_object(message, type_, param, code)}


def first_line(error: object, default: str | None = None) -> str:
    """The first line of a library's error text: what follows (parser state, a whole grammar) is not for a
    client. Without text: `default`, else the error's type name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else default or type(error).__name__
