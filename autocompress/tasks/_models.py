"""Architectures of the built-in tasks."""

from __future__ import annotations

import torch
from torch import nn


class DigitsMLP(nn.Module):
    """64-300-100-10 multilayer perceptron (the LeNet-300-100 shape on 8x8 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class DigitsCNN(nn.Module):
    """Two conv blocks and two Linear layers on (B, 1, 8, 8) digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class Mnist1dCNN(nn.Module):
    """Three strided Conv1d layers and a Linear head on (B, 40) MNIST-1D signals."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        c = channels
        self.conv1 = nn.Conv1d(1, c, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(c)
        self.conv2 = nn.Conv1d(c, c, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm1d(c)
        self.conv3 = nn.Conv1d(c, c, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm1d(c)
        self.fc1 = nn.Linear(c * 10, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer encoder block (attention + feed-forward)."""

    def __init__(self, d: int = 32, heads: int = 4, ff: int = 64) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.ff2(torch.relu(self.ff1(self.ln2(x))))


class Mnist1dTransformer(nn.Module):
    """Patch projection + positional Embedding + 2 encoder blocks + Linear head on MNIST-1D."""

    def __init__(self, patch: int = 4, length: int = 40, d: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.tokens = length // patch
        self.proj = nn.Linear(patch, d)
        self.pos = nn.Embedding(self.tokens, d)
        self.blocks = nn.ModuleList([EncoderBlock(d, 4, 2 * d) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.reshape(x.shape[0], self.tokens, self.patch))
        x = x + self.pos(torch.arange(self.tokens, device=x.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x).mean(dim=1))
