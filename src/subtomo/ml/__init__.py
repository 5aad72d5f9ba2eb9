"""The ML engine: RELION's regularised likelihood optimisation for tilt-series particles.

One engine serves 3D classification, 3D auto-refine and the initial model. A particle is its
set of premultiplied 2D tilt images (:class:`ParticleBatch`); the E-step scores every
(class, rotation, 3D offset) as dense batched matrix products (:mod:`.likelihood`,
:mod:`.estep`), the M-step inserts the probability-weighted data into per-class Fourier
accumulators and updates noise spectra, signal power, class priors and the offset prior
(:mod:`.mstep`); :func:`iterate` runs one iteration over batches (:mod:`.engine`).
"""

from subtomo.ml.batch import FourierPoints, ParticleBatch, fourier_points
from subtomo.ml.engine import (
    EngineParams,
    ParticleResults,
    expectation_pass,
    iterate,
    maximise,
)
from subtomo.ml.estep import EStepResult, expectation, score_batch
from subtomo.ml.likelihood import centred_data, pose_scores, projected_shifts_px
from subtomo.ml.model import MLModel, reference_tau2
from subtomo.ml.mstep import MStepSums, accumulate, initial_sigma2
from subtomo.ml.projector import Projector
from subtomo.ml.sampling import PoseGrid, Sampling, pose_grid, translation_grid

__all__ = [
    "EStepResult",
    "EngineParams",
    "FourierPoints",
    "MLModel",
    "MStepSums",
    "ParticleBatch",
    "ParticleResults",
    "PoseGrid",
    "Projector",
    "Sampling",
    "accumulate",
    "centred_data",
    "expectation",
    "expectation_pass",
    "fourier_points",
    "initial_sigma2",
    "iterate",
    "maximise",
    "pose_grid",
    "pose_scores",
    "projected_shifts_px",
    "reference_tau2",
    "score_batch",
    "translation_grid",
]
