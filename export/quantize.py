"""The int8 denoiser: static quantization of the denoiser's convolutions, and its parity check.

On a CPU the one denoiser evaluation of a purified scan is most of the
defense's time (edge bundle, 112 px, 2 cores: 9 of 12 ms). Its convolutions
run near the CPU's fp32 peak; what is left to gain is precision. This module
writes ``denoiser.int8.onnx``: every convolution quantized (QDQ format:
weights int8 per output channel, activations uint8 with a scale and zero
point per tensor), everything else (GroupNorm, GELU, the time embedding)
in fp32. The classifier and the detector are not quantized: a bundle's
``int8`` precision means this denoiser beside the fp32 classifier and
detector (:meth:`runtime.bundle.Bundle.file`).

Calibration (activation ranges, min-max) uses **validation** scans, noised
the way purification noises them: to a t* drawn from the bundle's
``[t_min, t_max]`` on its quantum, with fresh Gaussian noise. Test scans are
never seen by calibration.

Parity (:func:`int8_parity`) compares purification with the int8 denoiser
against fp32 on test scans with the *same* noise, and sets it beside the
purification's own randomness: fp32 against fp32 with other noise. The int8
denoiser is accepted when its purified images differ from fp32 by less than
a quarter of what another noise draw changes, and it flips fewer
predictions than another noise draw does (plus one).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from runtime import schedule

INT8_TOLERANCES = {"purified_vs_noise": 0.25, "extra_flips": 1}


def calibration_inputs(images: np.ndarray, abar: np.ndarray, t_min: int, t_max: int, quantum: int,
                       n: int = 64, seed: int = 0) -> list[dict]:
    """Denoiser inputs ``{"x_t", "t"}`` for ``n`` of ``images [N, S, S]`` (in [0, 1]) noised to t* in ``[t_min, t_max]``.

    ``abar`` is alpha-bar indexed by timestep (``abar[0] = 1``), as in
    :class:`runtime.pipeline.Pipeline`.
    """
    if len(images) == 0:
        raise ValueError("no scans to calibrate the int8 denoiser on")
    rng = np.random.default_rng(seed)
    steps = np.arange(t_min, t_max + 1, max(quantum, 1))
    feeds = []
    for i in rng.permutation(len(images))[: min(n, len(images))]:
        t = int(rng.choice(steps))
        x = images[i].astype(np.float32)[None, None]
        noise = rng.standard_normal(x.shape).astype(np.float32)
        feeds.append({"x_t": schedule.q_sample(x, t, noise, abar), "t": np.array([t], np.float32)})
    return feeds


def quantize_denoiser(src: Path, dst: Path, feeds: list[dict]) -> Path:
    """Write the int8 (QDQ) version of the fp32 denoiser graph ``src`` to ``dst``, calibrated on ``feeds``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    onnx.checker.check_model(onnx.load(str(dst)))
    return dst


class _Eps:
    """The one call :meth:`runtime.pipeline.Pipeline.purify` needs of an engine, on one ONNX session."""

    def __init__(self, session):
        self.session = session

    def eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x_t": x_t, "t": t})[0]


def _eps_abs_sums(p32, p8, xb: np.ndarray, t_star: int, noise: np.ndarray) -> tuple[float, float]:
    """The sums of ``|eps_int8 - eps_fp32|`` and of ``|eps_fp32|`` on ``xb`` noised to ``t_star`` with ``noise``."""
    h = schedule.q_sample(xb, t_star, noise, p32.abar)
    t = np.full(len(xb), t_star, np.float32)
    e32, e8 = p32.engine.eps(h, t), p8.engine.eps(h, t)
    return float(np.abs(e8 - e32).sum()), float(np.abs(e32).sum())


def _purify_three_ways(p32, p8, x: np.ndarray, t_star: int, rng) -> tuple[dict, dict, float]:
    """Purify ``x`` in batches of 16 with fp32 and int8 (the same noise) and with fp32 and another noise draw.

    Returns the purified images of each (``fp32``, ``int8``, ``other_noise``),
    the mean absolute difference of ``int8`` and ``other_noise`` to ``fp32``,
    and the relative error of the int8 epsilon.
    """
    diff = {"int8": [], "other_noise": []}
    pur = {"fp32": [], "int8": [], "other_noise": []}
    eps_num, eps_den = 0.0, 0.0
    for i in range(0, len(x), 16):
        xb = x[i : i + 16]
        noise = rng.standard_normal(xb.shape).astype(np.float32)
        other = rng.standard_normal(xb.shape).astype(np.float32)
        # The same generator state for fp32 and int8 (ancestral steps draw more noise), another one for the yardstick.
        same = int(rng.integers(2**31))
        a32 = p32.purify(xb, t_star, np.random.default_rng(same), noise=noise)
        a8 = p8.purify(xb, t_star, np.random.default_rng(same), noise=noise)
        ao = p32.purify(xb, t_star, np.random.default_rng(same + 1), noise=other)
        diff["int8"].append(np.abs(a8 - a32).mean(axis=(1, 2, 3)))
        diff["other_noise"].append(np.abs(ao - a32).mean(axis=(1, 2, 3)))
        pur["fp32"].append(a32)
        pur["int8"].append(a8)
        pur["other_noise"].append(ao)
        num, den = _eps_abs_sums(p32, p8, xb, t_star, noise)
        eps_num += num
        eps_den += den
    return pur, {k: float(np.concatenate(v).mean()) for k, v in diff.items()}, eps_num / max(eps_den, 1e-12)


def _int8_problems(res: dict) -> list[str]:
    """What in the parity record ``res`` is past :data:`INT8_TOLERANCES` (empty when it passes)."""
    problems = []
    limit = INT8_TOLERANCES["purified_vs_noise"] * res["purified_mean_abs_other_noise_vs_fp32"]
    if res["purified_mean_abs_int8_vs_fp32"] > limit:
        problems.append(f"int8 purified images differ from fp32 by {res['purified_mean_abs_int8_vs_fp32']:.4f} "
                        f"(mean abs), more than {INT8_TOLERANCES['purified_vs_noise']} of another noise draw's "
                        f"{res['purified_mean_abs_other_noise_vs_fp32']:.4f}")
    if res["prediction_flips_int8"] > res["prediction_flips_other_noise"] + INT8_TOLERANCES["extra_flips"]:
        problems.append(f"int8 purification flips {res['prediction_flips_int8']} predictions, another noise draw "
                        f"{res['prediction_flips_other_noise']}")
    return problems


def int8_parity(sessions: dict, images: np.ndarray, labels: np.ndarray, purify_cfg, t_star: int,
                seed: int = 0, check: bool = True) -> dict:
    """Purification with the int8 denoiser against fp32 on ``images [N, 1, S, S]``; raises ValueError past a tolerance.

    ``sessions`` holds ONNX Runtime sessions ``denoiser.fp32``, ``denoiser.int8``
    and ``classifier.fp32``. Every scan is purified at ``t_star`` three times:
    fp32 and int8 with the same noise, and fp32 with another noise draw (the
    purification's own randomness, the yardstick). Reported: the mean absolute
    difference of the purified images (int8 against fp32, and another noise
    against fp32), the relative error of epsilon, prediction flips of each
    against fp32, and the accuracy of each on ``labels``. ``check=False``
    only reports (``passed`` and ``problems`` in the record).
    """
    from runtime.pipeline import Pipeline

    p32 = Pipeline(_Eps(sessions["denoiser.fp32"]), purify_cfg)
    p8 = Pipeline(_Eps(sessions["denoiser.int8"]), purify_cfg)
    x = images.astype(np.float32)
    pur, diff, eps_rel = _purify_three_ways(p32, p8, x, t_star, np.random.default_rng(seed))
    clf = sessions["classifier.fp32"]
    pred = {k: np.concatenate([clf.run(None, {"image": a})[0].argmax(1) for a in v]) for k, v in pur.items()}
    labels = np.asarray(labels)
    res = {
        "n_scans": int(len(x)), "t_star": int(t_star),
        "purified_mean_abs_int8_vs_fp32": diff["int8"],
        "purified_mean_abs_other_noise_vs_fp32": diff["other_noise"],
        "eps_rel_error": eps_rel,
        "prediction_flips_int8": int((pred["int8"] != pred["fp32"]).sum()),
        "prediction_flips_other_noise": int((pred["other_noise"] != pred["fp32"]).sum()),
        "accuracy_fp32": float((pred["fp32"] == labels).mean()),
        "accuracy_int8": float((pred["int8"] == labels).mean()),
        "accuracy_other_noise": float((pred["other_noise"] == labels).mean()),
        "tolerances": dict(INT8_TOLERANCES),
    }
    problems = _int8_problems(res)
    res["passed"] = not problems
    if problems:
        res["problems"] = problems
        if check:
            raise ValueError("int8 parity check failed: " + "; ".join(problems))
    return res
