"""What the fair design can show, computed before any training: on held-out rows built like the
training rows (the base model's 4 unfiltered proposals, the program teacher's target),

  * teacher target correct: the share of targets the verifier accepts (should be 1.0)
  * target copies a proposal: the share of targets found verbatim among the proposals (0: cannot be copied)
  * oracle best-of-4: the share of questions where some proposal is right (the ceiling of an
    aggregator that can only select, as the previous design's was)
  * questions by number of correct proposals (0, 1, 2+ but not all, all)

    python examples/repro/ceiling.py runs/fair/ceiling
"""

import json
import sys
from collections import Counter
from pathlib import Path


def ceiling(folder: str) -> dict:
    rows = [json.loads(line) for line in (Path(folder) / "aft.jsonl").read_text().splitlines()]
    if not rows:
        raise SystemExit(f"{folder}/aft.jsonl: no rows")
    groups = Counter()
    oracle = correct = copied = 0
    for r in rows:
        m = r["meta"]
        scores = [s or 0.0 for s in m["proposal_scores"]]
        right = sum(s >= 1.0 for s in scores)
        groups["0" if right == 0 else "all" if right == len(scores) else "1" if right == 1 else "2+"] += 1
        oracle += right > 0
        correct += (m["target"]["score"] or 0.0) >= 1.0
        copied += r["completion"][0]["content"].strip() in r["prompt"][0]["content"]  # the proposals are there
    n = len(rows)
    return {"questions": n, "teacher_target_correct": correct / n, "target_copies_a_proposal": copied / n,
            "oracle_best_of_4": oracle / n, "by_correct_proposals": {k: groups[k] for k in ("0", "1", "2+", "all")}}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(json.dumps(ceiling(sys.argv[1]), indent=2))
