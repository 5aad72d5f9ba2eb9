"""Job and project reports: their content against known inputs, and how they render in
headless Chromium (as a person opens them from disk)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.fourier import irfft_centered, rfft_centered, shell_index
from subtomo.io import write_mrc, write_star
from subtomo.project import REPORT, run_job, write_job_report, write_project_report
from subtomo.report.plots import view_histogram

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# Run in the page once it has loaded: count the images the browser failed to decode.
_PROBE = (
    "<script>window.addEventListener('load',()=>{const im=[...document.images];"
    "document.title='LOADED '+im.length+' BROKEN '+"
    "im.filter(i=>!(i.complete&&i.naturalWidth>0)).length;});</script>"
)


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def embedded_pngs(text: str) -> list[str]:
    """The ``src`` of every ``<img>`` of a page, each asserted to be an embedded PNG that
    decodes (a report must stand alone when opened from disk)."""
    sources = re.findall(r"<img[^>]*\ssrc='([^']*)'", text)
    assert len(sources) == text.count("<img"), "an <img> without a quoted src"
    for src in sources:
        assert src.startswith("data:image/png;base64,"), f"not an embedded PNG: {src[:60]}"
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert mpimg.imread(io.BytesIO(png), format="png").size > 0
    return sources


def check_in_browser(page: Path, screenshot: Path | None = None) -> int:
    """Render ``page`` in headless Chromium as a person would open it; assert that every
    ``<img>`` is an embedded PNG, that the browser decoded all of them, and (if a
    ``screenshot`` path is given) that a screenshot is not blank. Returns the number of
    images."""
    text = page.read_text(encoding="utf-8")
    sources = embedded_pngs(text)
    probe = page.with_name(page.stem + "_probe.html")
    probe.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    try:
        dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    assert dom.returncode == 0, dom.stderr[-2000:]
    title = re.search(r"<title>LOADED (\d+) BROKEN (\d+)</title>", dom.stdout)
    assert title, "the page's load event never fired"
    assert int(title.group(1)) == len(sources) and int(title.group(2)) == 0
    if screenshot is None:
        return len(sources)
    shot = _chromium("--window-size=1100,1800", f"--screenshot={screenshot}", page.as_uri())
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    pixels = mpimg.imread(screenshot)[..., :3]
    assert (pixels.sum(-1) < 1.5).sum() > 2000, "blank page (no dark text or plot pixels)"
    return len(sources)


def _halves_with_known_resolution(n: int, shell: int, seed: int = 0) -> tuple:
    """Two half maps equal below Fourier shell ``shell`` and independent noise from it on."""
    g = torch.Generator().manual_seed(seed)
    common = rfft_centered(torch.randn(n, n, n, generator=g), 3)
    other = rfft_centered(torch.randn(n, n, n, generator=g), 3)
    low = shell_index((n, n, n)) < shell
    return irfft_centered(common, (n,) * 3), irfft_centered(
        torch.where(low, common, other), (n,) * 3
    )


def _synthetic_job(project: Path) -> tuple[Path, dict[str, str]]:
    """A Refine3D-like job: half maps whose FSC drops at shell 8 of 32 (px 5 Å -> 20 Å), a
    map, a particles file with 7 + 3 particles in classes 1 and 2, and three iterations."""
    px = 5.0
    h1, h2 = _halves_with_known_resolution(32, 8)
    rng = np.random.default_rng(1)
    particles = pd.DataFrame(
        {
            "rlnTomoName": ["TS_01"] * 6 + ["TS_02"] * 4,
            "rlnClassNumber": [1, 2, 1, 1, 2, 1, 1, 2, 1, 1],
            "rlnAngleRot": rng.uniform(-180, 180, 10),
            "rlnAngleTilt": rng.uniform(0, 180, 10),
        }
    )
    with run_job("Refine3D", {"particle_diameter": 250}, project_dir=project) as (job, outputs):
        for k, half in ((1, h1), (2, h2)):
            write_mrc(job.path(f"run_half{k}_class001_unfil.mrc"), half, px)
            outputs[job.alias + f"run_half{k}_class001_unfil.mrc"] = "DensityMap.mrc.halfmap"
        write_mrc(job.path("run_class001.mrc"), 0.5 * (h1 + h2), px)
        outputs[job.alias + "run_class001.mrc"] = "DensityMap.mrc"
        write_star(job.path("run_data.star"), {"particles": particles})
        outputs[str(job.path("run_data.star"))] = "ParticleGroupMetadata.star.relion.tomo"
        history = ((40.0, (0.5, 0.5)), (30.0, (0.6, 0.4)), (25.0, (0.7, 0.3)))
        for it, (res, pops) in enumerate(history, 1):
            write_star(
                job.path(f"run_it{it:03d}_model.star"),
                {
                    "model_general": {"rlnCurrentResolution": 1.0 / res},
                    "model_classes": pd.DataFrame({"rlnClassDistribution": pops}),
                },
            )
        write_job_report(job, outputs)
    return job.directory, outputs


def test_job_report_shows_what_the_job_produced(tmp_path):
    """The report states the half-map resolution where the halves stop agreeing (shell 8 of
    32 at 5 Å/px: between 160/8 = 20 Å and 160/7.x), the class counts 7 and 3 as built, the
    last iteration's resolution and populations, and embeds FSC, slices, angles and the two
    per-iteration plots. A wrong resolution means a wrong FSC or crossing; missing counts or
    plots mean the report skipped an output."""
    directory, _ = _synthetic_job(tmp_path)
    text = (directory / REPORT).read_text()
    res = float(re.search(r"unmasked FSC 0.143\)</th><td>([\d.]+) Å", text).group(1))
    assert 20.0 <= res <= 160 / 7.0
    assert re.search(r"<td>1</td><td>7</td>.*<td>2</td><td>3</td>", text)
    assert re.search(r"<td>TS_01</td><td>6</td>.*<td>TS_02</td><td>4</td>", text)
    assert "25.0 Å" in text and "1: 70.0%, 2: 30.0%" in text
    for alt in (
        "half_map_fsc",
        "run_class001_slices",
        "run_data_angles",
        "class_populations",
        "resolution_per_iteration",
    ):
        assert f"alt='{alt}.png'" in text, alt
    assert "particle_diameter" in text  # the parameters from job.star


def test_view_histogram_is_equal_area():
    """Directions drawn uniformly on the sphere fill every bin equally (within Poisson
    noise): bins equal in rot and cos(tilt) have equal area. Bins equal in tilt would give
    the poles ~10x fewer counts than the equator; a rot/tilt mix-up would put the point at
    (rot 100, tilt 30) in the wrong bin."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=(200_000, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    rot = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
    tilt = np.degrees(np.arccos(v[:, 2]))
    counts, rot_edges, cos_edges = view_histogram(rot, tilt, bins=(12, 6))
    expected = len(rot) / counts.size
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)
    one, _, _ = view_histogram(np.array([100.0]), np.array([30.0]), bins=(12, 6))
    row, col = np.argwhere(one)[0]
    assert rot_edges[col] <= 100 < rot_edges[col + 1]
    assert cos_edges[row] >= np.cos(np.radians(30)) > cos_edges[row + 1]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_reports_render_in_chromium(tmp_path):
    """The job report and the project report open from disk in Chromium with every image
    decoded and a non-blank page, and the project report's links lead to the job reports.
    A failure means a broken or external image, a page a person would see empty, or a dead
    link."""
    directory, _ = _synthetic_job(tmp_path)
    assert check_in_browser(directory / REPORT, tmp_path / "job.png") == 5
    project = write_project_report(tmp_path, title="test project")
    text = project.read_text()
    links = re.findall(r"<a href='([^']+)'>", text)
    assert links == ["Refine3D/job001/report.html"]
    assert all((tmp_path / link).is_file() for link in links)
    assert "<td>Succeeded</td>" in text
    check_in_browser(project, tmp_path / "project.png")
