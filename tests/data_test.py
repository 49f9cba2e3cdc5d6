"""Tests for the input pipelines: real digits and MNIST-1D, mocked CIFAR/ImageNet, errors.

Nothing here needs the network or the user's TFDS directory: digits and
MNIST-1D are prepared into a temporary data_dir, CIFAR and ImageNet come from
`tfds.testing.mock_data`.
"""

from collections.abc import Iterator
import dataclasses
import itertools
import pathlib
import random
import socket
import time

from absl import flags
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from dpm_jax import data
from dpm_jax.data import digits as digits_lib
from dpm_jax.data import mnist1d as mnist1d_lib
from dpm_jax.data import pipeline

Batch = dict[str, np.ndarray]

# Per class 0..9, as documented in `dpm_jax.data.digits`.
DIGITS_TRAIN_COUNTS = [142, 146, 142, 146, 145, 145, 145, 143, 139, 144]
DIGITS_TEST_COUNTS = [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  """A data_dir where digits is prepared once for this module."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  data.dataset_info('digits', data_dir=data_dir)
  return data_dir


def _raw(
    split: str, data_dir: str, name: str = 'digits'
) -> tuple[np.ndarray, np.ndarray]:
  """The stored images and labels, read by TFDS alone."""
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  examples = [source[i] for i in range(len(source))]
  images = np.stack([example['image'] for example in examples])
  labels = np.array([example['label'] for example in examples])
  return images, labels


def _normalized(images: np.ndarray, name: str) -> np.ndarray:
  spec = pipeline._SPECS[name]  # pylint: disable=protected-access
  return (images / 255.0 - np.array(spec.mean)) / np.array(spec.std)


def _take(iterator: Iterator[Batch], count: int) -> list[Batch]:
  return list(itertools.islice(iterator, count))


def _assert_same_batches(expected: list[Batch], actual: list[Batch]) -> None:
  assert len(expected) == len(actual)
  for step, (want, got) in enumerate(zip(expected, actual)):
    assert want.keys() == got.keys(), step
    for key in want:
      np.testing.assert_array_equal(
          want[key], got[key], err_msg=f'{step=} {key=}'
      )


# Digits: the real data, prepared into a temporary data_dir.


def test_digits_info(digits_dir):
  assert data.dataset_info('digits', data_dir=digits_dir) == data.DatasetInfo(
      name='digits',
      num_classes=10,
      image_shape=(8, 8, 1),
      num_train=1437,
      num_test=360,
  )


def test_digits_is_prepared_once_and_reused(digits_dir):
  def snapshot():
    files = pathlib.Path(digits_dir).rglob('*')
    return {path: path.stat().st_mtime_ns for path in files}

  before = snapshot()
  data.dataset_info('digits', data_dir=digits_dir)
  assert snapshot() == before


def test_digits_splits_are_the_documented_stratified_split(digits_dir):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  train_images, train_labels = _raw('train', digits_dir)
  test_images, test_labels = _raw('test', digits_dir)
  assert train_images.shape == (1437, 8, 8, 1)
  assert train_images.dtype == np.uint8
  assert np.bincount(train_labels).tolist() == DIGITS_TRAIN_COUNTS
  assert np.bincount(test_labels).tolist() == DIGITS_TEST_COUNTS
  # Stratified: each class is 20% test, to within one image.
  totals = np.bincount(train_labels) + np.bincount(test_labels)
  assert np.all(np.abs(np.bincount(test_labels) - 0.2 * totals) <= 1)
  # Together, the splits are exactly scikit-learn's images, rescaled.
  sk = datasets.load_digits()
  sk_images = (sk.images.astype(np.int64) * 255 // 16).astype(np.uint8)
  stored = {
      'train': (train_images, train_labels),
      'test': (test_images, test_labels),
  }
  for split, indices in digits_lib.split_indices().items():
    images, labels = stored[split]
    expected = zip(sk.target[indices], map(bytes, sk_images[indices]))
    assert sorted(zip(labels, map(bytes, images[..., 0]))) == sorted(expected)


def test_digits_train_batches(digits_dir):
  batches = data.train_iterator(
      'digits', batch_size=32, seed=0, data_dir=digits_dir
  )
  batch = next(batches)
  assert batch['image'].shape == (32, 8, 8, 1)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (32,)
  assert batch['label'].dtype == np.int32
  assert np.all((0 <= batch['label']) & (batch['label'] < 10))
  np.testing.assert_array_equal(batch['mask'], np.ones(32, np.float32))


def test_digits_one_epoch_is_a_normalized_permutation(digits_dir):
  # 1437 = 3 * 479: one epoch is exactly three batches.
  batches = list(
      data.train_iterator(
          'digits', batch_size=479, seed=0, data_dir=digits_dir, num_epochs=1
      )
  )
  assert len(batches) == 3
  labels = np.concatenate([batch['label'] for batch in batches])
  assert np.bincount(labels).tolist() == DIGITS_TRAIN_COUNTS
  images = np.concatenate([batch['image'] for batch in batches])
  assert abs(images.mean()) < 0.01
  assert abs(images.std() - 1) < 0.01


def test_train_iterator_is_deterministic_for_a_seed(digits_dir):
  def first_batches(seed: int) -> list[Batch]:
    batches = data.train_iterator(
        'digits', batch_size=64, seed=seed, data_dir=digits_dir
    )
    return _take(batches, 5)

  _assert_same_batches(first_batches(1), first_batches(1))
  first, other = first_batches(1)[0], first_batches(2)[0]
  assert not np.array_equal(first['label'], other['label'])


def test_epochs_are_shuffled_differently(digits_dir):
  # 1437 = 3 * 479, so batch 3 starts the second epoch.
  batches = data.train_iterator(
      'digits', batch_size=479, seed=0, data_dir=digits_dir
  )
  epochs = _take(batches, 6)
  assert not np.array_equal(epochs[0]['image'], epochs[3]['image'])


def test_start_step_resumes_identically(digits_dir):
  # 1437 / 128 = 11.2 batches per epoch: steps 9..14 cross an epoch boundary.
  kwargs = dict(batch_size=128, seed=3, data_dir=digits_dir)
  run = _take(data.train_iterator('digits', **kwargs), 15)
  resumed = _take(data.train_iterator('digits', start_step=9, **kwargs), 6)
  _assert_same_batches(run[9:], resumed)


def test_finite_epochs_drop_the_remainder(digits_dir):
  batches = list(
      data.train_iterator(
          'digits', batch_size=100, seed=0, data_dir=digits_dir, num_epochs=2
      )
  )
  assert len(batches) == 2 * 1437 // 100
  assert all(batch['label'].shape == (100,) for batch in batches)


@pytest.mark.parametrize('split', ['test', 'train'])
def test_eval_iterator_covers_split_once_in_order(digits_dir, split):
  batches = list(
      data.eval_iterator(
          'digits', batch_size=100, data_dir=digits_dir, split=split
      )
  )
  images, labels = _raw(split, digits_dir)
  num_real = len(labels)
  assert len(batches) == -(-num_real // 100)
  for batch in batches:
    assert batch['image'].shape == (100, 8, 8, 1)
    assert batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    assert batch['mask'].dtype == np.float32
  got = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
  np.testing.assert_array_equal(got['mask'], np.arange(len(got['mask'])) < num_real)
  np.testing.assert_array_equal(got['label'][:num_real], labels)
  np.testing.assert_allclose(
      got['image'][:num_real], _normalized(images, 'digits'), atol=1e-5
  )
  # Padding rows are zeros.
  assert not got['image'][num_real:].any()
  assert not got['label'][num_real:].any()


@pytest.mark.parametrize('name', ['digits', 'mnist1d'])
def test_in_memory_batches_equal_record_by_record_reading(
    name, digits_dir, mnist1d_dir, monkeypatch
):
  data_dir = {'digits': digits_dir, 'mnist1d': mnist1d_dir}[name]
  kwargs = dict(batch_size=100, seed=4, data_dir=data_dir, start_step=7)
  fast = _take(data.train_iterator(name, **kwargs), 50)  # Crosses epochs.
  fast_eval = list(data.eval_iterator(name, batch_size=300, data_dir=data_dir))
  spec = pipeline._SPECS[name]  # pylint: disable=protected-access
  assert spec.in_memory
  monkeypatch.setitem(
      pipeline._SPECS, name, dataclasses.replace(spec, in_memory=False)  # pylint: disable=protected-access
  )
  slow = _take(data.train_iterator(name, **kwargs), 50)
  _assert_same_batches(fast, slow)
  slow_eval = list(data.eval_iterator(name, batch_size=300, data_dir=data_dir))
  _assert_same_batches(fast_eval, slow_eval)
  for batch in fast + fast_eval:
    assert {k: v.dtype for k, v in batch.items()} == {
        'image': np.float32, 'label': np.int32, 'mask': np.float32}


def test_in_memory_split_is_decoded_again_when_its_files_change(tmp_path):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path)
  (before,) = data.eval_iterator('digits', batch_size=360, data_dir=data_dir)
  (cached,) = data.eval_iterator('digits', batch_size=360, data_dir=data_dir)
  _assert_same_batches([before], [cached])
  # Rewrite the test split with its records in reverse order (same size, new file).
  (path,) = pathlib.Path(data_dir).glob('digits/*/digits-test.array_record*')
  reader = array_record_module.ArrayRecordReader(str(path))
  records, options = reader.read_all(), reader.writer_options_string()
  reader.close()
  writer = array_record_module.ArrayRecordWriter(str(path), options)
  for record in reversed(records):
    writer.write(record)
  writer.close()
  (after,) = data.eval_iterator('digits', batch_size=360, data_dir=data_dir)
  np.testing.assert_array_equal(after['label'], before['label'][::-1])
  np.testing.assert_array_equal(after['image'], before['image'][::-1])


def test_worker_processes_give_the_same_batches(digits_dir):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags in its workers.
  kwargs = dict(batch_size=64, seed=5, data_dir=digits_dir, start_step=20)
  expected = _take(data.train_iterator('digits', **kwargs), 3)
  workers = data.train_iterator('digits', worker_count=2, **kwargs)
  try:
    _assert_same_batches(expected, _take(workers, 3))
  finally:
    workers.close()


# MNIST-1D: generated by the `mnist1d` package into a temporary data_dir.


@pytest.fixture(scope='module')
def mnist1d_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  """A data_dir where MNIST-1D is prepared once for this module, offline."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))

  def no_network(*args, **kwargs):
    raise AssertionError(f'MNIST-1D preparation tried the network: {args}')

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket.socket, 'connect', no_network)
    patch.setattr(socket, 'create_connection', no_network)
    data.dataset_info('mnist1d', data_dir=data_dir)
  return data_dir


def test_mnist1d_info(mnist1d_dir):
  assert data.dataset_info('mnist1d', data_dir=mnist1d_dir) == data.DatasetInfo(
      name='mnist1d',
      num_classes=10,
      image_shape=(40, 1),
      num_train=4000,
      num_test=1000,
  )


def test_mnist1d_is_the_packages_benchmark(mnist1d_dir):
  from mnist1d import data as mnist1d_data  # pylint: disable=g-import-not-at-top

  expected = mnist1d_data.make_dataset(mnist1d_data.get_dataset_args())
  for split, x_key, y_key in (('train', 'x', 'y'), ('test', 'x_test', 'y_test')):
    images, labels = _raw(split, mnist1d_dir, 'mnist1d')
    assert images.shape == (len(expected[y_key]), 40, 1)
    assert images.dtype == np.float32
    np.testing.assert_array_equal(
        images[..., 0], expected[x_key].astype(np.float32), err_msg=split
    )
    np.testing.assert_array_equal(labels, expected[y_key], err_msg=split)


def test_mnist1d_generation_is_seeded_and_leaves_global_randomness_alone(
    mnist1d_dir,
):
  np.random.seed(7)
  random.seed(7)
  numpy_next, python_next = np.random.rand(), random.random()
  np.random.seed(7)
  random.seed(7)
  first = mnist1d_lib.generate(seed=3)
  assert (np.random.rand(), random.random()) == (numpy_next, python_next)
  again = mnist1d_lib.generate(seed=3)
  for split in ('train', 'test'):
    for want, got in zip(first[split], again[split]):
      np.testing.assert_array_equal(want, got, err_msg=split)
  # Another seed than the benchmark's (42) is another draw.
  benchmark, _ = _raw('train', mnist1d_dir, 'mnist1d')
  assert not np.allclose(first['train'][0], benchmark[..., 0], atol=1e-3)


def test_mnist1d_batches(mnist1d_dir):
  train = next(
      data.train_iterator('mnist1d', batch_size=32, seed=0, data_dir=mnist1d_dir)
  )
  assert train['image'].shape == (32, 40, 1)
  assert train['image'].dtype == np.float32
  assert train['label'].shape == (32,) and train['label'].dtype == np.int32
  np.testing.assert_array_equal(train['mask'], np.ones(32, np.float32))
  # The whole test split: the stored values as float32 (already standardized).
  (batch,) = data.eval_iterator('mnist1d', batch_size=1000, data_dir=mnist1d_dir)
  images, labels = _raw('test', mnist1d_dir, 'mnist1d')
  np.testing.assert_array_equal(batch['image'], images)
  np.testing.assert_array_equal(batch['label'], labels)
  assert abs(batch['image'].mean()) < 0.01
  assert abs(batch['image'].std() - 1) < 0.02


# CIFAR and ImageNet, through `tfds.testing.mock_data`.


@pytest.mark.parametrize('name, num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_cifar_pipeline_with_mock_data(tmp_path, name, num_classes):
  kwargs = dict(batch_size=4, data_dir=str(tmp_path))  # Empty: data is mocked.
  with tfds.testing.mock_data(num_examples=10):
    info = data.dataset_info(name, data_dir=str(tmp_path))
    train = _take(data.train_iterator(name, seed=0, **kwargs), 3)
    again = _take(data.train_iterator(name, seed=0, **kwargs), 3)
    plain = _take(data.train_iterator(name, seed=0, augment=False, **kwargs), 3)
    evaluation = list(data.eval_iterator(name, **kwargs))
  assert info == data.DatasetInfo(name, num_classes, (32, 32, 3), 10, 10)
  for batch in train + plain:
    assert batch['image'].shape == (4, 32, 32, 3)
    assert batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    assert np.all((0 <= batch['label']) & (batch['label'] < num_classes))
  _assert_same_batches(train, again)
  # The same examples in the same order; only the augmentation differs.
  for augmented, original in zip(train, plain):
    np.testing.assert_array_equal(augmented['label'], original['label'])
  assert not np.array_equal(train[0]['image'], plain[0]['image'])
  masks = [batch['mask'].tolist() for batch in evaluation]
  assert masks == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_imagenet_pipeline_with_mock_data(tmp_path):
  kwargs = dict(batch_size=2, data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=3):
    info = data.dataset_info('imagenet2012', data_dir=str(tmp_path))
    train = next(data.train_iterator('imagenet2012', seed=0, **kwargs))
    evaluation = list(data.eval_iterator('imagenet2012', **kwargs))
  assert info.image_shape == (224, 224, 3) and info.num_classes == 1000
  assert train['image'].shape == (2, 224, 224, 3)
  assert [batch['image'].shape for batch in evaluation] == [(2, 224, 224, 3)] * 2
  assert [batch['mask'].tolist() for batch in evaluation] == [[1, 1], [1, 0]]


# Augmentations.
# pylint: disable=protected-access


def test_cifar_crop_is_a_shift_of_the_zero_padded_image():
  image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  shifts = [padded[i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
  seen_flip = seen_shift = False
  for seed in range(20):
    crop = pipeline._random_crop_flip(image, np.random.default_rng(seed), 32)
    assert crop.shape == image.shape and crop.dtype == image.dtype
    flipped = any(np.array_equal(crop[:, ::-1], shift) for shift in shifts)
    assert flipped or any(np.array_equal(crop, shift) for shift in shifts)
    seen_flip |= flipped
    seen_shift |= not any(np.array_equal(c, image) for c in (crop, crop[:, ::-1]))
  assert seen_flip and seen_shift


@pytest.mark.parametrize('shape', [(375, 500, 3), (500, 333, 3), (20, 7, 3), (1, 1, 3)])
def test_imagenet_crops_have_the_output_shape(shape):
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  for seed in range(3):
    rng = np.random.default_rng(seed)
    crop = pipeline._random_resized_crop_flip(image, rng, 224)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
  assert pipeline._resize_center_crop(image, 224).shape == (224, 224, 3)


def test_imagenet_eval_crop_is_central_after_resizing_the_shorter_side_to_256():
  rng = np.random.default_rng(0)
  # Shorter side already 256: no resampling, just the central 224 x 224.
  image = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
  np.testing.assert_array_equal(pipeline._resize_center_crop(image, 224), image[16:240, 48:272])
  # Shorter side 512: halved (bilinear) first.
  image = rng.integers(0, 256, (640, 512, 3), dtype=np.uint8)
  halved = np.asarray(Image.fromarray(image).resize((256, 320), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(pipeline._resize_center_crop(image, 224), halved[48:272, 16:240])


def test_imagenet_train_crops_are_flipped_half_the_time():
  # A left-to-right ramp: a crop resized keeps it increasing, a flip makes it decreasing.
  ramp = np.linspace(0, 255, 300).astype(np.uint8)
  image = np.broadcast_to(ramp[None, :, None], (200, 300, 3)).copy()
  flipped = []
  for seed in range(16):
    crop = pipeline._random_resized_crop_flip(image, np.random.default_rng(seed), 224)
    steps = np.diff(crop[0, :, 0].astype(int))
    assert np.all(steps >= 0) or np.all(steps <= 0), seed
    flipped.append(bool(np.all(steps <= 0)))
  assert 0 < sum(flipped) < len(flipped)


# pylint: enable=protected-access
# Errors.


@pytest.mark.parametrize(
    'name, hint',
    [
        ('cifar10', 'tfds build cifar10'),
        ('cifar100', 'tfds build cifar100'),
        ('imagenet2012', 'downloads/manual'),
    ],
)
def test_missing_dataset_fails_fast_and_says_where_and_how(tmp_path, name, hint):
  data_dir = str(tmp_path)
  start = time.perf_counter()
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.train_iterator(name, batch_size=2, seed=0, data_dir=data_dir)
  assert time.perf_counter() - start < 5
  message = str(error.value)
  assert data_dir in message and hint in message and 'array_record' in message
  assert isinstance(error.value, FileNotFoundError)
  assert not list(tmp_path.iterdir())  # Nothing was downloaded or written.
  with pytest.raises(data.DatasetNotFoundError):
    data.dataset_info(name, data_dir=data_dir)
  with pytest.raises(data.DatasetNotFoundError):
    data.eval_iterator(name, batch_size=2, data_dir=data_dir)


def test_dataset_in_another_file_format_says_how_to_convert(tmp_path):
  # Metadata of a cifar10 prepared as tfrecord (needs no TensorFlow to write).
  builder = tfds.builder('cifar10', data_dir=str(tmp_path))
  builder.info.set_file_format('tfrecord')
  pathlib.Path(builder.data_dir).mkdir(parents=True)
  builder.info.write_to_directory(builder.data_dir)
  with pytest.raises(data.DatasetNotFoundError, match='tfds convert_format'):
    data.dataset_info('cifar10', data_dir=str(tmp_path))


def test_unknown_split_of_a_present_dataset_keeps_the_tfds_error(digits_dir):
  with pytest.raises(ValueError, match='Unknown split'):
    data.eval_iterator(
        'digits', batch_size=2, data_dir=digits_dir, split='validation'
    )


def test_unknown_name_lists_the_choices(tmp_path):
  data_dir = str(tmp_path)
  calls = [
      lambda: data.dataset_info('mnist', data_dir=data_dir),
      lambda: data.train_iterator('mnist', batch_size=2, seed=0, data_dir=data_dir),
      lambda: data.eval_iterator('mnist', batch_size=2, data_dir=data_dir),
  ]
  for call in calls:
    with pytest.raises(ValueError, match='mnist') as error:
      call()
    assert all(name in str(error.value) for name in data.DATASETS)
  assert data.DATASETS == (
      'digits', 'mnist1d', 'cifar10', 'cifar100', 'imagenet2012'
  )
