"""Greedy generation speed of the exported PyTorch model: with its PLT cache against without.

    python scripts/bench_torch_decode.py [--loops=1,2] [--prompt=256] [--new_tokens=32] [--batch=1]

Model (defaults): d=1024, I=2816, L=8, H=16, K=4, D=64, V=32000, window 64, float32 (about 160M
params), random weights with unit-scale logits so that greedy choices are far from ties. For each
loop count the model of the HF export (`modeling_loopcoder.py`) runs `generate` with
`use_cache=True` (prefill, then all loops of each new token in one pass over the weights) and with
`use_cache=False` (every step recomputes the whole prefix); for R = 1 transformers'
`LlamaForCausalLM` with the same weights and its own cache runs too, as a reference. Each variant
generates exactly `--new_tokens` tokens per row, `--repeats` times (the fastest run counts);
tokens/s = batch * new_tokens / seconds, prefill included, in wall time and in this process's CPU
time (`*_per_cpu_s`: the work done, which other jobs on a shared machine disturb less; with
`--threads=1` it is also the latency of an unloaded core). `same_tokens` says whether the cached
and uncached runs chose the same tokens. The cached path is also timed in parts (CPU time): one
prefill of the prompt and the median of `--new_tokens` single-token steps on top of it. Prints a
table and, as the last line, one JSON object.
Exit codes: 0 done; 2 bad flags (one `error:` line on stderr, before torch is imported).
"""

from __future__ import annotations

import json
import math
import statistics
import time

from absl import flags

from loopcoder_jax import cli

_FLAGS = (
    cli.define_int_list("loops", [1, 2], "Loop counts R to run."),
    flags.DEFINE_integer(
        "prompt", 256, "Prompt tokens per row.", lower_bound=1
    ),
    flags.DEFINE_integer(
        "new_tokens", 32, "Generated tokens per row.", lower_bound=1
    ),
    flags.DEFINE_integer("batch", 1, "Rows.", lower_bound=1),
    *cli.define_model_shape(
        d=1024,
        ffn=2816,
        layers=8,
        heads=16,
        kv_heads=4,
        head_dim=64,
        vocab=32000,
        window=64,
    ),
    flags.DEFINE_integer(
        "repeats",
        1,
        "Timed runs per variant (the fastest counts).",
        lower_bound=1,
    ),
    flags.DEFINE_integer(
        "threads", 0, "torch CPU threads (0: torch's default).", lower_bound=0
    ),
)


def hf_config(args, loops):
  """The config.json keys of an export of this shape (less the names of its classes)."""
  from loopcoder_jax.model.config import PLTConfig

  hf = PLTConfig.tiny(
      loops,
      max_position_embeddings=max(4096, args.prompt + args.new_tokens),
      bos_token_id=None,
      eos_token_id=None,
      **cli.model_shape(args),
  ).to_hf_dict()
  return {
      k: v for k, v in hf.items() if k not in ("architectures", "model_type")
  }


def build(args, loops):
  """Our PyTorch model with random weights: unit-scale embeddings and 1/sqrt(fan-in) linears."""
  import torch

  from loopcoder_jax.interop.hf_modeling import modeling_loopcoder as ml

  torch.manual_seed(loops)
  model = ml.IQuestPLTCoderForCausalLM(
      ml.IQuestPLTCoderConfig(**hf_config(args, loops))
  )
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("embed_tokens.weight"):
        p.normal_(0.0, 1.0)
      elif p.ndim == 2:
        p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
  return model.eval()


def timed_generate(model, ids, args, use_cache):
  """(wall seconds, CPU seconds, new tokens) of the fastest of `--repeats` runs."""
  import torch

  best, out = (math.inf, math.inf), None
  for _ in range(args.repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
      out = model.generate(
          ids,
          attention_mask=torch.ones_like(ids),
          max_new_tokens=args.new_tokens,
          min_new_tokens=args.new_tokens,
          do_sample=False,
          use_cache=use_cache,
          pad_token_id=0,
      )
    best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
  return best[0], best[1], out[:, ids.shape[1] :]


def timed_steps(model, ids, args):
  """(CPU seconds of the prompt's prefill, median CPU seconds of one cached decode step)."""
  import torch

  with torch.no_grad():
    c0 = time.process_time()
    out = model(ids, use_cache=True)
    prefill = time.process_time() - c0
    tok, steps = ids[:, -1:], []
    for _ in range(args.new_tokens):
      c0 = time.process_time()
      out = model(tok, cache=out.cache, use_cache=True)
      steps.append(time.process_time() - c0)
  return prefill, statistics.median(steps)


def main():
  return run(cli.flag_values(_FLAGS))


def run(args):
  if args.head_dim % 2:
    raise ValueError(f"--head_dim must be even (RoPE), got {args.head_dim}")
  if args.heads % args.kv_heads:
    raise ValueError(
        f"--heads={args.heads} is not divisible by --kv_heads={args.kv_heads}"
    )
  import torch
  import transformers

  if args.threads:
    torch.set_num_threads(args.threads)
  ids = torch.randint(
      1,
      args.vocab,
      (args.batch, args.prompt),
      generator=torch.Generator().manual_seed(0),
  )
  new = args.batch * args.new_tokens
  out = {
      "config": {k: v for k, v in vars(args).items()},
      "torch_threads": torch.get_num_threads(),
      "results": [],
  }
  hdr = (
      f"{'R':>2} {'params M':>9} | {'cached tok/s':>12} {'uncached':>9} {'speed-up':>8} | "
      f"{'cached tok/cpu-s':>16} {'uncached':>9} {'speed-up':>8} {'same':>5} | "
      f"{'prefill cpu-s':>13} {'step cpu-ms':>11} | "
      f"{'transformers Llama, cached':>29}"
  )
  rows = []
  for loops in args.loops:
    model = build(args, loops)
    cached_s, cached_cpu, cached = timed_generate(model, ids, args, True)
    plain_s, plain_cpu, plain = timed_generate(model, ids, args, False)
    prefill_cpu, step_cpu = timed_steps(model, ids, args)
    res = {
        "loops": loops,
        "params": sum(p.numel() for p in model.parameters()),
        "cached_s": cached_s,
        "uncached_s": plain_s,
        "cached_cpu_s": cached_cpu,
        "uncached_cpu_s": plain_cpu,
        "cached_tokens_per_s": new / cached_s,
        "uncached_tokens_per_s": new / plain_s,
        "speedup": plain_s / cached_s,
        "cached_tokens_per_cpu_s": new / cached_cpu,
        "uncached_tokens_per_cpu_s": new / plain_cpu,
        "speedup_cpu": plain_cpu / cached_cpu,
        "same_tokens": bool(torch.equal(cached, plain)),
        "prefill_cpu_s": prefill_cpu,
        "step_cpu_ms": step_cpu * 1e3,
    }
    llama = ""
    if loops == 1:  # transformers' own Llama and cache on the same weights
      ref = transformers.LlamaForCausalLM(
          transformers.LlamaConfig(**hf_config(args, 1))
      ).eval()
      ref.load_state_dict(model.state_dict())
      ref_s, ref_cpu, ref_tokens = timed_generate(ref, ids, args, True)
      res["llama_prefill_cpu_s"], ref_step = timed_steps(ref, ids, args)
      res["llama_step_cpu_ms"] = ref_step * 1e3
      res["llama_cached_tokens_per_s"] = new / ref_s
      res["llama_cached_tokens_per_cpu_s"] = new / ref_cpu
      res["llama_same_tokens"] = bool(torch.equal(ref_tokens, cached))
      llama = (
          f"{res['llama_cached_tokens_per_cpu_s']:.2f} tok/cpu-s, "
          f"{res['llama_step_cpu_ms']:.1f} ms/step"
      )
    del model
    out["results"].append(res)
    rows.append(
        f"{loops:>2} {res['params'] / 1e6:>9.1f} | {res['cached_tokens_per_s']:>12.2f} "
        f"{res['uncached_tokens_per_s']:>9.3f} {res['speedup']:>8.1f} | "
        f"{res['cached_tokens_per_cpu_s']:>16.2f} {res['uncached_tokens_per_cpu_s']:>9.3f} "
        f"{res['speedup_cpu']:>8.1f} {str(res['same_tokens']):>5} | "
        f"{res['prefill_cpu_s']:>13.3f} {res['step_cpu_ms']:>11.1f} | {llama:>29}"
    )
    print(rows[-1] if len(rows) > 1 else hdr + "\n" + rows[-1], flush=True)
  print(hdr)
  print("\n".join(rows))
  print(json.dumps(out))


if __name__ == "__main__":
  cli.run(main)
