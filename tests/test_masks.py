"""Masks: distance transform, extension, soft edge, combinations and de novo shapes against
brute-force formulas, and against relion_mask_create when Debian's RELION is installed."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
from scipy import ndimage

from subtomo.fourier import lowpass_map
from subtomo.io import read_mrc, write_mrc
from subtomo.masks import (
    binary_threshold,
    crown_mask,
    cylinder_mask,
    extend_binary,
    mask_from_map,
    soft_edge,
    squared_distance_to,
    suggest_threshold,
)


def _blobs(n: int = 20, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(ndimage.gaussian_filter(rng.normal(size=(n, n, n)), 2.0) > 0.08)


def test_distance_matches_exact_edt(device):
    """Squared distances equal scipy's exact Euclidean distance transform wherever it is
    within the searched cube; a wrong separable pass would give larger values."""
    b = _blobs().to(device)
    d2 = squared_distance_to(b, 5).cpu().numpy()
    ref = ndimage.distance_transform_edt(~b.cpu().numpy()) ** 2
    near = ref <= 25
    np.testing.assert_allclose(d2[near], ref[near], atol=1e-4)
    assert np.all(d2[ref > 75] == np.inf)  # beyond the +-5 cube: not found


def test_extend_shrink_and_soft_edge_follow_relion_rules(device):
    """Extension adds voxels at distance < e; shrinking removes voxels within < |e| of the
    outside; the soft edge is 0.5 + 0.5 cos(pi d / w) for d < w (relion5-conventions §9)."""
    b = _blobs().to(device)
    ref = ndimage.distance_transform_edt(~b.cpu().numpy())
    ext = extend_binary(b, 2.5).cpu().numpy()
    np.testing.assert_array_equal(ext, ref < 2.5)
    inside = ndimage.distance_transform_edt(b.cpu().numpy())
    shr = extend_binary(b, -2.0).cpu().numpy()
    np.testing.assert_array_equal(shr, inside >= 2.0)
    soft = soft_edge(b, 4.0).cpu().numpy()
    expect = np.where(ref == 0, 1.0, np.where(ref < 4, 0.5 + 0.5 * np.cos(math.pi * ref / 4), 0))
    np.testing.assert_allclose(soft, expect, atol=1e-5)


def test_combinations_use_strict_comparisons():
    """--and/--or/--and_not/--or_not compare both maps strictly, as relion_mask_create."""
    a = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.0])
    o = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.0])
    t = 0.5
    assert binary_threshold(a, t).tolist() == [False, True, True, True, False]
    assert binary_threshold(a, t, other=o, combine="and").tolist() == [0, 1, 0, 0, 0]
    assert binary_threshold(a, t, other=o, combine="or").tolist() == [1, 1, 1, 0, 0]
    assert binary_threshold(a, t, other=o, combine="and_not").tolist() == [0, 0, 1, 0, 0]
    assert binary_threshold(a, t, other=o, combine="or_not").tolist() == [0, 1, 1, 0, 1]


def test_crown_and_cylinder_profiles(device):
    """A crown is 1 between the radii with raised-cosine edges outside both; a cylinder is
    the crown in xy times a soft extent in z (radii measured from N//2)."""
    m = crown_mask((32, 32, 32), 4.0, 10.0, 3.0, device=device).cpu()
    line = m[16, 16, 16:]  # along +x from the centre
    assert line[0] == 0 and line[1] == 0  # d < inner - width
    assert line[2] == pytest.approx(0.5 - 0.5 * math.cos(math.pi * 1 / 3), abs=1e-6)
    assert line[4:10].eq(1).all()
    assert line[11] == pytest.approx(0.5 + 0.5 * math.cos(math.pi * 1 / 3), abs=1e-6)
    assert line[13:].eq(0).all()
    c = cylinder_mask((32, 32, 32), 0.0, 6.0, 10.0, 2.0, device=device).cpu()
    assert c[16, 16, 16] == 1 and c[16 + 4, 16, 16] == 1 and c[16 + 8, 16, 16] == 0
    assert c[16, 16, 16 + 7] == pytest.approx(0.5, abs=1e-6)


def test_suggested_threshold_separates_two_levels():
    """On a two-level volume with noise, the histogram threshold lies between the levels."""
    g = torch.Generator().manual_seed(1)
    v = torch.zeros(32, 32, 32)
    v[8:24, 8:24, 8:24] = 1.0
    v += 0.1 * torch.randn(v.shape, generator=g)
    assert 0.3 < suggest_threshold(v) < 0.7


@pytest.mark.relion
def test_mask_matches_relion_mask_create(tmp_path, shared_data):
    """relion_mask_create on the ribosome (low-pass, threshold, extend, soft edge, and the
    --and combination with shrinking) and our mask correlate >= 0.99 (in fact agree)."""
    if shutil.which("relion_mask_create") is None:
        pytest.skip("relion_mask_create not installed")
    vol, px = read_mrc(shared_data / "maps" / "ribosome70S_4v4r_5A.mrc.gz")
    vol = vol[14:78, 14:78, 14:78] / vol.max()  # 64^3
    write_mrc(tmp_path / "in.mrc", vol, px)
    other = torch.roll(vol, 3, dims=2)
    write_mrc(tmp_path / "other.mrc", other, px)
    # No low-passed voxel within float noise of the threshold (at 0.05 one is 2e-8 away, and
    # RELION's low-pass and ours round it to opposite sides).
    assert (lowpass_map(vol, 15, px) - 0.055).abs().min() > 5e-6
    cases = [
        (["--lowpass", "15", "--ini_threshold", "0.055", "--extend_inimask", "2",
          "--width_soft_edge", "3"],
         mask_from_map(lowpass_map(vol, 15, px), 0.055, extend=2, soft_edge_width=3)),
        (["--ini_threshold", "0.1", "--extend_inimask", "-1.5", "--width_soft_edge", "2.5",
          "--and", str(tmp_path / "other.mrc"), "--invert"],
         1 - mask_from_map(vol, 0.1, extend=-1.5, soft_edge_width=2.5, other=other,
                           combine="and")),
    ]  # fmt: skip
    for k, (flags, ours) in enumerate(cases):
        out = tmp_path / f"m{k}.mrc"
        cmd = ["relion_mask_create", "--i", str(tmp_path / "in.mrc"), "--o", str(out)]
        subprocess.run([*cmd, "--angpix", str(px), *flags], check=True, capture_output=True)
        ref, _ = read_mrc(out)
        r = np.corrcoef(ref.flatten().numpy(), ours.flatten().numpy())[0, 1]
        assert r >= 0.99
        assert (ref - ours).abs().max() < 1e-4
