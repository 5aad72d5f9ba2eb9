"""Cramér–Rao bound of the per-tilt and per-particle defocus of ``subtomo ctf-refine``
(issue 19), on the data set of ``benchmarks/ctf_refine.py`` (run that first).

The recorded tilt image is ``X = c·P + N`` (``c`` the true ``CTF·dose``, ``P`` the true
map's projection, ``N`` white noise of variance ``σ²`` per real/imaginary part); the stacks
hold ``Y = A·X`` (``A`` the nominal ``CTF·dose`` they were premultiplied with). With
``∂c/∂δ = −φ·Im Q`` (:mod:`subtomo.tomorefine.predict`) the Fisher information of a
defocus change δ (Å) is ``I = Σ j/σ²``, ``j = |P|² φ² (Im Q)²``, summed over the Fourier
points of every visible image of a tilt (per tilt) or of a particle (per particle), with the
map, poses and scale known (a lower bound; also printed with each tilt's scale a free
nuisance parameter, as ctf-refine fits it: ``I − I_δs²/I_ss``). With the Gaussian prior of
the fit (σ_t) the Bayesian bound of each tilt is ``(I + 1/σ_t²)^(-1/2)``.

A least-squares fit ``Σ v·w·|Y − A·c·P|²/2`` (``w = 1/σ²`` on the shells from ``--kmin``,
point weights ``v``) has curvature ``H = Σ u j/σ²`` (``u = v·A²``) and, the noise on ``Y``
being ``A·N``, variance ``Σ u² j/σ² / H²`` (sandwich). Printed for ``v = 1`` (``u = A²``,
ctf-refine before it weighted by the likelihood: it discards the points where the nominal
CTF is near zero, where ``∂c/∂δ`` is largest) and ``v = 1/(A² + ε|Q|²)`` (ctf-refine's,
:data:`subtomo.tomorefine.ctf.WEIGHT_FLOOR`). Prints, per tilt (RMS over all tilts and over
|tilt| <= 20°) and per particle, the posterior standard deviations with the fit's prior and
the factor of particles (or SNR, i.e. dose) the bound needs for the bars (100 Å per tilt,
150 Å per particle). ``--max-shell``: only the shells up to that one, as with a reference
of that resolution (e.g. the half maps of a Refine3D).

    python benchmarks/ctf_bound.py --workdir /tmp/bench_ctf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from subtomo.data import ParticleSet, TomogramSet
from subtomo.io import read_mrc
from subtomo.ml.loader import ParticleState, StackLoader
from subtomo.reconstruct.particles import ctf_of_tilt_series
from subtomo.tomorefine import TiltPredictor
from subtomo.tomorefine.predict import shell_noise_sums

#: floors ε of the weights ``A²/(A² + ε·|Q|²)`` compared with ctf-refine's ``A²``
EPSILON = (0.01, 0.1, 0.3)


def _information(work: Path, kmin_angst: float, max_shell: int) -> dict[str, np.ndarray]:
    """Per tilt (all series, file order) and per particle: ``I`` of the bound, and ``H`` and
    the score variance ``V`` of ctf-refine's weighting (see the module docstring)."""
    parts = ParticleSet.read(work / "ext/particles.star")
    nominal, true = (
        TomogramSet.read(work / "tomograms.star"),
        TomogramSet.read(work / "true_alignment.star"),
    )
    loader = StackLoader(parts, nominal, batch_size=32)
    truth, _ = read_mrc(work / "truth.mrc")
    n = loader.box
    true_parts = ParticleSet.read(work / "particles.star")
    offsets = dict(zip(true_parts.particles["rlnTomoParticleName"].astype(str),
                       true_parts.defocus_offsets().numpy(), strict=True))  # fmt: skip
    offset = torch.tensor([offsets[p] for p in parts.particles["rlnTomoParticleName"].astype(str)])
    predictor = TiltPredictor(
        loader, torch.stack([truth, truth]).float(), max_shell=n // 2, defocus_offset=offset
    )
    ctfs = {s.name: ctf_of_tilt_series(s) for s in true}
    state = ParticleState.from_particles(parts)
    n_shells = n // 2 + 1
    noise = torch.zeros(2, n_shells, dtype=torch.float64)
    first = np.cumsum([0] + [s.n_tilts for s in nominal])
    start = {s.name: int(o) for s, o in zip(nominal, first[:-1], strict=True)}
    # per shell, per tilt and per particle: Σ j; Σ u j and Σ u² j for each weighting; and for
    # the scale s (∂c/∂s = c): Σ |P|² c² and Σ |P|² c·∂c/∂δ
    size = 5 + 2 * len(EPSILON)
    tilt_sums = torch.zeros(size, int(first[-1]), n_shells, dtype=torch.float64)
    particle_sums = torch.zeros(size, len(parts), n_shells, dtype=torch.float64)
    for patches in predictor.batches(state, tilt_ctf=ctfs):
        noise += torch.stack(shell_noise_sums(patches, patches.ctf, n_shells))
        j = patches.predicted.abs() * patches.defocus_phase * patches.quadrature.imag
        a2 = patches.applied.square()
        envelope = patches.quadrature.abs().square()
        u = [a2 / (a2 + e * envelope).clamp_min(1e-30) for e in EPSILON]
        c = patches.predicted.abs() * patches.quadrature.real
        weighted = [w**k * j * j for w in [a2, *u] for k in (1, 2)]
        terms = torch.stack([j * j, *weighted, c * c, c * j]).double()
        shells = torch.zeros((*terms.shape[:3], n_shells), dtype=torch.float64)
        shells.index_add_(3, patches.points.shell.clamp_max(n_shells - 1), terms)
        vis = patches.visible
        rows = torch.tensor([start[str(name)] for name in patches.tomo_names])[:, None]
        tilt_sums.index_add_(1, (rows + patches.frames)[vis], shells[:, vis])
        particle_sums[:, patches.index] += shells.sum(2)
    sigma2 = noise[0] / noise[1]
    shell = torch.arange(n_shells)
    low = int(np.ceil(n * loader.pixel_size / kmin_angst))
    inv = torch.where((shell >= 1) & (shell <= max_shell), 1 / sigma2, 0.0)
    used = inv * (shell >= low)
    out = {}
    for prefix, sums in (("", tilt_sums), ("p", particle_sums)):
        out[prefix + "I"] = (sums[0] * inv).sum(-1)
        ss, ds = ((sums[k] * inv).sum(-1) for k in (-2, -1))
        out[prefix + "I scale free"] = out[prefix + "I"] - ds * ds / ss.clamp_min(1e-300)
        for i, name in enumerate(["A²", *(f"ε {e:g}" for e in EPSILON)]):
            h, v = ((sums[1 + 2 * i + k] * used).sum(-1) for k in (0, 1))
            out[f"{prefix}{name}"] = h * h / v.clamp_min(1e-300)
    return {k: v.numpy() for k, v in out.items()}


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _bayes(information: np.ndarray, prior: float) -> np.ndarray:
    """Posterior standard deviation (Å) for Fisher information ``information`` (1/Å²)."""
    return 1 / np.sqrt(information + 1 / prior**2)


def _factor(information: np.ndarray, prior: float, bar: float) -> float:
    """How many times more information (particles, or SNR/dose) the bound needs for ``bar``
    Å RMS."""
    lo, hi = 1e-3, 1e6
    for _ in range(100):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if _rms(_bayes(mid * information, prior)) > bar else (lo, mid)
    return float(hi)


def _show(information: np.ndarray, prior: float, low: np.ndarray | None) -> str:
    """RMS posterior standard deviation, and at the tilts ``low`` if given."""
    sd = _bayes(information, prior)
    return f"{_rms(sd):.0f} Å" + (
        f" ({_rms(sd[low]):.0f} Å at |tilt| <= 20°)" if low is not None else ""
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_ctf_refine"))
    ap.add_argument("--kmin", type=float, default=30.0, help="ctf-refine's --kmin (Å)")
    ap.add_argument(
        "--max-shell",
        type=int,
        default=10**6,
        help="no information beyond this shell (a reference of that resolution)",
    )
    ap.add_argument("--sigma-tilt", type=float, default=500.0)
    ap.add_argument("--sigma-particle", type=float, default=300.0)
    a = ap.parse_args()
    info = _information(a.workdir, a.kmin, a.max_shell)
    tilt = np.concatenate([np.asarray(s.tilts["rlnTomoYTilt"], dtype=np.float64)
                           for s in TomogramSet.read(a.workdir / "tomograms.star")])  # fmt: skip
    low = np.abs(tilt) <= 20
    rows = [("per tilt", "", a.sigma_tilt, 100.0, "particles or SNR (dose)"),
            ("per particle", "p", a.sigma_particle, 150.0, "SNR (dose)")]  # fmt: skip
    for label, p, prior, bar, what in rows:
        sel = low if not p else None
        print(f"{label} (prior σ {prior:.0f} Å): Cramér–Rao {_show(info[p + 'I'], prior, sel)}; "
              f"the bar {bar:.0f} Å needs {_factor(info[p + 'I'], prior, bar):.1f}x the "
              f"{what}")  # fmt: skip
        if not p:
            print(f"  with each tilt's scale free: {_show(info['I scale free'], prior, sel)}")
        for name in ["A²", *(f"ε {e:g}" for e in EPSILON)]:
            print(f"  weights {name}: {_show(info[p + name], prior, sel)}")


if __name__ == "__main__":
    main()
