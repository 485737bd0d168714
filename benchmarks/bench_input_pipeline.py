"""Train input pipeline throughput (images/s) with the full VOC augmentation.

Writes a small TFRecord split from real photographs (CamVid, 480x360 JPEGs,
about the size of VOC images) with sparse point labels, then measures

* the cost of each stage of one example on one thread (CRC-checked read,
  Example + JPEG/PNG decode, rescale/pad/crop, photometric augmentation,
  normalization), and
* the time to the first batch and the steady-state throughput of
  ``create_train_iterator`` for several ``num_threads``.

Usage::

  python -m benchmarks.bench_input_pipeline [--images_dir DIR] [--num 64]
      [--crop 321] [--batch 16] [--batches 20] [--threads 2,4]
"""

import argparse
import io
import json
import os
import tempfile
import time
import types

import numpy as np
from PIL import Image

from agmm_jax.data import augment
from agmm_jax.data import input_pipeline
from agmm_jax.data import labels
from agmm_jax.data import tfrecord
from benchmarks.camvid_data import CAMVID_TRAIN

CAMVID_VOID = 11
NUM_CLASSES = 11
POINTS_PER_IMAGE = 50


def _sparse_points(dense: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Keeps ``POINTS_PER_IMAGE`` random non-void pixels; the rest is 255."""
  sparse = np.full(dense.shape, labels.STORED_UNLABELED, np.uint8)
  candidates = np.flatnonzero(dense.ravel() != labels.STORED_UNLABELED)
  chosen = rng.choice(candidates, min(POINTS_PER_IMAGE, candidates.size),
                      replace=False)
  sparse.ravel()[chosen] = dense.ravel()[chosen]
  return sparse


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def write_split(images_dir: str, out_dir: str, num_images: int,
                num_shards: int = 4) -> None:
  """Writes ``num_images`` CamVid photos as a prepared 'train' split."""
  names = sorted(os.listdir(os.path.join(images_dir, 'images')))[:num_images]
  rng = np.random.default_rng(0)
  shards = [f'train-{s:05d}-of-{num_shards:05d}.tfrecord'
            for s in range(num_shards)]
  writers = [tfrecord.TFRecordWriter(os.path.join(out_dir, s)) for s in shards]
  for k, name in enumerate(names):
    with open(os.path.join(images_dir, 'images', name), 'rb') as f:
      jpeg = f.read()
    stem = os.path.splitext(name)[0]
    dense = np.array(Image.open(os.path.join(images_dir, 'labels',
                                             stem + '.png')))
    dense[dense == CAMVID_VOID] = labels.STORED_UNLABELED
    writers[k % num_shards].write(tfrecord.encode_example({
        'image/encoded': jpeg, 'image/id': stem,
        'image/height': dense.shape[0], 'image/width': dense.shape[1],
        'label/sparse/encoded': _png(_sparse_points(dense, rng)),
        'label/dense/encoded': _png(dense)}))
  for writer in writers:
    writer.close()
  with open(os.path.join(out_dir, 'metadata.json'), 'w') as f:
    json.dump({'classes': [str(c) for c in range(NUM_CLASSES)],
               'num_classes': NUM_CLASSES,
               'splits': {'train': {'num_examples': len(names),
                                    'shards': shards, 'has_sparse': True,
                                    'has_dense': True}}}, f)


def stage_costs(out_dir: str, crop: int, repeats: int = 64) -> dict[str, float]:
  """Mean milliseconds per example of each stage, on one thread."""
  metadata = input_pipeline.read_metadata(out_dir)
  source = input_pipeline.TFRecordSource(
      [os.path.join(out_dir, s) for s in metadata['splits']['train']['shards']])
  totals = dict.fromkeys(
      ['read+crc', 'decode', 'rescale_pad_crop', 'photometric', 'normalize'],
      0.0)
  rng = np.random.default_rng(0)
  for k in range(repeats):
    start = time.perf_counter()
    record = source[k % len(source)]
    t1 = time.perf_counter()
    image, label, _ = input_pipeline.decode_record(
        record, num_classes=NUM_CLASSES,
        label_key=input_pipeline.LABEL_KEYS['sparse'])
    t2 = time.perf_counter()
    scaled = augment.sample_scaled_size(image.height, image.width, (0.5, 2.0),
                                        rng)
    offset = augment.sample_crop_offset(*scaled, crop, rng)
    crop_image, _ = augment.rescale_pad_crop(image, label, scaled, offset,
                                             crop)
    t3 = time.perf_counter()
    crop_image = augment.photometric_voc(crop_image, rng)
    t4 = time.perf_counter()
    augment.normalize(crop_image)
    t5 = time.perf_counter()
    for key, value in zip(totals, (t1 - start, t2 - t1, t3 - t2, t4 - t3,
                                   t5 - t4)):
      totals[key] += value
  return {key: 1000 * value / repeats for key, value in totals.items()}


def throughput(out_dir: str, crop: int, batch: int, num_batches: int,
               num_threads: int) -> tuple[float, float, float]:
  """Seconds to the first batch, then images/s and CPU ms per image.

  CPU time is that of the whole process (all threads); on a shared machine it
  shows the cost independently of how much of the CPUs the run got.
  """
  config = types.SimpleNamespace(
      dir=out_dir, train_split='train', train_labels='sparse', crop_size=crop,
      scale_range=(0.5, 2.0), augment='voc', num_threads=num_threads,
      prefetch=2)
  start = time.perf_counter()
  iterator = input_pipeline.create_train_iterator(
      config, batch_size_per_process=batch, seed=0)
  next(iterator)
  first = time.perf_counter() - start
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(iterator)
  num_images = num_batches * batch
  cpu_ms = 1000 * (time.process_time() - cpu_start) / num_images
  return first, num_images / (time.perf_counter() - start), cpu_ms


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images_dir', default=CAMVID_TRAIN)
  parser.add_argument('--num', type=int, default=64)
  parser.add_argument('--crop', type=int, default=321)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--threads', default='2,4')
  args = parser.parse_args()
  print(f'cpus: {os.cpu_count()}, load average: {os.getloadavg()}')
  with tempfile.TemporaryDirectory() as out_dir:
    write_split(args.images_dir, out_dir, args.num)
    costs = stage_costs(out_dir, args.crop)
    print('per-example stage cost on one thread (ms): '
          + ', '.join(f'{k} {v:.2f}' for k, v in costs.items())
          + f'; total {sum(costs.values()):.2f}')
    for num_threads in (int(t) for t in args.threads.split(',')):
      first, images_per_s, cpu_ms = throughput(
          out_dir, args.crop, args.batch, args.batches, num_threads)
      print(f'num_threads={num_threads}: first batch {first:.2f} s, '
            f'{images_per_s:.1f} images/s, {cpu_ms:.1f} CPU ms/image '
            f'(= {2000 / cpu_ms:.0f} images/s on 2 idle cores if the threads '
            f'scale; crop {args.crop}, batch {args.batch}, {args.batches} '
            'batches)')


if __name__ == '__main__':
  main()
