"""relion_refine's per-iteration outputs (relion5-conventions §7.4) and the resume checkpoint.

File names follow RELION: ``<root>_itNNN_data.star``, ``_model.star`` (``_half1_model.star``
and ``_half2_model.star`` in auto-refine), ``_optimiser.star``, ``_sampling.star``,
``_classNNN.mrc`` (``_half1_class001.mrc``), ``_optimisation_set.star``; final files drop
``_itNNN``. Beside each optimiser file a ``_checkpoint.pt`` (``torch.save`` of plain dicts and
tensors, written atomically) holds the exact state, so that ``--continue`` from that
optimiser file reproduces the uninterrupted run bit for bit; the STAR files are for people
and other programs (their text values are rounded).

Spectra in ``model_class_N``/``model_optics_group_N`` are per shell ``0..n//2`` of the
original box, in the engine's units (:mod:`subtomo.ml.model`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from subtomo.data import ParticleSet, relative_to_cwd
from subtomo.errors import InputError
from subtomo.fourier.resolution import ssnr_resolution_shell
from subtomo.geometry import matrix_to_euler
from subtomo.io import atomic_path, write_star
from subtomo.ml.loader import ParticleState
from subtomo.ml.model import MLModel
from subtomo.ml.sampling import Sampling

__all__ = [
    "IterationFiles",
    "classification_optimiser_values",
    "estimated_resolution_angst",
    "load_checkpoint",
    "save_checkpoint",
    "write_data_star",
    "write_model_star",
    "write_optimiser_star",
    "write_sampling_star",
]

_OPTIMISER_RE = re.compile(r"^(?P<root>.+)_it(?P<it>\d{3,})_optimiser\.star$")


@dataclass(frozen=True)
class IterationFiles:
    """The output files of one iteration: ``<directory>/<root>_itNNN_*`` (``iteration`` None:
    the final ``<root>_*``)."""

    directory: Path
    iteration: int | None
    root: str = "run"

    @classmethod
    def from_optimiser(cls, path: str | os.PathLike) -> IterationFiles:
        """The files of the iteration whose ``_optimiser.star`` is ``path``."""
        path = Path(path)
        m = _OPTIMISER_RE.match(path.name)
        if m is None:
            raise InputError("expected a <root>_itNNN_optimiser.star file", file=path)
        return cls(path.parent, int(m.group("it")), m.group("root"))

    @classmethod
    def resume_point(cls, path: str | os.PathLike) -> IterationFiles:
        """The iteration ``--continue path`` resumes after: ``path`` an ``_itNNN_optimiser.star``
        or a job directory, whose last complete iteration is taken. An iteration is complete
        once its optimiser file and checkpoint exist (both are written last, atomically), so
        an iteration cut short by a kill is never picked."""
        path = Path(path)
        if path.is_dir():
            found = [cls.from_optimiser(p) for p in path.glob("*_it*_optimiser.star")
                     if _OPTIMISER_RE.match(p.name)]  # fmt: skip
            done = [f for f in found if f.checkpoint.is_file()]
            if not done:
                raise InputError("no complete iteration (optimiser file + checkpoint) here",
                                 file=path)  # fmt: skip
            return max(done, key=lambda f: f.iteration or 0)
        if not path.is_file():
            raise InputError("no such optimiser file or job directory", file=path)
        files = cls.from_optimiser(path)
        if not files.checkpoint.is_file():
            raise InputError("this iteration is incomplete (no checkpoint beside it)", file=path)
        return files

    @property
    def prefix(self) -> str:
        it = "" if self.iteration is None else f"_it{self.iteration:03d}"
        return f"{self.root}{it}"

    def _file(self, suffix: str) -> Path:
        return self.directory / f"{self.prefix}_{suffix}"

    @property
    def data(self) -> Path:
        return self._file("data.star")

    @property
    def optimiser(self) -> Path:
        return self._file("optimiser.star")

    @property
    def sampling(self) -> Path:
        return self._file("sampling.star")

    @property
    def optimisation_set(self) -> Path:
        return self._file("optimisation_set.star")

    @property
    def checkpoint(self) -> Path:
        return self._file("checkpoint.pt")

    def model(self, half: int | None = None) -> Path:
        return self._file("model.star" if half is None else f"half{half}_model.star")

    def class_map(self, cls: int, half: int | None = None) -> Path:
        """``_classNNN.mrc`` of the 0-based class ``cls`` (``_halfH_classNNN.mrc``)."""
        h = "" if half is None else f"half{half}_"
        return self._file(f"{h}class{cls + 1:03d}.mrc")


def write_data_star(path: str | os.PathLike, particles: ParticleSet, state: ParticleState) -> None:
    """``_data.star``: the input blocks with the current poses and E-step statistics.

    Sets rlnAngleRot/Tilt/Psi (from ``A_part``), rlnOriginX/Y/ZAngst, rlnClassNumber
    (1-based), rlnLogLikeliContribution, rlnMaxValueProbDistribution,
    rlnNrOfSignificantSamples and rlnNormCorrection (1: no norm correction); other columns are
    kept.
    """
    table = particles.particles.copy()
    angles = matrix_to_euler(state.rotations.double()).numpy()
    for j, name in enumerate(("Rot", "Tilt", "Psi")):
        table[f"rlnAngle{name}"] = angles[:, j]
    offsets = state.offsets.double().numpy()
    for j, axis in enumerate("XYZ"):
        table[f"rlnOrigin{axis}Angst"] = offsets[:, j]
    table["rlnClassNumber"] = state.classes.numpy() + 1
    table["rlnNormCorrection"] = 1.0
    table["rlnLogLikeliContribution"] = state.log_likelihood.double().numpy()
    table["rlnMaxValueProbDistribution"] = state.pmax.double().numpy()
    table["rlnNrOfSignificantSamples"] = state.n_significant.numpy()
    ParticleSet(table, particles.optics, particles.general, path=particles.path).write(path)


def estimated_resolution_angst(ssnr: torch.Tensor, box: int, pixel_size: float) -> torch.Tensor:
    """rlnEstimatedResolution ``(K,)`` Å: the last shell before the SSNR first drops below 1
    (999 when already shell 1 is below 1)."""
    out = torch.full((ssnr.shape[0],), 999.0, dtype=torch.float64)
    for c, row in enumerate(ssnr):
        below = (row[1:] < 1).nonzero()
        shell = int(below[0]) if below.numel() else row.shape[0] - 1
        if shell > 0:
            out[c] = box * pixel_size / shell
    return out


def _shell_table(box: int, pixel_size: float) -> dict[str, np.ndarray]:
    s = np.arange(box // 2 + 1)
    freq = s / (box * pixel_size)
    return {
        "rlnSpectralIndex": s,
        "rlnResolution": freq,
        "rlnAngstromResolution": np.where(s > 0, 1.0 / np.maximum(freq, 1e-30), 999.0),
    }


def write_model_star(
    path: str | os.PathLike,
    model: MLModel,
    reference_images: Sequence[str],
    *,
    padding: float,
    tau2_fudge: float,
    sampling: Sampling,
    log_likelihood: float,
    average_pmax: float,
    particles_per_group: Sequence[int],
    group_names: Sequence[str] | None = None,
    fsc: torch.Tensor | None = None,
    accuracies: tuple[float, float] | None = None,
) -> None:
    """``_model.star`` (or one half's) with the tables of §7.4.

    ``model_general``, ``model_classes``, ``model_class_N`` (SSNR, tau2, the half-set
    ``fsc`` ``(K, n//2+1)`` when given, else 0), ``model_optics_group_N`` (sigma2) and
    ``model_groups`` (one group per optics group, scale 1). rlnAccuracyRotations and
    rlnAccuracyTranslationsAngst are ``accuracies`` (deg, Å; auto-refine's estimates) or else
    the sampling steps;
    rlnReferenceSigma2 is ``T tau2 / SSNR`` (1 / mean reconstruction weight) where the SSNR
    is positive; rlnFourierCompleteness is 1 in shells with SSNR >= 1 (shell-wise, not
    voxel-wise as RELION) and rlnOverallFourierCompleteness their fraction up to the current
    size.
    """
    n, px, k = model.box, model.pixel_size, model.n_classes
    ssnr = model.ssnr if model.ssnr is not None else torch.zeros(k, n // 2 + 1)
    ssnr = ssnr.double().cpu()
    has_ssnr = bool((ssnr > 0).any())
    current_res = ssnr_resolution_shell(ssnr) / (n * px) if has_ssnr else 0.0
    local = sampling.align and sampling.local_sigma_deg is not None
    sigma_ang = float(sampling.local_sigma_deg) if local else 0.0
    general = {
        "rlnReferenceDimensionality": 3,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": n,
        "rlnCurrentResolution": current_res,
        "rlnCurrentImageSize": model.current_size,
        "rlnPaddingFactor": padding,
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": px,
        "rlnNrClasses": k,
        "rlnNrBodies": 1,
        "rlnNrGroups": len(particles_per_group),
        "rlnNrOpticsGroups": model.sigma2.shape[0],
        "rlnTau2FudgeFactor": tau2_fudge,
        "rlnNormCorrectionAverage": 1.0,
        "rlnSigmaOffsetsAngst": model.sigma_offset_angst,
        "rlnOrientationalPriorMode": int(local),
        "rlnSigmaPriorRotAngle": sigma_ang,
        "rlnSigmaPriorTiltAngle": sigma_ang,
        "rlnSigmaPriorPsiAngle": sigma_ang,
        "rlnLogLikelihood": log_likelihood,
        "rlnAveragePmax": average_pmax,
    }
    acc_rot, acc_trans = accuracies or (
        (sampling.step_deg, sampling.offset_step_angst) if sampling.align else (999.0, 999.0)
    )
    max_shell = model.current_size // 2
    complete = (ssnr >= 1).double()
    overall = complete[:, 1 : max_shell + 1].mean(1) if max_shell > 0 else complete[:, 0]
    classes = pd.DataFrame(
        {
            "rlnReferenceImage": list(reference_images),
            "rlnClassDistribution": model.class_priors.double().cpu().numpy(),
            "rlnAccuracyRotations": acc_rot,
            "rlnAccuracyTranslationsAngst": acc_trans,
            "rlnEstimatedResolution": estimated_resolution_angst(ssnr, n, px).numpy(),
            "rlnOverallFourierCompleteness": overall.numpy(),
        }
    )
    blocks: dict[str, pd.DataFrame | dict] = {"model_general": general, "model_classes": classes}
    shells = _shell_table(n, px)
    tau2 = model.tau2.double().cpu()
    sigma2_ref = torch.where(
        ssnr > 0, tau2_fudge * tau2 / ssnr.clamp(min=1e-300), torch.zeros_like(ssnr)
    )
    for c in range(k):
        blocks[f"model_class_{c + 1}"] = pd.DataFrame(
            {
                **shells,
                "rlnSsnrMap": ssnr[c].numpy(),
                "rlnGoldStandardFsc": (
                    fsc[c].double().cpu().numpy() if fsc is not None else np.zeros(n // 2 + 1)
                ),
                "rlnFourierCompleteness": complete[c].numpy(),
                "rlnReferenceSigma2": sigma2_ref[c].numpy(),
                "rlnReferenceTau2": tau2[c].numpy(),
            }
        )
    sigma2 = model.sigma2.double().cpu()
    for g in range(sigma2.shape[0]):
        blocks[f"model_optics_group_{g + 1}"] = pd.DataFrame(
            {**shells, "rlnSigma2Noise": sigma2[g].numpy()}
        )
    names = group_names or [f"group_{g + 1}" for g in range(len(particles_per_group))]
    blocks["model_groups"] = pd.DataFrame(
        {
            "rlnGroupNumber": np.arange(1, len(particles_per_group) + 1),
            "rlnGroupName": list(names),
            "rlnGroupNrParticles": list(particles_per_group),
            "rlnGroupScaleCorrection": 1.0,
        }
    )
    write_star(path, blocks)


def classification_optimiser_values(
    iteration: int, n_iterations: int, seed: int, tau2_fudge: float, diameter_angst: float
) -> dict[str, Any]:
    """The ``optimiser_general`` values Class3D and initial-model share (no halves, no
    auto-refine), in RELION's order; each job adds its own after them."""
    return {
        "rlnCurrentIteration": iteration,
        "rlnNumberOfIterations": n_iterations,
        "rlnDoSplitRandomHalves": 0,
        "rlnDoAutoRefine": 0,
        "rlnRandomSeed": seed,
        "rlnTau2FudgeFactor": tau2_fudge,
        "rlnParticleDiameter": diameter_angst,
    }


def write_optimiser_star(
    path: str | os.PathLike,
    files: IterationFiles,
    values: Mapping[str, Any],
) -> None:
    """``_optimiser.star``: ``optimiser_general`` with rlnOutputRootName,
    rlnModelStarFile (half 1's when ``rlnDoSplitRandomHalves`` is 1, as RELION),
    rlnExperimentalDataStarFile, rlnOrientSamplingStarFile and the given ``values`` (RELION
    labels, e.g. rlnCurrentIteration, rlnChangesOptimalOrientations, rlnHasConverged)."""
    halves = bool(values.get("rlnDoSplitRandomHalves", 0))
    block = {
        "rlnOutputRootName": relative_to_cwd(files.directory / files.root),
        "rlnModelStarFile": relative_to_cwd(files.model(1 if halves else None)),
        "rlnExperimentalDataStarFile": relative_to_cwd(files.data),
        "rlnOrientSamplingStarFile": relative_to_cwd(files.sampling),
        **values,
    }
    if halves:
        block.setdefault("rlnModelStarFile2", relative_to_cwd(files.model(2)))
    write_star(path, {"optimiser_general": block})


def write_sampling_star(path: str | os.PathLike, sampling: Sampling, pixel_size: float) -> None:
    """``_sampling.star``: ``sampling_general`` (HEALPix order, symmetry, offsets in pixels)."""
    block = {
        "rlnIs3DSampling": 1,
        "rlnIs3DTranslationalSampling": 1,
        "rlnHealpixOrder": sampling.healpix_order,
        "rlnSymmetryGroup": sampling.symmetry,
        "rlnTiltAngleLimit": -91.0,
        "rlnPsiStep": sampling.step_deg,
        "rlnOffsetRange": sampling.offset_range_angst / pixel_size,
        "rlnOffsetStep": sampling.offset_step_angst / pixel_size,
        "rlnHelicalOffsetStep": -1.0,
        "rlnSamplingPerturbInstance": 0.0,
        "rlnSamplingPerturbFactor": 0.0,
    }
    write_star(path, {"sampling_general": block})


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """``torch.save`` of ``state`` (plain dicts, lists, numbers, strings and CPU tensors),
    atomically."""
    with atomic_path(Path(path)) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state written by :func:`save_checkpoint` (``InputError`` if missing/unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            "no checkpoint beside the optimiser file (written by subtomo each iteration)",
            file=path,
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise InputError(f"cannot read the checkpoint: {exc}", file=path) from None
