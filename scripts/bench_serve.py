"""Serving benchmark: the same server for R1, PLT-2 and serial R=2 (same weights), N concurrent
streaming clients; throughput, time to first token and inter-token latency.

    python scripts/bench_serve.py [--checkpoint=DIR] [--clients=1,8,32,64] [--max_tokens=64]
        [--prompt_tokens=32] [--slots=0] [--repeats=3] [--direct] [--out=bench_serve.json]

For each N the three configs' servers run side by side on 127.0.0.1 (slots = N unless --slots);
`--repeats` times in turn, each gets a burst: one warm request, then N clients each stream one
completion of `max_tokens` tokens (greedy; a client whose request ends at EOS counts the tokens it
got). The burst of median throughput is reported per config and N (interleaving spreads the load
of a shared machine over all three; the JSON keeps every burst's throughput, and the decode steps
and admission calls the scheduler ran). Tokens per CPU-second of the process (server, scheduler and
clients: all in this process) move less than wall time when other jobs share the machine.
`--direct` submits the requests to the scheduler in this process instead (no HTTP, no clients):
the engine's own figures. Throughput is completion tokens over the wall time
from the first request to the last token; TTFT runs from a request to its first token, the
inter-token latency between two streamed chunks of a request (p50 / p99 over every request).
Without --checkpoint, a random model of the shape flags (--d, --layers, --heads, ...) is used
(the tokenizer is a byte BPE trained on a few lines). The configs: R1 (the weights run with one
loop), PLT-2 (two loops, batched: one pass over the weights per token) and serial (two loops, one
pass per loop). Prints a table and writes JSON (one record per config and N, plus the ratios at
each N).
With every burst done, each server's compiled decode step (`SlotPrograms.step`, all N slots busy,
on a cache of its own) is timed alone, in rounds across the configs (`--step_rounds`): `step_ms`,
and per N the throughput ratios those steps allow (`step_bound_*`: R1's step time over PLT-2's, and
serial's over PLT-2's). A served ratio near its bound means the scheduler, sampling and HTTP add
about the same to every config, and the gap to a target is the decode step's on this hardware.
Targets (a TPU's; docs/benchmarks.md): PLT-2 >= 0.87x R1 and >= 1.6x serial at >= 32 clients.
Exit codes: 0 done; 2 bad input (flags, checkpoint: one `error:` line on stderr).
"""

import asyncio
import json
import os
import tempfile
import threading
import time

from absl import flags
import numpy as np

from loopcoder_jax import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint directory (default: a random model)."
)
_CLIENTS = cli.define_int_list(
    "clients", [1, 8, 32, 64], "Concurrent streaming clients."
)
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens", 64, "Tokens per completion.", lower_bound=1
)
_PROMPT_TOKENS = flags.DEFINE_integer(
    "prompt_tokens", 32, "Prompt length in tokens (about).", lower_bound=1
)
_SLOTS = flags.DEFINE_integer(
    "slots", 0, "Server slots (0: as many as clients).", lower_bound=0
)
# the random model's shape (without --checkpoint); --vocab is the BPE's target size
cli.define_model_shape(
    d=256,
    ffn=1024,
    layers=4,
    heads=4,
    kv_heads=4,
    head_dim=64,
    vocab=512,
    window=64,
)
_REPEATS = flags.DEFINE_integer(
    "repeats",
    3,
    "Bursts per config and N, interleaved across the configs (the median one is reported).",
    lower_bound=1,
)
_DIRECT = flags.DEFINE_bool(
    "direct",
    False,
    "Submit to the scheduler in-process instead of over HTTP (the engine without the server).",
)
_STEP_ROUNDS = flags.DEFINE_integer(
    "step_rounds",
    10,
    "Rounds of one decode step per config, timed alone after the bursts (0: skip).",
    lower_bound=0,
)
_OUT = flags.DEFINE_string("out", None, "Write the JSON here too.")

CONFIGS = (
    ("R1", 1, "batched"),
    ("PLT-2", 2, "batched"),
    ("serial", 2, "serial"),
)


def _random_model(workdir):
  import jax

  from loopcoder_jax.data import tokenizer
  from loopcoder_jax.model.config import PLTConfig
  from loopcoder_jax.model.transformer import init_params

  lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]
  tok = tokenizer.train_bpe(
      lines, flags.FLAGS.vocab, os.path.join(workdir, "tok")
  )
  shape = cli.model_shape(flags.FLAGS)
  shape["vocab_size"] = tok.vocab_size  # what the BPE reached
  cfg = PLTConfig.tiny(
      loops=2,
      max_position_embeddings=1024,
      eos_token_id=tok.eos_id,
      **shape,
  )
  return cfg, init_params(cfg, jax.random.key(0)), tok


def _servers(slots, loops, mode, model):
  from loopcoder_jax import serving

  # room for the prompt (re-encoded text may take a few more tokens) and the completion
  room = 2 * _PROMPT_TOKENS.value + _MAX_TOKENS.value
  kw = dict(
      model_name="bench", slots=slots, mode=mode, max_queue=1024, max_len=room
  )
  if model is None:
    return serving.build(_CHECKPOINT.value, loops=loops, **kw)
  cfg, params, tok = model
  return serving.from_params(
      cfg.replace(plt_num_loops=loops), params, tok, **kw
  )


async def _stream(client, url, prompt, max_tokens):
  """One streamed completion: (request start, token arrival times, completion tokens)."""
  body = {
      "model": "bench",
      "prompt": prompt,
      "max_tokens": max_tokens,
      "temperature": 0,
      "stream": True,
  }
  start, arrivals, used = time.perf_counter(), [], 0
  async with client.stream("POST", url, json=body) as r:
    r.raise_for_status()
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if chunk["choices"][0]["text"]:
        arrivals.append(time.perf_counter())
      if chunk.get("usage"):
        used = chunk["usage"]["completion_tokens"]
  return start, arrivals, used


async def _clients(url, n, prompt, max_tokens):
  """n streaming clients at once (after a warm request): their runs, start time and CPU time."""
  import httpx

  limits = httpx.Limits(max_connections=n + 1)
  async with httpx.AsyncClient(timeout=None, limits=limits) as client:
    await _stream(client, url, prompt, 2)  # warm: every program compiled
    t0, cpu0 = time.perf_counter(), time.process_time()
    runs = await asyncio.gather(
        *(_stream(client, url, prompt, max_tokens) for _ in range(n))
    )
  return runs, t0, time.process_time() - cpu0


def _direct(sched, n, ids, max_tokens):
  """`_clients` without HTTP: n requests submitted to the scheduler at once."""
  from loopcoder_jax.inference import batching

  def one(count):
    arrivals, done, used = [], threading.Event(), [0]

    def emit(e):
      if isinstance(e, batching.Delta):
        arrivals.append(time.perf_counter())
      else:
        used[0] = getattr(e, "completion_tokens", 0)
        done.set()

    start = time.perf_counter()
    sched.submit(batching.Request(ids, count, emit))
    return start, arrivals, used, done

  one(2)[3].wait()  # warm
  t0, cpu0 = time.perf_counter(), time.process_time()
  pending = [one(max_tokens) for _ in range(n)]
  for *_, done in pending:
    done.wait()
  runs = [(s, a, u[0]) for s, a, u, _ in pending]
  return runs, t0, time.process_time() - cpu0


def _summary(n, runs, t0, cpu_s):
  end = max(a[-1] for _, a, _ in runs if a)
  ttft = [a[0] - s for s, a, _ in runs if a]
  itl = np.concatenate([np.diff(a) for _, a, _ in runs if len(a) > 1] or [[]])
  tokens = sum(u for *_, u in runs)

  def pct(x, q):
    return float(np.percentile(x, q) * 1e3) if len(x) else float("nan")

  return {
      "clients": n,
      "completion_tokens": tokens,
      "tokens_per_s": tokens / (end - t0),
      "tokens_per_cpu_s": tokens / cpu_s,
      "ttft_ms_p50": pct(ttft, 50),
      "ttft_ms_p99": pct(ttft, 99),
      "itl_ms_p50": pct(itl, 50),
      "itl_ms_p99": pct(itl, 99),
  }


def _burst(built, url, n):
  """One warm request then n streaming clients at once; the record, with the decode steps and
  admission calls the scheduler ran for them (the warm request's included)."""
  tok, sched = built.engine.tokenizer, built.scheduler
  words = "def f(x):\n    return x + 1\n" * _PROMPT_TOKENS.value
  prompt = tok.decode(tok.encode(words)[: _PROMPT_TOKENS.value])
  steps, admissions = sched.steps, sched.admissions
  if _DIRECT.value:
    ids = tok.encode(prompt, add_bos=bool(tok.add_bos_token))
    rec = _summary(n, *_direct(sched, n, ids, _MAX_TOKENS.value))
  else:
    rec = _summary(n, *asyncio.run(_clients(url, n, prompt, _MAX_TOKENS.value)))
  rec.update(
      decode_steps=sched.steps - steps,
      admission_calls=sched.admissions - admissions,
  )
  return rec


def _step_alone(scheds, rounds):
  """Median ms of each scheduler's compiled decode step with every slot busy, in rounds across the
  configs (a shared machine's load hits all alike). Runs on a fresh cache per config (the
  scheduler's own state is untouched) filled to the middle of a completion; nothing compiles.
  """
  import jax.numpy as jnp

  state, times = {}, {name: [] for name in scheds}
  for name, sched in scheds.items():
    p, b = sched.programs, sched.programs.slots
    fill = min(_PROMPT_TOKENS.value + _MAX_TOKENS.value // 2, p.max_len - 1)
    cache = p.init_slots().replace(lengths=jnp.full((b,), fill, jnp.int32))
    args = (
        np.zeros(b, np.int32),
        np.ones(b, bool),
        np.zeros(b, np.float32),
        np.ones(b, np.float32),
        np.zeros(b, np.uint32),
        np.zeros(b, np.int32),
    )
    state[name] = [cache, args]
  for i in range(rounds + 1):  # round 0 warms up
    for name, sched in scheds.items():
      cache, args = state[name]
      t0 = time.perf_counter()
      out, state[name][0] = sched.programs.step(
          sched.engine.params, cache, *args
      )
      out.block_until_ready()
      if i:
        times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t) * 1e3) for name, t in times.items()}


def main():
  import contextlib

  from loopcoder_jax import serving

  with tempfile.TemporaryDirectory() as tmp:
    model = None if _CHECKPOINT.value else _random_model(tmp)
    records = []
    for n in _CLIENTS.value:
      with contextlib.ExitStack() as stack:
        urls = {}
        for (
            name,
            loops,
            mode,
        ) in CONFIGS:  # all three up: their bursts interleave
          built = _servers(_SLOTS.value or n, loops, mode, model)
          stack.callback(built.scheduler.stop)
          run = stack.enter_context(serving.Running(built.app))
          urls[name] = (built, run.url + "/completions")
        runs = {name: [] for name, *_ in CONFIGS}
        for _ in range(_REPEATS.value):
          for name in runs:
            runs[name].append(_burst(*urls[name], n))
        step_ms = {}
        if _STEP_ROUNDS.value:
          scheds = {name: urls[name][0].scheduler for name in urls}
          step_ms = _step_alone(scheds, _STEP_ROUNDS.value)
      for name, loops, mode in CONFIGS:
        by_speed = sorted(runs[name], key=lambda r: r["tokens_per_s"])
        rec = dict(by_speed[len(by_speed) // 2])  # the median burst
        rec["tokens_per_s_all"] = [r["tokens_per_s"] for r in runs[name]]
        cpu = [r["tokens_per_cpu_s"] for r in runs[name]]
        rec["tokens_per_cpu_s"], rec["tokens_per_cpu_s_all"] = (
            np.median(cpu),
            cpu,
        )
        if step_ms:
          rec["step_ms"] = step_ms[name]
        records.append({"config": name, "loops": loops, "mode": mode, **rec})
        print(json.dumps(records[-1]), flush=True)
  by = {(r["config"], r["clients"]): r for r in records}

  def ratio(n, other, key="tokens_per_s"):
    return float(by["PLT-2", n][key] / by[other, n][key])

  ratios = []
  for n in _CLIENTS.value:
    q = {
        "clients": n,
        "plt2_over_r1": ratio(n, "R1"),
        "plt2_over_serial": ratio(n, "serial"),
        "plt2_over_r1_cpu": ratio(n, "R1", "tokens_per_cpu_s"),
        "plt2_over_serial_cpu": ratio(n, "serial", "tokens_per_cpu_s"),
    }
    # what the steps alone allow: their time ratios, inverted
    if "step_ms" in by["PLT-2", n]:
      q["step_bound_over_r1"] = 1 / ratio(n, "R1", "step_ms")
      q["step_bound_over_serial"] = 1 / ratio(n, "serial", "step_ms")
    ratios.append(q)
  head = (
      f"{'config':>7} {'N':>4} {'tok/s':>9} {'tok/CPU-s':>9} {'TTFT p50':>9} {'p99':>8} "
      f"{'ITL p50':>8} {'p99':>8} {'step':>8}  (ms)"
  )
  print(head)
  for r in records:
    print(
        f"{r['config']:>7} {r['clients']:>4} {r['tokens_per_s']:>9.1f} "
        f"{r['tokens_per_cpu_s']:>9.1f} "
        f"{r['ttft_ms_p50']:>9.1f} {r['ttft_ms_p99']:>8.1f} "
        f"{r['itl_ms_p50']:>8.1f} {r['itl_ms_p99']:>8.1f} "
        f"{r.get('step_ms', float('nan')):>8.1f}"
    )
  for q in ratios:
    print(
        f"N={q['clients']:>3}: PLT-2 / R1 = {q['plt2_over_r1']:.2f}x (target >= "
        f"0.87 at N >= 32), PLT-2 / serial = {q['plt2_over_serial']:.2f}x "
        f"(target >= 1.6); per CPU-s {q['plt2_over_r1_cpu']:.2f}x / "
        f"{q['plt2_over_serial_cpu']:.2f}x"
    )
    if "step_bound_over_r1" in q:
      print(
          f"       the decode steps alone allow {q['step_bound_over_r1']:.2f}x / "
          f"{q['step_bound_over_serial']:.2f}x"
      )
  result = {"records": records, "ratios": ratios}
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
