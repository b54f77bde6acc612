"""The 15 common corruptions of Hendrycks & Dietterich (ICLR 2019) at 5 severities, on image batches.

Parameters are CIFAR-10-C's, as published in github.com/hendrycks/robustness,
``ImageNet-C/create_c/make_cifar_c.py``; docs/corruptions.md says where this implementation
differs (ImageMagick's motion blur re-implemented, a procedural frost texture instead of the
photos, sizes that were 32 pixels there scale with the image side here).

Each corruption takes a float batch (N, C, H, W) in [0, 1], a severity 1..5 and a numpy random
generator, and returns the corrupted batch in [0, 1]; the work is vectorised over the batch (glass
blur's pixel swaps are sequential by definition and loop over pixel positions, not examples; JPEG
is libjpeg's, one image at a time). :func:`corrupt` is the entry point: uint8 in, uint8 out (truncated as the original's
``np.uint8``), seeded, in fixed chunks so the result does not depend on any batch size.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from advmend.data.arrays import derive_seed
from advmend.errors import ConfigError, InputError
from advmend.registry import Registry

__all__ = ["CORRUPTIONS", "SEVERITIES", "check_corruption", "check_corruptions", "corrupt", "corruption_names"]

Corruption = Callable[[torch.Tensor, int, np.random.Generator], torch.Tensor]
CORRUPTIONS: Registry[Corruption] = Registry("corruption")
SEVERITIES = (1, 2, 3, 4, 5)
CHUNK = 128  # images corrupted per random draw: fixed, so results never depend on a batch size

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as cv2.COLOR_RGB2GRAY


def corruption_names() -> list[str]:
    """The 15 corruptions in the paper's order (noise, blur, weather, digital)."""
    return list(_ORDER)


def check_corruption(name: str, severity: int) -> None:
    """ConfigError for a corruption or severity that does not exist."""
    CORRUPTIONS.get(name)
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ConfigError(f"unknown corruption severity {severity!r}; choose one of: 1, 2, 3, 4, 5")


def check_corruptions(names: tuple[str, ...] | None, severities: tuple[int, ...], path: str = "eval") -> None:
    """ConfigError naming `path`.corruptions / `path`.severities for an unknown, repeated or empty choice."""
    for key, values, valid in (("corruptions", names, _ORDER), ("severities", severities, SEVERITIES)):
        if values is None and key == "corruptions":
            continue
        if not values:
            raise ConfigError(f"{path}.{key} must name at least one; choose from: {', '.join(map(str, valid))}")
        for v in values:
            if isinstance(v, bool) or v not in valid:
                kind = "corruption" if key == "corruptions" else "corruption severity"
                raise ConfigError(f"{path}.{key}: unknown {kind} {v!r}; choose from: {', '.join(map(str, valid))}")
        if len(set(values)) != len(values):
            raise ConfigError(f"{path}.{key} names one twice: {list(values)}")


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int) -> torch.Tensor:
    """`images` (uint8, N x C x H x W, CPU) under corruption `name` at `severity`, drawn from `seed`.

    The same (images, name, severity, seed) always give the same result; each (name, severity) has its
    own random stream.
    """
    check_corruption(name, severity)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise InputError(f"corrupt expects uint8 images (N, C, H, W), got {getattr(images, 'dtype', type(images))} "
                         f"shape {tuple(getattr(images, 'shape', ()))}")  # fmt: skip
    fn = CORRUPTIONS.get(name)
    out = torch.empty_like(images)
    tag = _ORDER.index(name)
    for start in range(0, images.shape[0], CHUNK):
        rng = np.random.default_rng(derive_seed(seed, tag, int(severity), start))
        x = images[start : start + CHUNK].float().div(255.0)
        y = fn(x, int(severity), rng)
        out[start : start + CHUNK] = y.clamp(0, 1).mul(255.0).to(torch.uint8)  # truncates, as np.uint8 does
    return out


# --------------------------------------------------------------------------- helpers


def _t(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(like.dtype)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma; a one-channel image is its own."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_GRAY, dtype=x.dtype).view(1, 3, 1, 1)
    return (x[:, :3] * w).sum(1, keepdim=True)


def _clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom into the centre by `factor` and keep the original size (scipy.ndimage.zoom order 1 of the
    central crop, whose corners map to corners: bilinear with align_corners)."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top : top + ch, left : left + cw]
    oh, ow = round(ch * factor), round(cw * factor)  # scipy's output size
    z = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=True) if (oh, ow) != (ch, cw) else crop
    tt, tl = (oh - h) // 2, (ow - w) // 2
    return z[..., tt : tt + h, tl : tl + w]


def _motion_blur(x: torch.Tensor, radius: int, sigma: float, angles: np.ndarray) -> torch.Tensor:
    """ImageMagick's MotionBlurImage (radius, sigma, angle in degrees per example): a one-sided Gaussian
    of 2 * radius + 1 taps along the angle, offsets rounded to pixels, edge pixels repeated."""
    n, _, h, w = x.shape
    width = 2 * radius + 1
    taps = np.arange(width, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    rad = np.deg2rad(angles)[:, None]  # (N, 1)
    dx = np.ceil(taps[None] * np.cos(rad) - 0.5).astype(np.int64)  # (N, width): columns
    dy = np.ceil(taps[None] * np.sin(rad) - 0.5).astype(np.int64)  # rows
    nidx = torch.arange(n)[:, None, None]
    rows0, cols0 = torch.arange(h), torch.arange(w)
    out = torch.zeros_like(x)
    for i in range(width):  # a few taps; every example and pixel at once
        rows = (rows0[None] + torch.from_numpy(dy[:, i])[:, None]).clamp(0, h - 1)  # (N, H)
        cols = (cols0[None] + torch.from_numpy(dx[:, i])[:, None]).clamp(0, w - 1)  # (N, W)
        shifted = x.permute(0, 2, 3, 1)[nidx, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
        out += float(kernel[i]) * shifted.permute(0, 3, 1, 2)
    return out


def _plasma(n: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size) diamond-square height maps in [0, 1] (the original's plasma_fractal, batched)."""
    m = np.zeros((n, size, size))
    step, wibble = size, 100.0

    def wibbled(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corner = m[:, 0:size:step, 0:size:step]
        square = corner + np.roll(corner, -1, axis=1)
        square += np.roll(square, -1, axis=2)
        m[:, half:size:step, half:size:step] = wibbled(square)
        dr = m[:, half:size:step, half:size:step]
        ul = m[:, 0:size:step, 0:size:step]
        m[:, 0:size:step, half:size:step] = wibbled(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2))
        m[:, half:size:step, 0:size:step] = wibbled(dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1))
        step //= 2
        wibble /= decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def _pow2(side: int) -> int:
    return 1 << max(1, math.ceil(math.log2(side)))


def _box_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PIL's BOX resampling from n_in to n_out pixels (its precompute_coeffs)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        pos = (np.arange(lo, hi) - center + 0.5) / filterscale
        wts = ((pos >= -0.5) & (pos < 0.5)).astype(np.float64)
        out[i, lo:hi] = wts / wts.sum() if wts.sum() else 0
    return out


def _box_resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    rows = _t(_box_matrix(x.shape[-2], h), x)
    cols = _t(_box_matrix(x.shape[-1], w), x)
    return torch.einsum("ij,ncjk,lk->ncil", rows, x, cols)


def ndimage():
    """scipy.ndimage (the `corruptions` extra), or a ConfigError saying how to install it."""
    try:
        from scipy import ndimage as nd  # lazy: only three corruptions need it
    except ImportError:
        raise ConfigError("the common corruptions need scipy: pip install 'advmend[corruptions]'") from None
    return nd


def _gaussian_np(a: np.ndarray, sigma: float, mode: str, truncate: float) -> np.ndarray:
    """scipy's Gaussian over the last two axes only (skimage.filters.gaussian of each image)."""
    if sigma <= 0:
        return a
    sig = (0,) * (a.ndim - 2) + (sigma, sigma)
    return ndimage().gaussian_filter(a, sigma=sig, mode=mode, truncate=truncate)


# --------------------------------------------------------------------------- noise


@CORRUPTIONS.register("gaussian_noise", family="noise")
def gaussian_noise(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    return (x + _t(rng.normal(size=x.shape, scale=c), x)).clamp(0, 1)


@CORRUPTIONS.register("shot_noise", family="noise")
def shot_noise(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    c = [500, 250, 100, 75, 50][severity - 1]
    return (_t(rng.poisson(x.double().numpy() * c), x) / c).clamp(0, 1)


@CORRUPTIONS.register("impulse_noise", family="noise")
def impulse_noise(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    # skimage's 's&p': each value independently becomes 0 or 1 (equally likely) with probability `amount`.
    c = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    hit = _t(rng.random(x.shape) < c, x).bool()
    salt = _t(rng.random(x.shape) < 0.5, x)
    return torch.where(hit, salt, x)


# --------------------------------------------------------------------------- blur


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """The original's anti-aliased disk kernel: a 17 x 17 (or wider) disk, blurred by cv2's 3 x 3
    Gaussian (reflect-101 borders), trimmed to its non-zero support."""
    correlate1d = ndimage().correlate1d
    r = np.arange(-8, 9) if radius <= 8 else np.arange(-math.ceil(radius), math.ceil(radius) + 1)
    xx, yy = np.meshgrid(r, r)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    size = 3 if radius <= 8 else 5
    taps = np.arange(size) - size // 2
    g = np.exp(-(taps**2) / (2 * alias_blur**2))
    g /= g.sum()
    disk = correlate1d(correlate1d(disk, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
    keep_r, keep_c = np.nonzero(disk.any(1))[0], np.nonzero(disk.any(0))[0]
    return disk[keep_r[0] : keep_r[-1] + 1, keep_c[0] : keep_c[-1] + 1]


@CORRUPTIONS.register("defocus_blur", family="blur")
def defocus_blur(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    k = _t(_disk(radius, alias), x)
    ph, pw = k.shape[0] // 2, k.shape[1] // 2
    c = x.shape[1]
    padded = F.pad(x, (pw, pw, ph, ph), mode="reflect") if (ph or pw) else x  # cv2's reflect-101
    return F.conv2d(padded, k.expand(c, 1, *k.shape), groups=c).clamp(0, 1)


@CORRUPTIONS.register("glass_blur", family="blur")
def glass_blur(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    sigma, delta, iterations = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][severity - 1]
    n, _, h, w = x.shape
    img = (_gaussian_np(x.double().numpy(), sigma, "nearest", 4.0) * 255).astype(np.uint8)
    img = np.ascontiguousarray(img.transpose(0, 2, 3, 1))  # (N, H, W, C): one pixel is one row to swap
    ar = np.arange(n)
    # The swaps are sequential (a pixel moved earlier can move again), so they loop over pixel positions,
    # bottom-right to top-left as published; every example of the batch swaps at once.
    for _ in range(iterations):
        for row in range(h - delta, delta, -1):
            offsets = rng.integers(-delta, delta, size=(w, n, 2))  # (dx, dy) per position and example
            for col in range(w - delta, delta, -1):
                dx, dy = offsets[col, :, 0], offsets[col, :, 1]
                r2, c2 = row + dy, col + dx
                here = img[ar, row, col].copy()
                img[ar, row, col] = img[ar, r2, c2]
                img[ar, r2, c2] = here
    out = _gaussian_np(img.transpose(0, 3, 1, 2) / 255.0, sigma, "nearest", 4.0)
    return _t(out, x).clamp(0, 1)


@CORRUPTIONS.register("motion_blur", family="blur")
def motion_blur(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]
    angles = rng.uniform(-45, 45, size=x.shape[0])
    blurred = _motion_blur(x, radius, sigma, angles)
    return blurred.mul(255).round().div(255)  # the original decodes an 8-bit PNG


@CORRUPTIONS.register("zoom_blur", family="blur")
def zoom_blur(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    top = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
    factors = np.arange(1, top, 0.01)  # as published (floating-point arange included)
    out = torch.zeros_like(x)
    for factor in factors:
        out += _clipped_zoom(x, float(factor))
    return ((x + out) / (len(factors) + 1)).clamp(0, 1)


# --------------------------------------------------------------------------- weather


@CORRUPTIONS.register("snow", family="weather")
def snow(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    loc, scale, zoom, threshold, radius, sigma, keep = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ][severity - 1]  # fmt: skip
    n, _, h, w = x.shape
    layer = _t(rng.normal(size=(n, 1, h, w), loc=loc, scale=scale), x)
    layer = _clipped_zoom(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    layer = layer.clamp(0, 1).mul(255).to(torch.uint8).to(x.dtype)  # the original's 8-bit PNG of the layer
    layer = _motion_blur(layer, radius, sigma, rng.uniform(-135, -45, size=n)).round() / 255
    x = keep * x + (1 - keep) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return (x + layer + layer.flip(-1, -2)).clamp(0, 1)


def frost_texture(n: int, channels: int, h: int, w: int, rng: np.random.Generator) -> torch.Tensor:
    """(n, channels, h, w) procedural frost in [0, 1]: a pale blue-white haze with thin bright crystal
    veins (the level lines of a fractal), standing in for the original's frost photographs."""
    size = _pow2(max(h, w))
    haze = _plasma(n, size, 2.0, rng)[:, :h, :w]
    veins = (1 - np.abs(2 * _plasma(n, size, 1.4, rng)[:, :h, :w] - 1)) ** 8
    tex = np.clip(0.3 + 0.35 * haze + 0.6 * veins, 0, 1)
    tint = np.array([0.85, 0.93, 1.0])[:channels] if channels == 3 else np.ones(channels)
    return torch.from_numpy(tex[:, None] * tint[None, :, None, None]).float()


@CORRUPTIONS.register("frost", family="weather")
def frost(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    keep, amount = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][severity - 1]
    n, c, h, w = x.shape
    return (keep * x + amount * frost_texture(n, c, h, w, rng).to(x.dtype)).clamp(0, 1)


@CORRUPTIONS.register("fog", family="weather")
def fog(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    amount, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]
    n, _, h, w = x.shape
    top = x.amax(dim=(1, 2, 3), keepdim=True)  # per image, as the original's x.max()
    layer = _t(_plasma(n, _pow2(max(h, w)), decay, rng)[:, None, :h, :w], x)
    return ((x + amount * layer) * top / (top + amount)).clamp(0, 1)


@CORRUPTIONS.register("brightness", family="weather")
def brightness(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    # HSV value + c with hue and saturation kept: every channel scales by V' / V (V = the channel max);
    # a black pixel (V = 0, saturation 0) becomes grey V'.
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(max=1)
    return torch.where(v > 0, x * v_new / v.clamp(min=1e-12), v_new.expand_as(x)).clamp(0, 1)


# --------------------------------------------------------------------------- digital


@CORRUPTIONS.register("contrast", family="digital")
def contrast(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    means = x.mean(dim=(2, 3), keepdim=True)
    return ((x - means) * c + means).clamp(0, 1)


@CORRUPTIONS.register("elastic_transform", family="digital")
def elastic_transform(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    side = min(h, w)  # 32 in the original
    alpha, sigma, affine = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                            (0.1, 0.03, 0.03)][severity - 1]  # fmt: skip
    alpha, sigma, affine = side * alpha, side * sigma, side * affine
    # Random affine: three points around the centre moved by up to `affine` pixels (cv2.getAffineTransform,
    # then warpAffine with reflect-101 borders: grid_sample 'reflection' with align_corners).
    centre = np.array([h // 2, w // 2], dtype=np.float64)
    sq = side // 3
    src = np.stack([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])  # (3, 2) as (x, y)
    dst = src[None] + rng.uniform(-affine, affine, size=(n, 3, 2))
    ones = np.ones((3, 1))
    forward = np.linalg.solve(np.hstack([src, ones])[None], dst)  # (N, 3, 2): [x y 1] @ M = dst
    mat = np.concatenate([forward.transpose(0, 2, 1), np.tile([[[0, 0, 1]]], (n, 1, 1))], axis=1)  # (N, 3, 3)
    inverse = np.linalg.inv(mat)  # the output pixel p reads the input at M^-1 p
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pts = np.stack([xs, ys, np.ones_like(xs)], -1).reshape(-1, 3).astype(np.float64)
    src_xy = np.einsum("nij,pj->npi", inverse, pts)[..., :2].reshape(n, h, w, 2)
    grid = src_xy / np.array([max(w - 1, 1), max(h - 1, 1)]) * 2 - 1
    warped = F.grid_sample(x, _t(grid, x), mode="bilinear", padding_mode="reflection", align_corners=True)
    # Elastic displacement: smoothed uniform noise (skimage gaussian, 'reflect', truncate 3) times alpha,
    # sampled by map_coordinates order 1 'reflect' (half-sample symmetric: grid_sample without align_corners).
    dx = _gaussian_np(rng.uniform(-1, 1, size=(n, h, w)), sigma, "reflect", 3.0) * alpha
    dy = _gaussian_np(rng.uniform(-1, 1, size=(n, h, w)), sigma, "reflect", 3.0) * alpha
    gx = (xs[None] + dx + 0.5) / w * 2 - 1
    gy = (ys[None] + dy + 0.5) / h * 2 - 1
    grid = np.stack([gx, gy], -1)
    out = F.grid_sample(warped, _t(grid, x), mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.clamp(0, 1)


@CORRUPTIONS.register("pixelate", family="digital")
def pixelate(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    h, w = x.shape[-2:]
    small = _box_resize(x, max(1, int(h * c)), max(1, int(w * c)))
    small = small.mul(255).round().div(255)  # PIL keeps 8 bits between the two resizes
    return _box_resize(small, h, w).clamp(0, 1)


@CORRUPTIONS.register("jpeg_compression", family="digital")
def jpeg_compression(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    from PIL import Image  # lazy: PIL only for this corruption

    quality = [80, 65, 58, 50, 40][severity - 1]
    arrays = x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.empty_like(arrays)
    # One libjpeg encode and decode per image: the codec works on single images.
    for k, arr in enumerate(arrays):
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, "JPEG", quality=quality)
        with Image.open(buf) as decoded:
            out[k] = np.asarray(decoded).reshape(arr.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(255)


_ORDER = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
