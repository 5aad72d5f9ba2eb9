"""The ground-truth simulator: tilt series and the RELION 5 tables that describe them.

:func:`simulate` places particles (known species, poses and positions) in tomograms, builds
the tilt geometry, CTF and dose of every tilt, and renders the tilt images one tilt series at a
time (:meth:`Simulation.tilt_series`). Everything follows relion5-conventions.md §1-2 and §4,
so RELION reading the tables reconstructs the true map from the images. Tables use RELION's
column names; file names (rlnMicrographName, rlnTomoTiltSeriesStarFile) are added by the job.

Randomness: a ``numpy.random.SeedSequence(seed)`` spawns one generator for the layout and
geometry (numpy, device-independent) and one torch CPU generator per tilt series for the
noise, so a seed gives the same data on every run and device (up to float rounding).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from subtomo.ctf import ice_scale
from subtomo.data import Trajectories
from subtomo.device import resolve_device
from subtomo.errors import InputError
from subtomo.geometry import (
    alignment_from_projection_matrices,
    project_particles,
    projection_matrices,
)
from subtomo.io import format_vector
from subtomo.simulate.acquisition import alignment_errors, ctf_errors, tilt_defocus, tilt_scheme
from subtomo.simulate.imaging import (
    Optics,
    TiltGeometry,
    add_noise,
    particle_pixel_mask,
    render_tilt_series,
)
from subtomo.simulate.layout import (
    euler_deg,
    random_layout,
    random_rotations,
    rotations_by_angle,
    surface_orientations,
    vesicle_layout,
)
from subtomo.simulate.maps import Species, demo_species, particle_radius_px, rescale_map
from subtomo.simulate.motion import particle_motion
from subtomo.simulate.projection import VolumeProjector

__all__ = ["PRESETS", "Simulation", "SimulationParams", "simulate"]

log = logging.getLogger("subtomo")

OPTICS_GROUP_NAME = "optics1"


@dataclass
class SimulationParams:
    """Every parameter of a simulation (defaults = the ``tiny`` preset).

    Units: pixel size Å; box, tomogram size (W, H, D) and shift errors in tilt-series pixels;
    angles degrees; dose e/Å² per tilt; defocus µm (positive = underfocus). ``maps`` are MRC
    files read by the job (empty: the preset's ``demo_maps``); ``species_fraction`` the share
    of each species (empty: equal). ``tilt_axis_deg`` is the nominal tilt-axis angle,
    counter-clockwise from image y (rlnTomoNominalTiltAxisAngle), and RELION's Z rotation.
    ``batch_size`` caps the particle x tilt patches rendered at once (memory).

    Alignment errors (:func:`~subtomo.simulate.acquisition.alignment_errors`): the images are
    made with the true geometry, the tables keep the nominal one (``Simulation.true_tilt_tables``
    has the truth): ``tilt_error_deg`` σ of every angle per tilt, ``tilt_shift_error_px`` σ of
    the shifts, ``tilt_angle_error_deg`` and ``in_plane_error_deg`` σ of the tilt angle and of
    the in-plane rotation alone, ``axis_error_deg`` an offset of every Z rotation (the tilt
    axis) and ``tilt_offset_deg`` of every tilt angle.

    Fiducials: ``beads`` gold beads per tomogram of radius ``bead_radius_px`` (px), near the
    slab's two surfaces, rendered as uniform spheres (projected chord length) five times as
    dense as the densest voxel of the maps, without CTF; ``Simulation.bead_positions`` has
    their truth. Their positions come from their own generator, and the noise is set by the
    specimen's signal without them (``snr`` is the particles' SNR), so the rest of the data
    set, noise included, does not change with them.

    Particle motion (:func:`~subtomo.simulate.motion.particle_motion`, own generator):
    ``motion_s_vel`` Å per e/Å² (0: none) and ``motion_s_div`` Å, the frame-alignment prior
    (§24); ``Simulation.true_motion`` has the trajectories (motion.star, §3).

    CTF errors (:func:`~subtomo.simulate.acquisition.ctf_errors`, own generator): the images
    have the tilt's defocus plus an error of σ ``defocus_error_angst`` (Å) per tilt, the
    tables keep the defocus without it (``true_tilt_tables`` has the truth); each particle's
    defocus is off by σ ``particle_defocus_error_angst`` (Å), kept in the true particles'
    ``subtomoDefocusOffsetAngst`` (§23). ``ice_kappa`` < 1 scales the signal of each tilt by
    the Beer–Lambert law ``κ^(1/|cos θ|)`` of an ice normal ``ice_normal_deg`` from z towards x
    (:func:`subtomo.ctf.ice_scale`; the truth in ``true_tilt_tables``' rlnCtfScalefactor).
    ``deformation_px``: each tilt image deformed by a field of σ ``deformation_px`` (bin-1 px,
    zero mean per tilt) at a ``deformation_grid``² grid of nodes
    (:mod:`subtomo.geometry.deformation`; own generator), the truth in ``true_deformation``.
    ``even_zernike``/``odd_zernike``: aberrations of the images in RELION's rlnEvenZernike/
    rlnOddZernike form (:mod:`subtomo.ctf.aberrations`), kept in the optics table of the true
    particles (``true_optics_table``), not in that of the picked ones.
    """

    preset: str = "tiny"
    maps: tuple[str, ...] = ()
    demo_maps: tuple[str, ...] = ("ribosome70S",)
    species_fraction: tuple[float, ...] = ()
    tomograms: int = 1
    particles: int = 24
    pixel_size: float = 10.0
    box: int = 48
    tomogram_size: tuple[int, int, int] = (256, 256, 96)
    tilt_range: float = 60.0
    tilt_step: float = 6.0
    dose_per_tilt: float = 3.0
    dose_symmetric: bool = True
    tilt_axis_deg: float = 85.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.07
    defocus_um: float = 3.0
    defocus_spread_um: float = 0.2
    astigmatism_um: float = 0.1
    ctf: bool = True
    noise: str = "none"
    snr: float = 0.05
    mtf: str | None = None
    layout: str = "random"
    tilt_error_deg: float = 0.0
    tilt_shift_error_px: float = 0.0
    tilt_angle_error_deg: float = 0.0
    in_plane_error_deg: float = 0.0
    axis_error_deg: float = 0.0
    tilt_offset_deg: float = 0.0
    beads: int = 0
    bead_radius_px: float = 5.0
    pose_error_deg: float = 0.0
    shift_error_px: float = 0.0
    motion_s_vel: float = 0.0
    motion_s_div: float = 5000.0
    defocus_error_angst: float = 0.0
    particle_defocus_error_angst: float = 0.0
    ice_kappa: float = 1.0
    ice_normal_deg: float = 0.0
    even_zernike: tuple[float, ...] = ()
    odd_zernike: tuple[float, ...] = ()
    deformation_px: float = 0.0
    deformation_grid: int = 3
    seed: int = 0
    device: str = "auto"
    batch_size: int = 1024

    @classmethod
    def from_preset(cls, preset: str = "tiny", **overrides: Any) -> SimulationParams:
        """A preset's parameters with ``overrides`` (``None`` values are ignored)."""
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(preset=preset, **values)


#: Presets. ``tiny`` (seconds, tests): 24 particles of the 70S ribosome in one tomogram, 21
#: tilts (±60° step 6), 10 Å/px, box 48, no noise by default (tests add noise explicitly).
#: ``demo`` (< 2 min on 2 cores): 300 particles, 70S plus 50S "junk" 2:1, 3 tomograms, 41 tilts
#: (±60° step 3), SNR 0.05. ``benchmark``: 300 particles x 41 tilts at box 64.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "demo": {
        "demo_maps": ("ribosome70S", "ribosome50S"),
        "species_fraction": (2 / 3, 1 / 3),
        "tomograms": 3,
        "particles": 300,
        "tomogram_size": (400, 400, 128),
        "tilt_step": 3.0,
        "noise": "gaussian",
        "snr": 0.05,
    },
    "benchmark": {
        "tomograms": 2,
        "particles": 300,
        "box": 64,
        "tomogram_size": (512, 512, 128),
        "tilt_step": 3.0,
        "noise": "gaussian",
        "snr": 0.05,
    },
}


@dataclass
class _TomogramTruth:
    """What the images of one tilt series are made from (private to the renderer)."""

    name: str
    geometry: TiltGeometry
    positions_px: torch.Tensor  # (n, 3) decentred px
    rotations: torch.Tensor  # (n, 3, 3) A_sub A_part
    species: torch.Tensor  # (n,)
    noise_seed: int
    beads_px: torch.Tensor  # (k, 3) decentred px
    motion_angst: torch.Tensor  # (n, t, 3) trajectories, tomogram axes
    defocus_offsets: torch.Tensor | None = None  # (n,) Å per particle


@dataclass
class Simulation:
    """A simulated data set: RELION tables, the maps as used, and a renderer for the images.

    ``maps`` are the species maps at the tilt-series pixel size in the simulation box (centre
    at ``box//2``), exactly as projected (the truth). ``tilt_tables`` rows are in ascending
    tilt angle; ``acquisition_order[tomo]`` gives each row's 0-based place in the acquisition.
    ``true_matrices[tomo]`` are the ``(t, 4, 4)`` projection matrices the images were made with
    (the nominal ones of the tables plus any alignment error); :attr:`true_tilt_tables` the
    tables with those as RELION's alignment columns.
    """

    params: SimulationParams
    species_names: list[str]
    maps: list[torch.Tensor]
    optics_table: pd.DataFrame
    global_table: pd.DataFrame
    tilt_tables: dict[str, pd.DataFrame]
    particles: pd.DataFrame
    particles_picked: pd.DataFrame
    acquisition_order: dict[str, np.ndarray]
    true_matrices: dict[str, torch.Tensor]
    bead_positions: dict[str, np.ndarray] = field(default_factory=dict)
    true_ctf: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    true_deformation: dict[str, torch.Tensor] = field(default_factory=dict)
    _truth: list[_TomogramTruth] = field(repr=False, default_factory=list)
    _optics: Optics = field(repr=False, default_factory=Optics)
    _radius_px: float = 0.0
    _bead_density: float = 0.0

    def true_optics_table(self) -> pd.DataFrame:
        """:attr:`optics_table` with the images' aberrations (rlnEvenZernike/rlnOddZernike)
        where there are any: the optics of the true particles."""
        table = self.optics_table.copy()
        for column, values in (("rlnEvenZernike", self.params.even_zernike),
                               ("rlnOddZernike", self.params.odd_zernike)):  # fmt: skip
            if len(values):
                table[column] = format_vector(values)
        return table

    def tilt_series(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Render each tilt series in turn: ``(rlnTomoName, images (t, h, w) float32)``.

        Images are in tilt-table row order, noise included; one stack is alive at a time if
        the caller drops it before the next.
        """
        device = resolve_device(self.params.device)
        projectors = [VolumeProjector.from_volume(m.to(device)) for m in self.maps]
        for truth in self._truth:
            images = render_tilt_series(
                projectors, truth.species, truth.rotations, truth.positions_px, truth.geometry,
                self._optics, batch_size=self.params.batch_size,
                displacements_px=truth.motion_angst / self.params.pixel_size,
                defocus_offsets=truth.defocus_offsets,
            )  # fmt: skip
            specimen = images
            if len(truth.beads_px):
                images = images + _bead_images(
                    truth.beads_px, truth.geometry, self.params.bead_radius_px,
                    self._bead_density, images.device,
                )  # fmt: skip
            if self.params.noise != "none":
                uv, _ = project_particles(
                    truth.geometry.matrices, truth.positions_px, truth.geometry.tomogram_size
                )
                mask = particle_pixel_mask(uv.to(device), self._radius_px, tuple(images.shape))
                generator = torch.Generator().manual_seed(truth.noise_seed)
                electrons = self.params.dose_per_tilt * self.params.pixel_size**2
                images = add_noise(
                    images, mask, self.params.noise, self.params.snr, electrons, generator,
                    specimen,
                )  # fmt: skip
            yield truth.name, images
            del images  # one stack alive at a time

    @property
    def true_motion(self) -> Trajectories:
        """The particles' true trajectories (zeros without motion), by rlnTomoParticleName."""
        names = self.particles["rlnTomoParticleName"].tolist()
        return Trajectories.from_displacements(
            names, torch.cat([truth.motion_angst for truth in self._truth])
        )

    @property
    def true_tilt_tables(self) -> dict[str, pd.DataFrame]:
        """``tilt_tables`` with rlnTomoXTilt/YTilt/ZRot/X/YShiftAngst of the true matrices and
        the true rlnDefocusU/V and rlnCtfScalefactor."""
        size = tuple(int(s) for s in self.params.tomogram_size)
        tables = {}
        for name, table in self.tilt_tables.items():
            true = alignment_from_projection_matrices(
                self.true_matrices[name], self.params.pixel_size, size, size[:2]
            )
            true_ctf = self.true_ctf.get(name, {})
            tables[name] = table.assign(**{k: v.numpy() for k, v in true.items()}, **true_ctf)
        return tables


def _deformation_field(params: SimulationParams, tomogram: int, t: int) -> torch.Tensor | None:
    """``(t, g, g, 2)`` random node displacements (px) of tomogram ``tomogram``, zero mean per
    tilt (a mean would be a shift), or ``None`` without deformations."""
    if not params.deformation_px:
        return None
    rng = np.random.default_rng([params.seed, 3_000_017, tomogram])  # own: data unchanged
    g = params.deformation_grid
    field = rng.normal(0.0, params.deformation_px, (t, g, g, 2))
    return torch.from_numpy(field - field.mean(axis=(1, 2), keepdims=True))


def _bead_images(
    beads_px: torch.Tensor,
    geometry: TiltGeometry,
    radius: float,
    density: float,
    device: torch.device,
) -> torch.Tensor:
    """``(t, h, w)``: minus the projected chord length of each bead (uniform sphere of
    ``radius`` px) times ``density``, at the bead's projected position (dark, like protein)."""
    uv, _ = project_particles(geometry.matrices, beads_px, geometry.tomogram_size)  # (k, t, 2)
    w, h = geometry.image_size
    y = torch.arange(h, dtype=torch.float32, device=device)[:, None]
    x = torch.arange(w, dtype=torch.float32, device=device)[None, :]
    out = torch.zeros(uv.shape[1], h, w, dtype=torch.float32, device=device)
    for k in range(uv.shape[0]):
        u = uv[k, :, 0].float().to(device)[:, None, None]
        v = uv[k, :, 1].float().to(device)[:, None, None]
        chord = 2 * (radius**2 - (x - u) ** 2 - (y - v) ** 2).clamp_min(0).sqrt()
        out -= density * chord
    return out


def _bead_layout(
    seed: int, n: int, size: tuple[int, int, int], radius: float, fits: Any
) -> np.ndarray:
    """``(n, 3)`` decentred px: beads within ``2·radius`` of the slab's top or bottom, at x, y
    where they project inside every tilt (``fits``); their own generator."""
    rng = np.random.default_rng([seed, 1_000_003])
    out = np.zeros((0, 3))
    for _ in range(100):
        if len(out) >= n:
            break
        candidates = rng.uniform(0, 1, (4 * n, 3)) * np.asarray(size, dtype=np.float64)
        side = rng.choice([-1.0, 1.0], 4 * n)
        candidates[:, 2] = size[2] / 2 + side * (size[2] / 2 - 2 * radius)
        out = np.concatenate([out, candidates[fits(candidates)]])[:n]
    if len(out) < n:
        raise InputError(f"could only place {len(out)} of {n} beads in a tomogram of {size} px")
    return out


def _species_counts(n: int, fractions: Sequence[float], n_species: int) -> np.ndarray:
    """Particles per species (sum ``n``) from fractions by largest remainders."""
    f = np.asarray(fractions if len(fractions) else [1.0] * n_species, dtype=np.float64)
    if len(f) != n_species or np.any(f < 0) or f.sum() <= 0:
        raise InputError(
            f"--species-fraction needs {n_species} non-negative values, got {list(fractions)}"
        )
    exact = n * f / f.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts))[: n - counts.sum()]] += 1
    return counts


def _check(params: SimulationParams) -> None:
    if params.box % 2 or any(s % 2 for s in params.tomogram_size):
        raise InputError(
            f"box and tomogram sizes must be even (RELION's centre convention), got box "
            f"{params.box}, tomogram {tuple(params.tomogram_size)}"
        )
    if params.particles < params.tomograms or params.tomograms < 1:
        raise InputError("need at least one tomogram and one particle per tomogram")
    if params.layout not in ("random", "vesicle"):
        raise InputError(f"unknown layout {params.layout!r} (random or vesicle)")
    if params.noise not in ("gaussian", "poisson", "none"):
        raise InputError(f"unknown noise {params.noise!r} (gaussian, poisson or none)")


def _fits(
    matrices: Sequence[torch.Tensor], tomogram_size: tuple[int, int, int], margin: float
) -> Any:
    """Candidate test: the centre projects at least ``margin`` px inside every tilt image
    (RELION counts a tilt as visible when the centre is strictly inside [r, w - r]).
    """
    w, h = tomogram_size[:2]

    def fits(points: np.ndarray) -> np.ndarray:
        ok = np.ones(len(points), dtype=bool)
        for m in matrices:
            uv, _ = project_particles(m, torch.as_tensor(points), tomogram_size)
            u, v = uv[..., 0].numpy(), uv[..., 1].numpy()
            inside = (u > margin) & (u < w - 1 - margin) & (v > margin) & (v < h - 1 - margin)
            ok &= inside.all(axis=1)
        return ok

    return fits


def simulate(
    params: SimulationParams,
    species: Sequence[Species] | None = None,
    mtf: tuple[np.ndarray, np.ndarray] | None = None,
) -> Simulation:
    """Lay out a data set and return it with a renderer for its tilt series.

    ``species`` are the maps to use (default: the preset's demo maps); ``mtf`` a detector MTF
    ``(frequency in cycles/pixel, value)``. See :class:`SimulationParams` for the parameters.
    """
    _check(params)
    if species is None:
        if params.maps:
            raise InputError("maps given as files must be read first (subtomo.jobs.simulate)")
        species = demo_species(params.demo_maps)
    px, box = params.pixel_size, params.box
    maps = [rescale_map(s.volume, s.voxel_size, px, box) for s in species]
    radii = np.array([particle_radius_px(m) for m in maps])
    radius = float(radii.max())
    seeds = np.random.SeedSequence(params.seed).spawn(1 + params.tomograms)
    rng = np.random.default_rng(seeds[0])

    n_total = params.particles
    species_index = np.repeat(
        np.arange(len(maps)), _species_counts(n_total, params.species_fraction, len(maps))
    )
    species_index = rng.permutation(species_index)
    subset = rng.permutation(np.arange(n_total) % 2 + 1)
    per_tomo = np.array_split(np.arange(n_total), params.tomograms)

    scheme = tilt_scheme(
        params.tilt_range, params.tilt_step, params.dose_per_tilt, params.dose_symmetric
    )
    t = len(scheme.angles_deg)
    size = tuple(int(s) for s in params.tomogram_size)
    image_size = (size[0], size[1])
    z_rot = params.tilt_axis_deg
    zeros = torch.zeros(t, dtype=torch.float64)
    angles = torch.as_tensor(scheme.angles_deg, dtype=torch.float64)
    nominal = projection_matrices(zeros, angles, zeros + z_rot, zeros, zeros, px, size, image_size)

    global_rows, tilt_tables, true_matrices, orders, true_ctf = [], {}, {}, {}, {}
    true_deformation: dict[str, torch.Tensor] = {}
    particle_frames, picked_frames, truths = [], [], []
    bead_positions: dict[str, np.ndarray] = {}
    for i, members in enumerate(per_tomo):
        name = f"TS_{i + 1:02d}"
        du, dv, dang = tilt_defocus(
            rng, t, params.defocus_um, params.defocus_spread_um, params.astigmatism_um
        )
        err = {
            k: torch.as_tensor(v)
            for k, v in alignment_errors(
                rng,
                t,
                params.tilt_error_deg,
                params.tilt_shift_error_px,
                y_tilt_error_deg=params.tilt_angle_error_deg,
                z_rot_error_deg=params.in_plane_error_deg,
                axis_error_deg=params.axis_error_deg,
                tilt_offset_deg=params.tilt_offset_deg,
            ).items()
        }
        true = projection_matrices(
            err["x_tilt"], angles + err["y_tilt"], z_rot + err["z_rot"],
            err["x_shift_px"] * px, err["y_shift_px"] * px, px, size, image_size,
        )  # fmt: skip
        fits = _fits([nominal, true], size, margin=box / 2 + 1)
        beads = (
            _bead_layout(params.seed + i, params.beads, size, params.bead_radius_px,
                         _fits([nominal, true], size, margin=params.bead_radius_px + 1))
            if params.beads else np.zeros((0, 3))
        )  # fmt: skip
        bead_positions[name] = beads
        n = len(members)
        tilt_err, part_err = ctf_errors(
            params.seed, i, t, n, params.defocus_error_angst, params.particle_defocus_error_angst
        )
        scale = ice_scale(true[:, :3, :3], 1.0, params.ice_kappa, params.ice_normal_deg)
        if params.layout == "vesicle":
            lay = vesicle_layout(rng, n, size, radius, fits)
            a_sub, a_part = surface_orientations(lay.normals, rng.uniform(-180, 180, n))
        else:
            lay = random_layout(rng, n, size, radii[species_index[members]], fits)
            a_sub, a_part = None, random_rotations(rng, n)
        full = a_part if a_sub is None else a_sub @ a_part
        picked_part = a_part @ rotations_by_angle(rng, n, params.pose_error_deg)
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        centred = (lay.positions_px - np.asarray(size) / 2.0) * px  # Å from c_tomo
        picked_centred = centred + direction * params.shift_error_px * px

        table = {
            "rlnTomoName": [name] * n,
            "rlnTomoParticleName": [f"{name}/{k + 1}" for k in range(n)],
        }
        frames = []
        for picked, (coords, part) in enumerate(((centred, a_part), (picked_centred, picked_part))):
            df = pd.DataFrame(table)
            for axis, col in enumerate("XYZ"):
                df[f"rlnCenteredCoordinate{col}Angst"] = coords[:, axis]
            if a_sub is not None:
                sub = euler_deg(a_sub)
                for axis, col in enumerate(("Rot", "Tilt", "Psi")):
                    df[f"rlnTomoSubtomogram{col}"] = sub[:, axis]
            eul = euler_deg(part)
            for axis, col in enumerate(("Rot", "Tilt", "Psi")):
                df[f"rlnAngle{col}"] = eul[:, axis]
            if a_sub is not None:
                df["rlnAngleTiltPrior"] = 90.0
                df["rlnAnglePsiPrior"] = 0.0
            for col in "XYZ":
                df[f"rlnOrigin{col}Angst"] = 0.0
            df["rlnRandomSubset"] = subset[members]
            df["rlnOpticsGroup"] = 1
            df["subtomoSpecies"] = [species[s].name for s in species_index[members]]
            if params.particle_defocus_error_angst and not picked:
                df["subtomoDefocusOffsetAngst"] = part_err
            frames.append(df)
        particle_frames.append(frames[0])
        picked_frames.append(frames[1])

        tilt_tables[name] = pd.DataFrame(
            {
                "rlnMicrographPreExposure": scheme.pre_exposure,
                "rlnDefocusU": du,
                "rlnDefocusV": dv,
                "rlnDefocusAngle": dang,
                "rlnTomoXTilt": 0.0,
                "rlnTomoYTilt": scheme.angles_deg,
                "rlnTomoZRot": z_rot,
                "rlnTomoXShiftAngst": 0.0,
                "rlnTomoYShiftAngst": 0.0,
                "rlnCtfScalefactor": 1.0,
                "rlnTomoNominalStageTiltAngle": scheme.angles_deg,
                "rlnTomoNominalTiltAxisAngle": params.tilt_axis_deg,
            }
        )
        global_rows.append(
            {
                "rlnTomoName": name,
                "rlnVoltage": params.voltage,
                "rlnSphericalAberration": params.cs,
                "rlnAmplitudeContrast": params.amplitude_contrast,
                "rlnMicrographOriginalPixelSize": px,
                "rlnTomoHand": -1,
                "rlnTomoTiltSeriesPixelSize": px,
                "rlnTomoSizeX": size[0],
                "rlnTomoSizeY": size[1],
                "rlnTomoSizeZ": size[2],
                "rlnTomoImportFractionalDose": params.dose_per_tilt,
                "rlnOpticsGroupName": OPTICS_GROUP_NAME,
            }
        )
        true_matrices[name] = true
        true_du, true_dv = du + tilt_err, dv + tilt_err
        true_ctf[name] = {"rlnDefocusU": true_du, "rlnDefocusV": true_dv,
                          "rlnCtfScalefactor": scale.numpy()}  # fmt: skip
        orders[name] = scheme.order
        geometry = TiltGeometry(
            matrices=true,
            defocus_u=torch.as_tensor(true_du),
            defocus_v=torch.as_tensor(true_dv),
            defocus_angle=torch.as_tensor(dang),
            pre_exposure=torch.as_tensor(scheme.pre_exposure, dtype=torch.float64),
            tomogram_size=size,
            image_size=image_size,
            scale=scale if params.ice_kappa != 1.0 else None,
            deformation=_deformation_field(params, i, t),
        )
        if geometry.deformation is not None:
            true_deformation[name] = geometry.deformation
        motion_rng = np.random.default_rng([params.seed, 2_000_003, i])  # own: data unchanged
        motion = particle_motion(
            motion_rng, centred, scheme.pre_exposure, params.motion_s_vel, params.motion_s_div
        )
        truths.append(
            _TomogramTruth(
                name=name,
                geometry=geometry,
                positions_px=torch.as_tensor(lay.positions_px),
                rotations=torch.as_tensor(full),
                species=torch.as_tensor(species_index[members]),
                noise_seed=int(seeds[1 + i].generate_state(1)[0]),
                beads_px=torch.as_tensor(beads),
                motion_angst=torch.as_tensor(motion),
                defocus_offsets=torch.as_tensor(part_err),
            )
        )

    optics_table = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": [OPTICS_GROUP_NAME],
            "rlnVoltage": [params.voltage],
            "rlnSphericalAberration": [params.cs],
            "rlnAmplitudeContrast": [params.amplitude_contrast],
            "rlnTomoTiltSeriesPixelSize": [px],
        }
    )
    optics = Optics(
        voltage_kv=params.voltage,
        cs_mm=params.cs,
        amplitude_contrast=params.amplitude_contrast,
        pixel_size=px,
        hand=-1,
        ctf=params.ctf,
        mtf=mtf,
        even_zernike=tuple(params.even_zernike),
        odd_zernike=tuple(params.odd_zernike),
    )
    log.info(
        "layout: %d particles (%s) in %d tilt series of %d tilts, particle radius %.1f px",
        n_total, ", ".join(s.name for s in species), params.tomograms, t, radius,
    )  # fmt: skip
    return Simulation(
        params=dataclasses.replace(params),
        species_names=[s.name for s in species],
        maps=maps,
        optics_table=optics_table,
        global_table=pd.DataFrame(global_rows),
        tilt_tables=tilt_tables,
        particles=pd.concat(particle_frames, ignore_index=True),
        particles_picked=pd.concat(picked_frames, ignore_index=True),
        acquisition_order=orders,
        true_matrices=true_matrices,
        bead_positions=bead_positions,
        true_ctf=true_ctf,
        true_deformation=true_deformation,
        _truth=truths,
        _optics=optics,
        _radius_px=radius,
        _bead_density=5.0 * max(float(m.max()) for m in maps),
    )
