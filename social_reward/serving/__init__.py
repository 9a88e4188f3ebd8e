"""The reward behind an HTTP server that RL loops on other machines call: request limits and decoding, the batching
scoring thread, the FastAPI app, uvicorn and Ray Serve engines (scripts/serve.py).
"""
