"""Loss presets: each method of the study as a loss config.

A preset names the terms and their weights, and the options that differ from
the terms' own defaults (agmm_jax.methods; every option block is filled in
from the registry, so any option can still be overridden from the command
line, e.g. ``--config.loss.gmm.form=paper``).
"""

from typing import Any, Callable

import ml_collections

from agmm_jax import methods
from agmm_jax.methods import regularized

_AGMM_WEIGHTS = {'pce': 1.0, 'absent_class': 1.0, 'prototype': 1.0, 'gmm': 1.0}
# Soft self-labeling's best weights as reported for the paper:
# eta on H(sigma, y) over the unlabeled pixels, lambda on the Potts term.
SSL_ETA = 0.3
SSL_LAMBDA = 6.0
# Methods whose schedule starts with a pCE warm-up (config.warmup.fraction,
# agmm_jax/train/stages.py), by the share of the run it takes. Soft
# self-labeling's paper warms the network up by cross-entropy on the seeds
# before its 60 epochs; the length is ours (not in the summary read).
WARMUP_FRACTIONS = {'soft_self_labeling': 0.25}

_PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    # The official training loss, loss = seg_loss + gmm_loss + proto_loss +
    # cls_loss of train_voc.py / train_city.py, in the released forms.
    'agmm_released': lambda: {'weights': _AGMM_WEIGHTS},
    # The same terms with the paper's GMM (adaptive sigma) and the batch mean
    # of the prototypes.
    'agmm_paper': lambda: {'weights': _AGMM_WEIGHTS, 'gmm': {'form': 'paper'},
                           'prototype': {'batch_reduction': 'mean'}},
    # The partial cross-entropy baseline.
    'pce_only': lambda: {'weights': {'pce': 1.0}},
    # TEL (tree energy loss) next to pCE, with TEL's weight 0.4 and its VOC
    # sigma (the term's default; Cityscapes: --config.loss.tel.sigma=0.002).
    'tel': lambda: {'weights': {'pce': 1.0, 'tel': 0.4}},
    # APro's semantic variant next to pCE, with TEL's weight (methods/apro.py).
    'apro': lambda: {'weights': {'pce': 1.0, 'apro': 0.4}},
    # pCE + the dense CRF loss at the weight that gives rloss' loss at its
    # --densecrfloss 2e-9 (its lattice's gain, agmm_jax/methods/regularized.py).
    'pce_densecrf': lambda: {'weights': {
        'pce': 1.0, 'densecrf': regularized.DENSECRF_WEIGHT}},
    # pCE + the normalized cut loss (no published weight: a unit weight,
    # agmm_jax/methods/regularized.py).
    'pce_ncut': lambda: {'weights': {'pce': 1.0, 'ncut': 1.0}},
    # pCE + the gated CRF loss at the reference's weight 0.1.
    'pce_gatedcrf': lambda: {'weights': {'pce': 1.0, 'gatedcrf': 0.1}},
    # SPML stage 1 (methods/spml.py): pCE (the classifier) + the
    # pixel-to-segment loss with the VOC points values (the term's defaults).
    'spml': lambda: {'weights': {'pce': 1.0, 'spml': 1.0}},
    # The same with SPML's VOC scribble values (train_spml_scribble.sh).
    'spml_scribble': lambda: {'weights': {'pce': 1.0, 'spml': 1.0}, 'spml': {
        'cooccurrence_concentration': 12.0, 'annotation_weight': 1.0,
        'cooccurrence_weight': 0.5}},
    # Soft self-labeling (Zhang and Boykov, CVPR 2025;
    # agmm_jax/methods/soft_self_labeling.py): pCE on the seeds + the
    # network's collision cross-entropy toward soft pseudo-labels solved for
    # the collision-divergence Potts relaxation on the 4-neighbour grid, at
    # the paper's best eta 0.3 and lambda 6 (Potts weight lambda / eta in
    # the pseudo-label problem; the module says where these come from).
    # Variants: --config.loss.soft_self_labeling.ce=, .potts=,
    # .neighbourhood=, .potts_weight=; the solver: .iterations=,
    # .step_scale=pixel.
    'soft_self_labeling': lambda: {
        'weights': {'pce': 1.0, 'soft_self_labeling': SSL_ETA},
        'soft_self_labeling': {'potts_weight': SSL_LAMBDA / SSL_ETA}},
}
# The presets of pixel labels (points, clicks, scribbles, dense): the
# methods the label studies compare.
PRESETS = tuple(_PRESETS)

_BOX_PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    # Boxes (methods/boxes.py): the partial-label cross-entropy over the
    # classes whose boxes contain a pixel, and 'outside every box of class
    # k, not k'; the dataset's background class, if any, is
    # --config.loss.background_class (VOC: 0; default -1: none, MSRC).
    'box_pce': lambda: {'weights': {'box_pce': 1.0, 'box_outside': 1.0}},
    # The same with the gated CRF pairwise colour term at its reference
    # weight.
    'box_pce_gatedcrf': lambda: {'weights': {
        'box_pce': 1.0, 'box_outside': 1.0, 'gatedcrf': 0.1}},
    # BoxInst's two terms in semantic form: the box projection term and a
    # pairwise colour term (the gated CRF at its reference weight), with the
    # outside-the-boxes constraint.
    'boxinst': lambda: {'weights': {
        'box_projection': 1.0, 'box_outside': 1.0, 'gatedcrf': 0.1}},
    # The boxes as labels (Simple Does It's "Box" baseline): cross-entropy
    # toward the class of the smallest box holding a pixel. Their Box^i,
    # which labels only each box's inner 20% of area and ignores the rest:
    # --config.loss.box_fill.inner_area=0.2.
    'box_fill': lambda: {'weights': {'box_fill': 1.0}},
}
# The presets of box labels (configs/msrc.py:labels=boxes).
BOX_PRESETS = tuple(_BOX_PRESETS)
_PRESETS.update(_BOX_PRESETS)


# The presets of image-level tags (configs/msrc.py:labels=tags; with
# labels=boxes the same stages with each class's maps restricted to its
# boxes): the CAM stages (agmm_jax/methods/cam_stages.py) with the segmenter
# preset they name; any pixel-label preset may also be named as the
# segmenter.
TAG_SEGMENTERS = {'cam': 'pce_only'}
TAG_PRESETS = tuple(TAG_SEGMENTERS)


def preset(name: str) -> ml_collections.ConfigDict:
  """The loss config of the preset ``name`` (one of ``PRESETS`` or
  ``BOX_PRESETS``)."""
  if name not in _PRESETS:
    raise ValueError(f'unknown loss preset {name!r}; choose one of '
                     f'{PRESETS + BOX_PRESETS}')
  return methods.loss_config(**_PRESETS[name]())
