"""Rendered text lines for the PP-OCRv5 recogniser (and its CTC decoding): real inputs made here.

    python -m models.text_lines --out build/ocr [--calib 64] [--heldout 200]

writes ``calib/*.png`` and ``heldout/*.png`` (disjoint seeds: calibration never sees a held-out line),
``heldout.txt`` (the text of each held-out line, one a line, in file order). Lines are words, numbers
and punctuation rendered with the DejaVu fonts installed here (sans, serif, mono, bold, oblique), black
or dark grey on light backgrounds, some with noise and a small blur, at 48 x 320 pixels: the
recogniser's own input geometry (PaddleOCR resizes to height 48 and pads the width).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 48, 320
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
         "DejaVuSerif-Bold.ttf", "DejaVuSansCondensed.ttf", "DejaVuSans-Oblique.ttf")
WORDS = ("the quick brown fox jumps over lazy dog invoice total amount date page section chapter "
         "model quantize runtime static integer float layer weight bias scale range error number "
         "street city order customer account payment receipt price tax from with and for report "
         "Monday March April London Paris Berlin Tokyo Python ONNX CPU OCR data table figure").split()
PUNCT = (",", ".", ":", "-", "/", "%", "$", "(", ")")
CALIB_SEED, HELDOUT_SEED = 1, 2
MEAN, STD = 0.5, 0.5  # PaddleOCR rec normalisation: (x / 255 - 0.5) / 0.5


def _text(rng: np.random.Generator) -> str:
    parts = []
    for _ in range(int(rng.integers(2, 6))):
        r = rng.random()
        if r < 0.2:
            parts.append(str(int(rng.integers(0, 100000))))
        elif r < 0.3:
            parts.append(f"{rng.integers(1, 31):02d}{PUNCT[int(rng.integers(0, len(PUNCT)))]}{rng.integers(1, 13):02d}")
        else:
            w = WORDS[int(rng.integers(0, len(WORDS)))]
            parts.append(w.capitalize() if rng.random() < 0.2 else w)
    return " ".join(parts)


def render(rng: np.random.Generator):
    """(PIL image 48 x 320 RGB, its text) for one random line that fits."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    while True:
        text = _text(rng)
        font = ImageFont.truetype(str(FONT_DIR / FONTS[int(rng.integers(0, len(FONTS)))]), int(rng.integers(24, 34)))
        left, top, right, bottom = font.getbbox(text)
        if right - left <= WIDTH - 12:
            break
    bg = int(rng.integers(200, 256))
    img = Image.new("RGB", (WIDTH, HEIGHT), (bg, bg, max(bg - int(rng.integers(0, 30)), 0)))
    ink = int(rng.integers(0, 70))
    x = int(rng.integers(2, max(3, WIDTH - (right - left) - 4)))
    y = (HEIGHT - (bottom - top)) // 2 - top + int(rng.integers(-2, 3))
    ImageDraw.Draw(img).text((x, y), text, fill=(ink, ink, ink), font=font)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8))))
    if rng.random() < 0.4:
        arr = np.asarray(img, np.float32) + rng.normal(0, 8, (HEIGHT, WIDTH, 1))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img, text


def write(out: Path, calib: int = 64, heldout: int = 200) -> Path:
    """Render the calibration and held-out lines into ``out`` (cached: kept when the counts match)."""
    out = Path(out)
    for sub, count, seed in (("calib", calib, CALIB_SEED), ("heldout", heldout, HELDOUT_SEED)):
        folder = out / sub
        if folder.is_dir() and len(list(folder.glob("*.png"))) == count \
                and (sub == "calib" or (out / "heldout.txt").exists()):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        rng = np.random.default_rng(seed)
        texts = []
        for i in range(count):
            img, text = render(rng)
            img.save(folder / f"{i:05d}.png")
            texts.append(text)
        if sub == "heldout":
            (out / "heldout.txt").write_text("\n".join(texts) + "\n")
    return out


def load_images(folder: Path) -> np.ndarray:
    """The PNGs of ``folder`` (sorted) as the recogniser's normalised NCHW float32 batch."""
    from PIL import Image

    arrs = [np.asarray(Image.open(p).convert("RGB"), np.float32) / 255.0 for p in sorted(Path(folder).glob("*.png"))]
    return ((np.stack(arrs) - MEAN) / STD).transpose(0, 3, 1, 2).copy()


def load_keys(path: Path) -> list[str]:
    """CTC alphabet, index 0 the blank. ocrspine's keys file already holds it ("blank", first line) and
    the space (last line); a plain PaddleOCR dictionary gets both added (its use_space_char)."""
    keys = Path(path).read_text(encoding="utf-8").split("\n")
    if keys and keys[-1] == "":
        keys = keys[:-1]
    if keys and keys[0] == "blank":
        return ["", *keys[1:]]
    return ["", *keys, " "]


def ctc_decode(probs: np.ndarray, keys: list[str]) -> list[str]:
    """Greedy CTC: argmax per step, merge repeats, drop blanks."""
    out = []
    for seq in probs.argmax(-1):
        chars, prev = [], -1
        for k in seq:
            if k != prev and k != 0 and k < len(keys):
                chars.append(keys[k])
            prev = k
        out.append("".join(chars))
    return out


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(predicted: list[str], truth: list[str]) -> float:
    """Character error rate: total edit distance over total reference characters."""
    return sum(edit_distance(p, t) for p, t in zip(predicted, truth)) / max(1, sum(len(t) for t in truth))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/ocr"))
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=200)
    args = ap.parse_args()
    print(write(args.out, args.calib, args.heldout))


if __name__ == "__main__":
    main()
