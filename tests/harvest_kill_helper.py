"""A tiny harvest that SIGKILLs its own process at a chosen point (driven by tests/test_harvest.py).

    python tests/harvest_kill_helper.py CORPUS.jsonl OUT.h5 PHASE COMMIT_INDEX
    python tests/harvest_kill_helper.py CORPUS.jsonl OUT.h5 after SECONDS   # SECONDS after the first commit
    python tests/harvest_kill_helper.py CORPUS.jsonl OUT_DIR PHASE COMMIT_INDEX i/n   # shard i of n into OUT_DIR

PHASE is one of the harvest's on_phase names ("created", "hook_written", "rows_flushed",
"committed"); the process dies the first time that phase is reached for COMMIT_INDEX.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from featureatlas.activation_store.corpus import CorpusConfig
from featureatlas.activation_store.harvest import HarvestConfig, harvest

HOOKS = ("resid_post.0", "mlp_hidden.1")


def tiny_model():
    from featureatlas.activation_store.models import random_model

    return random_model("llama", n_layers=2, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, max_ctx=64, seed=0)


def byte_bpe():
    """A byte-level BPE tokenizer without merges (259 ids: <s>, </s>, <pad>, the 256 byte symbols)."""
    from tokenizers import pre_tokenizers

    from featureatlas.activation_store.models.tokenizer import BPETokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return BPETokenizer.from_gguf_fields(tokens=["<s>", "</s>", "<pad>"] + alphabet, merges=[],
                                         token_types=[3, 3, 3] + [1] * 256, pre="gpt2", bos_id=0, eos_id=1, pad_id=2)


def tiny_hf_dir(path):
    """The tiny model saved as a Hugging Face directory, so the CLI can load it by path (`--model DIR`)."""
    from featureatlas.activation_store.models import random_model
    from featureatlas.activation_store.models.hf import save_hf_dir

    lm = random_model("llama", n_layers=2, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, max_ctx=64, vocab_size=259,
                      seed=0)
    lm.tokenizer = byte_bpe()
    save_hf_dir(lm, path)
    return path


def tiny_config(corpus_path, **overrides) -> HarvestConfig:
    corpus = CorpusConfig(source=str(corpus_path), context_length=32, min_tokens=4, seed=0)
    kw = dict(model="tiny", hooks=HOOKS, corpus=corpus, dtype="float16", batch_size=4, commit_contexts=8)
    kw.update(overrides)
    return HarvestConfig(**kw)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(corpus_path, out, phase, arg, shard="") -> None:
    on_phase = None
    if phase == "after":
        delay = float(arg)

        def on_phase(name, index):
            if name == "committed" and index == 0:  # the model is compiled and running by now
                threading.Timer(delay, die).start()
    else:
        def on_phase(name, index):
            if name == phase and index == int(arg):
                die()
    harvest(tiny_config(corpus_path, shard=shard), out, lm=tiny_model(), progress=False, on_phase=on_phase)


if __name__ == "__main__":
    main(*sys.argv[1:6])
