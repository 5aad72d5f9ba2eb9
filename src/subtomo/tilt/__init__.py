"""Upstream tilt-series algorithms: movie alignment (:mod:`subtomo.tilt.motion`), tilt-series
alignment without fiducials (:mod:`subtomo.tilt.alignment`), per-tilt CTF estimation with the
defocus gradient of tilted images, sample thickness and the hand (:mod:`subtomo.tilt.ctffind`),
X-ray and hot-pixel erasing (:mod:`subtomo.tilt.xrays`) and tilt exclusion rules
(:mod:`subtomo.tilt.exclusion`). Tensors and tables in and out: the jobs read and write the
files.
"""

from subtomo.tilt.geometry import depth_gradient, slab_depth_factor, table_rotations

__all__ = ["depth_gradient", "slab_depth_factor", "table_rotations"]
