"""One run manifest for resume: what produced an output, checked before anything is added to it.

Every resumable command (infer, data build, eval run) writes a manifest (a
config.json) beside its output before the first record, and checks it before
appending: a rerun resumes only a run whose settings are the same. Which
settings count is declared with the config fields (config.opt: everything but
`run=True` fields such as batch_size, device or API keys). Refused, with one
line that says why:

    - an output that is one of the run's inputs (`-o` equal to `-i`);
    - an output that holds records but has no manifest beside it (written by
      something else, or by hand): mixing it would hide which settings wrote what;
    - a manifest whose settings differ (the keys are named).

Failed queries are not done: a rerun retries them (`--retry_failed`, the
default) or keeps and reports them (`--no-retry_failed`); either way a command
whose output holds a failed query exits non-zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import opt
from .errors import AftError
from .io import write_json


@dataclass
class ResumeArgs:
    retry_failed: bool = opt(True, "on a rerun, retry the queries that failed before (--no-retry_failed: keep "
                             "them, report them and exit non-zero)", run=True)


@dataclass
class Manifest:
    path: Path  # the manifest file
    output: Path  # the output it describes: a file, or a folder of files
    settings: dict  # what changes the output: a resumed run must agree on every key
    info: dict = field(default_factory=dict)  # recorded, not compared (the whole config, the engine, ...)

    def check(self, inputs=(), records: list[Path] | None = None) -> None:
        """Refuse to resume into this output (AftError) unless it is new or was written with these settings.
        `records`: the files whose content makes the output "started" (default: the output itself)."""
        records = list(records) if records is not None else [self.output]
        outputs = {Path(p).resolve() for p in [self.output, *records]}
        for i in inputs:
            if i and Path(i).exists() and Path(i).resolve() in outputs:
                raise AftError(f"{i}: is both the input and the output; choose another output")
        started = [p for p in records if _has_data(p)]
        if not started:
            return
        if not self.path.exists():
            raise AftError(f"{started[0]}: holds records but no {self.path.name} beside it, so the settings that "
                           f"wrote it are unknown; choose another output or delete it to start over")
        try:
            previous = json.loads(self.path.read_text(encoding="utf-8"))
            old = previous["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise AftError(f"{self.path}: not a manifest of this aft version (no 'settings'); choose another "
                           f"output or delete it to start over") from None
        changed = [k for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]
        if changed:
            shown = ", ".join(f"{k} ({old.get(k)!r} -> {self.settings.get(k)!r})" for k in changed[:4])
            raise AftError(f"{self.output}: was written with a different {shown}"
                           f"{' and more' if len(changed) > 4 else ''}; choose another output or delete it "
                           f"to start over")

    def write(self, **more) -> None:
        write_json(self.path, {**self.info, **more, "settings": self.settings})


def _has_data(p: Path) -> bool:
    p = Path(p)
    return p.is_file() and p.stat().st_size > 0
