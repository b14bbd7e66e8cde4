"""`python -m largeml.train -m ...`: every job in its own sub-directory, and the sweep's summary
(`summary.csv`, `summary.md`) of their final metrics, written by `largeml.sweep.SweepSummary`."""

import csv
import json
from pathlib import Path

import pytest
from conftest import SMALL, run_cli
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from largeml.sweep import METRICS, SweepSummary, varying_overrides


def read_summary(sweep_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(sweep_dir / "summary.csv", newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.e2e
def test_sweep_writes_a_summary_of_every_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli("-m", "model=logreg,svm", "optimizer.lr=0.1,0.01",
                     f"hydra.sweep.dir={sweep_dir}", *SMALL, "trainer.max_epochs=1", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    for job in range(4):
        assert (sweep_dir / str(job) / "metrics.json").is_file(), job
    columns, rows = read_summary(sweep_dir)
    # Only the overrides that vary are columns: the SMALL ones are the same in every job.
    assert columns == ["job", "dir", "model", "optimizer.lr", *METRICS, "status"]
    assert [row["job"] for row in rows] == ["0", "1", "2", "3"]  # in job-number order
    assert {(row["model"], row["optimizer.lr"]) for row in rows} == {
        ("logreg", "0.1"), ("logreg", "0.01"), ("svm", "0.1"), ("svm", "0.01")}

    markdown = (sweep_dir / "summary.md").read_text()
    markdown_rows = markdown.splitlines()[2:]
    assert len(markdown_rows) == 4
    for row, markdown_row in zip(rows, markdown_rows, strict=True):
        job_dir = sweep_dir / row["dir"]
        overrides = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
        assert f"model={row['model']}" in overrides
        assert f"optimizer.lr={row['optimizer.lr']}" in overrides
        metrics = json.loads((job_dir / "metrics.json").read_text())
        for name in METRICS:
            assert float(row[name]) == metrics[name], (row["job"], name)  # the CSV loses nothing
        assert row["status"] == "ok, not converged"  # SMALL: trainer.tol=0, to the cap
        cells = [cell.strip() for cell in markdown_row.strip("|").split("|")]
        assert cells[:4] == [row["job"], row["dir"], row["model"], row["optimizer.lr"]]
        assert cells[4] == f"{metrics['val/accuracy']:.4f}"
        assert cells[-2:] == [str(metrics["step"]), "ok, not converged"]

    assert "sweep summary" in output
    assert markdown.strip() in output  # the table is logged at the end of the sweep


@pytest.mark.e2e
def test_a_failed_job_is_listed_and_the_sweep_goes_on(tmp_path):
    """A job with a bad value fails with its message; the sweep runs the jobs after it, the
    summary lists the failed one with no metrics, and the sweep's exit status says it failed."""
    sweep_dir = tmp_path / "sweep"
    result = run_cli("-m", "optimizer.lr=0.1,-0.1,0.05", f"hydra.sweep.dir={sweep_dir}", *SMALL,
                     "trainer.max_epochs=1", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "optimizer.lr must be a positive number, got -0.1" in output
    assert "Traceback" not in output and "1 of the sweep's jobs failed" in output

    columns, (first, failed, last) = read_summary(sweep_dir)
    assert columns == ["job", "dir", "optimizer.lr", *METRICS, "status"]
    for done, lr in ((first, "0.1"), (last, "0.05")):
        assert (done["optimizer.lr"], done["status"]) == (lr, "ok, not converged")
        metrics = json.loads((sweep_dir / done["dir"] / "metrics.json").read_text())
        assert float(done["val/accuracy"]) == metrics["val/accuracy"]
    assert failed["optimizer.lr"] == "-0.1"
    assert failed["status"] == ("failed: ConfigError: optimizer.lr must be a positive number, "
                                "got -0.1")
    assert all(failed[name] == "" for name in METRICS)
    assert "| failed: ConfigError:" in (sweep_dir / "summary.md").read_text()


@pytest.mark.unit
def test_a_job_that_raised_is_marked_failed(tmp_path):
    """Hydra hands the callback a raised exception (not an exit) as a FAILED JobReturn."""
    sweep_dir = tmp_path / "sweep"
    for num, lr in enumerate(["0.1", "0.01"]):
        hydra_dir = sweep_dir / str(num) / ".hydra"
        hydra_dir.mkdir(parents=True)
        OmegaConf.save({"hydra": {"job": {"num": num}}}, hydra_dir / "hydra.yaml")
        OmegaConf.save([f"optimizer.lr={lr}"], hydra_dir / "overrides.yaml")
    (sweep_dir / "0" / "metrics.json").write_text(json.dumps({"val/accuracy": 0.5, "step": 3}))
    config = OmegaConf.create({"hydra": {
        "mode": RunMode.MULTIRUN,
        "sweep": {"dir": str(sweep_dir)}, "runtime": {"output_dir": str(sweep_dir / "1")}}})
    job_return = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("out of memory"))

    summary = SweepSummary()
    summary.on_multirun_start(config)
    summary.on_job_end(config, job_return)
    with pytest.raises(SystemExit) as exit_:  # a sweep with a failed job exits with status 2
        summary.on_multirun_end(config)
    assert exit_.value.code == 2

    _, (ok, failed) = read_summary(sweep_dir)
    assert (ok["status"], ok["val/accuracy"], ok["val/auc"]) == ("ok", "0.5", "")
    assert failed["status"] == "failed: RuntimeError: out of memory"
    assert "| failed: RuntimeError: out of memory |" in (sweep_dir / "summary.md").read_text()


@pytest.mark.unit
def test_varying_overrides_keeps_keys_that_differ():
    jobs = [{"model": "svm", "seed": "1"}, {"model": "svm", "seed": "2", "loss": "hinge"}]
    assert varying_overrides(jobs) == [{"seed": "1", "loss": ""}, {"seed": "2", "loss": "hinge"}]


@pytest.mark.e2e
def test_single_run_writes_no_summary(tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", *SMALL, "trainer.max_epochs=1",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert not list(tmp_path.rglob("summary.*"))
    assert "sweep summary" not in result.stdout + result.stderr
    assert "SweepSummary" not in result.stdout + result.stderr  # no callback warnings either
    assert not (tmp_path / "outputs").exists()
