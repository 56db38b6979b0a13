"""`rayft tune`: a Ray Tune search whose trials are Ray Train runs; the best adapter is published.

Ray 2.60 runs Train V2, where a `TorchTrainer` cannot be handed to a `Tuner` directly.
Each trial is instead a small driver function (`trial_driver`) that builds the trial's
job spec from the base spec and its sampled config, fits a `TorchTrainer` through
`trainers.run.build_trainer`, and forwards every Train report to Tune with
`TuneReportCallback` (which adds the reported checkpoint's storage path as
`checkpoint_path`). ASHA stops weak trials at evaluations; a trial that fails is retried
and then recorded as errored, never fatal to the search.

Storage layout (next to ordinary runs):

    tune/<run_id>/job.json                    the base job spec the search started from
    tune/<run_id>/...                         Ray Tune's experiment state (what --resume restores)
    tune/<run_id>/results.{csv,json}, search.png   written when the search ends (json last)
    runs/<run_id>-<trial_id>/step-XXXXXXXX/   each trial's own Train checkpoints

The package, by seam: `space` (the search space as Tune domains, a trial's job spec), `progress` (the Tune
callbacks that keep a record per trial), `results` (records, the results table and plot, saved and loaded),
`search` (pre-flight, the trial driver, searcher and scheduler, running, resuming and promoting).
"""

from trainers.tune.progress import ProgressFn, TrialProgress, describe_config
from trainers.tune.results import (
    CHECKPOINT_PATH,
    METRIC,
    MODE,
    RESULTS_CSV,
    RESULTS_JSON,
    RESULTS_PNG,
    TUNE_DIR,
    SearchResult,
    TrialRecord,
    load_search,
    results_csv,
    save_results,
)
from trainers.tune.search import (
    DRIVER_CPU,
    SearcherUnavailable,
    SearchFailed,
    max_concurrent_trials,
    preflight,
    resume_search,
    run_search,
    trial_driver,
)
from trainers.tune.space import SearchContext, grid_size, param_space, trial_spec

__all__ = [
    "CHECKPOINT_PATH", "DRIVER_CPU", "METRIC", "MODE", "RESULTS_CSV", "RESULTS_JSON", "RESULTS_PNG", "TUNE_DIR",
    "ProgressFn", "SearchContext", "SearchFailed", "SearchResult", "SearcherUnavailable", "TrialProgress", "TrialRecord",
    "describe_config", "grid_size", "load_search", "max_concurrent_trials", "param_space", "preflight", "results_csv",
    "resume_search", "run_search", "save_results", "trial_driver", "trial_spec",
]
