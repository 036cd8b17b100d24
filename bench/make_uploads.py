#!/usr/bin/env python3
"""Builds an upload-like evaluation set from a folder of aligned face crops
(`../shared/data/faces/test` by default): each picture re-made the way people
upload profile pictures, one folder per kind, plus pictures without a face.

    python bench/make_uploads.py [--src DIR] [--out DIR] [--seed N] [--no-face N] [--hard]

Every folder is in the seed layout (`<userid>.<ext>` plus `profile.csv` with
`userid,gender,age,race`); pictures without a face have gender `none`. Run
`profile-trainer eval --data OUT/<kind>` on each, or `bench/eval_uploads.sh`.
Needs Pillow and numpy. Deterministic for a given seed.
"""
import argparse
import csv
import io
import math
import os
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

FONTS = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
]


def font(size):
    for f in FONTS:
        if os.path.exists(f):
            return ImageFont.truetype(f, size)
    return ImageFont.load_default()


def rand_colour(r):
    return tuple(r.randrange(256) for _ in range(3))


def gradient(r, w, h):
    a, b = np.array(rand_colour(r), float), np.array(rand_colour(r), float)
    t = np.linspace(0, 1, w if r.random() < 0.5 else h)
    line = a[None, :] * (1 - t[:, None]) + b[None, :] * t[:, None]
    if len(t) == w:
        arr = np.repeat(line[None, :, :], h, axis=0)
    else:
        arr = np.repeat(line[:, None, :], w, axis=1)
    return Image.fromarray(arr.astype(np.uint8))


def background(r, w, h):
    """A plausible non-face background: gradient, noise, texture or a scene."""
    kind = r.choice(["gradient", "noise", "stripes", "scene", "blur_noise"])
    if kind == "gradient":
        return gradient(r, w, h)
    if kind == "noise":
        arr = np.random.default_rng(r.randrange(1 << 30)).integers(0, 256, (h, w, 3))
        return Image.fromarray(arr.astype(np.uint8))
    if kind == "blur_noise":
        arr = np.random.default_rng(r.randrange(1 << 30)).integers(0, 256, (h // 8 + 1, w // 8 + 1, 3))
        return Image.fromarray(arr.astype(np.uint8)).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(4))
    if kind == "stripes":
        img = Image.new("RGB", (w, h), rand_colour(r))
        d = ImageDraw.Draw(img)
        step = r.randrange(8, 40)
        c = rand_colour(r)
        for x in range(-h, w, step * 2):
            d.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=c)
        return img
    return scene(r, w, h)


def scene(r, w, h):
    """A simple landscape: sky, ground, sun, hills, a house or trees."""
    img = gradient(r, w, h)
    d = ImageDraw.Draw(img)
    horizon = int(h * r.uniform(0.45, 0.75))
    d.rectangle([0, horizon, w, h], fill=(r.randrange(40, 120), r.randrange(90, 180), r.randrange(20, 90)))
    for _ in range(r.randrange(1, 4)):
        cx, rad = r.randrange(w), r.randrange(w // 6, w // 2)
        d.ellipse([cx - rad, horizon - rad // 2, cx + rad, horizon + rad // 2], fill=rand_colour(r))
    if r.random() < 0.6:
        s = r.randrange(h // 12, h // 6)
        x, y = r.randrange(w), r.randrange(horizon // 2)
        d.ellipse([x - s, y - s, x + s, y + s], fill=(250, r.randrange(180, 250), 60))
    if r.random() < 0.5:
        bw = r.randrange(w // 6, w // 3)
        x = r.randrange(0, max(1, w - bw))
        d.rectangle([x, horizon - bw, x + bw, horizon], fill=rand_colour(r))
        d.polygon([(x - 10, horizon - bw), (x + bw // 2, horizon - bw - bw // 2), (x + bw + 10, horizon - bw)], fill=rand_colour(r))
    for _ in range(r.randrange(0, 5)):
        x = r.randrange(w)
        th = r.randrange(h // 10, h // 4)
        d.rectangle([x - 4, horizon - th, x + 4, horizon], fill=(90, 60, 30))
        d.ellipse([x - th // 3, horizon - th - th // 3, x + th // 3, horizon - th + th // 4], fill=(30, r.randrange(100, 170), 40))
    return img


def no_face(r, i):
    """A picture without a face: logo or text, flat colour, gradient, pattern, noise, scene."""
    side = r.choice([96, 128, 200, 256, 400, 512])
    w, h = side, int(side * r.choice([1.0, 1.0, 0.75, 1.33]))
    kind = ["logo", "flat", "gradient", "pattern", "noise", "scene", "avatar"][i % 7]
    if kind == "flat":
        return Image.new("RGB", (w, h), rand_colour(r)), kind
    if kind == "gradient":
        return gradient(r, w, h), kind
    if kind == "noise":
        return background(r, w, h) if r.random() < 0.3 else Image.fromarray(
            np.random.default_rng(r.randrange(1 << 30)).integers(0, 256, (h, w, 3)).astype(np.uint8)), kind
    if kind == "scene":
        return scene(r, w, h), kind
    if kind == "pattern":
        img = Image.new("RGB", (w, h), rand_colour(r))
        d = ImageDraw.Draw(img)
        step, c = r.randrange(6, 50), rand_colour(r)
        style = r.randrange(3)
        for y in range(0, h, step):
            for x in range(0, w, step):
                if style == 0 and (x // step + y // step) % 2 == 0:
                    d.rectangle([x, y, x + step, y + step], fill=c)
                elif style == 1:
                    d.ellipse([x + 2, y + 2, x + step - 2, y + step - 2], fill=c)
                elif style == 2 and (y // step) % 2 == 0:
                    d.rectangle([0, y, w, y + step // 2], fill=c)
        return img, kind
    if kind == "avatar":
        # The grey default avatar silhouette many sites show: head and shoulders, no face.
        bg = r.choice([(200, 200, 200), (220, 225, 230), rand_colour(r)])
        img = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(img)
        fg = tuple(max(0, c - 60) for c in bg)
        d.ellipse([w * 0.32, h * 0.18, w * 0.68, h * 0.54], fill=fg)
        d.ellipse([w * 0.15, h * 0.6, w * 0.85, h * 1.3], fill=fg)
        return img, kind
    img = Image.new("RGB", (w, h), rand_colour(r))
    d = ImageDraw.Draw(img)
    for _ in range(r.randrange(1, 4)):
        x0, y0 = r.randrange(w), r.randrange(h)
        s = r.randrange(side // 8, side // 2)
        shape = r.randrange(3)
        if shape == 0:
            d.ellipse([x0, y0, x0 + s, y0 + s], fill=rand_colour(r))
        elif shape == 1:
            d.rectangle([x0, y0, x0 + s, y0 + s // 2], fill=rand_colour(r))
        else:
            d.polygon([(x0, y0), (x0 + s, y0), (x0 + s // 2, y0 - s)], fill=rand_colour(r))
    word = "".join(r.choice("ABCDEFGHKMNPRSTWXZ") for _ in range(r.randrange(2, 7)))
    d.text((w * 0.1, h * r.uniform(0.3, 0.6)), word, fill=rand_colour(r), font=font(max(10, side // 6)))
    return img, kind


# Each kind's parameters: the default set, and `--hard`, the same kinds pushed
# further (smaller and further-off faces, stronger rotation, darker, smaller
# and more compressed), to see how the pipeline holds up beyond the default.
PARAMS = {
    False: dict(offcentre=(0.35, 0.6), loose=(0.6, 0.8), tight=(0.72, 0.88), rotated=(10, 25, 0.55, 0.75),
                gamma=(1.2, 1.8), gain=(0.3, 0.55), tiny=(40, 80, 8, 25), large=(900, 1600, 0.5, 0.8),
                webp=(0.5, 0.9, 50, 85), jpeg=(70, 95)),
    True: dict(offcentre=(0.22, 0.4), loose=(0.45, 0.65), tight=(0.62, 0.78), rotated=(20, 35, 0.45, 0.65),
               gamma=(1.5, 2.2), gain=(0.2, 0.4), tiny=(30, 56, 5, 18), large=(1400, 2000, 0.35, 0.6),
               webp=(0.4, 0.8, 25, 50), jpeg=(40, 75)),
}


def save(img, path_stem, fmt, r, p):
    if fmt == "jpg":
        img.save(path_stem + ".jpg", quality=r.randrange(*p["jpeg"]))
        return ".jpg"
    if fmt == "png":
        img.save(path_stem + ".png")
        return ".png"
    if fmt == "webp":
        img.save(path_stem + ".webp", quality=r.randrange(*p["webp"][2:]))
        return ".webp"
    raise ValueError(fmt)


def place(face, r, frac_lo, frac_hi, centred=False):
    """The face crop taking `frac` of a larger picture's side, on a background."""
    frac = r.uniform(frac_lo, frac_hi)
    side = r.randrange(300, 720)
    w = side
    h = int(side * r.choice([1.0, 1.0, 1.25, 0.8]))
    fs = int(min(w, h) * frac)
    canvas = background(r, w, h)
    f = face.resize((fs, fs), Image.BICUBIC)
    if centred:
        x, y = (w - fs) // 2, (h - fs) // 2
    else:
        x, y = r.randrange(0, max(1, w - fs)), r.randrange(0, max(1, h - fs))
    # Feather the edge so the paste has no hard frame.
    mask = Image.new("L", (fs, fs), 0)
    ImageDraw.Draw(mask).rectangle([fs // 12, fs // 12, fs - fs // 12, fs - fs // 12], fill=255)
    canvas.paste(f, (x, y), mask.filter(ImageFilter.GaussianBlur(fs // 24 + 1)))
    return canvas


def shrunk(img, r, p):
    """`img` made small (its longer side drawn from the `tiny` range) and
    over-compressed, as a small upload is."""
    slo, shi, qlo, qhi = p["tiny"]
    s = r.randrange(slo, shi)
    w, h = img.size
    k = s / max(w, h)
    small = img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=r.randrange(qlo, qhi))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def variant(kind, face, r, p):
    """(picture, format) for one kind of upload, with the parameters `p`."""
    if kind == "aligned":
        return face, "jpg"
    if kind == "offcentre":
        return place(face, r, *p["offcentre"]), "jpg"
    if kind == "loose":
        return place(face, r, *p["loose"], centred=True), "jpg"
    if kind == "tight":
        k = r.uniform(*p["tight"])
        s = face.size[0]
        c = int(s * k)
        x = r.randrange(0, s - c + 1)
        y = r.randrange(0, s - c + 1)
        return face.crop((x, y, x + c, y + c)).resize((s, s), Image.BICUBIC), "jpg"
    if kind == "rotated":
        lo, hi, flo, fhi = p["rotated"]
        angle = r.choice([-1, 1]) * r.uniform(lo, hi)
        big = place(face, r, flo, fhi, centred=True)
        return big.rotate(angle, resample=Image.BICUBIC, fillcolor=rand_colour(r)), "jpg"
    if kind == "grey":
        return ImageOps.grayscale(face).convert("RGB"), "jpg"
    if kind == "dim":
        arr = np.asarray(face, float) / 255.0
        arr = (arr ** r.uniform(*p["gamma"])) * r.uniform(*p["gain"])
        return Image.fromarray((arr * 255).clip(0, 255).astype(np.uint8)), "jpg"
    if kind == "tiny":
        return shrunk(face, r, p), "jpg"
    if kind == "large_png":
        slo, shi, flo, fhi = p["large"]
        s = r.randrange(slo, shi)
        return place(face, r, flo, fhi).resize((s, s), Image.BICUBIC), "png"
    if kind == "webp":
        flo, fhi, _, _ = p["webp"]
        return place(face, r, flo, fhi, centred=r.random() < 0.5), "webp"
    raise ValueError(kind)


KINDS = ["aligned", "offcentre", "loose", "tight", "rotated", "grey", "dim", "tiny", "large_png", "webp"]
# Pictures without a face: at their own sizes (96-512 pixels), and the same
# kinds made small and over-compressed the way the `tiny` kind is.
NO_FACE_KINDS = ["noface", "noface_small"]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=os.path.join(here, "../../shared/data/faces/test"))
    ap.add_argument("--out", default=os.path.join(here, "../target/uploads"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-face", type=int, default=350, help="pictures without a face")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N faces (0: all)")
    ap.add_argument("--hard", action="store_true", help="the same kinds, pushed further (see PARAMS)")
    ap.add_argument("--kinds", default=",".join(KINDS + NO_FACE_KINDS), help="comma-separated kinds to (re)make")
    a = ap.parse_args()
    params = PARAMS[a.hard]
    with open(os.path.join(a.src, "profile.csv")) as f:
        rows = list(csv.DictReader(f))
    if a.limit:
        rows = rows[: a.limit]
    kinds = a.kinds.split(",")
    for kind in [k for k in KINDS if k in kinds]:
        r = random.Random(f"{a.seed}/{kind}")
        np.random.seed(r.randrange(1 << 30))
        out = os.path.join(a.out, kind)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "profile.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["userid", "gender", "age", "race"])
            for row in rows:
                face = Image.open(os.path.join(a.src, row["userid"] + ".jpg")).convert("RGB")
                img, fmt = variant(kind, face, r, params)
                save(img, os.path.join(out, row["userid"]), fmt, r, params)
                w.writerow([row["userid"], row["gender"], row.get("age", ""), row.get("race", "")])
        print(f"{kind}: {len(rows)} pictures in {out}")
    for name in [k for k in NO_FACE_KINDS if k in kinds]:
        r = random.Random(f"{a.seed}/{name}")
        out = os.path.join(a.out, name)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "profile.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["userid", "gender", "age", "race", "kind"])
            for i in range(a.no_face):
                img, kind = no_face(r, i)
                uid = f"{name}{i:04d}"
                if name == "noface_small":
                    img, fmt = shrunk(img, r, params), "jpg"
                else:
                    fmt = r.choice(["jpg", "jpg", "png", "webp"])
                save(img, os.path.join(out, uid), fmt, r, params)
                w.writerow([uid, "none", "", "", kind])
        print(f"{name}: {a.no_face} pictures in {out}")


if __name__ == "__main__":
    main()
