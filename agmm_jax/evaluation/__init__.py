"""Evaluation: the one evaluator that training, eval mode and every stage
call (``evaluator``: EvalSpec, make_evaluator, the prediction modes, scores'
printing and scalars), the confusion and score math (``metrics``), label
colouring and overlays (``visualize``), and the eval and predict modes of a
workdir (``modes``)."""
