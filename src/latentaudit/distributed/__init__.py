"""The Ray engine (``--engine ray``, extra ``latentaudit[ray]``): a stage's work spread over the
workers of a Ray cluster, each holding its own copy of the model.

1. Connect (:mod:`.pool`): join the cluster at ``--ray-address``, or start a local one for the
   run; start ``--ray-workers`` workers, each of which loads the model from the same name or
   path on first use.
2. Cut the stage's work into independent tasks and run them on idle workers:
   - attribute (:mod:`.attribute`): shards of batches; each worker returns its float64 moment
     sums, the driver adds them in batch order and finishes as the local path does;
   - sample (:mod:`.sample`): batches of (prompt, sample index) rows, each seeded by its own
     row, so the completions are those of the local path;
   - steer (:mod:`.steer`): batches of steered (condition, prompt, sample) rows;
   - judge (:mod:`.judge`): chunks of completions, each worker building the judge once.
3. Stream: every result is written to the run folder by the driver as soon as it arrives
   (a shard file, or lines appended and fsynced), so a worker that dies loses only its task in
   flight. Ray restarts it and retries the task (``--ray-retries``); past that the run stops and
   a rerun of the same command does only what is missing.

Without Ray installed, ``--engine ray`` is one error that says how to install it; the local
engine (the default) never imports Ray.
"""

from latentaudit.executor import ENGINES, EngineConfig

__all__ = ["ENGINES", "EngineConfig"]
