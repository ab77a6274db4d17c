"""The training loop behind `scripts/train.py`: config -> tokenizer, data, mesh, state -> steps.

Order of work (every check that can fail does so before anything is compiled): distributed init,
config validation, tokenizer (trained and cached on first use), vocab check, data iterator and
held-out batches, mesh and jitted step, checkpoint restore (or init), held-out bits per byte, the
loop, a final checkpoint, held-out bits per byte again and a greedy completion.

Fine-tuning (`init.checkpoint`): the weights, model config and tokenizer come from a checkpoint
(loaded in `_load_init`) and the optimizer starts fresh; the tokenizer, with the chat template the
run renders with, is saved in `WORKDIR/tokenizer`. Chat data (`data.format = "chat"`, see
data/chat.py) is validated in full before anything is compiled; its held-out score is the mean loss
per assistant token (nats) instead of bits per byte, and conversations truncated to `seq_len` are
counted in the log.

Checkpoints: `WORKDIR/checkpoints/<step>/{state,data,meta}` (see checkpoint.TrainCheckpointer); a
run restarted with the same workdir resumes from the newest usable one (of init.checkpoint only
the config.json is read then) and sees exactly the batch it would have seen. The run metadata
(model config, batch shape, tokenizer vocabulary) must match the restarted run's. SIGTERM or
Ctrl-C saves at the next step boundary and stops (summary `preempted`: the signal). A non-finite
loss or gradient norm stops the run, and so does a non-finite state before any save: a checkpoint
is never non-finite, and a restored one that is (written by an older version) is skipped. The
final params are also written as a params directory (`WORKDIR/params`, for generate/convert),
replaced whenever the run ends at a newer step (`WORKDIR/params/step.json` names its step).

One trainer per workdir: `lock.WorkdirLock` (the workdir lock) is held from start to end.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from loopcoder_jax.inference import generation
from loopcoder_jax.model import sharding
from loopcoder_jax.train import checkpoint, lock, optim
from loopcoder_jax.train import config as train_config
from loopcoder_jax.train import step as train_step


class TrainingDiverged(RuntimeError):
  pass


WorkdirBusy = lock.WorkdirBusy
EXPORT_STEP_FILE = "step.json"  # in WORKDIR/params: the step the export holds


# ------------------------------------------------------------------------------------- data
class ShardedBatches:
  """This process's data shards, read side by side and concatenated along the batch.

  With `data_shards` fixed, the global batch is the same whatever the number of processes: one
  process reading shards (0, 1) gives the rows that two processes give reading one shard each.
  """

  def __init__(self, iterators):
    self._its = list(iterators)

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self._its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {"shards": [it.get_state() for it in self._its]}

  def set_state(self, state):
    if len(state["shards"]) != len(self._its):
      raise ValueError(
          f"checkpointed data state has {len(state['shards'])} shards per process, this run "
          f"reads {len(self._its)}; keep train.data_shards and the process count"
      )
    for it, s in zip(self._its, state["shards"]):
      it.set_state(s)


def _grain_view(batches: ShardedBatches):
  """A grain DatasetIterator facade (grain's Orbax handler accepts only those)."""
  import grain

  class View(grain.DatasetIterator):

    def __init__(self):
      super().__init__()

    def __next__(self):
      return next(batches)

    def get_state(self):
      return batches.get_state()

    def set_state(self, state):
      batches.set_state(state)

  return View()


# ------------------------------------------------------------------------------------- helpers
def _init_distributed(dist: ml_collections.ConfigDict) -> None:
  if not dist.enabled:
    return
  if dist.cpu_collectives:
    jax.config.update(
        "jax_cpu_collectives_implementation", dist.cpu_collectives
    )
  kw = {}
  if dist.coordinator_address:
    kw = dict(
        coordinator_address=dist.coordinator_address,
        num_processes=dist.num_processes,
        process_id=dist.process_id,
    )
  jax.distributed.initialize(**kw)


class _Log:

  def __init__(self, workdir: str, enabled: bool, tensorboard: bool):
    self.enabled = enabled
    self._bar = None
    self._tb = None
    self._jsonl = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if tensorboard:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def info(self, msg: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(msg)
    else:
      print(msg, flush=True)

  def warn(self, msg: str) -> None:
    if self.enabled:
      print(msg, file=sys.stderr, flush=True)

  def bar(self, start: int, total: int, show: bool):
    if self.enabled and show:
      from tqdm import tqdm

      self._bar = tqdm(
          initial=start,
          total=total,
          unit="step",
          dynamic_ncols=True,
          file=sys.stderr,
      )
    return self._bar

  def keep_through(self, step: int) -> None:
    """Drops the records after `step` (a resumed run logs those steps again) and torn lines."""
    if self._jsonl is None:
      return
    path = self._jsonl.name
    self._jsonl.close()
    kept = []
    with open(path) as f:
      for line in f:
        try:
          if json.loads(line)["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
          continue  # a line cut short by a kill
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a")

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._jsonl is None:
      return
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)

  def close_bar(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def close(self) -> None:
    self.close_bar()
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _peak_flops(config, log) -> float | None:
  """Per-device peak FLOP/s for MFU (None: not reported)."""
  peak = config.metrics.peak_flops
  if peak < 0:
    return None
  if peak > 0:
    return peak
  from loopcoder_jax.scaling import flops

  dev = jax.devices()[0]
  known = flops.chip_peak(dev.device_kind)
  if known is not None:
    return known["bf16_flops"]
  if dev.platform == "cpu":
    measured = flops.measure_matmul_peak(jnp.float32, n=1024, repeats=3)
    log.info(
        f"measured fp32 matmul peak: {measured / 1e9:.1f} GFLOP/s per device (MFU reference)"
    )
    return measured
  return None


def _local_rows(batch: dict, process_index: int, process_count: int) -> dict:
  n = next(iter(batch.values())).shape[0] // process_count
  return {
      k: v[process_index * n : (process_index + 1) * n]
      for k, v in batch.items()
  }


def _eval_sums(eval_fn, params, batches, mesh, rules) -> tuple[float, float]:
  """(summed token NLL in nats, number of scored tokens) over held-out batches."""
  pi, pc = jax.process_index(), jax.process_count()
  total, count = 0.0, 0.0
  for b in batches:
    ce, n = eval_fn(
        params, train_step.global_batch(_local_rows(b, pi, pc), mesh, rules)
    )
    total, count = total + float(ce), count + float(n)
  return total, count


def bits_per_byte(
    eval_fn, params, batches, num_bytes: int, mesh, rules
) -> float:
  total, _ = _eval_sums(eval_fn, params, batches, mesh, rules)
  return total / (math.log(2) * num_bytes)


def token_loss(eval_fn, params, batches, mesh, rules) -> float:
  """Mean NLL (nats) per scored token: per assistant token for chat batches."""
  total, count = _eval_sums(eval_fn, params, batches, mesh, rules)
  return total / count


def _load_init(path: str):
  """(model config, params, tokenizer) of the checkpoint a fine-tune starts from."""
  from loopcoder_jax import interop

  return interop.load(path)


def _place(params, abstract_params):
  """Host or single-device params -> global arrays on `abstract_params`' shardings and dtypes."""

  def put(x, a):
    x = np.asarray(x).astype(a.dtype)
    if x.shape != a.shape:
      raise ValueError(
          f"checkpoint param of shape {x.shape} where the model has {a.shape}"
      )
    return jax.make_array_from_callback(a.shape, a.sharding, lambda i: x[i])

  return jax.tree.map(put, params, abstract_params)


# ------------------------------------------------------------------------------------- train
def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training; returns a summary (steps, bits per byte before/after, completion)."""
  from loopcoder_jax.data import pipeline as data
  from loopcoder_jax.data import tokenizer as tok_lib

  _init_distributed(config.distributed)
  cfg = train_config.validate(config)
  pi, pc = jax.process_index(), jax.process_count()
  if "://" in workdir:  # abspath would make "gs://b/x" a local ./gs:/b/x
    raise ValueError(
        f"workdir {workdir} is a URL; the trainer writes to a file system: "
        "mount the bucket (e.g. gcsfuse) and pass the mounted path"
    )
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir} exists and is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cannot create workdir {workdir}: {e.strerror}") from None
  held = lock.WorkdirLock(workdir, pi)
  took_over = held.acquire()
  try:
    log = _Log(workdir, enabled=pi == 0, tensorboard=config.metrics.tensorboard)
    if took_over:
      log.warn(took_over)
    t_start = time.time()
    try:
      return _train(config, cfg, workdir, log, data, tok_lib, pi, pc, t_start)
    finally:
      log.close()
  finally:
    held.release()


def _train(config, cfg, workdir, log, data, tok_lib, pi, pc, t_start):
  from loopcoder_jax.data import chat as chat_data

  t, d = config.train, config.data
  rules = tuple(tuple(r) for r in config.rules)
  params_dir = os.path.join(workdir, "params")
  # read before any process can replace it
  exported_step = _exported_step(params_dir)
  log.info(f"workdir: {workdir}")
  log.info(
      f"model: {config.model.preset or config.init.checkpoint} R={cfg.plt_num_loops} d={cfg.hidden_size} L={cfg.num_hidden_layers} "
      f"V={cfg.vocab_size}, {cfg.num_params() / 1e6:.2f}M params; {jax.device_count()} "
      f"{jax.devices()[0].platform} devices, {pc} processes"
  )

  # -- tokenizer (and the weights a fine-tune starts from) ---------------------------------------
  init, chat = config.init.checkpoint, d.format == "chat"
  # a bad source fails before a tokenizer is trained on it; skipped files are counted
  if not chat:
    data.load_documents(d.source, d.text_key, report=log.warn)
  own_tok = os.path.join(workdir, "tokenizer")
  init_params = None
  if init and not _has_checkpoints(os.path.join(workdir, "checkpoints")):
    t0 = time.time()
    _, init_params, init_tok = _load_init(init)
    log.info(f"loaded {init} ({time.time() - t0:.1f}s)")
  if config.tokenizer.path:
    tok = tok_lib.load_tokenizer(config.tokenizer.path)
  elif init:  # a resumed fine-tune reads the tokenizer it saved at its start
    tok = (
        init_tok if init_params is not None else tok_lib.load_tokenizer(own_tok)
    )
  else:
    texts = lambda: data.document_texts(d.source, d.text_key)  # noqa: E731
    if pi == 0:
      t0 = time.time()
      tok = tok_lib.get_or_train_tokenizer(
          workdir, config.tokenizer.vocab_size, texts
      )
      log.info(
          f"tokenizer: {tok.vocab_size} tokens in {workdir}/tokenizer ({time.time() - t0:.1f}s)"
      )
    if pc > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("tokenizer")
    if pi != 0:
      tok = tok_lib.get_or_train_tokenizer(
          workdir, config.tokenizer.vocab_size, texts
      )
  tok_lib.check_vocab(tok, cfg.vocab_size)
  if chat:
    tok = chat_data.with_template(tok)
  if (init or chat) and pi == 0 and not os.path.isdir(own_tok):
    tok.save(own_tok)  # generate.py and the converter find it there

  # -- data (errors here come before any compile) ----------------------------------------------
  data_shards = t.data_shards or pc
  per_proc = data_shards // pc
  e = config.eval
  eval_batches, eval_bytes = ([], 0)
  if chat:
    convs = chat_data.load_conversations(
        d.source, tok, on_bad=d.on_bad_example, report=log.warn
    )
    log.info(f"chat data: {len(convs)} conversations in {d.source}")
    make_iterator = functools.partial(
        chat_data.make_train_iterator, d, tok, convs
    )
    if e.max_tokens > 0:
      eval_batches = chat_data.make_eval_batches(
          chat_data.load_conversations(
              chat_data.heldout_source(d),
              tok,
              on_bad=d.on_bad_example,
              report=log.warn,
          ),
          tok,
          seq_len=d.seq_len,
          batch_size=e.batch_size,
          max_tokens=e.max_tokens,
          add_bos=d.add_bos,
      )
  else:
    make_iterator = functools.partial(data.make_train_iterator, d, tok)
    if e.max_tokens > 0:
      eval_batches, eval_bytes = data.make_eval_batches(
          d,
          tok,
          seq_len=d.seq_len,
          batch_size=e.batch_size,
          max_tokens=e.max_tokens,
      )
  batches = ShardedBatches(
      make_iterator(
          global_batch_size=t.global_batch_size,
          process_index=pi * per_proc + j,
          process_count=data_shards,
      )
      for j in range(per_proc)
  )
  data_it = _grain_view(batches)

  # -- mesh, step, state -------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(config.optim, t.total_steps)
  init_fn, step_fn, state_sh = train_step.make_train_fns(
      cfg, tx, mesh, rules, grad_accum=t.grad_accum, schedule=schedule
  )
  eval_fn = train_step.make_eval_fn(cfg, mesh, rules)
  abstract, _ = train_step.state_shardings_for(cfg, tx, mesh, rules)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      state_sh,
  )
  meta = {
      "model": cfg.to_hf_dict(),
      "data_shards": data_shards,
      "global_batch_size": t.global_batch_size,
      "seq_len": d.seq_len,
      "tokenizer_vocab_size": tok.vocab_size,
      "tokenizer_sha256": _vocab_fingerprint(tok),
  }
  ckpt = checkpoint.TrainCheckpointer(
      os.path.join(workdir, "checkpoints"),
      every_steps=config.checkpoint.every_steps,
      keep=config.checkpoint.keep,
      async_save=config.checkpoint.async_save,
      log=log.info,
  )
  restored = ckpt.restore(
      abstract,
      data_it,
      check_meta=functools.partial(_check_meta, meta, ckpt.directory),
      check_state=_check_finite,
  )
  if restored is None and init_params is not None:
    fresh = jax.jit(
        lambda p: train_step.TrainState(
            step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)
        ),
        out_shardings=state_sh,
        donate_argnums=0,
    )
    state = fresh(_place(init_params, abstract.params))
    del init_params
    log.info(f"initialised from {init} with a fresh optimizer")
  elif restored is None:
    state = init_fn(jax.random.key(config.seed))
    log.info(f"initialised a fresh model (seed {config.seed})")
  else:
    step0, state, _ = restored
    log.info(f"resumed from step {step0}")
  log.keep_through(int(state.step))

  summary: dict[str, Any] = {"workdir": workdir, "start_step": int(state.step)}
  if eval_batches and chat:
    summary["loss_before"] = token_loss(
        eval_fn, state.params, eval_batches, mesh, rules
    )
    n = int(sum(b["loss_mask"].sum() for b in eval_batches))
    log.info(
        f"held-out assistant-token loss at step {int(state.step)}: "
        f"{summary['loss_before']:.4f} nats ({n} tokens)"
    )
  elif eval_batches:
    summary["bpb_before"] = bits_per_byte(
        eval_fn, state.params, eval_batches, eval_bytes, mesh, rules
    )
    log.info(
        f"held-out bits per byte at step {int(state.step)}: {summary['bpb_before']:.4f} "
        f"({eval_bytes} bytes)"
    )

  # -- loop -------------------------------------------------------------------------------------
  peak = _peak_flops(config, log)
  flops_per_token = None
  if peak is not None:
    from loopcoder_jax.scaling import flops

    flops_per_token = flops.train_flops_per_token(cfg, d.seq_len)
  stop_signal = {"signum": None}
  handlers = {}
  if _in_main_thread():

    def on_signal(signum, _):
      stop_signal["signum"] = signum
      if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
        signal.signal(signal.SIGINT, signal.default_int_handler)

    # a signal the run was started to ignore (nohup, a background job) stays ignored
    for sig in (signal.SIGTERM, signal.SIGINT):
      if signal.getsignal(sig) is not signal.SIG_IGN:
        handlers[sig] = signal.signal(sig, on_signal)
  step = int(state.step)
  bar = log.bar(step, t.total_steps, config.metrics.progress_bar)
  t_prev, timed_tokens, timed_s = None, 0.0, 0.0
  # chat conversations cut to seq_len since this (re)start, counted per process
  truncated = 0
  try:
    while step < t.total_steps:
      local = next(batches)
      truncated += int(local["truncated"].sum()) if chat else 0
      batch = train_step.global_batch(local, mesh, rules)
      state, metrics = step_fn(state, batch)
      m = jax.device_get(metrics)
      step += 1
      now = time.time()
      loss, gnorm = float(m["loss"]), float(m["grad_norm"])
      if not (math.isfinite(loss) and math.isfinite(gnorm)):
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        _diverged(ckpt, f"non-finite {what} at step {step}", loss, gnorm)
      values = {
          "loss": loss,
          "grad_norm": gnorm,
          "lr": float(m["lr"]),
          "tokens": float(m["tokens"]),
      }
      for r, g in enumerate(np.atleast_1d(m["gate_mean"])):
        values[f"gate_loop{r + 2}"] = float(g)
      if t_prev is not None:  # the first step of a run includes compilation
        timed_tokens += t.global_batch_size * d.seq_len
        timed_s += now - t_prev
        values["tokens_per_s"] = timed_tokens / timed_s
        if flops_per_token is not None:
          values["mfu"] = (
              values["tokens_per_s"]
              * flops_per_token
              / (peak * jax.device_count())
          )
      t_prev = now
      logged = step % t.log_every == 0 or step == t.total_steps
      if chat and logged:
        values["truncated"] = float(_sum_over_processes(truncated))
      log.scalars(step, values)
      if bar is not None:
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss:.3f}", tok_s=f"{values.get('tokens_per_s', 0):.0f}"
        )
      if logged:
        log.info(_line(step, t.total_steps, values))
      preempted = _preemption_sync(step)
      stop = stop_signal["signum"] is not None or preempted
      force = stop or step == t.total_steps
      if force or ckpt.should_save(step):
        # the loss and gradient norm are the pre-update params'; the update may have broken them
        bad = _check_finite(state)
        if bad:
          _diverged(ckpt, f"{bad} at step {step} after the update", loss, gnorm)
        ckpt.save(step, state, data_it, meta, force=force)
      if stop:
        ckpt.wait_until_finished()
        signum = stop_signal["signum"] or signal.SIGTERM
        log.info(
            f"preempted: saved step {step} in {ckpt.directory} "
            f"({signal.Signals(signum).name}); rerun the same command to resume"
        )
        summary.update(preempted=int(signum), end_step=step)
        return summary
  finally:
    for sig, handler in handlers.items():
      signal.signal(sig, handler)
    log.close_bar()
    ckpt.close()
  summary["end_step"] = step
  summary["train_s"] = timed_s

  if exported_step != step:
    _export(params_dir, cfg, state.params, step, pi, pc)
    log.info(f"params of step {step} exported to {params_dir}")
  if eval_batches and chat:
    summary["loss_after"] = token_loss(
        eval_fn, state.params, eval_batches, mesh, rules
    )
    log.info(
        f"held-out assistant-token loss: {summary['loss_before']:.4f} before -> "
        f"{summary['loss_after']:.4f} after (step {step}, nats per token)"
    )
  elif eval_batches:
    summary["bpb_after"] = bits_per_byte(
        eval_fn, state.params, eval_batches, eval_bytes, mesh, rules
    )
    log.info(
        f"held-out bits per byte: {summary.get('bpb_before', float('nan')):.4f} before -> "
        f"{summary['bpb_after']:.4f} after (step {step})"
    )
  for key in ("loss_after", "bpb_after"):
    if key in summary and not math.isfinite(summary[key]):
      raise TrainingDiverged(
          f"the held-out score at step {step} is {summary[key]} (finite params "
          f"in {params_dir}, but they do not evaluate to a finite loss)"
      )
  if e.completion_tokens > 0 and pc == 1:
    summary["completion"] = generation.complete(
        cfg,
        state.params,
        tok,
        [e.prompt],
        max_new_tokens=e.completion_tokens,
        chat=chat,
        add_bos=d.add_bos,
    )[0]
    if chat:
      log.info(
          f"greedy chat completion of {e.prompt!r}:\n{summary['completion']}"
      )
    else:
      log.info(
          f"greedy completion of {e.prompt!r}:\n{e.prompt}{summary['completion']}"
      )
  summary["wall_s"] = time.time() - t_start
  log.info(f"done in {summary['wall_s']:.0f}s")
  return summary


def _diverged(ckpt, what: str, loss: float, gnorm: float):
  """Stops the run naming the newest checkpoint (every saved one was checked finite)."""
  ckpt.wait_until_finished()
  last = ckpt.all_steps()
  good = (
      f"last good checkpoint: step {last[-1]} in {ckpt.directory}"
      if last
      else f"no checkpoint saved in {ckpt.directory}"
  )
  raise TrainingDiverged(
      f"{what} (loss {loss}, grad norm {gnorm}); stopped without saving, {good}"
  )


def _check_finite(state) -> str | None:
  """'non-finite <path>' for the first array of `state` holding a NaN or Inf, else None."""
  bad = checkpoint.nonfinite_paths(state)
  return f"non-finite {bad[0]}" if bad else None


def _vocab_fingerprint(tok) -> str:
  """sha256 of the id -> token table: a resumed run must tokenize as the checkpoint's did."""
  table = "\n".join(tok.id_to_token(i) or "" for i in range(tok.vocab_size))
  return hashlib.sha256(table.encode("utf-8", "surrogatepass")).hexdigest()


def _check_meta(meta: dict, directory: str, old: dict) -> None:
  """A checkpoint written by a run with another model, batch shape or tokenizer: ValueError."""
  diffs = []
  old_model, model = old.get("model") or {}, meta["model"]
  changed = sorted(
      k for k in set(old_model) | set(model) if old_model.get(k) != model.get(k)
  )
  if changed:
    diffs.append(
        "model config ("
        + ", ".join(
            f"{k} {old_model.get(k)!r} -> {model.get(k)!r}" for k in changed[:4]
        )
        + ")"
    )
  for key in ("seq_len", "global_batch_size"):
    if old.get(key) != meta[key]:
      diffs.append(f"{key} ({old.get(key)} -> {meta[key]})")
  # checkpoints written before the fingerprint was recorded compare by size
  size, old_size = meta["tokenizer_vocab_size"], old.get("tokenizer_vocab_size")
  key = (
      "tokenizer_sha256"
      if "tokenizer_sha256" in old
      else "tokenizer_vocab_size"
  )
  if old.get(key) != meta[key]:
    how = "same size, other tokens" if old_size == size else "another size"
    diffs.append(f"tokenizer vocabulary ({old_size} tokens -> {size}, {how})")
  if diffs:
    raise ValueError(
        f"the checkpoints in {directory} were written by a run with another "
        f"{'; '.join(diffs)}; rerun with the settings they were written with "
        "or use a new workdir"
    )


def _exported_step(params_dir: str) -> int | None:
  try:
    with open(os.path.join(params_dir, EXPORT_STEP_FILE)) as f:
      return int(json.load(f)["step"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _export(params_dir: str, cfg, params, step: int, pi: int, pc: int) -> None:
  """Writes the params directory beside the old one, then swaps it in (never half-written)."""
  partial, old = params_dir + ".partial", params_dir + ".old"
  if pi == 0:  # left by an export cut short: the old export is put back first
    shutil.rmtree(partial, ignore_errors=True)
    if os.path.exists(old) and not os.path.exists(params_dir):
      os.rename(old, params_dir)
    shutil.rmtree(old, ignore_errors=True)
  _sync(pc, "export: start")
  checkpoint.save_params(partial, cfg, params)
  if pi == 0:
    with open(os.path.join(partial, EXPORT_STEP_FILE), "w") as f:
      json.dump({"step": step}, f)
    if os.path.exists(params_dir):
      os.rename(params_dir, old)
    os.rename(partial, params_dir)
    shutil.rmtree(old, ignore_errors=True)
  _sync(pc, "export: done")


def _sync(pc: int, name: str) -> None:
  if pc > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _line(step, total, v) -> str:
  parts = [
      f"step {step}/{total}",
      f"loss {v['loss']:.4f}",
      f"grad_norm {v['grad_norm']:.3f}",
      f"lr {v['lr']:.2e}",
  ]
  if "tokens_per_s" in v:
    parts.append(f"tok/s {v['tokens_per_s']:.0f}")
  if "mfu" in v:
    parts.append(f"mfu {100 * v['mfu']:.1f}%")
  if "truncated" in v:
    parts.append(f"truncated {v['truncated']:.0f}")
  gates = [f"{v[k]:.3f}" for k in sorted(v) if k.startswith("gate_loop")]
  if gates:
    parts.append("gate/loop " + ",".join(gates))
  return "  ".join(parts)


def _has_checkpoints(directory: str) -> bool:
  """Whether a run's checkpoint directory holds a step (without creating it)."""
  return os.path.isdir(directory) and any(
      n.isdigit() for n in os.listdir(directory)
  )


def _sum_over_processes(n: int) -> int:
  if jax.process_count() == 1:
    return n
  from jax.experimental import multihost_utils

  return int(np.sum(multihost_utils.process_allgather(np.int64(n))))


def _in_main_thread() -> bool:
  import threading

  return threading.current_thread() is threading.main_thread()


def _preemption_sync(step: int) -> bool:
  """On multi-host runs, JAX's preemption service agrees on one step for all hosts to save at."""
  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils

  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the service is not running (e.g. a CPU test cluster)
    return False
