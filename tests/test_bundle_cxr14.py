"""cxr14_cls end to end on synthetic ChestX-ray14 data, run as users run it (``python -m monai.bundle``):
MAE pre-training -> fine-tuning -> evaluation -> inference with the demo preset.

The module fixture runs the CPU demo of docs/README.md once (1200 synthetic images, 15 + 40 epochs:
the tiny ViT needs ~1000 fine-tuning steps to leave the class-prior plateau; 25 epochs left it only in
some runs (AUC 0.61-0.73), 40 in all we ran (0.75 and above)). About 2.5 minutes on two quiet cores, one thread per run.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bundle_runner import configs, read_losses, run_bundle
from cxr_helpers import write_dicom
from PIL import Image

from selfmedmae_components.data.cxr14 import CLASSES, prepare_datalist
from selfmedmae_components.data.demo.cxr14 import make_demo
from selfmedmae_components.networks import MaskedAutoencoder, ViTClassifier
from selfmedmae_components.weights import transfer_encoder

BUNDLE = "cxr14_cls"
# the documented CPU demo (docs/README.md)
NUM_IMAGES, IMAGE_SIZE, PRETRAIN_EPOCHS, FINETUNE_EPOCHS = 1200, 128, 15, 40
# chance is 0.5 +- ~0.02 on the 301 evaluation images. Measured: 0.802 with data seed 0 on the 2-core CI machine
# (2026-12-05); 0.75 the lowest of the 40-epoch runs noted above. The margin, 0.10 below today's value, is about the
# spread between runs the 25-epoch runs showed
MIN_MEAN_AUC = 0.7


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("cxr14")
    data = make_demo(root / "data", num_images=NUM_IMAGES, image_size=IMAGE_SIZE, seed=0)
    datalist = prepare_datalist(data, num_workers=2)
    out = root / "run"

    # inference inputs: evaluation PNGs, and one of them as a 16-bit MONOCHROME1 DICOM (stored
    # inverted) beside its 16-bit PNG, plus a 12-bit MONOCHROME1 DICOM without a file extension
    infer_dir = root / "infer"
    infer_dir.mkdir()
    for item in datalist["evaluation"][:6]:
        shutil.copy(data / item["image"], infer_dir)
    gray = np.asarray(Image.open(data / datalist["evaluation"][0]["image"]).convert("L"), dtype=np.uint16)
    Image.fromarray(gray * 257).save(infer_dir / "same_png16.png")  # 0..65535, air dark
    write_dicom(infer_dir / "same_m1.dcm", 65535 - gray * 257, "MONOCHROME1", 16)
    write_dicom(infer_dir / "same_m1_12bit", 4095 - gray * 16, "MONOCHROME1", 12)

    common = dict(dataset_dir=data, bundle_root=out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # other test modules run beside this one on shared cores
        pretrain = run_bundle("pretrain", configs(BUNDLE, "pretrain", "demo"), max_epochs=PRETRAIN_EPOCHS, **common)
        finetune = run_bundle("finetune", configs(BUNDLE, "finetune", "demo"), max_epochs=FINETUNE_EPOCHS, **common)
        evaluate = run_bundle("evaluate", configs(BUNDLE, "evaluate", "demo"), **common)
        inference = run_bundle("inference", configs(BUNDLE, "inference", "demo"), input_dir=infer_dir, bundle_root=out)
    return SimpleNamespace(
        root=root,
        data=data,
        datalist=datalist,
        out=out,
        infer_dir=infer_dir,
        pretrain=pretrain,
        finetune=finetune,
        evaluate=evaluate,
        inference=inference,
    )


def _read_csv(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], {r[0]: np.array([float(v) for v in r[1:]]) for r in rows[1:]}


def _messages(exc: BaseException) -> str:
    """The messages of an exception and of the ones it was raised from."""
    text = []
    while exc is not None:
        text.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(text)


def _run_in_process(name: str, **overrides) -> None:
    """Run ``name`` (+ demo) in this process: the same configs and overrides as the command line,
    without a second start-up of MONAI."""
    from monai.bundle import ConfigWorkflow

    files = [str(Path(configs(BUNDLE, name)).parent / f"{n}.yaml") for n in (name, "demo")]
    workflow = ConfigWorkflow(config_file=files, workflow_type="infer", logging_file=False, **overrides)
    workflow.initialize()
    workflow.run()


def test_mae_loss_falls_and_checkpoints_are_written(pipeline):
    losses = read_losses(pipeline.out / "logs" / "pretrain" / "loss.csv")
    assert len(losses) == PRETRAIN_EPOCHS
    assert losses[-1] < 0.3 * losses[0] and losses[-1] < min(losses[:5]), losses
    assert (pipeline.out / "logs" / "pretrain" / "reconstruction_latest.png").is_file()
    models = pipeline.out / "models"
    assert (
        (models / "mae_pretrain.pt").is_file()
        and (models / "model.pt").is_file()
        and (models / "model_final.pt").is_file()
    )
    # the fine-tuning run reports the MAE encoder it loaded
    assert "Weight transfer from" in pipeline.finetune.stdout and "position embedding" in pipeline.finetune.stdout


def test_finetuned_model_beats_chance_on_the_evaluation_list(pipeline):
    summary = json.loads((pipeline.out / "eval" / "summary.json").read_text())
    assert summary["num_images"] == len(pipeline.datalist["evaluation"])
    assert list(summary["per_class"]) == list(CLASSES) and summary["num_classes_in_mean"] == 14
    assert summary["mean_auc"] > MIN_MEAN_AUC, (pipeline.out / "eval" / "summary.md").read_text()
    assert "mean over" in pipeline.evaluate.stdout  # the table is printed
    header, probs = _read_csv(pipeline.out / "eval" / "probabilities.csv")
    assert header == ["image", *CLASSES]
    assert len(probs) == len(pipeline.datalist["evaluation"])
    assert all(((p >= 0) & (p <= 1)).all() and len(p) == 14 for p in probs.values())


def test_evaluation_reports_absent_classes(pipeline, tmp_path):
    # an evaluation list where Hernia has no positive image: reported as absent, not scored
    datalist = dict(pipeline.datalist)
    hernia = CLASSES.index("Hernia")
    datalist["evaluation"] = [d for d in datalist["evaluation"] if not d["label"][hernia]]
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    _run_in_process(
        "evaluate",
        dataset_dir=str(pipeline.data),
        bundle_root=str(pipeline.out),
        datalist_file=str(tmp_path / "datalist.json"),
        output_dir=str(tmp_path / "eval"),
    )
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["per_class"]["Hernia"] == {"auc": "n/a (absent)", "positives": 0}
    assert "Hernia" in summary["absent_classes"] and summary["num_classes_in_mean"] <= 13
    assert "| Hernia | n/a (absent) | 0 |" in (tmp_path / "eval" / "summary.md").read_text()


def test_inference_csv_and_monochrome1_dicom_matches_png(pipeline):
    csv_file = pipeline.out / "predictions" / "predictions.csv"
    header, probs = _read_csv(csv_file)
    assert header == ["image", *CLASSES]  # class names from the bundle's metadata
    names = sorted(os.listdir(pipeline.infer_dir))
    assert sorted(Path(p).name for p in probs) == names and len(names) == 9
    by_name = {Path(p).name: v for p, v in probs.items()}
    png = by_name["same_png16.png"]
    np.testing.assert_allclose(by_name["same_m1.dcm"], png, atol=1e-5)  # identical pixels in [0, 1]
    np.testing.assert_allclose(by_name["same_m1_12bit"], png, atol=2e-3)  # 12 bit: same after equalisation
    # and the 16-bit PNG is the 8-bit evaluation PNG it was made from
    original = Path(pipeline.datalist["evaluation"][0]["image"]).name
    np.testing.assert_allclose(by_name[original], png, atol=1e-5)


def test_inference_errors_name_the_bad_input(pipeline, tmp_path):
    good = sorted(str(p) for p in pipeline.infer_dir.glob("*.png"))[:1]
    missing = str(tmp_path / "nope.png")
    with pytest.raises(Exception) as exc:  # MONAI wraps it: "Failed to evaluate ConfigExpression ..."
        _run_in_process(
            "inference", bundle_root=str(pipeline.out), input_files=good + [missing], output_dir=str(tmp_path / "out")
        )
    assert "Input image(s) not found" in _messages(exc.value) and missing in _messages(exc.value)

    # an unreadable image is named and skipped, the others are still classified, and the run fails at the end
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    shutil.copy(good[0], bad_dir)
    (bad_dir / "broken.png").write_bytes(b"this is not an image" * 20)
    with pytest.raises(Exception) as exc:
        _run_in_process(
            "inference", bundle_root=str(pipeline.out), input_dir=str(bad_dir), output_dir=str(tmp_path / "out")
        )
    assert "1 of 2 input(s) could not be processed" in _messages(exc.value)
    assert f"{bad_dir / 'broken.png'}: ValueError: cannot read" in _messages(exc.value)
    _, probs = _read_csv(tmp_path / "out" / "predictions.csv")
    assert [Path(p).name for p in probs] == [Path(good[0]).name]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception) as exc:
        _run_in_process("inference", bundle_root=str(pipeline.out), input_dir=str(empty))
    assert f"No chest X-ray images in {empty}" in _messages(exc.value)


def test_mae_to_classifier_transfer_loads_every_encoder_tensor(tmp_path):
    dims = dict(in_channels=3, img_size=32, patch_size=8, hidden_size=48, num_layers=2, num_heads=4)
    mae = MaskedAutoencoder(spatial_dims=2, decoder_hidden_size=32, decoder_num_layers=1, decoder_num_heads=4, **dims)
    with torch.no_grad():
        mae.encoder.pos_embed.add_(0.5)  # differs from the classifier's own sine-cosine initialisation
    torch.save({"model": mae.state_dict()}, tmp_path / "mae.pt")
    net = ViTClassifier(num_classes=14, drop_path_rate=0.1, **dims)
    report = transfer_encoder(net, tmp_path / "mae.pt")

    encoder_keys = sorted(k for k in net.state_dict() if k.startswith("encoder."))
    assert sorted(report.loaded) == encoder_keys and "encoder.pos_embed" in encoder_keys
    assert sorted(report.initialised) == ["head.bias", "head.weight"]
    assert "mask_token" in report.dropped and all(not k.startswith("encoder.") for k in report.dropped)
    mae_state = mae.state_dict()
    for k in encoder_keys:
        assert torch.equal(net.state_dict()[k], mae_state[k]), k
    assert net.encoder.pos_embed.requires_grad  # learnable when fine-tuning, initialised from MAE's table
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 14)
