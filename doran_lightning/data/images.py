"""Reading images as a viewer shows them: transforms, decoding (EXIF orientation, 16-bit, transparency), lazy
datasets of labelled and unlabelled files, and the setup-time decode check. The DataModules are in `vision.py`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from doran_lightning.data.common import DataError, data_error, require_dir

Transform = Callable[[Image.Image], torch.Tensor]


def eval_transform(image_size: int, crop_ratio: float = 1.0) -> Transform:
    """Bicubic resize (then centre crop when ``crop_ratio < 1``), tensor, ImageNet normalisation."""
    resize = round(image_size / crop_ratio)
    steps: list = [transforms.Resize((resize, resize), interpolation=transforms.InterpolationMode.BICUBIC)]
    if resize != image_size:
        steps.append(transforms.CenterCrop(image_size))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(steps)


def augment_transform(image_size: int, crop_ratio: float = 0.875) -> Transform:
    """The usual FGVC train augmentation: resize, random crop, horizontal flip."""
    resize = round(image_size / crop_ratio)
    return transforms.Compose(
        [
            transforms.Resize((resize, resize), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


def read_image(path: Path, transform: Transform) -> torch.Tensor:
    """Open `path` as RGB and transform it; an unreadable file fails naming it."""
    try:
        with Image.open(path) as image:
            return transform(to_rgb(image, path))
    except _DECODE_ERRORS as error:  # PIL's UnidentifiedImageError is an OSError
        raise data_error(path, f"cannot be read as an image ({_reason(error)})") from None


class LabelledImages(Dataset):
    """(image path, label) pairs read lazily with PIL; items are ``{"pixel_values", "labels"}``."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Transform):
        self.samples = samples
        self.labels = [label for _, label in samples]
        self.ids = [str(path) for path, _ in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path, label = self.samples[index]
        return {"pixel_values": read_image(path, self.transform), "labels": torch.tensor(label, dtype=torch.long)}


def image_files(folder: Path) -> list[Path]:
    """Every file under `folder`, recursively, following linked folders (as a file browser does) but each real
    folder once, so a link back up the tree does not loop."""
    seen: set[str] = set()
    found: list[Path] = []
    for current, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        found += [Path(current) / name for name in files if (Path(current) / name).is_file()]
    return found


class UnlabelledImages(Dataset):
    """Every image under a folder (recursive, sorted by path) for `predict`; items are ``{"pixel_values"}``."""

    def __init__(self, root: str | os.PathLike, transform: Transform):
        folder = require_dir(root, "predict images", "set --data.predict_root to a folder of images")
        self.paths = sorted(path for path in image_files(folder) if path.suffix.lower() in IMG_EXTENSIONS)
        if not self.paths:
            raise data_error(folder, f"no images found (looked for {', '.join(IMG_EXTENSIONS)}, recursively)")
        self.ids = [str(path) for path in self.paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": read_image(self.paths[index], self.transform)}


EXIF_ORIENTATION = 0x0112

# What PIL raises for a truncated, empty or non-image file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip() or 'no detail'}"


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """The image as 8-bit RGB. 16-bit greyscale is scaled (PIL's convert("RGB") would clip it to white);
    32-bit integer and float images have no known range and are refused; transparent ones are composited over white.
    An EXIF orientation (a phone photo taken sideways) is applied first: the model sees what a viewer shows."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        levels = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.round(levels).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        raise data_error(path, f"image mode {image.mode!r} (32-bit) has no known value range; save it as 8- or 16-bit")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        # convert("RGB") drops alpha and keeps whatever colour the transparent pixels store (often black):
        # the image is composited over white, as a viewer shows it.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_images(samples: list[tuple[Path, int]], bad_images: str, source: str | os.PathLike) -> list[tuple[Path, int]]:
    """Decode every image once (at setup, not mid-epoch); a bad one fails naming it, or is skipped with a counted warning."""
    good, bad = [], []
    for path, label in samples:
        try:
            with Image.open(path) as image:
                image.load()
                to_rgb(image, path)
        except (*_DECODE_ERRORS, DataError) as error:
            if bad_images == "error":
                raise data_error(path, f"cannot be read as an image ({_reason(error)}); fix or remove it, "
                                       "or pass --data.bad_images=skip to leave such files out") from None
            bad.append(f"{path} ({_reason(error)})")
        else:
            good.append((path, label))
    if bad:
        rank_zero_warn(f"{source}: skipped {len(bad)} of {len(samples)} images that cannot be decoded "
                       f"(data.bad_images=skip): " + "; ".join(bad[:5]) + (" …" if len(bad) > 5 else ""))
    if samples and not good:
        raise data_error(source, f"none of its {len(samples)} images can be decoded")
    return good


def dataset_labels(dataset: Dataset) -> Sequence[int]:
    """The label list our vision datasets keep alongside their samples."""
    return dataset.labels  # type: ignore[attr-defined]
