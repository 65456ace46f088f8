"""Check a downloaded BTCV and write its datalist with the paper's split (``tools/prepare.py btcv``).

python tools/prepare_btcv.py /data/btcv [--output PATH] [--num_val_cases 2] [--seed 0] [--check_files False]
"""

import sys

from prepare import main  # tools/prepare.py: the registry's prepare function for the dataset

if __name__ == "__main__":
    main(["btcv", *sys.argv[1:]], tool="tools/prepare_btcv.py")
