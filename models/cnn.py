"""A small CNN with BatchNorm, trained here on real handwritten digits (scikit-learn's ``load_digits``:
1797 8x8 scans shipped inside the package), exported to ONNX with the BatchNormalization nodes kept.

    python -m models.cnn --out build/cnn [--opset 11]

writes ``model.onnx`` (``model_opset<N>.onnx`` for another opset), ``calib/*.npz`` (training images) and
``heldout/*.npz`` (images never seen in training; labels in ``heldout_labels.npy``), plus ``heldout_png/`` (the
same held-out digits as PNG files, for the ``images:DIR`` data source). Training is deterministic,
takes a few seconds on 2 CPU cores and is cached as ``weights.pt`` in the output folder.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
IMAGE_SIZE = 16  # the 8x8 scans are upsampled, which gives the convolutions some work to do
NUM_HELDOUT = 497
BATCH = 50  # samples per .npz file
SEED = 0
EPOCHS = 8
_VERSION = "cnn-v1"  # bump when the architecture or the training recipe changes (invalidates the cache)


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, heldout_x, heldout_y): float32 NCHW in [0, 1], a fixed shuffled split."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x.numpy().astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(y))
    held, train = order[:NUM_HELDOUT], order[NUM_HELDOUT:]
    return x[train], y[train], x[held], y[held]


def _network():
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class DigitNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = block(1, 16)
            self.conv2 = block(16, 32)
            self.pool = nn.MaxPool2d(2)  # 16 -> 8
            self.res = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
            self.conv3 = block(32, 32)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x):
            x = self.pool(self.conv2(self.stem(x)))
            x = torch.relu(x + self.res(x))  # a residual Add between quantized tensors
            x = nn.functional.avg_pool2d(self.conv3(x), 2)  # 8 -> 4
            return self.head(x)

    return DigitNet()


def _recipe_key() -> str:
    return hashlib.sha256(f"{_VERSION}:{IMAGE_SIZE}:{NUM_HELDOUT}:{SEED}:{EPOCHS}".encode()).hexdigest()[:16]


def train(out_dir: Path):
    """The trained network (eval mode), from ``out_dir/weights.pt`` when it matches this recipe."""
    import torch

    return train_cached(Path(out_dir), _recipe_key(), _network, _data, SEED, EPOCHS,
                        lambda params: torch.optim.Adam(params, lr=3e-3))


def train_cached(out_dir: Path, key: str, network, data, seed: int, epochs: int, optimizer):
    """``network()`` trained on ``data()``'s (x, y) with ``optimizer(params)``, cosine-annealed over
    ``epochs`` of seeded 64-sample batches; loaded from ``out_dir/weights.pt`` when saved under ``key``."""
    import torch

    cache = out_dir / "weights.pt"
    net = network()
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == key:
            net.load_state_dict(saved["state"])
            return net.eval()
    torch.manual_seed(seed)
    net = network()
    x, y, _, _ = data()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = optimizer(net.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=gen).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"key": key, "state": net.state_dict()}, tmp)
    tmp.replace(cache)
    return net


def heldout() -> tuple[np.ndarray, np.ndarray]:
    """Held-out images ``[N, 1, 16, 16]`` float32 and their labels (never used for training)."""
    _, _, x, y = _data()
    return x, y


def calibration() -> np.ndarray:
    """Training images, for calibration (disjoint from :func:`heldout`)."""
    x, _, _, _ = _data()
    return x


def _write_batches(folder: Path, x: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    for i in range(0, len(x), BATCH):
        np.savez(folder / f"{i // BATCH:04d}.npz", **{INPUT_NAME: x[i:i + BATCH]})


def _write_pngs(folder: Path, x: np.ndarray, y: np.ndarray) -> None:
    try:
        from PIL import Image
    except ImportError:  # Pillow is optional: only the images:DIR source needs it
        return
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(x, y)):
        Image.fromarray(np.round(img[0] * 255).clip(0, 255).astype(np.uint8), mode="L").save(
            folder / f"{i:04d}_{label}.png")


def export(out_dir: str | Path = Path("build/cnn"), opset: int = 13) -> Path:
    """Train (or load the cached weights), export to ONNX at ``opset`` and write the data files.

    Returns the model path: ``out_dir/model.onnx`` for opset 13, ``out_dir/model_opset<N>.onnx`` otherwise.
    """
    out_dir = Path(out_dir)
    path = out_dir / ("model.onnx" if opset == 13 else f"model_opset{opset}.onnx")
    return export_classifier(train(out_dir), path, IMAGE_SIZE, opset, heldout(), calibration)


def export_classifier(net, path: Path, image_size: int, opset: int, held: tuple[np.ndarray, np.ndarray],
                      calibration) -> Path:
    """``net`` exported to ``path`` (legacy exporter, BatchNormalization kept), and beside it the
    held-out batches, their labels and PNG copies, and the calibration batches (``calibration()``)."""
    import torch

    out_dir = path.parent
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        # do_constant_folding=False keeps BatchNormalization as its own node (folding is our job).
        torch.onnx.export(
            net, (torch.zeros(1, 1, image_size, image_size),), str(tmp), input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset, dynamo=False, do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
        )
    tmp.replace(path)
    hx, hy = held
    if not (out_dir / "heldout").is_dir():
        _write_batches(out_dir / "heldout", hx)
        np.save(out_dir / "heldout_labels.npy", hy)  # beside the folder: it must hold model inputs only
        _write_batches(out_dir / "calib", calibration())
    if not (out_dir / "heldout_png").is_dir():
        _write_pngs(out_dir / "heldout_png", hx, hy)
    return path


def export_main(doc: str, export_fn, heldout_fn, out: Path, opset: int) -> None:
    """A classifier module's command line: export it (``--out``, ``--opset``), print held-out accuracy."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--opset", type=int, default=opset)
    args = ap.parse_args()
    path = export_fn(args.out, args.opset)
    x, y = heldout_fn()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    acc = float((sess.run(None, {INPUT_NAME: x})[0].argmax(1) == y).mean())
    print(f"exported {path}; held-out accuracy {acc:.3f} on {len(y)} digits")


def main() -> None:
    export_main(__doc__, export, heldout, Path("build/cnn"), 13)


if __name__ == "__main__":
    main()
