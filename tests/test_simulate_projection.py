"""The Fourier-slice projection adapter against brute-force real-space projection."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from torch_fourier_slice import extract_central_slices_rfft_3d

from subtomo.fourier import irfft_centered
from subtomo.geometry import euler_to_matrix
from subtomo.simulate import VolumeProjector, project_rfft

BOX = 32


def _asymmetric_map() -> np.ndarray:
    """Four Gaussian blobs of different heights at asymmetric places (no symmetry at all)."""
    axis = np.arange(BOX) - BOX // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    blobs = (((5, 0, 0), 1.0, 1.5), ((0, -7, 0), 2.0, 1.5), ((0, 0, 9), 3.0, 1.5))
    blobs += (((-3, 3, -3), 1.5, 2.0),)
    return sum(
        a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
        for c, a, s in blobs
    ).astype(np.float32)


def _brute_force(volume: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Rotate the map by A (rotated(p) = V(A^T p), about N//2) with scipy; sum along z."""
    m = a.T[::-1, ::-1]  # xyz -> zyx index order
    c = np.full(3, volume.shape[0] // 2)
    return ndi.affine_transform(volume, m, offset=c - m @ c, order=3).sum(axis=0)


def _centre(image: torch.Tensor) -> np.ndarray:
    p = (image.shape[-1] - BOX) // 2
    return image[..., p : p + BOX, p : p + BOX].cpu().numpy()


@pytest.mark.parametrize(
    ("angles", "tolerance"),
    [((30.0, 50.0, -70.0), 0.04), ((-120.0, 100.0, 15.0), 0.04), ((0.0, 0.0, 0.0), 0.08)],
)
def test_projection_matches_brute_force(device, angles, tolerance):
    """``project_rfft`` (library with M = A^T) equals the real-space projection by RELION's A.

    A failure means the adapter passes the wrong matrix to torch-fourier-slice or mishandles
    its layout (centre, fftshift), so simulated particles would not have the written poses.
    Tolerances are the measured accuracy of 2x padding with trilinear interpolation and the
    sinc² pre-correction (as in RELION's projector): ~0.3-3% of the peak for general views;
    for views along a grid axis (no interpolation) the correction over-shoots density far
    from the centre (here +6.6% at 9 px from it in the 64-voxel padded box).
    """
    volume = _asymmetric_map()
    a = euler_to_matrix(*angles).numpy()
    projector = VolumeProjector.from_volume(torch.from_numpy(volume).to(device))
    assert projector.size == 2 * BOX
    image = irfft_centered(project_rfft(projector, torch.as_tensor(a)), (2 * BOX, 2 * BOX))
    got, expected = _centre(image), _brute_force(volume, a)
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9998
    assert np.abs(got - expected).max() < tolerance * expected.max()
    assert abs(got.sum() / expected.sum() - 1) < tolerance  # density scale kept


def test_library_convention_is_transpose_of_relion_matrix():
    """Documents the verified convention: the library's matrix is A^T, not A.

    Passing RELION's A itself to extract_central_slices_rfft_3d gives another image; if this
    starts to pass with A, the library changed its convention and the adapter must follow.
    """
    volume = _asymmetric_map()
    a = euler_to_matrix(30.0, 50.0, -70.0)
    projector = VolumeProjector.from_volume(torch.from_numpy(volume))
    expected = _brute_force(volume, a.numpy())
    for matrix, good in ((a.T, True), (a, False)):
        slices = extract_central_slices_rfft_3d(projector.dft, matrix.float())
        image = irfft_centered(torch.fft.ifftshift(slices, dim=-2), (2 * BOX, 2 * BOX))
        corr = np.corrcoef(_centre(image).ravel(), expected.ravel())[0, 1]
        assert (corr > 0.9999) if good else (corr < 0.9)


def test_batched_rotations_project_independently():
    """A (2, 3) batch of rotations gives the same images as one rotation at a time, so the
    renderer's (particles, tilts) batching cannot mix poses between patches.
    """
    projector = VolumeProjector.from_volume(torch.from_numpy(_asymmetric_map()))
    angles = torch.tensor([[10.0, 20, 30], [40, 50, 60], [-70, 80, 90]] * 2).reshape(2, 3, 3)
    a = euler_to_matrix(angles[..., 0], angles[..., 1], angles[..., 2])
    batched = project_rfft(projector, a)
    for i in range(2):
        for j in range(3):
            single = project_rfft(projector, a[i, j])
            torch.testing.assert_close(batched[i, j], single, rtol=1e-5, atol=1e-4)
