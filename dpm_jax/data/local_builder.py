"""The base of the TFDS builders that prepare their data locally, without TensorFlow.

Datasets that a Python package generates or ships (scikit-learn's digits,
MNIST-1D) are written as array_record shards into the TFDS data directory on
first use, so that they are read like any other dataset, by
`tfds.data_source` and grain, and nothing is downloaded.

TensorFlow is not needed: TFDS serializes examples with its own copy of the
`tf.train.Example` protos; only its numpy -> PNG encoder for `Image` features
calls TensorFlow, so subclasses store arrays as `Tensor` features.
"""

import inspect

from absl import logging
from etils import epath
import tensorflow_datasets as tfds


# Not registered under TFDS's global names: the pipeline uses the classes, and
# TFDS reads a prepared copy from its files alone.
class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A `GeneratorBasedBuilder` writing array_record, whose data is made locally.

  Subclasses define ``name``, ``VERSION``, ``_info``, ``_split_generators``
  and ``_generate_examples`` as for any TFDS builder, and pass
  ``skip_registration=True``.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS derives this through the top-level package, which fails when
    # `dpm_jax` is a namespace package; it is simply the subclass's file.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, **kwargs):
    # Random access (tfds.data_source, grain) needs array_record.
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  # TFDS prints "Downloading and preparing ... Unknown size" to stdout;
  # nothing is downloaded here, so log instead.
  def _log_download_bytes(self) -> None:
    logging.info('Preparing %s in %s.', self.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info('Prepared %s in %s.', self.name, self.data_dir)
