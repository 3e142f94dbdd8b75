"""The PyTorch reference engine (``--engine torch``): the only runtime module that imports torch."""

from __future__ import annotations

import numpy as np

from runtime.bundle import Bundle, BundleError
from runtime.engines import GRAPHS, EngineError


class TorchEngine:
    """The PyTorch reference: the bundle's ``*.pt2`` graphs (``torch.export``), no training code needed."""

    def __init__(self, bundle: Bundle, device: str = "cpu", precision: str = "fp32"):
        try:
            import torch
        except ImportError as err:
            raise EngineError(f"--engine torch needs PyTorch installed: {err}") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("--device cuda: torch sees no CUDA device")
        self.torch, self.device = torch, torch.device(device)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.graphs = {}
        for g in GRAPHS:
            name = f"{g}.pt2"
            if name not in bundle.manifest["files"]:
                raise BundleError(f"{bundle.path}: the bundle has no {name} for the torch engine")
            dtype = torch.float32 if g == "ood" else self.dtype  # its threshold was set on fp32 scores
            self.graphs[g] = torch.export.load(str(bundle.path / name)).module().to(self.device, dtype)
        self.precision = precision

    def _run(self, g: str, *arrays: np.ndarray) -> np.ndarray:
        torch = self.torch
        dtype = torch.float32 if g == "ood" else self.dtype
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype) for a in arrays]
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
        return {"engine": "torch", "torch": self.torch.__version__, "device": str(self.device), "precision": self.precision}
