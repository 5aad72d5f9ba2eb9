"""A D7 test complex for the benchmarks: the T. acidophilum 20S proteasome (PDB 3J9I).

``data/proteasome_3j9i_ca.txt`` holds the C-alpha traces of one alpha and one beta subunit
and three C-alphas of every other chain (see its header). :func:`proteasome_ca` places the
28 subunits by rigid fits of those three atoms, centres the complex and turns its 7-fold
axis onto z; :func:`density_map` renders C-alphas as Gaussian blobs (one residue of ~110 Da
each) on a grid. :func:`proteasome_map` does both, optionally without some of the four
heptameric rings (``alpha1``, ``beta1``, ``beta2``, ``alpha2`` from one end to the other),
e.g. the benchmark's second species: the proteasome without one outer alpha ring (74% of
the mass).

    python benchmarks/proteasome.py out.mrc --pixel-size 5 --box 64 [--without alpha1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DATA = Path(__file__).with_name("data") / "proteasome_3j9i_ca.txt"
#: Chains of each heptameric ring (the beta chain follows its alpha partner in the file).
RINGS = {
    "alpha1": "STUOPQR",
    "beta1": "Z12VWXY",
    "beta2": "MNHIJKL",
    "alpha2": "FGABCDE",
}


def _read(path: Path) -> dict[str, np.ndarray]:
    """C-alpha xyz (Å) per chain, in file order (``(n, 3)`` float64)."""
    chains: dict[str, list[list[float]]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        chain, _, _, x, y, z = line.split()
        chains.setdefault(chain, []).append([float(x), float(y), float(z)])
    return {c: np.asarray(v) for c, v in chains.items()}


def _kabsch(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation ``r`` and translation ``t`` with ``b ~ a @ r.T + t`` (rows are points)."""
    ca, cb = a.mean(0), b.mean(0)
    u, _, vt = np.linalg.svd((a - ca).T @ (b - cb))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, cb - ca @ r.T


def _axis(r: np.ndarray) -> np.ndarray:
    """Unit rotation axis of a 3x3 rotation matrix."""
    w, v = np.linalg.eig(r)
    axis = np.real(v[:, np.argmin(np.abs(w - 1))])
    return axis / np.linalg.norm(axis)


def proteasome_ca(rings: tuple[str, ...] = tuple(RINGS)) -> np.ndarray:
    """C-alpha positions ``(n, 3)`` xyz Å of the chosen rings, centred on the whole complex,
    with the 7-fold axis along z, a 2-fold axis along x (RELION's D7) and ring ``alpha1``
    at negative z."""
    chains = _read(DATA)
    templates = {c: chains[c] for c in ("S", "Z")}
    placed: dict[str, np.ndarray] = {}
    for name, members in RINGS.items():
        template = templates["S" if name.startswith("alpha") else "Z"]
        for c in members:
            r, t = _kabsch(template[:3], chains[c][:3])
            placed[c] = template @ r.T + t
    everything = np.concatenate(list(placed.values()))
    centre = everything.mean(0)
    r, _ = _kabsch(chains["S"][:3], chains["T"][:3])  # neighbours in one ring: 360/7 about z
    z = _axis(r)
    ring1 = np.concatenate([placed[c] for c in RINGS["alpha1"]]).mean(0) - centre
    if ring1 @ z > 0:
        z = -z
    two, _ = _kabsch(chains["S"][:3], chains["F"][:3])  # across the rings: a 2-fold
    x = _axis(two) - (_axis(two) @ z) * z
    x /= np.linalg.norm(x)  # RELION's Dn: the 2-fold axis along x
    frame = np.stack([x, np.cross(z, x), z])  # rows: new x, y, z axes
    kept = np.concatenate([placed[c] for ring in rings for c in RINGS[ring]])
    return (kept - centre) @ frame.T


def density_map(
    points: np.ndarray, pixel_size: float, box: int, sigma_angst: float = 3.0
) -> np.ndarray:
    """Sum of unit Gaussians of width ``sigma_angst`` at ``points`` (xyz Å from the centre)
    on a ``box``^3 grid (zyx, centre ``box//2``), float32. Rendered in Fourier space, so it
    is band-limited to the grid without aliasing."""
    k = np.fft.fftfreq(box) / pixel_size  # cycles/Å
    kx = np.fft.rfftfreq(box) / pixel_size
    spectrum = np.zeros((box, box, kx.size), dtype=np.complex128)
    for chunk in np.array_split(points, max(1, len(points) // 512)):
        # the structure factor is separable per point: e^{-2 pi i k.r} = ez ey ex
        ex, ey, ez = (
            np.exp(-2j * np.pi * np.outer(chunk[:, i], f)) for i, f in enumerate((kx, k, k))
        )
        zy = (ez[:, :, None] * ey[:, None, :]).reshape(len(chunk), -1)  # (a, z*y)
        spectrum += (zy.T @ ex).reshape(spectrum.shape)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2
    spectrum *= np.exp(-2 * (np.pi * sigma_angst) ** 2 * k2)
    vol = np.fft.irfftn(spectrum, s=(box,) * 3)
    return np.fft.fftshift(vol).astype(np.float32) / pixel_size**3


def proteasome_map(pixel_size: float, box: int, without: tuple[str, ...] = ()) -> np.ndarray:
    """The proteasome (minus the rings in ``without``) as a ``box``^3 map at ``pixel_size``."""
    rings = tuple(r for r in RINGS if r not in without)
    return density_map(proteasome_ca(rings), pixel_size, box)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--pixel-size", type=float, default=5.0)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--without", nargs="*", default=[], choices=list(RINGS))
    a = ap.parse_args()
    import mrcfile

    vol = proteasome_map(a.pixel_size, a.box, tuple(a.without))
    with mrcfile.new(a.out, overwrite=True) as m:
        m.set_data(vol)
        m.voxel_size = a.pixel_size


if __name__ == "__main__":
    main()
