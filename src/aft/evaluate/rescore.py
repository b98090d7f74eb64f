"""`aft eval rescore <out>`: verdicts of cached records again, with the current verifier, no generation.

Every <out>/<label>/<task>/<strategy>.seed<S>.jsonl is read with its .meta.json
(which task, split and strategy wrote it); each record goes through
`strategies.finish_record` again (majority and verifier best-of-N re-pick among
the stored candidates; P&A's proposal verdicts are recomputed) and the file is
replaced atomically. What changed is returned per file, so a verifier fix shows
its effect on earlier runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import AftError
from ..io import read_jsonl
from .strategies import Strategy, finish_record
from .tasks import task_of_meta

log = logging.getLogger(__name__)


def rescore(out: str | Path) -> list[dict]:
    """Re-check every cached record under `out`; one {"file", "records", "changed", "before", "after"} per file
    (before/after: correct records)."""
    out = Path(out)
    files = sorted(p for p in out.glob("*/*/*.seed*.jsonl"))
    if not files:
        raise AftError(f"{out}: no cached evaluation records (expected <label>/<task>/<strategy>.seed<S>.jsonl)")
    tasks: dict = {}
    report = []
    for path in files:
        meta_path = path.with_name(path.name.replace(".jsonl", ".meta.json"))
        if not meta_path.exists():
            log.warning("%s: no %s, skipped", path, meta_path.name)
            continue
        meta = json.loads(meta_path.read_text())
        s = meta["strategy"]
        strategy = Strategy(s["kind"], k=s.get("k", 1), l=s.get("l", 0), n=s.get("n", 1), scorer=s.get("scorer", ""))
        task, items = task_of_meta(meta, tasks)
        recs = [r for _, r in read_jsonl(path)]
        before = sum(bool(r.get("correct")) for r in recs)
        changed = 0
        for r in recs:
            item = items.get(str(r.get("id")))
            if item is None:
                raise AftError(f"{path}: question {r.get('id')!r} is not in task {task.spec} any more")
            old = (r.get("correct"), r.get("extracted"))
            finish_record(task, item, r, strategy)
            changed += old != (r.get("correct"), r.get("extracted"))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
        tmp.replace(path)
        after = sum(bool(r.get("correct")) for r in recs)
        report.append({"file": str(path.relative_to(out)), "records": len(recs), "changed": changed,
                       "before": before, "after": after})
    return report
