"""3D auto-refine: RELION's gold-standard resolution, image size and auto-sampling rules.

The two random halves are refined independently with the engine (:mod:`subtomo.ml.engine`);
this module holds what auto-refine adds on top (relion5-conventions §7.1-7.3):

* the half-set FSC (solvent-corrected with a reference mask by phase randomisation) and
  the tau2/SSNR taken from it, the FSC converted with ``sqrt(2 FSC / (1 + FSC))`` once the
  halves are joined (:func:`halfset_fsc`, :func:`gold_standard_spectra`);
* the current image size from the resolution (:func:`current_image_size`);
* the low-resolution join of the halves' Fourier sums (:func:`join_low_resolution`);
* the hidden-variable changes between iterations (:func:`hidden_variable_changes`) and the
  expected angular/translational accuracies (:func:`expected_accuracies`);
* the state machine that refines the HEALPix order and offsets, switches to local searches
  and declares convergence (:class:`AutoRefineState`, :func:`update_auto_sampling`).

Shells are ``round(|k| n)`` of the box ``n`` (``0..n//2``); resolutions in Å are
``n px / shell``. Offsets and steps are in Å, angles in degrees.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from subtomo.distributed import all_gather_object, broadcast_object
from subtomo.fourier import fsc_maps, irfft_centered, lowpass_map, radius_grid, rfft_centered
from subtomo.fourier.resolution import ssnr_resolution_shell
from subtomo.geometry import euler_to_matrix, matrix_to_euler, rotation_angle_deg
from subtomo.geometry.symmetry import symmetry_matrices
from subtomo.masks import automatic_mask
from subtomo.ml.batch import FourierPoints, ParticleBatch, fourier_points
from subtomo.ml.engine import (
    EngineParams,
    ParticleResults,
    expectation_pass,
    maximise,
    particle_sphere,
)
from subtomo.ml.likelihood import projected_shifts_px
from subtomo.ml.model import MLModel
from subtomo.ml.mstep import MStepSums, ssnr_from_fsc, weight_spectrum
from subtomo.ml.projector import Projector
from subtomo.ml.sampling import Sampling
from subtomo.postprocess import corrected_fsc, randomize_phases_beyond, randomize_shell
from subtomo.reconstruct import FourierAccumulator, reconstruct

__all__ = [
    "ACCURACY_LOG_ODDS",
    "AutoRefineState",
    "AutoSamplingOptions",
    "HalfSetIteration",
    "HiddenChanges",
    "IterationCallback",
    "accuracy_trials",
    "auto_refine",
    "current_image_size",
    "expected_accuracies",
    "gold_standard_iteration",
    "gold_standard_spectra",
    "halfset_fsc",
    "hidden_variable_changes",
    "join_low_resolution",
    "join_shell",
    "refinement_mask",
    "solvent_corrected_fsc",
    "update_auto_sampling",
    "with_poses",
]


@dataclass(frozen=True)
class AutoSamplingOptions:
    """Auto-refine options (RELION flags in brackets).

    ``healpix_order`` initial order (``--healpix_order``; 2 = 15 deg), ``offset_range_angst``
    / ``offset_step_angst`` initial offset search (``--offset_range/--offset_step``, Å),
    ``auto_local_healpix_order`` order from which local searches are used
    (``--auto_local_healpix_order``, "Local searches from auto-sampling"), ``oversampling``
    (``--oversampling``), ``symmetry`` (``--sym``), ``sigma_tilt_deg``/``sigma_psi_deg``
    priors on tilt/psi (``--sigma_tilt/--sigma_psi``), ``auto_ignore_angles``
    (``--auto_ignore_angles``), ``auto_resol_angles`` (``--auto_resol_angles``),
    ``particle_diameter_angst`` (``--particle_diameter``), ``pixel_size`` (Å),
    ``incr_size`` (``--incr_size``), ``max_healpix_order``: the sampling is fine enough at
    this order at the latest; ``sigma_ang_deg`` (``--sigma_ang``): local searches from the
    first iteration with this prior width (degrees) instead of 2x the finest step.
    """

    particle_diameter_angst: float
    pixel_size: float
    healpix_order: int = 2
    offset_range_angst: float = 5.0
    offset_step_angst: float = 1.0
    auto_local_healpix_order: int = 4
    oversampling: int = 1
    symmetry: str = "C1"
    sigma_tilt_deg: float | None = None
    sigma_psi_deg: float | None = None
    auto_ignore_angles: bool = False
    auto_resol_angles: bool = False
    incr_size: int = 10
    max_healpix_order: int = 8
    sigma_ang_deg: float | None = None


@dataclass(frozen=True)
class HiddenChanges:
    """Changes of the optimal hidden variables between two iterations (``_optimiser.star``).

    ``orientations_deg`` mean angle between the old and new best rotation
    (``rlnChangesOptimalOrientations``), ``offsets_angst`` RMS offset change in Å
    (``rlnChangesOptimalOffsets``), ``classes`` fraction of particles that changed class
    (``rlnChangesOptimalClasses``).
    """

    orientations_deg: float = math.inf
    offsets_angst: float = math.inf
    classes: float = math.inf


@dataclass(frozen=True)
class AutoRefineState:
    """Where auto-refine stands after an iteration (all of it goes into the checkpoint).

    ``healpix_order``, ``offset_range_angst``, ``offset_step_angst``: the sampling of the
    next iteration; ``local_searches``: the orientational prior is on (sigma = 2 x the
    finest step); ``best_resolution_shell``: best current-resolution shell so far;
    ``iter_without_resolution_gain`` (``rlnNumberOfIterWithoutResolutionGain``);
    ``iter_without_changes`` (``rlnNumberOfIterWithoutChangingAssignments``);
    ``smallest_changes``: the smallest changes since the sampling was last refined;
    ``acc_rot_deg``/``acc_trans_angst`` (``rlnAccuracyRotations/TranslationsAngst``);
    ``fine_enough``: the angular sampling is no longer refined; ``converged``
    (``rlnHasConverged``): the next iteration is the final, joined one.
    """

    healpix_order: int
    offset_range_angst: float
    offset_step_angst: float
    local_searches: bool = False
    best_resolution_shell: int = 0
    iter_without_resolution_gain: int = 0
    iter_without_changes: int = 0
    smallest_changes: HiddenChanges = HiddenChanges()
    acc_rot_deg: float = math.inf
    acc_trans_angst: float = math.inf
    fine_enough: bool = False
    converged: bool = False

    @classmethod
    def initial(cls, options: AutoSamplingOptions) -> AutoRefineState:
        """Before the first iteration: the initial order and offsets; local searches already
        when the initial order reaches ``auto_local_healpix_order``."""
        return cls(
            healpix_order=options.healpix_order,
            offset_range_angst=options.offset_range_angst,
            offset_step_angst=options.offset_step_angst,
            local_searches=options.healpix_order >= options.auto_local_healpix_order
            or options.sigma_ang_deg is not None,
        )

    def step_deg(self, options: AutoSamplingOptions) -> float:
        """Finest angular step (after oversampling): ``360 / (6 2^order) / 2^oversampling``."""
        return 360.0 / (6 * 2**self.healpix_order) / 2**options.oversampling

    def local_sigma_deg(self, options: AutoSamplingOptions) -> float:
        """Width of the orientational prior of local searches: ``--sigma_ang`` at the initial
        order, 2x the finest step once the sampling has been refined (RELION's auto-refine
        resets the prior whenever it refines the sampling)."""
        if options.sigma_ang_deg is not None and self.healpix_order == options.healpix_order:
            return options.sigma_ang_deg
        return 2 * self.step_deg(options)

    def sampling(self, options: AutoSamplingOptions) -> Sampling:
        """The engine's :class:`~subtomo.ml.sampling.Sampling` for the next iteration."""
        return Sampling(
            healpix_order=self.healpix_order,
            offset_range_angst=self.offset_range_angst,
            offset_step_angst=self.offset_step_angst,
            local_sigma_deg=self.local_sigma_deg(options) if self.local_searches else None,
            symmetry=options.symmetry,
            sigma_tilt_deg=options.sigma_tilt_deg,
            sigma_psi_deg=options.sigma_psi_deg,
            oversampling=options.oversampling,
        )

    def state_dict(self) -> dict:
        """Plain values for the checkpoint."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> AutoRefineState:
        return cls(**{**state, "smallest_changes": HiddenChanges(**state["smallest_changes"])})


def _is_small(
    changes: HiddenChanges, smallest: HiddenChanges, step_deg: float, offset_step: float
) -> bool:
    """RELION's "hidden variables no longer change" test (§7.2 (b))."""
    classes = changes.classes <= 1.03 * smallest.classes
    offsets = (
        changes.offsets_angst <= 1.03 * smallest.offsets_angst
        or changes.offsets_angst < 0.4 * offset_step
    )
    angles = (
        changes.orientations_deg <= 1.03 * smallest.orientations_deg
        or changes.orientations_deg < 0.4 * step_deg
    )
    return classes and offsets and angles


def half_pixel_step_deg(options: AutoSamplingOptions) -> float:
    """Angular step that moves the particle's edge (radius D/2) by half a pixel:
    ``360 px / (2 pi D)`` degrees. A finer step is taken as fine enough whatever the accuracy
    estimate says. On the D7 benchmark (D = 288 Å, 5 Å/px: 0.99 deg) the median angular
    error was 1.32 deg when the sampling stopped at 1.9 deg (a one-pixel rule), 1.12 deg at
    0.94 deg (this rule) and 1.09 deg at 0.47 deg, an order that costs twice the time."""
    return 360.0 * options.pixel_size / (2 * math.pi * options.particle_diameter_angst)


def update_auto_sampling(
    state: AutoRefineState,
    options: AutoSamplingOptions,
    *,
    resolution_shell: int,
    resolution_angst: float,
    changes: HiddenChanges,
    acc_rot_deg: float,
    acc_trans_angst: float,
) -> AutoRefineState:
    """The state after an iteration, by RELION's auto-refine rules (relion5-conventions §7.2).

    In order: (1) the resolution counter (reset when ``resolution_shell`` beats the best so
    far); (2) the smallest changes so far and the stability counter: the changes are small
    when classes are within 3% of their smallest, and offsets and orientations each within
    3% of theirs or below 40% of the current (finest) step; (3) the sampling is fine enough
    once its finest step < 0.75 ``acc_rot_deg``, < :func:`half_pixel_step_deg` or at
    ``max_healpix_order``;
    (4) convergence: fine enough, no resolution gain for >= 1 iteration, and stable for >= 1
    iteration (or ``auto_ignore_angles``); (5) otherwise, if not fine enough, the sampling
    gets finer when (a) no resolution gain for >= 1 iteration, or with ``auto_resol_angles``
    (unless the next order starts local searches) the step ``360 / ceil(pi D / res)`` needed
    at the current resolution is finer than the current one, and (b) ``auto_ignore_angles``
    or stable for >= 1 iteration: order + 1; offset step ``min(1.5 px, 0.75 acc_trans)
    2^oversampling``, at least half the previous; range ``3 x`` the RMS offset change, at
    most 1.3 x the previous range, at least 1.5 steps, halved if over 4 steps; local searches
    from ``auto_local_healpix_order``. Refining resets both counters and the smallest changes.
    """
    s = state
    if resolution_shell > s.best_resolution_shell:
        s = dataclasses.replace(s, best_resolution_shell=resolution_shell)
        s = dataclasses.replace(s, iter_without_resolution_gain=0)
    else:
        s = dataclasses.replace(s, iter_without_resolution_gain=s.iter_without_resolution_gain + 1)
    smallest = HiddenChanges(
        *(min(a, b) for a, b in zip(_values(changes), _values(s.smallest_changes), strict=True))
    )
    small = _is_small(changes, smallest, s.step_deg(options), s.offset_step_angst)
    s = dataclasses.replace(
        s,
        smallest_changes=smallest,
        iter_without_changes=s.iter_without_changes + 1 if small else 0,
        acc_rot_deg=float(acc_rot_deg),
        acc_trans_angst=float(acc_trans_angst),
    )
    fine = (
        s.fine_enough
        or s.step_deg(options) < 0.75 * acc_rot_deg
        or s.step_deg(options) < half_pixel_step_deg(options)
        or s.healpix_order >= options.max_healpix_order
    )
    s = dataclasses.replace(s, fine_enough=fine)
    stable = options.auto_ignore_angles or s.iter_without_changes >= 1
    if fine and s.iter_without_resolution_gain >= 1 and stable:
        return dataclasses.replace(s, converged=True)
    if fine:
        return s
    rule_a = s.iter_without_resolution_gain >= 1
    if options.auto_resol_angles and s.healpix_order + 1 < options.auto_local_healpix_order:
        needed = 360.0 / math.ceil(math.pi * options.particle_diameter_angst / resolution_angst)
        rule_a = rule_a or needed < s.step_deg(options)
    if not (rule_a and stable):
        return s
    px = options.pixel_size
    step = min(1.5 * px, 0.75 * acc_trans_angst) * 2**options.oversampling
    step = max(step, 0.5 * s.offset_step_angst)
    rng = min(3 * changes.offsets_angst, 1.3 * s.offset_range_angst)
    rng = max(rng, 1.5 * step)
    if rng > 4 * step:
        rng /= 2
    order = s.healpix_order + 1
    return dataclasses.replace(
        s,
        healpix_order=order,
        offset_step_angst=step,
        offset_range_angst=rng,
        local_searches=s.local_searches or order >= options.auto_local_healpix_order,
        iter_without_resolution_gain=0,
        iter_without_changes=0,
        smallest_changes=HiddenChanges(),
    )


def _values(c: HiddenChanges) -> tuple[float, float, float]:
    return (c.orientations_deg, c.offsets_angst, c.classes)


def hidden_variable_changes(
    rotations: torch.Tensor,
    offsets: torch.Tensor,
    classes: torch.Tensor,
    results: ParticleResults,
) -> HiddenChanges:
    """Changes from the previous best poses ``rotations`` ``(N, 3, 3)``, ``offsets``
    ``(N, 3)`` Å and ``classes`` ``(N,)`` (rows in ``results.index`` order) to ``results``."""
    ang = rotation_angle_deg(results.rotations.double(), rotations.double())
    d = results.offsets.double() - offsets.double()
    return HiddenChanges(
        orientations_deg=float(ang.mean()),
        offsets_angst=float(torch.sqrt((d**2).sum(-1).mean())),
        classes=float((results.classes != classes).double().mean()),
    )


def current_image_size(
    fsc: torch.Tensor,
    ssnr: torch.Tensor,
    box: int,
    previous_size: int,
    incr_size: int,
    mean_pmax: float,
) -> int:
    """``rlnCurrentImageSize`` for the next iteration (§7.2).

    ``fsc``/``ssnr`` ``(n//2+1,)``. When ``mean_pmax > 0.1`` and the FSC at the current limit
    (shell ``previous_size // 2 - 1``, the last one reconstructed) exceeds 0.2, the size grows
    by 25% of the box; otherwise it
    is ``2 (shell + incr)`` with the resolution shell of :func:`~subtomo.fourier.resolution.
    ssnr_resolution_shell` and ``incr = max(incr_size, shell(FSC < 0.143) - shell(FSC < 0.5) + 5)``.
    Even, at most ``box``.
    """
    limit = min(previous_size // 2 - 1, fsc.shape[-1] - 1)
    if mean_pmax > 0.1 and float(fsc[limit]) > 0.2:
        size = previous_size + 2 * math.ceil(box / 8)
    else:
        shell = ssnr_resolution_shell(ssnr)
        incr = max(incr_size, _first_below(fsc, 0.143) - _first_below(fsc, 0.5) + 5)
        size = 2 * (shell + incr)
    return min(box, size)


def _first_below(fsc: torch.Tensor, threshold: float) -> int:
    """First shell > 0 where ``fsc < threshold`` (the last shell if none)."""
    below = (fsc[1:] < threshold).nonzero()
    return int(below[0]) + 1 if below.numel() else fsc.shape[-1] - 1


def join_shell(box: int, pixel_size: float, join_angst: float, resolution_angst: float) -> int:
    """Last shell joined at low resolution: up to ``1 / max(join_angst, resolution_angst)``
    (``--low_resol_join_halves``; 0 when ``join_angst <= 0``)."""
    if join_angst <= 0:
        return 0
    return int(box * pixel_size / max(join_angst, resolution_angst))


def join_low_resolution(acc1: FourierAccumulator, acc2: FourierAccumulator, shell: int) -> None:
    """Average the data and weights of two half-set accumulators (in place) at all
    frequencies ``|k| <= shell`` (Fourier pixels of the box)."""
    if shell <= 0:
        return
    n = acc1.padded
    inside = radius_grid((n, n, n), device=acc1.device) <= shell * n / acc1.box
    for name in ("data", "weight"):
        a, b = getattr(acc1, name), getattr(acc2, name).to(acc1.device)
        mean = 0.5 * (a + b)
        setattr(acc1, name, torch.where(inside, mean, a))
        setattr(acc2, name, torch.where(inside, mean, b).to(acc2.device))


def halfset_fsc(
    half1: torch.Tensor, half2: torch.Tensor, current_size: int | None = None
) -> torch.Tensor:
    """Gold-standard FSC ``(n//2+1,)`` float64 of the unregularised half maps (zyx, centre
    ``n//2``; reconstructed with ``max_radius = current_size // 2``, see
    :func:`~subtomo.reconstruct.reconstruct`), zero from shell ``current_size // 2`` on."""
    fsc = fsc_maps(half1.double(), half2.double()).double().cpu()
    if current_size is not None:
        fsc[current_size // 2 :] = 0.0
    return fsc


def solvent_corrected_fsc(
    half1: torch.Tensor,
    half2: torch.Tensor,
    mask: torch.Tensor,
    unmasked: torch.Tensor,
    *,
    current_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``--solvent_correct_fsc`` (§7.3): the FSC ``(n//2+1,)`` float64 of the half maps (zyx,
    centre ``n//2``) inside ``mask``, corrected with phase-randomised halves. Phases are
    randomised from the first shell where the ``unmasked`` FSC < 0.8,
    ``FSC_true = (FSC_m - FSC_rand) / (1 - FSC_rand)`` from two shells beyond, zero beyond
    ``current_size // 2``."""
    n = half1.shape[-1]
    m = mask.to(half1).double()
    masked = fsc_maps(half1.double(), half2.double(), m).double().cpu()
    try:
        shell = randomize_shell(unmasked, n, 1.0)
    except ValueError:  # correlated up to Nyquist: nothing to randomise
        return masked
    shape = (n, n, n)
    rand = [
        irfft_centered(
            randomize_phases_beyond(rfft_centered(h.double(), 3), shape, shell, generator), shape
        )
        for h in (half1, half2)
    ]
    true = corrected_fsc(masked, fsc_maps(rand[0], rand[1], m).double().cpu(), shell)
    if current_size is not None:
        true = torch.where(torch.arange(true.shape[0]) > current_size // 2, 0.0, true)
    return true


def refinement_mask(
    half1: torch.Tensor, half2: torch.Tensor, pixel_size: float, sphere: torch.Tensor
) -> torch.Tensor:
    """Loose solvent mask ``(n, n, n)`` for the gold-standard FSC: the average of the two half
    maps low-passed to ``max(20 Å, 4 px)``, binarised at its histogram's Otsu threshold,
    extended 3 px with a 6 px soft edge (:func:`~subtomo.masks.automatic_mask`), within the
    particle ``sphere``. Built from both halves at low resolution only, so the halves stay
    independent where the FSC is decided; the phase-randomised FSC removes what the mask
    itself correlates (:func:`solvent_corrected_fsc`)."""
    average = lowpass_map(0.5 * (half1.double() + half2.double()), max(20.0, 4 * pixel_size),
                          pixel_size)  # fmt: skip
    return automatic_mask(average.float()) * sphere.to(average.device).float()


def gold_standard_spectra(
    fsc: torch.Tensor, weight: torch.Tensor, tau2_fudge: float, *, joined: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """tau2 and SSNR ``(n//2+1,)`` from the half-set FSC (§7.1).

    ``weight`` the mean reconstruction weight per shell (:func:`~subtomo.ml.mstep.
    weight_spectrum`, averaged over the halves); ``SSNR = T FSC/(1-FSC)`` (FSC clamped to
    [0.001, 0.999]), ``tau2 = SSNR / T / weight``. ``joined``: the final iteration with the
    halves combined uses ``sqrt(2 FSC / (1 + FSC))`` instead of the FSC.
    """
    f = fsc.double().clamp(min=0.0)
    if joined:
        f = torch.sqrt(2 * f / (1 + f))
    ssnr = ssnr_from_fsc(f, tau2_fudge)
    w = weight.double()
    tau2 = torch.where(w > 0, ssnr / tau2_fudge / w.clamp(min=1e-300), 0.0)
    return tau2, ssnr


#: ``-ln 0.01``: a pose error counts as resolved once the true pose is 100x more likely.
ACCURACY_LOG_ODDS = 4.60517
#: RELION's trial errors: (below this value, this step), for angles (deg) and shifts (px).
_ANGLE_STEPS = ((0.2, 0.05), (1.0, 0.1), (2.0, 0.2), (5.0, 0.5), (10.0, 1.0), (20.0, 2.0))
_SHIFT_STEPS = ((1.0, 0.1), (2.0, 0.2), (5.0, 0.5), (10.0, 1.0))


def accuracy_trials(steps: tuple[tuple[float, float], ...], last: float, cap: float) -> list[float]:
    """The errors RELION tries in turn: from 0, add the step of the first ``(limit, step)``
    whose limit exceeds the current value (``last`` beyond them) until past ``cap``; the final
    value, past ``cap``, is what a particle that never reaches the threshold gets."""
    value, out = 0.0, []
    while value <= cap:
        value += next((step for limit, step in steps if value < limit), last)
        out.append(value)
    return out


def expected_accuracies(
    model: MLModel,
    batch: ParticleBatch,
    *,
    padding: float = 2.0,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """``rlnAccuracyRotations`` (deg) and ``rlnAccuracyTranslationsAngst`` (Å) of class 1, as
    relion_refine estimates them.

    For each particle of ``batch`` at its current pose, one of its Euler angles (rot, tilt or
    psi, drawn at random) is increased by trial errors 0.05, 0.1, ... deg (steps 0.05 up to
    0.2, 0.1 to 1, 0.2 to 2, 0.5 to 5, 1 to 10, 2 to 20, then 5, summed in double precision
    as RELION does: 1.0, 1.1, 1.3, ...; 30.1 when 25.1 is not enough), and separately its
    offset along x, y or z (drawn at random) by 0.1, 0.2, ... pixels (steps 0.1 to 1, 0.2
    to 2, 0.5 to 5, then 1; 10.1 when 9.1 is not enough). The particle's
    error is the first trial at which the log-likelihood of the true pose beats the moved one
    by more than :data:`ACCURACY_LOG_ODDS` (``-ln 0.01``): ``sum_f sum_k CTF2 |P - P'|^2 /
    (2 sigma2) > 4.60517`` over shells ``1..current_size // 2`` of its visible tilt images
    (the engine's likelihood: ``CTF2`` is what the references are multiplied by). The
    accuracies are the means over particles, the translation in Å (pixels x pixel size).
    """
    device = model.references.device
    batch = batch.to(device)
    points = fourier_points(model.box, model.current_size // 2, device)
    projector = Projector(model.references[:1], padding)
    inv_sigma2 = 1 / model.sigma2.to(device)[batch.optics_group][:, points.shell].double()
    weight = points.gather(batch.ctf2).double() * batch.visible[..., None] * inv_sigma2[:, None]
    weight = weight * (points.shell > 0) / 2  # (b, f, K)
    tilts = batch.tilt_rotations.double()
    rot = batch.rotations.double()
    which = torch.randint(0, 3, (2, batch.size), generator=generator).to(device)
    p0 = projector.slices(0, tilts @ rot[:, None], points)  # (b, f, K)
    euler = matrix_to_euler(rot)
    angles = accuracy_trials(_ANGLE_STEPS, 5.0, 30.0)
    chi_rot = torch.stack(
        [_chi_turned(projector, tilts, euler, which[0], a, p0, points, weight) for a in angles], 1
    )
    shifts = accuracy_trials(_SHIFT_STEPS, 2.0, 10.0)
    axis = torch.nn.functional.one_hot(which[1], 3).double()  # (b, 3)
    trial = torch.tensor(shifts, dtype=torch.float64, device=device)
    offs = axis[:, None] * trial[:, None] * model.pixel_size  # (b, D, 3) Å
    s = projected_shifts_px(tilts, offs, model.pixel_size)  # (b, D, f, 2)
    phase = 2 * math.pi * (s @ points.freq.double().T)  # (b, D, f, K)
    diff2 = (2 - 2 * torch.cos(phase)) * p0.abs().double()[:, None] ** 2
    chi_tr = (weight[:, None] * diff2).sum((-1, -2))
    acc_rot = _first_past(chi_rot, angles)
    acc_trans = _first_past(chi_tr, shifts)
    return acc_rot, acc_trans * model.pixel_size


def _chi_turned(
    projector: Projector,
    tilts: torch.Tensor,
    euler: torch.Tensor,
    which: torch.Tensor,
    error_deg: float,
    p0: torch.Tensor,
    points: FourierPoints,
    weight: torch.Tensor,
) -> torch.Tensor:
    """``(b,)`` log-likelihood advantage of the poses ``euler`` ``(b, 3)`` over the same with
    ``error_deg`` added to angle ``which`` (0 rot, 1 tilt, 2 psi) of each particle."""
    moved = euler + error_deg * torch.nn.functional.one_hot(which, 3).double()
    turned = euler_to_matrix(moved[:, 0], moved[:, 1], moved[:, 2])
    p1 = projector.slices(0, tilts @ turned[:, None], points)  # (b, f, K)
    return (weight * (p1 - p0).abs().double() ** 2).sum((-1, -2))


def _first_past(chi: torch.Tensor, values: list[float]) -> float:
    """Mean over rows of the first of ``values`` where ``chi > ACCURACY_LOG_ODDS`` (the last,
    past-the-cap value where none is)."""
    past = chi.cpu() > ACCURACY_LOG_ODDS
    past[:, -1] = True
    return float(torch.tensor(values, dtype=torch.float64)[past.int().argmax(1)].mean())


@dataclass
class HalfSetIteration:
    """Outcome of one gold-standard iteration.

    ``models`` the two half models (the same model twice after the final, joined iteration,
    whose references are the merged map); ``results`` per-half particle results;
    ``fsc``/``ssnr``/``tau2`` ``(n//2+1,)``; ``half_maps`` the unregularised, unmasked half
    reconstructions ``(n, n, n)`` (``_half?_class001_unfil.mrc``); ``mean_pmax``
    ``rlnAveragePmax`` over both halves; ``log_likelihood`` summed over both halves.
    """

    models: tuple[MLModel, MLModel]
    results: tuple[ParticleResults, ParticleResults]
    fsc: torch.Tensor
    ssnr: torch.Tensor
    tau2: torch.Tensor
    half_maps: tuple[torch.Tensor, torch.Tensor]
    mean_pmax: float
    log_likelihood: float


def gold_standard_iteration(
    models: tuple[MLModel, MLModel],
    batches: tuple[Callable[[], Iterable[ParticleBatch]], Callable[[], Iterable[ParticleBatch]]],
    sampling: Sampling,
    params: EngineParams,
    *,
    final: bool = False,
    incr_size: int = 10,
    low_resol_join_angst: float = 40.0,
    solvent_correct_fsc: bool = False,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> HalfSetIteration:
    """One auto-refine iteration: each half's E-step against its own reference only, the
    half-set FSC, tau2 from it, the low-resolution join, the M-step per half and the next
    image size (§7.1-7.3).

    The FSC is always taken inside a mask and corrected by phase randomisation (§7.3):
    ``params.reference_mask`` with ``solvent_correct_fsc`` (RELION's
    ``--solvent_correct_fsc``), otherwise a loose mask found from the half maps themselves
    (:func:`refinement_mask`). RELION's default FSC of the whole box counts the noise of the
    solvent around the particle: on the D7 benchmark (a 150 Å particle in a 320 Å box) it
    put FSC 0.5 at 29 Å while the half maps inside the particle agreed to 19 Å, which held
    the image size, the regularisation and so the angular accuracy down.

    With ``params.auto_solvent_mask`` (and no ``reference_mask``) the next references are
    flattened with that loose mask instead of the particle sphere: the tau2 of the
    regularisation comes from the FSC inside the mask, so the references then carry the
    noise the FSC measured, not the solvent's around the particle. The final, joined map
    keeps the sphere, as RELION's does.

    ``batches[h]()`` yields the particles of half ``h + 1`` only. ``final``: every frequency
    up to Nyquist, posterior mean poses (``EngineParams.mean_poses``), sums on the box grid
    (``EngineParams.insert_padding`` 1), the halves' sums are
    joined and the FSC converted (§7.2), and the merged map is reconstructed. Sums are
    all-reduced per half (torch.distributed).
    """
    if final:
        models = tuple(dataclasses.replace(m, current_size=m.box) for m in models)
        params = dataclasses.replace(params, mean_poses=True, insert_padding=1.0)
    sums, results = [], []
    for model, make in zip(models, batches, strict=True):
        s, r = expectation_pass(model, make(), sampling, params, device=device)
        s.all_reduce()
        sums.append(s)
        results.append(r.all_gathered())
    # the point group is applied here once, so maximise must not apply it again
    if sampling.symmetry.upper() != "C1":
        sym = symmetry_matrices(sampling.symmetry)
        for s in sums:
            for acc in s.accumulators:
                acc.symmetrise(sym.to(acc.device))
    c1 = dataclasses.replace(sampling, symmetry="C1")
    acc1, acc2 = sums[0].accumulators[0], sums[1].accumulators[0]
    current = models[0].current_size
    half_maps = tuple(reconstruct(a, taper=0, max_radius=current // 2) for a in (acc1, acc2))
    fsc = halfset_fsc(*half_maps, current)
    n, px = models[0].box, models[0].pixel_size
    if solvent_correct_fsc and params.reference_mask is not None:
        fsc_mask = params.reference_mask
    else:
        fsc_mask = refinement_mask(*half_maps, px, particle_sphere(params, n, px))
    fsc = solvent_corrected_fsc(
        *half_maps, fsc_mask, fsc, current_size=current, generator=generator
    )
    weight = 0.5 * (weight_spectrum(acc1) + weight_spectrum(acc2)).cpu()
    tau2, ssnr = gold_standard_spectra(fsc, weight, params.tau2_fudge, joined=final)
    n_part = sums[0].n_particles + sums[1].n_particles
    mean_pmax = float(sums[0].pmax + sums[1].pmax) / max(n_part, 1)
    loglik = float(sums[0].log_likelihood + sums[1].log_likelihood)
    if final:
        merged = _merged_sums(sums[0], sums[1])
        model = maximise(models[0], merged, params, c1, tau2=tau2[None], ssnr=ssnr[None])
        model = dataclasses.replace(model, current_size=n)
        return HalfSetIteration(
            (model, model), tuple(results), fsc, ssnr, tau2, half_maps, mean_pmax, loglik
        )
    previous = ssnr_resolution_shell(models[0].ssnr) if models[0].ssnr is not None else 1
    shell = join_shell(n, px, low_resol_join_angst, n * px / max(previous, 1))
    join_low_resolution(acc1, acc2, shell)
    size = current_image_size(fsc, ssnr, n, models[0].current_size, incr_size, mean_pmax)
    if params.auto_solvent_mask and params.reference_mask is None:
        params = dataclasses.replace(params, reference_mask=fsc_mask.to(acc1.device))
    new = tuple(
        dataclasses.replace(
            maximise(m, s, params, c1, tau2=tau2[None], ssnr=ssnr[None]), current_size=size
        )
        for m, s in zip(models, sums, strict=True)
    )
    return HalfSetIteration(new, tuple(results), fsc, ssnr, tau2, half_maps, mean_pmax, loglik)


def _merged_sums(a: MStepSums, b: MStepSums) -> MStepSums:
    """The sums of both halves together (the final, joined iteration)."""
    return MStepSums(
        accumulators=[
            x.merged_with(y) for x, y in zip(a.accumulators, b.accumulators, strict=True)
        ],
        sigma2_num=a.sigma2_num + b.sigma2_num,
        sigma2_den=a.sigma2_den + b.sigma2_den,
        class_weight=a.class_weight + b.class_weight,
        offset2=a.offset2 + b.offset2,
        offset_weight=a.offset_weight + b.offset_weight,
        log_likelihood=a.log_likelihood + b.log_likelihood,
        pmax=a.pmax + b.pmax,
        n_particles=a.n_particles + b.n_particles,
    )


def with_poses(batch: ParticleBatch, results: ParticleResults) -> ParticleBatch:
    """``batch`` with the rotations, offsets and classes of ``results`` (matched by index)."""
    order = torch.argsort(results.index)
    pos = order[torch.searchsorted(results.index[order], batch.index.cpu())]
    if not torch.equal(results.index[pos], batch.index.cpu()):
        raise ValueError("results do not cover every particle of the batch")
    dev = batch.data.device
    return dataclasses.replace(
        batch,
        rotations=results.rotations[pos].to(dev, batch.rotations.dtype),
        offsets=results.offsets[pos].to(dev, batch.offsets.dtype),
        classes=results.classes[pos].to(dev),
    )


def _head(batch: ParticleBatch, m: int) -> ParticleBatch:
    """The first ``m`` particles of ``batch``."""
    return dataclasses.replace(
        batch,
        **{
            f.name: getattr(batch, f.name)[:m]
            for f in dataclasses.fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor)
        },
    )


class _Recorder:
    """Passes batches through, keeping their poses (and a few particles of the first)."""

    def __init__(self, keep: int) -> None:
        self.keep, self.sample = keep, None
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, batches: Iterable[ParticleBatch]) -> Iterable[ParticleBatch]:
        for b in batches:
            if self.sample is None:
                self.sample = _head(b, self.keep).to("cpu")
            self.parts.append((b.index.cpu(), b.rotations.cpu(), b.offsets.cpu(), b.classes.cpu()))
            yield b

    def poses(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(index, rotations, offsets, classes) of each batch passed through."""
        return self.parts


def _gathered_poses(
    recorders: tuple[_Recorder, _Recorder],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input (index, rotations, offsets, classes) of every particle of the iteration, over
    both halves and all ranks (torch.distributed)."""
    local = [part for r in recorders for part in r.poses()]
    parts = [part for rank_parts in all_gather_object(local) for part in rank_parts]
    return tuple(torch.cat(x) for x in zip(*parts, strict=True))  # type: ignore[return-value]


#: Called after every iteration with (iteration outcome, state for the next one).
IterationCallback = Callable[[HalfSetIteration, AutoRefineState], None]


def auto_refine(
    models: tuple[MLModel, MLModel],
    batches: tuple[Callable[[], Iterable[ParticleBatch]], Callable[[], Iterable[ParticleBatch]]],
    options: AutoSamplingOptions,
    params: EngineParams,
    *,
    state: AutoRefineState | None = None,
    results: tuple[ParticleResults, ParticleResults] | None = None,
    low_resol_join_angst: float = 40.0,
    solvent_correct_fsc: bool = False,
    max_iterations: int = 50,
    on_iteration: IterationCallback | None = None,
    device: torch.device | str | None = None,
) -> HalfSetIteration:
    """Gold-standard 3D auto-refine until convergence, then the final joined iteration.

    ``batches[h]()`` yields the particles of half ``h + 1`` with their input poses; after
    each iteration the poses of ``results`` replace them (:func:`with_poses`). Resuming:
    pass the ``models``, ``state`` and ``results`` saved by ``on_iteration`` (the run is
    deterministic: the same seed gives the same result). After ``max_iterations`` without
    convergence the final iteration is forced. Returns the final iteration.
    """
    state = state or AutoRefineState.initial(options)
    while True:
        final = state.converged or models[0].iteration >= max_iterations
        recorders = (_Recorder(8), _Recorder(8))
        makers = tuple(
            _feeder(make, rec, None if results is None else results[h])
            for h, (make, rec) in enumerate(zip(batches, recorders, strict=True))
        )
        gen = torch.Generator().manual_seed(params.seed * 1_000_003 + models[0].iteration)
        it = gold_standard_iteration(
            models,
            makers,
            state.sampling(options),
            params,
            final=final,
            incr_size=options.incr_size,
            low_resol_join_angst=low_resol_join_angst,
            solvent_correct_fsc=solvent_correct_fsc,
            device=device,
            generator=gen,
        )
        if final:
            state = dataclasses.replace(state, converged=True)
            if on_iteration is not None:
                on_iteration(it, state)
            return it
        index, rot, off, cls = _gathered_poses(recorders)
        new = torch.cat([it.results[0].index, it.results[1].index])
        previous = ParticleResults.concat(list(it.results))
        order = torch.argsort(index)
        pos = order[torch.searchsorted(index[order], new)]
        changes = hidden_variable_changes(rot[pos], off[pos], cls[pos], previous)
        acc_rot, acc_trans = expected_accuracies(
            it.models[0],
            broadcast_object(recorders[0].sample),  # rank 0 holds the first batch
            padding=params.padding,
            generator=torch.Generator().manual_seed(params.seed + it.models[0].iteration),
        )
        n, px = it.models[0].box, it.models[0].pixel_size
        shell = ssnr_resolution_shell(it.ssnr)
        state = update_auto_sampling(
            state,
            options,
            resolution_shell=shell,
            resolution_angst=n * px / shell,
            changes=changes,
            acc_rot_deg=acc_rot,
            acc_trans_angst=acc_trans,
        )
        models, results = it.models, it.results
        if on_iteration is not None:
            on_iteration(it, state)


def _feeder(
    make: Callable[[], Iterable[ParticleBatch]],
    recorder: _Recorder,
    results: ParticleResults | None,
) -> Callable[[], Iterable[ParticleBatch]]:
    def batches() -> Iterable[ParticleBatch]:
        source = make() if results is None else (with_poses(b, results) for b in make())
        return recorder(source)

    return batches
