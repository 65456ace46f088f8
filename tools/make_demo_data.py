"""Write synthetic demo datasets in the public datasets' download layouts.

    python tools/make_demo_data.py btcv  demo_data/btcv      # RawData/Training/img/img0001.nii.gz, ...
    python tools/make_demo_data.py brats demo_data/msd       # Task01_BrainTumour/dataset.json, imagesTr/, ...
    python tools/make_demo_data.py cxr14 demo_data/cxr14     # images/*.png, Data_Entry_2017.csv, *_list.txt
    python tools/make_demo_data.py brats --help              # the generator's options

Any dataset of selfmedmae_components/registry.py, by its name or bundle folder (brats or brats_seg); the
generators live in selfmedmae_components/data/demo/. The demo then runs the same preparation tool
(tools/prepare.py) a real user runs on a download.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from selfmedmae_components import errors, registry  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    errors.install()  # a user error ends the tool with "error: <message>", not a traceback (errors.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python tools/make_demo_data.py DATASET FOLDER [options]   (DATASET --help: all its options)\n")
        for d in registry.DATASETS:
            print(f"  {d.name:<6} {d.title}; also {', '.join(d.names[1:])}")
        return
    entry = registry.get(argv[0])
    fire.Fire(
        entry.demo_module().make_demo,
        command=argv[1:],
        name=f"tools/make_demo_data.py {entry.name}",
        serialize=lambda _: None,
    )


if __name__ == "__main__":
    main()
