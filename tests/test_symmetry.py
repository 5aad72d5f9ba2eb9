"""Point groups: orders, closure, RELION's axes and invariance of symmetrised functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from subtomo.errors import InputError
from subtomo.geometry import symmetry_matrices

ORDERS = {
    "C1": 1, "C4": 4, "c7": 7, "D1": 2, "D2": 4, "d5": 10, "T": 12, "O": 24,
    "I": 60, "I1": 60, "I2": 60, "i3": 60, "I4": 60,
}  # fmt: skip

# RELION's generator axes (symmetry definitions in its documentation / sym files), rounded.
RELION_AXES = {
    "T": [(3, (0, 0, 1)), (2, (0, 0.816496, 0.577350))],
    "O": [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0, 0, 1))],
    "I1": [(2, (1, 0, 0)), (5, (0.8506508070, 0, -0.5257311143)),
           (3, (0.934172364, 0.356822077, 0))],
    "I2": [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807)), (3, (0, 0.356822076, 0.934172364))],
    "I3": [(2, (-0.5257311143, 0, 0.8506508070)), (5, (0, 0, 1)),
           (3, (-0.4911234779, 0.3568220765, 0.7946544754))],
    "I4": [(2, (0.5257311143, 0, 0.8506508070)), (5, (0.8944271933, 0, 0.4472135910)),
           (3, (0.4911234779, 0.3568220765, 0.7946544754))],
}  # fmt: skip


def _contains(group: torch.Tensor, fold: int, axis: tuple[float, ...], atol: float) -> bool:
    """Whether the rotation by 360°/fold about ``axis`` (scipy, independent) is in ``group``."""
    u = np.asarray(axis, dtype=float)
    m = Rotation.from_rotvec(u / np.linalg.norm(u) * 2 * np.pi / fold).as_matrix()
    return bool((np.abs(group.numpy() - m).max(axis=(1, 2)) < atol).any())


@pytest.mark.parametrize(("name", "order"), ORDERS.items())
def test_order_closure_and_rotations(name: str, order: int) -> None:
    """Each group has its order, the identity first, proper rotations, and is closed.

    A failure means a missing/duplicated element or a generator that does not belong to
    the group (closure would then fail or the order would be wrong).
    """
    g = symmetry_matrices(name)
    assert g.dtype == torch.float64 and g.shape == (order, 3, 3)
    assert torch.allclose(g[0], torch.eye(3, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64).expand_as(g)
    assert torch.allclose(g @ g.transpose(-1, -2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(g), torch.ones(order, dtype=torch.float64))
    products = (g[:, None] @ g[None]).reshape(-1, 3, 3)
    distance = (products[:, None] - g[None]).abs().amax(dim=(-2, -1))  # (n², n)
    assert torch.all(distance.min(dim=1).values < 1e-9)  # every product is in the group
    distinct = (g[:, None] - g[None]).abs().amax(dim=(-2, -1)) + torch.eye(order) * 9
    assert distinct.min() > 1e-3  # no element twice


@pytest.mark.parametrize("n", [1, 2, 3, 6, 13])
def test_cyclic_and_dihedral_axes(n: int) -> None:
    """Cn turns about z by 360°/n; Dn adds a 2-fold about x (RELION's orientation)."""
    c, d = symmetry_matrices(f"C{n}"), symmetry_matrices(f"D{n}")
    assert _contains(c, n, (0, 0, 1), 1e-12) and _contains(d, n, (0, 0, 1), 1e-12)
    assert _contains(d, 2, (1, 0, 0), 1e-12)
    assert (c[:, 2, 2] == 1).all()  # all of Cn fixes z


@pytest.mark.parametrize("name", RELION_AXES)
def test_relion_generator_axes(name: str) -> None:
    """RELION's generator axes (including the 3-folds we did not generate from) are in the group.

    A failure means the group sits in a different orientation from RELION's, so maps
    symmetrised here and there would disagree.
    """
    g = symmetry_matrices(name)
    for fold, axis in RELION_AXES[name]:
        assert _contains(g, fold, axis, 1e-5), (name, fold, axis)


def test_icosahedral_settings() -> None:
    """I = I2 (Crowther 222): 2-folds on x, y, z and 5-folds in the xz plane; I1 too has its
    2-folds on the axes; I3 has a 5-fold on z; T has 2-folds off the coordinate axes."""
    i, i2 = symmetry_matrices("I"), symmetry_matrices("I2")
    assert torch.equal(i, i2)
    for name in ("I1", "I2"):
        for axis in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
            assert _contains(symmetry_matrices(name), 2, axis, 1e-12)
    rotvec = Rotation.from_matrix(i2.numpy()).as_rotvec()
    five = rotvec[np.isclose(np.linalg.norm(rotvec, axis=1), 2 * np.pi / 5)]
    assert len(five) == 12  # 6 five-fold axes x 2 senses
    assert np.sum(np.abs(five[:, 1]) < 1e-9) == 4  # two axes, ± (1, 0, ±φ), in the xz plane
    assert _contains(symmetry_matrices("I3"), 5, (0, 0, 1), 1e-12)
    assert not _contains(symmetry_matrices("T"), 2, (1, 0, 0), 1e-6)


@pytest.mark.parametrize("name", ["C5", "D3", "T", "O", "I1", "I2", "I3", "I4"])
def test_symmetrised_function_is_invariant(name: str) -> None:
    """f_sym(x) = mean_R f(R x) satisfies f_sym(S x) = f_sym(x) for every S in the group,
    while the unsymmetrised f does not (so the check has teeth)."""
    rng = np.random.default_rng(3)
    centres = torch.tensor(rng.normal(size=(5, 3)))

    def blobs(x: torch.Tensor) -> torch.Tensor:  # (..., 3) -> (...)
        return torch.exp(-((x[..., None, :] - centres) ** 2).sum(-1)).sum(-1)

    g = symmetry_matrices(name)
    x = torch.tensor(rng.normal(size=(50, 3)))

    def symmetrised(p: torch.Tensor) -> torch.Tensor:  # (..., 3) -> (...)
        return blobs(torch.einsum("gij,...j->...gi", g, p)).mean(-1)

    moved = torch.einsum("sij,pj->spi", g, x)  # (S, p, 3): every S x
    assert torch.allclose(symmetrised(moved), symmetrised(x).expand(len(g), -1), atol=1e-12)
    assert (blobs(x @ g[1].T) - blobs(x)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["X3", "C0", "D", "I5", "", "C2.5", "T1"])
def test_unknown_symmetry_is_input_error(name: str) -> None:
    """Names RELION does not know give one clear InputError, not a KeyError or a wrong group."""
    with pytest.raises(InputError, match="unknown symmetry"):
        symmetry_matrices(name)
