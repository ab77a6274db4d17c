"""Built-in demonstrations: functions cut at their docstring, split like the corpus, valid chats."""

import ast

from loopcoder_jax.data import chat, corpus, demos


def test_request_and_answer_make_the_function():
  text = (
      "import os\n\n"
      "class A:\n"
      "    @property\n"
      "    def f(self, x):\n"
      '        """Doc.\n\n        More."""\n'
      "        y = x + 1\n\n"
      "        return y\n"
      "    def g(self):\n"
      '        """No body."""\n'
      "def h(): pass\n"
      'def k(): """doc"""; return 1\n'
  )
  assert demos.function_pairs(text) == [
      (
          'def f(self, x):\n    """Doc.\n\n    More."""\n',
          "    y = x + 1\n\n    return y\n",
      )
  ]
  assert demos.function_pairs("def broken(:\n") == []


def test_every_demo_is_a_documented_function_completed_by_its_body():
  for split in corpus.SPLITS:
    for request, answer in demos.demo_pairs(split):
      (fn,) = ast.parse(request + answer).body
      assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
      assert ast.get_docstring(fn) is not None and len(fn.body) >= 2
      (head,) = ast.parse(request).body  # the request is the def and docstring
      assert len(head.body) == 1 and ast.get_docstring(head) is not None
      assert request.startswith(("def ", "async def "))
      assert answer.count("\n") <= demos.MAX_ANSWER_LINES
      assert max(len(request), len(answer)) <= demos.MAX_CHARS


def test_split_follows_the_corpus_split():
  heldout = [
      pair
      for _, text in corpus.stdlib_files("heldout")
      for pair in demos.function_pairs(text)
  ]
  assert demos.demo_pairs("heldout") == heldout
  train = demos.demo_pairs("train")
  assert len(train) > 20 * len(heldout) > 0


def test_demos_are_valid_chats():
  for split in corpus.SPLITS:
    for conv in demos.demo_conversations(split):
      assert chat.problem({"messages": conv}) is None
      assert [m["role"] for m in conv] == ["user", "assistant"]
      assert conv[0]["content"].startswith(demos.REQUEST)
