"""Image folders as data: ``data=image_folder data.root=DIR``, read by torchvision's ``ImageFolder``.

``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (and ``DIR/test/<class>/*``) when there, else ``DIR/<class>/*``
split by ``data.val_fraction`` (and ``data.test_fraction``), fixed by the seed. Every image is resized to
``data.image_size`` and normalised; the training split alone also goes through ``data.augment``, a list of
torchvision ``transforms.v2`` entries (``_target_`` and arguments). Images are read through a DataLoader with
``trainer.num_workers`` workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Subset

from runner.data import DataSplits, hold_out_test, split_indices
from runner.errors import ConfigError


def _transform(image_size: int, mean: list[float], std: list[float], augment: list[Any]):
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), antialias=True),
            *augment,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def _folder(root: Path, transform, key: str = "data.root"):
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(
            f"{key}={root}: no images found ({str(err).splitlines()[0]}); put them in one folder per class, "
            f"e.g. {root}/cat/1.png and {root}/dog/2.png."
        ) from None
    if len(dataset.classes) < 2:
        raise ConfigError(
            f"{key}={root}: only one class folder ({dataset.classes[0]!r}); a classification needs at least two, "
            f"one folder per class."
        )
    return dataset


def load_image_folder(
    seed: int,
    root: str,
    image_size: int = 32,
    val_fraction: float = 0.2,
    mean: list[float] = (0.5, 0.5, 0.5),
    std: list[float] = (0.5, 0.5, 0.5),
    augment: list[Any] = (),
    test_fraction: float = 0.0,
) -> DataSplits:
    """An image classification from folders named after their classes; ``root/test/<class>/*`` is the test split
    when present, else ``test_fraction`` of the images are held out for it."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data.root={root}: no such folder (relative paths are from where you run the command).")
    train_transform = _transform(image_size, list(mean), list(std), list(augment))
    plain_transform = _transform(image_size, list(mean), list(std), [])
    test = None
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        train = _folder(folder / "train", train_transform)
        val = _folder(folder / "val", plain_transform)
        if val.classes != train.classes:
            raise ConfigError(f"data.root={root}: train/ has classes {train.classes} but val/ has {val.classes}.")
        if (folder / "test").is_dir():
            test = _folder(folder / "test", plain_transform, "data.root's test/")
            if test.classes != train.classes:
                raise ConfigError(f"data.root={root}: train/ has classes {train.classes} but test/ has {test.classes}.")
    else:
        augmented, plain = _folder(folder, train_transform), _folder(folder, plain_transform)
        train_idx, val_idx = split_indices(len(plain), val_fraction, seed)
        train_idx, test_idx = hold_out_test(train_idx, len(plain), test_fraction)
        train, val = Subset(augmented, train_idx.tolist()), Subset(plain, val_idx.tolist())
        test = Subset(plain, test_idx.tolist()) if test_idx is not None else None
        train.classes = augmented.classes  # type: ignore[attr-defined]
    classes = list(train.classes)
    return DataSplits(
        train, val, test, input_shape=(3, image_size, image_size), num_classes=len(classes), classes=classes
    )
