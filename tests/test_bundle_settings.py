"""Every bundle's inference builds the network of the run record beside its weights (trained_settings.py).

The run folder of tests/test_export_run.py: random weights of each bundle's tiny network and the record the
fine-tuning config writes for demo.yaml + the tiny overrides (CASES). Inference with demo.yaml alone, without
those overrides, loads the weights strictly (it would stop at the first misfit tensor otherwise) and says which
settings the record gave. btcv_seg's trained pipeline checks evaluate and inference against the overrides repeated,
the contradicting override and weights without a record (tests/test_bundle_btcv.py)."""

from __future__ import annotations

from bundle_runner import configs, run_bundle
from test_bundle_conformance import CASES, bundle, data, tiny_network  # noqa: F401 (fixtures)
from test_export_run import run  # noqa: F401 (fixture: the run folder)


def test_inference_follows_the_run_record(bundle, data, run, tmp_path):  # noqa: F811 (fixtures)
    _, inputs = data
    proc = run_bundle(
        "inference",
        configs(bundle, "inference", "demo"),
        bundle_root=run,
        input_dir=inputs,
        output_dir=tmp_path / "out",
        num_workers=0,
    )
    note = next(line for line in proc.stdout.splitlines() if line.startswith("Settings of the run that trained"))
    assert f"({run / 'models' / 'finetune_run.json'}): " in note
    for key, value in CASES[bundle].tiny.items():
        if key != "num_workers":  # not a setting of the weights
            shown = str(value).replace(" ", "")
            assert f"{key} {shown} (config: " in note, note
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written and ("predictions.csv" in written or all(n.endswith("_seg.nii.gz") for n in written)), written
