"""What every sparse-supervision method shares: the loss inputs, what a method
may declare, the registry of loss terms and :func:`build_loss`.

A *term* is a pure function ``term(inputs: LossInputs, *, option=default, ...)
-> scalar`` registered by name (``@register_term(name)``). Its keyword-only
parameters are its options and their defaults are written there, once:
:func:`loss_config` copies them into the config, so a config overrides any of
them field by field (``--config.loss.gmm.form=paper``). An option that terms
declare ``shared`` (``rows_per_chunk`` of the label-grid terms) lives at the
loss level (``config.loss.rows_per_chunk``), with one default, and reaches
every active term that takes it.

A *group* computes several terms in one go (``@register_group(name, terms)``):
the AGMM terms share one softmax pass over the label grid and one set of class
prototypes. :func:`build_loss` computes through a group the active terms it
covers when at least two of them are active, the others one by one; either way
the values are the terms' own.

A term declares what it needs beyond logits, decoder features and labels with
:class:`Needs`: the normalized input ``image``, extra *heads* on the decoder
features (name -> factory of an ``nnx.Module``; the model builds them and their
outputs reach the loss as ``LossInputs.outputs[name]``), extra *batch
fields* (name -> function of one augmented training example; the input
pipeline computes them and they reach the loss as ``LossInputs.fields[name]``)
and *method state* (name -> ``init(batch_size, num_classes, **options)``, a
pytree of arrays whose leading axis is the global batch; the trainer keeps it
in the train state, sharded like the batch and checkpointed, and it reaches
the loss as ``LossInputs.state[name]``; a term that declares state returns
``(value, {name: new state})``, e.g. SPML's memory bank).
``build_loss(config).needs`` merges the declarations of the active terms, and
the trainer builds the model and the pipeline from it, so a new method touches
its own module, a config preset and its tests.

Label semantics follow ``agmm_jax.data.labels``: labeled pixels (``label >= 0``)
drive the supervised parts, real pixels (``label != PADDING``, the valid-pixel
mask) the self-supervised parts, and padding never contributes.
"""

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agmm_jax.data import augment
from agmm_jax.data import labels as labels_lib

# The epsilon of every log, division and normalization of the official AGMM
# code; the other methods use it where they need a guard.
EPSILON = 1e-6

def normalized_to_rgb(image: jax.Array) -> jax.Array:
  """float32 RGB in 0..255 (unclipped) of an ImageNet-normalized ``[..., 3]``
  image: ``255 (x std + mean)``."""
  return 255.0 * (image.astype(jnp.float32) * augment.IMAGENET_STD + augment.IMAGENET_MEAN)


class LossInputs(NamedTuple):
  """What the losses see of one training batch.

  Attributes:
    logits: ``[B, H, W, K]`` float32 or bfloat16, at label resolution.
    decoder_features: ``[B, h, w, C]`` float32 or bfloat16, the decoder output
      before the classifier (stride 4 of the input).
    label: int32 ``[B, H, W]``: class ids, ``UNLABELED`` or ``PADDING``.
    class_present: float32 ``[B, K]``: 1 where the class occurs in the image's
      sparse labels, computed before cropping.
    image: float32 ``[B, H, W, 3]``, the ImageNet-normalized input crop (at
      label resolution), or None where no term declared ``Needs(image=True)``.
    outputs: the extra heads' outputs by name (``Needs.heads``), or None.
    fields: the extra batch fields by name (``Needs.batch_fields``), or None.
    state: the method state by name (``Needs.state``), or None.
  """
  logits: jax.Array
  decoder_features: jax.Array
  label: jax.Array
  class_present: jax.Array
  image: jax.Array | None = None
  outputs: Mapping[str, jax.Array] | None = None
  fields: Mapping[str, jax.Array] | None = None
  state: Mapping[str, Any] | None = None

  @property
  def valid(self) -> jax.Array:
    """bool ``[B, H, W]``: the real (not padding) pixels."""
    return labels_lib.real_mask(self.label)

  def rgb(self) -> jax.Array:
    """float32 ``[B, H, W, 3]`` RGB in 0..255 of ``image`` (after the train
    augmentation, as the network saw it); no gradient."""
    if self.image is None:
      raise ValueError('LossInputs.image is None: declare Needs(image=True)')
    return normalized_to_rgb(jax.lax.stop_gradient(self.image))

  def output(self, name: str) -> jax.Array:
    """The extra head ``name``'s output."""
    if not self.outputs or name not in self.outputs:
      raise ValueError(f'LossInputs.outputs has no {name!r}: declare it in '
                       "the term's Needs(heads=...)")
    return self.outputs[name]

  def field(self, name: str) -> jax.Array:
    """The extra batch field ``name``."""
    if not self.fields or name not in self.fields:
      raise ValueError(f'LossInputs.fields has no {name!r}: declare it in '
                       "the term's Needs(batch_fields=...)")
    return self.fields[name]


def term_state(inputs: LossInputs, term: str, name: str) -> Any:
  """The method state ``name`` of ``term``; a one-line ValueError when the
  caller passed none (``Loss.init_state`` makes the first)."""
  if not inputs.state or name not in inputs.state:
    raise ValueError(f'loss term {term!r} needs the method state {name!r} but '
                     'LossInputs.state has none (pass Loss.init_state(...))')
  return inputs.state[name]


# ``factory(in_features, *, num_classes, dtype, rngs) -> nnx.Module``: a head
# applied to the decoder features ``[B, h, w, in_features]``, or, when the
# module has an ``input_head`` attribute, to that head's output.
HeadFactory = Callable[..., Any]
# ``make(example) -> np.ndarray``: one field of one augmented training example
# (``example`` holds ``image`` float32 ``[c, c, 3]``, ``label`` int32
# ``[c, c]`` and ``class_present`` of agmm_jax.data.input_pipeline, and where
# the records hold weak labels ``tags`` and ``boxes``,
# agmm_jax.data.weak_labels), computed on the host by the input pipeline.
FieldFactory = Callable[[Mapping[str, np.ndarray]], np.ndarray]
# ``init(batch_size, num_classes, **options) -> pytree``: a method's state for
# a global batch of ``batch_size``, every leaf ``[batch_size, ...]``.
StateFactory = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Needs:
  """What a term needs beyond logits, decoder features and labels.

  Attributes:
    image: the normalized input crop in ``LossInputs.image``.
    heads: extra heads on the decoder features by output name.
    batch_fields: extra training-batch fields by name.
    state: method state carried from step to step, by name.
  """
  image: bool = False
  heads: Mapping[str, HeadFactory] = dataclasses.field(default_factory=dict)
  batch_fields: Mapping[str, FieldFactory] = dataclasses.field(
      default_factory=dict)
  state: Mapping[str, StateFactory] = dataclasses.field(default_factory=dict)

  def merge(self, other: 'Needs', what: str) -> 'Needs':
    """The union of two declarations; a name declared twice must be the same
    factory (``what`` names the term, for the error)."""
    merged = {}
    for kind in ('heads', 'batch_fields', 'state'):
      mine, theirs = getattr(self, kind), getattr(other, kind)
      for name in set(mine) & set(theirs):
        if mine[name] is not theirs[name]:
          raise ValueError(f'{what}: Needs.{kind}[{name!r}] differs from the '
                           'one another active term declares')
      merged[kind] = {**mine, **theirs}
    return Needs(image=self.image or other.image, **merged)


TermFn = Callable[..., jax.Array]
# ``summary(inputs, **options) -> [B, H, W, K]``: a per-class map in [0, 1]
# the trainer shows for the first labeled class (AGMM: its GMM response).
SummaryFn = Callable[..., jax.Array]
# ``check(**options)``: raises a ValueError naming ``loss_config.TERM.OPTION``
# for an option value that cannot work.
CheckFn = Callable[..., None]
# ``shape_check(shape: TrainShape, **options)``: raises a one-line ValueError
# naming the options and the TrainShape fields when the options cannot work
# at the training shape (e.g. a buffer over a memory limit).
ShapeCheckFn = Callable[..., None]
GroupFn = Callable[[LossInputs, Mapping[str, dict[str, Any]]],
                   dict[str, jax.Array]]


class TrainShape(NamedTuple):
  """The shape the training loss sees, known from the config and the
  dataset's metadata before anything is built: ``LossInputs.logits`` is
  ``[batch_size, crop_size, crop_size, num_classes]``.

  Attributes:
    batch_size: ``config.global_batch_size`` (the loss is traced on the
      global batch).
    crop_size: ``config.data.crop_size`` (label resolution is the crop's).
    num_classes: the dataset's class count.
  """
  batch_size: int
  crop_size: int
  num_classes: int


@dataclasses.dataclass(frozen=True)
class Term:
  """A registered loss term (see the module docstring)."""
  name: str
  fn: TermFn
  needs: Needs
  summary: SummaryFn | None
  check: CheckFn | None
  shared: tuple[str, ...]
  shape_check: ShapeCheckFn | None = None

  def options(self) -> dict[str, Any]:
    """The term's options and their defaults (its keyword-only parameters)."""
    return {name: parameter.default
            for name, parameter in inspect.signature(self.fn).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
            and parameter.default is not inspect.Parameter.empty}


@dataclasses.dataclass(frozen=True)
class Group:
  """Terms computed together: ``fn(inputs, {term: options}) -> {term: value}``
  for any subset of ``terms`` of two or more."""
  name: str
  terms: tuple[str, ...]
  fn: GroupFn


_TERMS: dict[str, Term] = {}
_GROUPS: list[Group] = []
# Loss-level options: name -> default, as the terms that share them declare.
_SHARED: dict[str, Any] = {}


def register_term(name: str, *, needs: Needs = Needs(),
                  summary: SummaryFn | None = None,
                  check: CheckFn | None = None,
                  shared: tuple[str, ...] = (),
                  shape_check: ShapeCheckFn | None = None
                  ) -> Callable[[TermFn], TermFn]:
  """Decorator registering ``term(inputs, **options) -> scalar`` as ``name``,
  with what it needs, its summary map, its option check, the options it
  shares at the loss level (module docstring) and its check of the options
  at the training shape (:class:`TrainShape`).

  A shared option has one default for every term that declares it, and a
  term that takes an option another term shares must declare it shared too,
  so that the config has one place for it.
  """

  def decorator(fn: TermFn) -> TermFn:
    if name in _TERMS:
      raise ValueError(f'loss term {name!r} is already registered')
    term = Term(name, fn, needs, summary, check, tuple(shared), shape_check)
    options = term.options()
    for option in shared:
      if option not in options:
        raise ValueError(f'loss term {name!r}: shared option {option!r} is not '
                         'one of its keyword options')
      if option in _SHARED and _SHARED[option] != options[option]:
        raise ValueError(f'loss term {name!r}: shared option {option!r} defaults '
                         f'to {options[option]!r}, other terms to {_SHARED[option]!r}')
    for option in options:
      if option not in shared and (option in _SHARED or any(
          option in other.shared for other in _TERMS.values())):
        raise ValueError(f'loss term {name!r}: option {option!r} is a loss-level '
                         'option of other terms; declare it in shared=')
    for option in shared:
      _SHARED[option] = options[option]
    _TERMS[name] = term
    return fn

  return decorator


def register_group(name: str, terms: tuple[str, ...]
                   ) -> Callable[[GroupFn], GroupFn]:
  """Decorator registering a joint computation of registered ``terms``."""

  def decorator(fn: GroupFn) -> GroupFn:
    unknown = [term for term in terms if term not in _TERMS]
    if unknown or any(group.name == name for group in _GROUPS):
      raise ValueError(f'group {name!r}: already registered or unknown terms '
                       f'{unknown}')
    _GROUPS.append(Group(name, tuple(terms), fn))
    return fn

  return decorator


def registered_terms() -> tuple[str, ...]:
  """Names of all registered loss terms."""
  return tuple(sorted(_TERMS))


def get_term(name: str) -> Term:
  """The registered term called ``name``; ValueError if there is none."""
  if name not in _TERMS:
    raise ValueError(f'unknown loss term {name!r}; registered: '
                     f'{", ".join(registered_terms())}')
  return _TERMS[name]


def _shared_options() -> dict[str, Any]:
  """The loss-level options and their defaults."""
  return dict(_SHARED)


def option_key(term: str, option: str) -> str:
  """The config key of ``option`` of ``term``, for error messages:
  ``loss_config.OPTION`` for a shared option, else ``loss_config.TERM.OPTION``."""
  return (f'loss_config.{option}' if option in _SHARED
          else f'loss_config.{term}.{option}')


def loss_config(weights: Mapping[str, float],
                **overrides: Mapping[str, Any] | Any) -> ml_collections.ConfigDict:
  """A loss config: ``weights``, then an option block per registered term
  with options (its defaults, then ``overrides[term]``), and the shared
  options at the top level (``overrides[option]`` where given).

  Every block is present whatever the weights, so that a config can switch a
  term on and set its options from the command line.
  """
  for name in weights:
    get_term(name)
  shared = _shared_options()
  config = ml_collections.ConfigDict()
  config.weights = ml_collections.ConfigDict(
      {name: float(weight) for name, weight in weights.items()})
  for name in registered_terms():
    options = {k: v for k, v in _TERMS[name].options().items() if k not in shared}
    if options:
      config[name] = ml_collections.ConfigDict(options)
  for option, default in shared.items():
    config[option] = default
  for key, value in overrides.items():
    if key in shared:
      config[key] = value
    elif key in config and key != 'weights':
      config[key].update(dict(value))
    else:
      raise ValueError(f'loss override {key!r}: no such term option block or '
                       'shared option')
  return config


# eq=False: hashed by identity, so that a Loss can be jitted as a function.
@dataclasses.dataclass(frozen=True, eq=False)
class Loss:
  """What :func:`build_loss` returns.

  ``loss(inputs) -> (total, {term: unweighted value})``;
  ``loss.apply(inputs) -> (total, values, new method state)``;
  ``loss.init_state(batch_size, num_classes)``: the initial method state
  (``{}`` for stateless methods); ``needs``: the merged
  declarations of the active terms; ``terms``: their names;
  ``summary(inputs)``: the per-class map of the first active term that has
  one (``[B, H, W, K]``), shown as ``summary_name`` (``TERM_response``), or
  None.
  """
  fn: Callable[[LossInputs], tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]]
  needs: Needs
  terms: tuple[str, ...]
  summary: Callable[[LossInputs], jax.Array] | None
  summary_name: str | None
  init_state: Callable[[int, int], dict[str, Any]]

  def __call__(self, inputs: LossInputs
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    total, values, _ = self.fn(inputs)
    return total, values

  def apply(self, inputs: LossInputs
            ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
    """``(total, values, new state)``; the new state has the structure of
    ``init_state``'s."""
    return self.fn(inputs)


def _active_terms(loss_config: ml_collections.ConfigDict
                  ) -> list[tuple[Term, float, dict[str, Any]]]:
  """``(term, weight, options)`` of the terms with a non-zero weight: the
  term's defaults, then the shared options, then its block, checked against
  the term's signature (errors name the config key)."""
  if 'weights' not in loss_config:
    raise ValueError('loss_config.weights is missing')
  shared = _shared_options()
  for key in loss_config:
    if key != 'weights' and key not in _TERMS and key not in shared:
      raise ValueError(f'loss_config.{key}: neither a registered term nor a '
                       f'shared option ({", ".join(sorted(shared))})')
  active = []
  for name, weight in loss_config.weights.items():
    if name not in _TERMS:
      raise ValueError(f'loss_config.weights.{name}: unknown loss term; '
                       f'registered: {", ".join(registered_terms())}')
    if float(weight) == 0.0:
      continue
    term = _TERMS[name]
    accepted = term.options()
    options = dict(accepted)
    options.update({k: loss_config[k] for k in shared
                    if k in accepted and k in loss_config})
    block = loss_config.get(name)
    if block is not None:
      block = block.to_dict() if isinstance(block, ml_collections.ConfigDict) else dict(block)
      for key in block:
        if key not in accepted:
          raise ValueError(f'loss_config.{name}.{key}: not an option of term '
                           f'{name!r} (options: {", ".join(sorted(accepted))})')
      options.update(block)
    active.append((term, float(weight), options))
  if not active:
    raise ValueError('loss_config.weights: every weight is 0')
  return active


def build_loss(loss_config: ml_collections.ConfigDict,
               shape: TrainShape | None = None) -> Loss:
  """Builds the :class:`Loss` of a loss config (see :func:`loss_config`).

  ``total = sum_t weights[t] * term_t(inputs, **options_t)`` over the terms
  with a non-zero weight; the terms a registered group covers are computed by
  the group when two or more of them are active. Every term's options are
  checked here (names, and values by the term's ``check``; with ``shape``,
  the training shape, also by its ``shape_check``), so that a bad config
  fails before the first step with an error naming the config key.
  """
  active = _active_terms(loss_config)
  needs = Needs()
  for term, _, options in active:
    needs = needs.merge(term.needs, f'loss term {term.name!r}')
    if term.check is not None:
      term.check(**options)
    if shape is not None and term.shape_check is not None:
      term.shape_check(shape, **options)
  options_by_term = {term.name: options for term, _, options in active}
  stateful = {term.name for term, _, _ in active if term.needs.state}
  claimed: set[str] = set()
  groups = []
  for group in _GROUPS:
    covered = tuple(name for name in options_by_term
                    if name in group.terms and name not in claimed
                    and name not in stateful)
    if len(covered) >= 2:
      groups.append((group, covered))
      claimed.update(covered)
  singles = [(term, options) for term, _, options in active
             if term.name not in claimed]

  def loss_fn(inputs: LossInputs
              ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
    values, state = {}, {}
    for group, covered in groups:
      values.update(group.fn(inputs, {name: options_by_term[name]
                                      for name in covered}))
    for term, options in singles:
      if term.name in stateful:
        values[term.name], updates = term.fn(inputs, **options)
        state.update(updates)
      else:
        values[term.name] = term.fn(inputs, **options)
    total = sum(weight * values[term.name] for term, weight, _ in active)
    return total, {term.name: values[term.name] for term, _, _ in active}, state

  def init_state(batch_size: int, num_classes: int) -> dict[str, Any]:
    """Every active term's declared state for a global batch."""
    return {name: init(batch_size, num_classes, **options_by_term[term.name])
            for term, _, _ in active for name, init in term.needs.state.items()}

  shown = next(((term, options) for term, _, options in active
                if term.summary is not None), None)

  def summary_fn(inputs: LossInputs) -> jax.Array:
    term, options = shown
    return term.summary(inputs, **options)

  return Loss(loss_fn, needs, tuple(term.name for term, _, _ in active),
              summary_fn if shown else None,
              f'{shown[0].name}_response' if shown else None, init_state)


# Stage plans of multi-stage methods, by method name: ``plan(config, loss)
# -> [stage, ...]`` (``agmm_jax.train.stages``: the whole run, first stage
# included) or None / [] when the run does not use the method. Registered as
# 'module:function' and imported when the trainer asks: a stage module
# imports the training package, which imports this one.
_STAGE_PLANS: dict[str, str | Callable[..., Any]] = {}


def register_stages(name: str, plan: str | Callable[..., Any]) -> None:
  """Registers the stage plan of method ``name`` (a ``'module:function'``
  path or the function); see ``agmm_jax.train.stages``."""
  if name in _STAGE_PLANS:
    raise ValueError(f'stage plan {name!r} is already registered')
  _STAGE_PLANS[name] = plan


def stages_of(config: ml_collections.ConfigDict, loss: 'Loss') -> list[Any] | None:
  """The stages of the one registered plan that answers for ``config`` (with
  its built ``loss``), or None when none does; a one-line ValueError when
  several do."""
  answers = []
  for name, plan in list(_STAGE_PLANS.items()):
    if isinstance(plan, str):
      module, _, function = plan.partition(':')
      plan = _STAGE_PLANS[name] = getattr(importlib.import_module(module), function)
    stages = plan(config, loss)
    if stages:
      answers.append((name, list(stages)))
  if len(answers) > 1:
    raise ValueError(f'the config selects the stages of several methods '
                     f'({", ".join(name for name, _ in answers)}); keep one')
  return answers[0][1] if answers else None


def upcast(x: jax.Array) -> jax.Array:
  """``x`` in its compute dtype: float32 for bfloat16/float16/float32 inputs.

  float64 stays float64 (only reachable with x64 enabled, for gradient checks).
  """
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_inputs(inputs: LossInputs) -> None:
  """Raises a one-line ValueError naming the LossInputs field of bad shape."""
  logits, features, label, present = inputs[:4]
  if logits.ndim != 4:
    raise ValueError(f'LossInputs.logits must be [B, H, W, K], got {logits.shape}')
  batch, height, width, num_classes = logits.shape
  if label.shape != (batch, height, width):
    raise ValueError(
        f'LossInputs.label must be {(batch, height, width)} like logits, got {label.shape}')
  if features.ndim != 4 or features.shape[0] != batch:
    raise ValueError(
        f'LossInputs.decoder_features must be [{batch}, h, w, C], got {features.shape}')
  if present.shape != (batch, num_classes):
    raise ValueError(
        f'LossInputs.class_present must be {(batch, num_classes)}, got {present.shape}')
  if inputs.image is not None and inputs.image.shape != (batch, height, width, 3):
    raise ValueError(f'LossInputs.image must be {(batch, height, width, 3)}, '
                     f'got {inputs.image.shape}')
