"""The Neuro-Degeneracy Analytic Analysis Framework: experiments run over datasets.

Each experiment is a module with `NAME`, a `Params` dataclass, and
`run(ctx, facts, params) -> Report`.  `dkn.experiments.runner.run_experiment`
gives it a `Context` whose `each()` makes every per-item step resumable
(results go to the on-disk store as they come) and shows progress.
"""

from dkn.experiments.runner import EXPERIMENTS, Context, Report, run_experiment  # noqa: F401
