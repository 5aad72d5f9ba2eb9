"""CTF and dose weighting in RELION's conventions, on 2D rfft grids (unshifted layout)."""

from subtomo.ctf.aberrations import aberration_phase, zernike_indices
from subtomo.ctf.ctf import ctf_2d, ctf_phase, electron_wavelength_angstrom, particle_defocus
from subtomo.ctf.dose import dose_cutoff_mask, dose_weight_at, dose_weights
from subtomo.ctf.ice import ice_normal, ice_scale

__all__ = [
    "aberration_phase",
    "ctf_2d",
    "ctf_phase",
    "dose_cutoff_mask",
    "dose_weight_at",
    "dose_weights",
    "electron_wavelength_angstrom",
    "ice_normal",
    "ice_scale",
    "particle_defocus",
    "zernike_indices",
]
