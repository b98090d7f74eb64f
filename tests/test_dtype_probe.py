"""`--dtype auto` on CPU: the probe's choice is used, cached per machine and model shape, and recorded;
a forced dtype wins; a corrupt cache is ignored with a warning. No test assumes which dtype this CPU prefers."""

import json
import logging

import pytest
import torch

from aft.dtype_probe import PROBE_FILE, layer_shapes, machine_key
from aft.loading import load_pretrained


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / PROBE_FILE


def entries(path) -> dict:
    return json.loads(path.read_text())


def test_auto_uses_the_faster_dtype_and_the_cache_spares_a_second_probe(cache, tiny_model_dir):
    model, _ = load_pretrained(str(tiny_model_dir), dtype="auto", device="cpu")
    (key, entry), = entries(cache).items()
    assert key == machine_key(layer_shapes(model.config))
    assert entry["dtype"] == min(entry["ms"], key=entry["ms"].get)  # the faster of the two measured
    assert model.dtype == getattr(torch, entry["dtype"])
    # The cached choice is what a second load uses, without probing: plant the other dtype and see it taken.
    other = "float32" if entry["dtype"] == "bfloat16" else "bfloat16"
    cache.write_text(json.dumps({key: {**entry, "dtype": other}}))
    model, _ = load_pretrained(str(tiny_model_dir), dtype="auto", device="cpu")
    assert model.dtype == getattr(torch, other)
    assert entries(cache)[key]["dtype"] == other


def test_an_entry_is_per_model_shape(cache, tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    wider = AutoConfig.from_pretrained(tiny_model_dir, intermediate_size=256)
    assert machine_key(layer_shapes(config)) != machine_key(layer_shapes(wider))


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_a_forced_dtype_wins_over_the_cache_and_does_not_probe(cache, tiny_model_dir, name, dtype):
    model, _ = load_pretrained(str(tiny_model_dir), dtype=name, device="cpu")
    assert model.dtype == dtype and not cache.exists()
    other = "float32" if name == "bfloat16" else "bfloat16"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({machine_key(layer_shapes(model.config)): {"dtype": other, "ms": {}}}))
    model, _ = load_pretrained(str(tiny_model_dir), dtype=name, device="cpu")
    assert model.dtype == dtype


@pytest.mark.parametrize("text", ["{not json", '{"k": {"dtype": "int8"}}', "[1, 2]"])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_replaced(cache, tiny_model_dir, caplog, text):
    cache.parent.mkdir(parents=True)
    cache.write_text(text)
    with caplog.at_level(logging.WARNING, logger="aft.dtype_probe"):
        model, _ = load_pretrained(str(tiny_model_dir), dtype="auto", device="cpu")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(cache) in warned[0] and "probing again" in warned[0]
    (entry,) = entries(cache).values()  # rewritten with this probe alone
    assert model.dtype == getattr(torch, entry["dtype"])


def test_the_chosen_dtype_is_recorded_in_the_run_config(cache, tiny_model_dir, tmp_path, capsys):
    from aft.cli import main

    (tmp_path / "q.jsonl").write_text('{"id": "a", "prompt": "Hi?"}\n')
    out = tmp_path / "out.jsonl"
    rc = main(["infer", "-i", str(tmp_path / "q.jsonl"), "-o", str(out), "--model", str(tiny_model_dir),
               "-k", "1", "-l", "0", "--max-tokens", "2"])
    assert rc == 0, capsys.readouterr().err
    (entry,) = entries(cache).values()
    assert json.loads((tmp_path / "out.jsonl.config.json").read_text())["engine"]["dtype"] == entry["dtype"]
