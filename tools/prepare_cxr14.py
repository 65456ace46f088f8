"""Write the NIH ChestX-ray14 datalist (official split, patient-wise validation) for the cxr14_cls bundle.

    python tools/prepare_cxr14.py --dataset_dir /data/cxr14 [--output /data/cxr14/datalist.json]
        [--val_fraction 0.1] [--seed 0] [--check_images False]   # False: existence only, fast on 112k images

See ``selfmedmae_components.data.cxr14.prepare_datalist`` for the expected layout and all options.
"""

import fire

from selfmedmae_components.data.cxr14 import prepare_datalist

if __name__ == "__main__":
    # a DatasetError ends the tool with "error: <message>" (selfmedmae_components.errors, as the bundles do);
    # the summary is printed by prepare_datalist; do not let fire dump the 112k-item dict
    fire.Fire(prepare_datalist, serialize=lambda datalist: None)
