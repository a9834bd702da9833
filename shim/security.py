"""Who may do what: API keys, the admin key, and the max_tokens guardrail.
Pure logic: headers and bodies in, decisions out."""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable, Sequence

from .errors import BadRequest, Forbidden, GatewayError, Unauthorized


def bearer(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def key_matches(token: bytes | None, keys: Sequence[str]) -> bool:
    """Constant-time comparison against every key (no early exit)."""
    if token is None:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key.encode())
    return found


def check_client(headers: Iterable[tuple[bytes, bytes]], api_keys: Sequence[str]) -> None:
    if api_keys and not key_matches(bearer(headers), api_keys):
        # never echo what was sent: keys must not reach logs
        raise Unauthorized("vllm-gateway: a valid API key is required (Authorization: Bearer KEY)")


def check_admin(headers: Iterable[tuple[bytes, bytes]], admin_key: str | None, control: bool) -> None:
    if control:
        return  # the local control socket: only its owner can connect
    if admin_key is None:
        raise Forbidden("vllm-gateway: admin endpoints answer only on the local control socket "
                        "(use `vllm-gateway start|stop|sleep|wake`), or set gateway.admin_key")
    if not key_matches(bearer(headers), [admin_key]):
        raise Unauthorized("vllm-gateway: this endpoint needs the admin key (Authorization: Bearer KEY)")


def apply_max_tokens(
    body: dict[str, object], raw: bytes, limit: int | None, policy: str, fields: Sequence[str]
) -> bytes:
    """Enforce the engine's max_tokens on the body's token `fields`: refuse
    or lower what asks for more, and set the first field to the limit where
    the request sets none. Returns the body to send."""
    if limit is None:
        return raw
    asked = [(f, body[f]) for f in fields if body.get(f) is not None]
    changed = False
    for field, value in asked:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"vllm-gateway: {field} must be an integer")
        if value > limit:
            if policy == "reject":
                raise _too_many(field, value, limit)
            body[field] = limit
            changed = True
    if not asked:
        body[fields[0]] = limit
        changed = True
    return json.dumps(body, ensure_ascii=False).encode() if changed else raw


def _too_many(field: str, value: int, limit: int) -> GatewayError:
    err = BadRequest(f"vllm-gateway: {field}={value} is over this gateway's limit of {limit}")
    err.code = "max_tokens_too_large"
    return err
