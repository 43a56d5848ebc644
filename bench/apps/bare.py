"""The ceiling: bare starlette under gunicorn + uvicorn, no queue, no isolation, one MLP forward per request.

    gunicorn -w 2 -k uvicorn_worker.UvicornWorker bench.apps.bare:app
"""

from __future__ import annotations

import json

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.apps.encoder import build, encode

torch.set_num_threads(1)
torch.manual_seed(0)
MODEL = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)).eval()
ENCODER = build()
BLOBS = {kb: b"x" * (kb * 1000) for kb in (100, 1000, 8000)}  # bench/run.py's REPLY_KB


async def echo(request: Request) -> JSONResponse:
    return JSONResponse(await request.json())


async def mlp(request: Request) -> JSONResponse:
    payload = await request.json()
    with torch.inference_mode():
        label = MODEL(torch.tensor([payload["x"]], dtype=torch.float32)).argmax(dim=1).item()
    return JSONResponse({"label": label})


async def encoder(request: Request) -> JSONResponse:
    payload = await request.json()
    return JSONResponse(encode(ENCODER, [payload["tokens"]])[0])


async def size(request: Request) -> JSONResponse:
    """A large body's length: JSON text is parsed (the length of its "text"), raw bytes counted."""
    body = await request.body()
    if request.headers.get("content-type", "").startswith("application/json"):
        return JSONResponse({"length": len(json.loads(body)["text"])})
    return JSONResponse({"length": len(body)})


async def blob(request: Request) -> Response:
    """A large answer, made once: ?kb=100, 1000 or 8000."""
    await request.body()
    return Response(BLOBS[int(request.query_params["kb"])], media_type="application/octet-stream")


app = Starlette(routes=[Route("/blob", blob, methods=["POST"]), Route("/echo", echo, methods=["POST"]),
                        Route("/mlp", mlp, methods=["POST"]), Route("/encoder", encoder, methods=["POST"]),
                        Route("/size", size, methods=["POST"])])
