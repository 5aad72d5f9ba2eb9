"""MRC round trips, headers and clear errors for bad files."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest
import torch

from subtomo.errors import InputError
from subtomo.io import mrc as mrc_io
from subtomo.io import read_mrc, read_mrc_header, write_mrc


@pytest.mark.parametrize("float16", [False, True])
def test_round_trip_with_voxel_size(tmp_path, float16):
    data = torch.randn(4, 6, 8)
    write_mrc(tmp_path / "v.mrc", data, 3.25, float16=float16)
    back, voxel = read_mrc(tmp_path / "v.mrc")
    tol = 2e-3 if float16 else 0
    np.testing.assert_allclose(back.numpy(), data.numpy(), atol=tol * 4, rtol=tol)
    assert voxel == pytest.approx(3.25)
    assert read_mrc_header(tmp_path / "v.mrc").mode == (12 if float16 else 2)


def test_gzip_and_stack(tmp_path):
    write_mrc(tmp_path / "s.mrcs", torch.ones(1, 5, 5), 2.0)
    assert read_mrc(tmp_path / "s.mrcs")[0].shape == (1, 5, 5)
    with open(tmp_path / "s.mrcs", "rb") as src, gzip.open(tmp_path / "s.mrc.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert read_mrc(tmp_path / "s.mrc.gz")[0].sum() == 25


def test_missing_truncated_and_non_mrc(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_mrc(tmp_path / "nope.mrc")
    write_mrc(tmp_path / "t.mrc", torch.ones(8, 8, 8), 1.0)
    raw = (tmp_path / "t.mrc").read_bytes()
    (tmp_path / "t.mrc").write_bytes(raw[:-100])
    with pytest.raises(InputError, match="truncated"):
        read_mrc(tmp_path / "t.mrc")
    (tmp_path / "x.mrc").write_text("hello")
    with pytest.raises(InputError, match="MRC"):
        read_mrc(tmp_path / "x.mrc")


@pytest.mark.parametrize("float16", [False, True])
def test_header_statistics_are_those_of_the_data(tmp_path, float16):
    """The header's dmin/dmax/dmean/rms (which write_mrc computes itself, not mrcfile) match
    numpy's statistics of the written values; a wrong header would mislead viewers that
    scale by them (and RELION's own header checks)."""
    import mrcfile

    data = torch.randn(5, 12, 10) * 3 + 1.5
    write_mrc(tmp_path / "s.mrcs", data, 2.0, float16=float16)
    with mrcfile.open(tmp_path / "s.mrcs") as mrc:
        values = mrc.data.astype(np.float64)
        h = mrc.header
        tol = 2e-3 if float16 else 1e-6  # float16 rounding of the stored values
        assert float(h.dmin) == pytest.approx(values.min(), rel=tol)
        assert float(h.dmax) == pytest.approx(values.max(), rel=tol)
        assert float(h.dmean) == pytest.approx(values.mean(), rel=tol, abs=tol)
        assert float(h.rms) == pytest.approx(values.std(), rel=tol)
        assert mrc.is_image_stack()


@pytest.mark.parametrize(
    ("shape", "name", "float16"),
    [
        ((4, 6, 6), "p_stack2d.mrcs", False),
        ((6, 6, 6), "p_data.mrc", True),
        ((5, 7), "i.mrc", False),
    ],
)
def test_repeated_shapes_reuse_the_header_byte_for_byte(tmp_path, shape, name, float16):
    """A later file of a shape already written reuses that file's header with its own
    statistics; it must be the very file mrcfile itself writes (and a valid MRC2014 file)."""
    import mrcfile

    from subtomo.io import mrc as mrc_module

    first, later = torch.randn(shape), torch.randn(shape) * 2 + 1
    mrc_module._HEADERS.clear()
    write_mrc(tmp_path / "first" / name, first, 1.7, float16=float16)
    write_mrc(tmp_path / "later" / name, later, 1.7, float16=float16)
    assert len(mrc_module._HEADERS) == 1
    mrc_module._HEADERS.clear()
    write_mrc(tmp_path / "by_mrcfile" / name, later, 1.7, float16=float16)
    written = (tmp_path / "later" / name).read_bytes()
    assert written == (tmp_path / "by_mrcfile" / name).read_bytes()
    assert written != (tmp_path / "first" / name).read_bytes()
    if not float16:  # float16 headers carry the float32 statistics, which validate rejects
        assert mrcfile.validate(tmp_path / "later" / name, print_file=open(os.devnull, "w"))
    got, voxel = read_mrc(tmp_path / "later" / name)
    expected = later.half().float() if float16 else later
    assert voxel == pytest.approx(1.7) and torch.equal(got.reshape(shape), expected)


def test_empty_stack_of_a_known_shape(tmp_path):
    """An empty stack written from a cached header is mrcfile's file (no data, "not set"
    statistics)."""
    from subtomo.io import mrc as mrc_module

    empty = torch.zeros(0, 6, 6)
    mrc_module._HEADERS.clear()
    write_mrc(tmp_path / "a.mrcs", empty, 2.0)
    write_mrc(tmp_path / "b.mrcs", empty, 2.0)  # from the cached header
    assert len(mrc_module._HEADERS) == 1
    assert (tmp_path / "b.mrcs").read_bytes() == (tmp_path / "a.mrcs").read_bytes()
    assert read_mrc(tmp_path / "b.mrcs")[0].shape == (0, 6, 6)


def test_header_stats_of_a_large_volume_are_summed_in_chunks(monkeypatch) -> None:
    """Above 4 chunks the standard deviation is summed chunk by chunk (no copy of the
    volume) and agrees with numpy's; min, max and mean are numpy's."""
    monkeypatch.setattr(mrc_io, "_STATS_CHUNK", 1000)
    volume = np.random.default_rng(1).normal(3.0, 2.0, (37, 41, 29)).astype(np.float32)
    lo, hi, mean, std = mrc_io._header_stats(volume)
    assert (lo, hi) == (float(volume.min()), float(volume.max()))
    assert mean == pytest.approx(float(volume.mean()), rel=1e-6)
    assert std == pytest.approx(float(volume.astype(np.float64).std()), rel=1e-6)


def test_a_rank_that_does_not_write_leaves_no_file(tmp_path, monkeypatch) -> None:
    """On a torch.distributed rank other than 0, write_mrc fills a private file and discards
    it, and must not read the final path back (rank 0 may not have written it yet: the
    2-rank Reconstruct failed with 'No such file' when it had not)."""
    import subtomo.io.atomic as atomic

    monkeypatch.setattr(atomic, "writes_files", lambda: False)
    path = tmp_path / "rank1.mrc"
    write_mrc(path, torch.zeros(3, 5, 7), 2.5)  # a shape no other test writes: not cached
    assert not path.exists() and list(tmp_path.iterdir()) == []
