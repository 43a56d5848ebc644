"""A small torch MLP (256 -> 1024 -> 10) served with server-side batching.

    curl -X POST localhost:8080/mlp -H 'Content-Type: application/json' -d "{\"x\": $(python3 -c 'print([0.1]*256)')}"

With max_batch_size > 1 in predictor.toml, predict() receives a list of payloads (from any connections, gathered
for at most batch_wait_ms) and returns a list with one result per payload: one forward pass for the whole batch.
"""

import torch


class PythonPredictor:
    def __init__(self, config, device):
        torch.manual_seed(config.get("seed", 0))  # stands in for loading real weights
        self.device = device
        self.model = torch.nn.Sequential(
            torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)
        ).eval().to(device)

    def predict(self, payload):
        x = torch.tensor([p["x"] for p in payload], dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            logits = self.model(x)
        labels = logits.argmax(dim=1).tolist()
        return [{"label": label, "batch": len(payload)} for label in labels]
