"""`--dtype auto` on CPU: time the model's matmuls in bfloat16 and float32 on this machine, keep the faster.

Whether bf16 pays on a CPU depends on the CPU, not on a flag one can read: on
the AMD EPYC we run on, bf16 matmuls reach ~820 GFLOP/s, on a 2-core Intel Xeon
with AVX512-BF16 (no AMX exposed) they ran at half the speed of fp32. So the
engine measures. `cpu_dtype(config)` runs the linear layers of one decoder
layer and the LM head at the model's shapes, in both dtypes, interleaved, best
of a few rounds (the machine may be shared), and weighs them as a decode-heavy
generation uses them:

    score = layers x (8 x t(layer, 32 rows) + t(layer, 256 rows)) + 8 x t(head, 32 rows)

(32-row decode steps and a 256-token prefill chunk, the same number of tokens
of each; the LM head runs on decode rows only). Well under a second for
models of SmolLM2's size; the LM head is timed on at most HEAD_COLUMNS of the
vocabulary and scaled, which bounds the probe's memory on big vocabularies.

The result is cached in <cache dir>/dtype_probe.json (cache dir: $AFT_CACHE,
default ~/.cache/aft), one entry per machine and model shape: the key names the
CPU model, a digest of its feature flags, the torch version, torch's thread
count, $ONEDNN_MAX_CPU_ISA (which selects other kernels) and the layer shapes.
An entry holds the choice and the measured milliseconds; delete the file to
probe again. A file that cannot be read is ignored with a warning and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time

from .io import write_json
from .models import cache_dir

log = logging.getLogger(__name__)

PROBE_FILE = "dtype_probe.json"
DECODE_ROWS, PREFILL_ROWS, DECODE_PER_PREFILL = 32, 256, 8
HEAD_COLUMNS = 16384  # LM head columns timed (scaled to the vocabulary)
ROUNDS, BUDGET_SECONDS = 5, 0.4  # best of up to ROUNDS interleaved rounds, stopping early after BUDGET_SECONDS


def layer_shapes(config) -> dict:
    """The (in, out) features of one decoder layer's linear layers and of the LM head, from a model config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv = (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    return {"layer": [(hidden, heads * head_dim), (hidden, kv), (hidden, kv), (heads * head_dim, hidden),
                      (hidden, inter), (hidden, inter), (inter, hidden)],
            "head": (hidden, cfg.vocab_size), "layers": cfg.num_hidden_layers}


def machine_key(shapes: dict) -> str:
    """What the choice depends on: this CPU, torch and its kernels, and the model's shapes."""
    import torch

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in open("/proc/cpuinfo"):
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                cpu = value.strip()
            elif name.strip() == "flags":
                flags = value.strip()
            if cpu and flags and name.strip() == "flags":
                break
    except OSError:
        pass
    digest = hashlib.blake2b(" ".join(sorted(flags.split())).encode(), digest_size=4).hexdigest()
    hidden, inter = shapes["layer"][0][0], shapes["layer"][4][1]
    q, kv, vocab = shapes["layer"][0][1], shapes["layer"][1][1], shapes["head"][1]
    return (f"{cpu} | flags {digest} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"isa {os.environ.get('ONEDNN_MAX_CPU_ISA') or 'default'} | "
            f"hidden {hidden} q {q} kv {kv} inter {inter} vocab {vocab} layers {shapes['layers']}")


def cpu_dtype(config):
    """The faster of torch.bfloat16 and torch.float32 for this model on this CPU (cached; see the module doc)."""
    import torch

    shapes = layer_shapes(config)
    key = machine_key(shapes)
    path = cache_dir() / PROBE_FILE
    entries = _read(path)
    if key in entries:
        return getattr(torch, entries[key]["dtype"])
    ms = probe(shapes)
    choice = min(ms, key=ms.get)
    log.info("dtype auto: %s (probe: %s)", choice, ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))
    entries[key] = {"dtype": choice, "ms": {k: round(v, 2) for k, v in ms.items()}}
    try:
        write_json(path, entries)
    except OSError as e:
        log.warning("%s: cannot cache the dtype probe (%s)", path, e)
    return getattr(torch, choice)


def _read(path) -> dict:
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entries, dict) or not all(
                isinstance(e, dict) and e.get("dtype") in ("bfloat16", "float32") for e in entries.values()):
            raise ValueError("not a map of probe entries")
        return entries
    except (OSError, ValueError) as e:
        log.warning("%s: ignoring an unreadable dtype probe cache (%s); probing again", path, str(e)[:120])
        return {}


def probe(shapes: dict) -> dict[str, float]:
    """Milliseconds of the weighted matmul mix (see the module doc) per dtype name, best of interleaved rounds."""
    import torch

    g = torch.Generator().manual_seed(0)
    (h_in, vocab), cols = shapes["head"], min(shapes["head"][1], HEAD_COLUMNS)
    names = ("bfloat16", "float32")
    parts = {n: _parts(shapes["layer"], (h_in, cols), getattr(torch, n), g) for n in names}
    best = {n: [float("inf")] * 3 for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up: oneDNN builds its kernels on the first call of each shape
            [fn() for fn in parts[n]]
        end = time.perf_counter() + BUDGET_SECONDS
        for r in range(ROUNDS):
            for n in (names if r % 2 == 0 else names[::-1]):
                for i, fn in enumerate(parts[n]):
                    t = time.perf_counter()
                    fn()
                    best[n][i] = min(best[n][i], time.perf_counter() - t)
            if r >= 1 and time.perf_counter() > end:
                break
    layers = shapes["layers"]
    return {n: 1000 * (layers * (DECODE_PER_PREFILL * d + p) + DECODE_PER_PREFILL * head * vocab / cols)
            for n, (d, p, head) in best.items()}


def _parts(layer, head, dtype, g):
    """Three timed callables: one layer's linears at decode rows, at prefill rows, the LM head at decode rows."""
    import torch
    from torch.nn.functional import linear

    weights = [torch.randn(o, i, generator=g).to(dtype) for i, o in layer]
    head_w = torch.randn(head[1], head[0], generator=g).to(dtype)
    x = {(m, i): torch.randn(m, i, generator=g).to(dtype) for m in (DECODE_ROWS, PREFILL_ROWS) for i, _ in layer}

    def run(m):
        return lambda: [linear(x[m, w.shape[1]], w) for w in weights]

    return run(DECODE_ROWS), run(PREFILL_ROWS), lambda: linear(x[DECODE_ROWS, head[0]], head_w)
