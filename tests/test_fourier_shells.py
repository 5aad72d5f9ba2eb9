"""FSC and shell statistics against direct numpy sums."""

from __future__ import annotations

import numpy as np
import torch

from subtomo.fourier import (
    fsc_maps,
    fsc_threshold_shell,
    radial_average,
    rfft_centered,
    shell_index,
    ssnr_resolution_shell,
)


def _numpy_fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = a.shape[0]
    fa = np.fft.rfftn(np.fft.ifftshift(a))
    fb = np.fft.rfftn(np.fft.ifftshift(b))
    k, kx = np.fft.fftfreq(n) * n, np.fft.rfftfreq(n) * n
    r = np.round(np.sqrt(sum(g**2 for g in np.meshgrid(k, k, kx, indexing="ij")))).astype(int)
    out = []
    for i in range(n // 2 + 1):
        s = r == i
        num = np.sum((fa[s] * fb[s].conj()).real)
        out.append(num / np.sqrt(np.sum(abs(fa[s]) ** 2) * np.sum(abs(fb[s]) ** 2)))
    return np.array(out)


def test_fsc_matches_direct_shell_sums():
    """Bincount FSC equals masked sums over the same rfft half (RELION counts it once)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 16, 16)) + 0.5
    b = a + rng.normal(size=a.shape)
    ours = fsc_maps(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ref = _numpy_fsc(a, b)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert 0.3 < ours[1:].mean() < 0.9  # half the power is shared noise-free signal
    np.testing.assert_allclose(ours[0], 1.0, atol=1e-6)
    assert fsc_maps(torch.from_numpy(a), torch.from_numpy(a)).min() > 0.9999


def test_shells_and_radial_average():
    idx = shell_index((8, 8, 8))
    assert idx[0, 0, 0] == 0 and idx[0, 0, 4] == 4 and idx[4, 4, 4] == -1
    x = torch.zeros(32, 32)
    x[16, 16] = 1.0  # a centred delta: flat spectrum
    spectrum = rfft_centered(x, 2).abs()
    np.testing.assert_allclose(radial_average(spectrum, (32, 32)).numpy(), 1.0, atol=1e-6)


def test_the_two_resolution_rules():
    """RELION's SSNR rule (first shell > 0 with SSNR < 1, minus one; a rise above 1 more
    than 3 shells later counts; the best class wins) and the FSC threshold rule (last shell
    before the first drop below 0.143) read the same curve differently."""
    ssnr = torch.tensor([9.0, 5.0, 2.0, 0.5, 0.2, 0.1, 0.1, 0.1, 0.1])
    assert ssnr_resolution_shell(ssnr) == 2
    assert fsc_threshold_shell(ssnr) == 4  # the same curve read as an FSC
    late = ssnr.clone()
    late[6] = 1.5  # 4 shells after shell 2: counts
    assert ssnr_resolution_shell(late) == 6
    near = ssnr.clone()
    near[5] = 1.5  # only 3 shells after: ignored
    assert ssnr_resolution_shell(near) == 2
    assert ssnr_resolution_shell(torch.stack([ssnr, late])) == 6
