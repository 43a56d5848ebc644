"""A router: one API, several models, picked by ?model=.

    curl -X POST 'localhost:8080/router?model=linear' -H 'Content-Type: application/json' -d '{"x": [1, 2, 3]}'

Each model is a small torch module built in __init__ from the weights in this folder (weights.json), so the
predictor shows how a folder carries its own assets.
"""

import json
from pathlib import Path

import torch
from starlette.responses import JSONResponse


class PythonPredictor:
    def __init__(self, config, predictor_dir):
        weights = json.loads((Path(predictor_dir) / "weights.json").read_text())
        self.models = {}
        for name, w in weights.items():
            layer = torch.nn.Linear(len(w["weight"]), 1)
            with torch.no_grad():
                layer.weight.copy_(torch.tensor([w["weight"]]))
                layer.bias.copy_(torch.tensor([w["bias"]]))
            self.models[name] = layer.eval()
        self.default = config.get("default_model")

    def predict(self, query_params, payload):
        name = query_params.get("model", self.default)
        model = self.models.get(name)
        if model is None:
            return JSONResponse({"error": f"unknown model {name!r}; choose one of {sorted(self.models)}"},
                                status_code=400)
        with torch.inference_mode():
            y = model(torch.tensor([payload["x"]], dtype=torch.float32))
        return {"model": name, "y": round(y.item(), 4)}
