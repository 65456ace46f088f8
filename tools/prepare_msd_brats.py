"""Check a downloaded MSD Task01_BrainTumour and write its datalist with a saved seeded split
(``tools/prepare.py brats``).

    python tools/prepare_msd_brats.py /data/Task01_BrainTumour [--output PATH] [--eval_fraction 0.2]
        [--num_val_cases N] [--seed 12345] [--check_files False]
"""

import sys

from prepare import main  # tools/prepare.py: the registry's prepare function for the dataset

if __name__ == "__main__":
    main(["brats", *sys.argv[1:]], tool="tools/prepare_msd_brats.py")
