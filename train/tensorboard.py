"""TensorBoard event files, written without TensorFlow.

An event file is a sequence of records (TFRecord framing: the length, its masked CRC-32C,
the bytes, their masked CRC-32C); each record is an `Event` protocol buffer
(tensorflow/core/util/event.proto): the first holds the file version, the others a
`Summary` of scalars (`simple_value`) at a step. The few fields needed are encoded here
by hand, so `tensorboard --logdir <workdir>` reads what a run writes, and nothing more than
the standard library is needed to write it.

  >>> import tempfile
  >>> writer = EventWriter(tempfile.mkdtemp())
  >>> writer.scalars(10, {'train/loss': 0.25})
  >>> writer.path.name.startswith('events.out.tfevents.')
  True
"""

from collections.abc import Mapping
import os
import socket
import struct
import time

from etils import epath

FILE_VERSION = 'brain.Event:2'
_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected.


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`, as TFRecord files use.

  >>> hex(crc32c(b'123456789'))
  '0xe3069283'
  """
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The CRC TFRecord stores: rotated right by 15 bits plus a constant (so that a CRC of
  data holding CRCs is not degenerate)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
  """`data` framed as one TFRecord."""
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', masked_crc32c(header)) + data
          + struct.pack('<I', masked_crc32c(data)))


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1  # Negative int64s as protobuf encodes them: ten bytes.
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint(number << 3 | wire_type)


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2) + _varint(len(data)) + data


def scalar_event(step: int, values: Mapping[str, float], wall_time: float) -> bytes:
  """An `Event` at `step` whose summary holds one `simple_value` per tag of `values`."""
  summary = b''.join(
      _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack('<f', value))
      for tag, value in values.items())
  return (_field(1, 1) + struct.pack('<d', wall_time) + _field(2, 0) + _varint(step)
          + _bytes_field(5, summary))


def version_event(wall_time: float) -> bytes:
  """The first event of every file: its format version."""
  return _field(1, 1) + struct.pack('<d', wall_time) + _bytes_field(3, FILE_VERSION.encode())


class EventWriter:
  """Appends scalars to a new event file in `logdir` (named as TensorFlow names them).

  Each call appends whole records and closes the file, so a run killed at any point leaves
  a file TensorBoard reads up to the last complete record.
  """

  def __init__(self, logdir: str | os.PathLike[str]):
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = f'events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.{id(self)}'
    self.path = logdir / name
    with self.path.open('wb') as f:
      f.write(record(version_event(now)))

  def scalars(self, step: int, values: Mapping[str, float],
              wall_time: float | None = None) -> None:
    """Writes `values` (tag -> number) at `step`."""
    if not values:
      return
    event = scalar_event(step, values, time.time() if wall_time is None else wall_time)
    with self.path.open('ab') as f:
      f.write(record(event))
