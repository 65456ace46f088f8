"""Check a downloaded BTCV and write its datalist with the paper's split.

    python tools/prepare_btcv.py /data/btcv [--output PATH] [--num_val_cases 2] [--seed 0] [--check_files False]
"""

import fire

from selfmedmae_components.data.btcv import prepare_datalist

if __name__ == "__main__":
    # a DatasetError ends the tool with "error: <message>" (selfmedmae_components.errors, as the bundles do)
    fire.Fire(prepare_datalist, serialize=lambda _: None)  # the summary line is enough
