"""Plots and the HTML report: the files exist, show the curves, and the report stands alone."""

from __future__ import annotations

import base64
import re

import matplotlib.image as mpimg
import numpy as np
import torch

from subtomo.report import (
    plot_central_slices,
    plot_fsc,
    plot_guinier,
    plot_histogram,
    write_html_report,
)


def _coloured_pixels(path, rgb) -> int:
    img = mpimg.imread(path)[..., :3]
    return int((np.abs(img - np.array(rgb)).sum(-1) < 0.15).sum())


def test_fsc_and_guinier_plots_draw_the_curves(tmp_path):
    """The first curve is drawn in matplotlib's first colour (C0 blue) over many pixels; an
    empty axis (curves not plotted) would have none."""
    f = np.linspace(0, 0.25, 33)
    p = plot_fsc(tmp_path / "fsc.png", f, {"corrected": 1 / (1 + np.exp((f - 0.12) * 60))},
                 resolution=8.3)  # fmt: skip
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _coloured_pixels(p, (0.12, 0.47, 0.71)) > 200
    x = f**2
    g = plot_guinier(tmp_path / "g.png", x, {"Original": -5 - 30 * x}, fit=(-30.0, -5.0))
    assert _coloured_pixels(g, (0.12, 0.47, 0.71)) > 100


def test_histogram_and_slices(tmp_path):
    """Histogram bars and the three central sections are drawn."""
    h = plot_histogram(tmp_path / "h.png", np.random.default_rng(0).normal(5, 1, 1000),
                       xlabel="Å")  # fmt: skip
    assert _coloured_pixels(h, (0.27, 0.51, 0.71)) > 500  # steelblue bars
    v = torch.zeros(16, 16, 16)
    v[4:12, 4:12, 4:12] = 1
    s = plot_central_slices(tmp_path / "s.png", v)
    img = mpimg.imread(s)[..., :3]
    assert (img.sum(-1) > 2.9).sum() > 100 and (img.sum(-1) < 0.1).sum() > 100


def test_html_report_embeds_images(tmp_path):
    """The report holds the summary (escaped) and the PNG bytes themselves, base64."""
    png = plot_histogram(tmp_path / "h.png", np.arange(10.0), xlabel="x")
    out = write_html_report(tmp_path / "r.html", "Test <report>", {"resolution": "3.5 Å"},
                            [png], warnings=["mask too sharp"])  # fmt: skip
    text = out.read_text()
    assert "Test &lt;report&gt;" in text and "3.5 Å" in text and "mask too sharp" in text
    data = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text).group(1)
    assert base64.b64decode(data) == png.read_bytes()
