"""`aft view` in a real browser: headless Chromium opens the page, draws it with no script or console
error, within the time limit, and takes a screenshot.

    python benchmarks/view_browser.py RUN.jsonl [more] [--queries 1000] [--limit-ms 2000] [--stretch 8]
                                      [--screenshot docs/view.png] [--keep report.html] [--show FILTERS]

The records of the given files (`aft infer` outputs or `aft eval run` records) are repeated
until there are --queries of them (0 = as they are), every generated text repeated
--stretch times (a stress test: long, looping outputs), written next to copies of their
.meta.json / .config.json files, and turned into a page by `aft view` (timed: reading,
copied spans, correctness, HTML). Chromium (Debian's package: `apt-get install chromium`)
then loads the page from disk, once with --dump-dom and once with --screenshot, each time
in a fresh profile with networking and background services off. The page writes into its
own DOM how many milliseconds after navigation started its first page of queries was
drawn (performance.now(), so HTML and JSON parsing are included) and whether any script
error happened; Chromium's console log (stderr) must hold no error either. Exit code 1 if
any check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from aft.view import write_view

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("no chromium found: apt-get install -y chromium")


def browse(page: Path, extra: list[str], tmp: Path, fragment: str = "") -> tuple[subprocess.CompletedProcess, float]:
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=tmp))
    url = page.resolve().as_uri() + (f"#{quote(fragment, safe='=&')}" if fragment else "")
    t0 = time.perf_counter()
    r = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *extra, url],
                       check=False, capture_output=True, text=True, timeout=180)
    return r, time.perf_counter() - t0


def stretched(line: str, times: int) -> str:
    """A record whose every generated text is repeated `times` times: the long, looping outputs of a
    degenerate model."""
    rec = json.loads(line)
    for o in [o for layer in rec.get("trace") or [] for o in layer["outputs"]] + (rec.get("candidates") or []):
        o["text"] = " ".join([o["text"]] * times)
    return json.dumps(rec, ensure_ascii=False)


def repeat(files: list[Path], n: int, tmp: Path, stretch: int = 1) -> list[Path]:
    """Copies of `files` (with their side files) whose records are repeated to `n` in all."""
    lines = [[ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()] for f in files]
    if stretch > 1:
        lines = [[stretched(ln, stretch) for ln in ls] for ls in lines]
    total = sum(map(len, lines))
    if (not n and stretch <= 1) or not total:
        return files
    n = n or total
    out = []
    for i, (f, ls) in enumerate(zip(files, lines)):
        want = round(n * len(ls) / total) if i < len(files) - 1 else n - sum(round(n * len(x) / total)
                                                                          for x in lines[:-1])
        d = tmp / f"f{i}"
        d.mkdir()
        copy = d / f.name
        copy.write_text("\n".join(ls[k % len(ls)] for k in range(want)) + "\n", encoding="utf-8")
        for side in (f.with_name(f.name.replace(".jsonl", ".meta.json")), f.with_name(f.name + ".config.json")):
            if side.exists():
                shutil.copy(side, d / side.name)
        out.append(copy)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--queries", type=int, default=1000, help="repeat the records to this many (0 = as they are)")
    ap.add_argument("--limit-ms", type=float, default=2000.0, help="the page must be drawn within this")
    ap.add_argument("--screenshot", type=Path, default=Path("runs/view/view.png"))
    ap.add_argument("--size", default="1400,1100", help="window size for the screenshot")
    ap.add_argument("--keep", type=Path, help="also keep the page here")
    ap.add_argument("--stretch", type=int, default=1, help="repeat every generated text this many times")
    ap.add_argument("--show", default="", help="filters for the screenshot, as in the page's address: "
                    "'group=<label> / <task> / <strategy>&filter=<flag>&search=<text>'")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        files = repeat(args.files, args.queries, tmp, args.stretch)
        page = tmp / "report.html"
        t0 = time.perf_counter()
        _, n = write_view(files, page)
        build_s = time.perf_counter() - t0
        if args.keep:
            shutil.copy(page, args.keep)

        dom, dom_s = browse(page, ["--dump-dom"], tmp)
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        shot, shot_s = browse(page, [f"--screenshot={args.screenshot.resolve()}", f"--window-size={args.size}",
                                     "--hide-scrollbars"], tmp, args.show)
        ms = re.search(r'data-render-ms="([\d.]+)"', dom.stdout)
        script_error = 'data-error="1"' in dom.stdout
        console = [ln for ln in (dom.stderr + shot.stderr).splitlines()
                   if "CONSOLE" in ln or "Uncaught" in ln or "Content Security Policy" in ln]
        cards = dom.stdout.count('class="card"')
        result = {
            "queries": n, "html_bytes": page.stat().st_size, "build_seconds": round(build_s, 2),
            "drawn_ms": float(ms.group(1)) if ms else None, "cards_on_first_page": cards,
            "chromium_dump_dom_seconds": round(dom_s, 2), "chromium_screenshot_seconds": round(shot_s, 2),
            "script_error": script_error, "console_messages": console[:5],
            "screenshot": str(args.screenshot) if args.screenshot.exists() else None,
        }
    print(json.dumps(result, indent=2))
    problems = []
    if dom.returncode or shot.returncode:
        problems.append(f"chromium exited {dom.returncode}/{shot.returncode}: {(dom.stderr + shot.stderr)[-300:]}")
    if result["drawn_ms"] is None:
        problems.append("the page did not report being drawn (script did not finish)")
    elif result["drawn_ms"] > args.limit_ms:
        problems.append(f"drawn in {result['drawn_ms']:.0f} ms > {args.limit_ms:.0f} ms")
    if script_error or console:
        problems.append(f"script or console errors: {console[:3]}")
    if not cards:
        problems.append("no query drawn")
    if not result["screenshot"]:
        problems.append("no screenshot written")
    for p in problems:
        print("FAIL:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
