"""Shared fixtures: the embedded model's folder and tiny random-init models built in code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from aft.models import embedded_model_dir

    return embedded_model_dir()  # converts the GGUF once (about 30 s), then cached


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def tiny_llama(tokenizer, seed: int = 0, max_positions: int = 2048):
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
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random model saved as an ordinary transformers folder (for CLI tests)."""
    out = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def reference_prompts() -> dict:
    return json.loads((FIXTURES / "aft_prompts.json").read_text())


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
