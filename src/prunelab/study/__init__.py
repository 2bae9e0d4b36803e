"""Studies: fair comparisons of pruning methods, many lab runs from one file.

A study file names a grid (models x datasets x methods x targets x seeds) and one training recipe with
per-method overrides; ``run_study`` expands it into ordinary lab runs (``expand``), runs the missing ones
on an engine (``engines``: this process, N local processes, or a Ray cluster) and records every outcome
in study.json (``record``); ``write_report`` turns the folder into report.md and plots. See
docs/studies.md.
"""

from .expand import PlannedRun, expand
from .runner import default_folder, plan_study, run_study
from .spec import StudySpec, load_spec


def write_report(study_dir, references=None):
    """report.md and its PNG plots for a study folder (``prunelab report``); returns report.md's path."""
    from .report import write_report as _write

    return _write(study_dir, references)


__all__ = ["PlannedRun", "StudySpec", "default_folder", "expand", "load_spec", "plan_study", "run_study",
           "write_report"]
