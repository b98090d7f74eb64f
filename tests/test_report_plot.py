"""The accuracy-versus-compute plot: labels of nearby points do not print over each other."""

from __future__ import annotations

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from aft.evaluate.report import _place_labels  # noqa: E402


def test_labels_of_close_points_are_placed_apart():
    fig, ax = plt.subplots(figsize=(7.5, 5))
    pts = [(100, 0.50), (104, 0.505), (108, 0.51), (100, 0.495), (1000, 0.2)]  # four nearly on one spot
    notes = []
    for i, (x, y) in enumerate(pts):
        ax.plot([x], [y], "o")
        notes.append(ax.annotate(f"strategy-{i} (oracle)", (x, y), fontsize=7, xytext=(4, 3),
                                 textcoords="offset points"))
    ax.set_xscale("log")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    before = [n.get_window_extent(r) for n in notes]
    assert any(a.overlaps(b) for i, a in enumerate(before) for b in before[i + 1:])  # the problem is real
    _place_labels(fig, ax, notes)
    after = [n.get_window_extent(r) for n in notes if n.get_visible()]
    assert len(after) >= 4  # room was found for most, by stacking
    assert not any(a.overlaps(b) for i, a in enumerate(after) for b in after[i + 1:])
    plt.close(fig)
