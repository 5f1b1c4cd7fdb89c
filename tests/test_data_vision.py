"""Vision DataModules against tiny fixtures written in the real on-disk formats."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import fit_then_test

from doran_lightning.data.common import DataError, stratified_subset
from doran_lightning.data.vision import (
    VTAB_NUM_CLASSES,
    DigitsDataModule,
    FGVCDataModule,
    ImageFolderDataModule,
    VTAB1kDataModule,
)

SIZE = 16


def write_image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 12), (shade, 255 - shade, 7)).save(path)


def write_vtab_task(root: Path, task: str = "eurosat", n_classes: int = 3, per_class: int = 4) -> Path:
    """A VTAB-1K task folder: images/<split>/… plus the four split files (counts shrunk)."""
    task_dir = root / task
    lines: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    for split, count in (("train800", per_class), ("val200", 2), ("test", 2)):
        for label in range(n_classes):
            for i in range(count):
                relative = f"images/{split}/{label}_{i}.jpg"
                write_image(task_dir / relative, 40 * label + i)
                lines[split].append(f"{relative} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for name, rows in lines.items():
        (task_dir / f"{name}.txt").write_text("\n".join(rows) + "\n")
    return task_dir


def write_fgvc(root: Path, class_ids=(1, 5, 9), per_class: int = 3) -> Path:
    """A VPT-style FGVC folder (CUB layout): images/<class>/<file> and {train,val,test}.json."""
    for split, count in (("train", per_class), ("val", 1), ("test", 2)):
        annotations = {}
        for class_id in class_ids:
            for i in range(count):
                key = f"{class_id:03d}.Bird/{split}_{i}.jpg"
                write_image(root / "images" / key, 20 * class_id + i)
                annotations[key] = class_id
        (root / f"{split}.json").write_text(json.dumps(annotations))
    return root


def vtab(root: Path, **kwargs) -> VTAB1kDataModule:
    return VTAB1kDataModule(root=str(root), task="eurosat", image_size=SIZE, batch_size=4, **kwargs)


def test_vtab_val_mode_sizes_labels_and_batch(tmp_path):
    write_vtab_task(tmp_path)
    dm = vtab(tmp_path)
    assert dm.num_classes == 10 and dm.task == "image_classification" and dm.metric == "accuracy"
    assert dm.tokenizer is None
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 12 and len(dm.datasets["val"]) == 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    assert sorted(dm.datasets["val"].labels) == [0, 0, 1, 1, 2, 2]


def test_vtab_test_mode_uses_train800val200_and_test(tmp_path):
    write_vtab_task(tmp_path)
    dm = vtab(tmp_path, split_mode="test")
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.datasets["train"]) == 18
    assert len(dm.datasets["val"]) == len(dm.datasets["test"]) == 6


def test_vtab_knows_all_19_tasks():
    assert len(VTAB_NUM_CLASSES) == 19
    assert VTAB_NUM_CLASSES["sun397"] == 397 and VTAB_NUM_CLASSES["patch_camelyon"] == 2
    with pytest.raises(ValueError, match="unknown VTAB-1K task 'cifar10'.*cifar"):
        VTAB1kDataModule(root=".", task="cifar10")


def test_vtab_fraction_is_stratified_and_deterministic(tmp_path):
    write_vtab_task(tmp_path, per_class=8)
    subsets = []
    for seed in (0, 0, 1):
        dm = vtab(tmp_path, fraction=0.25, seed=seed)
        dm.setup("fit")
        subsets.append(list(dm.datasets["train"].indices))
    assert subsets[0] == subsets[1] != subsets[2]
    labels = [dm.datasets["train"].dataset.labels[i] for i in subsets[0]]
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_shuffle_order_depends_only_on_seed(tmp_path):
    write_vtab_task(tmp_path, per_class=6)

    def first_epoch_labels(seed: int) -> list[int]:
        dm = vtab(tmp_path, seed=seed)
        return torch.cat([b["labels"] for b in dm.train_dataloader()]).tolist()

    assert first_epoch_labels(3) == first_epoch_labels(3)
    assert first_epoch_labels(3) != first_epoch_labels(4)


def test_vtab_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="eurosat.*--data.root"):
        vtab(tmp_path).setup("fit")


def test_vtab_split_file_names_missing_image(tmp_path):
    task_dir = write_vtab_task(tmp_path)
    (task_dir / "images/train800/1_2.jpg").unlink()
    with pytest.raises(DataError, match=r"train800\.txt:7: image .*1_2\.jpg does not exist"):
        vtab(tmp_path).setup("fit")


def test_vtab_label_out_of_range_names_file_and_line(tmp_path):
    task_dir = write_vtab_task(tmp_path)
    rows = (task_dir / "val200.txt").read_text().splitlines()
    rows[2] = rows[2].rsplit(" ", 1)[0] + " 10"
    (task_dir / "val200.txt").write_text("\n".join(rows))
    with pytest.raises(DataError, match=r"val200\.txt:3: label 10 is outside the class range 0\.\.9"):
        vtab(tmp_path).setup("fit")


def test_vtab_malformed_line_and_empty_split(tmp_path):
    task_dir = write_vtab_task(tmp_path)
    (task_dir / "val200.txt").write_text("images/val200/0_0.jpg\n")
    with pytest.raises(DataError, match=r"val200\.txt:1: expected"):
        vtab(tmp_path).setup("validate")
    (task_dir / "val200.txt").write_text("\n")
    with pytest.raises(DataError, match=r"val200\.txt: the val split is empty"):
        vtab(tmp_path).setup("validate")


def test_fgvc_maps_class_ids_and_augments_train(tmp_path):
    write_fgvc(tmp_path)
    dm = FGVCDataModule(root=str(tmp_path), dataset="cub", image_size=SIZE, batch_size=3)
    assert dm.num_classes == 200
    dm.setup("fit")
    dm.setup("test")
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [9, 3, 6]
    assert sorted(set(dm.datasets["train"].labels)) == [0, 1, 2]
    assert sorted(dm.datasets["test"].labels) == [0, 0, 1, 1, 2, 2]
    assert any("RandomCrop" in repr(t) for t in dm.datasets["train"].transform.transforms)
    assert not any("Random" in repr(t) for t in dm.datasets["val"].transform.transforms)
    assert next(iter(dm.val_dataloader()))["pixel_values"].shape == (3, 3, SIZE, SIZE)


def test_fgvc_errors_name_file_and_entry(tmp_path):
    write_fgvc(tmp_path)
    test_json = json.loads((tmp_path / "test.json").read_text())
    test_json["001.Bird/ghost.jpg"] = 1
    (tmp_path / "test.json").write_text(json.dumps(test_json))
    dm = FGVCDataModule(root=str(tmp_path), image_size=SIZE)
    with pytest.raises(DataError, match=r"test\.json: entry '001\.Bird/ghost\.jpg': image .* does not exist"):
        dm.setup("test")
    (tmp_path / "val.json").write_text(json.dumps({"001.Bird/val_0.jpg": 42}))
    with pytest.raises(DataError, match=r"val\.json: entry .*class id 42 does not occur in train\.json"):
        dm.setup("validate")
    with pytest.raises(FileNotFoundError, match="FGVC cub folder not found: .*nothing"):
        FGVCDataModule(root=str(tmp_path / "nothing")).setup("fit")
    (tmp_path / "train.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"FGVC train split file not found: .*train\.json"):
        FGVCDataModule(root=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="unknown FGVC dataset"):
        FGVCDataModule(root=str(tmp_path), dataset="cub200")


def test_image_folder_classes_and_errors(tmp_path):
    for split, count in (("train", 3), ("val", 1)):
        for name in ("cat", "dog"):
            for i in range(count):
                write_image(tmp_path / split / name / f"{i}.png", 100 * (name == "dog") + i)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=SIZE, batch_size=2)
    assert dm.num_classes == 2 and dm.classes == ["cat", "dog"]
    dm.setup("fit")
    dm.setup("test")  # no test folder: falls back to val
    assert len(dm.datasets["train"]) == 6 and dm.datasets["test"].labels == [0, 1]
    write_image(tmp_path / "val" / "fox" / "0.png", 3)
    with pytest.raises(DataError, match=r"class folders \['fox'\] do not exist"):
        ImageFolderDataModule(root=str(tmp_path)).setup("validate")
    with pytest.raises(FileNotFoundError, match="ImageFolder train folder not found"):
        ImageFolderDataModule(root=str(tmp_path / "missing"))


def test_digits_default_split_is_the_one_shipped_before_split_fractions_and_the_large_test_split_is_disjoint(caplog):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    caplog.set_level(logging.INFO, logger="doran_lightning")
    target = load_digits().target
    # The split as written before `split_fractions` existed: shipped configs must keep these exact images.
    train, rest = train_test_split(list(range(len(target))), test_size=0.4, stratify=target, random_state=0)
    val, test = train_test_split(rest, test_size=0.5, stratify=target[rest], random_state=0)
    default = DigitsDataModule(image_size=SIZE, classes=[5, 6, 7, 8, 9])
    default.setup("fit")
    assert default._split_indices == {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
    first_kept = next(i for i in sorted(train) if target[i] >= 5)  # digits 0-4 are left out of this module
    first = torch.as_tensor(load_digits().images[first_kept], dtype=torch.float32)
    grey = torch.nn.functional.interpolate((first / 16.0).view(1, 1, 8, 8), size=(SIZE, SIZE), mode="bilinear",
                                           align_corners=False)  # the pixels as computed before MNIST shared the class
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert torch.equal(default.datasets["train"][0]["pixel_values"], (grey[0].expand(3, -1, -1) - mean) / std)
    large = DigitsDataModule(image_size=SIZE, classes=[5, 6, 7, 8, 9], split_fractions=[0.2, 0.2, 0.6])
    large.setup("fit")
    large.setup("test")
    assert [len(large.datasets[split]) for split in ("train", "val", "test")] == [179, 179, 538]
    parts = [set(large._split_indices[split]) for split in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set.union(*parts) == set(range(len(target)))
    assert set(large.datasets["test"].labels) == set(range(5))
    assert "test split: 538 examples (sklearn digits (test)); one test example is worth 100/538 = 0.186 accuracy points" \
        in caplog.text
    for bad in ([0.5, 0.5], [0.6, 0.3, 0.3], [0.0, 0.4, 0.6]):
        with pytest.raises(ValueError, match="split_fractions must be three numbers"):
            DigitsDataModule(split_fractions=bad)


def test_digits_fixed_split_and_fraction():
    dm = DigitsDataModule(image_size=SIZE, batch_size=8, fraction=0.1, seed=1)
    assert dm.num_classes == 10
    dm.setup("fit")
    dm.setup("test")
    full = DigitsDataModule(image_size=SIZE)
    full.setup("fit")
    sizes = [len(full.datasets["train"]), len(full.datasets["val"]), len(dm.datasets["test"])]
    assert sum(sizes) == 1797 and sizes[0] == 1078
    assert set(full.datasets["val"].labels) == set(range(10))
    subset = dm.datasets["train"]
    assert len(subset) == pytest.approx(108, abs=5)
    assert {subset.dataset.labels[i] for i in subset.indices} == set(range(10))
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, SIZE, SIZE)
    # Upscaled real digits: pixels vary (not a constant image) and are ImageNet-normalised.
    assert batch["pixel_values"].std() > 0.3 and batch["pixel_values"].min() < -1.5


def test_stratified_subset_keeps_every_class_and_rejects_bad_fraction():
    strata = [0] * 50 + [1] * 5 + [2]
    chosen = stratified_subset(strata, 0.1, seed=0)
    assert [strata[i] for i in chosen].count(0) == 5 and {strata[i] for i in chosen} == {0, 1, 2}
    assert stratified_subset(strata, 1.0, seed=5) == list(range(56))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction must be in"):
            stratified_subset(strata, bad, seed=0)


def test_fgvc_invalid_json_names_file_and_line(tmp_path):
    write_fgvc(tmp_path)
    (tmp_path / "val.json").write_text('{\n  "a.jpg": 1,\n}')
    with pytest.raises(DataError, match=r"val\.json:3: invalid JSON"):
        FGVCDataModule(root=str(tmp_path), image_size=SIZE).setup("validate")


def test_end_to_end_fit_on_digits(tmp_path):
    """A Lightning fit on the built-in digits, consuming the batch contract, learns the task."""
    import lightning as L

    class PixelClassifier(L.LightningModule):
        def __init__(self, num_classes: int):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 64),
                                           torch.nn.ReLU(), torch.nn.Linear(64, num_classes))
            self.correct = self.seen = 0

        def training_step(self, batch, _):
            return torch.nn.functional.cross_entropy(self.net(batch["pixel_values"]), batch["labels"])

        def test_step(self, batch, _):
            self.correct += (self.net(batch["pixel_values"]).argmax(-1) == batch["labels"]).sum().item()
            self.seen += len(batch["labels"])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=3e-3)

    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(image_size=SIZE, batch_size=32, eval_batch_size=120, seed=0, fraction=0.5)
    model = PixelClassifier(dm.num_classes)
    fit_then_test(model, dm, max_epochs=3, root=tmp_path)
    assert model.seen == 360 and model.correct / model.seen > 0.8  # chance is 0.1


@pytest.mark.parametrize("escape", ["../../secret.jpg", "images/../../../secret.jpg", "ABSOLUTE"])
def test_split_paths_cannot_leave_the_dataset_folder(tmp_path, escape):
    """VTAB lines and FGVC keys naming an existing image outside the root fail before it is touched."""
    secret = tmp_path / "secret.jpg"
    write_image(secret, 3)  # exists: without the check both readers would load it
    entry = str(secret) if escape == "ABSOLUTE" else escape
    why = ("is absolute; list paths relative to {root}" if escape == "ABSOLUTE"
           else "leaves the dataset folder {root} ('..'); list paths inside {root}")

    task_dir = write_vtab_task(tmp_path / "vtab")
    with (task_dir / "val200.txt").open("a") as split:
        split.write(f"{entry} 1\n")
    with pytest.raises(DataError) as error:
        vtab(tmp_path / "vtab").setup("validate")
    assert str(error.value) == f"{task_dir / 'val200.txt'}:7: path {entry!r} " + why.format(root=task_dir)

    fgvc_root = write_fgvc(tmp_path / "fgvc" / "cub")
    annotations = json.loads((fgvc_root / "val.json").read_text())
    (fgvc_root / "val.json").write_text(json.dumps({**annotations, entry: 5}))
    with pytest.raises(DataError) as error:
        FGVCDataModule(root=str(fgvc_root), image_size=SIZE).setup("validate")
    assert str(error.value) == f"{fgvc_root / 'val.json'}: path {entry!r} " + why.format(root=fgvc_root / "images")
