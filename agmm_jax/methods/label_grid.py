"""Per-pixel loss terms at label resolution, in loops over row chunks.

The partial cross-entropy, the absent-class term and the two cross-entropies of
AGMM's GMM term (prediction vs. the GMM response ``G``, ``G`` vs. the labels)
all read the softmax at every label pixel. Written as whole-array expressions,
XLA materializes a dozen or more ``[B, H, W, K]`` intermediates, and on a CPU
each is a pass over memory (35 MB at VOC shapes); here everything runs in
loops over chunks of label rows, every image and class in each step, so a
chunk's intermediates stay in cache and the logits' gradient is the only
full-size array written. The loops run over rows, never images or classes, so
a batch-sharded input stays data-parallel.

:func:`label_grid_losses` computes any subset of ``LABEL_GRID_TERMS`` with one
softmax pass (:func:`prediction_pass`), a second loop for the labeled pixels'
GMM cross-entropy and a hand-written gradient (``_label_grid_sums_bwd``). ``G``
lives on the feature grid and is supplied by the caller (``agmm_jax.methods.
agmm``); it is upsampled chunk by chunk (``agmm_jax.model.resample``).
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from agmm_jax.data import labels as labels_lib
from agmm_jax.model import resample
from agmm_jax.methods import core
from agmm_jax.methods.core import EPSILON

# The terms this module computes.
LABEL_GRID_TERMS = ('pce', 'absent_class', 'gmm')
# Label rows per step of the loops (values do not depend on it; 16 was fastest
# of 8 / 16 / 32 / 64 at VOC shapes on the 2-core CPU).
ROWS_PER_CHUNK = 16


def check_rows_per_chunk(rows_per_chunk) -> None:
  """The option check of the label-grid terms."""
  if not isinstance(rows_per_chunk, int) or rows_per_chunk < 1:
    raise ValueError(f'loss_config.rows_per_chunk must be an integer >= 1, '
                     f'got {rows_per_chunk!r}')


def _row_chunks(height: int, rows_per_chunk: int) -> tuple[int, int]:
  """``(rows, num_chunks)``: chunk height (at most ``height``) and count."""
  if int(rows_per_chunk) < 1:
    raise ValueError(f'rows_per_chunk must be >= 1, got {rows_per_chunk}')
  rows = min(int(rows_per_chunk), height)
  return rows, -(-height // rows)


def _row_slice(x: jax.Array, start: jax.Array, rows: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, start, rows, axis=1)


def _chunk_label(label: jax.Array, chunk: jax.Array, rows: int
                 ) -> tuple[jax.Array, jax.Array]:
  """First row and label rows ``[B, rows, W]`` of chunk number ``chunk``.

  The last chunk is moved up to end at the last row, and its rows that the
  previous chunk already covered are relabeled ``PADDING``, so that every row
  counts once (a chunk height need not divide the label height).
  """
  start = jnp.minimum(chunk * rows, label.shape[1] - rows)
  return start, jnp.where(_fresh_rows(start, chunk, rows)[None, :, None],
                          _row_slice(label, start, rows), labels_lib.PADDING)


def _chunk_pixels(label: jax.Array, chunk: jax.Array, rows: int, num_classes: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``(start, one_hot, labeled, real)`` of a row chunk, masks ``[B, rows, W, 1]``."""
  start, chunk_label = _chunk_label(label, chunk, rows)
  return (start, chunk_label[..., None] == jnp.arange(num_classes),
          labels_lib.labeled_mask(chunk_label)[..., None],
          labels_lib.real_mask(chunk_label)[..., None])


def _fresh_rows(start: jax.Array, chunk: jax.Array, rows: int) -> jax.Array:
  """``[rows]`` bool: the rows of chunk ``chunk`` (first row ``start``) that
  no earlier chunk covered (all but the overlap of a moved-up last chunk)."""
  return start + jnp.arange(rows) >= chunk * rows


def _softmax_and_log(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(softmax, log_softmax)`` over the last axis, one ``exp`` per entry
  (``jax.nn.log_softmax`` followed by ``exp`` would take two)."""
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  exponentials = jnp.exp(shifted)
  total = jnp.sum(exponentials, axis=-1, keepdims=True)
  return exponentials * (1.0 / total), shifted - jnp.log(total)


def prediction_pass(logits: jax.Array, label: jax.Array, class_present: jax.Array,
                    feature_size: tuple[int, int], rows_per_chunk: int, dtype, *,
                    terms: tuple[str, ...] = (), grid_weights: dict[str, jax.Array] | None = None,
                    with_sigma_weights: bool = False) -> dict[str, jax.Array]:
  """Everything at label resolution that needs the softmax but not ``G``.

  One loop over row chunks. With ``p = softmax(z)``, ``a`` the absent-class
  and ``w`` the GMM class weights of ``grid_weights``
  (:func:`_label_grid_weights`) and ``up^T`` the adjoint of the bilinear
  upsampling from the feature grid (a pull-down), the sums of the ``terms``
  (:func:`label_grid_losses`) before normalization::

      pce            = -sum_{x labeled} log p_{y(x)}(x)
      absent_class   = -sum_{x real} sum_k a_k log(1 - p_k + e)
      gmm_prediction = -sum_{x real} sum_k w_k log(1 - p_k + e)           (the G-free part)
      gmm_slope      = up^T[real w (log(p + e) - log(1 - p + e))]   [B, h, w, K]

  so that the prediction cross-entropy of the GMM term is
  ``gmm_prediction - sum_s G(s) gmm_slope(s)`` for any response ``G`` on the
  feature grid: it is linear in ``up(G)``. With ``with_sigma_weights``, also the
  paper's sigma weights ``u = p * class_present`` on unlabeled pixels:
  ``sigma_weights = up^T u [B, h, w, K]`` and ``sigma_total = sum_x u [B, K]``.
  Differentiable in ``logits`` by autodiff (used so only for the sigma
  weights; the terms' gradient is written by hand in ``_label_grid_sums_bwd``).
  """
  batch, height, width = label.shape
  num_classes = logits.shape[-1]
  rows, num_chunks = _row_chunks(height, rows_per_chunk)
  present = class_present.astype(dtype)[:, None, None, :]
  if grid_weights is not None:
    absent = grid_weights['absent'][:, None, None, :]
    gmm_class = grid_weights['gmm_class'][:, None, None, :]

  def one_chunk(chunk, sums):
    start, one_hot, labeled, real = _chunk_pixels(label, chunk, rows, num_classes)
    probs, log_probs = _softmax_and_log(_row_slice(logits, start, rows).astype(dtype))
    added, pulled = {}, {}
    if 'pce' in terms:
      added['pce'] = -jnp.sum(jnp.where(one_hot, log_probs, 0.0))
    if 'absent_class' in terms or 'gmm' in terms:
      log_complement = jnp.log(1.0 - probs + EPSILON)
    if 'absent_class' in terms:
      added['absent_class'] = -jnp.sum(jnp.where(real, absent * log_complement, 0.0))
    if 'gmm' in terms:
      added['gmm_prediction'] = -jnp.sum(jnp.where(real, gmm_class * log_complement, 0.0))
      pulled['gmm_slope'] = jnp.where(
          real, gmm_class * (jnp.log(probs + EPSILON) - log_complement), 0.0)
    if with_sigma_weights:
      unlabeled_probs = jnp.where(real & ~labeled, probs * present, 0.0)
      added['sigma_total'] = jnp.sum(unlabeled_probs, axis=(1, 2))
      pulled['sigma_weights'] = unlabeled_probs
    for name, value in pulled.items():
      sums = {**sums, name: resample.add_pulled_rows(sums[name], value, start, height)}
    return {name: value + added[name] if name in added else value
            for name, value in sums.items()}

  half_pulled = jnp.zeros((batch, feature_size[0], width, num_classes), dtype)
  initial = {name: jnp.zeros((), dtype) for name in terms if name != 'gmm'}
  if 'gmm' in terms:
    initial['gmm_prediction'] = jnp.zeros((), dtype)
    initial['gmm_slope'] = half_pulled
  if with_sigma_weights:
    initial['sigma_total'] = jnp.zeros((batch, num_classes), dtype)
    initial['sigma_weights'] = half_pulled
  sums = jax.lax.fori_loop(0, num_chunks, one_chunk, initial)
  for name in ('gmm_slope', 'sigma_weights'):
    if name in sums:
      sums[name] = resample.pull_columns(sums[name], feature_size[1])
  return sums


def _label_grid_weights(label: jax.Array, class_present: jax.Array, num_classes: int,
                        dtype) -> dict[str, jax.Array]:
  """Normalizers of the label-grid terms (see :func:`label_grid_losses`)."""
  labeled_in_crop = (labels_lib.labeled_class_counts(label, num_classes, dtype) > 0).astype(dtype)
  return {
      'labeled_pixels': jnp.maximum(jnp.sum(labels_lib.labeled_mask(label)), 1).astype(dtype),
      'real_pixels': jnp.maximum(jnp.sum(labels_lib.real_mask(label)), 1).astype(dtype),
      'absent': 1.0 - class_present.astype(dtype),
      # The halving and the class average of the official BCE, in one factor.
      'gmm_class': labeled_in_crop / (2.0 * (jnp.sum(labeled_in_crop, -1, keepdims=True)
                                             + EPSILON)),
  }


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _label_grid_sums(logits: jax.Array, feature_response: jax.Array | None,
                     label: jax.Array, weights: dict[str, jax.Array],
                     passed: dict[str, jax.Array], terms: tuple[str, ...],
                     rows_per_chunk: int) -> tuple[jax.Array, ...]:
  """The values of ``terms`` (see :func:`label_grid_losses`), one per name.

  ``weights`` are :func:`_label_grid_weights` and ``passed`` the
  :func:`prediction_pass` of the same inputs: the forward adds only the part
  of the GMM term that is not linear in ``up(G)``. The VJP is the whole
  derivative in ``logits`` and ``feature_response``; ``weights`` and
  ``passed`` get none.
  """
  return _label_grid_sums_fwd(logits, feature_response, label, weights, passed,
                              terms, rows_per_chunk)[0]


def _label_grid_sums_fwd(logits, feature_response, label, weights, passed, terms,
                         rows_per_chunk):
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  num_classes = logits.shape[-1]
  height, width = label.shape[1:]
  values = {}
  if 'pce' in terms:
    values['pce'] = passed['pce'] / weights['labeled_pixels']
  if 'absent_class' in terms:
    values['absent_class'] = passed['absent_class'] / weights['real_pixels']
  gmm_slope = None
  if 'gmm' in terms:
    rows, num_chunks = _row_chunks(height, rows_per_chunk)
    gmm_class = weights['gmm_class'][:, None, None, :]
    response_columns = resample.upsample_columns(feature_response, width)

    def one_chunk(chunk, total):
      start, one_hot, labeled, _ = _chunk_pixels(label, chunk, rows, num_classes)
      response = resample.upsample_rows(response_columns, start, rows, height)
      # For the 0/1 target, t log a + (1 - t) log b is log(t ? a : b): one log.
      return total - jnp.sum(jnp.where(labeled, gmm_class * jnp.log(jnp.where(
          one_hot, response + EPSILON, 1.0 - response + EPSILON)), 0.0))

    response_sum = jax.lax.fori_loop(0, num_chunks, one_chunk, jnp.zeros((), dtype))
    gmm_slope = passed['gmm_slope']
    prediction_sum = passed['gmm_prediction'] - jnp.sum(feature_response * gmm_slope)
    values['gmm'] = (prediction_sum / weights['real_pixels']
                     + response_sum / weights['labeled_pixels'])
  return (tuple(values[name] for name in terms),
          (logits, feature_response, label, weights, gmm_slope))


def _label_grid_sums_bwd(terms, rows_per_chunk, residuals, cotangents):
  """Per chunk, with ``p = softmax(z)`` and the cotangents ``c_t`` of the terms
  divided by their pixel counts (``n_l`` labeled, ``n_r`` real)::

      dL/dp = real (c_absent a / (1 - p + e) + c_gmm w (-G / (p + e) + (1 - G) / (1 - p + e)))
      dL/dz = p (dL/dp - <p, dL/dp>) + labeled c_pce (p - onehot)
      dL/dG = w (real c_gmm / n_r (log(1 - p + e) - log(p + e))
                 + labeled c_gmm / n_l (onehot ? -1 / (G + e) : 1 / (1 - G + e)))

  (``a`` absent-class weights, ``w`` the GMM class weights), and ``dL/dG`` is
  pulled down to the feature grid by the adjoint of the upsampling. Its first
  line pulled down is ``-c_gmm / n_r * gmm_slope`` of the forward's pass, so
  the loop adds only the labeled pixels' part.
  """
  logits, feature_response, label, weights, gmm_slope = residuals
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  num_classes = logits.shape[-1]
  height, width = label.shape[1:]
  rows, num_chunks = _row_chunks(height, rows_per_chunk)
  cotangent = dict(zip(terms, cotangents))
  pce_scale = cotangent.get('pce', 0.0) / weights['labeled_pixels']
  absent_scale = (cotangent.get('absent_class', 0.0) / weights['real_pixels']
                  * weights['absent'][:, None, None, :])
  gmm_class = cotangent.get('gmm', 0.0) * weights['gmm_class'][:, None, None, :]
  prediction_scale = gmm_class / weights['real_pixels']
  response_scale = gmm_class / weights['labeled_pixels']

  def one_chunk(chunk, grads):
    logits_grad, response_grad = grads
    start, one_hot, labeled, real = _chunk_pixels(label, chunk, rows, num_classes)
    probs = jax.nn.softmax(_row_slice(logits, start, rows).astype(dtype), axis=-1)
    complement = 1.0 - probs + EPSILON
    probs_grad = None
    if 'absent_class' in terms:
      probs_grad = absent_scale / complement
    if 'gmm' in terms:
      response = resample.upsample_rows(response_columns, start, rows, height)
      prediction_grad = prediction_scale * (
          (1.0 - response) / complement - response / (probs + EPSILON))
      probs_grad = prediction_grad if probs_grad is None else probs_grad + prediction_grad
      # -1 / (G + e) for the labeled class, 1 / (1 - G + e) for the others.
      chunk_response_grad = jnp.where(labeled, response_scale / jnp.where(
          one_hot, -(response + EPSILON), 1.0 - response + EPSILON), 0.0)
      response_grad = resample.add_pulled_rows(response_grad, chunk_response_grad, start, height)
    chunk_grad = jnp.zeros_like(probs)
    if probs_grad is not None:
      probs_grad = jnp.where(real, probs_grad, 0.0)
      chunk_grad = probs * (probs_grad - jnp.sum(probs * probs_grad, axis=-1, keepdims=True))
    if 'pce' in terms:
      chunk_grad = chunk_grad + jnp.where(labeled, pce_scale * (probs - one_hot), 0.0)
    # Rows of the moved-up last chunk that an earlier chunk wrote keep that value.
    fresh = _fresh_rows(start, chunk, rows)[None, :, None, None]
    chunk_grad = jnp.where(fresh, chunk_grad.astype(logits.dtype),
                           _row_slice(logits_grad, start, rows))
    logits_grad = jax.lax.dynamic_update_slice_in_dim(logits_grad, chunk_grad, start, axis=1)
    return logits_grad, response_grad

  response_grad = None
  if 'gmm' in terms:
    feat_h, feat_w = feature_response.shape[1:3]
    response_columns = resample.upsample_columns(feature_response, width)
    response_grad = jnp.zeros((logits.shape[0], feat_h, width, num_classes), dtype)
  logits_grad, response_grad = jax.lax.fori_loop(
      0, num_chunks, one_chunk, (jnp.zeros_like(logits), response_grad))
  if 'gmm' in terms:
    response_grad = (resample.pull_columns(response_grad, feat_w)
                     - cotangent['gmm'] / weights['real_pixels'] * gmm_slope
                     ).astype(feature_response.dtype)
  return logits_grad, response_grad, None, None, None


_label_grid_sums.defvjp(_label_grid_sums_fwd, _label_grid_sums_bwd)


def label_grid_losses(inputs: core.LossInputs, terms: tuple[str, ...], *,
                      rows_per_chunk: int,
                      gmm_response: Callable[..., jax.Array] | None = None,
                      with_sigma_weights: bool = False) -> dict[str, jax.Array]:
  """The label-resolution terms ``terms`` (a subset of ``LABEL_GRID_TERMS``) at once.

  With ``p = softmax(z)`` at each label pixel, ``c[b, k]`` the pre-crop class
  presence, ``m[b, k]`` the classes labeled inside crop b and ``G`` the GMM
  response on the feature grid upsampled (bilinear, ``align_corners=False``)
  to the label grid:

  * ``pce`` = ``mean_{x labeled} -log p_{y(x)}(x)`` (the official
    ``CrossEntropyLoss(ignore_index=255)``);
  * ``absent_class`` = ``mean_{x real} sum_k -(1 - c_k) log(1 - p_k(x) + 1e-6)``
    (the official ``get_cls_loss``: summed over classes, averaged over pixels);
  * ``gmm`` = ``mean_{x real} BCE_m(G, p)(x) + mean_{x labeled} BCE_m(onehot(y), G)(x)``
    (the official ``cal_gmm_loss``), with ``BCE_m(t, q) = sum_k m_k (-(t log(q +
    1e-6) + (1 - t) log(1 - q + 1e-6)) / 2) / (sum_k m_k + 1e-6)``.

  Means are over all qualifying pixels of the batch and 0 for an empty set.
  Gradients flow through both ``G`` and ``p`` (no stop-gradient, as released).

  Args:
    inputs: the batch.
    terms: names of the terms to compute.
    rows_per_chunk: label rows per loop step; the values do not depend on it.
    gmm_response: with ``gmm`` in ``terms``: ``fn(sigma_weights) -> G [B, h,
      w, K]``, called with ``(up^T u, sum u)`` of :func:`prediction_pass`
      when ``with_sigma_weights``, else with None.
    with_sigma_weights: let the softmax pass also pull down the paper form's
      sigma weights (not differentiated: the caller stops sigma's gradient).

  Returns:
    ``{term: scalar}`` in the compute dtype.
  """
  core.check_inputs(inputs)
  terms = tuple(terms)
  unknown = set(terms) - set(LABEL_GRID_TERMS)
  if unknown or not terms:
    raise ValueError(f'label_grid_losses computes some of {LABEL_GRID_TERMS}, got {terms}')
  if ('gmm' in terms) != (gmm_response is not None):
    raise ValueError('label_grid_losses: gmm_response is needed exactly when '
                     "'gmm' is among the terms")
  rows_per_chunk = int(rows_per_chunk)
  dtype = jnp.promote_types(inputs.logits.dtype, jnp.float32)
  weights = _label_grid_weights(inputs.label, inputs.class_present,
                                inputs.logits.shape[-1], dtype)
  # Not differentiated here: the VJP of _label_grid_sums is the terms' whole
  # derivative, and the sigma these weights give is stop-gradiented.
  passed = jax.lax.stop_gradient(prediction_pass(
      inputs.logits, inputs.label, inputs.class_present, inputs.decoder_features.shape[1:3],
      rows_per_chunk, dtype, terms=terms, grid_weights=weights,
      with_sigma_weights=with_sigma_weights))
  feature_response = None
  if gmm_response is not None:
    feature_response = gmm_response(
        (passed.pop('sigma_weights'), passed.pop('sigma_total'))
        if with_sigma_weights else None)
  values = _label_grid_sums(inputs.logits, feature_response, inputs.label, weights,
                            passed, terms, rows_per_chunk)
  return dict(zip(terms, values))
