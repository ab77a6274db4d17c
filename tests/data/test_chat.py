"""Chat data: validation with file and line, rendering and masks as transformers, packing."""

import json

from hypothesis import given
from hypothesis import strategies as st
import jax
import numpy as np
import pytest

from loopcoder_jax.data import chat, pipeline
from loopcoder_jax.data import tokenizer as tk
from loopcoder_jax.model.config import PLTConfig
from loopcoder_jax.model.transformer import PLTForCausalLM
from tests import helpers

CONV = [
    {"role": "system", "content": "Answer with code."},
    {"role": "user", "content": "Sort a list, é ✓."},
    {"role": "assistant", "content": "sorted(xs)  # 世界"},
    {"role": "user", "content": "And reversed?"},
    {"role": "assistant", "content": "sorted(xs, reverse=True)"},
]
# ChatML with transformers' generation markers around exactly what an assistant turn adds to the
# prompt that asks for it; without the markers it renders the same text.
GEN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
    "<|im_end|>\n{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN_TEMPLATE = GEN_TEMPLATE.replace("{% generation %}", "").replace(
    "{% endgeneration %}", ""
)


def _conv(i):
  """A small deterministic conversation whose length grows with i."""
  return [
      {"role": "user", "content": f"What is {i} plus {i % 7}?"},
      {
          "role": "assistant",
          "content": f"{i} plus {i % 7} is {i + i % 7}." * (1 + i % 5),
      },
  ]


@pytest.fixture(scope="module")
def tok(bpe_dir):
  return chat.with_template(tk.load_tokenizer(bpe_dir))


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": CONV}, None),
        ([1], 'not a JSON object with a "messages" list'),
        ({"messages": []}, '"messages" is not a non-empty list'),
        ({"messages": ["hi"]}, "message 0 is not a JSON object"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "message 0 has unknown role 'bot' (expected one of system, user, assistant)",
        ),
        (
            {"messages": [{"role": "user", "content": " \n"}]},
            "message 0 (user) has empty content",
        ),
        (
            {"messages": [{"role": "user", "content": 3}]},
            "message 0 (user) has no string content",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "the conversation has no assistant turn",
        ),
    ],
)
def test_problem(record, expected):
  assert chat.problem(record) == expected


def test_every_bad_line_reported_with_file_and_line(tok, tmp_path):
  good = {"messages": _conv(1)}
  path = tmp_path / "a.jsonl"
  path.write_text(
      "\n".join(
          [
              json.dumps(good),
              "{not json",
              json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
              json.dumps(
                  {"messages": [{"role": "user", "content": ""}, CONV[2]]}
              ),
              "",  # blank lines are not examples
              json.dumps({"messages": CONV[:2]}),
              json.dumps({"messages": _conv(2)}),
          ]
      )
      + "\n"
  )
  lines = []
  with pytest.raises(ValueError) as e:
    chat.load_conversations(str(path), tok, report=lines.append)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("4 of 6 chat examples")
  assert "data.on_bad_example=skip" in msg
  assert [ln.split(": ")[0] for ln in lines] == [
      f"{path}:{n}" for n in (2, 3, 4, 6)
  ]
  assert "not valid JSON" in lines[0] and "unknown role 'bot'" in lines[1]
  assert "empty content" in lines[2] and "no assistant turn" in lines[3]

  lines.clear()
  convs = chat.load_conversations(
      str(path), tok, on_bad="skip", report=lines.append
  )
  assert [convs[i] for i in range(len(convs))] == [_conv(1), _conv(2)]
  assert lines[-1] == f"skipped 4 of 6 chat examples in {str(path)!r}"


def test_reports_are_capped(tok, tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(
      "x\n" * (chat.MAX_REPORTED + 5)
      + json.dumps({"messages": _conv(0)})
      + "\n"
  )
  lines = []
  convs = chat.load_conversations(
      str(path), tok, on_bad="skip", report=lines.append
  )
  assert len(convs) == 1 and len(lines) == chat.MAX_REPORTED + 2
  assert lines[chat.MAX_REPORTED] == "... and 5 more bad chat examples"


def test_template_problems_are_bad_examples(tok, tmp_path):
  path = _write_jsonl(tmp_path / "a.jsonl", [{"messages": CONV}])
  refuses = tok.with_chat_template(
      "{% for m in messages %}{% if m['role'] == 'system' %}"
      "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}"
      "{% endfor %}"
  )
  with pytest.raises(ValueError, match="refuses it \\(no system role\\)"):
    chat.load_conversations(path, refuses, report=lambda _: None)
  # last message first: a prefix of the conversation is not a prefix of the text
  reverse = tok.with_chat_template(
      "{% for m in messages | reverse %}{{ m['content'] }}{% endfor %}"
  )
  with pytest.raises(ValueError, match="does not render it incrementally"):
    chat.load_conversations(path, reverse, report=lambda _: None)


@pytest.mark.parametrize(
    "source, match",
    [
        ("stdlib", "is the text corpus"),
        ("/nonexistent/*.jsonl", "matches no files"),
        (" , ", "chat data source is empty"),
    ],
)
def test_bad_sources(tok, source, match):
  with pytest.raises(ValueError, match=match):
    chat.load_conversations(source, tok)


def test_txt_file_is_not_chat_data(tok, tmp_path):
  (tmp_path / "a.txt").write_text("hi")
  with pytest.raises(ValueError, match="is not a .jsonl file"):
    chat.load_conversations(str(tmp_path / "a.txt"), tok)


def test_heldout_source():
  cfg = pipeline.default_data_config()
  cfg.format, cfg.source = "chat", "demos"
  assert chat.heldout_source(cfg) == "demos:heldout"
  cfg.eval_source = "/data/h.jsonl"
  assert chat.heldout_source(cfg) == "/data/h.jsonl"
  cfg.source, cfg.eval_source = "/data/*.jsonl", ""
  with pytest.raises(ValueError, match="set data.eval_source"):
    chat.heldout_source(cfg)


# ---------------------------------------------------------------- rendering and masks


def test_default_template_masks_exactly_the_assistant_turns(bpe_dir, tok):
  bare = tk.load_tokenizer(bpe_dir)
  assert (
      bare.chat_template is None and tok.chat_template == chat.DEFAULT_TEMPLATE
  )
  ids_N, mask_N = chat.tokenize(tok, CONV)
  text = tok.decode(ids_N, skip_special_tokens=False)
  assert text == (
      "<|system|>\nAnswer with code.\n<|user|>\nSort a list, é ✓.\n"
      "<|assistant|>\nsorted(xs)  # 世界</s><|user|>\nAnd reversed?\n"
      "<|assistant|>\nsorted(xs, reverse=True)</s>"
  )
  # the masked tokens are each answer, its newline and EOS; the rest is the prompt side
  runs = np.split(ids_N, np.flatnonzero(np.diff(mask_N)) + 1)
  got = [
      (bool(m[0]), tok.decode(r, skip_special_tokens=False))
      for r, m in zip(
          runs, np.split(mask_N, np.flatnonzero(np.diff(mask_N)) + 1)
      )
  ]
  assert got == [
      (
          False,
          "<|system|>\nAnswer with code.\n<|user|>\nSort a list, é ✓.\n<|assistant|>",
      ),
      (True, "\nsorted(xs)  # 世界</s>"),
      (False, "<|user|>\nAnd reversed?\n<|assistant|>"),
      (True, "\nsorted(xs, reverse=True)</s>"),
  ]
  assert ids_N[-1] == tok.eos_id
  # the saved tokenizer carries its template
  assert (
      tk.load_tokenizer(bpe_dir)
      .with_chat_template(chat.DEFAULT_TEMPLATE)
      .chat_template
      == tok.chat_template
  )


def test_template_needs_eos_when_missing(tmp_path, bpe_dir):
  tok = tk.load_tokenizer(bpe_dir)
  tok.eos_id = None
  with pytest.raises(ValueError, match="neither a chat template nor an EOS"):
    chat.with_template(tok)


@pytest.mark.parametrize("which", ["bpe", "sp"])
def test_matches_transformers(which, bpe_dir, sp_dir):
  transformers = pytest.importorskip("transformers")
  path = bpe_dir if which == "bpe" else sp_dir
  hf = transformers.AutoTokenizer.from_pretrained(path)
  ours = tk.load_tokenizer(path).with_chat_template(PLAIN_TEMPLATE)
  for conv in (CONV, CONV[1:3], _conv(5)):
    want = hf.apply_chat_template(
        conv,
        chat_template=GEN_TEMPLATE,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    text, _ = chat.render(ours, conv)
    assert text == hf.apply_chat_template(
        conv, chat_template=GEN_TEMPLATE, tokenize=False
    )
    ids_N, mask_N = chat.tokenize(ours, conv)
    assert ids_N.tolist() == want["input_ids"]
    assert mask_N.astype(int).tolist() == want["assistant_masks"]
    assert 0 < mask_N.sum() < len(mask_N)


def test_add_bos_only_when_missing(sp_dir):
  tok = tk.load_tokenizer(sp_dir).with_chat_template(PLAIN_TEMPLATE)
  with_bos, _ = chat.tokenize(tok, CONV, add_bos=True)
  assert with_bos[0] == tok.bos_id and with_bos[1] != tok.bos_id
  no_bos = tok.with_chat_template(PLAIN_TEMPLATE.replace("{{ bos_token }}", ""))
  ids_N, mask_N = chat.tokenize(no_bos, CONV, add_bos=True)
  assert ids_N.tolist() == with_bos.tolist() and not mask_N[0]


def test_example_shifts_and_truncates(tok):
  ids_N, mask_N = chat.tokenize(tok, CONV)
  ex = chat.example(tok, CONV, seq_len=len(ids_N) - 1)
  np.testing.assert_array_equal(ex["inputs"], ids_N[:-1])
  np.testing.assert_array_equal(ex["targets"], ids_N[1:])
  np.testing.assert_array_equal(ex["loss_mask"], mask_N[1:])
  assert ex["truncated"].sum() == 0
  cut = chat.example(tok, CONV, seq_len=10)
  assert len(cut["inputs"]) == 10 and cut["truncated"].tolist() == [1] + [0] * 9
  np.testing.assert_array_equal(cut["targets"], ids_N[1:11])


# ---------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def chats(tok, tmp_path_factory):
  path = tmp_path_factory.mktemp("chats") / "c.jsonl"
  _write_jsonl(path, [{"messages": _conv(i)} for i in range(40)])
  return chat.load_conversations(str(path), tok)


def _data_cfg(**kw):
  cfg = pipeline.default_data_config()
  cfg.format = "chat"
  cfg.update(kw)
  return cfg


@given(
    seq_len=st.integers(24, 96),
    bins=st.integers(1, 6),
    batch=st.integers(1, 4),
    seed=st.integers(0, 3),
)
def test_packing_keeps_conversations_whole_and_apart(
    tok, chats, seq_len, bins, batch, seed
):
  whole = {}
  for i in range(len(chats)):
    ex = chat.example(tok, chats[i], seq_len)
    whole[tuple(ex["inputs"])] = ex
  it = chat.make_train_iterator(
      _data_cfg(seq_len=seq_len, pack_bins=bins, seed=seed),
      tok,
      chats,
      global_batch_size=batch,
  )
  seen = 0
  for _ in range(4):
    b = next(it)
    for r in range(batch):
      seg = b["segment_ids"][r]
      n = seg.max()
      real = seg > 0
      # segments 1..n, contiguous, then padding
      assert np.array_equal(seg[real], np.sort(seg[real])) and set(
          seg[real]
      ) == set(range(1, n + 1))
      assert not real[real.sum() :].any()
      assert (b["loss_mask"][r][~real] == 0).all() and (
          b["truncated"][r][~real] == 0
      ).all()
      for k in range(1, n + 1):
        at = seg == k
        ex = whole[
            tuple(b["inputs"][r][at])
        ]  # a whole conversation, never a piece
        np.testing.assert_array_equal(b["targets"][r][at], ex["targets"])
        np.testing.assert_array_equal(b["loss_mask"][r][at], ex["loss_mask"])
        np.testing.assert_array_equal(b["truncated"][r][at], ex["truncated"])
        np.testing.assert_array_equal(
            b["positions"][r][at], np.arange(at.sum())
        )
        seen += 1
  assert seen >= 4 * batch


def test_packed_rows_compute_each_conversation_alone(tok):
  """Through the model: a conversation's logits in a packed row equal its logits alone."""
  cfg = PLTConfig.tiny(
      loops=2,
      vocab_size=320,
      max_position_embeddings=64,
      plt_window_size=(8, 0),
  )
  model = PLTForCausalLM(cfg)
  params = model.init(jax.random.key(0), np.zeros((1, 1), np.int32))["params"]
  short = [
      [
          {"role": "user", "content": f"{i}+{i}"},
          {"role": "assistant", "content": str(2 * i)},
      ]
      for i in range(12)
  ]
  b = next(
      chat.make_train_iterator(
          _data_cfg(seq_len=64, pack_bins=4), tok, short, global_batch_size=4
      )
  )
  assert b["segment_ids"].max() >= 2  # some row holds several conversations
  packed = model.apply(
      {"params": params}, b["inputs"], b["segment_ids"], b["positions"]
  )
  for r in range(4):
    for k in range(1, b["segment_ids"][r].max() + 1):
      at = b["segment_ids"][r] == k
      alone = model.apply({"params": params}, b["inputs"][r][at][None])[0]
      # float32, the same math on other shapes: only rounding differs; a leak across segments
      # changes the logits at O(1).
      helpers.assert_close(
          packed[r][at], alone, ops=helpers.forward_ops(cfg, int(at.sum()))
      )


def test_iterator_state_resumes_exactly_through_json(tok, chats):
  cfg = _data_cfg(seq_len=48, pack_bins=3)
  it = chat.make_train_iterator(cfg, tok, chats, global_batch_size=2)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(4)]
  again = chat.make_train_iterator(cfg, tok, chats, global_batch_size=2)
  again.set_state(state)
  for w in want:
    g = next(again)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_process_shards_partition_the_conversations(tok, chats):
  firsts = []
  for pi in range(2):
    it = chat.make_train_iterator(
        _data_cfg(seq_len=96, pack_bins=1, shuffle=False, num_epochs=1),
        tok,
        chats,
        global_batch_size=2,
        process_index=pi,
        process_count=2,
    )
    rows = [b for b in it]
    firsts.append(
        {
            tuple(r[s == k])
            for b in rows
            for r, s in zip(b["inputs"], b["segment_ids"])
            for k in range(1, s.max() + 1)
        }
    )
  assert not firsts[0] & firsts[1]
  assert (
      len(firsts[0]) + len(firsts[1]) >= len(chats) - 4
  )  # dropped: the last partial batch


def test_eval_batches_in_order_and_capped(tok, chats):
  exs = [chat.example(tok, chats[i], 64) for i in range(len(chats))]
  cap = sum(len(e["inputs"]) for e in exs[:10])
  batches = chat.make_eval_batches(
      chats, tok, seq_len=64, batch_size=3, max_tokens=cap
  )
  assert all(b["inputs"].shape == (3, 64) for b in batches)
  got = sorted(
      tuple(r[s == k])
      for b in batches
      for r, s in zip(b["inputs"], b["segment_ids"])
      for k in range(1, s.max() + 1)
  )
  assert got == sorted(tuple(e["inputs"]) for e in exs[:10])
  assert sum(b["loss_mask"].sum() for b in batches) == sum(
      e["loss_mask"].sum() for e in exs[:10]
  )
  with pytest.raises(ValueError, match="must be >= 1"):
    chat.make_eval_batches(chats, tok, seq_len=64, batch_size=0, max_tokens=cap)
