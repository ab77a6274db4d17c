"""Serving: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra) over the
inference room's continuous batching, and putting a checkpoint behind it.

    server = build("path/to/checkpoint", model_name="loopcoder", slots=8)
    with Running(server.app) as running:    # 127.0.0.1, a free port
      print(running.url)                      # http://127.0.0.1:PORT/v1
"""

from loopcoder_jax.serving.app import create_app
from loopcoder_jax.serving.launch import Running, Server, build, from_params

__all__ = ["Running", "Server", "build", "create_app", "from_params"]
