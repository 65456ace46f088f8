"""Check a downloaded MSD Task01_BrainTumour and write its datalist with a saved seeded split.

    python tools/prepare_msd_brats.py /data/Task01_BrainTumour [--output PATH] [--eval_fraction 0.2]
        [--num_val_cases N] [--seed 12345] [--check_files False]
"""

import fire

from selfmedmae_components.data.msd_brats import prepare_datalist

if __name__ == "__main__":
    # a DatasetError ends the tool with "error: <message>" (selfmedmae_components.errors, as the bundles do)
    fire.Fire(prepare_datalist, serialize=lambda _: None)  # the summary line is enough
