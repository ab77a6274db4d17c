"""Text in, token batches out: the built-in corpus, tokenizers and the grain packing pipeline;
chat data (chat.py) and the built-in demonstrations (demos.py) for supervised fine-tuning; the
generated code-tracing task of the loop study (trace.py).
"""

from loopcoder_jax.data import chat, trace
from loopcoder_jax.data.corpus import stdlib_files
from loopcoder_jax.data.demos import demo_conversations
from loopcoder_jax.data.pipeline import (
    default_data_config,
    document_texts,
    load_documents,
    make_eval_batches,
    make_train_iterator,
)
from loopcoder_jax.data.tokenizer import (
    Tokenizer,
    check_vocab,
    find_tokenizer,
    get_or_train_tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "Tokenizer",
    "chat",
    "check_vocab",
    "default_data_config",
    "demo_conversations",
    "document_texts",
    "find_tokenizer",
    "get_or_train_tokenizer",
    "load_documents",
    "load_tokenizer",
    "make_eval_batches",
    "make_train_iterator",
    "stdlib_files",
    "trace",
    "train_bpe",
]
