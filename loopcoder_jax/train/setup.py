"""Setting a run up: tokenizer, data, mesh and jitted step, and the state (restored or initialised).

Every check that can fail does so here, in this order and before anything is compiled: the data
source, the tokenizer (trained and cached in the workdir on first use) and its vocabulary, the data
iterator and held-out batches (chat data validated in full), the mesh, the checkpoints' run
metadata. Fine-tuning (`init.checkpoint`) takes the weights, model config and tokenizer from
`checkpoints.load`; a resumed run reads only its own checkpoints. A LoRA run (`cfg.lora`) loads
its base from `init.checkpoint` every time (its checkpoints hold the adapters only), after checking
that the base's content hash is the one its checkpoints recorded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from loopcoder_jax import checkpoints
from loopcoder_jax.model import lora, sharding
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.train import optim
from loopcoder_jax.train import step as train_step
from loopcoder_jax.train.heldout import HeldOut
from loopcoder_jax.train.run_log import RunLog


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


@dataclasses.dataclass
class Run:
  """A set-up run: what the loop and the finish work with."""

  config: ml_collections.ConfigDict
  cfg: PLTConfig
  workdir: str
  log: RunLog
  tok: Any
  chat: bool
  batches: ShardedBatches
  data_it: Any  # `batches` as grain sees it (checkpointed with the state)
  heldout: HeldOut
  mesh: Any
  rules: tuple
  step_fn: Any
  ckpt: checkpoints.TrainCheckpointer
  meta: dict  # the run metadata every checkpoint carries
  state: Any  # train_step.TrainState, restored or initialised
  # LoRA: the frozen base params (the state's params are the adapters)
  base: Any = None

  @property
  def params_dir(self) -> str:
    return os.path.join(self.workdir, "params")

  def model_params(self, params):
    """The params the model applies: the state's, or a LoRA run's base with its adapters."""
    return params if self.base is None else lora.combine(self.base, params)


def set_up(config, cfg: PLTConfig, workdir: str, log: RunLog) -> Run:
  """Tokenizer, data, mesh and step, state: a `Run` ready for its first step."""
  pc = jax.process_count()
  log.info(f"workdir: {workdir}")
  log.info(
      f"model: {config.model.preset or config.init.checkpoint} R={cfg.plt_num_loops} d={cfg.hidden_size} L={cfg.num_hidden_layers} "
      f"V={cfg.vocab_size}, {cfg.num_params() / 1e6:.2f}M params; {jax.device_count()} "
      f"{jax.devices()[0].platform} devices, {pc} processes"
  )
  lora_ref = _lora_ref(config, cfg, log)
  tok, init_params = _tokenizer(config, cfg, workdir, log)
  batches, eval_batches, eval_bytes = _data(config, tok, log)
  chat = config.data.format == "chat"
  rules = tuple(tuple(r) for r in config.rules)
  mesh = sharding.make_mesh(config.mesh)
  t = config.train
  tx, schedule = optim.make_optimizer(config.optim, t.total_steps)
  init_fn, step_fn, state_sh = train_step.make_train_fns(
      cfg,
      tx,
      mesh,
      rules,
      grad_accum=t.grad_accum,
      schedule=schedule,
      seed=config.seed,
  )
  heldout = HeldOut(
      eval_batches,
      eval_bytes,
      chat,
      train_step.make_eval_fn(cfg, mesh, rules),
      mesh,
      rules,
  )
  abstract, _ = train_step.state_shardings_for(cfg, tx, mesh, rules)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      state_sh,
  )
  meta = _run_meta(config, cfg, tok, lora_ref)
  ckpt = checkpoints.TrainCheckpointer(
      os.path.join(workdir, "checkpoints"),
      every_steps=config.checkpoint.every_steps,
      keep=config.checkpoint.keep,
      async_save=config.checkpoint.async_save,
      log=log.info,
  )
  data_it = _grain_view(batches)
  restored = ckpt.restore(
      abstract,
      data_it,
      check_meta=functools.partial(_check_meta, meta, ckpt.directory),
      check_state=nonfinite_state,
  )
  base = None
  if cfg.lora is not None:
    # the base stays out of the state: placed once, never updated
    abstract_base, base_sh = train_step.base_shardings(cfg, mesh, rules)
    base = _place(
        init_params,
        jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_base,
            base_sh,
        ),
    )
    init_params = None
    jitted_step = step_fn
    step_fn = lambda state, batch: jitted_step(state, batch, base)  # noqa: E731
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
    log.info(
        f"initialised from {config.init.checkpoint} with a fresh optimizer"
    )
  elif restored is None:
    state = init_fn(jax.random.key(config.seed))
    if cfg.lora is None:
      log.info(f"initialised a fresh model (seed {config.seed})")
    else:
      n, nbytes = lora.count(state.params)
      log.info(
          f"LoRA on {config.init.checkpoint} (frozen): rank {cfg.lora.rank}, "
          f"{'per-loop' if cfg.lora.per_loop else 'shared'} adapters on "
          f"{','.join(cfg.lora.targets)}: {n / 1e6:.3f}M params, {nbytes / 2**20:.2f} MiB "
          f"(seed {config.seed})"
      )
  else:
    step0, state, old_meta = restored
    log.info(f"resumed from step {step0}")
    _notice_changes(config, meta, old_meta, step0, ckpt.directory, log)
  log.keep_through(int(state.step))
  return Run(
      config,
      cfg,
      workdir,
      log,
      tok,
      chat,
      batches,
      data_it,
      heldout,
      mesh,
      rules,
      step_fn,
      ckpt,
      meta,
      state,
      base,
  )


def _lora_ref(config, cfg: PLTConfig, log: RunLog) -> dict | None:
  """A LoRA run's record of its adapters and base (path and content hash), which its checkpoints
  and export carry; None for other runs."""
  if cfg.lora is None:
    return None
  base = os.path.abspath(config.init.checkpoint)
  t0 = time.time()
  digest = checkpoints.content_hash(base)
  log.info(
      f"base {base}: content sha256 {digest[:12]}... ({time.time() - t0:.1f}s)"
  )
  return {
      "lora": cfg.lora.to_dict(),
      "base": base,
      "base_sha256": digest,
      "base_quantize": cfg.runtime.quantize,
  }


def _tokenizer(config, cfg: PLTConfig, workdir: str, log: RunLog):
  """(tokenizer, the init checkpoint's params or None): the tokenizer the run trains with, saved
  in WORKDIR/tokenizer for a fine-tune or chat run (generate.py and the converter find it there).
  """
  from loopcoder_jax.data import chat as chat_data
  from loopcoder_jax.data import pipeline as data
  from loopcoder_jax.data import tokenizer as tok_lib

  d, init = config.data, config.init.checkpoint
  pi, pc = jax.process_index(), jax.process_count()
  chat = d.format == "chat"
  # a bad source fails before a tokenizer is trained on it; skipped files are counted
  if not chat:
    data.load_documents(d.source, d.text_key, report=log.warn)
  own_tok = os.path.join(workdir, "tokenizer")
  init_params = None
  fresh_init = init and not _has_checkpoints(
      os.path.join(workdir, "checkpoints")
  )
  # a LoRA run needs its base whether it starts or resumes
  load_init = fresh_init or (init and cfg.lora is not None)
  if config.tokenizer.path:
    tok = tok_lib.load_tokenizer(config.tokenizer.path)
    if fresh_init:
      _check_init_tokenizer(config, tok)
  elif (
      init
  ):  # the checkpoint's tokenizer; a resumed fine-tune reads the one it saved
    tok = (
        tok_lib.find_tokenizer(*checkpoints.tokenizer_dirs(init))
        if fresh_init
        else tok_lib.load_tokenizer(own_tok)
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
  if load_init:
    t0 = time.time()
    _, init_params, _ = checkpoints.load(
        init,
        tokenizer=config.tokenizer.path or None,
        quantize=None
        if cfg.runtime.quantize == "none"
        else cfg.runtime.quantize,
    )
    log.info(f"loaded {init} ({time.time() - t0:.1f}s)")
  if chat:
    tok = chat_data.with_template(tok)
  if (init or chat) and pi == 0 and not os.path.isdir(own_tok):
    tok.save(own_tok)
  return tok, init_params


def _check_init_tokenizer(config, tok) -> None:
  """A fine-tune's tokenizer.path must tokenize as the init checkpoint's tokenizer does (its
  embeddings index that vocabulary), unless `init.allow_different_tokenizer`."""
  from loopcoder_jax.data import tokenizer as tok_lib

  init = config.init.checkpoint
  if config.init.allow_different_tokenizer:
    return
  try:
    theirs = tok_lib.find_tokenizer(*checkpoints.tokenizer_dirs(init))
  except ValueError:  # the checkpoint has none: the one given is all there is
    return
  if _vocab_fingerprint(theirs) != _vocab_fingerprint(tok):
    how = (
        "same size, other tokens"
        if theirs.vocab_size == tok.vocab_size
        else f"{tok.vocab_size} tokens, not {theirs.vocab_size}"
    )
    raise ValueError(
        f"tokenizer.path {config.tokenizer.path} is not the tokenizer of init.checkpoint "
        f"{init} ({how}): its embeddings would be trained on ids that mean other tokens; "
        "set init.allow_different_tokenizer=True to fine-tune with it anyway"
    )


def _data(config, tok, log):
  """(this process's training batches, held-out batches, held-out bytes); errors come here, before
  any compile."""
  from loopcoder_jax.data import chat as chat_data
  from loopcoder_jax.data import pipeline as data

  t, d, e = config.train, config.data, config.eval
  pi, pc = jax.process_index(), jax.process_count()
  data_shards = t.data_shards or pc
  per_proc = data_shards // pc
  eval_batches, eval_bytes = ([], 0)
  if d.format == "chat":
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
  return batches, eval_batches, eval_bytes


def _run_meta(config, cfg: PLTConfig, tok, lora_ref=None) -> dict:
  """The run metadata a checkpoint carries; a resumed run's must match (`_check_meta`). A LoRA
  run's names its base (`lora`: `_lora_ref`)."""
  meta = {
      "model": cfg.to_hf_dict(),
      "data_shards": config.train.data_shards or jax.process_count(),
      "global_batch_size": config.train.global_batch_size,
      "seq_len": config.data.seq_len,
      "tokenizer_vocab_size": tok.vocab_size,
      "tokenizer_sha256": _vocab_fingerprint(tok),
      "data_source": str(config.data.source),
  }
  if lora_ref is not None:
    meta["lora"] = lora_ref
  return meta


def _notice_changes(config, meta, old, step: int, directory: str, log) -> None:
  """One-line notices for a rerun that differs from the run it resumes where training may go on:
  another data source, or fewer steps than were already trained."""
  total = config.train.total_steps
  if step > total:
    log.warn(
        f"notice: {directory} holds step {step}, past train.total_steps {total}: nothing "
        f"is trained, the export and evaluation are of step {step}"
    )
  # checkpoints written before the source was recorded say nothing about it
  if "data_source" in old and old["data_source"] != meta["data_source"]:
    log.warn(
        f"notice: the checkpoints in {directory} were trained on data.source "
        f"{old['data_source']!r}; this run goes on with {meta['data_source']!r}"
    )


def nonfinite_state(state) -> str | None:
  """'non-finite <path>' for the first array of `state` holding a NaN or Inf, else None."""
  bad = checkpoints.nonfinite_paths(state)
  return f"non-finite {bad[0]}" if bad else None


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


def _vocab_fingerprint(tok) -> str:
  """sha256 of the id -> token table: a resumed run must tokenize as the checkpoint's did."""
  table = "\n".join(tok.id_to_token(i) or "" for i in range(tok.vocab_size))
  return hashlib.sha256(table.encode("utf-8", "surrogatepass")).hexdigest()


def _check_meta(meta: dict, directory: str, old: dict) -> None:
  """A checkpoint written by a run with another model, batch shape, tokenizer, adapters or base:
  ValueError."""
  old_lora, new_lora = old.get("lora"), meta.get("lora")
  if (
      old_lora
      and new_lora
      and old_lora["base_sha256"] != new_lora["base_sha256"]
  ):
    raise ValueError(
        f"the LoRA checkpoints in {directory} adapt a base with content sha256 "
        f"{old_lora['base_sha256'][:12]}... ({old_lora['base']}), but init.checkpoint "
        f"{new_lora['base']} is {new_lora['base_sha256'][:12]}...: not the base they were "
        "trained on"
    )
  diffs = []
  if (old_lora or {}).get("lora") != (new_lora or {}).get("lora"):
    diffs.append(
        f"lora ({(old_lora or {}).get('lora')} -> {(new_lora or {}).get('lora')})"
    )
  # the base the adapters were trained under: as loaded, or int8 (lora.base_dtype)
  old_q = (old_lora or {}).get("base_quantize", "none")
  new_q = (new_lora or {}).get("base_quantize", "none")
  if old_lora and new_lora and old_q != new_q:
    diffs.append(f"lora.base_dtype (base quantize {old_q} -> {new_q})")
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


def _has_checkpoints(directory: str) -> bool:
  """Whether a run's checkpoint directory holds a step (without creating it)."""
  return os.path.isdir(directory) and any(
      n.isdigit() for n in os.listdir(directory)
  )
