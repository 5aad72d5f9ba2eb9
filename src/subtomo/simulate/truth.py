"""The simulator's true tilt-series alignment put on tilt series processed from its movies.

The upstream jobs (import → motioncorr → ctffind → exclude-tilts) do not align tilt series;
RELION's "Align tilt series" and "Reconstruct tomograms" jobs add the alignment
(rlnTomoXTilt/YTilt/ZRot, rlnTomoX/YShiftAngst, relion5-upstream.md §5.1) and the tomogram
size (rlnTomoSizeX/Y/Z, §6). To run Extract and Reconstruct on the upstream result with the
known alignment, :func:`with_true_alignment` copies those columns from the simulator's
``tomograms.star``, matching series by ``rlnTomoName`` and tilts by nominal stage tilt (the
row order differs between jobs, §0). Everything the upstream jobs measured (defocus, dose,
hand, pixel size) is kept as they wrote it.
"""

from __future__ import annotations

import pandas as pd

from subtomo.data import TomogramSet
from subtomo.errors import InputError
from subtomo.tilt.external_alignment import ALIGNMENT_COLUMNS

__all__ = ["TOMOGRAM_COLUMNS", "with_true_alignment"]

#: Global columns of a reconstructed tomogram (unbinned tilt-series pixels).
TOMOGRAM_COLUMNS = ("rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ")

_TILT = "rlnTomoNominalStageTiltAngle"


def with_true_alignment(processed: TomogramSet, truth: TomogramSet) -> TomogramSet:
    """``processed`` with the alignment and tomogram size of ``truth`` (same names; each
    processed tilt matched to the true tilt of the same nominal stage tilt, to 0.01°).

    Raises :class:`InputError` for a series or a tilt the truth does not have.
    """
    tables: dict[str, pd.DataFrame] = {}
    sizes = []
    for series in processed:
        if series.name not in truth:
            raise InputError(f"no tilt series {series.name!r} in the truth", file=truth.source)
        true = truth[series.name]
        tilts = series.tilts.drop(columns=list(ALIGNMENT_COLUMNS), errors="ignore")
        key = tilts[_TILT].round(2)
        aligned = true.tilts.assign(**{_TILT: true.tilts[_TILT].round(2)}).set_index(_TILT)
        missing = sorted(set(key) - set(aligned.index))
        if missing:
            raise InputError(f"{series.name}: no true tilt at {missing} deg", file=true.tilt_file)
        values = aligned.loc[key, list(ALIGNMENT_COLUMNS)].reset_index(drop=True)
        tables[series.name] = pd.concat([tilts.reset_index(drop=True), values], axis=1)
        sizes.append(true.tomogram_size)
    table = processed.global_table.drop(columns=list(TOMOGRAM_COLUMNS), errors="ignore")
    for axis, column in enumerate(TOMOGRAM_COLUMNS):
        table[column] = [size[axis] for size in sizes]
    return TomogramSet.from_tables(table.reset_index(drop=True), tables)
