"""The gateway's own errors. Each carries the HTTP status it maps to, and is
turned into OpenAI's error JSON once, at the HTTP edge; StreamBroken, for a
response that broke off once its head was sent, closes the connection there."""

from __future__ import annotations

import json


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    status = 500
    error_type = "gateway_error"
    code: str | None = None

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.code)

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after_s is None:
            return []
        return [(b"retry-after", str(max(1, round(self.retry_after_s))).encode())]


class BadRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", b'Bearer realm="vllm-gateway"'), *super().headers()]


class Forbidden(GatewayError):
    status = 403
    error_type = "invalid_request_error"
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    error_type = "invalid_request_error"


class RequestTimeout(GatewayError):
    status = 408
    error_type = "invalid_request_error"


class Conflict(GatewayError):
    """The request does not fit the engine's state (e.g. sleep while busy)."""

    status = 409
    error_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    error_type = "invalid_request_error"


class URITooLong(GatewayError):
    status = 414
    error_type = "invalid_request_error"


class HeadersTooLarge(GatewayError):
    status = 431
    error_type = "invalid_request_error"


class EngineUnavailable(GatewayError):
    """The engine could not be started, or is cooling down after failures."""

    status = 503
    error_type = "engine_unavailable"
    code = "engine_unavailable"


class GpuBusy(GatewayError):
    """The engine does not fit in the GPU memory that is free."""

    status = 503
    error_type = "engine_unavailable"
    code = "gpu_memory"


class GpuYielded(GatewayError):
    """Another program holds the GPU (`vllm-gateway yield`)."""

    status = 503
    error_type = "engine_unavailable"
    code = "gpu_yielded"


class EngineStopped(GatewayError):
    """The engine was stopped while the request was in flight (the message says by what)."""

    status = 503
    error_type = "engine_unavailable"
    code = "engine_stopped"


class QueueFull(GatewayError):
    status = 503
    error_type = "engine_unavailable"
    code = "queue_full"


class UpstreamError(GatewayError):
    """The engine broke the exchange (reset, hang, bad HTTP)."""

    status = 502
    error_type = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504


class StreamBroken(Exception):
    """A response broke off after the client got its head: the engine's
    (reset, hang, or it closed mid-body), or the client went away. No error
    answer can go any more, so this is no GatewayError: the HTTP edge closes
    the connection. `hung`: the engine went silent (it is restarted)."""

    def __init__(self, message: str, *, hung: bool = False) -> None:
        super().__init__(message)
        self.hung = hung


def error_body(message: str, error_type: str, code: str | None = None) -> bytes:
    """OpenAI's error shape; clients such as the openai SDK read `error.message`."""
    return json.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}},
        ensure_ascii=False,
    ).encode()


# Where the engine's error text is quoted, at most this much of it.
ENGINE_MESSAGE_MAX_CHARS = 2000


def engine_error_body(status: int, body: bytes) -> bytes | None:
    """An error answer of the engine in OpenAI's shape, with its status and
    message kept; None when it already is in that shape.

    vLLM answers most errors as OpenAI does, but some come from FastAPI
    (`{"detail": "Not Found"}` for an endpoint the model lacks, a list of
    validation errors) or from older builds (`{"object": "error", "message":
    ...}`), and a proxy in between may answer in plain text.
    """
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        error = value.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return None
        if isinstance(value.get("message"), str):  # vLLM's older ErrorResponse
            kind = value.get("type")
            code = value.get("code")
            return error_body(_clip(value["message"]), kind if isinstance(kind, str) else _type_of(status),
                              code if isinstance(code, str) else None)
        if "detail" in value:
            return error_body(_clip(_detail(value["detail"])), _type_of(status))
    text = body.decode("utf-8", "replace").strip()
    message = text or f"the engine answered {status} without a message"
    return error_body(_clip(message), _type_of(status))


def _detail(detail: object) -> str:
    """FastAPI's `detail`: a text, or a list of validation errors."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                loc = item.get("loc")
                where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
                parts.append(f"{where}: {item['msg']}" if where else str(item["msg"]))
            else:
                parts.append(json.dumps(item, ensure_ascii=False))
        return "; ".join(parts)
    return json.dumps(detail, ensure_ascii=False)


def _type_of(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def _clip(message: str) -> str:
    return message if len(message) <= ENGINE_MESSAGE_MAX_CHARS else message[:ENGINE_MESSAGE_MAX_CHARS] + "…"
