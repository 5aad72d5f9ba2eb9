"""Job directories, markers, job.star and pipeline lineage."""

from __future__ import annotations

import dataclasses

import pytest
import starfile

from subtomo.project import job_lineage, read_pipeline, run_job


@dataclasses.dataclass
class _Params:
    box: int = 64
    float16: bool = True


def test_jobs_numbered_with_markers_and_lineage(tmp_path):
    with run_job("Extract", _Params(), project_dir=tmp_path) as (job, outputs):
        (job.path("particles.star")).write_text("data_\n")
        outputs["Extract/job001/particles.star"] = "ParticleGroupMetadata.star"
    assert job.directory == tmp_path / "Extract" / "job001"
    assert (job.directory / "RELION_JOB_EXIT_SUCCESS").exists()
    options = starfile.read(job.path("job.star"), always_dict=True)["joboptions_values"]
    assert dict(
        zip(options["rlnJobOptionVariable"], options["rlnJobOptionValue"], strict=True)
    ) == {
        "box": "64",
        "float16": "Yes",
    }
    with (
        pytest.raises(RuntimeError),
        run_job(
            "Reconstruct",
            _Params(),
            project_dir=tmp_path,
            inputs={"Extract/job001/particles.star": "ParticleGroupMetadata.star"},
        ) as (job2, _),
    ):
        raise RuntimeError("boom")
    assert job2.directory.name == "job002"
    assert (job2.directory / "RELION_JOB_EXIT_FAILURE").exists()
    assert "boom" in job2.path("run.err").read_text()
    tables = read_pipeline(tmp_path)
    status = dict(
        zip(
            tables["pipeline_processes"]["rlnPipeLineProcessName"],
            tables["pipeline_processes"]["rlnPipeLineProcessStatusLabel"],
            strict=True,
        )
    )
    assert status == {"Extract/job001/": "Succeeded", "Reconstruct/job002/": "Failed"}
    assert job_lineage(tables) == {"Reconstruct/job002/": ["Extract/job001/"]}
    assert int(tables["pipeline_general"]["rlnPipeLineJobCounter"]) == 3
