"""Collect a training run's measured figures into bench/results/ and render the README's results table.

    python bench/render_results.py collect runs/dagm_small --name dagm_class1_small
    python bench/render_results.py table          # rewrites the table in README.md

`diffad bench quality DATASET...` trains, evaluates and writes these files itself; `collect` records a run
trained by hand. Both write the same format (diffad.benchmarks.quality.quality_record).

The table sits between the markers <!-- results:start --> and <!-- results:end --> in README.md.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from diffad.benchmarks.quality import markdown_table, quality_record

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def collect(run_dir: Path, name: str, note: str | None = None) -> Path:
    """Merge train_summary.json and eval.json of a run into bench/results/<name>.json."""
    summary = json.loads((run_dir / "train_summary.json").read_text())
    evaluation = json.loads((run_dir / "eval.json").read_text())
    result = quality_record(name, summary, evaluation, note)  # the format `diffad bench quality` writes
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def table(results: Path = RESULTS) -> str:
    """The README's quality table from every results file with "metrics" (speed results have none)."""
    return markdown_table([json.loads(p.read_text()) for p in sorted(Path(results).glob("*.json"))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("collect")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--note", help="conditions worth knowing, kept with the figures")
    p = verbs.add_parser("table")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="default bench/results")
    p.add_argument("--print-only", action="store_true", help="print the table, leave README.md alone")
    args = parser.parse_args()
    if args.verb == "collect":
        print(collect(args.run_dir, args.name, args.note))
    elif args.print_only:
        print(table(args.results_dir))
    else:
        readme = ROOT / "README.md"
        text = readme.read_text()
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no {START} ... {END} markers")
        rendered = table(args.results_dir)
        readme.write_text(pattern.sub(lambda _: f"{START}\n{rendered}\n{END}", text))
        print(rendered)


if __name__ == "__main__":
    main()
