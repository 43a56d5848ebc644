"""The ceiling: bare starlette under gunicorn + uvicorn, no queue, no isolation, one MLP forward per request.

    gunicorn -w 2 -k uvicorn_worker.UvicornWorker bench.apps.bare:app
"""

from __future__ import annotations

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

torch.set_num_threads(1)
torch.manual_seed(0)
MODEL = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)).eval()


async def echo(request: Request) -> JSONResponse:
    return JSONResponse(await request.json())


async def mlp(request: Request) -> JSONResponse:
    payload = await request.json()
    with torch.inference_mode():
        label = MODEL(torch.tensor([payload["x"]], dtype=torch.float32)).argmax(dim=1).item()
    return JSONResponse({"label": label})


app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/mlp", mlp, methods=["POST"])])
