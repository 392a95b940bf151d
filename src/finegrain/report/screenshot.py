"""Screenshots of a report in headless Chromium, to look at it the way a reader's browser shows it."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")
_MAX_HEIGHT = 16000  # taller captures hit Chromium's texture limits


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def screenshot(html_path: str | Path, png_path: str | Path, *, width: int = 1280, height: int | None = None,
               chromium: str | None = None, timeout: float = 120.0) -> Path:
    """Render ``html_path`` in headless Chromium and save a PNG of the whole page.

    Args:
        html_path: the page (a local file; the report needs no network).
        png_path: where to write the screenshot.
        width: window width in CSS pixels.
        height: window height; default: the page's own height (read from a first DOM dump of the
            page, which the report records after loading), capped at 16000 px.
        chromium: the browser executable; default: ``chromium`` (or Chrome) on PATH.
        timeout: seconds to wait for each browser run.

    Returns:
        The PNG path.

    Raises:
        FileNotFoundError: no browser or no HTML file.
        RuntimeError: the browser ran but wrote no screenshot.
    """
    html_path, png_path = Path(html_path).resolve(), Path(png_path)
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path} does not exist")
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found on PATH: install it (apt-get install chromium) or pass its path")
    url = html_path.as_uri()
    if height is None:
        dom = _run(exe, ["--dump-dom", "--virtual-time-budget=3000", f"--window-size={width},1000", url], timeout).stdout
        m = re.search(r'data-page-height="(\d+)"', dom)
        height = int(m.group(1)) if m else 4000
    height = max(200, min(int(height), _MAX_HEIGHT))
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    done = _run(exe, [f"--screenshot={png_path.resolve()}", f"--window-size={width},{height}", url], timeout)
    if not png_path.is_file():
        raise RuntimeError(f"{exe} wrote no screenshot (exit {done.returncode}): {done.stderr[-500:]}")
    return png_path


def _run(exe: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="finegrain-chromium-") as profile:
        return subprocess.run([exe, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=timeout, check=False)
