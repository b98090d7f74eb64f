"""The GPU paths in one run, offline: one table of what held and what was measured.

    PYTHONPATH=src python benchmarks/gpu_check.py [--out runs/gpu_check.json]   # one GPU, < 8 min
    PYTHONPATH=src python benchmarks/gpu_check.py --cpu-smoke                   # the same code, tiny, on CPU

Needs torch, transformers and peft (plus trl, datasets and accelerate for the two training rows;
without them those rows say "skipped"); no network, no model files: every model is random-init at a
real shape, and the tokenizer is built in code (a word-level vocabulary as large as the model's, with
ChatML and <|im_end|>), saved into a folder this script creates.

Rows:
  sdpa-layout   our KV cache's keys given to SDPA with only the fused kernels allowed (flash,
                memory-efficient): accepted, where the CPU layout (keys stored transposed) is refused
                and would run the math kernel; the time of one attention call each way
  greedy-gqa    our engine's greedy texts against `model.generate(do_sample=False)` on a batch of
  greedy-mha    mixed-length prompts, float32 (TF32 off), grouped-query and multi-head attention
  oom-guard     a batch whose KV cache does not fit a reduced memory fraction
                (torch.cuda.set_per_process_memory_fraction): the engine admits fewer rows and
                finishes every request; one request that cannot fit is a one-line AftError
  throughput    tokens/s of our engine against `generate` (num_return_sequences=n), bf16, at the
                Llama-3.1-8B shape with 2 layers (hidden 4096, 32/8 heads, vocab 128256)
  train-lora    3 steps of `aft train` (LoRA) on a random 4-layer model
  fsdp-1proc    2 steps of full fine-tuning under `accelerate launch --config_file
                configs/accelerate/fsdp.yaml --num_processes 1`; model.safetensors + config.json saved
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROWS: list[dict] = []


def row(name: str, ok: bool | None, result: str, **figures) -> None:
    ROWS.append({"check": name, "ok": ok, "result": result, **figures})
    print(f"  {name}: {'ok' if ok else 'skipped' if ok is None else 'FAILED'}  {result}", flush=True)


def build_tokenizer(vocab_size: int, folder: Path):
    """A word-level tokenizer of `vocab_size` ids ("w0", "w1", ...), ChatML special tokens, EOS = pad = <|im_end|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {f"w{i}": i for i in range(vocab_size - len(specials))}
    vocab.update({s: vocab_size - len(specials) + k for k, s in enumerate(specials)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def llama(tok, device, dtype, layers, hidden, inter, heads, kv_heads, vocab=None, init=0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=8192, initializer_range=init, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def prompts(rng: random.Random, vocab: int, lengths) -> list[list[dict]]:
    return [[{"role": "user", "content": " ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(n))}]
            for n in lengths]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ checks
def check_sdpa_layout(device: str, small: bool) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from aft.engines.hf.cache import buffer_layer_class

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    B, H, T, D = (2, 4, 64, 64) if small else (4, 32, 4096, 128)
    q = torch.randn(B, H, T, D, device=device, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    layer = buffer_layer_class()(T + 16)
    keys, values = layer.update(k, v)  # our layout on this device
    transposed = torch.empty(B, H, D, T + 16, device=device, dtype=dtype).transpose(-1, -2)[:, :, :T]
    transposed.copy_(k)  # the CPU layout, on this device: last dimension strided
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    def attempt(kk):
        try:
            with sdpa_kernel(fused):
                F.scaled_dot_product_attention(q, kk, values, is_causal=True)
            return True
        except RuntimeError:
            return False

    def timed(kk, reps=5):
        F.scaled_dot_product_attention(q, kk, values, is_causal=True)
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            F.scaled_dot_product_attention(q, kk, values, is_causal=True)
        sync(device)
        return (time.perf_counter() - t) / reps * 1e3

    ours_ok, transposed_ok = attempt(keys), attempt(transposed)
    ms_ours, ms_t = timed(keys), timed(transposed)
    on_gpu = device.startswith("cuda")
    ok = (ours_ok and not transposed_ok) if on_gpu else layer.keys.stride(-1) != 1
    row("sdpa-layout", ok, f"fused kernel takes our keys: {ours_ok}; transposed keys: {transposed_ok}; "
        f"{ms_ours:.2f} ms vs {ms_t:.2f} ms a call (B{B} H{H} T{T} D{D}, {str(dtype)[6:]})",
        keys_stride_last=keys.stride(-1), ms_ours=round(ms_ours, 3), ms_transposed=round(ms_t, 3))


def check_greedy(device: str, tok, small: bool, kv_heads: int, name: str) -> None:
    from aft.engines.base import Request, SamplingParams
    from aft.engines.hf import HFEngine

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    heads = 8
    model = llama(tok, device, torch.float32, layers=2 if small else 4, hidden=128 if small else 512,
                  inter=256 if small else 1024, heads=heads, kv_heads=kv_heads, init=0.2)
    rng = random.Random(1)
    lengths = [3, 17, 40, 9, 64, 25] if small else [5, 130, 41, 300, 77, 12, 220, 160]
    qs = prompts(rng, len(tok), lengths)
    new = 12 if small else 48
    eng = HFEngine(model, tok, display_name=name)
    ours = [r.completions[0].text for r in eng.generate([Request(q, SamplingParams(temperature=0, max_tokens=new))
                                                         for q in qs])]
    texts = [tok.apply_chat_template(q, tokenize=False, add_generation_prompt=True) for q in qs]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=new, pad_token_id=tok.pad_token_id)
    ref = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    same = sum(a.strip() == b.strip() for a, b in zip(ours, ref))
    row(name, same == len(qs), f"{same}/{len(qs)} prompts equal to generate, {new} tokens, prompt lengths "
        f"{min(lengths)}-{max(lengths)} words, heads {heads}/{kv_heads}", equal=same, prompts=len(qs))


def check_oom_guard(device: str, tok, small: bool) -> None:
    from aft.engines.base import Request, SamplingParams
    from aft.engines.hf import HFEngine
    from aft.errors import AftError

    model = llama(tok, device, torch.bfloat16 if device.startswith("cuda") else torch.float32, layers=2,
                  hidden=128 if small else 2048, inter=256 if small else 5632, heads=8 if small else 16,
                  kv_heads=8 if small else 16)
    eng = HFEngine(model, tok, display_name="oom-guard")
    rng = random.Random(2)
    n, plen, new = (2, 30, 8) if small else (4, 1500, 64)
    reqs = [Request(q, SamplingParams(n=n, temperature=0.7, max_tokens=new, seed=i))
            for i, q in enumerate(prompts(rng, len(tok), [plen] * 16))]
    tokens = eng.count_tokens(reqs[0].messages)
    whole = eng.chunk_bytes(16 * n, 16, tokens, tokens + new)
    single = eng.chunk_bytes(n, 1, tokens, tokens + new)
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(device).total_memory
        base = torch.cuda.memory_allocated(device)
        fraction = (base + whole / 8) / total  # the batch's KV cache cannot fit, one request's can
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        eng.max_batch_rows = 16 * n  # the memory, not the row cap, decides
        eng.step_log = []
        try:
            t = time.perf_counter()
            out = eng.generate(reqs)
            secs = time.perf_counter() - t
            done = sum(len(r.completions) == n for r in out)
            big = [Request(reqs[0].messages, SamplingParams(n=64 * n, max_tokens=8 * new))]
            try:
                eng.generate(big)
                one_line = "no error (fit)"
            except AftError as e:
                one_line = "AftError, one line" if "\n" not in str(e) else "AftError, several lines"
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()
        admitted = [s["prefill"] for s in eng.step_log if "prefill" in s]
        row("oom-guard", done == 16 and len(admitted) > 1,
            f"memory fraction {fraction:.3f}: {done}/16 requests done in {len(admitted)} admissions "
            f"(rows {admitted}) in {secs:.1f}s; a request too big for the GPU: {one_line}",
            fraction=round(fraction, 4), admissions=admitted)
    else:  # no OOM on CPU: the budget (as measured free memory on a GPU) sizes the admissions
        eng.memory_budget_bytes = int(whole / 3)
        eng.step_log = []
        out = eng.generate(reqs)
        done = sum(len(r.completions) == n for r in out)
        admitted = [s["prefill"] for s in eng.step_log if "prefill" in s]
        row("oom-guard", done == 16 and len(admitted) > 1,
            f"CPU: no OOM here; a budget of a third of the batch's estimate gave admissions of {admitted} rows, "
            f"{done}/16 requests done (one request: {single / 2**20:.1f} MiB)", admissions=admitted)


def check_throughput(device: str, tok, small: bool) -> None:
    from aft.engines.base import Request, SamplingParams
    from aft.engines.hf import HFEngine

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if small:
        model = llama(tok, device, dtype, layers=1, hidden=128, inter=256, heads=8, kv_heads=2)
        nq, n, plen, new = 4, 2, 20, 16
    else:  # Llama-3.1-8B shape, 2 layers
        model = llama(tok, device, dtype, layers=2, hidden=4096, inter=14336, heads=32, kv_heads=8)
        nq, n, plen, new = 16, 4, 500, 256
    rng = random.Random(3)
    qs = prompts(rng, len(tok), [plen + 7 * i for i in range(nq)])
    eng = HFEngine(model, tok, display_name="8b-shape", max_batch_rows=nq * n)
    sp = SamplingParams(n=n, temperature=0.7, top_p=0.95, max_tokens=new, seed=0)
    eng.generate([Request(qs[0], SamplingParams(max_tokens=4))])  # warm-up
    sync(device)
    t = time.perf_counter()
    res = eng.generate([Request(q, sp) for q in qs])
    sync(device)
    ours_s = time.perf_counter() - t
    ours_tokens = sum(c.tokens for r in res for c in r.completions)
    texts = [tok.apply_chat_template(q, tokenize=False, add_generation_prompt=True) for q in qs]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    kw = dict(do_sample=True, temperature=0.7, top_p=0.95, top_k=0, max_new_tokens=new, num_return_sequences=n,
              pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        model.generate(**{k: v[:1] for k, v in enc.items()}, **{**kw, "max_new_tokens": 4})  # warm-up
        sync(device)
        t = time.perf_counter()
        out = model.generate(**enc, **kw)
        sync(device)
    gen_s = time.perf_counter() - t
    gen = out[:, enc["input_ids"].shape[1]:]
    stop = {tok.eos_token_id, tok.pad_token_id}
    gen_tokens = sum(next((i for i, x in enumerate(r) if x in stop), len(r)) for r in gen.tolist())
    a, b = ours_tokens / ours_s, gen_tokens / gen_s
    row("throughput", True, f"ours {a:.0f} tok/s vs generate {b:.0f} tok/s (x{a / b:.2f}); {nq} prompts x n={n}, "
        f"~{plen} words, {new} new tokens, {str(dtype)[6:]}, {model.config.num_hidden_layers} layers of "
        f"hidden {model.config.hidden_size}", ours_tok_s=round(a, 1), generate_tok_s=round(b, 1))


def train_data(folder: Path, vocab: int, rows: int = 16) -> Path:
    rng = random.Random(4)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "aft.jsonl", "w") as f:
        for i in range(rows):
            q = prompts(rng, vocab, [rng.randrange(20, 60)])[0][0]
            a = " ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(rng.randrange(10, 40)))
            f.write(json.dumps({"id": f"r{i}", "prompt": [q], "completion": [{"role": "assistant",
                                                                              "content": a}]}) + "\n")
    return folder


def model_folder(tok, folder: Path, small: bool) -> Path:
    model = llama(tok, "cpu", torch.float32, layers=2 if small else 4, hidden=64 if small else 1024,
                  inter=128 if small else 2816, heads=4 if small else 16, kv_heads=2 if small else 4)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def have(*modules: str) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def check_train_lora(tmp: Path, tok, small: bool) -> None:
    missing = have("trl", "datasets", "accelerate")
    if missing:
        return row("train-lora", None, f"{', '.join(missing)} not installed")
    from aft.train import load_config, run_train

    model_dir = model_folder(tok, tmp / "model", small)
    data = train_data(tmp / "data", len(tok))
    cfg = load_config(None, {"model": str(model_dir), "data": str(data), "output_dir": str(tmp / "lora"),
                             "max_steps": 3, "logging_steps": 1, "save_steps": 100, "learning_rate": 1e-3,
                             "per_device_train_batch_size": 4, "lora_r": 8, "resume": False})
    t = time.perf_counter()
    res = run_train(cfg)
    m = res.metrics
    saved = (res.output_dir / "adapter_model.safetensors").exists()
    row("train-lora", m["steps"] == 3 and saved,
        f"3 steps in {time.perf_counter() - t:.1f}s, loss {m['first_loss']:.3f} -> {m['last_loss']:.3f}, "
        f"bf16 {m['bf16']}, peak GPU {m['peak_gpu_mb']} MB, adapter saved: {saved}",
        first_loss=m["first_loss"], last_loss=m["last_loss"], peak_gpu_mb=m["peak_gpu_mb"])


def check_fsdp(tmp: Path, tok, small: bool, device: str) -> None:
    missing = have("trl", "datasets", "accelerate")
    if missing:
        return row("fsdp-1proc", None, f"{', '.join(missing)} not installed")
    model_dir = tmp / "model" if (tmp / "model").exists() else model_folder(tok, tmp / "model", small)
    data = tmp / "data" if (tmp / "data").exists() else train_data(tmp / "data", len(tok))
    out = tmp / "fsdp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1"]
    if not device.startswith("cuda"):
        cmd += ["--cpu", "--mixed_precision", "no"]
    cmd += ["-m", "aft", "train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out),
            "--no-use_peft", "--max_steps", "2", "--logging_steps", "1", "--save_steps", "100",
            "--per_device_train_batch_size", "2", "--no-resume"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    secs = time.perf_counter() - t
    saved = [f for f in ("model.safetensors", "config.json") if (out / f).exists()]
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return row("fsdp-1proc", False, f"exit {p.returncode} after {secs:.0f}s: {tail[0][:160]}")
    m = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    row("fsdp-1proc", len(saved) == 2 and m.get("steps") == 2,
        f"2 steps in {secs:.0f}s (launch included), saved: {', '.join(saved) or 'nothing'}", steps=m.get("steps"))


# ------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (checks the script runs)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--only", default=None, help="comma-separated row names to run (default: all)")
    args = ap.parse_args()
    small = args.cpu_smoke
    if not small and not torch.cuda.is_available():
        print("no GPU here: run with --cpu-smoke", file=sys.stderr)
        return 2
    device = "cpu" if small else "cuda:0"
    gpu = torch.cuda.get_device_name(0) if device != "cpu" else platform.processor() or "cpu"
    only = set(args.only.split(",")) if args.only else None
    t0 = time.perf_counter()
    print(f"gpu_check on {gpu} ({'cpu smoke' if small else 'GPU'}), torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="aft-gpu-check-") as d:
        tmp = Path(d)
        vocab = 1000 if small else 128256
        tok = build_tokenizer(vocab, tmp / "tokenizer")
        checks = [
            ("sdpa-layout", lambda: check_sdpa_layout(device, small)),
            ("greedy-gqa", lambda: check_greedy(device, tok, small, 2, "greedy-gqa")),
            ("greedy-mha", lambda: check_greedy(device, tok, small, 8, "greedy-mha")),
            ("oom-guard", lambda: check_oom_guard(device, tok, small)),
            ("throughput", lambda: check_throughput(device, tok, small)),
            ("train-lora", lambda: check_train_lora(tmp, build_tokenizer(1000 if small else 32000, tmp / "tok-train"),
                                                    small)),
            ("fsdp-1proc", lambda: check_fsdp(tmp, build_tokenizer(1000 if small else 32000, tmp / "tok-train"),
                                              small, device)),
        ]
        for name, run in checks:
            if only and name not in only:
                continue
            try:
                run()
            except Exception as e:  # one failed check must not hide the others
                traceback.print_exc()
                row(name, False, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}")
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    wall = time.perf_counter() - t0
    print("\n| check | ok | result |\n|---|---|---|")
    for r in ROWS:
        print(f"| {r['check']} | {'yes' if r['ok'] else 'skipped' if r['ok'] is None else 'NO'} | {r['result']} |")
    print(f"\n{gpu}, torch {torch.__version__}, {wall:.0f} s in all")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": gpu, "torch": torch.__version__, "wall_s": round(wall, 1),
                                              "cpu_smoke": small, "rows": ROWS}, indent=1))
    return 0 if all(r["ok"] is not False for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
