"""Helpers for the lesson notebooks, d2l / fastai style: `from course_utils import *` brings torch,
nn, the data makers and the display helpers into a notebook in one line.

Synthetic data only, so every lesson runs on a laptop's CPU in seconds. Plots need matplotlib; where
it is missing, they print a text summary instead (a training machine rarely has it).
"""
import random

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def set_seed(seed=0):
    """Seed Python's and torch's generators, as the lessons do before anything random."""
    random.seed(seed)
    torch.manual_seed(seed)


def make_blobs(n=512, seed=0):
    """Two Gaussian blobs in 2-D, labels 0 and 1: an easy classification problem."""
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    x0 = torch.randn(half, 2, generator=g) + torch.tensor([1.5, 1.5])
    x1 = torch.randn(n - half, 2, generator=g) - torch.tensor([1.5, 1.5])
    X = torch.cat([x0, x1])
    y = torch.cat([torch.zeros(half), torch.ones(n - half)]).long()
    return X, y


def accuracy(logits, y):
    """Fraction of rows whose largest logit is the label, rounded for display."""
    return round((logits.argmax(dim=1) == y).float().mean().item(), 4)


def show_batch(X, y, n=4):
    """Print the first n examples as a small table (fastai's show_batch, in text)."""
    print(" x0      x1      label")
    for row, label in zip(X[:n].tolist(), y[:n].tolist()):
        print(f"{row[0]:+.3f}  {row[1]:+.3f}  {label}")


def plot_losses(losses, title="training loss"):
    """A line plot of the losses, or one line of text where matplotlib is not installed."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{title}: " + " -> ".join(f"{v:.3f}" for v in losses))
        return
    plt.plot(losses)
    plt.title(title)
    plt.show()
