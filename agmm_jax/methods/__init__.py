"""Sparse-supervision methods: one module per method family, one registry.

``from agmm_jax import methods`` registers every method of the package; the
trainer then needs only :func:`build_loss` and the :class:`LossInputs` it
feeds. See :mod:`agmm_jax.methods.core` for the interface a method implements
and docs/design.md for how a config reaches the loss.

Modules: ``core`` (inputs, declarations, registry), ``label_grid`` (the
row-chunk loops of the per-pixel terms), ``pce`` (partial cross-entropy,
absent-class), ``agmm`` (GMM and prototype terms), ``spanning_tree`` (MST,
tree filter and affinity propagation kernels), ``tel`` (tree energy loss),
``apro`` (affinity propagation), ``bilateral`` (the dense bilateral product,
exact and by a bilateral grid), ``regularized`` (dense CRF, normalized cut,
gated CRF and entropy terms), ``soft_self_labeling`` (soft pseudo-labels
solved for a Potts relaxation), ``spml`` (pixel-to-segment contrastive
learning with its memory bank; its second stage, pseudo-labels and the final
classifier, in ``spml_stage2``, registered as the method's stage plan),
``boxes`` (box supervision: partial-label cross-entropy, outside-the-boxes
and BoxInst's projection term) and ``cam`` (class activation maps: the
classification head, its BCE over tags, seeds).
"""

from agmm_jax.methods import agmm
from agmm_jax.methods import apro
from agmm_jax.methods import boxes
from agmm_jax.methods import cam
from agmm_jax.methods import pce
from agmm_jax.methods import regularized
from agmm_jax.methods import soft_self_labeling
from agmm_jax.methods import spml
from agmm_jax.methods import tel
from agmm_jax.methods.core import build_loss
from agmm_jax.methods.core import get_term
from agmm_jax.methods.core import Loss
from agmm_jax.methods.core import loss_config
from agmm_jax.methods.core import LossInputs
from agmm_jax.methods.core import Needs
from agmm_jax.methods.core import register_group
from agmm_jax.methods.core import register_stages
from agmm_jax.methods.core import register_term
from agmm_jax.methods.core import registered_terms
from agmm_jax.methods.core import stages_of
from agmm_jax.methods.core import TrainShape
