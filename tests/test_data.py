"""Datasets and batchers: splits fixed by the seed, shuffles fixed by (seed, epoch), every sample once an epoch."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from runner.data import (
    DeviceBatcher,
    LoaderBatcher,
    epoch_permutation,
    load_digits,
    load_fake,
    load_mnist,
    load_regression,
)
from runner.errors import ConfigError

CPU = torch.device("cpu")


def test_digits_split_is_fixed_by_the_seed():
    a, b, c = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert len(a.train) + len(a.val) == 1797 and a.input_shape == (1, 8, 8) and a.num_classes == 10


def test_digits_are_scikit_learns_digits():
    from sklearn.datasets import load_digits as sklearn_digits

    from runner.data import digits_arrays

    images, labels = digits_arrays()
    reference = sklearn_digits()
    assert np.array_equal(images, reference.images) and np.array_equal(labels, reference.target)


def test_regression_is_y_equals_x_plus_noise():
    data = load_regression(seed=0, size=2000, noise=0.3)
    x, y = data.train.tensors
    assert x.min() >= -1 and x.max() <= 1 and data.num_classes is None
    assert (y - x).std().item() == pytest.approx(0.3, rel=0.1)


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert torch.equal(epoch_permutation(100, 0, 3), epoch_permutation(100, 0, 3))
    assert not torch.equal(epoch_permutation(100, 0, 3), epoch_permutation(100, 0, 4))
    assert not torch.equal(epoch_permutation(100, 0, 3), epoch_permutation(100, 1, 3))


def batches_of(batcher, epoch, skip=0):
    return [(x.clone(), y.clone()) for x, y in batcher.epoch(epoch, skip)]


@pytest.fixture
def dataset():
    return TensorDataset(torch.arange(50.0).unsqueeze(1), torch.arange(50))


def test_device_batcher_yields_every_sample_once_per_epoch(dataset):
    batcher = DeviceBatcher(dataset, 8, CPU, seed=0, shuffle=True)
    batches = batches_of(batcher, 0)
    assert len(batches) == len(batcher) == 7
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(50))
    assert torch.cat([y for _, y in batches]).tolist() != list(range(50))  # shuffled


def test_device_batcher_and_dataloader_give_the_same_batches(dataset):
    in_memory = DeviceBatcher(dataset, 8, CPU, seed=5, shuffle=True)
    loader = LoaderBatcher(dataset, 8, CPU, seed=5, shuffle=True, num_workers=0)
    for epoch in (0, 1):
        for (xa, ya), (xb, yb) in zip(batches_of(in_memory, epoch), batches_of(loader, epoch), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize(
    "make", [lambda d: DeviceBatcher(d, 8, CPU, 0, True), lambda d: LoaderBatcher(d, 8, CPU, 0, True, 0)]
)
def test_an_epoch_can_start_part_way_through(dataset, make):
    batcher = make(dataset)
    whole = batches_of(batcher, 2)
    rest = batches_of(batcher, 2, skip=3)
    assert len(rest) == len(whole) - 3
    for (xa, _), (xb, _) in zip(whole[3:], rest, strict=True):
        assert torch.equal(xa, xb)


def test_device_batches_are_the_rows_indexing_gives_in_the_layout_the_data_has():
    images = torch.arange(20 * 3 * 4 * 4, dtype=torch.float32).reshape(20, 3, 4, 4)
    for x in (images, images.to(memory_format=torch.channels_last)):
        batcher = DeviceBatcher(TensorDataset(x, torch.arange(20)), 8, CPU, seed=1, shuffle=True)
        order = epoch_permutation(20, 1, 0)
        for start, (xb, yb) in zip(range(0, 20, 8), batcher.epoch(0), strict=True):
            expected = x[order[start : start + 8]]
            assert torch.equal(xb, expected) and torch.equal(yb, order[start : start + 8])
            assert xb.stride() == expected.stride()  # channels_last stays channels_last


def test_validation_order_is_fixed(dataset):
    batcher = DeviceBatcher(dataset, 8, CPU, 0, shuffle=False)
    assert torch.cat([y for _, y in batches_of(batcher, 0)]).tolist() == list(range(50))


def write_idx(path, array: np.ndarray):
    """The MNIST file format: a magic number with the dtype and rank, the sizes, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_mnist_format_files_into_memory(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (120, 28, 28)), rng.integers(0, 10, 120)
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", labels)
    write_idx(raw / "t10k-images-idx3-ubyte", images[:10])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[:10])
    data = load_mnist(seed=0, root=str(tmp_path), val_fraction=0.25)
    assert isinstance(data.train, TensorDataset) and data.input_shape == (1, 28, 28)
    assert len(data.train) == 90 and len(data.val) == 30
    assert torch.equal(data.test.tensors[1], torch.from_numpy(labels[:10])), "MNIST's own test split, t10k"
    all_labels = sorted(torch.cat([data.train.tensors[1], data.val.tensors[1]]).tolist())
    assert all_labels == sorted(labels.tolist())


def test_missing_dataset_files_name_the_folder_and_the_download_switch(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_mnist(seed=0, root=str(tmp_path / "none"))
    assert str(tmp_path / "none") in str(caught.value) and "data.download=true" in str(caught.value)


def test_fake_data_goes_through_a_dataloader_and_is_deterministic():
    a, b = load_fake(seed=0, size=20, image_size=(3, 8, 8)), load_fake(seed=0, size=20, image_size=(3, 8, 8))
    assert not isinstance(a.train, TensorDataset)
    assert torch.equal(a.train[0][0], b.train[0][0])
    batcher = LoaderBatcher(a.train, 4, CPU, 0, True, num_workers=0)
    x, y = next(iter(batcher.epoch(0)))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.long
