"""TPU and GPU readiness without either: a run's jitted programs exported for
other platforms from abstract shapes.

``jax.export`` lowers a jitted function for platforms this machine does not
have (``platforms=('tpu', 'cuda')``) from ``jax.ShapeDtypeStruct``s that
carry their shardings: no array is allocated and nothing is compiled. What
would fail on the device fails here: a host callback, a primitive with no
lowering for a platform (``jnp.linalg.eig`` on TPU), a custom call without a
compatibility guarantee (CPU-only LAPACK routines). :func:`export_program`
then names the program and the primitives that do not lower
(:func:`offending_primitives`, each equation of the traced program exported
on its own, with its source line). Not checked here: XLA's SPMD partitioning
and the device compilers, which run when the program is compiled on the
target (``benchmarks/export_modules.py --check``).

:func:`run_programs` builds every jitted program a training run executes,
with the library's own builders and the config's shapes: the train step
(``agmm_jax.train.steps``, with the loss's heads, batch fields and method
state), the summary maps, the evaluation step of ``config.eval.mode`` (or of
the modes asked for), the predict function of predict mode, for SPML its
second stage's pseudo-label pass and step and, for the CAM stages (tags and
boxes), the classifier's step, its CAM evaluation and the pseudo-label pass
restricted to tags and to boxes. ``tests/runtime/test_export.py`` exports
them for every preset of ``configs/presets.py`` and the CAM stages;
``benchmarks/export_modules.py`` writes them to a folder, serialized.
"""

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from agmm_jax import methods
from agmm_jax.data import augment
from agmm_jax.data import labels as labels_lib
from agmm_jax.data import weak_labels
from agmm_jax.evaluation import evaluator
from agmm_jax.methods import boxes as boxes_lib
from agmm_jax.methods import cam_stages
from agmm_jax.methods import spml_stage2
from agmm_jax.model import deeplab
from agmm_jax.model import dilated_conv
from agmm_jax.runtime import sharding as sharding_lib
from agmm_jax.train import state as train_state_lib
from agmm_jax.train import steps

# The platforms a run is exported for: TPU pods and CUDA GPUs.
PLATFORMS = ('tpu', 'cuda')


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function of a run and its abstract arguments."""
  name: str
  fn: Callable[..., Any]
  args: tuple[Any, ...]


class ExportError(ValueError):
  """A program that does not export for a platform (one-line message)."""


def _placed(tree: Any, sharding: jax.sharding.Sharding | None) -> Any:
  """``ShapeDtypeStruct``s of ``tree``'s leaves with ``sharding``."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# jax.export's platform names -> the JAX backends that run them.
_BACKENDS = {'cuda': 'gpu', 'rocm': 'gpu'}


def target_dilated_conv(setting: str, platforms: Sequence[str]) -> str:
  """The form ``config.model.dilated_conv = setting`` takes on the target
  ``platforms`` (``'auto'`` is resolved by backend, which here is the CPU);
  a one-line ExportError when it differs between them."""
  forms = {platform: dilated_conv.resolve(setting, _BACKENDS.get(platform, platform))
           for platform in platforms}
  if len(set(forms.values())) > 1:
    raise ExportError(
        f'model.dilated_conv={setting!r} means {forms} on these platforms; '
        'export them separately or set --config.model.dilated_conv')
  return forms[platforms[0]]


def abstract_model(config: ml_collections.ConfigDict, num_classes: int,
                   extra_heads: Mapping[str, Any] | None,
                   platforms: Sequence[str] = PLATFORMS
                   ) -> tuple[train_state_lib.ModelDefs, Any, Any]:
  """``(model defs, params, model_state)`` of ``config.model`` on
  ``platforms`` as ``train.state.create_train_state`` splits it, with
  abstract leaves."""
  model_config = config.model.copy_and_resolve_references()
  model_config.dilated_conv = target_dilated_conv(str(config.model.dilated_conv),
                                                  platforms)
  model = nnx.eval_shape(lambda: deeplab.build_model(
      model_config, num_classes, rngs=nnx.Rngs(int(config.seed)),
      extra_heads=extra_heads))
  model.eval()
  eval_def = nnx.graphdef(model)
  model.train()
  train_def, params, model_state = nnx.split(model, nnx.Param, ...)
  return train_state_lib.ModelDefs(train_def, eval_def), params, model_state


def abstract_train_state(config: ml_collections.ConfigDict, num_classes: int,
                         mesh: jax.sharding.Mesh, loss: methods.Loss,
                         total_steps: int = 1,
                         platforms: Sequence[str] = PLATFORMS):
  """``(state, model defs, tx)`` as ``create_train_state`` returns them (the
  model as built on ``platforms``), the state's leaves ``ShapeDtypeStruct``s
  placed as the trainer places them."""
  model_defs, params, model_state = abstract_model(
      config, num_classes, loss.needs.heads, platforms)
  tx = train_state_lib.create_optimizer(config.optimizer, total_steps)
  state = {'params': params, 'model_state': model_state,
           'opt_state': jax.eval_shape(tx.init, params),
           'step': jax.ShapeDtypeStruct((), jnp.int32)}
  method_state = jax.eval_shape(
      lambda: loss.init_state(int(config.global_batch_size), num_classes))
  if method_state:
    state['method_state'] = method_state
  shardings = train_state_lib.state_shardings(mesh, bool(method_state))
  return ({name: _placed(value, shardings[name]) for name, value in state.items()},
          model_defs, tx)


def train_example(config: ml_collections.ConfigDict, num_classes: int,
                  loss: methods.Loss) -> dict[str, np.ndarray]:
  """One training example as the input pipeline makes it (the augmentation
  of ``config.data`` on a blank crop, then the loss's batch fields, which
  see the weak labels too: ``input_pipeline.TrainTransform``)."""
  crop = int(config.data.crop_size)
  example = augment.augment_train(
      Image.new('RGB', (crop, crop)),
      np.full((crop, crop), labels_lib.UNLABELED, np.int32),
      num_classes=num_classes, crop_size=crop,
      scale_range=tuple(config.data.scale_range), augment=str(config.data.augment),
      rng=np.random.default_rng(0))._asdict()
  # The factories see the weak labels too (here none: no tag, no box), the
  # batch holds only what they make of them.
  seen = {**example, 'tags': np.zeros(num_classes, np.float32),
          'boxes': np.zeros((0, weak_labels.BOX_COLUMNS), np.int32)}
  fields = {name: np.asarray(make(seen))
            for name, make in loss.needs.batch_fields.items()}
  return {**example, **fields}


def abstract_train_batch(config: ml_collections.ConfigDict, num_classes: int,
                         mesh: jax.sharding.Mesh, loss: methods.Loss
                         ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global train batch (``config.global_batch_size`` examples of
  :func:`train_example`), split over the ``data`` axis."""
  batch_size = int(config.global_batch_size)
  sharding_lib.per_process_batch_size(batch_size, mesh)
  data = sharding_lib.data_sharding(mesh)
  return {name: jax.ShapeDtypeStruct((batch_size, *value.shape), value.dtype,
                                     sharding=data)
          for name, value in train_example(config, num_classes, loss).items()}


def abstract_eval_batch(config: ml_collections.ConfigDict,
                        canvas: Sequence[int], mesh: jax.sharding.Mesh
                        ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global eval batch on ``canvas`` ``(Hc, Wc)``, split over ``data``
  (``config.eval.batch_size`` rounded up to whole devices, as evaluation
  does)."""
  batch_size = sharding_lib.eval_batch_size_per_process(
      int(config.eval.batch_size), mesh) * jax.process_count()
  data = sharding_lib.data_sharding(mesh)
  height, width = (int(size) for size in canvas)
  shapes = {'image': ((batch_size, height, width, 3), jnp.float32),
            'label': ((batch_size, height, width), jnp.int32),
            'height': ((batch_size,), jnp.int32),
            'width': ((batch_size,), jnp.int32)}
  return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=data)
          for name, (shape, dtype) in shapes.items()}


def _eval_variables(state: Any, sharding: jax.sharding.Sharding | None) -> Any:
  """``(params, model_state)`` of an abstract state, placed by ``sharding``."""
  return _placed((state['params'], state['model_state']), sharding)


def _eval_programs(config: ml_collections.ConfigDict, num_classes: int,
                   mesh: jax.sharding.Mesh, state: Any,
                   model_defs: train_state_lib.ModelDefs,
                   canvas: Sequence[int], eval_modes: Sequence[str]
                   ) -> Iterator[Program]:
  """The evaluation step (``evaluator.make_eval_fn``, the batch split over
  ``data``) and predict mode's function (one image, unsharded, as
  ``evaluation.modes.predict`` calls it) of each mode of ``eval_modes``."""
  replicated = sharding_lib.replicated_sharding(mesh)
  eval_batch = abstract_eval_batch(config, canvas, mesh)
  image = jax.ShapeDtypeStruct((1, *eval_batch['image'].shape[1:]), jnp.float32)
  size = jax.ShapeDtypeStruct((1,), jnp.int32)
  class_names = [f'class {index}' for index in range(num_classes)]
  for mode in eval_modes:
    mode_config = config.copy_and_resolve_references()
    mode_config.eval.mode = mode
    spec = evaluator.EvalSpec.from_config(mode_config, class_names)
    params, model_state = _eval_variables(state, replicated)
    yield Program(f'eval_step[{mode}]', evaluator.make_eval_fn(model_defs, spec, mesh),
                  (params, model_state, eval_batch))
    predict = evaluator.make_predict_fn(evaluator.eval_apply_fn(model_defs),
                                        **spec.mode_options())
    yield Program(f'predict[{mode}]', predict,
                  (_eval_variables(state, None), image, size, size))


def abstract_stage2_state(config: ml_collections.ConfigDict, state: Any,
                          mesh: jax.sharding.Mesh, total_steps: int = 1):
  """``(state, tx)`` as ``spml_stage2.initial_state`` returns them for the
  abstract stage-1 ``state``: stage 1's model, the optimizer of the
  classifier alone, no method state; replicated."""
  replicated = sharding_lib.replicated_sharding(mesh)
  tx = train_state_lib.create_optimizer(config.optimizer, total_steps)
  stage2_state = {
      'params': state['params'], 'model_state': state['model_state'],
      'opt_state': jax.eval_shape(tx.init, state['params']['classifier']),
      'step': jax.ShapeDtypeStruct((), jnp.int32)}
  return _placed(stage2_state, replicated), tx


def _spml_stage2_programs(config: ml_collections.ConfigDict, num_classes: int,
                          mesh: jax.sharding.Mesh, loss: methods.Loss, state: Any,
                          model_defs: train_state_lib.ModelDefs,
                          canvas: Sequence[int]) -> Iterator[Program]:
  """SPML's second stage: the pseudo-label pass (as configured, and with
  the opt-in flip and dense CRF) and the final classifier's step."""
  replicated = sharding_lib.replicated_sharding(mesh)
  eval_batch = abstract_eval_batch(config, canvas, mesh)
  params, model_state = _eval_variables(state, replicated)
  pass_args = (params, model_state, eval_batch['image'], eval_batch['label'])
  yield Program('spml_pseudo_labels',
                spml_stage2.make_pseudo_label_fn(model_defs, loss, mesh, config),
                pass_args)
  opt_in = config.copy_and_resolve_references()
  opt_in.spml_stage2.flip = True
  opt_in.spml_stage2.crf_iterations = 1
  yield Program('spml_pseudo_labels[flip,crf]',
                spml_stage2.make_pseudo_label_fn(model_defs, loss, mesh, opt_in),
                pass_args)
  stage2_state, tx = abstract_stage2_state(config, state, mesh)
  stage2_batch = abstract_train_batch(
      config, num_classes, mesh, methods.build_loss(methods.loss_config({'pce': 1.0})))
  yield Program('spml_stage2_step', spml_stage2.make_stage2_step(
      model_defs, tx, mesh,
      lr_schedule=train_state_lib.learning_rate_schedule(config.optimizer, 1),
      head_lr_multiplier=float(config.optimizer.head_lr_multiplier)),
                (stage2_state, stage2_batch))


def _train_step(config: ml_collections.ConfigDict, model_defs: train_state_lib.ModelDefs,
                loss: methods.Loss, tx: Any, mesh: jax.sharding.Mesh) -> Callable[..., Any]:
  """The jitted train step of ``loss`` as the trainer builds it (the
  schedule's length does not change the program)."""
  return steps.make_train_step(
      model_defs, loss, tx, mesh,
      lr_schedule=train_state_lib.learning_rate_schedule(config.optimizer, 1),
      head_lr_multiplier=float(config.optimizer.head_lr_multiplier))


def _cam_programs(config: ml_collections.ConfigDict, num_classes: int,
                  mesh: jax.sharding.Mesh, canvas: Sequence[int],
                  platforms: Sequence[str]) -> Iterator[Program]:
  """The CAM stages' own programs (the segmenter is a pixel preset's run):
  the classifier's train step (``cam_bce``, the ``cam`` head), its
  evaluation by the CAM's segmentation, and the pseudo-label pass with the
  CAMs restricted to the tags and to the boxes."""
  options = cam_stages.Options.from_config(config)
  loss = cam_stages.classifier_loss(options)
  state, model_defs, tx = abstract_train_state(config, num_classes, mesh, loss,
                                               platforms=platforms)
  yield Program('cam_classifier_step', _train_step(config, model_defs, loss, tx, mesh),
                (state, abstract_train_batch(config, num_classes, mesh, loss)))
  replicated = sharding_lib.replicated_sharding(mesh)
  params, model_state = _eval_variables(state, replicated)
  eval_batch = abstract_eval_batch(config, canvas, mesh)
  yield Program('cam_eval_step', cam_stages.make_cam_eval_fn(
      model_defs, num_classes, mesh, options.background_class),
                (params, model_state, eval_batch))
  batch_size = eval_batch['image'].shape[0]
  data = sharding_lib.data_sharding(mesh)
  weak = (jax.ShapeDtypeStruct((batch_size, num_classes), jnp.float32, sharding=data),
          jax.ShapeDtypeStruct((batch_size, boxes_lib.MAX_BOXES, weak_labels.BOX_COLUMNS),
                               jnp.int32, sharding=data))
  # The CRF's class channels are the data's most classes per image
  # (cam_stages.max_classes_per_image); MSRC has up to 3-5, and the count
  # only sizes arrays, so any small number gives the program its form.
  for restrict in cam_stages.RESTRICTIONS:
    restricted = dataclasses.replace(options, restrict=restrict)
    yield Program(f'cam_pseudo_labels[{restrict}]', cam_stages.make_pseudo_label_fn(
        model_defs, num_classes, mesh, restricted, max_classes=min(3, num_classes)),
                  (params, model_state, eval_batch['image'], eval_batch['label'], *weak))


def run_programs(config: ml_collections.ConfigDict, num_classes: int,
                 mesh: jax.sharding.Mesh, canvas: Sequence[int], *,
                 eval_modes: Sequence[str] | None = None,
                 parts: Sequence[str] = ('train', 'eval', 'stage2', 'cam'),
                 platforms: Sequence[str] = PLATFORMS) -> list[Program]:
  """The jitted programs of a training run of ``config`` with abstract
  arguments: ``train`` (train step, summary maps), ``eval`` (evaluation
  step and predict function of each of ``eval_modes``, default
  ``config.eval.mode``, on the eval ``canvas`` ``(Hc, Wc)``), for a loss
  with SPML's term ``stage2`` (its second stage) and, when
  ``config.cam.enabled``, ``cam`` (the CAM stages' classifier and pass).
  The model is the one the ``platforms`` run (``target_dilated_conv``)."""
  loss = methods.build_loss(config.loss)
  state, model_defs, tx = abstract_train_state(config, num_classes, mesh, loss,
                                               platforms=platforms)
  programs = []
  if 'train' in parts:
    batch = abstract_train_batch(config, num_classes, mesh, loss)
    programs.append(Program('train_step', _train_step(config, model_defs, loss, tx, mesh),
                            (state, batch)))
    programs.append(Program('summary', steps.make_summary_fn(model_defs, mesh, loss),
                            (state, batch)))
  if 'eval' in parts:
    programs.extend(_eval_programs(
        config, num_classes, mesh, state, model_defs, canvas,
        eval_modes or (str(config.eval.mode),)))
  if 'stage2' in parts and spml_stage2.is_enabled(config):
    programs.extend(_spml_stage2_programs(config, num_classes, mesh, loss, state,
                                          model_defs, canvas))
  if 'cam' in parts and cam_stages.is_enabled(config):
    programs.extend(_cam_programs(config, num_classes, mesh, canvas, platforms))
  return programs


def export_program(program: Program, platforms: Sequence[str] = PLATFORMS,
                   what: str = '') -> jax.export.Exported:
  """``jax.export`` of ``program`` for ``platforms``.

  Raises:
    ExportError: naming ``what`` (e.g. the preset), the program, the
      primitives that do not lower (:func:`offending_primitives`) and the
      error of the whole program.
  """
  try:
    return jax.export.export(program.fn, platforms=tuple(platforms))(*program.args)
  except Exception as error:  # pylint: disable=broad-exception-caught
    offenders = offending_primitives(program, platforms)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise ExportError(
        f'{what}{": " if what else ""}{program.name} does not export for '
        f'{"/".join(platforms)}: offending primitive(s) '
        f'{"; ".join(offenders) or "none found alone"} '
        f'({type(error).__name__}: {first_line})') from error


def flat_program(program: Program) -> tuple[Program, list[str]]:
  """``program`` as a function of its argument leaves returning its output
  leaves (the same computation, shardings and donations), and the leaves'
  paths: what ``Exported.serialize`` can write, as the argument trees hold
  types it cannot (Flax variables, optax states, CLU metrics)."""
  paths_and_leaves, tree = jax.tree_util.tree_flatten_with_path(program.args)
  leaves = [leaf for _, leaf in paths_and_leaves]
  donated = [info.donated for info in
             jax.tree.leaves(program.fn.trace(*program.args).args_info)]

  def flat(*flat_args):
    return tuple(jax.tree.leaves(program.fn(*jax.tree.unflatten(tree, flat_args))))

  shardings = [leaf.sharding for leaf in leaves]
  fn = jax.jit(flat, in_shardings=None if None in shardings else shardings,
               donate_argnums=tuple(i for i, d in enumerate(donated) if d))
  return (Program(program.name, fn, tuple(leaves)),
          [jax.tree_util.keystr(path) for path, _ in paths_and_leaves])


def _equations(jaxpr: Any) -> Iterator[Any]:
  """Every equation of ``jaxpr`` without a sub-jaxpr, descending into those
  with one (jit, scan, while, cond, custom derivatives)."""
  for equation in jaxpr.eqns:
    inner = list(jex.core.jaxprs_in_params(equation.params))
    if inner:
      for sub in inner:
        yield from _equations(sub)
    else:
      yield equation


def _exports_alone(equation: Any, platforms: Sequence[str]) -> bool:
  """Whether ``equation`` alone, on inputs of its shapes, exports."""
  literals = {index: var.val for index, var in enumerate(equation.invars)
              if isinstance(var, jex.core.Literal)}
  avals = [jax.ShapeDtypeStruct(var.aval.shape, var.aval.dtype)
           for index, var in enumerate(equation.invars) if index not in literals]

  def alone(*args):
    args = iter(args)
    inputs = [literals[index] if index in literals else next(args)
              for index in range(len(equation.invars))]
    return equation.primitive.bind(*inputs, **equation.params)

  try:
    jax.export.export(jax.jit(alone), platforms=tuple(platforms))(*avals)
    return True
  except Exception:  # pylint: disable=broad-exception-caught
    return False


def offending_primitives(program: Program,
                         platforms: Sequence[str] = PLATFORMS) -> list[str]:
  """``'primitive (source line)'`` of each distinct equation of
  ``program``'s traced jaxpr that does not export alone for ``platforms``
  (empty when tracing fails or every equation exports alone)."""
  try:
    jaxpr = program.fn.trace(*program.args).jaxpr.jaxpr
  except Exception:  # pylint: disable=broad-exception-caught
    return []
  seen, offenders = set(), []
  for equation in _equations(jaxpr):
    key = (equation.primitive.name, str(equation.params)[:2000],
           tuple(str(var.aval) for var in equation.invars))
    if key in seen:
      continue
    seen.add(key)
    if not _exports_alone(equation, platforms):
      offenders.append(f'{equation.primitive.name} '
                       f'({jex.source_info_util.summarize(equation.source_info)})')
  return offenders
