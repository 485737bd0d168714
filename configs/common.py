"""Defaults shared by every config: the official AGMM protocol for VOC.

Each config file starts from `base_config()` and overrides what differs. The
schema is documented in docs/design.md.
"""

import ml_collections

from agmm_jax.runtime import compilation_cache
from agmm_jax.model import dilated_conv
from agmm_jax.methods import cam
from agmm_jax.methods import spml_walk
from configs import presets


def base_config() -> ml_collections.ConfigDict:
  """Returns the full config schema with the VOC point-supervision defaults."""
  config = ml_collections.ConfigDict()
  config.mode = 'train'
  config.seed = 0
  # The official script runs batch_size 16 per process on 3-4 GPUs with its
  # lr comment saying "4GPUs"; the AGMM paper reports batch 16. We take 16 as
  # the global batch (all devices and hosts together).
  config.global_batch_size = 16
  config.num_epochs = 80
  config.num_train_steps = -1
  # A partial cross-entropy warm-up (agmm_jax/train/stages.py): the first
  # `fraction` of the run's steps train pCE alone; the loss then trains from
  # that network for the rest, with a new optimizer state and learning-rate
  # schedule. 0: none; the soft_self_labeling method sets it (presets.py).
  config.warmup = ml_collections.ConfigDict()
  config.warmup.fraction = 0.0
  config.log_every_steps = 50
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  # Also kept, beyond the latest keep_checkpoints: every checkpoint whose step
  # is a multiple of this (0: none); what benchmarks/study/pulls.py
  # reads to follow a method early, midway and at the end of a run.
  config.keep_checkpoint_every_steps = 0
  config.image_summary_every_steps = 500
  # Persistent compilation cache: 'user' ($XDG_CACHE_HOME/agmm_jax/jax),
  # '' (off) or a folder; see agmm_jax/runtime/compilation_cache.py.
  config.compilation_cache_dir = compilation_cache.USER_CACHE

  config.data = ml_collections.ConfigDict()
  config.data.dir = ''
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  config.data.train_labels = 'sparse'
  config.data.crop_size = 321
  config.data.scale_range = (0.5, 2.0)
  config.data.augment = 'voc'
  # Eval images are padded to this (H, W); () sizes it from the eval split's
  # largest image (metadata.json), checked against the data at start-up.
  config.data.eval_canvas = ()
  config.data.num_threads = 8
  config.data.prefetch = 2
  # How to build data.dir when it does not exist yet (see data_prep/auto.py);
  # empty converter: the folder must have been prepared with data_prep first.
  config.data.prepare = ml_collections.ConfigDict()
  config.data.prepare.converter = ''
  config.data.prepare.root = ''
  config.data.prepare.sparse = ''
  config.data.prepare.void_value = 255
  config.data.prepare.seed = 0
  config.data.prepare.dense_train = True
  config.data.prepare.downscale = 1
  # Leave bad source examples out (listed in DIR/bad_files.txt) instead of
  # failing.
  config.data.prepare.skip_bad = False

  config.model = ml_collections.ConfigDict()
  config.model.depth = 101
  config.model.stem = 'deep'
  config.model.output_stride = 8
  config.model.multi_grid = False
  config.model.aspp_rates = (6, 12, 18)
  config.model.compute_dtype = 'float32'
  # 'auto' (the backend's fastest: 'taps' on CPU, 'xla' elsewhere) | 'xla' |
  # 'taps' | 'space_to_batch': how dilated convs are computed (same values;
  # 'taps' also computes the 1x1 convs as dots).
  config.model.dilated_conv = dilated_conv.DEFAULT
  config.model.pretrained = ''

  config.loss = presets.preset('agmm_released')

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = 1e-3
  config.optimizer.head_lr_multiplier = 10.0
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.poly_power = 0.9

  # SPML's second stage (agmm_jax/methods/spml_stage2.py), run after the first when
  # the loss has the spml term: pseudo-labels of the training split by the
  # random walk, then the model's classifier trained on them with everything
  # else fixed. num_train_steps -1: the first stage's steps x 4000 / 30000
  # (SPML's scripts); its optimizer is config.optimizer, as in SPML.
  config.spml_stage2 = ml_collections.ConfigDict()
  config.spml_stage2.enabled = True
  config.spml_stage2.num_train_steps = -1
  config.spml_stage2.walk_beta = spml_walk.WALK_BETA
  config.spml_stage2.walk_gamma = spml_walk.WALK_GAMMA
  config.spml_stage2.walk_doublings = spml_walk.WALK_DOUBLINGS
  # SPML's flip (the image and its flip, probabilities and affinities
  # averaged) and dense CRF of the walked maps (its scripts: 10 iterations,
  # spml_walk.SPML_CRF_ITERATIONS); off by default, 0: no CRF.
  config.spml_stage2.flip = False
  config.spml_stage2.crf_iterations = 0

  # The CAM stages (agmm_jax/methods/cam_stages.py; configs/msrc.py turns
  # them on for labels=tags): a multi-label classifier with the CAM head
  # trained on the records' tags, its CAMs turned into pseudo-labels of the
  # training split, then config.loss trained on them.
  config.cam = ml_collections.ConfigDict()
  config.cam.enabled = False
  # The classes a pixel may take: the image's 'tags', or each class's
  # 'boxes' (SPML's box seeds).
  config.cam.restrict = 'tags'
  # The classifier's length: num_train_steps, or -1 for num_epochs epochs
  # (IRN's train_cam.py: 5 epochs from ImageNet weights).
  config.cam.num_epochs = 5
  config.cam.num_train_steps = -1
  # The CAMs of the image and its mirror, summed (IRN's make_cam.py).
  config.cam.flip = True
  # IRN's seed thresholds and its dense CRF's iterations (0: no CRF).
  config.cam.foreground_threshold = cam.FOREGROUND_THRESHOLD
  config.cam.background_threshold = cam.BACKGROUND_THRESHOLD
  config.cam.crf_iterations = cam.CRF_ITERATIONS
  # The segmenter starts from the 'classifier' network or from 'scratch'.
  config.cam.segmenter_init = 'classifier'

  config.eval = ml_collections.ConfigDict()
  config.eval.mode = 'whole'
  config.eval.batch_size = 8
  config.eval.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
  config.eval.flip = True
  # Predict each image among the classes of its own label map (the oracle
  # tags class activation maps are scored with; agmm_jax/evaluation/
  # evaluator.py): recognition set apart from localization.
  config.eval.given_classes = False
  config.eval.checkpoint = 'best'
  # Eval mode on another dataset: a prepared one or a raw folder dataset
  # (converted into WORKDIR/eval_data/); '' is the training data. The split:
  # '' is data.eval_split.
  config.eval.data_dir = ''
  config.eval.split = ''

  config.predict = ml_collections.ConfigDict()
  config.predict.input_dir = ''
  config.predict.output_dir = ''
  # Images that do not decode: 'skip' (listed, the others are written) or
  # 'fail' (nothing written).
  config.predict.on_unreadable = 'skip'

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  return config


# 'full': the fully supervised reference (dense training labels, pCE).
FULL = 'full'
METHODS = presets.PRESETS + presets.BOX_PRESETS + (FULL,)


def set_method(config: ml_collections.ConfigDict, method: str) -> None:
  """Sets `config.loss` to the preset `method` (one of METHODS); `full`
  trains pCE on the dense labels."""
  if method not in METHODS:
    raise ValueError(f'config argument method={method!r}: expected one of '
                     f'{METHODS}')
  if method == FULL:
    config.data.train_labels = 'dense'
    method = 'pce_only'
  config.loss = presets.preset(method)
  if method in presets.WARMUP_FRACTIONS:
    config.warmup.fraction = presets.WARMUP_FRACTIONS[method]


def parse_arg(arg: str | None, defaults: dict[str, str]) -> dict[str, str]:
  """Parses a config argument 'key=value,key=value' over `defaults`.

  Raises ValueError naming the key when it is not one of `defaults`.
  """
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ValueError(
          f'config argument {item!r}: expected key=value with key in '
          f'{sorted(defaults)}')
    values[key] = value
  return values


def _check_at_least(config: ml_collections.ConfigDict, field: str,
                    minimum: int, also: tuple[int, ...] = (),
                    meaning: str = '') -> None:
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, int) or (
      value < minimum and value not in also):
    allowed = ' or '.join([str(v) for v in also] + [f'>= {minimum}'])
    raise ValueError(f'config.{field} must be an integer {allowed}'
                     f'{meaning}, got {value!r}')


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError for a run-length or period value the
  training loop would misread (checked at start-up, before anything is
  written). The meanings are those of train/loop.py and train/steps.py."""
  _check_at_least(config, 'num_train_steps', 1, also=(-1,),
                  meaning=' (-1: num_epochs epochs)')
  if config.num_train_steps == -1:
    _check_at_least(config, 'num_epochs', 1,
                    meaning=' when num_train_steps is -1')
  _check_at_least(config, 'log_every_steps', 1)
  _check_at_least(config, 'eval_every_steps', 0, also=(-1,),
                  meaning=' (-1: once per epoch, 0: at the end only)')
  _check_at_least(config, 'checkpoint_every_steps', 0,
                  meaning=' (0: at the end only)')
  _check_at_least(config, 'image_summary_every_steps', 0, meaning=' (0: off)')
  _check_at_least(config, 'keep_checkpoints', 1)
  _check_at_least(config, 'keep_checkpoint_every_steps', 0, meaning=' (0: none)')
