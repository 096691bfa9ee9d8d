"""`--config tests/distributed/small_hubert.py`: tests/train/common.py's small HuBERT config
(2 layers of width 64, batch 8 of 0.5 s) as a config file for `python -m jaxspeech.main`."""

from tests.train.common import small_config


def get_config(arg=None):
  del arg
  return small_config()
