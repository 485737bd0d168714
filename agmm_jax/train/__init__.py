"""Training: the train state and optimizer (``state``), the jitted steps
(``steps``), the loop that drives a stage (``loop``: logging, evaluation,
checkpoints, NaN checks, SIGTERM) and the run (``trainer``)."""
