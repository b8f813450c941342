"""``images:DIR``: a folder of images (searched recursively, sorted) as model input batches.

Each image is converted to the model's channel count (1: grayscale, 3: RGB), resized to the model's
static height and width (or ``size``), scaled to [0, 1], normalised with ``(x - mean) / std`` and
laid out NCHW or NHWC (from where the model's channel dimension sits, or ``layout``). Options ride on
the spec: ``images:DIR?size=224,224&mean=0.485,0.456,0.406&std=0.229,0.224,0.225&layout=nchw&resize=bilinear``.
Only one image is decoded at a time per batch slot: memory is one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from onnxfgq.calibration.sources import DataSourceError, InputSpec

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
RESAMPLING = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass(frozen=True)
class ImageOptions:
    size: tuple[int, int] | None = None  # (height, width); None: from the model
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = ""  # "nchw" | "nhwc"; "": from the model's input shape
    resize: str = "bilinear"

    @classmethod
    def parse(cls, query: str) -> ImageOptions:
        kwargs: dict = {}
        for key, values in parse_qs(query, strict_parsing=bool(query)).items():
            value = values[-1]
            try:
                if key == "size":
                    h, _, w = value.partition(",")
                    kwargs["size"] = (int(h), int(w or h))
                elif key in ("mean", "std"):
                    kwargs[key] = tuple(float(v) for v in value.split(","))
                elif key == "layout" and value.lower() in ("nchw", "nhwc"):
                    kwargs["layout"] = value.lower()
                elif key == "resize" and value.lower() in RESAMPLING:
                    kwargs["resize"] = value.lower()
                else:
                    raise ValueError
            except ValueError:
                raise DataSourceError(f"images: bad option {key}={value!r} (size=H,W mean=.. std=.. "
                                      f"layout=nchw|nhwc resize={'|'.join(RESAMPLING)})") from None
        return cls(**kwargs)


def _geometry(spec: InputSpec, opts: ImageOptions) -> tuple[str, int, tuple[int, int]]:
    """(layout, channels, (height, width)) for a rank-4 image input."""
    if len(spec.shape) != 4:
        raise DataSourceError(f"images: input {spec.name!r} has rank {len(spec.shape)}, not 4 (N, C, H, W)")
    dims = [d if isinstance(d, int) and d > 0 else None for d in spec.shape]
    layout = opts.layout or ("nhwc" if dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4) else "nchw")
    c, h, w = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
    size = opts.size or ((h, w) if h and w else None)
    if size is None:
        raise DataSourceError(f"images: input {spec.name!r} has no static height/width; pass ?size=H,W")
    return layout, c or 3, size


class ImageFolderReader:
    """Batches of preprocessed images for a single image input (ORT ``CalibrationDataReader``)."""

    def __init__(self, folder: Path, specs: list[InputSpec], *, options: ImageOptions = ImageOptions(),
                 num_samples: int | None = None, batch_size: int = 8):
        try:
            from PIL import Image
        except ImportError:
            raise DataSourceError("images:DIR needs Pillow (pip install pillow)") from None
        self._image = Image
        folder = Path(folder)
        if not folder.is_dir():
            raise DataSourceError(f"images:{folder}: no such folder")
        if len(specs) != 1:
            raise DataSourceError(f"images: the model has {len(specs)} inputs; images feed single-input models")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataSourceError(f"images:{folder}: no image files ({', '.join(EXTENSIONS)})")
        self.files = files[:num_samples] if num_samples else files
        self.spec, self.options, self.batch_size = specs[0], options, batch_size
        self.layout, self.channels, self.size = _geometry(self.spec, options)
        n = self.channels
        self.mean = np.resize(np.asarray(options.mean, np.float32), n)
        self.std = np.resize(np.asarray(options.std, np.float32), n)
        self._pos = 0

    def load(self, path: Path) -> np.ndarray:
        """One image as float32 HWC in the model's channel count, resized and normalised."""
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(self.channels)
        if mode is None:
            raise DataSourceError(f"images: {self.channels} channels are not an image")
        resample = getattr(self._image.Resampling, self.options.resize.upper())
        try:
            with self._image.open(path) as img:
                img = img.convert(mode).resize((self.size[1], self.size[0]), resample)
                x = np.asarray(img, dtype=np.float32) / 255.0
        except OSError as exc:
            raise DataSourceError(f"{path}: cannot read the image ({exc})") from None
        x = x.reshape(self.size[0], self.size[1], self.channels)
        return (x - self.mean) / self.std

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.files):
            return None
        chunk = self.files[self._pos:self._pos + self.batch_size]
        self._pos += len(chunk)
        batch = np.stack([self.load(p) for p in chunk])
        if self.layout == "nchw":
            batch = batch.transpose(0, 3, 1, 2)
        return {self.spec.name: np.ascontiguousarray(batch, dtype=self.spec.dtype)}

    def __len__(self) -> int:
        return len(self.files)


def open_images(spec: str, specs: list[InputSpec], *, num_samples: int | None, batch_size: int) -> ImageFolderReader:
    """Reader for ``images:DIR[?options]``."""
    folder, _, query = spec[len("images:"):].partition("?")
    return ImageFolderReader(Path(folder), specs, options=ImageOptions.parse(query), num_samples=num_samples,
                             batch_size=batch_size)
