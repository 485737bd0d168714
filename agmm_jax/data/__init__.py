"""The data path: prepared TFRecord datasets to device batches.

``labels`` (the label convention), ``tfrecord`` (TF-free record framing and
``tf.train.Example`` coding), ``augment`` (per-example crops, flips, scales),
``input_pipeline`` (Grain pipelines: train iterator with exact resumption,
eval iterator on a fixed canvas, the metadata of a prepared dataset),
``pseudo_labels`` (a prepared dataset written from a model's predictions,
and its quality against the dense labels).
"""
