"""Check a downloaded BTCV and write its datalist with the paper's split.

    python tools/prepare_btcv.py /data/btcv [--output PATH] [--num_val_cases 2] [--seed 0] [--check_files False]
"""

import sys

import fire

from selfmedmae_components.data.btcv import prepare_datalist
from selfmedmae_components.data.common import DatasetError

if __name__ == "__main__":
    try:
        fire.Fire(prepare_datalist, serialize=lambda _: None)  # the summary line is enough
    except DatasetError as e:
        sys.exit(f"error: {e}")
