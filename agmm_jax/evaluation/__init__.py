"""Evaluation: prediction modes and confusion accumulation (``evaluator``),
scores (``metrics``), label colouring and overlays (``visualize``), and the
eval and predict modes of a workdir (``modes``)."""
