"""Input pipelines: TFDS array_record data sources read by grain.

Every dataset is read the same way, without TensorFlow:
`tfds.builder(name, data_dir=...).as_data_source(split)` gives random access to
array_record shards, and a `grain.MapDataset` shuffles, repeats, augments and
batches by index, so a training batch is a pure function of (seed, step).

* ``digits``: scikit-learn's 8x8 digits, prepared on first use into
  ``data_dir`` (see `dpm_jax.data.digits`): 1437 train / 360 test images.
* ``cifar10``, ``cifar100``, ``imagenet2012``: read from ``data_dir``, where
  they must already be prepared as array_record; nothing is ever downloaded.
  A missing dataset raises `DatasetNotFoundError` naming the directory it
  searched and how to prepare the data. For ``imagenet2012``, ``'test'`` means
  TFDS's labelled ``'validation'`` split (TFDS's ``'test'`` has no labels).

Batches are dicts of numpy arrays: ``image`` float32 ``[B, H, W, C]``
normalized per channel, ``label`` int32 ``[B]`` and ``mask`` float32 ``[B]``
(1 for real rows, 0 for the rows padding the last evaluation batch).
"""

from collections.abc import Iterator, Sequence
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from dpm_jax.data import digits as _digits

Example = dict[str, Any]
Batch = dict[str, np.ndarray]

CIFAR_PADDING = 4
IMAGENET_RESIZE = 256
# Random-resized-crop ranges of the Inception / torchvision recipe.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10


class DatasetInfo(NamedTuple):
  """What a model and a training loop need to know about a dataset.

  Attributes:
    name: One of `DATASETS`.
    num_classes: Number of labels.
    image_shape: ``(H, W, C)`` of the images the pipeline yields.
    num_train: Examples in the train split.
    num_test: Examples in the split `eval_iterator` reads by default.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_test: int


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not prepared as array_record in the data directory."""


@dataclasses.dataclass(frozen=True)
class _Spec:
  num_classes: int
  image_shape: tuple[int, int, int]
  # Per-channel mean and standard deviation of pixels scaled to [0, 1].
  mean: tuple[float, ...]
  std: tuple[float, ...]
  # The TFDS split that `split='test'` reads.
  test_split: str = 'test'
  # Formatted with `name` and `data_dir` into `DatasetNotFoundError`.
  how_to_prepare: str = ''
  # Threads decoding and augmenting in each process. Small images cost mostly
  # Python time, which threads only contend for; large JPEGs decode in C
  # without the GIL.
  read_threads: int = 0


_TFDS_BUILD = (
    'Prepare it on a machine with network access and TensorFlow installed'
    ' (pip install tensorflow tensorflow-datasets):\n'
    '  tfds build {name} --data_dir={data_dir} --file_format=array_record\n'
    'or prepare it elsewhere and copy its {name}/ folder into {data_dir}.'
)

_SPECS: dict[str, _Spec] = {
    # Statistics of the train split's pixels (x * 255 // 16) / 255.
    'digits': _Spec(10, (8, 8, 1), mean=(0.3046,), std=(0.3760,)),
    # The usual CIFAR train-split statistics.
    'cifar10': _Spec(
        10,
        (32, 32, 3),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        how_to_prepare=_TFDS_BUILD,
    ),
    'cifar100': _Spec(
        100,
        (32, 32, 3),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        how_to_prepare=_TFDS_BUILD,
    ),
    'imagenet2012': _Spec(
        1000,
        (224, 224, 3),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        test_split='validation',
        read_threads=8,
        how_to_prepare=(
            'ImageNet needs a manual download: register at'
            ' https://image-net.org/download-images, put'
            ' ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in'
            ' {data_dir}/downloads/manual/ and, with TensorFlow installed'
            ' (pip install tensorflow tensorflow-datasets), run\n'
            '  tfds build {name} --data_dir={data_dir}'
            ' --file_format=array_record'
        ),
    ),
}

DATASETS: tuple[str, ...] = tuple(_SPECS)


def _spec(name: str) -> _Spec:
  if name not in _SPECS:
    raise ValueError(f'Unknown dataset {name!r}; choose one of {DATASETS}.')
  return _SPECS[name]


def _not_found_message(name: str, builder: tfds.core.DatasetBuilder) -> str:
  data_dir = builder.data_dir_root
  message = (
      f'Dataset {name!r} is not prepared as array_record under {data_dir}'
      f' (searched {builder.data_dir}).'
  )
  if builder.is_prepared():
    message += (
        ' It is there in another file format; convert it with\n'
        f'  tfds convert_format --dataset_version_dir={builder.data_dir}'
        ' --out_file_format=array_record'
    )
  how = _spec(name).how_to_prepare.format(name=name, data_dir=data_dir)
  return f'{message}\n{how}\nOr pass data_dir= pointing at a prepared copy.'


def _data_source(
    name: str, split: str, data_dir: str | None
) -> Sequence[Example]:
  """Opens a split for random access; prepares digits, never downloads."""
  spec = _spec(name)
  if name == 'digits':
    builder = _digits.Digits(data_dir=data_dir)
    builder.download_and_prepare()  # A no-op once prepared.
  else:
    # Reads metadata only (TFDS keeps its GCS look-ups off by default).
    builder = tfds.builder(name, data_dir=data_dir)
  try:
    # Reads only, never downloads; `tfds.testing.mock_data` patches it.
    return builder.as_data_source(
        split=spec.test_split if split == 'test' else split
    )
  except Exception as error:
    array_record = tfds.core.FileFormat.ARRAY_RECORD
    if (
        builder.is_prepared()
        and array_record in builder.info.available_file_formats()
    ):
      raise  # The data is there: the error is about something else.
    raise DatasetNotFoundError(_not_found_message(name, builder)) from error


def dataset_info(name: str, *, data_dir: str | None = None) -> DatasetInfo:
  """Returns the shapes and sizes of ``name`` as the pipeline yields it.

  Args:
    name: One of `DATASETS`.
    data_dir: TFDS data directory; defaults to TFDS's (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``). Digits is prepared there on first use.

  Returns:
    A `DatasetInfo`; ``num_test`` counts the split `eval_iterator` reads by
    default.

  Raises:
    ValueError: ``name`` is not one of `DATASETS`.
    DatasetNotFoundError: the data is not in ``data_dir``.

  Example:
    >>> import tempfile
    >>> dataset_info('digits', data_dir=tempfile.mkdtemp())
    DatasetInfo(name='digits', num_classes=10, image_shape=(8, 8, 1), num_train=1437, num_test=360)
  """
  spec = _spec(name)
  return DatasetInfo(
      name=name,
      num_classes=spec.num_classes,
      image_shape=spec.image_shape,
      num_train=len(_data_source(name, 'train', data_dir)),
      num_test=len(_data_source(name, 'test', data_dir)),
  )


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  resized = Image.fromarray(image).resize(
      (width, height), Image.Resampling.BILINEAR
  )
  return np.asarray(resized)


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
  height, width, _ = image.shape
  top, left = (height - size) // 2, (width - size) // 2
  return image[top : top + size, left : left + size]


def _resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """ImageNet evaluation: shorter side to 256, then the central crop."""
  height, width, _ = image.shape
  scale = IMAGENET_RESIZE / min(height, width)
  image = _resize(image, round(height * scale), round(width * scale))
  return _center_crop(image, size)


def _random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return image[:, ::-1] if rng.random() < 0.5 else image


def _random_crop_flip(
    image: np.ndarray, rng: np.random.Generator, size: int
) -> np.ndarray:
  """CIFAR: zero-pad by 4, a random ``size`` x ``size`` crop, random flip."""
  pad = CIFAR_PADDING
  height, width, channels = image.shape
  # 10x faster than np.pad.
  padded = np.zeros((height + 2 * pad, width + 2 * pad, channels), image.dtype)
  padded[pad : pad + height, pad : pad + width] = image
  top, left = rng.integers(0, np.array(padded.shape[:2]) - size + 1)
  return _random_flip(padded[top : top + size, left : left + size], rng)


def _random_resized_crop_flip(
    image: np.ndarray, rng: np.random.Generator, size: int
) -> np.ndarray:
  """ImageNet train: an Inception-style random crop resized to ``size``, flip.

  The crop covers 8%..100% of the image with aspect ratio 3/4..4/3
  (log-uniform); after 10 rejected draws, the central square is used.
  """
  height, width, _ = image.shape
  crop = _center_crop(image, min(height, width))
  for _ in range(CROP_ATTEMPTS):
    area = height * width * rng.uniform(*CROP_AREA_RANGE)
    aspect = math.exp(rng.uniform(*np.log(CROP_ASPECT_RANGE)))
    crop_width = round(math.sqrt(area * aspect))
    crop_height = round(math.sqrt(area / aspect))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = rng.integers(0, height - crop_height + 1)
      left = rng.integers(0, width - crop_width + 1)
      crop = image[top : top + crop_height, left : left + crop_width]
      break
  return _random_flip(_resize(crop, size, size), rng)


# Train-time augmentations, (image, rng, output size) -> image; digits has none.
_AUGMENTATIONS = {
    'cifar10': _random_crop_flip,
    'cifar100': _random_crop_flip,
    'imagenet2012': _random_resized_crop_flip,
}


def _record(image: np.ndarray, label: Any, spec: _Spec) -> Example:
  mean = np.asarray(spec.mean, np.float32)
  std = np.asarray(spec.std, np.float32)
  return {
      'image': (image.astype(np.float32) / 255.0 - mean) / std,
      'label': np.int32(label),
      'mask': np.float32(1.0),
  }


def _eval_example(example: Example, *, name: str) -> Example:
  spec = _spec(name)
  image = example['image']
  if name == 'imagenet2012':
    image = _resize_center_crop(image, spec.image_shape[0])
  return _record(image, example['label'], spec)


def _train_example(
    example: Example, rng: np.random.Generator, *, name: str
) -> Example:
  spec = _spec(name)
  image = _AUGMENTATIONS[name](example['image'], rng, spec.image_shape[0])
  return _record(image, example['label'], spec)


def _pad_batch(batch: Batch, *, batch_size: int) -> Batch:
  """Pads with zero rows (so with ``mask`` 0) up to ``batch_size`` rows."""
  missing = batch_size - len(batch['label'])
  return {
      key: np.pad(value, [(0, missing)] + [(0, 0)] * (value.ndim - 1))
      for key, value in batch.items()
  }


def _iterate(
    batches: grain.MapDataset, name: str, worker_count: int
) -> grain.DatasetIterator:
  """Iterates ``batches`` in order, computing ahead in threads or processes.

  Batching is a `MapDataset` step, before this, so that worker processes
  each get whole batches (a slice of ``batches``) and the output does not
  depend on ``worker_count``.
  """
  threads = _spec(name).read_threads
  # Each thread computes one batch; the buffer bounds the batches in memory.
  ds = batches.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)
  )
  if worker_count:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)


def train_iterator(
    name: str,
    *,
    batch_size: int,
    seed: int,
    data_dir: str | None = None,
    augment: bool = True,
    num_epochs: int | None = None,
    start_step: int = 0,
    worker_count: int = 0,
) -> Iterator[Batch]:
  """Returns shuffled, augmented batches of ``name``'s train split.

  Batch ``i`` is a pure function of ``(seed, i)``: grain shuffles by index
  (differently each epoch) and seeds each example's augmentation with its
  index, so ``start_step=k`` starts at batch ``k`` without reading batches
  ``0..k-1``. Batches run across epoch boundaries; with ``num_epochs`` set,
  the last partial batch is dropped.

  Args:
    name: One of `DATASETS`.
    batch_size: Rows per batch.
    seed: Seeds the shuffle and the augmentation.
    data_dir: TFDS data directory; see `dataset_info`.
    augment: CIFAR: 4-pixel zero padding, a random 32x32 crop and a random
      horizontal flip. ImageNet: a random resized crop to 224x224 and a random
      flip (without: the evaluation resize and center crop). Digits has none.
    num_epochs: Passes over the data; None repeats forever.
    start_step: Index of the first batch to yield, to resume a run.
    worker_count: Worker processes decoding and augmenting; 0 works in this
      process (with threads).

  Returns:
    An iterator (a `grain.DatasetIterator`) of dicts with ``image`` float32
    ``[B, H, W, C]``, ``label`` int32 ``[B]`` and ``mask`` float32 ``[B]``
    (all ones).

  Raises:
    ValueError: ``name`` is not one of `DATASETS`.
    DatasetNotFoundError: the data is not in ``data_dir``.

  Example:
    >>> import tempfile
    >>> batches = train_iterator(
    ...     'digits', batch_size=32, seed=0, data_dir=tempfile.mkdtemp())
    >>> batch = next(batches)
    >>> batch['image'].shape, batch['label'].dtype
    ((32, 8, 8, 1), dtype('int32'))
  """
  source = _data_source(name, 'train', data_dir)
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(num_epochs)
  if augment and name in _AUGMENTATIONS:
    ds = ds.random_map(functools.partial(_train_example, name=name))
  else:
    ds = ds.map(functools.partial(_eval_example, name=name))
  ds = ds.batch(batch_size, drop_remainder=True)
  # Slicing by index skips ahead without reading what it skips.
  return _iterate(ds[start_step:], name, worker_count)


def eval_iterator(
    name: str,
    *,
    batch_size: int,
    data_dir: str | None = None,
    split: str = 'test',
    worker_count: int = 0,
) -> Iterator[Batch]:
  """Returns one in-order pass over ``split`` in batches of ``batch_size``.

  The last batch is padded with zero rows whose ``mask`` is 0, so every batch
  has the same shape (one compilation) and ``mask`` weights the metrics.

  Args:
    name: One of `DATASETS`.
    batch_size: Rows per batch.
    data_dir: TFDS data directory; see `dataset_info`.
    split: ``'test'`` (TFDS's ``'validation'`` for imagenet2012), ``'train'``
      or any TFDS split string such as ``'train[:10%]'``.
    worker_count: Worker processes decoding; 0 works in this process.

  Returns:
    An iterator of dicts with ``image`` float32 ``[B, H, W, C]``, ``label``
    int32 ``[B]`` and ``mask`` float32 ``[B]``.

  Raises:
    ValueError: ``name`` is not one of `DATASETS`.
    DatasetNotFoundError: the data is not in ``data_dir``.

  Example:
    >>> import tempfile
    >>> batches = eval_iterator(
    ...     'digits', batch_size=100, data_dir=tempfile.mkdtemp())
    >>> [int(batch['mask'].sum()) for batch in batches]
    [100, 100, 100, 60]
  """
  source = _data_source(name, split, data_dir)
  ds = grain.MapDataset.source(source).map(
      functools.partial(_eval_example, name=name)
  )
  ds = ds.batch(batch_size).map(
      functools.partial(_pad_batch, batch_size=batch_size)
  )
  return _iterate(ds, name, worker_count)
