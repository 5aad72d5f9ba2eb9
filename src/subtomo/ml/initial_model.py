"""De novo 3D initial model: stochastic gradient steps of the regularised likelihood (VDAM-like).

RELION's "3D initial model" (``relion_refine --grad --denovo_3dref``) starts from the
particles averaged in random orientations and takes gradient steps on the map computed from
mini-batches with global orientation searches, the resolution growing over the iterations
(relion5-conventions §7; conventions §19). Here each iteration:

1. runs the engine's E-step (:func:`subtomo.ml.expectation_pass`: global HEALPix search,
   the tilt series' CTF and dose of every tilt, adaptive oversampling) on a mini-batch of
   ``b`` of the ``N`` particles at the scheduled image size;
2. builds the mini-batch's MAP map with the data weighted ``N/b`` (:func:`subtomo.ml.
   maximise` with ``tau2 * N/b``: the same ``D / (W + 1/(T tau2))`` with ``D`` and ``W``
   scaled), i.e. the full-data update a variable-metric gradient step, preconditioned by
   the Fourier weights, points to: ``V_b - V`` is the gradient of the log posterior divided
   by its diagonal curvature ``W + 1/(T tau2)``;
3. moves the references along it with momentum, ``m <- mu m + (V_b - V)``,
   ``V <- V + lambda m`` (``lambda`` decreasing from ``step_start`` to ``step_end``), and
   blends noise spectra and class priors by ``lambda``; tau2 follows the EM update
   ``power(V) + 1/(W N/b + 1/(T tau2))``.

The first references are reconstructions of random particle subsets (one per class) at
random orientations, low-passed to the starting resolution. Symmetry, when imposed, is
applied in every M-step (and the search covers its asymmetric unit); otherwise the job runs
C1 and aligns the result to the symmetry axes (:func:`subtomo.ml.align_maps.symmetry_frame`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from subtomo.fourier import lowpass_map
from subtomo.ml.batch import ParticleBatch
from subtomo.ml.engine import (
    EngineParams,
    ParticleResults,
    expectation_pass,
    maximise,
    solvent_mask,
)
from subtomo.ml.model import MLModel, reference_tau2
from subtomo.ml.mstep import weight_spectrum
from subtomo.ml.sampling import Sampling

__all__ = [
    "GradientSchedule",
    "denovo_model",
    "gradient_iteration",
    "image_size",
    "minibatch",
    "random_rotations",
]


@dataclass(frozen=True)
class GradientSchedule:
    """How the stochastic optimisation proceeds over ``iterations``.

    Mini-batches grow linearly from ``subset_start`` to ``subset_end`` particles (capped at
    the data set) over the first half of the iterations; the resolution limit from
    ``resolution_start_angst`` to ``resolution_end_angst`` (linear in spatial frequency)
    over the first ``resolution_fraction`` of them; the step ``lambda`` from
    ``step_start`` to ``step_end`` (linear); ``momentum`` ``mu``.
    """

    iterations: int = 20
    subset_start: int = 100
    subset_end: int = 200
    resolution_start_angst: float = 60.0
    resolution_end_angst: float = 30.0
    resolution_fraction: float = 0.6
    step_start: float = 0.6
    step_end: float = 0.3
    momentum: float = 0.5

    def _fraction(self, iteration: int, of: float = 1.0) -> float:
        """0 at the first iteration, 1 at ``of`` of them (and after)."""
        span = max(1.0, of * (self.iterations - 1))
        return min(1.0, iteration / span)

    def subset(self, iteration: int, n_particles: int) -> int:
        """Mini-batch size of 0-based ``iteration``."""
        f = self._fraction(iteration, 0.5)
        return min(
            n_particles, round(self.subset_start + f * (self.subset_end - self.subset_start))
        )

    def resolution_angst(self, iteration: int) -> float:
        """Resolution limit (Å) of 0-based ``iteration``."""
        f = self._fraction(iteration, self.resolution_fraction)
        k = (1 - f) / self.resolution_start_angst + f / self.resolution_end_angst
        return 1.0 / k

    def step(self, iteration: int) -> float:
        """Step ``lambda`` of 0-based ``iteration``."""
        f = self._fraction(iteration)
        return self.step_start + f * (self.step_end - self.step_start)


def image_size(resolution_angst: float, box: int, pixel_size: float) -> int:
    """Even image size whose outer shell reaches ``resolution_angst`` (at most the box)."""
    shell = math.ceil(box * pixel_size / resolution_angst)
    return min(box, 2 * max(shell, 2))


def random_rotations(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3, 3)`` rotations uniform on SO(3) (normalised Gaussian quaternions), float64."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def denovo_model(
    batches: Iterable[ParticleBatch],
    sigma2: torch.Tensor,
    n_classes: int,
    box: int,
    pixel_size: float,
    params: EngineParams,
    symmetry: str,
    resolution_angst: float,
    *,
    sigma_offset_angst: float,
    device: torch.device | str = "cpu",
) -> MLModel:
    """Iteration-0 model: each class the reconstruction of a random part of ``batches``
    (particles whose rotations were set to :func:`random_rotations`; RELION's
    ``--denovo_3dref``), low-passed to ``resolution_angst``.

    The classes get disjoint random subsets through the engine's random first-iteration
    classes; the reconstruction uses no prior. tau2 is the power of the unfiltered
    reconstructions (signal and noise: an upper bound, so the prior does not hold back the
    shells the resolution schedule opens later).
    """
    zeros = torch.zeros(n_classes, box, box, box, device=device)
    size = image_size(resolution_angst, box, pixel_size)
    empty = MLModel.initial(zeros, sigma2, pixel_size, current_size=size,
                            sigma_offset_angst=sigma_offset_angst)  # fmt: skip
    empty = dataclasses.replace(empty, tau2=torch.full_like(empty.tau2, 1e30))
    sampling = Sampling(align=False, symmetry=symmetry)
    first_params = dataclasses.replace(params, random_class_init=True, seeded_classes=False)
    sums, _ = expectation_pass(empty, batches, sampling, first_params, device=device)
    sums.all_reduce()
    first = maximise(empty, sums, params, sampling, tau2=empty.tau2)
    return dataclasses.replace(
        first,
        references=lowpass_map(first.references, resolution_angst, pixel_size),
        tau2=reference_tau2(first.references).cpu().clamp(min=1e-30),
        class_priors=torch.full((n_classes,), 1.0 / n_classes, dtype=torch.float64),
        ssnr=torch.zeros_like(first.ssnr),
        current_size=size,
        iteration=0,
    )


def gradient_iteration(
    model: MLModel,
    velocity: torch.Tensor,
    batches: Iterable[ParticleBatch],
    sampling: Sampling,
    params: EngineParams,
    *,
    n_particles: int,
    step: float,
    momentum: float,
    current_size: int,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[MLModel, torch.Tensor, ParticleResults]:
    """One stochastic step on a mini-batch (module docstring); returns the next model, the
    next momentum ``m`` ``(K, n, n, n)`` and the mini-batch's E-step results.

    Under torch.distributed each rank passes its share of the mini-batch's ``batches``
    (:meth:`~subtomo.ml.loader.StackLoader.batches` with ``shard=True``): the sums are
    all-reduced and the results gathered, so every rank steps to the same model."""
    model = dataclasses.replace(model, current_size=current_size)
    sums, results = expectation_pass(
        model, batches, sampling, params, device=device, progress=progress
    )
    sums.all_reduce()
    scale = n_particles / max(1, sums.n_particles)
    target = maximise(model, sums, params, sampling, tau2=model.tau2 * scale)
    refs = model.references
    velocity = momentum * velocity + (target.references - refs)
    new_refs = refs + step * velocity
    if params.flatten_solvent:
        # the momentum may carry density outside the mask the targets were flattened with
        new_refs = new_refs * solvent_mask(params, model.box, model.pixel_size, refs.device)
    weight = torch.stack([weight_spectrum(acc).cpu() for acc in sums.accumulators]) * scale
    old = model.tau2.cpu().double()
    tau2 = reference_tau2(new_refs).cpu() + 1 / (weight + 1 / old.clamp(min=1e-300))
    tau2 = torch.where(weight > 0, tau2, old)
    priors = (1 - step) * model.class_priors + step * target.class_priors
    sigma2 = (1 - step) * model.sigma2 + step * target.sigma2
    return (
        dataclasses.replace(
            target,
            references=new_refs,
            tau2=tau2,
            class_priors=priors / priors.sum(),
            sigma2=sigma2,
            current_size=current_size,
        ),
        velocity,
        results.all_gathered(),
    )


def minibatch(iteration: int, size: int, n_particles: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(size, N)`` distinct particles drawn for ``iteration``
    (deterministic in ``seed`` and ``iteration``)."""
    rng = np.random.default_rng([seed, iteration])
    return np.sort(rng.choice(n_particles, min(size, n_particles), replace=False))
