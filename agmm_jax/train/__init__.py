"""Training: the run spec resolved once from the config and the data
(``run_spec``), the train state and optimizer (``state``), the jitted steps
(``steps``), the stages of a run and their runner (``stages``), the loop that
drives a training stage (``loop``: logging, evaluation, checkpoints, NaN
checks, SIGTERM) and the run (``trainer``)."""
