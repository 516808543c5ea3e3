"""Models by name for the harness: a small CNN and an MLP for the bundled digits (defined here), the
official UNSC code's models (``paper_models``) and MNIST-1D's reference models
(``mnist1d_models``).

``create_model(name, num_classes, input_shape)`` is the one place that turns a name and the
data's sample shape into a model, so every caller gets the right input channels and size.
"""
from __future__ import annotations

import math

from torch import nn

from unsc_fast.evaluation.mnist1d_models import MNIST1DCNN, MNIST1DMLP
from unsc_fast.evaluation.paper_models import AlexNet, AllCNN, ResNet18, VGG11


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """Three conv blocks and two Linear layers for (channels, 8, 8) inputs."""

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(channels, width),
            _conv_bn(width, width),
            nn.MaxPool2d(2),
            _conv_bn(width, 2 * width),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 4, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class DigitsMLP(nn.Module):
    """The issue-27 MLP for the 8x8 digits: flattened input -> 128 -> 64 -> classes (ReLU); any
    sample shape is flattened, so it also takes other small inputs."""

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: tuple[int, int] = (128, 64)) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden[0]),
            nn.ReLU(inplace=True),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(inplace=True),
            nn.Linear(hidden[1], num_classes),
        )

    def forward(self, x):
        return self.layers(x)


def _image(factory):
    """For models of (C, H, W) images; the image size is checked by the model itself."""
    def build(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        if len(input_shape) != 3:
            raise ValueError(f"this model takes (C, H, W) images, the data has samples of shape {input_shape}")
        return factory(num_classes, input_shape)
    return build


def _signal(factory):
    """For models of (C, L) signals such as MNIST-1D."""
    def build(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        if len(input_shape) != 2:
            raise ValueError(f"this model takes (C, L) signals, the data has samples of shape {input_shape}")
        return factory(num_classes, input_shape)
    return build


MODELS = {
    "digits_cnn": _image(lambda n, s: DigitsCNN(num_classes=n, channels=s[0])),
    "digits_mlp": lambda n, s: DigitsMLP(num_classes=n, in_features=math.prod(s)),
    "allcnn": _image(lambda n, s: AllCNN(num_classes=n, channels=s[0])),
    "vgg11": _image(lambda n, s: VGG11(num_classes=n, channels=s[0])),
    "alexnet": _image(lambda n, s: AlexNet(num_classes=n, channels=s[0], image_size=s[1])),
    "resnet18": _image(lambda n, s: ResNet18(num_classes=n, channels=s[0])),
    "mnist1d_cnn": _signal(lambda n, s: MNIST1DCNN(num_classes=n, channels=s[0], length=s[1])),
    "mnist1d_mlp": _signal(lambda n, s: MNIST1DMLP(num_classes=n, channels=s[0], length=s[1])),
}


def create_model(name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The model ``name`` for samples of ``input_shape`` ((C, H, W) or (C, L)) and ``num_classes``."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](num_classes, tuple(input_shape))
