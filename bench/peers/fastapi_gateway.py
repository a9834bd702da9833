"""The yardstick: a gateway in the design vllm-gateway replaced.

FastAPI on uvicorn, one shared httpx.AsyncClient to the engine, and every
request forwarded with streaming passthrough: the upstream response is opened
with `send(..., stream=True)` and its raw bytes are handed to a
StreamingResponse, closed when the client has it all. No engine management:
this measures only the proxying design.

usage: python bench/peers/fastapi_gateway.py --port P --upstream http://127.0.0.1:U
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

# Headers that describe one hop, not the message; the server sets its own.
HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "host",
}


def make_app(upstream: str) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(lifespan=lifespan)
    client = httpx.AsyncClient(
        base_url=upstream,
        timeout=httpx.Timeout(None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
    )

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
    async def forward(path: str, request: Request) -> StreamingResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        req = client.build_request(
            request.method,
            "/" + path,
            params=request.query_params,
            headers=headers,
            content=await request.body(),
        )
        resp = await client.send(req, stream=True)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
        return StreamingResponse(
            resp.aiter_raw(),
            status_code=resp.status_code,
            headers=out_headers,
            background=BackgroundTask(resp.aclose),
        )

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    a = p.parse_args()
    uvicorn.run(make_app(a.upstream), host=a.host, port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
