"""Screenshot a finegrain HTML report (or build one for a run folder first) in headless Chromium.

    python scripts/report_screenshot.py runs/my-run/report-test.html report.png
    python scripts/report_screenshot.py runs/my-run report.png --split val --data /path/to/data

``finegrain report RUN_DIR --screenshot report.png`` does the same in one command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="a report .html file, or a run folder to build the report of")
    p.add_argument("png", help="screenshot to write")
    p.add_argument("--width", type=int, default=1280, help="window width in CSS pixels")
    p.add_argument("--height", type=int, default=None, help="window height (default: the whole page, at most 16000)")
    p.add_argument("--data", default=None, help="with a run folder: data set (default: the run's)")
    p.add_argument("--split", default="test", choices=("test", "val", "train"))
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    from finegrain.report import build_report, screenshot

    source = Path(args.source)
    html = source if source.suffix == ".html" else build_report(source, data=args.data, split=args.split, device=args.device)
    print(screenshot(html, args.png, width=args.width, height=args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
