"""Streaming safetensors I/O: discovery, headers, reads into buffers and blocks, the laid-out writer."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
import safetensors.numpy as stn

from loopcoder_jax.checkpoints import safetensors_io as st
from tests import helpers

BF16 = np.dtype(ml_dtypes.bfloat16)


def _tensors(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "a.weight": rng.standard_normal((8, 16)).astype(BF16),
      "b.bias": rng.standard_normal(16).astype(np.float32),
      "c.scale": rng.standard_normal((2, 3, 4)).astype(np.float16),
      "d.weight": rng.standard_normal((32, 8)).astype(BF16),
  }


def _entries(tensors):
  return [
      st.Entry(k, v.shape, v.dtype.name, lambda v=v: v)
      for k, v in tensors.items()
  ]


def _read_all(path):
  out = {}
  for k, fname in st.weight_files(path).items():
    with safe_open(fname, "numpy") as f:
      out[k] = f.get_tensor(k)
  return out


# ------------------------------------------------------------------------------------- reading
def test_weight_files_of_sharded_and_single_dirs(tmp_path):
  tensors = _tensors()
  n = helpers.write_safetensors_dir(tmp_path / "sharded", tensors, 300)
  files = st.weight_files(str(tmp_path / "sharded"))
  assert n > 1 and sorted(files) == sorted(tensors)
  assert len(set(files.values())) == n
  (tmp_path / "single").mkdir()
  stn.save_file(tensors, str(tmp_path / "single" / st.SINGLE_FILE))
  files = st.weight_files(str(tmp_path / "single"))
  assert set(files.values()) == {str(tmp_path / "single" / st.SINGLE_FILE)}
  assert sorted(files) == sorted(tensors)


def test_headers_and_one_tensor_reads(tmp_path):
  tensors = _tensors()
  helpers.write_safetensors_dir(tmp_path / "d", tensors, 300)
  files = st.weight_files(str(tmp_path / "d"))
  headers = st.read_headers(files)
  assert headers == {k: (v.shape, v.dtype.name) for k, v in tensors.items()}
  for k, v in tensors.items():
    got = st.read_tensor(files[k], k)
    assert got.dtype == v.dtype and got.tobytes() == v.tobytes(), k


def test_block_reads(tmp_path):
  tensors = _tensors()
  helpers.write_safetensors_dir(tmp_path / "d", tensors, 300)
  files = st.weight_files(str(tmp_path / "d"))
  for k, v in tensors.items():
    block = tuple(slice(n // 3, n - n // 4) for n in v.shape)
    got = st.read_block(files[k], k, block)
    assert got.dtype == v.dtype and got.tobytes() == v[block].tobytes(), k


def test_reads_into_buffers_and_row_ranges(tmp_path):
  tensors = _tensors()
  helpers.write_safetensors_dir(tmp_path / "d", tensors, 300)
  files = st.weight_files(str(tmp_path / "d"))
  w = tensors["d.weight"]  # [32, 8]
  out = np.empty((5, 8), BF16)
  st.read_into(files["d.weight"], "d.weight", out, start=27)
  assert out.tobytes() == w[27:].tobytes()
  whole = np.empty(w.shape, BF16)
  st.read_into(files["d.weight"], "d.weight", whole)
  assert whole.tobytes() == w.tobytes()
  for bad, start in (
      (np.empty((5, 8), BF16), 28),  # past the end
      (np.empty((5, 8), np.float32), 0),  # another dtype
      (np.empty((5, 4), BF16), 0),  # another row shape
  ):
    with pytest.raises(ValueError, match="d.weight: stored bfloat16"):
      st.read_into(files["d.weight"], "d.weight", bad, start)
  with pytest.raises(ValueError, match="not C-contiguous"):
    st.read_into(files["d.weight"], "d.weight", np.empty((8, 32), BF16).T)


def test_unsupported_tensor_dtype(tmp_path):
  tensors = {**_tensors(), "e.weight": np.zeros(3, np.float64)}
  helpers.write_safetensors_dir(tmp_path / "d", tensors)
  with pytest.raises(
      ValueError, match="e.weight: unsupported tensor dtype F64"
  ):
    st.read_headers(st.weight_files(str(tmp_path / "d")))


def test_bin_weights_refused(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle
  with pytest.raises(
      ValueError,
      match=r"PyTorch pickle weights \(pytorch_model.bin\); only safetensors",
  ):
    st.weight_files(str(tmp_path))


def test_bad_directories(tmp_path):
  with pytest.raises(ValueError, match="has no model.safetensors.index.json"):
    st.weight_files(str(tmp_path))
  index = tmp_path / st.INDEX_FILE
  index.write_text("{}")
  with pytest.raises(ValueError, match="not a valid safetensors index"):
    st.weight_files(str(tmp_path))
  index.write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
  with pytest.raises(ValueError, match="maps x to gone.safetensors, which"):
    st.weight_files(str(tmp_path))
  stn.save_file({"y": np.zeros(2, np.float32)}, str(tmp_path / "s.safetensors"))
  index.write_text(json.dumps({"weight_map": {"x": "s.safetensors"}}))
  with pytest.raises(ValueError, match="maps x to s.safetensors, which does"):
    st.read_headers(st.weight_files(str(tmp_path)))


# ------------------------------------------------------------------------------------- writing
def test_sharded_writer_is_read_back_bit_exact(tmp_path):
  tensors = _tensors()
  limit = 600
  names = st.write_sharded(str(tmp_path), _entries(tensors), limit)
  assert len(names) > 1
  index = json.loads((tmp_path / st.INDEX_FILE).read_text())
  assert list(index["weight_map"]) == sorted(tensors)
  assert index["metadata"]["total_size"] == sum(
      v.nbytes for v in tensors.values()
  )
  for name in names:
    with safe_open(str(tmp_path / name), "numpy") as f:
      sizes = [f.get_tensor(k).nbytes for k in f.keys()]
    # a shard exceeds the limit only when it holds a single bigger tensor
    assert sum(sizes) <= limit or len(sizes) == 1
  back = _read_all(str(tmp_path))
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k


def test_one_shard_has_no_index(tmp_path):
  tensors = _tensors()
  assert st.write_sharded(str(tmp_path), _entries(tensors), "1MB") == [
      st.SINGLE_FILE
  ]
  assert sorted(os.listdir(tmp_path)) == [st.SINGLE_FILE]
  back = stn.load_file(str(tmp_path / st.SINGLE_FILE))
  assert all(back[k].tobytes() == v.tobytes() for k, v in tensors.items())


def test_tensors_are_produced_one_at_a_time_in_order(tmp_path):
  tensors, produced = _tensors(), []

  def entry(k, v):
    def produce():
      produced.append(k)
      return v

    return st.Entry(k, v.shape, v.dtype.name, produce)

  entries = [entry(k, v) for k, v in tensors.items()]
  st.write_safetensors(str(tmp_path / "x.safetensors"), entries)
  assert produced == list(tensors)


def test_sharded_writer_takes_tensors_in_any_order(tmp_path):
  """Laid out up front: the same bytes as writing in order, whatever order the tensors come in."""
  tensors = _tensors()
  for d in "abc":
    (tmp_path / d).mkdir()
  names = st.write_sharded(str(tmp_path / "a"), _entries(tensors), 600)
  with st.ShardedWriter(str(tmp_path / "b"), _entries(tensors), 600) as w:
    for k in reversed(list(tensors)):
      w.write(k, tensors[k])
  assert w.names == names
  for name in names + [st.INDEX_FILE]:
    assert (tmp_path / "a" / name).read_bytes() == (
        tmp_path / "b" / name
    ).read_bytes()
  with pytest.raises(ValueError, match="b.bias was declared but never"):
    with st.ShardedWriter(str(tmp_path / "c"), _entries(tensors), 600) as w:
      w.write("a.weight", tensors["a.weight"])


def test_producer_must_match_its_declaration(tmp_path):
  bad = st.Entry("w", (2, 3), "float32", lambda: np.zeros((3, 2), np.float32))
  with pytest.raises(
      ValueError, match=r"w: produced float32\(3, 2\), declared"
  ):
    st.write_safetensors(str(tmp_path / "x.safetensors"), [bad])


def test_parse_size():
  assert st.parse_size("5GB") == 5 * 10**9
  assert st.parse_size("2MiB") == 2 * 2**20
  assert st.parse_size("1.5kb") == 1500
  assert st.parse_size(1234) == st.parse_size("1234") == 1234
  for bad in ("0", "lots", "-3MB", True):
    with pytest.raises(ValueError, match="shard size"):
      st.parse_size(bad)


def test_dtype_names():
  assert st.check_dtype(None) is None and st.check_dtype("bfloat16")
  with pytest.raises(ValueError, match="unknown dtype 'int8'"):
    st.check_dtype("int8")
  assert st.dtype_of(np.zeros(1, BF16)) == "bfloat16"
  with pytest.raises(ValueError, match="unsupported param dtype float64"):
    st.dtype_of(np.zeros(1))
