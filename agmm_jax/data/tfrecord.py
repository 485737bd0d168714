"""TensorFlow-free TFRecord files and ``tf.train.Example`` protos.

Record framing (the TFRecord format, readable by ``tf.data.TFRecordDataset``)::

  uint64 length            (little-endian)
  uint32 masked_crc32c(length bytes)
  byte   data[length]
  uint32 masked_crc32c(data)

with ``masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2**32)`` and
``c = crc32c(x)`` (CRC-32C, Castagnoli polynomial 0x1EDC6F41, reflected form
0x82F63B78, initial value and final xor 0xFFFFFFFF).

CRC32C uses the ``google_crc32c`` (in requirements.txt) or ``crc32c`` extension
when one is importable, and otherwise a NumPy implementation: the data is cut into 32-byte
chunks whose raw CRC registers are computed in parallel (one NumPy lane per
chunk, slicing-by-4), then neighbours are combined pairwise in a tree with the
linear "advance the register over L zero bytes" operator,
``r(a + b) = shift_len(b)(r(a)) ^ r(b)`` (about 100-200 MB/s on one CPU core).

Examples are serialized with the ``tf.train.Example`` proto copy that
tensorflow-datasets ships for use without TensorFlow
(``tensorflow_datasets.proto.tf_example_generated_pb2``); the bytes on disk are
identical to TensorFlow's.
"""

from collections.abc import Mapping, Sequence
import os
import struct
from typing import BinaryIO, Union

import numpy as np
from tensorflow_datasets.proto import tf_example_generated_pb2

_POLY_REFLECTED = 0x82F63B78
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_HEADER = struct.Struct('<QI')
_FOOTER = struct.Struct('<I')
# Below this many bytes the per-byte Python loop beats NumPy's call overhead.
_SMALL_INPUT_BYTES = 512
# Bytes per NumPy lane in the chunk-parallel CRC.
_CHUNK_BYTES = 32

FeatureValue = Union[bytes, str, int, float, Sequence[int], Sequence[float],
                     Sequence[bytes]]


class TFRecordError(ValueError):
  """A TFRecord shard is truncated or fails a CRC check."""


def _make_tables() -> np.ndarray:
  """Slicing-by-4 tables ``[4, 256]`` uint32; row 0 is the byte-wise table."""
  tables = np.zeros((4, 256), np.uint32)
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (_POLY_REFLECTED if crc & 1 else 0)
    tables[0, byte] = crc
  for k in range(1, 4):
    previous = tables[k - 1]
    tables[k] = tables[0][previous & 0xFF] ^ (previous >> 8)
  return tables


_TABLES = _make_tables()
_TABLE0_LIST = [int(v) for v in _TABLES[0]]


def _advance_registers(registers: np.ndarray, words: np.ndarray) -> np.ndarray:
  """Feeds 4 bytes per step to many raw CRC registers at once.

  Args:
    registers: uint32 ``[M]`` raw register states (no conditioning).
    words: uint32 ``[M, S]`` little-endian 4-byte words, ``S`` steps per lane.

  Returns:
    uint32 ``[M]`` registers after the ``4 S`` bytes.
  """
  t0, t1, t2, t3 = _TABLES
  for step in range(words.shape[1]):
    x = registers ^ words[:, step]
    registers = (t3[x & 0xFF] ^ t2[(x >> 8) & 0xFF] ^ t1[(x >> 16) & 0xFF]
                 ^ t0[x >> 24])
  return registers


def _apply_shift(tables: np.ndarray, registers: np.ndarray) -> np.ndarray:
  """Applies a linear register map given by its byte tables ``[4, 256]``."""
  return (tables[0][registers & 0xFF] ^ tables[1][(registers >> 8) & 0xFF]
          ^ tables[2][(registers >> 16) & 0xFF] ^ tables[3][registers >> 24])


def _make_shift_tables(num_levels: int) -> tuple[np.ndarray, ...]:
  """Tables ``[4, 256]`` of ``shift_L`` for ``L = _CHUNK_BYTES * 2**level``.

  ``shift_L`` (the raw register after ``L`` zero bytes) is linear over GF(2),
  so ``shift_L(s) = T0[s & 255] ^ T1[(s >> 8) & 255] ^ T2[(s >> 16) & 255] ^
  T3[s >> 24]`` with ``Tk[b] = shift_L(b << 8k)``. Level 0 advances all 1024
  entries over ``_CHUNK_BYTES`` zero bytes; level ``k`` composes level
  ``k - 1`` with itself. Built once at import: the reader threads of the input
  pipeline share them, and a lazily grown list raced between threads.
  """
  starts = (np.arange(256, dtype=np.uint32)[None, :]
            << (8 * np.arange(4, dtype=np.uint32))[:, None]).reshape(-1)
  zeros = np.zeros((starts.size, _CHUNK_BYTES // 4), np.uint32)
  tables = [_advance_registers(starts, zeros).reshape(4, 256)]
  while len(tables) < num_levels:
    previous = tables[-1]
    tables.append(_apply_shift(previous, previous.reshape(-1)).reshape(4, 256))
  return tuple(tables)


# Enough levels for records up to _CHUNK_BYTES * 2**40 bytes.
_SHIFT_TABLES = _make_shift_tables(40)


def _crc32c_python(data: bytes) -> int:
  crc = _U32
  table = _TABLE0_LIST
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ _U32


def _crc32c_numpy(data: bytes) -> int:
  """CRC32C of ``data`` (at least 4 bytes) with chunk-parallel NumPy lanes."""
  n = len(data)
  num_chunks = -(-n // _CHUNK_BYTES)
  padded = np.zeros(num_chunks * _CHUNK_BYTES, np.uint8)
  # Leading zero bytes leave a zero raw register unchanged, so the data is
  # right-aligned; the 0xFFFFFFFF initial value equals inverting its first
  # four bytes.
  padded[padded.size - n:] = np.frombuffer(data, np.uint8)
  padded[padded.size - n:padded.size - n + 4] ^= 0xFF
  words = padded.view('<u4').astype(np.uint32).reshape(num_chunks, -1)
  registers = _advance_registers(np.zeros(num_chunks, np.uint32), words)
  # Pairwise combination: register(a + b) = shift_len(b)(register(a)) ^
  # register(b); a zero register in front stands for leading zero bytes.
  level = 0
  while registers.size > 1:
    if registers.size % 2:
      registers = np.concatenate([np.zeros(1, np.uint32), registers])
    registers = (_apply_shift(_SHIFT_TABLES[level], registers[0::2])
                 ^ registers[1::2])
    level += 1
  return int(registers[0]) ^ _U32


def _crc32c_fallback(data: bytes) -> int:
  if len(data) < _SMALL_INPUT_BYTES:
    return _crc32c_python(data)
  return _crc32c_numpy(data)


def _find_native_crc32c():
  try:
    import google_crc32c  # pylint: disable=g-import-not-at-top
    return lambda data: int(google_crc32c.value(bytes(data)))
  except ImportError:
    pass
  try:
    import crc32c as crc32c_module  # pylint: disable=g-import-not-at-top
    return lambda data: int(crc32c_module.crc32c(bytes(data)))
  except ImportError:
    return None


_NATIVE_CRC32C = _find_native_crc32c()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli); ``crc32c(b'123456789') == 0xE3069283``."""
  if _NATIVE_CRC32C is not None:
    return _NATIVE_CRC32C(data)
  return _crc32c_fallback(bytes(data))


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC32C rotated right by 15 plus 0xa282ead8."""
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


class TFRecordWriter:
  """Writes records to one TFRecord file (uncompressed).

  Usage::

    with TFRecordWriter(path) as writer:
      writer.write(encode_example({...}))
  """

  def __init__(self, path: str | os.PathLike[str]):
    self.path = os.fspath(path)
    self._file: BinaryIO | None = open(self.path, 'wb')
    self.num_records = 0

  def write(self, record: bytes) -> None:
    if self._file is None:
      raise ValueError(f'{self.path}: write to a closed TFRecordWriter')
    length_bytes = struct.pack('<Q', len(record))
    self._file.write(length_bytes)
    self._file.write(_FOOTER.pack(masked_crc32c(length_bytes)))
    self._file.write(record)
    self._file.write(_FOOTER.pack(masked_crc32c(record)))
    self.num_records += 1

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> 'TFRecordWriter':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def index_shard(path: str | os.PathLike[str]) -> np.ndarray:
  """Locates every record of a shard, checking lengths and length CRCs.

  Args:
    path: a TFRecord file.

  Returns:
    int64 ``[N, 2]``: ``(data offset, data length)`` of each record, in order.

  Raises:
    TFRecordError: naming the shard and the record number, when the file is
      truncated or a length CRC does not match.
  """
  path = os.fspath(path)
  file_size = os.path.getsize(path)
  entries = []
  with open(path, 'rb') as f:
    offset = 0
    while offset < file_size:
      record_index = len(entries)
      header = f.read(_HEADER.size)
      if len(header) < _HEADER.size:
        raise TFRecordError(
            f'{path}: record {record_index}: truncated header at byte {offset} '
            f'({len(header)} of {_HEADER.size} bytes)')
      length, length_crc = _HEADER.unpack(header)
      if masked_crc32c(header[:8]) != length_crc:
        raise TFRecordError(
            f'{path}: record {record_index}: length CRC mismatch at byte '
            f'{offset}')
      data_offset = offset + _HEADER.size
      end = data_offset + length + _FOOTER.size
      if end > file_size:
        raise TFRecordError(
            f'{path}: record {record_index}: truncated, needs {length} data '
            f'bytes + CRC from byte {data_offset} but the file has {file_size}')
      entries.append((data_offset, length))
      offset = end
      f.seek(offset)
  return np.asarray(entries, np.int64).reshape(-1, 2)


def read_record(f: BinaryIO, offset: int, length: int, *, shard: str,
                record_index: int) -> bytes:
  """Reads one record's data (located by ``index_shard``), checking its CRC.

  Args:
    f: the shard, opened in binary mode.
    offset: byte offset of the record's data.
    length: data length in bytes.
    shard: the shard's path (for error messages).
    record_index: the record's number in the shard (for error messages).

  Raises:
    TFRecordError: on a short read or a data CRC mismatch.
  """
  f.seek(int(offset))
  blob = f.read(int(length) + _FOOTER.size)
  if len(blob) != int(length) + _FOOTER.size:
    raise TFRecordError(f'{shard}: record {record_index}: truncated data')
  data = blob[:int(length)]
  (expected,) = _FOOTER.unpack(blob[int(length):])
  if masked_crc32c(data) != expected:
    raise TFRecordError(f'{shard}: record {record_index}: data CRC mismatch')
  return data


def read_all_records(path: str | os.PathLike[str]) -> list[bytes]:
  """All records of a shard, every CRC checked (convenience for tools/tests)."""
  path = os.fspath(path)
  index = index_shard(path)
  with open(path, 'rb') as f:
    return [read_record(f, offset, length, shard=path, record_index=i)
            for i, (offset, length) in enumerate(index.tolist())]


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
  """Serializes a ``tf.train.Example``.

  ``bytes``/``str`` -> bytes_list (str as UTF-8); ``int`` (or bool) ->
  int64_list; ``float`` -> float_list; a non-empty list/tuple/array takes the kind of its
  elements (all ints -> int64_list, any float -> float_list, bytes/str ->
  bytes_list).

  Raises:
    ValueError: naming the key, for an empty list or an unsupported type.
  """
  example = tf_example_generated_pb2.Example()
  for key, value in features.items():
    feature = example.features.feature[key]
    if isinstance(value, (bytes, str)):
      values = [value]
    elif isinstance(value, (int, float, np.integer, np.floating)):
      values = [value]
    elif isinstance(value, (list, tuple, np.ndarray)):
      values = list(np.asarray(value).tolist()) if isinstance(
          value, np.ndarray) else list(value)
    else:
      raise ValueError(f'feature {key!r}: unsupported type {type(value)}')
    if not values:
      raise ValueError(f'feature {key!r}: empty list (kind is ambiguous)')
    if all(isinstance(v, (bytes, str)) for v in values):
      feature.bytes_list.value.extend(
          v.encode('utf-8') if isinstance(v, str) else v for v in values)
    elif all(isinstance(v, (int, np.integer)) for v in values):
      feature.int64_list.value.extend(int(v) for v in values)
    elif all(isinstance(v, (int, float, np.integer, np.floating))
             for v in values):
      feature.float_list.value.extend(float(v) for v in values)
    else:
      raise ValueError(f'feature {key!r}: mixed or unsupported element types')
  return example.SerializeToString()


def decode_example(data: bytes) -> dict[str, bytes | list]:
  """Parses a serialized ``tf.train.Example``.

  Returns:
    ``{key: value}``: a bytes_list with exactly one element gives that
    ``bytes``; any other bytes_list a ``list[bytes]``; int64_list a
    ``list[int]``; float_list a ``list[float]`` (so ``image/height`` reads as
    ``[h]``).

  Raises:
    ValueError: if ``data`` is not a valid Example.
  """
  example = tf_example_generated_pb2.Example()
  try:
    example.ParseFromString(data)
  except Exception as e:  # protobuf raises its own DecodeError type.
    raise ValueError(f'not a tf.train.Example: {e}') from e
  decoded = {}
  for key, feature in example.features.feature.items():
    kind = feature.WhichOneof('kind')
    if kind == 'bytes_list':
      values = list(feature.bytes_list.value)
      decoded[key] = values[0] if len(values) == 1 else values
    elif kind == 'int64_list':
      decoded[key] = list(feature.int64_list.value)
    elif kind == 'float_list':
      decoded[key] = list(feature.float_list.value)
    else:
      decoded[key] = []
  return decoded
