"""The train loader's order depends only on (seed, epoch): resumed runs replay the same batches."""

from __future__ import annotations

from doran_lightning.data.common import EpochShuffleSampler
from doran_lightning.data.vision import DigitsDataModule


def test_order_is_a_function_of_seed_and_epoch() -> None:
    sampler = EpochShuffleSampler(50, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert list(sampler) == first  # no hidden generator state between passes
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    fresh = EpochShuffleSampler(50, seed=3)
    fresh.set_epoch(1)
    assert list(fresh) == second  # a rebuilt (resumed) loader sees the same epoch-1 order
    assert list(EpochShuffleSampler(50, seed=4)) != first


def test_fast_forward_skips_once() -> None:
    sampler = EpochShuffleSampler(20, seed=0)
    full = list(sampler)
    sampler.fast_forward(8)
    assert list(sampler) == full[8:]
    assert list(sampler) == full


def test_datamodule_train_loader_uses_it() -> None:
    datamodule = DigitsDataModule(image_size=8, batch_size=16, seed=5)
    loader = datamodule.train_dataloader()
    assert isinstance(loader.sampler, EpochShuffleSampler) and loader.sampler.seed == 5
    assert not isinstance(datamodule.val_dataloader().sampler, EpochShuffleSampler)


def test_digit_class_subsets_are_disjoint_and_relabelled() -> None:
    source = DigitsDataModule(image_size=8, classes=[0, 1, 2, 3, 4])
    target = DigitsDataModule(image_size=8, classes=[5, 6, 7, 8, 9])
    assert source.num_classes == target.num_classes == 5
    source.setup("fit")
    target.setup("fit")
    full = DigitsDataModule(image_size=8)
    full.setup("fit")
    assert len(source.datasets["train"]) + len(target.datasets["train"]) == len(full.datasets["train"])
    assert set(target.datasets["train"].labels) == {0, 1, 2, 3, 4}
    first_five = full.datasets["train"].labels.index(5)
    assert target.datasets["train"].images[0].equal(full.datasets["train"].images[first_five])


def test_bad_digit_classes_are_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="data.classes"):
        DigitsDataModule(classes=[3, 3])


def test_train_limit_is_a_fixed_pool_that_fraction_subsamples() -> None:
    pools = []
    for seed in (0, 1):
        datamodule = DigitsDataModule(image_size=8, train_limit=200, seed=seed)
        datamodule.setup("fit")
        pools.append(list(datamodule.datasets["train"].indices))
    assert pools[0] == pools[1] and abs(len(pools[0]) - 200) <= 10  # stratified rounding per class
    small = DigitsDataModule(image_size=8, train_limit=200, fraction=0.5, seed=3)
    small.setup("fit")
    chosen = set(small.datasets["train"].indices)
    assert chosen < set(pools[0]) and abs(len(chosen) - len(pools[0]) / 2) <= 10
    labels = [small.datasets["train"].dataset.labels[i] for i in chosen]
    assert set(labels) == set(range(10))  # still stratified
