"""Collect a training run's measured figures into bench/results/ and render the README's results table.

    python bench/render_results.py collect runs/dagm_small --name dagm_class1_small
    python bench/render_results.py table          # rewrites the tables in README.md

`diffad bench quality DATASET... --seeds 0,1,2` trains, evaluates and writes these files itself, one per
category and seed (<dataset>_<variant>_seed<S>.json, with "seed" and "group"); `collect` records a run
trained by hand. Both write the same format (diffad.benchmarks.quality.quality_record). The table has one
row per group, the metrics as mean ± sample std over its seeds; a file without "group" (one `collect`
writes, or one from before seeds) is a row of its own. Only bench/results/*.json is read, not tuning/.

The quality table sits between the markers <!-- results:start --> and <!-- results:end --> in README.md;
the speed tables (from a `diffad bench speed` and a `diffad bench load` record, with the issue's targets)
between <!-- speed:start --> and <!-- speed:end -->.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from diffad.benchmarks.quality import defect_type_table, markdown_table, quality_record
from diffad.benchmarks.speed import markdown_tables as speed_tables

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
SPEED_START, SPEED_END = "<!-- speed:start -->", "<!-- speed:end -->"
SPEED_RECORD, LOAD_RECORD = RESULTS / "cpu_small_speed.json", RESULTS / "cpu_small_load.json"


def collect(run_dir: Path, name: str, note: str | None = None) -> Path:
    """Merge train_summary.json and eval.json of a run into bench/results/<name>.json."""
    summary = json.loads((run_dir / "train_summary.json").read_text())
    evaluation = json.loads((run_dir / "eval.json").read_text())
    result = quality_record(name, summary, evaluation, note)  # the format `diffad bench quality` writes
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def table(results: Path = RESULTS, validation: bool = False) -> str:
    """The README's quality table from every results file with "metrics" (speed results have none), the
    seeds of one group aggregated into one row (diffad.benchmarks.quality.markdown_table); `validation` adds
    the kept checkpoint's validation score."""
    records = [json.loads(p.read_text()) for p in sorted(Path(results).glob("*.json"))]
    # quality records are named; a precision record (bench/precision.py) has "metrics" too, but no name
    records = [r for r in records if "name" in r and "metrics" in r]
    defects = defect_type_table(records)
    by_type = f"\n\nBy defect type (each against the good test images):\n\n{defects}" if defects else ""
    return markdown_table(records, validation) + by_type


def speed(speed_record: Path = SPEED_RECORD, load_record: Path | None = LOAD_RECORD) -> str | None:
    """The README's speed tables, or None when there is no speed record."""
    if not Path(speed_record).is_file():
        return None
    load = json.loads(Path(load_record).read_text()) if load_record and Path(load_record).is_file() else None
    return speed_tables(json.loads(Path(speed_record).read_text()), load)


def replace_between(text: str, start: str, end: str, rendered: str) -> str:
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    return pattern.sub(lambda _: f"{start}\n{rendered}\n{end}", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("collect")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--note", help="conditions worth knowing, kept with the figures")
    p = verbs.add_parser("table")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="default bench/results")
    p.add_argument("--print-only", action="store_true", help="print the tables, leave README.md alone")
    p.add_argument("--validation", action="store_true",
                   help="add the kept checkpoint's validation score (what settings are chosen by) as a column")
    p.add_argument("--speed", type=Path, default=SPEED_RECORD, help=f"bench speed record (default {SPEED_RECORD.name})")
    p.add_argument("--load", type=Path, default=LOAD_RECORD, help=f"bench load record (default {LOAD_RECORD.name})")
    args = parser.parse_args()
    if args.verb == "collect":
        print(collect(args.run_dir, args.name, args.note))
        return
    quality, speed_text = table(args.results_dir, args.validation), speed(args.speed, args.load)
    if not args.print_only:
        readme = ROOT / "README.md"
        text = replace_between(readme.read_text(), START, END, quality)
        if speed_text is not None:
            text = replace_between(text, SPEED_START, SPEED_END, speed_text)
        readme.write_text(text)
    print(quality + ("\n\n" + speed_text if speed_text else ""))


if __name__ == "__main__":
    main()
