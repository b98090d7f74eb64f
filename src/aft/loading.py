"""The one loader of transformers models: the inference engine, on-policy sampling, training and the
reward-model scorer all load their weights here.

    load_pretrained(path, ...)   tokenizer + model, placed and typed; a PEFT adapter merged in
    pick_dtype(dtype, device, config)  "auto" -> bf16 on GPUs (fp16 where bf16 is missing); on CPUs the
                                 faster of bf16 and fp32 for this model on this machine, measured once
                                 and cached (dtype_probe.py)
    training_dtype(...)          the weights dtype for training (fp32 master weights where nothing else
                                 keeps them)
    placement(device)            the from_pretrained keyword arguments that put the weights where they go

Placement: weights go straight to their device with `device_map={"": device}` (no load on the CPU and
copy), and each process of a multi-GPU run takes its own GPU (`cuda:$LOCAL_RANK`): with 4-bit weights
this is the only way, bitsandbytes quantizes where the weights land. Under DeepSpeed ZeRO-3 and FSDP no
device_map is given: ZeRO-3's `zero.Init` partitions the weights as they load (only when the training
arguments, which register the DeepSpeed config, exist before the load: aft.train builds them first),
and FSDP places the shards itself.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .errors import AftError

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def default_device(device: str = "auto") -> str:
    """"auto" -> this process's GPU (cuda:$LOCAL_RANK) where there is one, else "cpu". A CUDA device asked
    for where torch sees none is an AftError."""
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no GPU"
            raise AftError(f"--device {device}: no CUDA device ({why}); use --device cpu or auto")
        return device

    return f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"


def local_rank() -> int:
    """This process's index on its machine (set by torchrun / accelerate launch / deepspeed), 0 alone."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 of all machines (RANK, set by torchrun / accelerate launch / deepspeed), or a process alone."""
    return int(os.environ.get("RANK", "0")) == 0


def pick_dtype(dtype: str, device: str, config=None):
    """A torch dtype from its name. "auto": bf16 on GPUs (fp16 where bf16 is missing); on CPU the faster of
    bf16 and fp32 for the model of `config` (a transformers config), probed once per machine and model shape
    (dtype_probe.py); fp32 on CPU when no config is given."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if config is None:
            return torch.float32
        from .dtype_probe import cpu_dtype

        return cpu_dtype(config)
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise AftError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16") from None


def sharding() -> str | None:
    """The sharded training set up by `accelerate launch` for this process: "zero3", "zero2", "fsdp" or None."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return None


def training_dtype(dtype: str, device: str, use_peft: bool, shard: str | None = None):
    """Weights dtype for training.

    "auto": fp32 on CPU. On GPUs: LoRA keeps a bf16 base (frozen; the adapter's own weights are fp32);
    full fine-tuning loads fp32 so the optimizer updates fp32 master weights, with bf16 autocast for the
    compute (AdamW updates of a pure-bf16 weight vanish below its rounding step: at lr 5e-6 most do).
    Under DeepSpeed the weights load in bf16: DeepSpeed keeps the fp32 master copy in its optimizer.
    """
    import torch

    if dtype != "auto":
        return pick_dtype(dtype, device)
    if not device.startswith("cuda"):
        return torch.float32
    if use_peft or (shard or "").startswith("zero"):
        return pick_dtype("auto", device)
    return torch.float32


def placement(device: str, shard: str | None = None) -> dict:
    """from_pretrained keyword arguments that put the weights on `device` (see the module docstring)."""
    if shard in ("zero3", "fsdp") or device == "cpu":
        return {}
    return {"device_map": {"": device}}


def quantization_config(compute_dtype):
    """QLoRA: 4-bit NF4 weights, double quantization, stored in `compute_dtype` (the storage dtype FSDP and
    ZeRO-3 need to shard the quantized weights like the rest)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=compute_dtype)


def load_pretrained(path: str, *, adapter: str | None = None, dtype=None, device: str = "auto",
                    task: str = "causal-lm", load_in_4bit: bool = False, shard: str | None = None,
                    what: str = "model"):
    """(model, tokenizer) from a transformers folder or hub id (+ a PEFT adapter folder, merged in).

    dtype: a torch dtype, or a name for pick_dtype (default "auto"). task: "causal-lm" or
    "sequence-classification" (reward models). shard: see `sharding()`; None = no sharded training.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    device = default_device(device)
    t = time.time()
    try:
        if dtype is None or isinstance(dtype, str):
            # CPU "auto" probes matmuls of the model's shapes, read from its config
            cpu_auto = (dtype or "auto") == "auto" and not device.startswith("cuda")
            dtype = pick_dtype(dtype or "auto", device, AutoConfig.from_pretrained(path) if cpu_auto else None)
        kw = {"dtype": dtype, **placement(device, shard)}
        if load_in_4bit:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise AftError("load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes") from None
            if not device.startswith("cuda"):
                raise AftError("load_in_4bit (QLoRA) needs a GPU")
            kw["quantization_config"] = quantization_config(torch.bfloat16 if dtype == torch.float32 else dtype)
        auto = {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification}[task]
        # An adapter folder written by aft train holds the tokenizer it was trained with (its chat template).
        with_tokenizer = adapter and (Path(adapter) / "tokenizer_config.json").exists()
        tok = AutoTokenizer.from_pretrained(adapter if with_tokenizer else path)
        model = auto.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise AftError(f"{what} {path!r}: cannot load as a {task} model: {first}") from None
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    log.info("loaded %s (%s, %s%s) in %.1fs", adapter or path, str(dtype).removeprefix("torch."),
             device if "device_map" in kw or device == "cpu" else shard, ", 4-bit" if load_in_4bit else "",
             time.time() - t)
    return model, tok
