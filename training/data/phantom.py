"""Synthetic axial brain-MRI phantoms: the embedded default data set.

Each phantom is one axial slice: a bright skull ring around a brain with
grey/white matter, cortical sulci, an interhemispheric fissure and two lateral
ventricles, on a black background. A scanner profile then applies a smooth
multiplicative bias field, a loss of resolution (blur), Rician noise and a
contrast gamma. Tumor phantoms add one lesion inside the brain, of varied
size, place, contrast and shape, with optional edema and ring enhancement.

Healthy and tumor phantoms are drawn from the same random stream: the lesion
parameters are drawn for every image, used or not, so anatomy, scanner effects
and noise have the same distribution in both classes and only the lesion
separates them. With the same generator state, the healthy and the tumor
version of an image differ only in and around the lesion.

All randomness comes from a passed ``np.random.Generator`` or an integer seed;
image ``i`` of ``generate(n, seed=s)`` uses a generator derived from ``(s, i)``
and so does not depend on ``n``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASS_NAMES = ("no", "yes")  # label 0 = healthy, 1 = tumor (Br35H folder names)


@dataclass(frozen=True)
class ScannerProfile:
    """How one scanner degrades the ideal slice.

    contrast: gamma applied to intensities in [0, 1] (> 1 darkens mid-tones).
    noise: Rician noise sigma, in [0, 1] intensity units.
    resolution: acquisition resolution factor in (0, 1]; the slice is
        downsampled by this factor and upsampled back (1 = no blur).
    bias: strength of the smooth multiplicative bias field (0 = none);
        the field is ``exp(bias * g)`` with ``g`` a smooth field in [-1, 1].
    """

    name: str
    contrast: float = 1.0
    noise: float = 0.03
    resolution: float = 1.0
    bias: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 < self.resolution <= 1.0:
            raise ValueError(f"resolution must be in (0, 1], got {self.resolution}")
        if self.contrast <= 0.0 or self.noise < 0.0 or self.bias < 0.0:
            raise ValueError(f"bad scanner profile {self}")


SCANNER_PROFILES: dict[str, ScannerProfile] = {
    "default": ScannerProfile("default", contrast=1.0, noise=0.03, resolution=1.0, bias=0.15),
    # sharp, clean, flat contrast (high-field scanner)
    "A": ScannerProfile("A", contrast=0.75, noise=0.015, resolution=1.0, bias=0.10),
    # noisy, somewhat blurred, strong gamma (low-field scanner)
    "B": ScannerProfile("B", contrast=1.35, noise=0.07, resolution=0.7, bias=0.25),
    # very blurred (thick slices / low matrix), moderate noise
    "C": ScannerProfile("C", contrast=1.0, noise=0.035, resolution=0.45, bias=0.20),
    # strong bias field (surface coil) and dark gamma
    "D": ScannerProfile("D", contrast=1.6, noise=0.03, resolution=0.85, bias=0.50),
}


# ----------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field [size, size] float32, zero mean, unit std.

    About ``cells`` blobs across the image: a (cells+1)^2 Gaussian grid,
    upsampled with bicubic interpolation.
    """
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    field -= field.mean()
    return field / (field.std() + 1e-6)


def _harmonics(rng: np.random.Generator, orders: range, amplitude: float) -> np.ndarray:
    """Random Fourier coefficients [orders.stop] complex, indexed by order k.

    c_k = a_k exp(i phi_k) for k in orders (zero below orders.start), with
    a_k ~ amplitude * U(0, 1) / k.
    """
    k = np.array(list(orders), dtype=np.float64)
    amp = amplitude * rng.uniform(0.0, 1.0, size=len(k)) / k
    phase = rng.uniform(0.0, 2.0 * math.pi, size=len(k))
    return np.concatenate([np.zeros(orders.start, np.complex64), amp * np.exp(1j * phase)])


def _radial_perturbation(z: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """1 + Re(sum_k c_k z^k) [H, W] float32, z = exp(i theta) [H, W] complex64.

    Equals 1 + sum_k a_k cos(k theta + phi_k); evaluated with Horner's rule
    (no trigonometry per pixel).
    """
    nz = int(np.flatnonzero(coeffs)[0]) if np.any(coeffs) else len(coeffs)
    if nz == len(coeffs):
        return np.ones(z.shape, np.float32)
    acc = np.full(z.shape, np.complex64(coeffs[-1]), dtype=np.complex64)
    for c in coeffs[-2 : nz - 1 : -1]:
        acc *= z
        acc += np.complex64(c)
    acc *= _zpow(z, nz) if nz else 1.0
    out = acc.real.copy()
    out += 1.0
    return out


def _inside(r: np.ndarray, radius: np.ndarray | float, width: float) -> np.ndarray:
    """Soft indicator of r < radius, linear ramp of ``width`` (same units as r)."""
    t = radius - r
    t *= 1.0 / width
    t += 0.5
    return np.clip(t, 0.0, 1.0, out=t)


def _rotate(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates [H, W] of (x, y) in a frame centred at (cx, cy), rotated by angle."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - cx, y - cy
    return dx * c + dy * s, dy * c - dx * s


def _ellipse_radius(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float
) -> np.ndarray:
    """Normalized elliptical radius [H, W]: 1 on the ellipse (centre, semi-axes a, b, angle)."""
    u, v = _rotate(x, y, cx, cy, angle)
    un, vn = u * (1.0 / a), v * (1.0 / b)
    return np.sqrt(un * un + vn * vn)


def _ellipse_polar(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Elliptical radius [H, W] float32 and unit phase z = exp(i theta) [H, W] complex64."""
    u, v = _rotate(x, y, cx, cy, angle)
    un, vn = u * (1.0 / a), v * (1.0 / b)
    r = np.sqrt(un * un + vn * vn)
    inv = 1.0 / np.maximum(r, 1e-6)
    z = np.empty(r.shape, np.complex64)
    z.real = un * inv
    z.imag = vn * inv
    return r, z


# ----------------------------------------------------------------------------
# anatomy and lesion parameters (drawn in a fixed order, always all of them)
# ----------------------------------------------------------------------------


def _tissue_levels(rng: np.random.Generator) -> dict[str, float]:
    """Intensities of the tissues, T1-like (60 %) or T2-like (40 %)."""
    t1 = rng.uniform() < 0.6
    jit = rng.uniform(-1.0, 1.0, size=5) * np.array([0.04, 0.04, 0.03, 0.06, 0.05])
    if t1:
        base = {"wm": 0.70, "gm": 0.48, "csf": 0.10, "skull": 0.88, "scalp": 0.55}
    else:
        base = {"wm": 0.42, "gm": 0.56, "csf": 0.90, "skull": 0.62, "scalp": 0.45}
    return {k: float(v + j) for (k, v), j in zip(base.items(), jit)}


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    """One uniform draw as a Python float (keeps float32 arrays float32)."""
    return float(rng.uniform(lo, hi))


def _anatomy_params(rng: np.random.Generator) -> dict:
    """Head geometry: position, size, rotation, skull, cortex, ventricles, levels."""
    p: dict = {}
    p["cx"], p["cy"] = _u(rng, -0.07, 0.07), _u(rng, -0.07, 0.07)
    p["b"] = _u(rng, 0.78, 0.92)  # vertical semi-axis (the image spans [-1, 1])
    p["a"] = p["b"] * _u(rng, 0.78, 0.90)
    p["angle"] = _u(rng, -0.2, 0.2)
    p["head_shape"] = _harmonics(rng, range(2, 6), 0.05)
    p["scalp"] = _u(rng, 0.015, 0.03)
    p["skull"] = _u(rng, 0.05, 0.09)  # thickness, fraction of the radius
    p["gap"] = _u(rng, 0.01, 0.025)  # CSF between skull and brain
    p["brain_shape"] = _harmonics(rng, range(3, 9), 0.04)
    p["n_gyri"] = int(rng.integers(22, 34))
    p["gyri_warp"] = _u(rng, 2.0, 3.5)
    p["sulcus_width"] = _u(rng, 0.06, 0.14)
    p["sulcus_depth"] = _u(rng, 0.15, 0.25)
    p["wm_depth"] = _u(rng, 0.62, 0.72)
    p["wm_finger"] = _u(rng, 0.10, 0.18)
    p["fissure"] = _u(rng, 0.010, 0.018)
    p["vent_scale"] = _u(rng, 0.6, 1.4)
    p["vent_dy"] = _u(rng, -0.10, 0.05)
    p["vent_dx"] = _u(rng, 0.07, 0.11)
    p["vent_tilt"] = _u(rng, 0.10, 0.35)
    p["vent_asym"] = (_u(rng, 0.85, 1.15), _u(rng, 0.85, 1.15))
    p["nuclei"] = _u(rng, 0.0, 1.0)  # visibility of the deep grey nuclei
    p["levels"] = _tissue_levels(rng)
    return p


def _lesion_params(rng: np.random.Generator) -> dict:
    """Lesion geometry and contrast, drawn for every image (used only for tumors)."""
    q: dict = {}
    q["diam"] = _u(rng, 0.2, 0.34)  # fraction of the brain diameter
    q["pos_r"] = math.sqrt(_u(rng, 0.0, 1.0))
    q["pos_t"] = _u(rng, 0.0, 2.0 * math.pi)
    q["aspect"] = _u(rng, 0.65, 1.0)
    q["angle"] = _u(rng, 0.0, math.pi)
    q["shape"] = _harmonics(rng, range(2, 7), _u(rng, 0.15, 0.45))
    q["sign"] = 1.0 if rng.uniform() < 0.5 else -1.0
    q["strength"] = _u(rng, 0.3, 0.5)
    q["texture"] = _u(rng, 0.0, 0.06)
    q["edema"] = bool(rng.uniform() < 0.45)
    q["edema_size"] = _u(rng, 1.4, 2.2)
    q["edema_strength"] = _u(rng, 0.15, 0.4)
    q["ring"] = bool(rng.uniform() < 0.3)
    q["ring_strength"] = _u(rng, 0.15, 0.35)
    q["core_strength"] = _u(rng, 0.2, 0.6)
    return q


# ----------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------


def _zpow(z: np.ndarray, n: int) -> np.ndarray:
    """z ** n [H, W] complex64 for integer n >= 1, by repeated squaring."""
    out, base = None, z
    while n:
        if n & 1:
            out = base if out is None else out * base
        n >>= 1
        if n:
            base = base * base
    return out


def _box(geo: dict, cu: float, cv: float, extent: float) -> tuple[slice, slice]:
    """Pixel (rows, cols) slices covering a disc of radius ``extent`` at (cu, cv).

    (cu, cv) and extent are in brain-normalized coordinates; lets small
    structures be rendered on a crop instead of the whole image.
    """
    c, s = math.cos(geo["angle"]), math.sin(geo["angle"])
    du, dv = cu * geo["ua"], cv * geo["vb"]
    xc, yc = geo["cx"] + du * c - dv * s, geo["cy"] + du * s + dv * c
    rad = extent * max(geo["ua"], geo["vb"])
    n = geo["size"]

    def span(centre: float) -> slice:
        lo = math.floor((centre - rad + 1.0) * n / 2.0) - 1
        hi = math.ceil((centre + rad + 1.0) * n / 2.0) + 1
        return slice(min(max(lo, 0), n), min(max(hi, 0), n))

    return span(yc), span(xc)


def _render_anatomy(
    p: dict, fields: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, dict]:
    """Ideal healthy slice [H, W] float32 and geometry (brain mask, brain coords).

    x, y: image coordinates [H, W] in [-1, 1] (x along columns, y down the rows).
    """
    lv = p["levels"]
    size = x.shape[0]
    r, z = _ellipse_polar(x, y, p["cx"], p["cy"], p["a"], p["b"], p["angle"])
    w = 2.4 / size / (0.5 * (p["a"] + p["b"]))  # soft-edge width (1.2 px) in units of r

    r_out = _radial_perturbation(z, p["head_shape"])
    r_skull = r_out - p["scalp"]
    r_inner = r_skull - p["skull"]
    r_brain = (r_inner - p["gap"]) * _radial_perturbation(z, p["brain_shape"])

    head = _inside(r, r_out, w)
    in_skull = _inside(r, r_skull, w)
    in_inner = _inside(r, r_inner, w)
    brain = _inside(r, r_brain, w)
    img = lv["scalp"] * (head - in_skull) + lv["skull"] * (in_skull - in_inner)
    img += lv["csf"] * (in_inner - brain)

    # brain-normalized coordinates: the brain edge is at radius ~1
    rb = r / r_brain
    brain_radius = 1.0 - p["scalp"] - p["skull"] - p["gap"]
    geo = {
        "brain": brain,
        "w": w,
        "size": size,
        "cx": p["cx"],
        "cy": p["cy"],
        "angle": p["angle"],
        "ua": p["a"] * brain_radius,
        "vb": p["b"] * brain_radius,
    }
    u, v = _rotate(x, y, p["cx"], p["cy"], p["angle"])
    geo["u"], geo["v"] = u * (1.0 / geo["ua"]), v * (1.0 / geo["vb"])

    # gyri: cos(n theta + warp), sulci at its maxima, white-matter fingers between
    zn = _zpow(z, p["n_gyri"])
    warp = p["gyri_warp"] * fields["warp"]
    gyri = zn.real * np.cos(warp) - zn.imag * np.sin(warp)
    sw = p["sulcus_width"]
    sulci = np.clip((gyri - (1.0 - sw)) * (1.0 / sw), 0.0, 1.0)
    depth = p["sulcus_depth"] * (1.0 + 0.6 * fields["depth"])
    sulci *= np.clip((rb - (1.0 - depth)) * 20.0, 0.0, 1.0)
    wm_edge = p["wm_depth"] + p["wm_finger"] * 0.5 * (1.0 - gyri) + 0.03 * fields["depth"]
    wm = _inside(rb, wm_edge, 3 * w)

    tissue = lv["gm"] + (lv["wm"] - lv["gm"]) * wm
    fissure = np.exp(-((geo["u"] * (1.0 / p["fissure"])) ** 2))
    fissure *= np.clip((np.abs(geo["v"]) - 0.5) * 5.0, 0.0, 1.0)
    tissue += (lv["csf"] - tissue) * np.maximum(sulci, fissure)
    _paint_centre(tissue, p, geo)
    tissue *= 1.0 + 0.025 * fields["texture"]

    img += tissue * brain
    return img, geo


def _paint_centre(tissue: np.ndarray, p: dict, geo: dict) -> None:
    """Paint deep grey nuclei and the lateral ventricles into tissue [H, W], in place."""
    rows, cols = _box(geo, 0.0, 0.0, 0.75)
    u, v = geo["u"][rows, cols], geo["v"][rows, cols]
    lv = p["levels"]
    crop = tissue[rows, cols]
    crop += (lv["gm"] - crop) * (p["nuclei"] * _nuclei(u, v))
    crop += (lv["csf"] - crop) * _ventricles(p, u, v, geo["w"])


def _nuclei(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Soft mask [h, w] of the deep grey nuclei (basal ganglia / thalami), both sides.

    u, v: brain-normalized coordinates [h, w].
    """
    out = np.zeros_like(u)
    for side in (-1.0, 1.0):
        r = _ellipse_radius(u, v, side * 0.24, 0.05, 0.10, 0.20, side * 0.3)
        out = np.maximum(out, _inside(r, 1.0, 0.5))
    return out


def _ventricles(p: dict, u: np.ndarray, v: np.ndarray, w: float) -> np.ndarray:
    """Soft mask [h, w] of two lateral ventricles, crescents near the centre.

    u, v: brain-normalized coordinates [h, w] (brain edge at radius ~1).
    """
    k = p["vent_scale"]
    mask = np.zeros_like(u)
    for side, asym in zip((-1.0, 1.0), p["vent_asym"]):
        cx, cy = side * p["vent_dx"] * k * asym, p["vent_dy"]
        a, b = 0.09 * k * asym, 0.24 * k * asym
        ang = -side * p["vent_tilt"]
        outer = _ellipse_radius(u, v, cx, cy, a, b, ang)
        # carve the outer side to make a crescent
        carve = _ellipse_radius(u, v, cx + side * a, cy + 0.1 * b, 0.8 * a, 0.75 * b, ang)
        ramp = 3 * w / a
        m = _inside(outer, 1.0, ramp) * (1.0 - _inside(carve, 1.0, ramp))
        mask = np.maximum(mask, m)
    return mask


def _render_lesion(
    img: np.ndarray, q: dict, geo: dict, lv: dict[str, float], tex: np.ndarray
) -> np.ndarray:
    """Slice [H, W] with a lesion (and optional edema / ring) painted in.

    tex: smooth texture field [H, W]; geo: from _render_anatomy.
    """
    radius = q["diam"]  # brain-normalized units (brain radius ~1)
    reach = 0.85 - 1.25 * radius
    cx = q["pos_r"] * reach * math.cos(q["pos_t"])
    cy = q["pos_r"] * reach * math.sin(q["pos_t"])
    halo_size = q["edema_size"] if q["edema"] else 1.0
    rows, cols = _box(geo, cx, cy, radius * (1.7 * halo_size + 0.4))
    u, v, brain = geo["u"][rows, cols], geo["v"][rows, cols], geo["brain"][rows, cols]

    rl, zl = _ellipse_polar(u, v, cx, cy, radius, radius * q["aspect"], q["angle"])
    rl = rl / _radial_perturbation(zl, q["shape"])  # irregular outline at rl = 1
    edge = max(2.0 * geo["w"] / radius, 0.15)

    out = img.copy()
    crop = out[rows, cols]
    if q["edema"]:
        halo = _inside(rl, q["edema_size"], 0.6) * brain
        crop += halo * q["edema_strength"] * (lv["csf"] - crop)

    core = _inside(rl, 1.0, edge) * brain
    target = 0.5 * (lv["gm"] + lv["wm"]) + q["sign"] * q["strength"]
    target = target + q["texture"] * tex[rows, cols]
    if q["ring"]:
        rim = np.exp(-(((rl - 0.8) * 5.0) ** 2))
        necrosis = _inside(rl, 0.6, 0.2)
        target = target + q["ring_strength"] * rim
        target = target + q["core_strength"] * necrosis * (lv["csf"] - target)
    crop += core * (target - crop)
    return out


def acquire(rng: np.random.Generator, img: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """Scanner effects on an ideal slice [H, W]: bias, blur, Rician noise, gamma."""
    size = img.shape[0]
    g = _smooth_field(rng, size, 2)
    g /= np.abs(g).max() + 1e-6
    gain = _u(rng, 0.85, 1.0)
    n1, n2 = rng.standard_normal((2, *img.shape), dtype=np.float32)

    g *= profile.bias
    x = img * np.exp(g, out=g)
    x *= gain
    if profile.resolution < 1.0:
        low = max(4, round(size * profile.resolution))
        x = cv2.resize(x, (low, low), interpolation=cv2.INTER_AREA)
        x = cv2.resize(x, (size, size), interpolation=cv2.INTER_CUBIC)
    s = profile.noise
    x = np.sqrt((x + s * n1) ** 2 + (s * n2) ** 2)
    x = np.clip(x, 0.0, 1.0, out=x)
    return x if profile.contrast == 1.0 else x**profile.contrast


def as_profile(profile: str | ScannerProfile) -> ScannerProfile:
    """Look a profile up by name (or pass one through)."""
    if isinstance(profile, ScannerProfile):
        return profile
    if profile not in SCANNER_PROFILES:
        raise ValueError(f"unknown scanner profile {profile!r}; known: {sorted(SCANNER_PROFILES)}")
    return SCANNER_PROFILES[profile]


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------


def make_phantom(
    rng: np.random.Generator, size: int, tumor: bool, profile: ScannerProfile
) -> np.ndarray:
    """One axial slice [size, size] float32 in [0, 1].

    The generator is consumed identically for tumor=True and tumor=False, so the
    same generator state yields the same head with and without the lesion.
    """
    p = _anatomy_params(rng)
    q = _lesion_params(rng)
    fields = {
        "warp": _smooth_field(rng, size, 8),
        "depth": _smooth_field(rng, size, 12),
        "texture": _smooth_field(rng, size, 28),
    }
    lesion_tex = _smooth_field(rng, size, 20)

    lin = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    x, y = np.meshgrid(lin, lin)  # x: columns, y: rows (down)
    img, geo = _render_anatomy(p, fields, x, y)
    if tumor:
        img = _render_lesion(img, q, geo, p["levels"], lesion_tex)
    return acquire(rng, np.clip(img, 0.0, 1.0), profile)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index`` of the data set with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def make_labels(n: int, seed: int = 0, tumor_fraction: float = 0.5) -> np.ndarray:
    """Labels [n] int64 with exactly round(n * tumor_fraction) ones, shuffled by seed."""
    if not 0.0 <= tumor_fraction <= 1.0:
        raise ValueError(f"tumor_fraction must be in [0, 1], got {tumor_fraction}")
    labels = np.zeros(n, dtype=np.int64)
    labels[: round(n * tumor_fraction)] = 1
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1ABE1]))
    return labels[rng.permutation(n)]


def generate(
    n: int,
    size: int = 112,
    seed: int = 0,
    profile: str | ScannerProfile = "default",
    tumor_fraction: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, size, size] float32 in [0, 1] and labels [n] int64 (1 = tumor).

    Image i is ``make_phantom(image_rng(seed, i), size, labels[i], profile)``:
    it does not depend on n (given its label).
    """
    prof = as_profile(profile)
    labels = make_labels(n, seed, tumor_fraction)
    images = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        images[i] = make_phantom(image_rng(seed, i), size, bool(labels[i]), prof)
    return images, labels


def profile_seed(seed: int, profile_index: int) -> int:
    """Seed used for the images of the ``profile_index``-th profile in write_dataset."""
    ss = np.random.SeedSequence([int(seed), int(profile_index), 0x9F0F11E])
    return int(ss.generate_state(1)[0])


def write_dataset(
    out_dir: str | Path,
    n: int,
    size: int = 256,
    seed: int = 0,
    profiles: tuple[str, ...] | list[str] = ("default",),
    progress: bool = True,
) -> dict:
    """Write n phantom PNGs as ``out_dir/{no,yes}/<profile>_<index>.png`` + phantoms.csv.

    Images are split evenly over the profiles; the images of the k-th profile
    are those of ``generate(n_k, size, profile_seed(seed, k), profile)``, and
    the CSV (path, label, profile, seed) records that seed. Paths in the CSV are
    relative to out_dir. Returns counts: {"no", "yes", "total", "per_profile"}.
    """
    if len(set(profiles)) != len(profiles):
        raise ValueError(f"profiles must be distinct, got {profiles}")
    out = Path(out_dir)
    for name in CLASS_NAMES:
        (out / name).mkdir(parents=True, exist_ok=True)
    sizes = [len(c) for c in np.array_split(np.arange(n), len(profiles))]
    jobs = []  # (profile name, profile seed, index, label)
    for k, (name, n_k) in enumerate(zip(profiles, sizes)):
        as_profile(name)
        s_k = profile_seed(seed, k)
        jobs += [(name, s_k, i, int(lab)) for i, lab in enumerate(make_labels(n_k, s_k))]

    it = jobs
    if progress:
        from tqdm import tqdm

        it = tqdm(jobs, desc=f"phantoms -> {out}", unit="img")
    rows = []
    counts = {"no": 0, "yes": 0, "total": 0, "per_profile": dict.fromkeys(profiles, 0)}
    for name, s_k, i, lab in it:
        img = make_phantom(image_rng(s_k, i), size, bool(lab), as_profile(name))
        rel = f"{CLASS_NAMES[lab]}/{name}_{i:06d}.png"
        if not cv2.imwrite(str(out / rel), np.round(img * 255.0).astype(np.uint8)):
            raise OSError(f"could not write {out / rel}")
        rows.append((rel, lab, name, s_k))
        counts[CLASS_NAMES[lab]] += 1
        counts["total"] += 1
        counts["per_profile"][name] += 1

    with open(out / "phantoms.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "profile", "seed"])
        writer.writerows(rows)
    return counts
