"""``python -m monai.bundle run <stage> ... --tracking mlflow``: MONAI's experiment tracking switch on the
training configs. MONAI adds its MLFlowHandler to ``train#trainer`` (and ``validate#evaluator``); the run
must log the training loss, the validation key metric (fine-tuning) and the executed config, here into a
local SQLite store under tmp (MLflow 3 refuses file stores).

Needs the ``mlflow`` extra (``pip install -e ".[mlflow]"``: mlflow-skinny with SQLAlchemy and Alembic for
the SQLite store), which the ``test`` extra includes; skipped without it. cxr14_cls runs in the default suite (about 20 s), the 3-D bundles
behind the ``slow`` marker.
"""

from __future__ import annotations

import json

import pytest
from bundle_runner import REPO, configs, run_bundle
from test_bundle_conformance import CASES, configs_of, meta_file, skip_reason

pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install -e '.[mlflow]')")
pytest.importorskip("sqlalchemy", reason="the mlflow extra is not installed (pip install -e '.[mlflow]')")
pytest.importorskip("alembic", reason="the mlflow extra is not installed (pip install -e '.[mlflow]')")

PARAMS = [
    pytest.param(b, s, marks=() if b == "cxr14_cls" else pytest.mark.slow)
    for b in ("btcv_seg", "brats_seg", "cxr14_cls")
    for s in ("pretrain", "finetune")
]


def _key_metric(bundle: str) -> str:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(configs_of(bundle, "finetune", "demo"))
    parser.read_meta(meta_file(bundle))
    return next(iter(parser.get("validate#key_metric")))


@pytest.mark.parametrize("bundle,stage", PARAMS)
def test_tracking_mlflow_logs_losses_metric_and_config(bundle, stage, tmp_path):
    from mlflow import MlflowClient

    if skip_reason(bundle):
        pytest.skip(skip_reason(bundle))
    dataset_dir, _ = CASES[bundle].make_data(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    stray = REPO / "mlruns"
    existed = stray.exists()
    overrides = dict(
        dataset_dir=dataset_dir,
        bundle_root=tmp_path / "run",
        max_epochs=2,
        tracking="mlflow",
        tracking_uri=uri,
        **{k: json.dumps(v) for k, v in CASES[bundle].tiny.items()},
    )
    if stage == "finetune":
        overrides.update(init_mode="scratch", val_interval=1, validation_mode="holdout")
    run_bundle(stage, configs(bundle, stage, "demo"), **overrides)

    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs, f"no MLflow run in {uri}"
    metrics = {k for r in runs for k in r.data.metrics}
    losses = [m.value for r in runs for m in client.get_metric_history(r.info.run_id, "train_loss")]
    assert len(losses) >= 2 and all(v == v for v in losses), losses  # every iteration of the two epochs, finite
    if stage == "finetune":
        assert _key_metric(bundle) in metrics, metrics
    # the executed config (config files + overrides) is stored with the run
    artifacts = [
        (r.info.run_id, a.path) for r in runs for a in client.list_artifacts(r.info.run_id) if a.path.endswith(".json")
    ]
    assert artifacts, "the executed config was not logged"
    local = client.download_artifacts(*artifacts[0], dst_path=str(tmp_path / "artifacts"))
    executed = json.loads(open(local).read())
    assert executed["hidden_size"] == CASES[bundle].tiny["hidden_size"] and "network_def" in executed
    assert stray.exists() == existed, "MLflow wrote ./mlruns into the repository"
