"""PyTorch reference models (optional: needs ``pip install -e '.[torch]'``).

Used by the converter tests and the PyTorch baseline benchmark, so it lives beside the
benchmarks, outside the installable package. ``torchvision`` is not needed (it cannot be installed beside
the CPU torch wheel this project pins): the modules below reproduce torchvision's ResNet
module tree and state-dict keys.
"""

from __future__ import annotations


def torch_resnet(depth: int, num_classes: int):
    """A torchvision-layout ResNet (same module and key names) with a ``features`` method."""
    import torch

    nn = torch.nn

    class Basic(nn.Module):
        expansion = 1

        def __init__(self, in_ch, width, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU()
            self.downsample = _projection(in_ch, width, stride)

        def forward(self, x):
            shortcut = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(y)) + shortcut)

    class Bottle(nn.Module):
        expansion = 4

        def __init__(self, in_ch, width, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(width * 4)
            self.relu = nn.ReLU()
            self.downsample = _projection(in_ch, width * 4, stride)

        def forward(self, x):
            shortcut = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            return self.relu(self.bn3(self.conv3(y)) + shortcut)

    def _projection(in_ch, out_ch, stride):
        if stride == 1 and in_ch == out_ch:
            return None
        return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    block = Bottle if depth >= 50 else Basic
    blocks_per_stage = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]

    class TorchResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            in_ch = 64
            for stage, (count, width) in enumerate(zip(blocks_per_stage, (64, 128, 256, 512), strict=True)):
                layers = []
                for index in range(count):
                    stride = 2 if stage > 0 and index == 0 else 1
                    layers.append(block(in_ch, width, stride))
                    in_ch = width * block.expansion
                setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(in_ch, num_classes)

        def features(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for stage in range(1, 5):
                x = getattr(self, f"layer{stage}")(x)
            return torch.flatten(self.avgpool(x), 1)

        def forward(self, x):
            return self.fc(self.features(x))

    return TorchResNet()
