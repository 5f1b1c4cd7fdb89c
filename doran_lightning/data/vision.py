"""Image classification DataModules: VTAB-1K, FGVC, a user's ImageFolder, and built-in digits.

Every batch is ``{"pixel_values": float [B, 3, H, W], "labels": long [B]}``, normalised with
the ImageNet mean/std that timm's pretrained ViTs expect.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from doran_lightning.console import say
from doran_lightning.domains import check_number

from doran_lightning.data.common import (
    BaseDataModule,
    DataError,
    check_label,
    data_error,
    path_inside,
    read_json,
    require_dir,
    require_file,
)
from doran_lightning.data.images import (  # noqa: F401  (re-exported: their public path was this module)
    EXIF_ORIENTATION,
    LabelledImages,
    Transform,
    UnlabelledImages,
    augment_transform,
    check_images,
    dataset_labels,
    eval_transform,
    image_files,
    read_image,
    to_rgb,
)
from doran_lightning.data.label_text import case_note, clean_name, merged_note
from doran_lightning.data.suites import VTAB_NUM_CLASSES

# FGVC datasets: class count and the image folder (relative to the dataset root) the JSON keys are relative to.
FGVC_DATASETS: dict[str, tuple[int, str]] = {
    "cub": (200, "images"),
    "nabirds": (555, "images"),
    "oxford_flowers": (102, ""),
    "stanford_dogs": (120, "Images"),
    "stanford_cars": (196, ""),
}


class _ImageDataModule(BaseDataModule):
    """Attributes shared by all image classification DataModules."""

    def __init__(self, num_classes: int, image_size: int, predict_root: str | None = None,
                 bad_images: Literal["error", "skip"] = "error", **loader_args):
        """``predict_root``: a folder of images for `predict` (recursive; default: the test split).
        ``bad_images``: an image that cannot be decoded fails setup naming it ("error"), or is left out
        with a counted warning ("skip"). ``loader_args``: batch_size, eval_batch_size, num_workers,
        pin_memory, persistent_workers, fraction, seed (see BaseDataModule)."""
        if bad_images not in ("error", "skip"):
            raise ValueError(f"data.bad_images must be 'error' or 'skip', got {bad_images!r}")
        self.bad_images = bad_images
        super().__init__(**loader_args)
        self.task = "image_classification"
        self.metric = "accuracy"
        self.num_classes = num_classes
        self.image_size = check_number("data.image_size", image_size, at_least=1, integer=True)
        self.predict_root = predict_root

    def predict_transform(self) -> Transform:
        """The transform of the test split, applied to `predict_root`'s images."""
        return eval_transform(self.image_size)

    def load_predict(self) -> UnlabelledImages | None:
        return None if self.predict_root is None else UnlabelledImages(self.predict_root, self.predict_transform())

    def train_strata(self, dataset: Dataset) -> Sequence[int]:
        return dataset_labels(dataset)

    def content_keys(self, split: str) -> set[Any] | None:
        """A digest of each image file's bytes and its label (a copy or link of a split has the same keys)."""
        if split not in self.datasets:
            self.datasets[split] = self._prepared_split(split)
        samples = getattr(self.datasets[split], "samples", None)
        if samples is None:
            return None
        return {(hashlib.sha1(Path(path).read_bytes()).hexdigest(), label) for path, label in samples}

    def labelled_images(self, samples: list[tuple[Path, int]], transform: Transform,
                        source: str | os.PathLike) -> LabelledImages:
        """The split's dataset, every image decoded once now (`check_images`, per `bad_images`)."""
        return LabelledImages(check_images(samples, self.bad_images, source), transform)


def read_split_file(split_file: Path, image_root: Path, num_classes: int) -> list[tuple[Path, int]]:
    """Parse a ``relative/path label`` list, checking every path stays in ``image_root``, every image
    exists and every label is in range."""
    samples: list[tuple[Path, int]] = []
    with split_file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise data_error(split_file, f"expected '<relative/image/path> <integer label>', got {line.strip()!r}", number)
            image = path_inside(image_root, parts[0], split_file, number)
            if not image.is_file():
                raise data_error(split_file, f"image {image} does not exist", number)
            samples.append((image, check_label(int(parts[1]), num_classes, split_file, number)))
    return samples


class VTAB1kDataModule(_ImageDataModule):
    """VTAB-1K in the community's prepared layout.

    ``root/<task>/`` holds the images and four split files, ``train800.txt``, ``val200.txt``,
    ``train800val200.txt`` and ``test.txt``, one ``relative/path label`` per line (paths relative
    to the task folder). ``split_mode="val"`` trains on train800 and validates on val200 (tuning);
    ``"test"`` trains on train800val200 and validates on test, the reported protocol.
    The test stage always uses ``test.txt``. No augmentation: bicubic resize and ImageNet
    normalisation only, as the protocol prescribes.
    """

    SPLIT_FILES = {
        "val": {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"},
        "test": {"train": "train800val200.txt", "val": "test.txt", "test": "test.txt"},
    }

    def __init__(
        self,
        root: str,
        task: str,
        split_mode: str = "val",
        image_size: int = 224,
        **loader_args,
    ):
        if task not in VTAB_NUM_CLASSES:
            raise ValueError(f"unknown VTAB-1K task {task!r}; expected one of: {', '.join(VTAB_NUM_CLASSES)}")
        if split_mode not in self.SPLIT_FILES:
            raise ValueError(f"split_mode must be 'val' (train800/val200) or 'test' (train800val200/test), got {split_mode!r}")
        super().__init__(VTAB_NUM_CLASSES[task], image_size, **loader_args)
        self.root, self.vtab_task, self.split_mode = Path(root), task, split_mode

    @property
    def validation_is_test(self) -> bool:
        return self.split_mode == "test"

    def _split_file(self, split: str) -> Path:
        return self.root / self.vtab_task / self.SPLIT_FILES[self.split_mode][split]

    def describe_split(self, split: str) -> str:
        return str(self._split_file(split))

    def load_split(self, split: str) -> LabelledImages:
        task_dir = require_dir(self.root / self.vtab_task, f"VTAB-1K task {self.vtab_task!r}", "set --data.root to the folder holding the 19 task folders")
        split_file = require_file(self._split_file(split), f"VTAB-1K {split}", f"expected in {task_dir}")
        samples = read_split_file(split_file, task_dir, self.num_classes)
        return self.labelled_images(samples, eval_transform(self.image_size), split_file)


class FGVCDataModule(_ImageDataModule):
    """Fine-grained visual classification in the VPT split-JSON layout.

    ``root`` is one dataset's folder holding ``train.json``, ``val.json`` and ``test.json``; each
    maps an image path to its integer class id, e.g. ``{"001.Black_footed_Albatross/x.jpg": 0}``.
    Paths are relative to ``root/<image_dir>``: ``images`` for CUB-200-2011 and NABirds,
    ``Images`` for Stanford Dogs, the root itself for Oxford Flowers and Stanford Cars
    (override with ``image_dir``). Class ids may be any integers: the sorted ids of
    ``train.json`` are mapped to 0..C-1. Training uses resize / random crop / flip.
    """

    SPLIT_FILES = {"train": "train.json", "val": "val.json", "test": "test.json"}

    def __init__(
        self,
        root: str,
        dataset: str = "cub",
        image_dir: str | None = None,
        image_size: int = 224,
        **loader_args,
    ):
        if dataset not in FGVC_DATASETS:
            raise ValueError(f"unknown FGVC dataset {dataset!r}; expected one of: {', '.join(FGVC_DATASETS)}")
        num_classes, default_image_dir = FGVC_DATASETS[dataset]
        super().__init__(num_classes, image_size, **loader_args)
        self.root, self.dataset_name = Path(root), dataset
        self.image_dir = default_image_dir if image_dir is None else image_dir
        self._class_index: dict[int, int] | None = None

    def describe_split(self, split: str) -> str:
        return str(self.root / self.SPLIT_FILES[split])

    def predict_transform(self) -> Transform:
        return eval_transform(self.image_size, 0.875)

    def _read_json(self, split: str) -> tuple[Path, dict[str, int]]:
        require_dir(self.root, f"FGVC {self.dataset_name}", "set --data.root to the folder holding train.json/val.json/test.json")
        path = require_file(self.root / self.SPLIT_FILES[split], f"FGVC {split} split", f"expected in {self.root}")
        annotations = read_json(path, dict, "a JSON object mapping image path -> integer class id")
        for key, value in annotations.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise data_error(path, f"entry {key!r}: class id must be an integer, got {value!r}")
        return path, annotations

    def _classes(self) -> dict[int, int]:
        """Map the class ids of train.json onto 0..C-1 (the convention VPT uses)."""
        if self._class_index is None:
            path, annotations = self._read_json("train")
            ids = sorted(set(annotations.values()))
            if len(ids) > self.num_classes:
                raise data_error(path, f"{len(ids)} distinct class ids, but {self.dataset_name} has {self.num_classes} classes")
            self._class_index = {class_id: index for index, class_id in enumerate(ids)}
        return self._class_index

    def load_split(self, split: str) -> LabelledImages:
        path, annotations = self._read_json(split)
        classes = self._classes()
        image_root = self.root / self.image_dir
        samples = []
        for key, class_id in annotations.items():
            if class_id not in classes:
                raise data_error(path, f"entry {key!r}: class id {class_id} does not occur in train.json")
            image = path_inside(image_root, key, path)
            if not image.is_file():
                raise data_error(path, f"entry {key!r}: image {image} does not exist")
            samples.append((image, classes[class_id]))
        transform = augment_transform(self.image_size) if split == "train" else self.predict_transform()
        return self.labelled_images(samples, transform, path)


class ImageFolderDataModule(_ImageDataModule):
    """A user's own images: ``root/train/<class>/…``, ``root/val/<class>/…`` and optionally ``root/test/…``.

    Classes are the sub-folders of ``root/train`` (sorted); val/test may hold a subset of them.
    Without ``root/test`` the test stage uses ``val``. ``augment`` adds crop/flip to training.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        augment: bool = True,
        **loader_args,
    ):
        self.root = Path(root)
        train_dir = require_dir(self.root / "train", "ImageFolder train", "expected root/train/<class>/<images>")
        folders = [entry.name for entry in os.scandir(train_dir) if entry.is_dir()]
        # Folder names as they look (label_text): NFC and NFD "café" are one class, "Tea" and "tea" two, with a note.
        self.classes = sorted({clean_name(name) for name in folders})
        for note in (merged_note(folders, str(train_dir), "class folders"),
                     case_note(self.classes, str(train_dir), "class folders")):
            if note:
                say(note)
        if not self.classes:
            raise DataError(f"{train_dir}: no class sub-folders found (expected train/<class>/<images>)")
        super().__init__(len(self.classes), image_size, **loader_args)
        self.label_names = list(self.classes)
        self.augment = augment

    def listed_folders(self) -> list[Path]:
        """Every entry of a split folder is a class: a run folder written there would become one."""
        return [*super().listed_folders(), *(self.root / split for split in ("train", "val", "test"))]

    def _split_dir(self, split: str) -> Path:
        if split == "test" and not (self.root / "test").is_dir():
            return self.root / "val"
        return self.root / split

    def describe_split(self, split: str) -> str:
        return str(self._split_dir(split))

    def load_split(self, split: str) -> LabelledImages:
        folder = require_dir(self._split_dir(split), f"ImageFolder {split}", f"expected {self.root}/{split}/<class>/<images>")
        extra = sorted({clean_name(entry.name) for entry in os.scandir(folder) if entry.is_dir()} - set(self.classes))
        if extra:
            raise data_error(folder, f"class folders {extra} do not exist in {self.root / 'train'}")
        index = {name: i for i, name in enumerate(self.classes)}
        try:
            scanned = ImageFolder(str(folder), allow_empty=True)
        except FileNotFoundError as error:
            raise data_error(folder, str(error)) from error
        if split == "train":
            # A train class without images still gets an output of the head, which then never learns it.
            counts = {name: 0 for name in self.classes}
            for _, label in scanned.samples:
                counts[clean_name(scanned.classes[label])] += 1
            empty = [name for name, count in counts.items() if count == 0]
            if empty and len(empty) < len(self.classes):
                raise data_error(folder, f"class folder(s) {empty} hold no image; add images or remove the folder(s)")
        samples = [(Path(path), index[clean_name(scanned.classes[label])]) for path, label in scanned.samples]
        transform = augment_transform(self.image_size) if split == "train" and self.augment else eval_transform(self.image_size)
        return self.labelled_images(samples, transform, folder)


class DigitImages(Dataset):
    """Small grey digits (sklearn's 8x8 with values 0..``max_value`` = 16, or MNIST's 28x28 with 0..255)
    upscaled on the fly to ``image_size`` RGB, ImageNet-normalised."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int, max_value: float = 16.0):
        self.images = images
        self.max_value = max_value
        self.labels = labels.tolist()
        self.label_tensor = labels
        self.image_size = image_size
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        grey = (self.images[index] / self.max_value).view(1, 1, *self.images.shape[-2:])
        # Upscale per item: the whole set at 224x224 would take about 1 GB.
        big = F.interpolate(grey, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        pixels = (big[0].expand(3, -1, -1) - self.mean) / self.std
        return {"pixel_values": pixels, "labels": self.label_tensor[index]}


class DigitsDataModule(_ImageDataModule):
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, 10 classes, fully offline.

    A fixed stratified split, independent of ``seed``: ``split_fractions`` of the images for train / val /
    test, default 60/20/20 (digits 5-9: 537 / 179 / 180 images). ``[0.2, 0.2, 0.6]`` gives the largest
    test split that keeps the validation split's size: digits 5-9 then test on 538 images (one worth
    100/538 = 0.19 accuracy points instead of 0.56) and train on 179. ``fraction`` and ``seed`` subsample the train
    split only. ``classes`` keeps only those digits, relabelled 0..k-1 in the given order (e.g. pre-train
    on 0-4, fine-tune on the disjoint 5-9).
    """

    SPLIT_SEED = 0
    DEFAULT_SPLIT = (0.6, 0.2, 0.2)

    def __init__(
        self,
        image_size: int = 224,
        classes: list[int] | None = None,
        split_fractions: tuple[float, float, float] = DEFAULT_SPLIT,
        **loader_args,
    ):
        if classes is not None and (not classes or len(set(classes)) != len(classes)
                                    or not all(isinstance(c, int) and 0 <= c <= 9 for c in classes)):
            raise ValueError(f"data.classes must be distinct digits 0..9, got {classes}")
        fractions = tuple(split_fractions)
        if len(fractions) != 3 or not all(0 < f < 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
            raise ValueError(f"data.split_fractions must be three numbers in (0, 1) for train, val and test "
                             f"that sum to 1, got {list(split_fractions)}")
        self.split_fractions = fractions
        self.classes = list(classes) if classes is not None else list(range(10))
        super().__init__(len(self.classes), image_size, **loader_args)
        self.label_names = [str(digit) for digit in self.classes]
        self._split_indices: dict[str, list[int]] | None = None

    def describe_split(self, split: str) -> str:
        return f"sklearn digits ({split})"

    def digit_images(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Every image of the source ``[N, H, W]``, its digit ``[N]``, and the largest pixel value."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target, 16.0

    def load_split(self, split: str) -> DigitImages:
        from sklearn.model_selection import train_test_split

        pixels, target, max_value = self.digit_images()
        if self._split_indices is None:
            indices = list(range(len(target)))
            _, val_share, test_share = self.split_fractions
            held = val_share + test_share  # the default: 0.4, then 0.5 of it, as before split_fractions existed
            train, rest = train_test_split(indices, test_size=held, stratify=target, random_state=self.SPLIT_SEED)
            val, test = train_test_split(rest, test_size=test_share / held, stratify=target[rest],
                                         random_state=self.SPLIT_SEED)
            self._split_indices = {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
        relabel = {digit: index for index, digit in enumerate(self.classes)}
        chosen = [i for i in self._split_indices[split] if int(target[i]) in relabel]
        images = torch.as_tensor(pixels[chosen], dtype=torch.float32)
        labels = torch.as_tensor([relabel[int(target[i])] for i in chosen], dtype=torch.long)
        return DigitImages(images, labels, self.image_size, max_value)
