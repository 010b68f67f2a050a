"""Small models the tests score."""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViT(nn.Module):
    """ViT-shaped: conv patch embedding, LayerNorm + MLP blocks, mean-pooled tokens, linear head."""

    def __init__(self, image=8, patch=4, channels=3, dim=16, hidden=32, depth=2, classes=5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        x = self.blocks(x)
        return self.head(self.norm(x).mean(1))


def tiny_vit(seed: int = 0, dtype=torch.float32) -> TinyViT:
    torch.manual_seed(seed)
    return TinyViT().to(dtype)


def image_batches(seed: int = 0, count: int = 2, batch: int = 4, dtype=torch.float32, classes: int = 5):
    g = torch.Generator().manual_seed(seed + 1000)
    return [
        (torch.randn(batch, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(count)
    ]


def bias_free_net(seed: int = 0) -> nn.Module:
    """Conv and Linear layers without biases or normalization: SynFlow conserves flow layer by layer."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, bias=False, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10, bias=False),
        nn.ReLU(),
        nn.Linear(10, 3, bias=False),
    ).double()


class SmallCNN(nn.Module):
    """Conv → BatchNorm → ReLU twice, pooled, linear head; BatchNorm with non-trivial statistics."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def small_cnn(seed: int = 0, dtype=torch.float32) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN()
    for bn in (model.bn1, model.bn2):
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias, std=0.5)
        bn.running_mean.normal_(std=0.3)
        bn.running_var.uniform_(0.5, 2.0)
    return model.to(dtype)
