"""Write synthetic demo datasets in the public datasets' download layouts.

    python tools/make_demo_data.py btcv  demo_data/btcv      # RawData/Training/img/img0001.nii.gz, ...
    python tools/make_demo_data.py brats demo_data/msd       # Task01_BrainTumour/dataset.json, imagesTr/, ...
    python tools/make_demo_data.py cxr14 demo_data/cxr14     # images/*.png, Data_Entry_2017.csv, *_list.txt

The demo then runs the same preparation tools (tools/prepare_*.py) a real user runs on a download.
"""

import fire

from selfmedmae_components.data import btcv, cxr14, msd_brats

if __name__ == "__main__":
    fire.Fire({"btcv": btcv.make_demo, "brats": msd_brats.make_demo, "cxr14": cxr14.make_demo}, serialize=lambda _: None)
