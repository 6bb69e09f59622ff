"""Real schedule lambdas from public code, pasted into scheduler.lr_lambda: every one accepted, and value for value
the original Python over every epoch (or step) of a run.

Each case keeps the original as a Python callable, with the numbers around it bound as in its source, beside the
text the runner gets: the lambda as pasted where the source is one; a def's return value written as one expression
where it is not; and the numbers around it in ``scheduler.constants``, or the run's own ``epochs``/``total_steps``.
Sources are repository and file (the third column of each case).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from runner.schedules import ExpressionLambdaLR


@dataclass
class Case:
    name: str
    source: str
    original: Any  # the function of the epoch (or step) as its source computes it
    expression: str
    constants: dict[str, Any] = field(default_factory=dict)
    interval: str = "epoch"
    epochs: int = 300
    steps_per_epoch: int = 1
    mode: str = "factor"


EPOCHS = 300  # yolov5's default trainer.epochs


# ultralytics/yolov5 utils/general.py (and EEIC-Lab/DREB-Net lib/utils/general.py, huahuihuang/BoneAgeDetermination
# classification/utils/general.py): lf = one_cycle(1, hyp["lrf"], epochs)
def one_cycle(y1=0.0, y2=1.0, steps=100):
    return lambda x: ((1 - math.cos(x * math.pi / steps)) / 2) * (y2 - y1) + y1


# ultralytics/ultralytics engine/trainer.py: the same with max(..., 0)
def one_cycle_ultralytics(y1=0.0, y2=1.0, steps=100):
    return lambda x: max((1 - math.cos(x * math.pi / steps)) / 2, 0) * (y2 - y1) + y1


# EEIC-Lab/DREB-Net lib/utils/general.py
def one_flat_cycle(y1=0.0, y2=1.0, steps=100):
    return lambda x: (
        ((1 - math.cos((x - (steps // 2)) * math.pi / (steps // 2))) / 2) * (y2 - y1) + y1 if (x > (steps // 2)) else y1
    )


hyp = {"lrf": 0.01}
epochs = EPOCHS


# huggingface/transformers src/transformers/optimization.py (num_warmup_steps=500, num_training_steps = the run)
def hf_linear(num_warmup_steps, num_training_steps):
    def lr_lambda(current_step: int):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        return max(
            0.0,
            float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)),
        )

    return lr_lambda


def hf_cosine(num_warmup_steps, num_training_steps, num_cycles=0.5):
    def lr_lambda(current_step):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))

    return lr_lambda


def hf_cosine_hard_restarts(num_warmup_steps, num_training_steps, num_cycles=1):
    def lr_lambda(current_step):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
        if progress >= 1.0:
            return 0.0
        return max(
            0.0,
            0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))),
        )

    return lr_lambda


def hf_polynomial(num_warmup_steps, num_training_steps, lr_init, lr_end=1e-7, power=1.0):
    def lr_lambda(current_step: int):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        elif current_step > num_training_steps:
            return lr_end / lr_init  # as LambdaLR multiplies by lr_init
        else:
            lr_range = lr_init - lr_end
            decay_steps = num_training_steps - num_warmup_steps
            pct_remaining = 1 - (current_step - num_warmup_steps) / decay_steps
            decay = lr_range * pct_remaining**power + lr_end
            return decay / lr_init  # as LambdaLR multiplies by lr_init

    return lr_lambda


def hf_constant_with_warmup(num_warmup_steps):
    def lr_lambda(current_step: int):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1.0, num_warmup_steps))
        return 1.0

    return lr_lambda


def hf_inverse_sqrt(num_warmup_steps, timescale=None):
    if timescale is None:
        timescale = num_warmup_steps or 10_000

    def lr_lambda(current_step: int):
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        shift = timescale - num_warmup_steps
        decay = 1.0 / math.sqrt((current_step + shift) / timescale)
        return decay

    return lr_lambda


# karpathy/nanoGPT train.py (learning_rate, warmup_iters, lr_decay_iters, min_lr; here a short run's numbers)
learning_rate, warmup_iters, lr_decay_iters, min_lr = 6e-4, 200, 5000, 6e-5


def nanogpt_get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


# NoeFlandre/GPT2-From-Scratch src/utils/scheduler.py
max_lr, gpt2_min_lr, warmup_steps, max_steps = 6e-4, 6e-4 * 0.1, 10, 50


def gpt2_get_lr(it):
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    if it > max_steps:
        return gpt2_min_lr
    decay_ration = (it - warmup_steps) / (max_steps - warmup_steps)
    assert 0 <= decay_ration <= 1
    cosine_decay = 0.5 * (1 + math.cos(math.pi * decay_ration))
    return gpt2_min_lr + (max_lr - gpt2_min_lr) * cosine_decay


# kimoyerr/provarun provarun/train_utils.py
def provarun_get_lr(it, all, learning_rate, warmup_iters):
    lr_decay_iters = all
    min_lr = learning_rate / 10
    if it < warmup_iters:
        return learning_rate * it / warmup_iters
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


# stanford-cs336/spring2024-assignment4-data cs336-basics/cs336_basics/optimizer.py
def get_cosine_lr(it, max_learning_rate, min_learning_rate, warmup_iters, cosine_cycle_iters):
    if it < warmup_iters:
        return max_learning_rate * it / warmup_iters
    if it > cosine_cycle_iters:
        return min_learning_rate
    decay_ratio = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_learning_rate + coeff * (max_learning_rate - min_learning_rate)


# nikitakapitan/transformers src/transformers/training/lr.py (the Annotated Transformer's / OpenNMT's noam rate)
def rate(step, model_size, factor, warmup):
    if step == 0:
        step = 1
    floored_step = min(step ** (-0.5), step * warmup ** (-1.5))
    return factor * (model_size ** (-0.5) * floored_step)


# alaneuler/my-transformer train/learning_rate.py
def rate_alaneuler(step, model_size, factor, warmup):
    if step == 0:
        step = 1
    return factor * (model_size ** (-0.5) * min(step**-0.5, step * warmup**-1.5))


# HuangDLab/EnFormer scheduler/warmup_lr_scheduler.py
def enformer(num_step, epochs, warmup=True, warmup_epochs=1, warmup_factor=1e-3):
    def f(x):
        if warmup is True and x <= (warmup_epochs * num_step):
            alpha = float(x) / (warmup_epochs * num_step)
            return warmup_factor * (1 - alpha) + alpha
        else:
            return (1 - (x - warmup_epochs * num_step) / ((epochs - warmup_epochs) * num_step)) ** 0.9

    return f


# KeepTryingTo/DeepLearning ObjectDetection/YOLOx/YOLOv3/myYOLOv3-self/utiles/scheduler.py (torchvision's
# references/detection warm-up)
def warmup_lr(warmup_iters, warmup_factor):
    def f(x):
        if x >= warmup_iters:
            return 1
        alpha = float(x) / warmup_iters
        return warmup_factor * (1 - alpha) + alpha

    return f


# innodatalabs/tbert tbert/optimization.py
def tbert(train_steps, warmup_steps):
    def schedule(step):
        if step <= warmup_steps:
            return step / warmup_steps
        assert step <= train_steps
        return 1.0 - (train_steps - step) / (train_steps - warmup_steps)

    return schedule


# modelscope/FunASR funasr/schedulers/lambdalr_cus.py (CustomLambdaLR.get_lr, as a factor of base_lr)
def funasr(warmup_steps):
    def factor(last_epoch):
        if last_epoch < warmup_steps:
            return min(last_epoch / warmup_steps, 1)
        return 1

    return factor


# PaddleCV-SIG/MedicalSeg medicalseg/core/training/learning_rate/poly_lr.py
def poly_lr(epoch, max_epochs, initial_lr, exponent=0.9):
    return initial_lr * (1 - epoch / max_epochs) ** exponent


# apple/pfl-research benchmarks/utils/callback/pytorch.py (lr_init = optimizer.defaults["lr"] = 0.1)
apple_polynomial = hf_polynomial  # the same body, copied from transformers v4.6 (the file says so)


# Gaelledumont/Projet-MLA training/schedulers.py PolynomialDecayLR.get_lr (base_lr 1e-3, warmup 100, total 1000)
def projet_mla(
    current_step,
    base_lr=1e-3,
    warmup_steps=100,
    total_steps=1000,
    end_learning_rate=0.0,
    power=1.0,
):
    if current_step < warmup_steps:
        return base_lr * current_step / warmup_steps
    progress = (current_step - warmup_steps) / float(total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    decay = (1 - progress) ** power
    return (base_lr - end_learning_rate) * decay + end_learning_rate


# The step_decay recipe of machinelearningmastery.com's article on Keras LR schedules, copied into many public Keras
# training scripts (these numbers from one of them: initial_lrate 0.001, drop 0.5, epochs_drop 20)
def step_decay(epoch):
    initial_lrate = 0.001
    drop = 0.5
    epochs_drop = 20
    lrate = initial_lrate * math.pow(drop, math.floor((1 + epoch) / epochs_drop))
    return lrate


# Megvii-BaseDetection/YOLOX yolox/utils/lr_scheduler.py yolox_warm_cos_lr (as copied into many YOLO repos)
def yolox_warm_cos_lr(lr, min_lr, total_iters, warmup_total_iters, warmup_lr_start, no_aug_iter, iters):
    if iters <= warmup_total_iters:
        lr = (lr - warmup_lr_start) * pow(iters / float(warmup_total_iters), 2) + warmup_lr_start
    elif iters >= total_iters - no_aug_iter:
        lr = min_lr
    else:
        lr = min_lr + 0.5 * (lr - min_lr) * (
            1.0 + math.cos(math.pi * (iters - warmup_total_iters) / (total_iters - warmup_total_iters - no_aug_iter))
        )
    return lr


# facebookresearch/fairseq fairseq/optim/lr_scheduler/inverse_square_root_schedule.py (lr 5e-4, 4000 warm-up updates)
def fairseq_inverse_sqrt(num_updates, lr=5e-4, warmup_updates=4000, warmup_init_lr=1e-7):
    lr_step = (lr - warmup_init_lr) / warmup_updates
    decay_factor = lr * warmup_updates**0.5
    if num_updates < warmup_updates:
        return warmup_init_lr + num_updates * lr_step
    return decay_factor * num_updates**-0.5


HF = "huggingface/transformers src/transformers/optimization.py"
HF_WARMUP = "float(current_step) / float(max(1, warmup)) if current_step < warmup else "
PROGRESS = "float(current_step - warmup) / float(max(1, total_steps - warmup))"
STEPS = {"interval": "step", "epochs": 20, "steps_per_epoch": 100}  # a 2000-step run

CASES = [
    Case(
        "yolov5 one_cycle",
        "ultralytics/yolov5 utils/general.py",
        one_cycle(1, hyp["lrf"], epochs),
        "lambda x: ((1 - math.cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1",
        {"lrf": 0.01},
    ),
    Case(
        "yolov5 linear",
        "ultralytics/yolov5 train.py",
        lambda x: (1 - x / epochs) * (1.0 - hyp["lrf"]) + hyp["lrf"],
        "lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf",
        {"lrf": 0.01},
    ),
    Case(
        "ultralytics one_cycle",
        "ultralytics/ultralytics ultralytics/engine/trainer.py",
        one_cycle_ultralytics(1, 0.01, epochs),
        "lambda x: max((1 - math.cos(x * math.pi / steps)) / 2, 0) * (y2 - y1) + y1",
        {"y1": 1, "y2": 0.01, "steps": EPOCHS},
    ),
    Case(
        "ultralytics linear",
        "ultralytics/ultralytics ultralytics/engine/trainer.py",
        lambda x: max(1 - x / epochs, 0) * (1.0 - 0.01) + 0.01,
        "lambda x: max(1 - x / epochs, 0) * (1.0 - lrf) + lrf",
        {"lrf": 0.01},
    ),
    Case(
        "Yolo_v3 linear",
        "EricReno/Yolo_v3 utils/lr_scheduler.py",
        lambda x: (1 - x / 150) * (1.0 - 0.01) + 0.01,
        "lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf",
        {"lrf": 0.01},
        epochs=150,
    ),
    Case(
        "DREB-Net one_flat_cycle",
        "EEIC-Lab/DREB-Net lib/utils/general.py",
        one_flat_cycle(1, 0.05, 140),
        "lambda x: ((1 - math.cos((x - (steps // 2)) * math.pi / (steps // 2))) / 2) * (y2 - y1) + y1 if (x > (steps // 2)) else y1",
        {"y1": 1, "y2": 0.05, "steps": 140},
        epochs=140,
    ),
    Case(
        "transformers linear warm-up",
        HF,
        hf_linear(500, 2000),
        f"lambda current_step: {HF_WARMUP}max(0.0, float(total_steps - current_step) / float(max(1, total_steps - warmup)))",
        {"warmup": 500},
        **STEPS,
    ),
    Case(
        "transformers cosine warm-up",
        HF,
        hf_cosine(500, 2000),
        f"lambda current_step: {HF_WARMUP}max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * {PROGRESS})))",
        {"warmup": 500, "num_cycles": 0.5},
        **STEPS,
    ),
    Case(
        "transformers cosine hard restarts",
        HF,
        hf_cosine_hard_restarts(500, 2000, 3),
        f"lambda current_step: {HF_WARMUP}(0.0 if {PROGRESS} >= 1.0 else "
        f"max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * {PROGRESS}) % 1.0)))))",
        {"warmup": 500, "num_cycles": 3},
        **STEPS,
    ),
    Case(
        "transformers polynomial decay",
        HF,
        hf_polynomial(500, 1800, 0.1, 1e-7, 2.0),
        f"lambda current_step: {HF_WARMUP}(lr_end / lr_init if current_step > training_steps else "
        f"((lr_init - lr_end) * (1 - (current_step - warmup) / (training_steps - warmup)) ** power + lr_end) / lr_init)",
        {"warmup": 500, "training_steps": 1800, "lr_init": 0.1, "lr_end": 1e-7, "power": 2.0},
        **STEPS,
    ),
    Case(
        "transformers constant with warm-up",
        HF,
        hf_constant_with_warmup(500),
        "lambda current_step: float(current_step) / float(max(1.0, warmup)) if current_step < warmup else 1.0",
        {"warmup": 500},
        **STEPS,
    ),
    Case(
        "transformers inverse sqrt",
        HF,
        hf_inverse_sqrt(500),
        f"lambda current_step: {HF_WARMUP}1.0 / math.sqrt((current_step + timescale - warmup) / timescale)",
        {"warmup": 500, "timescale": 500},
        **STEPS,
    ),
    Case(
        "nanoGPT get_lr",
        "karpathy/nanoGPT train.py",
        nanogpt_get_lr,
        "lambda it: learning_rate * (it + 1) / (warmup_iters + 1) if it < warmup_iters else (min_lr if it > lr_decay_iters "
        "else min_lr + 0.5 * (1.0 + math.cos(math.pi * (it - warmup_iters) / (lr_decay_iters - warmup_iters))) * (learning_rate - min_lr))",
        {"learning_rate": 6e-4, "warmup_iters": 200, "lr_decay_iters": 5000, "min_lr": 6e-5},
        interval="step",
        epochs=60,
        steps_per_epoch=100,
        mode="absolute",
    ),
    Case(
        "GPT2-From-Scratch get_lr",
        "NoeFlandre/GPT2-From-Scratch src/utils/scheduler.py",
        gpt2_get_lr,
        "lambda it: max_lr * (it + 1) / warmup_steps if it < warmup_steps else (min_lr if it > max_steps else "
        "min_lr + (max_lr - min_lr) * (0.5 * (1 + math.cos(math.pi * ((it - warmup_steps) / (max_steps - warmup_steps))))))",
        {"max_lr": 6e-4, "min_lr": 6e-4 * 0.1, "warmup_steps": 10, "max_steps": 50},
        interval="step",
        epochs=2,
        steps_per_epoch=45,
        mode="absolute",
    ),
    Case(
        "provarun get_lr",
        "kimoyerr/provarun provarun/train_utils.py",
        lambda it: provarun_get_lr(it, 1500, 1e-3, 100),
        "lambda it: learning_rate * it / warmup_iters if it < warmup_iters else (learning_rate / 10 if it > total_steps "
        "else learning_rate / 10 + 0.5 * (1.0 + math.cos(math.pi * ((it - warmup_iters) / (total_steps - warmup_iters)))) "
        "* (learning_rate - learning_rate / 10))",
        {"learning_rate": 1e-3, "warmup_iters": 100},
        interval="step",
        epochs=15,
        steps_per_epoch=100,
        mode="absolute",
    ),
    Case(
        "cs336 get_cosine_lr",
        "stanford-cs336/spring2024-assignment4-data cs336-basics/cs336_basics/optimizer.py",
        lambda it: get_cosine_lr(it, 1e-3, 1e-5, 100, 1000),
        "lambda it: max_learning_rate * it / warmup_iters if it < warmup_iters else (min_learning_rate if it > cosine_cycle_iters "
        "else min_learning_rate + 0.5 * (1.0 + math.cos(math.pi * ((it - warmup_iters) / (cosine_cycle_iters - warmup_iters)))) "
        "* (max_learning_rate - min_learning_rate))",
        {"max_learning_rate": 1e-3, "min_learning_rate": 1e-5, "warmup_iters": 100, "cosine_cycle_iters": 1000},
        interval="step",
        epochs=12,
        steps_per_epoch=100,
        mode="absolute",
    ),
    Case(
        "noam rate",
        "nikitakapitan/transformers src/transformers/training/lr.py",
        lambda step: rate(step, 512, 1.0, 400),
        "lambda step: factor * (model_size ** (-0.5) * min(max(step, 1) ** (-0.5), max(step, 1) * warmup ** (-1.5)))",
        {"model_size": 512, "factor": 1.0, "warmup": 400},
        **STEPS,
    ),
    Case(
        "noam rate (my-transformer)",
        "alaneuler/my-transformer train/learning_rate.py",
        lambda step: rate_alaneuler(step, 256, 2.0, 300),
        "lambda step: factor * (model_size ** (-0.5) * min(max(step, 1) ** -0.5, max(step, 1) * warmup ** -1.5))",
        {"model_size": 256, "factor": 2.0, "warmup": 300},
        **STEPS,
    ),
    Case(
        "EnFormer warm-up poly",
        "HuangDLab/EnFormer scheduler/warmup_lr_scheduler.py",
        enformer(100, 20),
        "lambda x: warmup_factor * (1 - float(x) / (warmup_epochs * num_step)) + float(x) / (warmup_epochs * num_step) "
        "if x <= warmup_epochs * num_step else (1 - (x - warmup_epochs * num_step) / ((epochs - warmup_epochs) * num_step)) ** 0.9",
        {"warmup_factor": 1e-3, "warmup_epochs": 1, "num_step": 100},
        **STEPS,
    ),
    Case(
        "torchvision detection warm-up",
        "KeepTryingTo/DeepLearning ObjectDetection/YOLOx/YOLOv3/myYOLOv3-self/utiles/scheduler.py",
        warmup_lr(1000, 1.0 / 1000),
        "lambda x: 1 if x >= warmup_iters else warmup_factor * (1 - float(x) / warmup_iters) + float(x) / warmup_iters",
        {"warmup_iters": 1000, "warmup_factor": 1.0 / 1000},
        **STEPS,
    ),
    Case(
        "tbert warm-up",
        "innodatalabs/tbert tbert/optimization.py",
        tbert(2000, 200),
        "lambda step: step / warmup_steps if step <= warmup_steps else 1. - (total_steps - step) / (total_steps - warmup_steps)",
        {"warmup_steps": 200},
        **STEPS,
    ),
    Case(
        "FunASR CustomLambdaLR",
        "modelscope/FunASR funasr/schedulers/lambdalr_cus.py",
        funasr(300),
        "lambda last_epoch: min(last_epoch / warmup_steps, 1) if last_epoch < warmup_steps else 1",
        {"warmup_steps": 300},
        **STEPS,
    ),
    Case(
        "MedicalSeg poly_lr",
        "PaddleCV-SIG/MedicalSeg medicalseg/core/training/learning_rate/poly_lr.py",
        lambda epoch: poly_lr(epoch, 1000, 0.01),
        "lambda epoch: initial_lr * (1 - epoch / max_epochs) ** exponent",
        {"initial_lr": 0.01, "max_epochs": 1000, "exponent": 0.9},
        epochs=1000,
        mode="absolute",
    ),
    Case(
        "pfl-research polynomial decay",
        "apple/pfl-research benchmarks/utils/callback/pytorch.py",
        apple_polynomial(100, 2000, 0.1, 1e-7, 1.0),
        f"lambda current_step: {HF_WARMUP}(lr_end / lr_init if current_step > total_steps else "
        f"((lr_init - lr_end) * pow(1 - (current_step - warmup) / (total_steps - warmup), power) + lr_end) / lr_init)",
        {"warmup": 100, "lr_init": 0.1, "lr_end": 1e-7, "power": 1.0},
        **STEPS,
    ),
    Case(
        "Projet-MLA PolynomialDecayLR",
        "Gaelledumont/Projet-MLA training/schedulers.py",
        projet_mla,
        "lambda current_step: base_lr * current_step / warmup_steps if current_step < warmup_steps else "
        "(base_lr - end_learning_rate) * (1 - min(max((current_step - warmup_steps) / float(total_steps - warmup_steps), 0.0), 1.0)) "
        "** power + end_learning_rate",
        {"base_lr": 1e-3, "warmup_steps": 100, "end_learning_rate": 0.0, "power": 1.0},
        interval="step",
        epochs=10,
        steps_per_epoch=100,
        mode="absolute",
    ),
    Case(
        "PyTorch docs lambda1",
        "pytorch/pytorch torch/optim/lr_scheduler.py (LambdaLR docstring)",
        lambda epoch: epoch // 30,
        "lambda epoch: epoch // 30",
    ),
    Case(
        "PyTorch docs lambda2",
        "pytorch/pytorch torch/optim/lr_scheduler.py (LambdaLR docstring)",
        lambda epoch: 0.95**epoch,
        "lambda epoch: 0.95 ** epoch",
    ),
    Case(
        "Paddle docs LambdaDecay",
        "PaddlePaddle/docs docs/guides/model_convert/convert_from_pytorch/api_difference/"
        "optimizer/torch.optim.lr_scheduler.LambdaLR.md",
        lambda x: 0.95**x,
        "lambda x:0.95**x",
    ),
    Case(
        "Keras step_decay",
        "machinelearningmastery.com's Keras step_decay, as copied into Keras training scripts",
        step_decay,
        "lambda epoch: initial_lrate * math.pow(drop, math.floor((1+epoch)/epochs_drop))",
        {"initial_lrate": 0.001, "drop": 0.5, "epochs_drop": 20},
        epochs=200,
        mode="absolute",
    ),
    Case(
        "YOLOX warm cos",
        "Megvii-BaseDetection/YOLOX yolox/utils/lr_scheduler.py",
        lambda iters: yolox_warm_cos_lr(0.01, 0.0005, 2000, 150, 0.001, 300, iters),
        "lambda iters: (lr - warmup_lr_start) * pow(iters / float(warmup_total_iters), 2) + warmup_lr_start "
        "if iters <= warmup_total_iters else (min_lr if iters >= total_steps - no_aug_iter else min_lr + 0.5 * (lr - min_lr) "
        "* (1.0 + math.cos(math.pi * (iters - warmup_total_iters) / (total_steps - warmup_total_iters - no_aug_iter))))",
        {"lr": 0.01, "min_lr": 0.0005, "warmup_total_iters": 150, "warmup_lr_start": 0.001, "no_aug_iter": 300},
        interval="step",
        epochs=20,
        steps_per_epoch=100,
        mode="absolute",
    ),
    Case(
        "fairseq inverse_sqrt",
        "facebookresearch/fairseq fairseq/optim/lr_scheduler/inverse_square_root_schedule.py",
        fairseq_inverse_sqrt,
        "lambda num_updates: warmup_init_lr + num_updates * (lr - warmup_init_lr) / warmup_updates if num_updates < warmup_updates "
        "else lr * warmup_updates ** 0.5 * num_updates ** -0.5",
        {"lr": 5e-4, "warmup_updates": 4000, "warmup_init_lr": 1e-7},
        interval="step",
        epochs=100,
        steps_per_epoch=100,
        mode="absolute",
    ),
]


def test_the_corpus_is_large_enough_and_each_case_has_a_source():
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)
    assert all(case.source for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_real_lambda_gives_the_original_values_over_the_whole_run(case: Case):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    stepped_per_batch = case.interval == "step"
    total_scheduler_steps = case.epochs * (case.steps_per_epoch if stepped_per_batch else 1)
    scheduler = ExpressionLambdaLR(
        optimizer,
        case.expression,
        mode=case.mode,
        constants=case.constants,
        steps_per_epoch=case.steps_per_epoch,
        stepped_per_batch=stepped_per_batch,
        total_steps=total_scheduler_steps,
    )
    factor = scheduler.lr_lambdas[0]
    for count in range(total_scheduler_steps + 1):
        got, want = factor(count), case.original(count)
        assert got == want or math.isclose(got, want, rel_tol=1e-12), (count, got, want)
