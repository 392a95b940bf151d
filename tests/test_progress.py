"""The progress bar names what it counts."""

from finegrain import utils


def test_the_bar_shows_the_rate_in_its_unit(monkeypatch):
    from rich.console import Console

    console = Console(record=True, force_terminal=True, width=120)
    monkeypatch.setattr(utils, "console", console)
    with utils.progress_bar("5-way 1-shot", total=3, enabled=True, unit="episode") as bar:
        for _ in range(3):
            bar.advance(1, acc=50.0)
    text = console.export_text()
    assert "episode/s" in text and "img/s" not in text and "acc 50.0" in text and "3/3" in text


def test_a_silent_bar_still_counts():
    with utils.progress_bar("x", total=2, enabled=False) as bar:
        bar.advance(2)
    assert bar.done == 2 and bar.progress is None
