"""STAR round trips keep values and dtypes; CR+LF files load; errors name the place."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from subtomo.errors import InputError
from subtomo.io import format_vector, numeric_column, parse_vector, read_star, write_star


def test_round_trip_keeps_values_and_dtypes(tmp_path):
    """Integral floats (rlnTomoHand -1.0) must come back as floats, number-like names as
    text, vectors as one token; otherwise a write -> read changes a RELION table."""
    table = pd.DataFrame(
        {
            "rlnTomoName": ["001", "TS_2"],
            "rlnTomoHand": [-1.0, 1.0],
            "rlnDefocusU": [12345.678901, 1e-7],
            "rlnTomoSizeX": [4000, 4096],
            "rlnTomoVisibleFrames": ["[1,0,1]", "[1,1,1]"],
        }
    )
    write_star(tmp_path / "t.star", {"global": table, "general": {"a": 2.0, "b": True}})
    back = read_star(tmp_path / "t.star")
    pd.testing.assert_frame_equal(back["global"], table)
    assert back["general"] == {"a": 2.0, "b": 1}
    assert "\t-1.0\t" in (tmp_path / "t.star").read_text()


def test_crlf_file_loads(tmp_path):
    """RELION rejects CR+LF; we accept it (files edited on Windows)."""
    text = "data_global\r\n\r\nloop_\r\n_rlnTomoName #1\r\n_rlnVoltage #2\r\nTS_01 300.0\r\n"
    (tmp_path / "crlf.star").write_bytes(text.encode())
    table = read_star(tmp_path / "crlf.star")["global"]
    assert table["rlnTomoName"].tolist() == ["TS_01"]
    assert table["rlnVoltage"].tolist() == [300.0]


def test_numeric_column_names_row():
    """A non-number must be reported at its 1-based row, not as a pandas error."""
    df = pd.DataFrame({"rlnVoltage": [300.0, "abc"]})
    with pytest.raises(InputError, match=r"f\.star, block data_optics, column rlnVoltage, row 2"):
        numeric_column(df, "rlnVoltage", "f.star", "optics")


def test_vectors():
    """RELION's vector labels are one token without spaces."""
    assert format_vector(np.array([1, 0, 1])) == "[1,0,1]"
    assert parse_vector("[0.5,-2,1e3]") == [0.5, -2.0, 1000.0]
    with pytest.raises(ValueError):
        parse_vector("1,0,1")
