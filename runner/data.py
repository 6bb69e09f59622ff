"""Datasets (each a function named in ``conf/data/*.yaml``) and the batchers that feed the training loop.

Data that fits in memory comes back as a ``TensorDataset`` and is batched by indexing tensors that already
sit on the training device; anything else goes through a DataLoader with workers and pinned memory. Both
shuffle with a permutation derived from (seed, epoch) alone, so any epoch's order can be reproduced, and
both can start an epoch part-way through (for resuming mid-epoch). Under DDP each rank takes its shard of that
order the way torch's DistributedSampler cuts it, so the shards together are the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from runner.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]


TASKS = ("classification", "regression")


@dataclass
class DataSplits:
    """What a data function returns: the training and validation (and optionally test) datasets.

    A data function (``data._target_``) may also return a plain tuple ``(train, val)`` or ``(train, val, test)``
    of ``torch.utils.data.Dataset``s whose items are ``(input, target)`` pairs; the runner completes it with
    ``complete_splits``. What is left ``None`` is read from the data: the input shape from the first training
    sample; the task from its target (an integer: classification, a float: regression); the classes from a
    ``classes`` attribute of the training dataset, else, for tensors, from the largest label.
    """

    train: Dataset
    val: Dataset
    test: Dataset | None = None
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None  # classification only
    classes: list[str] | None = None  # the class names, in label order
    task: str | None = None  # classification | regression
    # What the data function computed from the training split and evaluation must reuse (a table's feature means
    # and deviations, its column names): plain values and tensors, stored in the checkpoint as its `data` part.
    fitted: dict[str, Any] = field(default_factory=dict)

    @property
    def is_classification(self) -> bool:
        return self.task == "classification"

    @property
    def num_outputs(self) -> int:
        """Outputs the model needs: one per class, or one per regression target."""
        if self.is_classification:
            return self.num_classes
        target = self.train[0][1]
        return int(torch.as_tensor(target).numel())

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data: its classes and what was fitted on the training split."""
        return {"classes": self.classes, "fitted": self.fitted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that the data still is what the checkpoint was trained on (a table edited since, say)."""
        if state["classes"] != self.classes or not _same_values(state["fitted"], self.fitted):
            raise ValueError(
                "the data differs from the data this checkpoint was trained on (classes or the statistics of the "
                "training split); restore the data files or start a new run"
            )


def _same_values(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def complete_splits(result: Any, source: str, settings: dict[str, Any] | None = None) -> DataSplits:
    """A data function's result as a complete ``DataSplits``; ``settings`` are ``data.task``, ``data.num_classes``
    and ``data.input_shape`` from the config, which win over what is read from the data.

    Raises:
        ConfigError: the result is not datasets, a split is empty, or the classes cannot be told.
    """
    if isinstance(result, list | tuple) and len(result) in (2, 3):
        result = DataSplits(*result)
    if not isinstance(result, DataSplits):
        raise ConfigError(
            f"{source} returned {type(result).__name__}; return (train, val), (train, val, test) or "
            f"runner.data.DataSplits(train, val, ...), each a torch.utils.data.Dataset of (input, target) pairs."
        )
    for split in ("train", "val", "test") if result.test is not None else ("train", "val"):
        if len(getattr(result, split)) == 0:
            raise ConfigError(f"{source} returned an empty {split} split; it needs at least one sample.")
    settings = {key: value for key, value in (settings or {}).items() if value is not None}
    first_input, first_target = result.train[0]
    result.input_shape = tuple(settings.get("input_shape") or result.input_shape or torch.as_tensor(first_input).shape)
    classes = result.classes or getattr(result.train, "classes", None)
    result.classes = [str(c) for c in classes] if classes is not None else None
    result.num_classes = settings.get("num_classes") or result.num_classes or (len(classes) if classes else None)
    integer_target = not torch.as_tensor(first_target).is_floating_point()
    result.task = (
        settings.get("task")
        or result.task
        or ("classification" if result.num_classes or integer_target else "regression")
    )
    if result.task not in TASKS:
        raise ConfigError(f"data.task={result.task!r}: use classification or regression.")
    if result.is_classification and result.num_classes is None:
        result.num_classes = _largest_label(result.train, source) + 1
    return result


def _largest_label(dataset: Dataset, source: str) -> int:
    if isinstance(dataset, TensorDataset):
        return int(dataset.tensors[1].max())
    raise ConfigError(
        f"{source}: cannot tell the number of classes; give the training dataset a `classes` attribute, return "
        f"DataSplits(..., num_classes=N), or set data.num_classes=N."
    )


def epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle order of one epoch: a function of (seed, epoch) only."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(size, generator=generator)


def shard(order: torch.Tensor, rank: int, world_size: int, pad: bool) -> torch.Tensor:
    """This rank's part of an epoch's order, cut as DistributedSampler cuts it: every world_size-th index from
    ``rank``, after (for training, ``pad``) repeating the first indices until the order splits evenly, so that
    every rank takes the same number of steps. Evaluation is not padded: each sample counts once."""
    if world_size == 1:
        return order
    if pad:
        total = math.ceil(len(order) / world_size) * world_size
        order = order.repeat(math.ceil(total / len(order)))[:total]
    return order[rank::world_size]


def shard_size(size: int, rank: int, world_size: int, pad: bool) -> int:
    return math.ceil(size / world_size) if pad else len(range(rank, size, world_size))


def steps_per_epoch(size: int, batch_size: int, world_size: int = 1, accumulate: int = 1) -> int:
    """Optimizer steps in one epoch of ``size`` training samples, ``batch_size`` being the global batch of one
    forward pass and ``accumulate`` the batches summed into each step (the epoch's last step may sum fewer)."""
    batches = math.ceil(shard_size(size, 0, world_size, pad=True) / (batch_size // world_size))
    return math.ceil(batches / accumulate)


def split_indices(size: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be between 0 and 1, got {val_fraction}.")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(size * val_fraction))
    return order[n_val:], order[:n_val]


def hold_out_test(train_idx: torch.Tensor, size: int, test_fraction: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``data.test_fraction`` of all ``size`` samples taken from the training indices for a test split (None at 0).

    The validation split stays the one ``split_indices`` chose: adding a test split changes only the training set.
    """
    if test_fraction == 0:
        return train_idx, None
    if not 0 < test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be between 0 and 1 (0: no test split), got {test_fraction}.")
    n_test = max(1, round(size * test_fraction))
    if n_test >= len(train_idx):
        raise ConfigError(
            f"data.test_fraction={test_fraction} leaves no training samples: data.val_fraction and data.test_fraction "
            f"together must stay below 1."
        )
    return train_idx[n_test:], train_idx[:n_test]


def _tensor_splits(
    x: torch.Tensor,
    y: torch.Tensor,
    val_fraction: float,
    seed: int,
    num_classes: int | None,
    test_fraction: float = 0.0,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DataSplits:
    train_idx, val_idx = split_indices(len(x), val_fraction, seed)
    train_idx, test_idx = hold_out_test(train_idx, len(x), test_fraction)
    if test_idx is not None:
        test = (x[test_idx], y[test_idx])
    return DataSplits(
        TensorDataset(x[train_idx], y[train_idx]),
        TensorDataset(x[val_idx], y[val_idx]),
        TensorDataset(*test) if test is not None else None,
        input_shape=tuple(x.shape[1:]),
        num_classes=num_classes,
        task="classification" if num_classes else "regression",
    )


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (1797x8x8 pixel values 0..16, labels).

    Read straight from the CSV file scikit-learn ships: importing ``sklearn.datasets`` (SciPy and more) costs
    about a second of every launch. Falls back to ``sklearn.datasets.load_digits`` if the file moves.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def load_digits(seed: int, val_fraction: float = 0.2, test_fraction: float = 0.0) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), as 1x8x8 images in [0, 1]."""
    images, labels = digits_arrays()
    x = torch.from_numpy(images).unsqueeze(1) / 16.0
    return _tensor_splits(x, torch.from_numpy(labels), val_fraction, seed, 10, test_fraction)


def load_regression(
    seed: int, size: int = 1000, noise: float = 0.3, val_fraction: float = 0.2, test_fraction: float = 0.0
) -> DataSplits:
    """Synthetic 1-D regression: y = x + noise * N(0, 1), x uniform on [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(size, 1, generator=generator) * 2 - 1
    y = x + noise * torch.randn(size, 1, generator=generator)
    return _tensor_splits(x, y, val_fraction, seed, None, test_fraction)


def _torchvision_dataset(name: str, root: str, download: bool, train: bool = True, **kwargs):
    import torchvision

    folder = Path(root).expanduser().resolve()
    try:
        return getattr(torchvision.datasets, name)(str(folder), train=train, download=download, **kwargs)
    except RuntimeError as err:
        if download:
            raise ConfigError(f"data: could not download {name} into {folder}: {err}") from None
        raise ConfigError(
            f"data: {name} files not found under {folder}; put them there, point data.root at them, "
            f"or add data.download=true to download them."
        ) from None


def _load_mnist_like(
    name: str, seed: int, root: str, download: bool, val_fraction: float, mean: float, std: float
) -> DataSplits:
    def images(dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return (dataset.data.float().div(255.0).unsqueeze(1) - mean) / std, dataset.targets.long()

    test = images(_torchvision_dataset(name, root, download, train=False))  # the official 10,000 test images
    return _tensor_splits(*images(_torchvision_dataset(name, root, download)), val_fraction, seed, 10, test=test)


def load_mnist(seed: int, root: str = "data", download: bool = False, val_fraction: float = 1 / 12) -> DataSplits:
    """MNIST's 60,000 training images, held in memory; the validation split is taken from them by seed, the test
    split is MNIST's own."""
    return _load_mnist_like("MNIST", seed, root, download, val_fraction, 0.1307, 0.3081)


def load_fashion_mnist(
    seed: int, root: str = "data", download: bool = False, val_fraction: float = 1 / 12
) -> DataSplits:
    """Fashion-MNIST's 60,000 training images, held in memory; the validation split is taken by seed, the test
    split is Fashion-MNIST's own."""
    return _load_mnist_like("FashionMNIST", seed, root, download, val_fraction, 0.2860, 0.3530)


def load_cifar10(seed: int, root: str = "data", download: bool = False, val_fraction: float = 0.1) -> DataSplits:
    """CIFAR-10's 50,000 training images through a DataLoader; the validation split is taken by seed, the test
    split is CIFAR-10's own 10,000."""
    from torchvision import transforms

    normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    transform = transforms.Compose([transforms.ToTensor(), normalize])
    dataset = _torchvision_dataset("CIFAR10", root, download, transform=transform)
    test = _torchvision_dataset("CIFAR10", root, download, train=False, transform=transform)
    train_idx, val_idx = split_indices(len(dataset), val_fraction, seed)
    classes = list(dataset.classes)
    train, val = Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist())
    return DataSplits(train, val, test, input_shape=(3, 32, 32), num_classes=10, classes=classes)


def load_fake(
    seed: int,
    size: int = 1000,
    image_size: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
) -> DataSplits:
    """torchvision's FakeData: random images made per item, read through a DataLoader like files would be."""
    from torchvision import datasets, transforms

    dataset = datasets.FakeData(
        size, tuple(image_size), num_classes, transform=transforms.ToTensor(), random_offset=seed
    )
    train_idx, val_idx = split_indices(size, val_fraction, seed)
    train_idx, test_idx = hold_out_test(train_idx, size, test_fraction)
    train, val = Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist())
    test = Subset(dataset, test_idx.tolist()) if test_idx is not None else None
    return DataSplits(train, val, test, input_shape=tuple(image_size), num_classes=num_classes)


class DeviceBatcher:
    """Batches of in-memory tensors moved to the device once, cut by indexing (no per-sample collation).

    ``batch_size`` is this rank's; training batchers (``shuffle``) are padded under DDP, evaluation ones are not.
    """

    def __init__(
        self,
        dataset: TensorDataset,
        batch_size: int,
        device: torch.device,
        seed: int,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.x, self.y = (t.to(device) for t in dataset.tensors)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size

    @property
    def samples(self) -> int:
        """This rank's samples in one epoch."""
        return shard_size(len(self.x), self.rank, self.world_size, self.shuffle)

    def __len__(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        size = len(self.x)
        if not self.shuffle and self.world_size == 1:
            for start in range(skip_batches * self.batch_size, size, self.batch_size):
                yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
            return
        order = epoch_permutation(size, self.seed, epoch) if self.shuffle else torch.arange(size)
        order = shard(order, self.rank, self.world_size, pad=self.shuffle).to(self.x.device)
        for start in range(skip_batches * self.batch_size, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield take_rows(self.x, index), take_rows(self.y, index)


def take_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[index]`` for a vector of row indices. index_select gathers the same rows without Python's indexing
    machinery (1-2 µs a batch) but always into a contiguous tensor, so a tensor in another memory layout
    (channels_last) is indexed, which keeps its layout."""
    return tensor.index_select(0, index) if tensor.is_contiguous() else tensor[index]


class EpochSampler(Sampler[int]):
    """The (seed, epoch) permutation for a DataLoader, this rank's shard of it, optionally starting part-way through."""

    def __init__(self, size: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    @property
    def shard_size(self) -> int:
        return shard_size(self.size, self.rank, self.world_size, self.shuffle)

    def __len__(self) -> int:
        return self.shard_size - self.start

    def __iter__(self) -> Iterator[int]:
        order = epoch_permutation(self.size, self.seed, self.epoch) if self.shuffle else torch.arange(self.size)
        return iter(shard(order, self.rank, self.world_size, pad=self.shuffle)[self.start :].tolist())


class LoaderBatcher:
    """Batches from a DataLoader (workers, pinned memory), moved to the device as they arrive."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        device: torch.device,
        seed: int,
        shuffle: bool,
        num_workers: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.sampler = EpochSampler(len(dataset), seed, shuffle, rank, world_size)
        self.batch_size, self.device = batch_size, device
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )

    @property
    def samples(self) -> int:
        """This rank's samples in one epoch."""
        return self.sampler.shard_size

    def __len__(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        self.sampler.epoch, self.sampler.start = epoch, skip_batches * self.batch_size
        non_blocking = self.device.type == "cuda"
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)


def make_batcher(
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    seed: int,
    shuffle: bool,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
):
    """The in-memory batcher for a TensorDataset, a DataLoader for anything else; ``batch_size`` is the global
    batch, of which this rank takes its ``1 / world_size``."""
    local_batch = batch_size // world_size
    if isinstance(dataset, TensorDataset):
        return DeviceBatcher(dataset, local_batch, device, seed, shuffle, rank, world_size)
    return LoaderBatcher(dataset, local_batch, device, seed, shuffle, num_workers, rank, world_size)
