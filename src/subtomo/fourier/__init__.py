"""Fourier primitives: centred FFTs, frequency grids, shell statistics and FSC."""

from subtomo.fourier.fft import fftfreq_grid, irfft_centered, rfft_centered, rfft_shape
from subtomo.fourier.filters import (
    bfactor_weights,
    filter_shell,
    highpass_weights,
    lowpass_map,
    lowpass_weights,
)
from subtomo.fourier.resolution import (
    FSC_THRESHOLD,
    crossing_shell,
    crossing_shells,
    fsc_threshold_shell,
    ssnr_resolution_shell,
)
from subtomo.fourier.shells import (
    fsc,
    fsc_maps,
    radial_average,
    radius_grid,
    shell_index,
    shell_resolution_angst,
)
from subtomo.fourier.slices import (
    extract_slices,
    extract_volumes,
    insert_slices,
    insert_volumes,
    padded_box,
    projector_rfft,
    trilinear_sinc2,
)

__all__ = [
    "FSC_THRESHOLD",
    "bfactor_weights",
    "crossing_shell",
    "crossing_shells",
    "extract_slices",
    "extract_volumes",
    "fftfreq_grid",
    "filter_shell",
    "fsc",
    "fsc_maps",
    "fsc_threshold_shell",
    "highpass_weights",
    "insert_slices",
    "insert_volumes",
    "irfft_centered",
    "lowpass_map",
    "lowpass_weights",
    "padded_box",
    "projector_rfft",
    "radial_average",
    "radius_grid",
    "rfft_centered",
    "rfft_shape",
    "shell_index",
    "shell_resolution_angst",
    "ssnr_resolution_shell",
    "trilinear_sinc2",
]
