"""aft train on tiny random-init Llama models (hidden 64, 2 layers) with the embedded model's tokenizer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from aft.errors import AftError
from aft.models import resolve
from aft.train import TrainConfig, build_trainer, encode_rows, load_config, read_rows, run_train, setup_chat_template

FIX = Path(__file__).parent / "fixtures" / "train" / "data"
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tokenizer):
    return copy.deepcopy(tokenizer)  # the tests change its template


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tiny")
    tiny_llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def cfg_for(model, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(FIX), output_dir=str(out), max_steps=4, logging_steps=1, save_steps=100,
                per_device_train_batch_size=4, learning_rate=5e-3, lora_r=8, resume=False)
    base.update(kw)
    return load_config(None, base)


# ------------------------------------------------------------------ loss positions in a real batch
def llama3_tokenizer(tok):
    t = copy.deepcopy(tok)
    t.add_special_tokens({"bos_token": "<|begin_of_text|>",
                          "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    t.chat_template = LLAMA3_TEMPLATE
    return t


@pytest.mark.parametrize("template", ["embedded", "llama3"])
def test_loss_is_on_target_and_end_of_turn_only(tok, template, tmp_path):
    t = copy.deepcopy(tok) if template == "embedded" else llama3_tokenizer(tok)
    eot = setup_chat_template(t)
    eot_text = "<|im_end|>" if template == "embedded" else "<|eot_id|>"
    assert t.convert_ids_to_tokens(eot) == eot_text and t.eos_token == eot_text  # EOS = end of turn
    rows = read_rows(FIX / "aft.jsonl")
    cfg = cfg_for("unused", tmp_path, use_peft=template == "embedded")
    trainer = build_trainer(cfg, tiny_llama(len(t)), t, encode_rows(t, rows, eot, 4096))
    batch = next(iter(trainer.get_train_dataloader()))
    by_prompt = {t.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True): r for r in rows}
    assert len(batch["input_ids"]) == 4
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        carry = labels != -100
        first = int(carry.nonzero()[0])
        # the prompt tokens are exactly what inference (HFEngine.encode) feeds the model
        prompt_text = t.decode(ids[:first])
        row = by_prompt[prompt_text]
        assert ids[:first].tolist() == t(prompt_text, add_special_tokens=False)["input_ids"]
        assert t.decode(labels[carry]) == row["completion"][0]["content"] + eot_text
        assert carry[first:].sum() == carry.sum()  # one contiguous span, ending at the end of turn
        assert labels[carry][-1] == eot
        assert torch.equal(labels[carry], ids[carry])


def test_cpu_loss_scores_only_labelled_positions_with_the_same_loss_and_gradients(small_tokenizer, tmp_path,
                                                                                  monkeypatch):
    """On CPU the fused LM head projects only the labelled positions (aft.train.score_loss_positions_only);
    the loss and every gradient equal those of projecting every position (TRL's own CPU path). The small
    tokenizer's 1024-token vocabulary: the choice of positions does not depend on its size."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils._use_triton, "__wrapped__", trl_utils._use_triton)  # TRL's own
    monkeypatch.setattr(trl_utils, "_use_triton", original)  # restored after the test
    t = copy.deepcopy(small_tokenizer)
    eot = setup_chat_template(t)
    cfg = cfg_for("unused", tmp_path, use_peft=False)
    trainer = build_trainer(cfg, tiny_llama(len(t)), t, encode_rows(t, read_rows(FIX / "aft.jsonl"), eot, 4096))
    assert trl_utils._use_triton(torch.device("cpu")) and not original(torch.device("cpu"))
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] != -100).float().mean() < 0.5  # mostly prompt: the case the gathering is for

    def loss_and_grads():
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    gathered, g_gathered = loss_and_grads()
    monkeypatch.setattr(trl_utils, "_use_triton", original)
    every, g_every = loss_and_grads()
    assert gathered == pytest.approx(every, rel=1e-5) and gathered > 0
    assert g_gathered.keys() == g_every.keys() and len(g_every) > 10
    for name, g in g_every.items():
        torch.testing.assert_close(g_gathered[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_base_model_without_template_gets_chatml_with_its_eos(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    assert t.convert_ids_to_tokens(setup_chat_template(t)) == "<|im_end|>"
    t2 = llama3_tokenizer(tok)
    t2.chat_template = None
    t2.eos_token = "<|eot_id|>"
    t2 = copy.deepcopy(t2)
    # no <|im_end|> change needed: ChatML's end of turn is the tokenizer's EOS
    eot = setup_chat_template(t2)
    assert eot in (t2.convert_tokens_to_ids("<|im_end|>"), t2.eos_token_id)


# ------------------------------------------------------------------ training works
@pytest.mark.slow  # trains (TRL)
def test_few_steps_reduce_loss_and_write_outputs(tiny_dir, tmp_path):
    from aft.cli import main

    out = tmp_path / "full"
    rc = main(["train", "--model", str(tiny_dir), "--data", str(FIX), "--output_dir", str(out), "--no-use_peft",
               "--max_steps", "6", "--learning_rate", "1e-2", "--logging_steps", "1", "--save_steps", "100",
               "--per_device_train_batch_size", "2"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    losses = [l for _, l in m["losses"]]
    assert losses[-1] < losses[0] - 1.0, losses
    for f in ("config.json", "model.safetensors", "chat_template.jinja", "tokenizer.json", "loss.png",
              "config.yaml", "sft_config.json"):
        assert (out / f).exists(), f
    # the saved config reproduces the run
    again = load_config(str(out / "config.yaml"), {})
    assert again.use_peft is False and again.max_steps == 6
    assert resolve(str(out)).path == str(out)


@pytest.mark.slow  # trains (TRL)
def test_adapter_reload_and_merge_match_in_memory(tiny_dir, tmp_path, tok):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = run_train(cfg_for(tiny_dir, tmp_path / "lora", merge=True, max_steps=2, per_device_train_batch_size=2))
    out = res.output_dir
    assert (out / "adapter_config.json").exists() and (out / "aft_base_model.txt").exists()
    x = torch.tensor([tok("<|im_start|>user\nCalculate 2 + 2.<|im_end|>\n")["input_ids"]])
    live = res.trainer.model.eval()
    with torch.no_grad():
        want = live(input_ids=x).logits
        spec = resolve(str(out))  # what `aft infer --model <adapter dir>` loads
        assert spec.adapter == str(out) and spec.path == str(tiny_dir)
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec.path), spec.adapter).eval()
        torch.testing.assert_close(reloaded(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(res.merged_dir).eval()
        torch.testing.assert_close(merged(input_ids=x).logits, want, atol=1e-4, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
        assert not torch.allclose(base(input_ids=x).logits, want, atol=1e-4)  # the adapter did learn something
    assert (res.merged_dir / "chat_template.jinja").exists()


@pytest.mark.slow  # trains (TRL) twice
def test_training_from_an_adapter_folder_keeps_that_adapter(tiny_dir, tmp_path, tok):
    """`--model <adapter>` with LoRA trains that adapter further: the result, loaded as `aft infer` loads it,
    holds the first adapter's training too (it used to be merged, a new adapter trained on top, and only the
    new one saved against the original base: the first was lost)."""
    from aft.loading import load_pretrained

    first = run_train(cfg_for(tiny_dir, tmp_path / "a", max_steps=2, per_device_train_batch_size=2)).output_dir
    # a learning rate of 1e-12: the second run changes nothing visible, so it must equal the first adapter
    second = run_train(cfg_for(first, tmp_path / "b", max_steps=1, per_device_train_batch_size=2,
                               learning_rate=1e-12)).output_dir
    assert (second / "aft_base_model.txt").read_text().strip() == str(tiny_dir)
    x = torch.tensor([tok("<|im_start|>user\nCalculate 2 + 2.<|im_end|>\n")["input_ids"]])

    def logits(model: str):
        spec = resolve(model)
        lm, _ = load_pretrained(spec.path, adapter=spec.adapter, dtype="float32", device="cpu")
        with torch.no_grad():
            return lm(input_ids=x).logits

    want = logits(str(first))
    assert not torch.allclose(logits(str(tiny_dir)), want, atol=1e-4)  # the first adapter learned something
    torch.testing.assert_close(logits(str(second)), want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # trains (TRL) twice
def test_resume_from_last_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "resume"
    kw = dict(save_steps=1, resume=True, per_device_train_batch_size=2)
    first = run_train(cfg_for(tiny_dir, out, max_steps=1, **kw))
    assert (out / "checkpoint-1" / "aft_base_model.txt").exists()
    assert first.metrics["steps"] == 1
    second = run_train(cfg_for(tiny_dir, out, max_steps=2, **kw))
    assert second.metrics["resumed_from"].endswith("checkpoint-1")
    assert second.metrics["steps"] == 2 and second.metrics["steps_this_run"] == 1
    with pytest.raises(AftError, match="different mode"):
        run_train(cfg_for(tiny_dir, out, max_steps=3, mode="sft", **kw))


def test_mix_mode_adds_a_fraction_of_sft_rows(tmp_path):
    from aft.train import data_files, select_rows

    cfg = cfg_for("x", tmp_path, mode="mix", mix_sft_fraction=0.5)
    rows = {k: read_rows(p) for k, p in data_files(cfg).items()}
    sel = select_rows(cfg, rows)
    assert len(sel) == 8 + 4
    assert sum(r["id"].startswith("sft:") for r in sel) == 4
    assert len(select_rows(cfg_for("x", tmp_path, mode="sft"), {"sft": rows["sft"]})) == 8


# ------------------------------------------------------------------ bad input: clear errors, before any model loads
GOOD = json.loads((FIX / "aft.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("change,message", [
    (lambda r: r.pop("prompt"), 'missing field "prompt"'),
    (lambda r: r.pop("completion"), 'missing field "completion"'),
    (lambda r: r.update(completion=[{"role": "assistant", "content": "  "}]), "empty completion"),
    (lambda r: r.update(completion=[]), 'field "completion": expected a non-empty list'),
    (lambda r: r.update(completion=[{"role": "user", "content": "x"}]), "unexpected role 'user'"),
    (lambda r: r["prompt"].append({"role": "robot", "content": "x"}), "unknown role 'robot'"),
])
def test_bad_data_names_file_and_line(tmp_path, change, message):
    bad = copy.deepcopy(GOOD)
    change(bad)
    d = tmp_path / "data"
    d.mkdir()
    (d / "aft.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    cfg = load_config(None, {"model": "no-such-model", "data": str(d), "output_dir": str(tmp_path / "o")})
    with pytest.raises(AftError, match=rf"aft\.jsonl:2: .*{message}"):
        run_train(cfg)


def test_config_yaml_keys(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: smollm2-135m\ndata: d\nlora_r: 4\nweight_decay: 0.1\nlearning_rate: 1e-4\n")
    cfg = load_config(str(y), {"learning_rate": 3e-4})
    assert cfg.lora_r == 4 and cfg.learning_rate == 3e-4 and cfg.sft_args == {"weight_decay": 0.1}
    y.write_text("data: d\nlora_rank: 4\n")
    with pytest.raises(AftError, match="unknown key 'lora_rank'"):
        load_config(str(y), {})
    with pytest.raises(AftError, match="no training data"):
        load_config(None, {})


@pytest.mark.parametrize("name", ["train_lora_cpu.yaml", "train_lora_gpu.yaml", "train_full_gpu.yaml"])
def test_shipped_configs_load(name):
    from trl import SFTConfig

    import yaml

    from aft.train import OUR_KEYS

    path = Path(__file__).parents[1] / "configs" / name
    cfg = load_config(str(path), {})
    raw = yaml.safe_load(path.read_text())
    assert {k: getattr(cfg, k) for k in raw if k in OUR_KEYS} == {k: v for k, v in raw.items() if k in OUR_KEYS}
    assert cfg.sft_args == {k: v for k, v in raw.items() if k not in OUR_KEYS}  # the rest passes through to TRL
    extra = {k: v for k, v in cfg.sft_args.items() if k != "bf16"}
    args = SFTConfig(output_dir="/tmp/x", use_cpu=True, activation_checkpointing=False, **extra)
    assert {k: getattr(args, k) for k in extra} == extra


# ------------------------------------------------------------------ several processes
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_model_and_rank_0_writes(tiny_dir, tmp_path):
    """DDP over gloo on the CPU, as `aft train` runs on several GPUs or machines: each process trains on its
    half of the rows, the adapter, checkpoints and metrics are written once, rank 0 alone logs and prints.
    (`accelerate launch --cpu` starts one process whatever --num_processes says; --multi_gpu on a machine
    without GPUs starts them all, on the CPU.)"""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "aft", "train", "--model", str(tiny_dir), "--data", str(FIX), "--output_dir", str(out),
           "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--save_steps", "1",
           "--logging_steps", "1"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "AFT_PROGRESS": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 2 and m["train_rows"] == 8
    assert m["steps"] == 2  # 8 rows / (2 rows x 2 processes) per step: one process alone would take 4
    assert [step for step, _ in m["losses"]] == [1, 2]  # one loss per step, not one per process
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "checkpoint-2" / "aft_base_model.txt").exists() and (out / "loss.png").stat().st_size > 0
    assert resolve(str(out)).adapter == str(out)  # the adapter loads as `aft infer --model <out>` would
    assert r.stdout.count("lora aft training: 2 steps on 8 rows") == 1 and r.stdout.count("'train_runtime'") == 1
    assert r.stderr.count("mode aft: 8 training rows") == 1 and r.stderr.count("aft.loading: loaded") == 1
    assert "[rank1]" not in r.stderr and "Traceback" not in r.stderr
