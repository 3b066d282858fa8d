"""Data plumbing: calibration batches from any loader (``batches``: ``iter_inputs``), and small labelled
data sets (``datasets``: scikit-learn digits, CIFAR-10, ``.npz`` arrays, image folders).

The library never knows where data lives: every loader takes the path its user gives it.
"""
from .batches import check_reiterable, count_samples, iter_inputs
from .datasets import (CIFAR10_MEAN, CIFAR10_STD, DATASET_KINDS, IMAGENET_MEAN, IMAGENET_STD, digits_dataset,
                       guess_dataset_kind, load_cifar10, load_dataset, load_image_folder, load_npz)

__all__ = [
    "iter_inputs", "check_reiterable", "count_samples", "digits_dataset", "load_image_folder", "load_cifar10",
    "load_npz", "load_dataset", "guess_dataset_kind", "DATASET_KINDS", "CIFAR10_MEAN", "CIFAR10_STD",
    "IMAGENET_MEAN", "IMAGENET_STD",
]
