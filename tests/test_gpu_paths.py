"""GPU and cluster paths, checked where they can be without a GPU (issue 14).

Config-level checks of the shipped accelerate/DeepSpeed/FSDP configs and of what
transformers and TRL read from them; the one loader on tiny models on the CPU;
the engine's cache layout and chunk sizing with a CPU stand-in (the meta device
stands in for a GPU where only the layout matters, a byte budget for the free
memory). benchmarks/gpu_check.py runs the same paths on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from aft.errors import AftError

from conftest import tiny_llama

ROOT = Path(__file__).parents[1]
FIX = ROOT / "tests" / "fixtures" / "train" / "data"


def accelerate_config(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "accelerate" / name).read_text())


# ------------------------------------------------------------------ shipped configs (items 3, 4, 5, 15)
def test_fsdp_config_saves_a_full_state_dict():
    # SHARDED_STATE_DICT makes Trainer.save_model write neither weights nor config.json.
    fsdp = accelerate_config("fsdp.yaml")["fsdp_config"]
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    import inspect

    from transformers import Trainer

    assert '"FULL_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type)' in \
        inspect.getsource(Trainer.save_model)  # what transformers checks before it gathers and saves


def test_zero3_config_initialises_sharded_and_saves_16bit():
    ds = accelerate_config("zero3.yaml")["deepspeed_config"]
    assert ds["zero_stage"] == 3 and ds["zero3_init_flag"] is True and ds["zero3_save_16bit_model"] is True


@pytest.mark.parametrize("name", ["train_lora_gpu.yaml", "train_full_gpu.yaml"])
def test_gpu_configs_that_report_to_tensorboard_name_the_extra(name, tmp_path):
    import importlib.util

    from aft.train import check_packages, load_config

    cfg = load_config(str(ROOT / "configs" / name), {"output_dir": str(tmp_path)})
    assert "tensorboard" in cfg.report_to
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        check_packages(cfg)  # installed: nothing to say
    else:
        with pytest.raises(AftError, match=r"pip install 'aft\[tensorboard\]'"):
            check_packages(cfg)
    extras = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("tensorboard") for d in extras["tensorboard"])
    assert any(d.startswith("deepspeed") for d in extras["deepspeed"])


def test_report_to_tensorboard_without_the_package_is_one_line(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    from aft.cli import main

    rc = main(["train", "--model", "no-such-model", "--data", str(FIX), "--output_dir", str(tmp_path),
               "--report_to", "tensorboard"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("aft train: error:") and "aft[tensorboard]" in err and "\n" not in err


def test_deepspeed_launch_without_the_package_fails_before_the_model_loads(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("deepspeed"):
        pytest.skip("deepspeed is installed here")
    from aft.train import load_config, run_train

    # What `accelerate launch --config_file configs/accelerate/zero3.yaml` puts in each process's environment.
    for k, v in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                 "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(None, {"model": "no-such-model", "data": str(FIX), "output_dir": str(tmp_path)})
    # The training arguments come first (ZeRO-3 init needs them at load time): the missing package is
    # reported, not the model that was never looked up.
    with pytest.raises(AftError, match=r"pip install 'aft\[deepspeed\]'"):
        run_train(cfg)


def test_zero3_lora_checkpointing_is_reentrant_under_the_name_transformers_reads(tmp_path):
    from trl import SFTConfig

    from aft.train import checkpointing_args, load_config

    cfg = load_config(None, {"data": str(FIX), "gradient_checkpointing": True, "use_peft": True})
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **checkpointing_args(cfg, "zero3"))
    # transformers 5's Trainer reads activation_checkpointing_kwargs (default use_reentrant=False)
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": True}
    # and what TRL writes later (gradient_checkpointing_kwargs["use_reentrant"] = True) lands in the same dict
    assert args.gradient_checkpointing_kwargs is args.activation_checkpointing_kwargs
    plain = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **checkpointing_args(cfg, "zero2"))
    assert plain.activation_checkpointing and not plain.activation_checkpointing_kwargs
    full = load_config(None, {"data": str(FIX), "gradient_checkpointing": True, "use_peft": False})
    assert "activation_checkpointing_kwargs" not in checkpointing_args(full, "zero3")


# ------------------------------------------------------------------ the one loader (items 6, 11, 16)
def test_placement_by_device_and_sharding(monkeypatch):
    from aft.loading import local_rank, placement

    assert placement("cuda:3") == {"device_map": {"": "cuda:3"}}  # straight to the GPU, no CPU copy
    assert placement("cpu") == {}
    assert placement("cuda:1", "zero3") == {} and placement("cuda:1", "fsdp") == {}  # they place the shards
    assert placement("cuda:1", "zero2") == {"device_map": {"": "cuda:1"}}
    monkeypatch.setenv("LOCAL_RANK", "5")  # the 6th process on a machine gets the 6th GPU
    assert local_rank() == 5


def test_sharding_read_from_the_accelerate_environment(monkeypatch):
    from aft.loading import sharding

    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(k, raising=False)
    assert sharding() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharding() == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert sharding() == "zero3"


def test_qlora_stores_4bit_weights_in_the_compute_dtype():
    from aft.loading import quantization_config

    q = quantization_config(torch.bfloat16)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and q.bnb_4bit_quant_storage == torch.bfloat16


def test_full_fine_tuning_keeps_fp32_master_weights():
    from aft.loading import training_dtype

    # Without FSDP/ZeRO nothing else keeps fp32 weights: full fine-tuning loads fp32 (bf16 autocast computes).
    assert training_dtype("auto", "cuda:0", use_peft=False) == torch.float32
    assert training_dtype("auto", "cuda:0", use_peft=False, shard="fsdp") == torch.float32
    assert training_dtype("auto", "cpu", use_peft=True) == torch.float32
    assert training_dtype("bfloat16", "cuda:0", use_peft=False) == torch.bfloat16  # asked for: given


def test_full_fine_tuning_loads_fp32_and_lora_the_asked_dtype(tiny_model_dir):
    from aft.train import load_model

    lm, _, _, _ = load_model(str(tiny_model_dir), "auto", use_peft=False)
    assert {p.dtype for p in lm.parameters()} == {torch.float32}
    lm, _, _, _ = load_model(str(tiny_model_dir), "bfloat16", use_peft=True)
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}


def test_one_loader_for_engine_scorer_and_training(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from aft.engines.hf import HFEngine
    from aft.loading import load_pretrained

    model, tok = load_pretrained(str(tiny_model_dir), dtype="float32", device="cpu")
    assert next(model.parameters()).device.type == "cpu" and tok.eos_token_id is not None
    # An adapter is merged in on load: same logits as the PEFT model in memory.
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = peft(input_ids=x).logits
        merged, _ = load_pretrained(str(tiny_model_dir), adapter=str(tmp_path / "adapter"), dtype="float32",
                                    device="cpu")
        torch.testing.assert_close(merged(input_ids=x).logits, want, atol=1e-4, rtol=1e-4)
    eng = HFEngine.load(str(tiny_model_dir), dtype="float32", device="cpu")
    assert eng.device.type == "cpu"
    with pytest.raises(AftError, match=r"^reward model '.*': cannot load as a sequence-classification model"):
        load_pretrained(str(tmp_path / "adapter"), task="sequence-classification", what="reward model", device="cpu")


def test_merge_under_a_live_zero3_config_loads_on_this_process_alone(tiny_model_dir, tmp_path):
    """After ZeRO-3 training the trainer's DeepSpeed config is still registered; rank 0 merges alone.
    With it live, from_pretrained would partition the base with zero.Init (a collective: a hang)."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import (is_deepspeed_zero3_enabled, set_hf_deepspeed_config,
                                                     unset_hf_deepspeed_config)

    from aft.train import BASE_MARKER, merge

    adapter = tmp_path / "adapter"
    torch.manual_seed(2)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).save_pretrained(adapter)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    (adapter / BASE_MARKER).write_text(str(tiny_model_dir) + "\n")
    ds = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    set_hf_deepspeed_config(ds)
    try:
        assert is_deepspeed_zero3_enabled()
        out = merge(adapter, tmp_path / "merged", "float32")
    finally:
        unset_hf_deepspeed_config()
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


# ------------------------------------------------------------------ the transformers engine (items 10, 14)
def test_keys_are_stored_transposed_on_cpu_only():
    from aft.engines.hf.cache import buffer_layer_class, keys_transposed

    assert keys_transposed("cpu") and not keys_transposed("cuda:0") and not keys_transposed("meta")
    layer_cls = buffer_layer_class()
    for device, contiguous_last_dim in (("cpu", False), ("meta", True)):  # meta stands in for a GPU's layout
        layer = layer_cls(16)
        k = torch.zeros(2, 3, 5, 8, device=device)
        keys, values = layer.update(k, k.clone())
        assert keys.shape == values.shape == (2, 3, 5, 8)
        assert (keys.stride(-1) == 1) is contiguous_last_dim
        layer.update(torch.zeros(2, 3, 20, 8, device=device), torch.zeros(2, 3, 20, 8, device=device))  # grows
        assert layer.keys.shape == (2, 3, 25, 8) and (layer.keys.stride(-1) == 1) is contiguous_last_dim


def test_rows_are_admitted_to_the_memory_budget(tokenizer):
    from aft.engines.base import Request, SamplingParams
    from aft.engines.hf import HFEngine

    eng = HFEngine(tiny_llama(tokenizer), tokenizer, display_name="tiny")
    reqs = [Request([{"role": "user", "content": f"question {i}"}], SamplingParams(n=2, temperature=0, max_tokens=4))
            for i in range(6)]
    eng.step_log = []
    free = eng.generate(reqs)
    assert eng.step_log[0] == {"prefill": 12}  # no budget on the CPU: all at once
    plen = max(eng.count_tokens(r.messages) for r in reqs)
    # A budget that holds 3 requests (6 rows) of these, not 4:
    eng.memory_budget_bytes = eng.chunk_bytes(6, 3, plen, plen + 4) + 1
    assert eng.chunk_bytes(8, 4, plen, plen + 4) > eng.memory_budget_bytes
    eng.step_log = []
    sized = eng.generate(reqs)
    decode_rows = [sum(s.values()) for s in eng.step_log if "prefill" not in s]
    assert eng.step_log[0] == {"prefill": 6} and max(decode_rows) == 6
    assert [[c.text for c in r.completions] for r in sized] == [[c.text for c in r.completions] for r in free]


def test_chunk_bytes_at_the_papers_settings_exceeds_an_h200(tokenizer):
    """K=5 aggregations of 4096-token proposals, 4096 new tokens, Llama-3.1-8B shape (GQA 32/8, 32 layers):
    64 rows at once would need far more than an H200's 141 GB; the budget cuts the chunk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aft.engines.hf import HFEngine

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072)
    with torch.device("meta"):
        lm = LlamaForCausalLM(cfg).to(torch.bfloat16)
    eng = HFEngine.__new__(HFEngine)
    eng.lm = lm
    prompt = 5 * 4096 + 200
    assert eng.chunk_bytes(64, 13, prompt, prompt + 4096) > 141e9
    per_request = eng.chunk_bytes(5, 1, prompt, prompt + 4096)
    assert 10e9 < per_request < 40e9  # 6 rows x 24.7k positions x 128 KiB of K+V, and the rest
