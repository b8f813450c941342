"""A small MobileNetV2/V3-style classifier, trained here on real handwritten digits (scikit-learn's
``load_digits``, the 8x8 scans upsampled to 32x32), exported to ONNX with the BatchNormalization nodes kept.

    python -m models.mobilenet --out build/mobilenet [--opset 17]

The network is the kind of depthwise-separable stack static int8 finds hard: inverted residual blocks
(pointwise expand -> depthwise 3x3 -> pointwise project, a residual Add where the shapes match), ReLU6 in
the early blocks and HardSwish in the late ones (as MobileNetV3), global average pooling and a Linear head.
The output folder has the CNN's layout (models/cnn.py): ``model.onnx``, ``calib/*.npz`` (training
images), ``heldout/*.npz`` + ``heldout_labels.npy`` (never seen in training) and ``heldout_png/``.
Training is deterministic, takes well under a minute on 2 CPU cores and is cached as ``weights.pt``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from models.cnn import export_classifier, export_main, train_cached  # the same training loop and file layout

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
IMAGE_SIZE = 32  # large enough for two stride-2 stages and a 4x4 map before the pooling
NUM_HELDOUT = 497  # the CNN's split size
SEED = 0
EPOCHS = 12
OPSET = 17  # HardSwish needs 14; 17 is what current exporters default to
_VERSION = "mobilenet-v1"  # bump when the architecture or the training recipe changes (invalidates the cache)


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, heldout_x, heldout_y): float32 NCHW in [0, 1], a fixed shuffled split."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                        align_corners=False)
    x = x.numpy().astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(y))
    held, train = order[:NUM_HELDOUT], order[NUM_HELDOUT:]
    return x[train], y[train], x[held], y[held]


def _network():
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act=None) -> nn.Sequential:
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, expand: int, stride: int, act: type) -> None:
            super().__init__()
            mid = cin * expand
            self.body = nn.Sequential(
                conv_bn(cin, mid, 1, act=act),  # pointwise expand
                conv_bn(mid, mid, 3, stride, groups=mid, act=act),  # depthwise 3x3
                conv_bn(mid, cout, 1),  # pointwise project, linear (no activation) as in MobileNetV2
            )
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    class MobileNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                conv_bn(1, 16, 3, 2, act=nn.ReLU6),  # 32 -> 16
                InvertedResidual(16, 16, 2, 1, nn.ReLU6),
                InvertedResidual(16, 24, 4, 2, nn.ReLU6),  # 16 -> 8
                InvertedResidual(24, 24, 4, 1, nn.ReLU6),
                InvertedResidual(24, 32, 4, 2, nn.Hardswish),  # 8 -> 4
                InvertedResidual(32, 32, 4, 1, nn.Hardswish),
                conv_bn(32, 96, 1, act=nn.Hardswish),
            )
            self.head = nn.Linear(96, 10)

        def forward(self, x):
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    return MobileNet()


def _recipe_key() -> str:
    return hashlib.sha256(f"{_VERSION}:{IMAGE_SIZE}:{NUM_HELDOUT}:{SEED}:{EPOCHS}".encode()).hexdigest()[:16]


def train(out_dir: Path):
    """The trained network (eval mode), from ``out_dir/weights.pt`` when it matches this recipe."""
    import torch

    return train_cached(Path(out_dir), _recipe_key(), _network, _data, SEED, EPOCHS,
                        lambda params: torch.optim.AdamW(params, lr=5e-3, weight_decay=1e-4))


def heldout() -> tuple[np.ndarray, np.ndarray]:
    """Held-out images ``[N, 1, 32, 32]`` float32 and their labels (never used for training)."""
    _, _, x, y = _data()
    return x, y


def calibration() -> np.ndarray:
    """Training images, for calibration (disjoint from :func:`heldout`)."""
    x, _, _, _ = _data()
    return x


def export(out_dir: str | Path = Path("build/mobilenet"), opset: int = OPSET) -> Path:
    """Train (or load the cached weights), export to ONNX at ``opset`` and write the data files.

    Returns the model path: ``out_dir/model.onnx`` for the default opset, ``out_dir/model_opset<N>.onnx``
    otherwise.
    """
    out_dir = Path(out_dir)
    path = out_dir / ("model.onnx" if opset == OPSET else f"model_opset{opset}.onnx")
    return export_classifier(train(out_dir), path, IMAGE_SIZE, opset, heldout(), calibration)


def main() -> None:
    export_main(__doc__, export, heldout, Path("build/mobilenet"), OPSET)


if __name__ == "__main__":
    main()
