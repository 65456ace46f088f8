"""Check a downloaded dataset and write its datalist (``<folder>/datalist.json``), for any dataset of the registry.

    python tools/prepare.py btcv  /data/btcv [--output PATH] [--num_val_cases 2] [--seed 0] [--check_files False]
    python tools/prepare.py brats /data/Task01_BrainTumour [--eval_fraction 0.2] [--num_val_cases N] [--seed 12345]
    python tools/prepare.py cxr14 /data/cxr14 [--val_fraction 0.1] [--seed 0] [--check_images False]
    python tools/prepare.py scans /data/export --out /data/scans [--labels /data/labels] [--modality CT] [--workers 8]
    python tools/prepare.py scans http://pacs:8042/dicom-web --out /data/scans --query Modality=CT
    python tools/prepare.py btcv --help                  # every option of one dataset

``scans`` prepares a hospital's own archive (any tree of DICOM, NIfTI, NRRD, MHA files, or a PACS over DICOMweb) into
``--out`` for the msd_seg bundle, with a manifest of every series and file (data/scans.py).
The dataset is named by its registry name or its bundle folder (``brats`` or ``brats_seg``);
selfmedmae_components/registry.py says which function prepares it. This is the only prepare command.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from selfmedmae_components import errors, registry  # noqa: E402


def usage() -> str:
    lines = ["usage: python tools/prepare.py DATASET FOLDER [options]   (DATASET --help: all its options)", ""]
    for d in registry.DATASETS:
        also = f"; also {', '.join(d.names[1:])}" if d.names[1:] else ""
        lines.append(f"  {d.name:<6} {d.title}{also}")
        lines.append(f"         python tools/prepare.py {d.name} {d.prepare_usage}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``DATASET [FOLDER] [options]`` to the dataset's prepare function (fire reads the options)."""
    errors.install()  # a user error ends the tool with "error: <message>", not a traceback (errors.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    entry = registry.get(argv[0])  # an unknown name ends with "error: unknown dataset ..." (errors.py)
    # a DatasetError ends the tool with "error: <message>" (selfmedmae_components.errors, as the bundles do);
    # the function prints its own summary: fire must not print the datalist (112k items for cxr14)
    fire.Fire(
        entry.prepare_function(), command=argv[1:], name=f"tools/prepare.py {entry.name}", serialize=lambda _: None
    )


if __name__ == "__main__":
    main()
