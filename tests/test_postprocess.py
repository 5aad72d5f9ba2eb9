"""Post-processing: FSC correction, Guinier fit, weighting, the job's files, and agreement
with Debian's relion_postprocess (3.1) on simulated half maps."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch

from subtomo.fourier import (
    bfactor_weights,
    crossing_shell,
    fsc,
    fsc_threshold_shell,
    irfft_centered,
    radius_grid,
    rfft_centered,
    shell_index,
)
from subtomo.io import read_mrc, read_star, write_mrc, write_star
from subtomo.jobs.postprocess import PostprocessParams, run
from subtomo.postprocess import (
    PostprocessOptions,
    corrected_fsc,
    fit_guinier,
    fsc_weights,
    guinier_curve,
    postprocess,
    randomize_phases_beyond,
)

N, NOISE, TRUE_B = 64, 0.04, 300.0


@pytest.fixture(scope="module")
def halves(tmp_path_factory, shared_data):
    """64^3 ribosome (5 Å/px) blurred by B = 300 plus independent white noise per half,
    and a soft mask; written to disk for the jobs and RELION."""
    vol, px = read_mrc(shared_data / "maps" / "ribosome70S_4v4r_5A.mrc.gz")
    vol = vol[14:78, 14:78, 14:78] / vol.max()
    sig = irfft_centered(rfft_centered(vol, 3) * bfactor_weights((N,) * 3, TRUE_B, px), (N,) * 3)
    g = torch.Generator().manual_seed(3)
    h1 = sig + NOISE * torch.randn(sig.shape, generator=g)
    h2 = sig + NOISE * torch.randn(sig.shape, generator=g)
    from subtomo.masks import mask_from_map

    mask = mask_from_map(sig, 0.05, extend=2, soft_edge_width=4)
    d = tmp_path_factory.mktemp("pp")
    for name, v in [("run_half1.mrc", h1), ("run_half2.mrc", h2), ("mask.mrc", mask)]:
        write_mrc(d / name, v, px)
    return d, h1, h2, mask, px


def test_corrected_fsc_formula():
    """Below randomize+2 the masked FSC is kept; beyond, (m - r)/(1 - r), and 0 where the
    randomised FSC exceeds the masked one (RELION's calculateFSCtrue)."""
    m = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.2])
    r = torch.tensor([1.0, 0.9, 0.5, 0.5, 0.2, 0.6, 0.1])
    out = corrected_fsc(m, r, 2).tolist()
    assert out[:4] == pytest.approx([1.0, 0.9, 0.8, 0.7])
    assert out[4] == pytest.approx((0.6 - 0.2) / 0.8)
    assert out[5] == 0.0
    assert out[6] == pytest.approx(0.1 / 0.9)


def test_fsc_threshold_shell_and_interpolated_crossing():
    """The last shell before the first drop below 0.143, and the linear crossing."""
    curve = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.1, 0.3, 0.0])
    assert fsc_threshold_shell(curve) == 3
    assert crossing_shell(curve) == pytest.approx(3 + (0.2 - 0.143) / 0.1)
    assert fsc_threshold_shell(torch.ones(5)) == 4
    # shell 0 compares the maps' means, whose sign is noise in unfiltered half maps
    flipped = curve.clone()
    flipped[0] = -1.0
    assert fsc_threshold_shell(flipped) == 3
    assert crossing_shell(flipped) == pytest.approx(3 + (0.2 - 0.143) / 0.1)
    assert crossing_shell(torch.tensor([1.0, 0.1, 0.5])) == 0


def test_randomized_phases_keep_amplitudes(device):
    """Amplitudes are unchanged everywhere, components below the shell are untouched, and
    beyond it the randomised map no longer correlates with the original."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 32, 32, generator=g).to(device)
    f = rfft_centered(x, 3)
    r = randomize_phases_beyond(f, (32,) * 3, 6, torch.Generator().manual_seed(1))
    torch.testing.assert_close(r.abs(), f.abs(), rtol=1e-4, atol=1e-4)
    below = radius_grid((32,) * 3, device=device) < 5.9
    torch.testing.assert_close(r[below], f[below])
    curve = fsc(f, r, (32,) * 3)
    assert curve[:6].min() > 0.999 and curve[8:].abs().max() < 0.25


def test_guinier_fit_recovers_known_bfactor(device):
    """White noise blurred by exp(-B k^2/4) has ln|F| falling with slope -B/4: the fitted
    sharpening B-factor (4 x slope) is -B within 5% (an error in the 1/d^2 axis, the factor 4
    or the sign would be off by far more)."""
    n, px, b = 64, 2.0, 120.0
    g = torch.Generator().manual_seed(0)
    f = rfft_centered(torch.randn(n, n, n, generator=g).to(device), 3, norm="forward")
    f = f * bfactor_weights((n,) * 3, b, px, device=device)
    x, y = guinier_curve(f, (n,) * 3, px, shell_index((n,) * 3, device=device))
    fit = fit_guinier(x, y, n, px, lowres=20.0, highres=5.0)
    assert fit.bfactor == pytest.approx(-b, rel=0.05)
    assert fit.correlation > 0.98


def test_fsc_weights_cut_at_first_tiny_fsc(device):
    """sqrt(2F/(1+F)) per shell and 0 from the first shell with FSC < 1e-4 on, even if the
    curve comes back up later."""
    curve = torch.tensor([1.0, 0.8, 0.5, 0.00001, 0.5, 0.3, 0.2, 0.1, 0.1], device=device)
    w = fsc_weights(curve, (16, 16, 16))
    r = torch.round(radius_grid((16, 16, 16), device=device)).long()
    assert w[r == 1].unique().tolist() == pytest.approx([np.sqrt(1.6 / 1.8)])
    assert w[r == 2].unique().tolist() == pytest.approx([np.sqrt(1.0 / 1.5)])
    assert w[r >= 3].abs().max() == 0


def test_postprocess_job_writes_relion_files(halves, tmp_path):
    """The job (via --ios) writes the maps, the STAR tables with RELION's labels, plots, the
    report and the optimisation set pointing at postprocess.star; the corrected resolution
    lies within a shell of the resolution of the half maps against the noise-free truth."""
    d, _h1, _h2, mask, _px = halves
    write_star(
        tmp_path / "run_optimisation_set.star",
        {"": {"rlnTomoReferenceMap1File": str(d / "run_half1.mrc"),
              "rlnTomoReferenceMap2File": str(d / "run_half2.mrc"),
              "rlnTomoParticlesFile": "particles.star"}},
    )  # fmt: skip
    out = tmp_path / "PostProcess" / "job005"
    res = run(
        PostprocessParams(
            ios=str(tmp_path / "run_optimisation_set.star"), mask=str(d / "mask.mrc"),
            autob_lowres=40, autob_highres=22, output_dir=str(out), project_dir=str(tmp_path),
            device="cpu",
        )
    )  # fmt: skip
    for name in ["postprocess.mrc", "postprocess_masked.mrc", "postprocess.star", "fsc.png",
                 "guinier.png", "postprocess.html", "postprocess_fsc.xml",
                 "postprocess_optimisation_set.star", "RELION_JOB_EXIT_SUCCESS"]:  # fmt: skip
        assert (out / name).is_file(), name
    star = read_star(out / "postprocess.star")
    assert star["general"]["rlnFinalResolution"] == pytest.approx(res.resolution)
    assert {
        "rlnFourierShellCorrelationCorrected",
        "rlnFourierShellCorrelationMaskedMaps",
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps",
        "rlnFourierShellCorrelationParticleMaskFraction",
    } <= set(star["fsc"].columns)
    assert {"rlnLogAmplitudesOriginal", "rlnLogAmplitudesWeighted", "rlnLogAmplitudesSharpened",
            "rlnLogAmplitudesIntercept"} <= set(star["guinier"].columns)  # fmt: skip
    oset = read_star(out / "postprocess_optimisation_set.star")[""]
    assert oset["rlnTomoReferenceFscFile"].endswith("postprocess.star")
    assert oset["rlnTomoParticlesFile"] == "particles.star"
    assert "data:image/png;base64," in (out / "postprocess.html").read_text()
    masked, _ = read_mrc(out / "postprocess_masked.mrc")
    torch.testing.assert_close(masked, res.sharpened * mask, atol=1e-5, rtol=1e-4)
    # Ground truth: FSC_true approximates the masked map's agreement with the truth,
    # sqrt(FSC_half) ~ FSC(map, truth) at the half-map resolution.
    assert 12.0 < res.resolution < 25.0 and res.bfactor < 0


def _relion(d: Path, out: Path, *flags: str) -> dict:
    if shutil.which("relion_postprocess") is None:
        pytest.skip("relion_postprocess not installed")
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["relion_postprocess", "--i", str(d / "run_half1.mrc"), "--i2",
           str(d / "run_half2.mrc"), "--o", str(out / "postprocess"), *flags]  # fmt: skip
    # RELION 3.1 exits with an error after writing when ghostscript (logfile.pdf) is absent.
    subprocess.run(cmd, capture_output=True, check=False)
    if not (out / "postprocess.star").exists():
        pytest.fail("relion_postprocess wrote no postprocess.star")
    return starfile.read(out / "postprocess.star", always_dict=True)


@pytest.mark.relion
def test_matches_relion_without_mask(halves, tmp_path):
    """Without a mask everything is deterministic: same resolution, same fitted B-factor,
    same sharpened map as relion_postprocess (auto B and ad-hoc B + low-pass)."""
    d, h1, h2, _, px = halves
    ref = _relion(d, tmp_path / "a", "--auto_bfac", "--autob_lowres", "40")
    ours = postprocess(h1, h2, px, None, PostprocessOptions(autob_lowres=40, low_pass=0))
    assert ours.resolution == pytest.approx(ref["general"]["rlnFinalResolution"], rel=1e-5)
    assert ours.bfactor == pytest.approx(ref["general"]["rlnBfactorUsedForSharpening"], rel=1e-4)
    m, _ = read_mrc(tmp_path / "a" / "postprocess.mrc")
    assert (m - ours.sharpened).abs().max() < 1e-4 * m.abs().max()
    ref = _relion(d, tmp_path / "b", "--adhoc_bfac", "-250", "--low_pass", "18")
    ours = postprocess(
        h1, h2, px, None, PostprocessOptions(auto_bfac=False, adhoc_bfac=-250, low_pass=18)
    )
    m, _ = read_mrc(tmp_path / "b" / "postprocess.mrc")
    assert (m - ours.sharpened).abs().max() < 1e-4 * m.abs().max()


@pytest.mark.relion
def test_matches_relion_with_mask_and_mtf(halves, tmp_path, shared_data):
    """With a mask (random phases differ) the final resolution agrees within one Fourier
    shell and the B-factor within 10%; the masked FSC is identical and the MTF-corrected
    Guinier curve agrees to 5e-3 (RELION 3.1 picks its interpolation interval slightly off)."""
    d, h1, h2, mask, px = halves
    mtf_path = shared_data / "formats" / "mtf" / "mtf_falcon4EC_300kV.star"
    ref = _relion(d, tmp_path / "c", "--mask", str(d / "mask.mrc"), "--auto_bfac",
                  "--autob_lowres", "40", "--autob_highres", "22", "--mtf", str(mtf_path),
                  "--mtf_angpix", "1.0")  # fmt: skip
    table = read_star(mtf_path)
    block = next(iter(table.values()))
    opts = PostprocessOptions(
        autob_lowres=40, autob_highres=22, low_pass=0,
        mtf_frequency=block["rlnResolutionInversePixel"].to_numpy(float),
        mtf_value=block["rlnMtfValue"].to_numpy(float), mtf_pixel_size=1.0,
    )  # fmt: skip
    ours = postprocess(h1, h2, px, mask, opts)
    g = ref["general"]
    shell_ref = round(N * px / g["rlnFinalResolution"])
    assert abs(ours.resolution_shell - shell_ref) <= 1
    assert ours.bfactor == pytest.approx(g["rlnBfactorUsedForSharpening"], rel=0.10)
    assert ours.solvent_fraction == pytest.approx(g["rlnParticleBoxFractionSolventMask"], 1e-4)
    gref = ref["guinier"]["rlnLogAmplitudesMTFCorrected"].to_numpy()
    np.testing.assert_allclose(ours.guinier["rlnLogAmplitudesMTFCorrected"], gref, atol=5e-3)
    fref = ref["fsc"]["rlnFourierShellCorrelationMaskedMaps"].to_numpy()
    np.testing.assert_allclose(ours.fsc_masked, fref, atol=1e-4)


def test_fsc_command_against_truth(halves, tmp_path):
    """``subtomo fsc`` between the two halves prints the crossings and writes the table;
    its 0.143 shell equals the unmasked half-map FSC computed directly."""
    from typer.testing import CliRunner

    from subtomo.cli.main import app

    d, h1, h2, *_ = halves
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        app, ["fsc", str(d / "run_half1.mrc"), str(d / "run_half2.mrc"), "--o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "FSC = 0.143" in result.output
    table = read_star(out.with_name("cmp.star"))["fsc"]
    direct = fsc(rfft_centered(h1, 3), rfft_centered(h2, 3), (N,) * 3)
    np.testing.assert_allclose(table["rlnFourierShellCorrelation"], direct.numpy(), atol=1e-5)
    assert out.with_name("cmp.png").is_file()


def test_bad_mask_is_reported_with_its_file(halves, tmp_path):
    """A mask outside [0, 1] is an InputError naming the mask file, not a traceback."""
    from subtomo.errors import InputError

    d, h1, *_ = halves
    write_mrc(tmp_path / "bad.mrc", h1 * 10, 5.0)
    with pytest.raises(InputError, match=r"bad\.mrc.*mask values"):
        run(
            PostprocessParams(
                i=str(d / "run_half1.mrc"),
                mask=str(tmp_path / "bad.mrc"),
                output_dir=str(tmp_path / "o"),
                project_dir=str(tmp_path),
                device="cpu",
            )
        )
