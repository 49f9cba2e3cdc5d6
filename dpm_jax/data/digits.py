"""The scikit-learn handwritten digits as a TFDS dataset, prepared without TensorFlow.

The 1797 8x8 grey-scale images of `sklearn.datasets.load_digits` (a copy of the
UCI "Optical Recognition of Handwritten Digits" test set, bundled in the
scikit-learn wheel, so preparing needs no network) are written as array_record
shards that `tfds.data_source('digits', data_dir=...)` reads.

The split is fixed and stratified:
`sklearn.model_selection.train_test_split(test_size=360, stratify=label,
random_state=0)` gives 1437 train and 360 test images; per class 0..9 the train
split holds 142 146 142 146 145 145 145 143 139 144 and the test split
36 36 35 37 36 37 36 36 35 36 images.

Pixels are 0..16 in scikit-learn and are stored as uint8 ``x * 255 // 16``
(0..255, 16 -> 255) so that every dataset here shares one scale;
normalization happens in the input pipeline.

The image is a `Tensor` feature (see `dpm_jax.data.local_builder`): 64 raw
bytes, smaller than a PNG and several times faster to read (no image decoder).
"""

import numpy as np
import tensorflow_datasets as tfds

from dpm_jax.data import local_builder

NUM_TEST = 360
SPLIT_SEED = 0


def split_indices() -> dict[str, np.ndarray]:
  """Returns the indices into `load_digits()` of the train and test splits.

  Example:
    >>> {k: len(v) for k, v in split_indices().items()}
    {'train': 1437, 'test': 360}
  """
  # Imported here: scikit-learn is needed only to prepare (once), and
  # importing it takes a second or more.
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top

  label = datasets.load_digits().target
  train, test = model_selection.train_test_split(
      np.arange(len(label)),
      test_size=NUM_TEST,
      stratify=label,
      random_state=SPLIT_SEED,
  )
  return {'train': np.sort(train), 'test': np.sort(test)}


class Digits(local_builder.LocalBuilder, skip_registration=True):
  """TFDS builder for the scikit-learn digits; see the module docstring.

  Example:
    >>> import tempfile
    >>> builder = Digits(data_dir=tempfile.mkdtemp())
    >>> builder.download_and_prepare()
    >>> len(builder.as_data_source(split='test'))
    360
  """

  name = 'digits'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'sklearn load_digits, stratified 1437/360 split, seed 0.',
  }

  def _info(self) -> tfds.core.DatasetInfo:
    # `dataset_info_from_configs` would read metadata files next to this
    # module; a plain DatasetInfo needs none.
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'scikit-learn load_digits: 8x8 handwritten digits, pixels'
            ' x * 255 // 16 of the original 0..16.'
        ),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Everything comes from the scikit-learn wheel.
    return {
        split: self._generate_examples(indices)
        for split, indices in split_indices().items()
    }

  def _generate_examples(self, indices: np.ndarray):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    digits = datasets.load_digits()
    images = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)
    for index in indices:
      yield int(index), {
          'image': images[index, :, :, None],
          'label': int(digits.target[index]),
      }
