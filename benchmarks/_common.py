"""Helpers shared by the benchmark scripts: machine name, result files, tables."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SHARED = Path(os.environ.get("FINEGRAIN_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def machine_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-").lower()
    return f"cpu-{os.cpu_count()}core"


def cpu_model() -> str:
    """The CPU's model name and whether it computes bf16 natively (speed differs a lot between the two)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown")
    return f"{name}, {'with' if ' avx512_bf16' in text or ' amx_bf16' in text else 'without'} native bf16"


def machine_info() -> dict:
    info = {"machine": machine_name(), "cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{machine_name()}.json"
    tmp = path.with_suffix(".json.tmp")  # a crash mid-write leaves the previous results whole
    tmp.write_text(json.dumps({"machine": machine_info(), **payload}, indent=1))
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table()  # a pipe or log file gets the whole table, not an 80-column fold
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in columns))
    Console(width=None if sys.stdout.isatty() else 200).print(t)
