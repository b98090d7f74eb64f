"""IFEval through lm-evaluation-harness's own instruction checkers.

Prompts come from a local JSONL in IFEval's format (offline: no hub)

    {"key": 1000, "prompt": "...", "instruction_id_list": ["punctuation:no_comma", ...],
     "kwargs": [{}, ...]}

and a response is checked by lm-eval's `test_instruction_following_strict`
(prompt-level strict accuracy: every instruction followed). Installing
`lm-eval` with its full dependencies is not needed: `pip install --no-deps
lm-eval nltk langdetect immutabledict` is enough, because the three checker
modules are loaded on their own when the package's task registry cannot be
imported. Instructions that count sentences need NLTK's `punkt_tab` data
(lm-eval tries to download it; offline, install it into NLTK's data path).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import lru_cache
from pathlib import Path

from ..data.sources import Item
from ..errors import AftError, where
from ..io import read_jsonl


@lru_cache(maxsize=1)
def checkers():
    """lm-eval's ifeval `utils` module (test_instruction_following_strict / _loose, InputExample)."""
    try:
        return importlib.import_module("lm_eval.tasks.ifeval.utils")
    except ImportError as first:
        spec = importlib.util.find_spec("lm_eval")
        if spec is None or not spec.submodule_search_locations:
            raise AftError("IFEval needs lm-evaluation-harness's checkers: pip install lm-eval "
                           "(or pip install --no-deps lm-eval nltk langdetect immutabledict)") from None
        # The task registry (lm_eval/tasks/__init__.py) pulls every task's dependencies; the ifeval
        # checkers need only nltk, langdetect and immutabledict. Load the ifeval folder on its own.
        root = Path(list(spec.submodule_search_locations)[0]) / "tasks"
        for name, path in (("lm_eval.tasks", root), ("lm_eval.tasks.ifeval", root / "ifeval")):
            if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
                mod = types.ModuleType(name)
                mod.__path__ = [str(path)]
                sys.modules[name] = mod
        try:
            return importlib.import_module("lm_eval.tasks.ifeval.utils")
        except ImportError as e:
            raise AftError(f"IFEval checkers cannot be imported ({e}; first: {first}): "
                           f"pip install nltk langdetect immutabledict") from None


def load_ifeval(path: str | Path) -> list[Item]:
    items, seen = [], set()
    for line, rec in read_jsonl(path):
        loc = where(path, line)
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise AftError(f'{loc}field "prompt": missing or empty')
        ids = rec.get("instruction_id_list")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise AftError(f'{loc}field "instruction_id_list": expected a non-empty list of instruction ids')
        kwargs = rec.get("kwargs", [{}] * len(ids))
        if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
            raise AftError(f'{loc}field "kwargs": expected one mapping per instruction ({len(ids)})')
        registry = checkers().instructions_registry.INSTRUCTION_DICT
        unknown = [i for i in ids if i not in registry]
        if unknown:
            raise AftError(f'{loc}field "instruction_id_list": unknown instruction(s) {unknown}')
        key = str(rec.get("key", rec.get("id", line)))
        if key in seen:
            raise AftError(f'{loc}field "key": duplicate key {key!r}')
        seen.add(key)
        items.append(Item(id=key, query=[{"role": "user", "content": prompt}],
                          meta={"source": f"{path}:{line}", "ifeval": {"key": key, "prompt": prompt,
                                                                     "instruction_id_list": ids, "kwargs": kwargs}}))
    if not items:
        raise AftError(f"{path}: no records")
    return items


def follow_list(doc: dict, response: str, loose: bool = False) -> list[bool]:
    """Per instruction: followed or not, by lm-eval's own checker (strict unless `loose`)."""
    u = checkers()
    inp = u.InputExample(key=doc["key"], instruction_id_list=doc["instruction_id_list"], prompt=doc["prompt"],
                         kwargs=doc["kwargs"])
    test = u.test_instruction_following_loose if loose else u.test_instruction_following_strict
    try:
        return list(test(inp, response or "").follow_instruction_list)
    except LookupError as e:  # NLTK data missing offline
        raise AftError(f"IFEval instruction check needs NLTK data that is not installed: {str(e).strip()[:200]}") \
            from None


def follows_all(doc: dict, response: str) -> bool:
    return all(follow_list(doc, response))
