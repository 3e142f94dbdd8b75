"""The PyTorch reference engine (``--engine torch``): the only runtime module that imports torch."""

from __future__ import annotations

import numpy as np

from runtime.bundle import Bundle, BundleError
from runtime.engines import FP32_GRAPHS, GRAPHS, EngineError


class TorchEngine:
    """The PyTorch reference: the bundle's ``*.pt2`` graphs (``torch.export``), no training code needed.

    With ``precision="fp16"`` the classifier and the denoiser run in float16;
    the detector and the ood graph (``FP32_GRAPHS``) stay float32, as in the
    exported fp16 bundle and the other engines.
    """

    def __init__(self, bundle: Bundle, device: str = "cpu", precision: str = "fp32"):
        try:
            import torch
        except ImportError as err:
            raise EngineError(f"--engine torch needs PyTorch installed: {err}") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("--device cuda: torch sees no CUDA device")
        self.torch, self.device = torch, torch.device(device)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32  # the classifier's and the denoiser's
        self.dtypes = {g: torch.float32 if g in FP32_GRAPHS else self.dtype for g in GRAPHS}
        self.graphs = {}
        for g in GRAPHS:
            name = f"{g}.pt2"
            if name not in bundle.manifest["files"]:
                raise BundleError(f"{bundle.path}: the bundle has no {name} for the torch engine")
            self.graphs[g] = torch.export.load(str(bundle.path / name)).module().to(self.device, self.dtypes[g])
        self.precision = precision

    def _run(self, g: str, *arrays: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.dtypes[g]) for a in arrays]
            return self.graphs[g](*args).float().cpu().numpy()

    def classify(self, x):
        return self._run("classifier", x)

    def score(self, x):
        return self._run("detector", x)

    def eps(self, x_t, t):
        return self._run("denoiser", x_t, t)

    def ood(self, x):
        return self._run("ood", x)

    def describe(self) -> dict:
        return {"engine": "torch", "torch": self.torch.__version__, "device": str(self.device), "precision": self.precision,
                "graph_precision": {g: "fp32" if d == self.torch.float32 else "fp16" for g, d in self.dtypes.items()}}
