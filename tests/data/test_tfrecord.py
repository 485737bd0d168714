"""Tests of agmm_jax.data.tfrecord: CRC32C, framing, corruption errors, Examples."""

import concurrent.futures
import os
import struct

import numpy as np
import pytest

from agmm_jax.data import tfrecord


def reference_crc32c(data: bytes) -> int:
  """Bit-by-bit CRC-32C (reflected polynomial 0x82F63B78), no tables."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def reference_masked(data: bytes) -> int:
  crc = reference_crc32c(data)
  rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
  return (rotated + 0xA282EAD8) & 0xFFFFFFFF


@pytest.mark.parametrize('data, expected', [
    (b'', 0x00000000),
    (b'123456789', 0xE3069283),
    # RFC 3720 (iSCSI) B.4 test vectors.
    (bytes(32), 0x8A9136AA),
    (b'\xff' * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_vectors(data, expected):
  assert tfrecord.crc32c(data) == expected
  assert reference_crc32c(data) == expected


@pytest.mark.parametrize('length', [4, 5, 7, 511, 512, 513, 1000, 4096, 4099,
                                    20011])
def test_numpy_crc32c_matches_bitwise_reference(length):
  data = np.random.default_rng(length).integers(
      0, 256, length, dtype=np.uint8).tobytes()
  assert tfrecord._crc32c_numpy(data) == reference_crc32c(data)
  assert tfrecord.crc32c(data) == reference_crc32c(data)


def test_masked_crc32c_matches_reference():
  for data in (b'', b'a', b'123456789', bytes(range(256)) * 3):
    assert tfrecord.masked_crc32c(data) == reference_masked(data)


def write_records(path, records):
  with tfrecord.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)


RECORDS = [b'', b'x', b'hello world' * 7, bytes(range(256)) * 5]


def test_framing_parsed_independently(tmp_path):
  path = str(tmp_path / 'a.tfrecord')
  write_records(path, RECORDS)
  with open(path, 'rb') as f:
    blob = f.read()
  position = 0
  parsed = []
  while position < len(blob):
    length_bytes = blob[position:position + 8]
    (length,) = struct.unpack('<Q', length_bytes)
    (length_crc,) = struct.unpack('<I', blob[position + 8:position + 12])
    assert length_crc == reference_masked(length_bytes)
    data = blob[position + 12:position + 12 + length]
    (data_crc,) = struct.unpack('<I', blob[position + 12 + length:
                                           position + 16 + length])
    assert data_crc == reference_masked(data)
    parsed.append(data)
    position += 16 + length
  assert parsed == RECORDS


def test_index_and_read_round_trip(tmp_path):
  path = str(tmp_path / 'a.tfrecord')
  write_records(path, RECORDS)
  index = tfrecord.index_shard(path)
  assert index.dtype == np.int64 and index.shape == (len(RECORDS), 2)
  expected_offsets = np.cumsum([0] + [16 + len(r) for r in RECORDS[:-1]]) + 12
  np.testing.assert_array_equal(index[:, 0], expected_offsets)
  np.testing.assert_array_equal(index[:, 1], [len(r) for r in RECORDS])
  with open(path, 'rb') as f:
    for i in reversed(range(len(RECORDS))):
      assert tfrecord.read_record(f, *index[i], shard=path,
                                  record_index=i) == RECORDS[i]
  assert tfrecord.read_all_records(path) == RECORDS


def test_empty_shard(tmp_path):
  path = str(tmp_path / 'empty.tfrecord')
  write_records(path, [])
  assert tfrecord.index_shard(path).shape == (0, 2)


def _record_start(index):
  return int(index[2, 0]) - 12


@pytest.mark.parametrize('cut', ['mid_header', 'mid_data', 'footer'])
def test_truncated_shard_names_shard_and_record(tmp_path, cut):
  path = str(tmp_path / 'cut.tfrecord')
  write_records(path, RECORDS)
  index = tfrecord.index_shard(path)
  start = _record_start(index)
  end = {'mid_header': start + 5, 'mid_data': start + 12 + 30,
         'footer': start + 12 + len(RECORDS[2]) + 2}[cut]
  with open(path, 'r+b') as f:
    f.truncate(end)
  with pytest.raises(tfrecord.TFRecordError, match=r'cut\.tfrecord: record 2'):
    tfrecord.index_shard(path)


def test_length_crc_mismatch(tmp_path):
  path = str(tmp_path / 'bad.tfrecord')
  write_records(path, RECORDS)
  start = _record_start(tfrecord.index_shard(path))
  with open(path, 'r+b') as f:
    f.seek(start + 9)
    byte = f.read(1)
    f.seek(start + 9)
    f.write(bytes([byte[0] ^ 0x01]))
  with pytest.raises(tfrecord.TFRecordError,
                     match=r'bad\.tfrecord: record 2: length CRC'):
    tfrecord.index_shard(path)


def test_data_crc_mismatch(tmp_path):
  path = str(tmp_path / 'bad.tfrecord')
  write_records(path, RECORDS)
  index = tfrecord.index_shard(path)
  with open(path, 'r+b') as f:
    f.seek(int(index[3, 0]) + 100)
    byte = f.read(1)
    f.seek(int(index[3, 0]) + 100)
    f.write(bytes([byte[0] ^ 0x80]))
  with open(path, 'rb') as f:
    assert tfrecord.read_record(f, *index[2], shard=path,
                                record_index=2) == RECORDS[2]
    with pytest.raises(tfrecord.TFRecordError,
                       match=r'bad\.tfrecord: record 3: data CRC'):
      tfrecord.read_record(f, *index[3], shard=path, record_index=3)


def test_example_wire_format_matches_hand_encoding():
  # Example{features{feature{key: 'a' value{int64_list{value: [3]}}}}}, by
  # hand: Int64List 0a 01 03 (packed); Feature 1a 03 <..>; map entry
  # 0a 01 'a' 12 05 <..>; Features 0a 0a <..>; Example 0a 0c <..>.
  expected = bytes.fromhex('0a0c0a0a0a016112051a030a0103')
  assert tfrecord.encode_example({'a': 3}) == expected
  assert tfrecord.decode_example(expected) == {'a': [3]}


def test_example_round_trip():
  features = {
      'image/encoded': b'\x89PNG\x00\xff',
      'image/format': 'png',
      'image/height': 40,
      'ints': [1, -2, 2**40],
      'floats': [0.5, -1.25],
      'many_bytes': [b'a', b'bc'],
  }
  decoded = tfrecord.decode_example(tfrecord.encode_example(features))
  assert decoded == {
      'image/encoded': b'\x89PNG\x00\xff',
      'image/format': b'png',
      'image/height': [40],
      'ints': [1, -2, 2**40],
      'floats': [0.5, -1.25],
      'many_bytes': [b'a', b'bc'],
  }


def test_example_errors_name_the_key():
  with pytest.raises(ValueError, match="'empty'"):
    tfrecord.encode_example({'empty': []})
  with pytest.raises(ValueError, match="'obj'"):
    tfrecord.encode_example({'obj': object()})
  with pytest.raises(ValueError, match='not a tf.train.Example'):
    tfrecord.decode_example(b'\xff\xff\xff')


def test_writer_closes_and_refuses_writes(tmp_path):
  path = tmp_path / 'w.tfrecord'
  writer = tfrecord.TFRecordWriter(path)
  writer.write(b'abc')
  writer.close()
  assert os.path.getsize(path) == 16 + 3
  with pytest.raises(ValueError, match='closed'):
    writer.write(b'x')


def test_crc_is_right_from_many_threads_at_once():
  # The input pipeline checks CRCs from several reader threads; shared tables
  # that were grown lazily once raced there and gave false CRC mismatches.
  rng = np.random.default_rng(3)
  blobs = [rng.bytes(int(n)) for n in rng.integers(600, 300_000, 32)]
  expected = [tfrecord._crc32c_python(b) for b in blobs]  # pylint: disable=protected-access
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for _ in range(3):
      got = list(pool.map(tfrecord._crc32c_numpy, blobs))  # pylint: disable=protected-access
      assert got == expected
