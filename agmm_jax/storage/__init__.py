"""What a run keeps on disk: Orbax checkpoints of the state and data
iterator (``checkpoint``), TensorBoard event files (``summary``) and the
workdir's records (``workdir``: config.json, classes.json, which stage
folder holds a checkpoint)."""
