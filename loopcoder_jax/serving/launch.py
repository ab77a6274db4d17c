"""Putting a checkpoint behind the HTTP server: load, engine, scheduler, app (`build`), and running
it on a background thread (`Running`: tests, benchmarks, notebooks).

    server = build("path/to/checkpoint", model_name="loopcoder", slots=8)
    with Running(server.app) as running:    # 127.0.0.1, a free port
      print(running.url)                      # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import dataclasses
import socket
import threading
from typing import Any

from loopcoder_jax.inference import batching, engine
from loopcoder_jax.serving import app as http_app


@dataclasses.dataclass
class Server:
  app: Any
  scheduler: batching.Scheduler
  engine: engine.Engine


def build(
    checkpoint: str,
    *,
    model_name: str,
    mesh_spec: dict[str, int] | None = None,
    slots: int = 8,
    max_len: int | None = None,
    prefill_chunk: int = 64,
    prefill_budget: int = 512,
    max_queue: int = 64,
    when_full: str = "reject",
    mode: str = "batched",
    loops: int | None = None,
    dtype: str | None = None,
    tokenizer: str | None = None,
    quantize: str | None = None,
) -> Server:
  """Load `checkpoint` (onto `mesh_spec`'s mesh when given), compile the slot programs and start
  the scheduler; ValueError for bad settings before any weight is read where it can be.
  quantize="int8": serve int8 linear weights (`checkpoints.load`).
  """
  if prefill_budget < prefill_chunk:  # before the weights are read
    raise ValueError(
        f"prefill_budget ({prefill_budget}) must be >= prefill_chunk ({prefill_chunk})"
    )
  # the one place serving loads a checkpoint
  from loopcoder_jax import checkpoints
  from loopcoder_jax.model import sharding

  mesh = sharding.make_mesh(mesh_spec) if mesh_spec else None
  cfg, params, tok = checkpoints.load(
      checkpoint,
      dtype,
      loops=loops,
      tokenizer=tokenizer,
      mesh=mesh,
      quantize=quantize,
  )
  if dtype is None:  # compute (and cache) in the weights' dtype too
    cfg = cfg.with_runtime(dtype=cfg.runtime.param_dtype)
  return from_params(
      cfg,
      params,
      tok,
      model_name=model_name,
      mesh=mesh,
      slots=slots,
      max_len=max_len,
      prefill_chunk=prefill_chunk,
      prefill_budget=prefill_budget,
      max_queue=max_queue,
      when_full=when_full,
      mode=mode,
  )


def from_params(
    cfg,
    params,
    tok,
    *,
    model_name: str,
    mesh=None,
    slots: int = 8,
    max_len: int | None = None,
    prefill_chunk: int = 64,
    prefill_budget: int = 512,
    max_queue: int = 64,
    when_full: str = "reject",
    mode: str = "batched",
    layout=None,
) -> Server:
  """`build` for params already in memory."""
  eng = engine.Engine(cfg, params, tok, mesh=mesh, mode=mode, layout=layout)
  sched = batching.Scheduler(
      eng,
      slots=slots,
      max_len=max_len,
      prefill_chunk=prefill_chunk,
      prefill_budget=prefill_budget,
      max_queue=max_queue,
      when_full=when_full,
  )
  sched.start()
  return Server(http_app.create_app(sched, model_name), sched, eng)


class Running:
  """uvicorn serving `app` on a background thread, on `host` and a free port (or `port`)."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
    import uvicorn

    self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.sock.bind((host, port))
    self.host, self.port = host, self.sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=5)
    self.server = uvicorn.Server(config)
    self.thread = threading.Thread(
        target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
    )

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}/v1"

  def __enter__(self) -> Running:
    self.thread.start()
    while not self.server.started:
      if not self.thread.is_alive():
        raise RuntimeError("the server did not start")
      threading.Event().wait(0.02)
    return self

  def __exit__(self, *exc) -> None:
    self.server.should_exit = True
    self.thread.join()
    self.sock.close()
