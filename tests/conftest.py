"""Shared fixtures: the embedded model's folder, tiny random-init models built in code, and a fake engine.

Tests that use the embedded model's folder (the `embedded_dir` fixture) are marked `slow` here.
"""

from __future__ import annotations

import gc
import json
import os
import random
import re
import sys
import threading
import time
from pathlib import Path

# Compiled modules are cached (in the gitignored __pycache__/ folders) even where PYTHONDONTWRITEBYTECODE is set,
# as it is on our development image: pytest rewrites the asserts of every test module it imports, and compiling
# those and aft's modules again took 3.4 s of each run's 8.2 s start-up on 2 cores (`pytest -m "not slow" -k none`).
sys.dont_write_bytecode = False

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never use the hub: a hub id fails at once, offline

# pytest-xdist: the workers share the cores, a share each, also for the aft processes a test starts (two workers
# each running torch's threads on all cores spin-wait on each other: several times slower). torch reads it when a
# test module first imports torch; this file does not import torch at the top, so xdist's controller process,
# which runs no test, does not pay for importing it.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if WORKERS:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // WORKERS))

import pytest

from aft.engines.base import Completion, Engine, Result, derive_seed, emit_whole, sample_seeds

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from aft.models import embedded_model_dir

    return embedded_model_dir()  # converts the GGUF once (about 30 s), then cached


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (tiny models use it): from the converted folder when it is there, else
    read from the GGUF alone, so tiny-model tests never pay for converting the weights."""
    import importlib.util

    from transformers import AutoTokenizer

    from aft.models import EMBEDDED_GGUF, EMBEDDED_PACKAGE, cache_dir

    folder = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    package = list(importlib.util.find_spec(EMBEDDED_PACKAGE).submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(package, gguf_file=EMBEDDED_GGUF)


@pytest.fixture(scope="session")
def small_tokenizer():
    """A byte-level BPE tokenizer built in code (1024 tokens learnt from tests/fixtures, ChatML template, the
    embedded model's special tokens), for tiny models saved to disk where the test is not about the embedded
    model's tokenizer: loading it takes milliseconds, where each load of the embedded one parses its 3.5 MB
    tokenizer.json (about 0.6 s of CPU per `aft` command that opens the folder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from aft.engines.base import CHATML_TEMPLATE

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([p.read_text() for p in sorted(FIXTURES.rglob("*.json*"))], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def tiny_llama(tokenizer, seed: int = 0, max_positions: int = 2048):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_engine(tokenizer):
    from aft.engines.hf import HFEngine

    return HFEngine(tiny_llama(tokenizer), tokenizer, display_name="tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, small_tokenizer) -> Path:
    """A tiny random model saved as an ordinary transformers folder (for CLI tests), with the small tokenizer."""
    out = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(small_tokenizer).save_pretrained(out)
    small_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def reference_prompts() -> dict:
    return json.loads((FIXTURES / "aft_prompts.json").read_text())


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


class FakeEngine(Engine):
    """A deterministic stand-in for a model, for loop and strategy tests (milliseconds, any CPU).

    A completion is a pure function of (messages, seed, sample index); with temperature 0 (greedy) of the
    messages alone. A token is a word. Each text is a few words, then "Answer: <digit>", so votes and
    verifiers have answers to work with. max_tokens cuts the words (finish_reason "length"); a stop string
    cuts the text (finish_reason "stop"). Every batch received is kept in `calls`, every result returned in
    `results`.
    """

    name = model = "fake"
    WORDS = ("so", "the", "sum", "is", "then", "we", "add", "take", "away", "count", "it", "gives")

    def __init__(self, context_window: int | None = None):
        self.context_window = context_window
        self.calls: list[list] = []
        self.results: list[Result] = []

    @property
    def requests(self) -> list:
        return [r for batch in self.calls for r in batch]

    def count_tokens(self, messages):
        return sum(3 + len(m["content"].split()) for m in messages)

    def generate(self, requests, on_text=None):
        self.calls.append(list(requests))
        out = []
        for req in requests:
            p = req.params
            seeds = sample_seeds(p)
            comps = [self.complete(req.messages, None if p.temperature == 0 else seed, j if p.temperature else 0, p)
                     for j, seed in enumerate(seeds)]
            out.append(Result(comps, prompt_tokens=self.count_tokens(req.messages), seeds=seeds))
        self.results += out
        return emit_whole(out, on_text)

    def complete(self, messages, seed, j, params) -> Completion:
        rng = random.Random(derive_seed(json.dumps(messages), seed, j))
        words = [rng.choice(self.WORDS) for _ in range(rng.randint(2, 12))] + ["Answer:", str(rng.randint(0, 9))]
        text = " ".join(words[: params.max_tokens])
        finish = "length" if len(words) > params.max_tokens else "stop"
        for s in params.stop:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return Completion(text, len(text.split()), finish)


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


def pytest_collection_finish(session):
    """Move what start-up and collection built (torch, transformers, the test modules: most of the heap, and it
    lives to the end) out of the garbage collector's sight, and collect a tenth as often (a young generation of
    10000 objects, not 700): the tests build large heaps of objects that live on (modules imported on first use,
    models, tokenizers), and walking them again and again took about a seventh of the suite's CPU time."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def pytest_sessionfinish(session):
    """One full collection, then the survivors out of sight: pytest ends a run with five full collections (to
    report exceptions raised in finalizers), and each walked every model and tokenizer the tests left alive
    (1.4 s of each worker's end). Garbage the finalizers leave is still young, so still collected and reported."""
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    """Every test that needs the embedded model's folder (it converts the GGUF on first use) is slow."""
    for item in items:
        if "embedded_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


class StreamingFake(FakeEngine):
    """FakeEngine that streams each completion a word at a time: `first_delay` seconds before a call's first
    word (slow proposals), `delay` between words; `fail_after` words: raise, as a broken engine would."""

    def __init__(self, continuous=True, first_delay=0.0, delay=0.0, fail_after=None, context_window=None):
        super().__init__(context_window)
        self.continuous, self.first_delay, self.delay, self.fail_after = continuous, first_delay, delay, fail_after
        self.lock = threading.Lock()

    def generate(self, requests, on_text=None):
        with self.lock:
            results = super().generate(requests)
        time.sleep(self.first_delay)
        sent = 0
        for i, res in enumerate(results):
            for j, c in enumerate(res.completions):
                for piece in re.split(r"(?<= )", c.text):
                    if self.fail_after is not None and sent >= self.fail_after:
                        raise RuntimeError("the engine broke")
                    if on_text and piece:
                        on_text(i, j, piece)
                    sent += 1
                    time.sleep(self.delay)
        return results
