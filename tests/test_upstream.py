"""Issue #15 end to end, small: simulated movies + mdoc → import → motioncorr → ctffind →
exclude-tilts gives the simulator's per-tilt table (tilt angles, pre-exposure, defocus within
the CTF bar, hand, the dark tilt excluded), a RELION pipeline whose jobs chain by their
nodes, and - with the true alignment put on it - Extract + Reconstruct reach the FSC to the
true map of the tilt images simulated directly (within one Fourier shell).
``benchmarks/upstream.py`` runs the same chain larger."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from subtomo.data import TomogramSet
from subtomo.errors import InputError
from subtomo.io import read_star
from subtomo.simulate.truth import with_true_alignment

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "upstream.py"
_spec = importlib.util.spec_from_file_location("benchmark_upstream", _BENCH)
upstream = sys.modules["benchmark_upstream"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(upstream)  # dataclasses look their module up in sys.modules


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Path, object]:
    """5 tilts (±60°, 30° steps) of 512² at 2.5 Å/px, 4 particles, the -60° tilt dark."""
    out = tmp_path_factory.mktemp("upstream")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads spin-wait on shared cores unless PASSIVE: 5x slower
    try:
        result = upstream.run_chain(out, size=512, pixel_size=2.5, tilt_step=30.0, particles=4,
                                    box=112)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_per_tilt_table_matches_the_truth(chain) -> None:
    _, r = chain
    t = r.tilts
    assert r.dropped == [-60.0]  # the dark tilt, and nothing else
    assert (t["subtomoDark"] == 0).all() and len(t) == 4
    assert (t["rlnMicrographPreExposure"] == t["rlnMicrographPreExposure_true"]).all()
    assert list(t["rlnTomoNominalStageTiltAngle"]) == sorted(t["rlnTomoNominalStageTiltAngle"])
    err = upstream.defocus_error(t)
    angle = t["rlnTomoNominalStageTiltAngle"]
    assert abs(float(err[angle == 0].iloc[0])) <= 100, err
    assert (err[angle.abs() >= 55].abs() <= 300).all(), err
    assert r.hand[0] == r.hand[1]


def test_reconstruction_matches_direct_tilt_images(chain) -> None:
    _, r = chain
    for threshold in (0.5, 0.143):
        direct, chained = r.crossing("direct", threshold), r.crossing("upstream", threshold)
        assert direct >= 5, (threshold, direct)  # a map worth comparing
        assert abs(direct - chained) <= 1, (threshold, direct, chained)


def test_columns_carry_over_and_pipeline_chains(chain) -> None:
    out, _ = chain
    tilts = TomogramSet.read(out / "ExcludeTiltImages/job004/selected_tilt_series.star")
    columns = set(tilts["TS_01"].tilts.columns)
    for column in ("rlnMicrographMovieName", "rlnTomoTiltMovieFrameCount",  # import
                   "rlnMicrographPreExposure", "rlnTomoNominalTiltAxisAngle",
                   "rlnMicrographName", "rlnMicrographMetadata",  # motioncorr
                   "rlnMicrographNameEven", "rlnMicrographNameOdd", "rlnAccumMotionTotal",
                   "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfImage",  # ctffind
                   "rlnCtfMaxResolution"):  # fmt: skip
        assert column in columns, column
    pipeline = read_star(out / "default_pipeline.star")
    table = pipeline["pipeline_nodes"]
    nodes = dict(zip(table.rlnPipeLineNodeName, table.rlnPipeLineNodeTypeLabel, strict=True))
    chain_nodes = {
        "Import/job001/tilt_series.star": "TomogramGroupMetadata.star.relion.tomo.import",
        "MotionCorr/job002/corrected_tilt_series.star":
            "TomogramGroupMetadata.star.relion.tomo.motioncorr",
        "CtfFind/job003/tilt_series_ctf.star": "TomogramGroupMetadata.star.relion.tomo.ctffind",
        "ExcludeTiltImages/job004/selected_tilt_series.star":
            "TomogramGroupMetadata.star.relion.tomo.excludeimages",
    }  # fmt: skip
    for node, kind in chain_nodes.items():
        assert nodes[node] == kind
    edges = pipeline["pipeline_input_edges"]
    inputs = dict(zip(edges["rlnPipeLineEdgeProcess"], edges["rlnPipeLineEdgeFromNode"],
                      strict=True))  # fmt: skip
    assert inputs["MotionCorr/job002/"] == "Import/job001/tilt_series.star"
    assert inputs["CtfFind/job003/"] == "MotionCorr/job002/corrected_tilt_series.star"
    assert inputs["ExcludeTiltImages/job004/"] == "CtfFind/job003/tilt_series_ctf.star"
    procs = pipeline["pipeline_processes"]
    labels = dict(zip(procs.rlnPipeLineProcessName, procs.rlnPipeLineProcessTypeLabel,
                      strict=True))  # fmt: skip
    assert labels["Import/job001/"] == "relion.importtomo"  # RELION 5's labels (§15)
    assert labels["MotionCorr/job002/"] == "relion.motioncorr.own"
    assert labels["CtfFind/job003/"] == "relion.ctffind.ctffind4"
    assert labels["ExcludeTiltImages/job004/"] == "relion.excludetilts"
    job = read_star(out / "CtfFind/job003/job.star")["job"]
    assert job["rlnJobTypeLabel"] == "relion.ctffind.ctffind4" and job["rlnJobIsTomo"] == 1


def test_true_alignment_needs_every_tilt(chain) -> None:
    out, _ = chain
    processed = TomogramSet.read(out / "ExcludeTiltImages/job004/selected_tilt_series.star")
    truth = TomogramSet.read(out / "tomograms.star")
    table = truth["TS_01"].tilts
    fewer = TomogramSet.from_tables(
        truth.global_table, {"TS_01": table[table.rlnTomoNominalStageTiltAngle != 0]}
    )
    with pytest.raises(InputError, match=r"TS_01: no true tilt at \[0\.0\]"):
        with_true_alignment(processed, fewer)
