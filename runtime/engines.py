"""Engines that run a bundle's three graphs: ONNX Runtime, TensorRT, and PyTorch (the reference).

Every engine exposes ``classify(x)``, ``score(x)``, ``eps(x_t, t)`` and
``ood(x)`` (the out-of-distribution score) on float32 numpy arrays and ``describe()`` (what actually runs: providers, precision,
device). The torch engine is in ``runtime/torch_engine.py``, the only runtime
module that imports torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import tempfile
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


# Graphs that run in fp32 at every precision. The noise-floor detector compares Laplacians of ~1e-3 against a
# tau of ~1e-3, which fp16 (and TF32) arithmetic on [0, 1] pixels cannot resolve; the ood threshold was set on
# fp32 scores. Only the classifier and the denoiser follow ``--precision``.
FP32_GRAPHS = ("detector", "ood")


class TrtEngine:
    """TensorRT: deserializes the engine built for this GPU and TensorRT version, or builds it from the bundle's ONNX.

    Engines live outside the bundle, in ``cache_dir`` (default
    ``$MEDFEDPURE_HOME/trt-cache``, mode 0700), named by graph, precision, the
    sha256 of the ONNX file they were built from (as the signed manifest
    records it), the GPU's compute capability, the TensorRT version and
    ``max_batch``. Each engine is written atomically with a ``.sha256``
    sidecar and is deserialized only after its bytes match it; an engine that
    does not match is rebuilt. A timing cache (``timing.<sm>.trt<version>.cache``)
    sits beside them under the same rule.

    The detector and the ood graph are built fp32 at every precision
    (``FP32_GRAPHS``); the classifier and the denoiser follow ``precision``.
    fp32 builds turn TF32 off (it rounds to fp16's 10-bit mantissa). TensorRT 10 builds fp16 with the FP16 builder flag on the
    fp32 ONNX; TensorRT 11, which removed that flag, builds strongly typed
    networks, from the fp16 ONNX for fp16 graphs and the fp32 ONNX otherwise.

    Like TensorRT's samples, the engine owns its CUDA resources: one stream,
    created here, and per graph input and output one device buffer and one
    pinned host buffer, allocated at the first call and grown only when a
    larger batch comes (at most ``max_batch``; larger batches run in chunks).
    A call copies in, runs and copies out asynchronously on the stream and
    synchronizes once. Every CUDA runtime call is checked; a failure raises
    :class:`EngineError` naming the call. ``close()`` frees everything.
    """

    def __init__(self, bundle: Bundle, precision: str = "fp16", max_batch: int = 32, build: bool = True, log=print,
                 cache_dir: str | Path | None = None):
        self._stream, self._buffers, self.contexts, self.engines = None, {}, {}, {}
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
        if precision not in ("fp32", "fp16"):
            raise EngineError(f"--engine trt runs fp32 or fp16, not {precision}")
        if max_batch < 1:
            raise EngineError(f"max_batch must be at least 1, not {max_batch}")
        self.trt, self.cudart, self.log = trt, cudart, log
        err, count = cudart.cudaGetDeviceCount()
        self._check(err, "cudaGetDeviceCount (no usable CUDA GPU)")
        if count < 1:
            raise EngineError("--engine trt: no CUDA GPU is visible")
        err, props = cudart.cudaGetDeviceProperties(0)
        self._check(err, "cudaGetDeviceProperties")
        self.sm = f"sm{props.major}{props.minor}"
        self.version = trt.__version__
        self.major = int(self.version.split(".")[0])
        self.precision, self.max_batch, self.size = precision, max_batch, bundle.size
        self.cache = self._cache_dir(cache_dir)
        self.graph_precision = {g: "fp32" if g in FP32_GRAPHS else precision for g in GRAPHS}
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self._io = {}
        for g in GRAPHS:
            self.engines[g] = self._load(bundle, g, build)
            self.contexts[g] = self.engines[g].create_execution_context()
            self._io[g] = self._tensors(self.engines[g])
        err, stream = cudart.cudaStreamCreate()
        self._check(err, "cudaStreamCreate")
        self._stream = stream

    # -- CUDA runtime calls --------------------------------------------------------------------------------

    @staticmethod
    def _check(err, what: str) -> None:
        """Raise :class:`EngineError` naming ``what`` unless ``err`` is ``cudaSuccess``."""
        if int(err) != 0:
            raise EngineError(f"TensorRT engine: {what} failed: {getattr(err, 'name', err)} ({int(err)})")

    def _reserve(self, graph: str, name: str, shape: tuple, dtype: np.dtype) -> dict:
        """The buffers of one binding, large enough for ``shape``: reused, or grown (and rebound) when too small."""
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self._buffers.get((graph, name))
        if buf is not None and buf["nbytes"] >= nbytes:
            return buf
        if buf is not None:
            errors = self._release(self._buffers.pop((graph, name)))
            if errors:
                raise EngineError("; ".join(errors))
        cudart = self.cudart
        buf = self._buffers[(graph, name)] = {"nbytes": 0, "device": None, "host": None, "array": None}
        err, ptr = cudart.cudaMalloc(nbytes)
        self._check(err, f"cudaMalloc ({nbytes} bytes for {graph}.{name})")
        buf["device"] = ptr
        err, ptr = cudart.cudaMallocHost(nbytes)
        self._check(err, f"cudaMallocHost ({nbytes} bytes for {graph}.{name})")
        buf["host"] = ptr
        buf["array"] = np.frombuffer((ctypes.c_byte * nbytes).from_address(int(buf["host"])), dtype=dtype)
        buf["nbytes"] = nbytes
        if not self.contexts[graph].set_tensor_address(name, buf["device"]):
            raise EngineError(f"TensorRT refused the address of {graph}.{name}")
        return buf

    def _release(self, buf: dict) -> list[str]:
        """Free one binding's buffers; the errors, one per failed call (all calls are made)."""
        errors = []
        buf["array"] = None
        for key, call in (("device", self.cudart.cudaFree), ("host", self.cudart.cudaFreeHost)):
            if buf[key] is not None:
                try:
                    self._check(call(buf[key])[0], call.__name__)
                except EngineError as err:
                    errors.append(str(err))
                buf[key] = None
        return errors

    def close(self) -> None:
        """Free every buffer and destroy the stream (idempotent); :class:`EngineError` if a CUDA call fails."""
        self.contexts, self.engines = {}, {}
        errors = []
        buffers, self._buffers = getattr(self, "_buffers", {}), {}
        for buf in buffers.values():
            errors += self._release(buf)
        stream, self._stream = getattr(self, "_stream", None), None
        if stream is not None:
            try:
                self._check(self.cudart.cudaStreamDestroy(stream)[0], "cudaStreamDestroy")
            except EngineError as err:
                errors.append(str(err))
        if errors:
            raise EngineError("; ".join(errors))

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing can be reported from a finalizer
            pass

    def __enter__(self) -> TrtEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the engine cache ----------------------------------------------------------------------------------

    @staticmethod
    def _cache_dir(cache_dir: str | Path | None) -> Path:
        from runtime.signing import home

        path = Path(cache_dir) if cache_dir is not None else home() / "trt-cache"
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.chmod(0o700)
        except OSError as err:
            raise EngineError(f"TensorRT engine cache {path}: {err.strerror}") from None
        return path

    def _read_verified(self, path: Path) -> bytes | None:
        """``path``'s bytes if they match its ``.sha256`` sidecar; None (and a log line if it exists) otherwise."""
        if not path.exists():
            return None
        sidecar = path.with_name(path.name + ".sha256")
        try:
            data = path.read_bytes()
            expected = sidecar.read_text().split()[0] if sidecar.exists() else None
        except (OSError, UnicodeDecodeError, IndexError):
            data, expected = b"", "unreadable"
        if expected is None:
            self.log(f"{path}: no {sidecar.name} beside it; rebuilding rather than loading it")
            return None
        if hashlib.sha256(data).hexdigest() != expected:
            self.log(f"{path}: does not match its sha256 ({sidecar.name}); rebuilding rather than loading it")
            return None
        return data

    @staticmethod
    def _write_verified(path: Path, data: bytes) -> None:
        """Write ``data`` and its ``.sha256`` sidecar, each atomically (temporary file, fsync, rename)."""
        digest = hashlib.sha256(data).hexdigest()
        sidecar = path.with_name(path.name + ".sha256")
        for target, payload in ((path, data), (sidecar, f"{digest}  {path.name}\n".encode())):
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(payload)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    # -- building and loading ------------------------------------------------------------------------------

    def _load(self, bundle: Bundle, graph: str, build: bool):
        """The deserialized engine of ``graph``: from the cache if its checksum holds, else built and cached."""
        precision = self.graph_precision[graph]
        strongly_typed = self.major >= 11
        onnx_file = bundle.file(graph, "fp16" if strongly_typed and precision == "fp16" else "fp32")
        onnx_sha = bundle.manifest["files"][onnx_file.name]["sha256"]
        path = self.cache / f"{graph}.{precision}.{onnx_sha}.{self.sm}.trt{self.version}.b{self.max_batch}.engine"
        data = self._read_verified(path)
        if data is not None:
            engine = self.runtime.deserialize_cuda_engine(data)
            if engine is not None:
                return engine
            self.log(f"{path}: TensorRT could not deserialize this engine; rebuilding it")
        if not build:
            raise EngineError(f"no valid TensorRT engine {path.name} in {self.cache} for this GPU and TensorRT; "
                              "run without --no-build")
        self.log(f"building TensorRT engine for {graph} ({precision}) from {onnx_file.name} "
                 f"(once per GPU and TensorRT version) ...")
        data = self._build(onnx_file, onnx_sha, precision, strongly_typed)
        self._write_verified(path, data)
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError(f"{path}: TensorRT could not deserialize the engine it just built")
        return engine

    def _build(self, onnx_file: Path, onnx_sha: str, precision: str, strongly_typed: bool) -> bytes:
        """Serialize an engine for ``onnx_file`` (refused unless its bytes have the manifest's ``onnx_sha``)."""
        trt = self.trt
        onnx_bytes = onnx_file.read_bytes()
        if hashlib.sha256(onnx_bytes).hexdigest() != onnx_sha:
            raise EngineError(f"{onnx_file}: sha256 does not match the manifest (modified or corrupted); "
                              "not building a TensorRT engine from it")
        builder = trt.Builder(self.logger)
        flags = 0
        if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        elif self.major < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT could not parse {onnx_file.name}: {errors}")
        config = builder.create_builder_config()
        if precision == "fp16" and not strongly_typed:
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        cache_file = self.cache / f"timing.{self.sm}.trt{self.version}.cache"
        cache = config.create_timing_cache(self._read_verified(cache_file) or b"")
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
            raise EngineError(f"TensorRT failed to build an engine from {onnx_file.name}")
        self._write_verified(cache_file, bytes(config.get_timing_cache().serialize()))
        return bytes(serialized)

    def _tensors(self, engine) -> dict[str, list[tuple[str, np.dtype]]]:
        """The engine's input and output tensors with their numpy dtypes."""
        trt, io = self.trt, {"inputs": [], "outputs": []}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            kind = "inputs" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "outputs"
            io[kind].append((name, np.dtype(trt.nptype(engine.get_tensor_dtype(name)))))
        return io

    # -- running -------------------------------------------------------------------------------------------

    def _infer(self, graph: str, inputs: dict[str, np.ndarray], out_name: str) -> np.ndarray:
        n = next(iter(inputs.values())).shape[0]
        if n > self.max_batch:
            return np.concatenate([self._infer(graph, {k: v[i : i + self.max_batch] for k, v in inputs.items()}, out_name)
                                   for i in range(0, n, self.max_batch)])
        if self._stream is None:
            raise EngineError("this TensorRT engine is closed")
        cudart, ctx, stream = self.cudart, self.contexts[graph], self._stream
        for name, dtype in self._io[graph]["inputs"]:
            arr = np.ascontiguousarray(inputs[name], dtype=dtype)
            if not ctx.set_input_shape(name, arr.shape):
                raise EngineError(f"TensorRT refused the input shape {arr.shape} of {graph}.{name}")
            buf = self._reserve(graph, name, arr.shape, dtype)
            buf["array"][: arr.size] = arr.reshape(-1)
            err, = cudart.cudaMemcpyAsync(buf["device"], buf["host"], arr.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)
            self._check(err, f"cudaMemcpyAsync (host to device, {graph}.{name})")
        shapes = {}
        for name, dtype in self._io[graph]["outputs"]:
            shapes[name] = tuple(ctx.get_tensor_shape(name))
            self._reserve(graph, name, shapes[name], dtype)
        if not ctx.execute_async_v3(stream):
            raise EngineError(f"TensorRT failed to run {graph}")
        out = self._buffers[(graph, out_name)]
        count = math.prod(shapes[out_name])
        err, = cudart.cudaMemcpyAsync(out["host"], out["device"], count * out["array"].itemsize,
                                      cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)
        self._check(err, f"cudaMemcpyAsync (device to host, {graph}.{out_name})")
        err, = cudart.cudaStreamSynchronize(stream)
        self._check(err, f"cudaStreamSynchronize ({graph})")
        return out["array"][:count].reshape(shapes[out_name]).astype(np.float32)

    def classify(self, x):
        return self._infer("classifier", {"image": x}, "probs")

    def score(self, x):
        return self._infer("detector", {"image": x}, "score")

    def eps(self, x_t, t):
        return self._infer("denoiser", {"x_t": x_t, "t": t}, "eps")

    def ood(self, x):
        return self._infer("ood", {"image": x}, "score")

    def describe(self) -> dict:
        return {"engine": "trt", "tensorrt": self.version, "gpu": self.sm, "precision": self.precision,
                "graph_precision": dict(self.graph_precision), "cache": str(self.cache)}


PRECISIONS = {"ort": ("fp32", "fp16", "int8"), "torch": ("fp32", "fp16"), "trt": ("fp32", "fp16")}


def make_engine(bundle: Bundle, engine: str, device: str = "cpu", precision: str = "fp32", threads: int = 0, log=print,
                trt_cache: str | Path | None = None):
    """The engine ``engine`` for ``bundle``; ``trt_cache``: TensorRT's engine cache (default ``$MEDFEDPURE_HOME/trt-cache``)."""
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
        return TrtEngine(bundle, precision, log=log, cache_dir=trt_cache)
    raise EngineError(f"unknown engine {engine!r}; choose ort, trt or torch")
