"""grain pipeline: packing invariants, determinism, exact resume, process shards, sources, errors."""

import collections
import json

import numpy as np
import pytest

from loopcoder_jax.data import corpus
from loopcoder_jax.data import pipeline as data
from loopcoder_jax.data import tokenizer as tk

SEQ = 32


def _doc(i: int) -> str:
  # Varied lengths: short docs share rows, long ones are split over several rows.
  body = "".join(
      f"    v{i}_{j} = compute({j}, 'x' * {i})\n"
      for j in range(1 + (i * 7) % 23)
  )
  return f"def f{i}(n):\n{body}    return n\n"


TEXTS = [_doc(i) for i in range(14)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [t for _, t in corpus.stdlib_files("train")[:8]] + TEXTS
  return tk.train_bpe(texts, 300, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def txt_glob(tmp_path_factory):
  d = tmp_path_factory.mktemp("txt")
  for i, t in enumerate(TEXTS):
    (d / f"doc{i:02d}.txt").write_text(t)
  return str(d / "*.txt")


def _cfg(source, **kw):
  cfg = data.default_data_config()
  cfg.source, cfg.seq_len, cfg.shuffle, cfg.num_epochs = source, SEQ, False, 1
  cfg.update(kw)
  return cfg


def _batches(cfg, tok, batch=1, n=None, **kw):
  it = data.make_train_iterator(cfg, tok, global_batch_size=batch, **kw)
  out = list(it) if n is None else [next(it) for _ in range(n)]
  it.close()
  return out


def _rows(batches):
  return [
      {k: v[r] for k, v in b.items()}
      for b in batches
      for r in range(len(b["inputs"]))
  ]


def _check_rows(rows, tok, empty_tail=0):
  """Packing invariants of every row; the last `empty_tail` rows may be all padding (an eval
  batch filled up)."""
  n_rows = len(rows)
  for i, row in enumerate(rows):
    seg, pos, inp, tgt = (
        row["segment_ids"],
        row["positions"],
        row["inputs"],
        row["targets"],
    )
    assert all(
        row[k].dtype == np.int32 and row[k].shape == (SEQ,)
        for k in ("inputs", "targets", "segment_ids", "positions")
    )
    real = seg > 0
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any()  # padding only at the end
    np.testing.assert_array_equal(row["loss_mask"], real.astype(np.float32))
    assert row["loss_mask"].dtype == np.float32
    assert (
        (inp[n:] == tok.pad_id).all()
        and (tgt[n:] == tok.pad_id).all()
        and (pos[n:] == 0).all()
    )
    if n == 0 and i >= n_rows - empty_tail:
      continue
    assert seg[0] == 1 and set(np.diff(seg[:n])) <= {0, 1}
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      # restart at 0 per document
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      # Next token of the same document, never of another one.
      np.testing.assert_array_equal(tgt[idx[:-1]], inp[idx[1:]])
      # a piece that ends inside the row ends its document
      if idx[-1] + 1 < SEQ:
        assert tgt[idx[-1]] == tok.eos_id


def _documents(rows, eos):
  """Token lists (with EOS) of the documents in unshuffled rows; pieces are joined across rows."""
  docs, cur = [], []
  for row in rows:
    for s in range(1, row["segment_ids"].max() + 1):
      idx = row["segment_ids"] == s
      cur += row["inputs"][idx].tolist()
      if row["targets"][idx][-1] == eos:
        docs.append(tuple(cur + [eos]))
        cur = []
  assert not cur
  return docs


def _expected(texts, tok):
  return [
      tuple(tok.encode(t, split_special=False) + [tok.eos_id]) for t in texts
  ]


def test_packing_invariants_and_exact_cover(tok, txt_glob):
  rows = _rows(_batches(_cfg(txt_glob), tok))
  assert len(rows) > 10 and any(r["segment_ids"].max() > 1 for r in rows)
  _check_rows(rows, tok)
  assert _documents(rows, tok.eos_id) == _expected(TEXTS, tok)


def test_a_finite_epoch_ends_after_its_last_full_batch(tok, txt_glob):
  one = _rows(_batches(_cfg(txt_glob), tok, batch=1))
  size = next(k for k in (3, 4, 5, 7) if len(one) % k)  # leaves a partial batch
  full = _rows(_batches(_cfg(txt_glob), tok, batch=size))
  assert len(full) == len(one) // size * size
  for a, b in zip(full, one):
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bos_and_eos_options(tok, txt_glob):
  rows = _rows(_batches(_cfg(txt_glob, add_bos=True), tok))
  _check_rows(rows, tok)
  assert _documents(rows, tok.eos_id) == [
      (tok.bos_id,) + d for d in _expected(TEXTS, tok)
  ]
  rows = _rows(_batches(_cfg(txt_glob, add_eos=False), tok, batch=1))
  # Without EOS, documents are only told apart by their segment ids.
  assert sum(int(r["loss_mask"].sum()) for r in rows) == sum(
      len(tok.encode(t)) - 1 for t in TEXTS
  )


def test_shuffled_epoch_is_a_permutation(tok, txt_glob):
  plain = _rows(_batches(_cfg(txt_glob), tok, batch=1))
  mixed = _rows(
      _batches(
          _cfg(txt_glob, shuffle=True, shuffle_window=4, seed=3), tok, batch=1
      )
  )
  _check_rows(mixed, tok)

  def count(rows):
    return collections.Counter(
        t for r in rows for t in r["inputs"][r["segment_ids"] > 0]
    )

  assert count(mixed) == count(plain)
  assert [r["inputs"].tolist() for r in mixed] != [
      r["inputs"].tolist() for r in plain
  ]


def test_deterministic_and_seeded(tok, txt_glob):
  cfg = _cfg(txt_glob, shuffle=True, shuffle_window=8, num_epochs=None)
  a, b = _batches(cfg, tok, batch=4, n=6), _batches(cfg, tok, batch=4, n=6)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  c = _batches(
      _cfg(txt_glob, shuffle=True, shuffle_window=8, num_epochs=None, seed=1),
      tok,
      batch=4,
      n=6,
  )
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_resume_from_json_state_gives_the_next_batches(tok, txt_glob):
  # Small window and corpus: the checkpoints fall mid-window, at window starts and across epochs.
  cfg = _cfg(txt_glob, shuffle=True, shuffle_window=6, num_epochs=None, seed=7)
  ref = data.make_train_iterator(cfg, tok, global_batch_size=4)
  states, batches = [], []
  for _ in range(16):
    states.append(json.dumps(ref.get_state()))
    batches.append(next(ref))
  for k in (0, 1, 3, 8, 13):
    it = data.make_train_iterator(cfg, tok, global_batch_size=4)
    it.set_state(json.loads(states[k]))
    for want in batches[k : k + 3]:
      got = next(it)
      for key in want:
        np.testing.assert_array_equal(
            got[key], want[key], err_msg=f"resume at {k}: {key}"
        )


def test_process_shards_are_disjoint_and_cover(tok, txt_glob, monkeypatch):
  reads = collections.defaultdict(set)
  read = data._Files.__getitem__

  def spy(self, i):
    reads[spy.process].add(i)
    return read(self, i)

  monkeypatch.setattr(data._Files, "__getitem__", spy)
  seen = []
  for p in range(2):
    spy.process = p
    batches = _batches(
        _cfg(txt_glob), tok, batch=2, process_index=p, process_count=2
    )
    assert all(b["inputs"].shape == (1, SEQ) for b in batches)  # per-host rows
    seen.append(set(_documents(_rows(batches), tok.eos_id)))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(_expected(TEXTS, tok))
  # own shard only
  assert reads[0] == set(range(0, 14, 2)) and reads[1] == set(range(1, 14, 2))


def test_jsonl_array_record_and_mixed_sources(tok, txt_glob, tmp_path):
  with open(tmp_path / "a.jsonl", "w") as f:
    for t in TEXTS[:9]:
      # blank lines are skipped
      f.write(json.dumps({"code": t, "id": 1}) + "\n\n")
  with open(tmp_path / "b.jsonl", "w") as f:
    for t in TEXTS[9:]:
      f.write(json.dumps({"code": t}) + "\n")
  jsonl = _rows(_batches(_cfg(str(tmp_path / "*.jsonl"), text_key="code"), tok))
  assert _documents(jsonl, tok.eos_id) == _expected(TEXTS, tok)

  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

  writer = ArrayRecordWriter(
      str(tmp_path / "docs.array_record"), "group_size:1"
  )
  for t in TEXTS:
    writer.write(t.encode("utf-8"))
  writer.close()
  ar = _rows(_batches(_cfg(f"array_record:{tmp_path}/*.array_record"), tok))
  assert _documents(ar, tok.eos_id) == _expected(TEXTS, tok)

  (tmp_path / "sub").mkdir()
  # a special token's text is text
  (tmp_path / "sub" / "x.py").write_text("print('</s>')\n")
  mixed = _rows(_batches(_cfg(f"{txt_glob}, {tmp_path}/**/*.py"), tok))
  assert _documents(mixed, tok.eos_id) == _expected(
      TEXTS + ["print('</s>')\n"], tok
  )


def test_stdlib_source(tok):
  cfg = _cfg("stdlib", shuffle=True, num_epochs=None, shuffle_window=16)
  (b,) = _batches(cfg, tok, batch=4, n=1)
  # long docs: no padding
  assert b["inputs"].shape == (4, SEQ) and b["loss_mask"].sum() == 4 * SEQ
  _check_rows(_rows([b]), tok)


def test_eval_batches_and_byte_count(tok):
  batches, num_bytes = data.make_eval_batches(
      TEXTS, tok, seq_len=SEQ, batch_size=4, max_tokens=10**6
  )
  rows = _rows(batches)
  _check_rows(rows, tok, empty_tail=3)
  assert all(b["inputs"].shape == (4, SEQ) for b in batches)
  assert _documents(rows, tok.eos_id) == _expected(TEXTS, tok)
  # Every token but each document's first is predicted, so those are the bytes covered.
  first = sum(len(tok.decode(tok.encode(t)[:1]).encode()) for t in TEXTS)
  assert num_bytes == sum(len(t.encode()) for t in TEXTS) - first
  # A token budget cuts the stream (here inside the second document); bytes shrink with it.
  ids0, ids1 = tok.encode(TEXTS[0]), tok.encode(TEXTS[1])
  # all of document 0's targets (its text tokens but the first, and EOS)
  budget = len(ids0) + 5
  cut, cut_bytes = data.make_eval_batches(
      TEXTS, tok, seq_len=SEQ, batch_size=4, max_tokens=budget
  )
  assert sum(b["loss_mask"].sum() for b in cut) == budget

  def nbytes(ids):
    return len(tok.decode(ids).encode())

  assert cut_bytes == (nbytes(ids0) - nbytes(ids0[:1])) + (
      nbytes(ids1[:6]) - nbytes(ids1[:1])
  )


def test_eval_batches_from_config(tok, txt_glob):
  cfg = _cfg("stdlib", add_bos=True)
  batches, num_bytes = data.make_eval_batches(
      cfg, tok, seq_len=SEQ, batch_size=2, max_tokens=300
  )
  assert sum(b["loss_mask"].sum() for b in batches) == 300 and num_bytes > 300
  first = corpus.stdlib_files("heldout")[0][1]
  assert batches[0]["inputs"][0, 0] == tok.bos_id
  assert tok.decode(batches[0]["targets"][0][:5]) == tok.decode(
      tok.encode(first)[:5]
  )
  with pytest.raises(ValueError, match="set data.eval_source"):
    data.make_eval_batches(
        _cfg(txt_glob), tok, seq_len=SEQ, batch_size=2, max_tokens=10
    )
  batches, _ = data.make_eval_batches(
      _cfg("stdlib", eval_source=txt_glob),
      tok,
      seq_len=SEQ,
      batch_size=2,
      max_tokens=10**6,
  )
  assert _documents(_rows(batches), tok.eos_id) == _expected(TEXTS, tok)


def _bad_inputs(tmp, txt_glob):
  (tmp / "empty.jsonl").write_text("\n")
  (tmp / "nokey.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
  (tmp / "latekey.jsonl").write_text(
      json.dumps({"text": "x = 1"}) + "\n" + json.dumps({"t": 1})
  )
  return [
      (dict(source=str(tmp / "missing.txt")), {}, "does not exist"),
      (dict(source=str(tmp / "nothing*.txt")), {}, "matches no files"),
      (dict(source=" , "), {}, "data.source is empty"),
      (dict(source=str(tmp)), {}, "is a directory; name its files with a glob"),
      (dict(source=str(tmp / "empty.jsonl")), {}, "holds no documents"),
      (dict(source=str(tmp / "nokey.jsonl")), {}, "no string field 'text'"),
      (dict(source=txt_glob, seq_len=1), {}, "seq_len must be >= 2"),
      (
          dict(source=txt_glob),
          dict(global_batch_size=3, process_count=2),
          "not a positive multiple",
      ),
      (
          dict(source=txt_glob),
          dict(process_index=2, process_count=2),
          "process_index 2",
      ),
      (
          dict(source=txt_glob),
          dict(process_count=20, global_batch_size=20),
          "fewer than the 20",
      ),
      (dict(source=txt_glob, num_epochs=0), {}, "num_epochs must be >= 1"),
  ]


def test_bad_inputs_fail_in_one_line(tok, txt_glob, tmp_path):
  for cfg_kw, call_kw, msg in _bad_inputs(tmp_path, txt_glob):
    with pytest.raises(ValueError, match=msg) as e:
      data.make_train_iterator(
          _cfg(**cfg_kw), tok, **{"global_batch_size": 2, **call_kw}
      )
    assert "\n" not in str(e.value)
  # A bad line after the first is reported with its file and index when it is read.
  it = data.make_train_iterator(
      _cfg(str(tmp_path / "latekey.jsonl")), tok, global_batch_size=1
  )
  with pytest.raises(
      ValueError, match=r"latekey.jsonl: document 1 has no string field 'text'"
  ):
    list(it)
  # Only empty documents: an error, not an endless loop.
  (tmp_path / "blank.jsonl").write_text('{"text": ""}\n' * 3)
  it = data.make_train_iterator(
      _cfg(str(tmp_path / "blank.jsonl"), num_epochs=None),
      tok,
      global_batch_size=1,
  )
  with pytest.raises(
      ValueError, match="none of the 3 documents holds a token to predict"
  ):
    next(it)
  with pytest.raises(ValueError, match="larger than the model's vocab_size"):
    data.check_vocab(tok, 256)


@pytest.mark.slow
def test_worker_processes_resume_exactly(tok, txt_glob):
  # Workers change which rows form a batch (each packs its own slice), so compare worker runs.
  cfg = _cfg(
      txt_glob, shuffle=True, shuffle_window=4, num_epochs=None, worker_count=2
  )
  ref = data.make_train_iterator(cfg, tok, global_batch_size=2)
  [next(ref) for _ in range(3)]
  state = json.dumps(ref.get_state())
  want = [next(ref) for _ in range(3)]
  ref.close()
  it = data.make_train_iterator(cfg, tok, global_batch_size=2)
  it.set_state(json.loads(state))
  for w in want:
    got = next(it)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
  _check_rows(_rows(want), tok)
  it.close()
