"""LitServe 0.2.19 with the same predictors as the benchmark's other systems (run from bench/.venv-litserve).

    bench/.venv-litserve/bin/python bench/apps/lit.py --api echo|mlp --port P [--batch N]
"""

from __future__ import annotations

import argparse

import litserve as ls
import torch


class Echo(ls.LitAPI):
    def setup(self, device):
        pass

    def decode_request(self, request):
        return request

    def predict(self, x):
        return x

    def encode_response(self, output):
        return output


class MLP(ls.LitAPI):
    def setup(self, device):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)).eval()

    def decode_request(self, request):
        return torch.tensor(request["x"], dtype=torch.float32)

    def batch(self, inputs):
        return torch.stack(inputs)

    def predict(self, x):
        with torch.inference_mode():
            return self.model(x if x.dim() == 2 else x[None]).argmax(dim=1)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"label": int(output.reshape(-1)[0]) if output.dim() else int(output)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--api", choices=["echo", "mlp"], required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    api = Echo() if args.api == "echo" else MLP(max_batch_size=args.batch, batch_timeout=0.002 if args.batch > 1 else 0)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=2)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")
