"""How often the verifier credits a response that only restates the question.

The "model" answers each held-out question with the first line of its prompt
("Calculate 0 + 9."), as an endpoint that echoes its input would. Counted on the
held-out sets the issue names: the previous repro's arith1pos (100 questions),
basic_arithmetic 1-2 digits "+" with reasoning-gym's default negation and
parentheses (100), and the fair design's task (1-2 digits "+", no negation or
parentheses; its 200 held-out questions).

    python examples/repro/verifier_restatements.py                       # this checkout's verifier
    git show 14d43c7:src/aft/data/verify.py > /tmp/old_verify.py
    python examples/repro/verifier_restatements.py --verifier /tmp/old_verify.py   # the old one
"""

import argparse
import importlib.util

from aft.data.reasoning_gym import rg_entry
from aft.evaluate.tasks import load_task

TASKS = {
    "arith1pos": {"rg": "basic_arithmetic", "name": "arith1pos",
                  "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                             "operators": ["+", "-"], "allow_negation": False, "allow_parentheses": False}},
    "add12": {"rg": "basic_arithmetic", "name": "add12",
              "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"]}},
    "add12pos": {"rg": "basic_arithmetic", "name": "add12pos",
                 "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"],
                            "allow_negation": False, "allow_parentheses": False}},
}
EVAL_SIZE = {"add12pos": 200}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--verifier", help="a verify.py to load instead of aft.data.verify (e.g. an older version)")
    args = ap.parse_args()
    if args.verifier:
        spec = importlib.util.spec_from_file_location("old_verify", args.verifier)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        from aft.data import verify as mod
    for name, spec in TASKS.items():
        task = load_task(spec, eval_size=EVAL_SIZE.get(name, 100), pool_size=1000, split_seed=0)
        credited = 0
        for it in task.items:
            echo = it.query[-1]["content"].splitlines()[0]
            credited += bool(mod.is_correct(echo, it.answer, it.meta["task"], rg_entry(it.meta),
                                            it.meta.get("task_config")))
        print(f"{name}: {credited}/{len(task.items)} restated-question responses credited")


if __name__ == "__main__":
    main()
