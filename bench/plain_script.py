"""The script a user would write by hand for the runner's default job: the same model (MLP 64-128-10), data
(scikit-learn's digits, 20% held out), optimizer (SGD, lr 0.1), schedule (ConstantLR, factor 1) and seed, a
validation pass and a printed line per epoch, the model saved at the end. No checkpoints, no MLflow.

    python bench/plain_script.py EPOCHS

The digits are read from the CSV file scikit-learn ships, as the runner reads them, so that
bench/whole_process.py compares the runner with a loop and not two ways of loading a table.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def main(epochs: int) -> None:
    torch.manual_seed(0)
    csv = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :-1]) / 16.0
    y = torch.from_numpy(table[:, -1].astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_val = round(len(x) * 0.2)
    x_val, y_val, x_train, y_train = x[order[:n_val]], y[order[:n_val]], x[order[n_val:]], y[order[n_val:]]

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=5)
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        shuffled = torch.randperm(len(x_train))
        total = torch.zeros(())
        for start in range(0, len(x_train), 32):
            index = shuffled[start : start + 32]
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(index)
        scheduler.step()
        model.eval()
        with torch.no_grad():
            outputs = model(x_val)
            val_loss = F.cross_entropy(outputs, y_val).item()
            accuracy = (outputs.argmax(1) == y_val).float().mean().item()
        print(
            f"epoch {epoch}/{epochs} train_loss {total.item() / len(x_train):.4g} val_loss {val_loss:.4g} "
            f"val_accuracy {accuracy:.4g} ({time.perf_counter() - started:.2f}s)",
            file=sys.stderr,
        )
    torch.save(model.state_dict(), "model.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]))
