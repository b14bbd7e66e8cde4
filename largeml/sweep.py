"""A sweep's summary: after `python -m largeml.train -m ...`, a table of every job's final metrics.

`SweepSummary` is a Hydra callback (registered under `hydra.callbacks` in `configs/train.yaml`)
that writes `summary.csv` and `summary.md` into the sweep directory and logs the Markdown table
when the sweep ends. One row per job, in job-number order: the job number, its sub-directory,
the overrides that differ between jobs, the final metrics from its `metrics.json` and a status.
A single run (no `-m`) writes no summary.
"""

import csv
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from largeml.distributed import Processes
from largeml.files import replace_text

log = logging.getLogger(__name__)

METRICS = ["val/accuracy", "val/auc", "val/loss", "train/loss", "perf/samples_per_sec", "step"]
# How the Markdown table shows each metric; the CSV keeps the values as metrics.json has them.
MARKDOWN_FORMAT = {"perf/samples_per_sec": "{:,.0f}", "step": "{}"}


# Job directory -> the error that ended the job: filled by train.main, which in a sweep logs a
# job's error and returns (no traceback), so that Hydra goes on with the other jobs.
FAILED: dict[str, str] = {}


def record_failure(job_dir: str, error: BaseException) -> None:
    FAILED[os.path.abspath(job_dir)] = f"{type(error).__name__}: {error}"


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.failures = FAILED  # also the jobs Hydra saw raise (on_job_end)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.failures.clear()

    # Hydra stops a sweep at a job that exits the process (train.py exits with status 2 on a
    # bad config, 143 on SIGTERM) and calls neither on_job_end nor on_multirun_end, and it
    # skips on_multirun_end after a job that raised. So the summary is also rewritten as each
    # job starts and ends: whatever stops the sweep, the table shows every job it started.
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:  # job callbacks also fire for a single run
            write_summary(Path(config.hydra.sweep.dir), self.failures)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # `.return_value` would raise it
            record_failure(config.hydra.runtime.output_dir, error)
        write_summary(Path(config.hydra.sweep.dir), self.failures)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        markdown = write_summary(sweep_dir, self.failures)
        if markdown:
            log.info("sweep summary (%s, %s):\n%s", sweep_dir / "summary.csv",
                     sweep_dir / "summary.md", markdown.rstrip())
        if self.failures:  # the sweep's exit status says that some job failed
            log.error("%d of the sweep's jobs failed; see %s", len(self.failures),
                      sweep_dir / "summary.md")
            sys.exit(2)


def write_summary(sweep_dir: Path, failures: dict[str, str]) -> str:
    """Writes `summary.csv` and `summary.md` for the jobs found in `sweep_dir`; returns the
    Markdown table ("" on ranks other than 0, which write nothing)."""
    if not Processes.from_env().main:
        return ""
    job_dirs = [path.parent.parent for path in sweep_dir.rglob(".hydra/overrides.yaml")]
    rows = sorted((job_row(job_dir, sweep_dir, failures) for job_dir in job_dirs),
                  key=lambda row: row["job"])
    overrides = varying_overrides([row.pop("overrides") for row in rows])
    for row, varying in zip(rows, overrides, strict=True):
        row.update(varying)
    columns = ["job", "dir", *(overrides[0] if overrides else {}), *METRICS, "status"]

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    replace_text(sweep_dir / "summary.csv", text.getvalue())
    markdown = markdown_table(columns, rows)
    replace_text(sweep_dir / "summary.md", markdown)
    return markdown


def job_row(job_dir: Path, sweep_dir: Path, failures: dict[str, str]) -> dict[str, Any]:
    """One job: its number, sub-directory, overrides ({key: value}), metrics and status."""
    hydra_cfg = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml")
    overrides = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
    row: dict[str, Any] = {
        "job": hydra_cfg.hydra.job.num,
        "dir": job_dir.relative_to(sweep_dir).as_posix(),
        "overrides": dict(override.split("=", 1) if "=" in override else (override, "")
                          for override in overrides),
    }
    metrics_path = job_dir / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text())
    except FileNotFoundError:
        metrics, status = {}, "no metrics.json"
    except json.JSONDecodeError as err:
        metrics, status = {}, f"unreadable metrics.json: {err}"
    else:
        stopped = metrics.get("stopped")
        status = ("ok" if stopped in (None, "converged") else
                  "ok, not converged" if stopped in ("max_epochs", "max_steps") else
                  f"stopped: {stopped}")
    failure = failures.get(os.path.abspath(job_dir))
    row.update({name: metrics.get(name, "") for name in METRICS})
    row["status"] = f"failed: {failure}" if failure else status
    return row


def varying_overrides(overrides: list[dict[str, str]]) -> list[dict[str, str]]:
    """Each job's overrides, keeping only the keys whose value is not the same in every job
    (a key some jobs lack counts as varying; those jobs show it empty)."""
    keys = [key for key in dict.fromkeys(k for job in overrides for k in job)
            if len({job.get(key) for job in overrides}) > 1]
    return [{key: job.get(key, "") for key in keys} for job in overrides]


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    def cell(column: str, value: Any) -> str:
        if isinstance(value, float) and column in METRICS:
            return MARKDOWN_FORMAT.get(column, "{:.4f}").format(value)
        return str(value).replace("|", "\\|").replace("\n", " ")

    numeric = set(METRICS) | {"job"}
    lines = ["| " + " | ".join(f"`{c}`" if c in METRICS else c for c in columns) + " |",
             "|" + "|".join("---:" if c in numeric else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
