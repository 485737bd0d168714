"""What a run keeps on disk: Orbax checkpoints of the state and data
iterator (``checkpoint``) and TensorBoard event files (``summary``)."""
