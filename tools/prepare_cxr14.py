"""Write the NIH ChestX-ray14 datalist (official split, patient-wise validation) for the cxr14_cls bundle
(``tools/prepare.py cxr14``).

    python tools/prepare_cxr14.py --dataset_dir /data/cxr14 [--output /data/cxr14/datalist.json]
        [--val_fraction 0.1] [--seed 0] [--check_images False]   # False: existence only, fast on 112k images

See ``selfmedmae_components.data.cxr14.prepare_datalist`` for the expected layout and all options.
"""

import sys

from prepare import main  # tools/prepare.py: the registry's prepare function for the dataset

if __name__ == "__main__":
    main(["cxr14", *sys.argv[1:]], tool="tools/prepare_cxr14.py")
