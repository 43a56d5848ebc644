"""A transformer-class stand-in for the benchmark: a 6-layer encoder of width 384 over 16 tokens (deterministic
weights), the size of a small sentence-embedding model. The same code serves bare starlette and predictord.

    curl -X POST .../encoder -H 'Content-Type: application/json' -d '{"tokens": [1, 2, ..., 16]}'
"""

from __future__ import annotations

from typing import Any

import torch

TOKENS = 16


class Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 384)
        layer = torch.nn.TransformerEncoderLayer(384, 6, 1536, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(tokens)).mean(dim=1)


def build() -> Encoder:
    torch.manual_seed(0)
    return Encoder().eval()


def encode(model: Encoder, batch: list[list[int]]) -> list[dict[str, Any]]:
    """One forward for a batch of token lists; each answer is the first 4 values of its embedding."""
    with torch.inference_mode():
        out = model(torch.tensor(batch, dtype=torch.long))
    return [{"embedding": [round(v, 4) for v in row[:4].tolist()]} for row in out]


class PythonPredictor:
    """The predictord side: with max_batch_size > 1, predict() gets a list of payloads."""

    def __init__(self, config: dict[str, Any]) -> None:
        torch.set_num_threads(1)
        self.model = build()
        self.batched = config.get("batched", False)

    def predict(self, payload: Any) -> Any:
        if self.batched:
            return encode(self.model, [p["tokens"] for p in payload])
        return encode(self.model, [payload["tokens"]])[0]
