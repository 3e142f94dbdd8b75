"""Engines that run a bundle's three graphs: ONNX Runtime, TensorRT, and PyTorch (the reference).

Every engine exposes ``classify(x)``, ``score(x)``, ``eps(x_t, t)`` and
``ood(x)`` (the out-of-distribution score) on float32 numpy arrays and ``describe()`` (what actually runs: providers, precision,
device). The torch engine is in ``runtime/torch_engine.py``, the only runtime
module that imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.bundle import Bundle

GRAPHS = ("classifier", "detector", "denoiser", "ood")


class EngineError(RuntimeError):
    """The requested engine cannot run here (missing library, device, or a provider that did not activate)."""


class OrtEngine:
    """ONNX Runtime. ``device="cuda"`` fails unless the CUDA provider is really active in every session."""

    def __init__(self, bundle: Bundle, device: str = "cpu", precision: str = "fp32", threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise EngineError(f"onnxruntime is not installed ({err})") from None
        if device not in ("cpu", "cuda"):
            raise EngineError(f"unknown device {device!r}; use cpu or cuda")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads > 0:
            opts.intra_op_num_threads = threads
        # Three sessions run one after another on the same cores. A spinning intra-op pool keeps its
        # threads busy after its graph finishes and starves the next session (one purified scan took
        # 59-81 ms on a 2-core CPU, without spinning 24-29 ms); without spinning, every parallel
        # section pays a thread wake-up. So: spin while a graph runs, stop when it returns.
        # Detector + one denoiser step + classifier at 112 px, 2 cores: 12.5 ms without spinning,
        # 13-15 ms (p90 24-27) spinning, 10.2 ms spinning with the stop.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        self.sessions = {}
        for g in GRAPHS:
            s = ort.InferenceSession(str(bundle.file(g, precision)), opts, providers=providers)
            active = s.get_providers()
            if device == "cuda" and (not active or active[0] != "CUDAExecutionProvider"):
                raise EngineError(f"--device cuda: ONNX Runtime did not activate the CUDA provider for {g} "
                                  f"(active: {active}); install onnxruntime-gpu with a matching CUDA, or use --device cpu")
            self.sessions[g] = s
        self.device, self.precision = device, precision
        out = self.sessions["classifier"].get_outputs()[0].shape
        if len(out) != 2 or (isinstance(out[1], int) and out[1] != len(bundle.class_names)):
            raise EngineError(f"{bundle.path}: the classifier outputs {out} but the manifest names "
                              f"{len(bundle.class_names)} classes {bundle.class_names}")

    def classify(self, x: np.ndarray) -> np.ndarray:
        return self.sessions["classifier"].run(None, {"image": x})[0]

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.sessions["detector"].run(None, {"image": x})[0]

    def eps(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self.sessions["denoiser"].run(None, {"x_t": x_t, "t": t})[0]

    def ood(self, x: np.ndarray) -> np.ndarray:
        return self.sessions["ood"].run(None, {"image": x})[0]

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"engine": "ort", "onnxruntime": ort.__version__, "device": self.device, "precision": self.precision,
                "providers": {g: s.get_providers() for g, s in self.sessions.items()}}


class TrtEngine:
    """TensorRT: deserializes the engine built for this GPU and TensorRT version, or builds it from the bundle's ONNX.

    Engines are named ``<graph>.<precision>.sm<major><minor>.trt<version>.engine``
    and built with an optimization profile for batch 1..``max_batch`` and a
    timing cache (``timing.<...>.cache``). TensorRT 10 uses the FP16 builder
    flag on the fp32 ONNX; TensorRT 11, which removed that flag, builds a
    strongly typed network from the fp16 ONNX.
    """

    def __init__(self, bundle: Bundle, precision: str = "fp16", max_batch: int = 32, build: bool = True, log=print):
        try:
            import tensorrt as trt
        except ImportError:
            raise EngineError("--engine trt: TensorRT is not installed (NVIDIA publishes it: pip install tensorrt from "
                              "NVIDIA's index, or the TensorRT tarball); use --engine ort") from None
        try:
            from cuda.bindings import runtime as cudart  # cuda-python
        except ImportError:
            try:
                from cuda import cudart  # older cuda-python
            except ImportError:
                raise EngineError("--engine trt needs cuda-python (pip install cuda-python)") from None
        self.trt, self.cudart, self.log = trt, cudart, log
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            raise EngineError("--engine trt: no CUDA GPU is visible")
        err, props = cudart.cudaGetDeviceProperties(0)
        self.sm = f"sm{props.major}{props.minor}"
        self.version = trt.__version__
        self.major = int(self.version.split(".")[0])
        self.precision, self.max_batch, self.size = precision, max_batch, bundle.size
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        for g in GRAPHS:
            prec = "fp32" if g == "ood" else precision  # its threshold was set on fp32 scores
            path = bundle.path / f"{g}.{prec}.{self.sm}.trt{self.version}.engine"
            if not path.exists():
                if not build:
                    raise EngineError(f"no TensorRT engine {path.name} for this GPU and TensorRT; run without --no-build")
                log(f"building TensorRT engine {path.name} (once per GPU and TensorRT version) ...")
                self._build(bundle, g, path, prec)
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineError(f"{path}: TensorRT could not deserialize this engine")
            self.engines[g] = engine
            self.contexts[g] = engine.create_execution_context()

    def _build(self, bundle: Bundle, graph: str, out: Path, precision: str) -> None:
        trt = self.trt
        builder = trt.Builder(self.logger)
        strongly_typed = precision == "fp16" and self.major >= 11
        flags = 0
        if strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        elif self.major < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        onnx_file = bundle.file(graph, "fp16" if strongly_typed else "fp32")
        if not parser.parse(onnx_file.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT could not parse {onnx_file.name}: {errors}")
        config = builder.create_builder_config()
        if precision == "fp16" and not strongly_typed:
            config.set_flag(trt.BuilderFlag.FP16)
        cache_file = bundle.path / f"timing.{self.sm}.trt{self.version}.cache"
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            shape = tuple(inp.shape)[1:]
            opt = max(1, self.max_batch // 4)
            profile.set_shape(inp.name, (1, *shape), (opt, *shape), (self.max_batch, *shape))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"TensorRT failed to build {out.name}")
        out.write_bytes(bytes(serialized))
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))

    def _infer(self, graph: str, inputs: dict[str, np.ndarray], out_name: str) -> np.ndarray:
        cudart = self.cudart
        ctx = self.contexts[graph]
        n = next(iter(inputs.values())).shape[0]
        if n > self.max_batch:
            return np.concatenate([self._infer(graph, {k: v[i : i + self.max_batch] for k, v in inputs.items()}, out_name)
                                   for i in range(0, n, self.max_batch)])
        buffers = []
        try:
            for name, arr in inputs.items():
                arr = np.ascontiguousarray(arr, dtype=np.float32)
                ctx.set_input_shape(name, arr.shape)
                _, ptr = cudart.cudaMalloc(arr.nbytes)
                buffers.append(ptr)
                cudart.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
                ctx.set_tensor_address(name, ptr)
            shape = tuple(ctx.get_tensor_shape(out_name))
            out = np.empty(shape, dtype=np.float32)
            _, optr = cudart.cudaMalloc(out.nbytes)
            buffers.append(optr)
            ctx.set_tensor_address(out_name, optr)
            _, stream = cudart.cudaStreamCreate()
            if not ctx.execute_async_v3(stream):
                raise EngineError(f"TensorRT failed to run {graph}")
            cudart.cudaStreamSynchronize(stream)
            cudart.cudaMemcpy(out.ctypes.data, optr, out.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
            cudart.cudaStreamDestroy(stream)
            return out
        finally:
            for ptr in buffers:
                cudart.cudaFree(ptr)

    def classify(self, x):
        return self._infer("classifier", {"image": x}, "probs")

    def score(self, x):
        return self._infer("detector", {"image": x}, "score")

    def eps(self, x_t, t):
        return self._infer("denoiser", {"x_t": x_t, "t": t}, "eps")

    def ood(self, x):
        return self._infer("ood", {"image": x}, "score")

    def describe(self) -> dict:
        return {"engine": "trt", "tensorrt": self.version, "gpu": self.sm, "precision": self.precision}


PRECISIONS = {"ort": ("fp32", "fp16", "int8"), "torch": ("fp32", "fp16"), "trt": ("fp32", "fp16")}


def make_engine(bundle: Bundle, engine: str, device: str = "cpu", precision: str = "fp32", threads: int = 0, log=print):
    if engine in PRECISIONS and precision not in PRECISIONS[engine]:
        raise EngineError(f"--engine {engine} runs {' or '.join(PRECISIONS[engine])}, not {precision}"
                          + ("; the int8 denoiser runs on --engine ort" if precision == "int8" else ""))
    if engine == "ort":
        return OrtEngine(bundle, device, precision, threads)
    if engine == "torch":
        from runtime.torch_engine import TorchEngine  # the only runtime module that imports torch

        return TorchEngine(bundle, device, precision)
    if engine == "trt":
        if device != "cuda":
            log("note: --engine trt runs on the GPU; --device is ignored")
        return TrtEngine(bundle, precision, log=log)
    raise EngineError(f"unknown engine {engine!r}; choose ort, trt or torch")
