"""The same reward behind LitServe, for benchmarks/serve_speed.py's `--engines litserve` comparison only (LitServe is
not in requirements.txt: `pip install litserve==0.2.19`).

    python benchmarks/litserve_server.py SPEC --port 8000 --max_batch_size 32 --max_wait_ms 10

POST /score takes serve.py's JSON body ({"prompts": [...], "images": [base64 PNG or JPEG]}) and answers its JSON;
GET /health is LitServe's. LitServe's batched loop decodes each request in its inference worker once the batch is
formed (`decode_request`), then calls `predict` on the batch: here serve.py's own decoding and ScoringCore, so the
two servers differ only in how requests reach the model.
"""
import argparse
import base64
import os
import sys

import litserve as ls
from fastapi import HTTPException

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from social_reward.serving.limits import Limits, Refusal
from social_reward.serving.core import ScoringCore, load_reward
from social_reward.serving.decoding import decode_request  # noqa: E402


class RewardAPI(ls.LitAPI):
    def __init__(self, spec, **batching):
        super().__init__(api_path="/score", **batching)
        self.reward_spec, self.limits = spec, Limits()  # (LitAPI has a spec of its own)

    def setup(self, device):
        self.core = ScoringCore(*load_reward(self.reward_spec, device), device)

    def decode_request(self, request):
        images = [base64.b64decode(data, validate=True) for data in request["images"]]
        decoded, prompts, _ = decode_request(request["prompts"], images, None, self.limits)
        return decoded, prompts

    def batch(self, inputs):
        return list(inputs)

    def predict(self, requests):
        return self.core.score_batch(requests)

    def unbatch(self, answers):
        return list(answers)

    def encode_response(self, answer):
        if isinstance(answer, Refusal):
            raise HTTPException(answer.status, answer.message)
        return answer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch_size", type=int, default=32, help="requests in one batch (LitServe counts "
                        "requests, not images)")
    parser.add_argument("--max_wait_ms", type=float, default=10.0)
    args = parser.parse_args()
    api = RewardAPI(args.spec, max_batch_size=args.max_batch_size, batch_timeout=args.max_wait_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=3600)
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
