"""Sampling settings: one type for every command that samples, its defaults stated once.

`Sampling` holds what decides how proposals and aggregations are sampled; its
defaults are the released AFT inference config's (reference/aft_prompts.json:
temperature 0.7, top-p 0.95, no top-k, 4096 new tokens, final layer 0.7 / 1.0),
so the released checkpoints run as they were evaluated. Each command starts
from a named preset and lets any key override it:

    aft         the official defaults              aft infer
    eval        top-k 50, 256 tokens, greedy final  aft eval run (short verifiable answers)
    open        eval with 1024 tokens               aft eval export (open-ended answers)
    on_policy   T 1.0, top-k 50, top-p 0.95, 512    aft data build (the paper's on-policy recipe)

`sampling:` (a YAML key and a flag) names the preset, or a YAML file of these
keys (which may itself name its base preset with `sampling:`). Two commands
that read the same file sample the same way: e.g. `aft data build --sampling
eval` draws on-policy proposals exactly as `aft eval run`'s P&A does.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from .config import load_yaml, opt
from .engines.base import SamplingParams
from .errors import AftError

GROUP = "sampling (see docs/inference.md; --sampling picks the preset the others override)"


@dataclass(frozen=True)
class Sampling:
    temperature: float = opt(0.7, "temperature of the sampled generations: proposals and intermediate "
                             "aggregations (0 = greedy)", ge=0, group=GROUP)
    top_p: float = opt(0.95, "top-p of the sampled generations", gt=0, le=1, group=GROUP)
    top_k: int = opt(0, "top-k of the sampled generations (0 = off)", ge=0, group=GROUP)
    max_tokens: int = opt(4096, "max new tokens per generation (every layer)", ge=1, group=GROUP)
    final_layer_temperature: float = opt(0.7, "P&A: temperature of the final aggregation (0 = greedy)", ge=0,
                                         group=GROUP)
    final_layer_top_p: float = opt(1.0, "P&A: top-p of the final aggregation", gt=0, le=1, group=GROUP)
    stop: tuple[str, ...] = opt((), "stop strings", group=GROUP)

    def params(self, n: int = 1) -> SamplingParams:
        """A sampled generation (proposals, intermediate aggregations, samples), n per request."""
        return SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_tokens, stop=tuple(self.stop))

    def final_params(self) -> SamplingParams:
        """P&A's final aggregation: one answer."""
        return SamplingParams(n=1, temperature=self.final_layer_temperature, top_p=self.final_layer_top_p,
                              top_k=self.top_k, max_tokens=self.max_tokens, stop=tuple(self.stop))

    def greedy_params(self) -> SamplingParams:
        return SamplingParams(n=1, temperature=0.0, top_p=1.0, top_k=0, max_tokens=self.max_tokens,
                              stop=tuple(self.stop))

    def replace(self, **changes) -> "Sampling":
        return dataclasses.replace(self, **changes)


_EVAL = Sampling(top_k=50, max_tokens=256, final_layer_temperature=0.0)
PRESETS = {
    "aft": Sampling(),
    "eval": _EVAL,
    "open": _EVAL.replace(max_tokens=1024),
    "on_policy": Sampling(temperature=1.0, top_k=50, max_tokens=512),
}
KEYS = tuple(f.name for f in dataclasses.fields(Sampling))


def preset(name: str, source: str = "config") -> tuple[Sampling, dict]:
    """The preset `name`, or the settings of a YAML file of sampling keys: (base settings, the keys the file
    gives, each with its file as source)."""
    if name in PRESETS:
        return PRESETS[name], {}
    if not (name.endswith((".yaml", ".yml")) or Path(name).is_file()):
        raise AftError(f"{source}: key 'sampling' must be a preset ({', '.join(PRESETS)}) or a YAML file, "
                       f"got {name!r}")
    raw = load_yaml(name)
    base = raw.pop("sampling", "aft")
    if base not in PRESETS:
        raise AftError(f"{name}: key 'sampling' must be one of {', '.join(PRESETS)}, got {base!r}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise AftError(f"{name}: unknown key {unknown[0]!r} (a sampling file holds {', '.join(KEYS)})")
    return PRESETS[base], {k: (v, name) for k, v in raw.items()}


def sampling_args(default: str, keys: tuple[str, ...] = KEYS):
    """The sampling settings as config fields (YAML keys and flags), with preset `default`'s values as
    their defaults, and the `sampling` key that names another preset or file. Inherit from it."""
    hints = typing.get_type_hints(Sampling)
    base = PRESETS[default]
    specs = {f.name: f for f in dataclasses.fields(Sampling)}
    fields = [("sampling", str, opt(default, "sampling preset (" + ", ".join(PRESETS) + ") or a YAML file of the "
                                    "sampling keys; the keys given override it", group=GROUP))]
    fields += [(k, hints[k], dataclasses.field(default=getattr(base, k), metadata=specs[k].metadata)) for k in keys]
    return dataclasses.make_dataclass(f"SamplingArgs_{default}", fields, namespace={
        "sampling_settings": _settings, "expand_values": classmethod(_expand), "__module__": __name__})


def _settings(self) -> Sampling:
    """The resolved settings of this config."""
    return Sampling(**{k: getattr(self, k) for k in KEYS if hasattr(self, k)})


def _expand(cls, values: dict) -> dict:
    """Fill the sampling keys not given from the preset (or file) named by a given `sampling` key."""
    if "sampling" not in values:
        return values
    name, source = values["sampling"]
    base, from_file = preset(str(name), source)
    names = {f.name for f in dataclasses.fields(cls)}
    out = dict(values)
    for key in KEYS:
        if key in names and key not in values:
            out[key] = from_file.get(key, (getattr(base, key), source))
    return out
