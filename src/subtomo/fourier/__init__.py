"""Fourier primitives: centred FFTs, frequency grids, shell statistics and FSC."""

from subtomo.fourier.fft import fftfreq_grid, irfft_centered, rfft_centered, rfft_shape
from subtomo.fourier.shells import (
    fsc,
    fsc_maps,
    radial_average,
    shell_index,
    shell_resolution_angst,
)

__all__ = [
    "fftfreq_grid",
    "fsc",
    "fsc_maps",
    "irfft_centered",
    "radial_average",
    "rfft_centered",
    "rfft_shape",
    "shell_index",
    "shell_resolution_angst",
]
