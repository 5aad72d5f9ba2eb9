"""subtomo: subtomogram averaging for cryo-electron tomography on PyTorch.

Files on disk are RELION 5's (STAR via ``starfile``, MRC via ``mrcfile``); numerics are
PyTorch tensors on CPU or CUDA through one code path.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("subtomo")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
