"""MRC round trips, headers and clear errors for bad files."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

from subtomo.errors import InputError
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
