"""The ceiling: bare starlette under gunicorn + uvicorn, no queue, no isolation, one MLP forward per request.

    gunicorn -w 2 -k uvicorn_worker.UvicornWorker bench.apps.bare:app
"""

from __future__ import annotations

import json

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.apps.encoder import build, encode

torch.set_num_threads(1)
torch.manual_seed(0)
MODEL = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)).eval()
ENCODER = build()


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


app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/mlp", mlp, methods=["POST"]),
                        Route("/encoder", encoder, methods=["POST"]), Route("/size", size, methods=["POST"])])
