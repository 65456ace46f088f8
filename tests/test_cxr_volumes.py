"""A chest film as 3D Slicer holds it (a 2-D NIfTI or NRRD volume with one slice, e.g. after loading a
PNG) loads as the same image as the PNG itself: the loader of cxr14_cls's inference, which MONAI Label
calls on what Slicer sends."""

from __future__ import annotations

import itk
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from selfmedmae_components.classification import find_images
from selfmedmae_components.transforms.cxr import LoadChestXRay


@pytest.fixture
def film(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 56), dtype=np.uint8)  # rows != columns: a transposition would show
    png = tmp_path / "film.png"
    Image.fromarray(pixels).save(png)
    return png, pixels


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_single_slice_volume_loads_as_the_png(film, tmp_path, suffix):
    png, pixels = film
    out = tmp_path / f"film{suffix}"
    itk.imwrite(itk.imread(str(png)), str(out))  # what Slicer does: ITK reads the PNG, writes the volume
    np.testing.assert_array_equal(LoadChestXRay()(out).numpy(), LoadChestXRay()(png).numpy())
    assert str(out) in find_images(tmp_path)


def test_slicer_style_3d_volume_with_one_slice(film, tmp_path):
    png, pixels = film
    # Slicer saves a loaded PNG as a 3-D volume (columns, rows, 1) with an LPS->RAS affine
    img = nib.Nifti1Image(pixels.T[:, :, None].copy(), np.diag([-0.2, -0.2, 1.0, 1.0]))
    nib.save(img, tmp_path / "slicer.nii.gz")
    loaded = LoadChestXRay()(tmp_path / "slicer.nii.gz")
    np.testing.assert_array_equal(loaded.numpy(), LoadChestXRay()(png).numpy())
    assert loaded.affine[0, 0] == pytest.approx(0.2)


def test_a_volume_of_several_slices_is_refused_by_name(tmp_path):
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.int16), np.eye(4)), path)
    with pytest.raises(ValueError, match=r"ct\.nii\.gz.*not a single 2D slice"):
        LoadChestXRay()(path)
