"""The TensorRT engine against small stand-ins for ``tensorrt`` and cuda-python's ``cudart``.

The stand-ins pin the calls the engine makes: device and pinned host memory
are real ``ctypes`` allocations, copies really move bytes, and a "network"
computes each output row from the sum of its input rows, so wrong sizes,
stale buffers or missing copies show up as wrong numbers. The real engine is
checked against ONNX Runtime on a GPU in ``tests/test_runtime.py``.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle import Bundle
from runtime.engines import GRAPHS, EngineError, TrtEngine, make_engine


class CudaError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2


class FakeStream:
    def __init__(self, n: int):
        self.n = n

    def __int__(self) -> int:
        return 0x5000 + self.n


class FakeCudart(types.ModuleType):
    """cuda-python's ``cudart``: every call returns ``(err, *values)`` and is counted; ``fail[name]`` makes it fail."""

    cudaError_t = CudaError

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        self.calls: list[tuple] = []
        self.fail: dict[str, CudaError] = {}
        self.device: dict[int, ctypes.Array] = {}
        self.host: dict[int, ctypes.Array] = {}
        self.streams: list[FakeStream] = []
        self.live_streams: set[int] = set()

    def _call(self, name: str, *args) -> CudaError:
        self.calls.append((name, *args))
        return self.fail.get(name, CudaError.cudaSuccess)

    def count(self, name: str) -> int:
        return sum(c[0] == name for c in self.calls)

    def cudaGetDeviceCount(self):
        return self._call("cudaGetDeviceCount"), 1

    def cudaGetDeviceProperties(self, device):
        err = self._call("cudaGetDeviceProperties", device)
        return err, types.SimpleNamespace(major=8, minor=9)

    def cudaStreamCreate(self):
        err = self._call("cudaStreamCreate")
        if err:
            return err, None
        s = FakeStream(len(self.streams))
        self.streams.append(s)
        self.live_streams.add(id(s))
        return err, s

    def cudaStreamDestroy(self, stream):
        err = self._call("cudaStreamDestroy", stream)
        if not err:
            self.live_streams.remove(id(stream))
        return (err,)

    def cudaStreamSynchronize(self, stream):
        assert id(stream) in self.live_streams
        return (self._call("cudaStreamSynchronize", stream),)

    def _alloc(self, pool, name, nbytes):
        err = self._call(name, nbytes)
        if err:
            return err, 0
        buf = ctypes.create_string_buffer(nbytes)
        pool[ctypes.addressof(buf)] = buf
        return err, ctypes.addressof(buf)

    def _free(self, pool, name, ptr):
        err = self._call(name, ptr)
        if not err:
            del pool[ptr]
        return (err,)

    def cudaMalloc(self, nbytes):
        return self._alloc(self.device, "cudaMalloc", nbytes)

    def cudaMallocHost(self, nbytes):
        return self._alloc(self.host, "cudaMallocHost", nbytes)

    def cudaFree(self, ptr):
        return self._free(self.device, "cudaFree", ptr)

    def cudaFreeHost(self, ptr):
        return self._free(self.host, "cudaFreeHost", ptr)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert id(stream) in self.live_streams, "copies go on the engine's stream"
        to_device = kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice
        dev, host = (dst, src) if to_device else (src, dst)
        assert nbytes <= ctypes.sizeof(self.device[dev]) and nbytes <= ctypes.sizeof(self.host[host])
        err = self._call("cudaMemcpyAsync", dst, src, nbytes, kind, stream)
        if not err:
            ctypes.memmove(dst, src, nbytes)
        return (err,)

    def read(self, ptr: int, count: int) -> np.ndarray:
        assert ptr in self.device and count * 4 <= ctypes.sizeof(self.device[ptr]), "reads inside a device buffer"
        return np.frombuffer(self.device[ptr], np.float32, count).copy()

    def write(self, ptr: int, values: np.ndarray) -> None:
        assert ptr in self.device and values.nbytes <= ctypes.sizeof(self.device[ptr]), "writes inside a device buffer"
        values = np.ascontiguousarray(values, np.float32)
        ctypes.memmove(ptr, values.ctypes.data, values.nbytes)


def _onnx_io(data: bytes) -> tuple[list, list]:
    import onnx

    model = onnx.load_from_string(data)

    def shape(v):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]

    inits = {i.name for i in model.graph.initializer}
    return ([(v.name, shape(v)) for v in model.graph.input if v.name not in inits],
            [(v.name, shape(v)) for v in model.graph.output])


def fake_tensorrt(cudart: FakeCudart, version: str = "10.3.0") -> types.ModuleType:
    """A ``tensorrt`` module: the builder records what it built; engines are JSON naming their tensors."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.builds, trt.deserialized = [], []
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    trt.DataType = enum.Enum("DataType", "FLOAT HALF")
    trt.nptype = lambda dt: {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16}[dt]
    flags = ["TF32"] if version.startswith("11") else ["FP16", "TF32"]  # TensorRT 11 has no FP16 builder flag
    trt.BuilderFlag = enum.Enum("BuilderFlag", flags)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 5})

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs, self.onnx = flags, [], [], None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            name, shape = self.inputs[i]
            return types.SimpleNamespace(name=name, shape=tuple(shape))

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse(self, data: bytes) -> bool:
            self.network.inputs, self.network.outputs = _onnx_io(data)
            self.network.onnx = hashlib.sha256(data).hexdigest()
            return True

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.timing = {"TF32"}, [], None

        def set_flag(self, flag):
            self.flags.add(flag.name)

        def clear_flag(self, flag):
            self.flags.discard(flag.name)

        def create_timing_cache(self, data):
            return types.SimpleNamespace(data=bytes(data), serialize=lambda: bytes(data) + b"t")

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing = cache

        def get_timing_cache(self):
            return self.timing

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            (profile,) = config.profiles
            record = {"onnx": network.onnx, "flags": sorted(config.flags),
                      "strongly_typed": bool(network.flags & (1 << 5)), "inputs": network.inputs,
                      "outputs": network.outputs, "max_batch": profile.shapes[network.inputs[0][0]][2][0]}
            trt.builds.append(record)
            return json.dumps(record).encode()

    class Context:
        def __init__(self, spec):
            self.spec, self.shapes, self.addresses = spec, {}, {}

        def set_input_shape(self, name, shape):
            dims = dict(self.spec["inputs"])[name]
            ok = 1 <= shape[0] <= self.spec["max_batch"] and list(shape[1:]) == dims[1:]
            if ok:
                self.shapes[name] = tuple(shape)
            return ok

        def get_tensor_shape(self, name):
            n = self.shapes[self.spec["inputs"][0][0]][0]
            return (n, *dict(self.spec["outputs"])[name][1:])

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream):
            assert id(stream) in cudart.live_streams
            names = [n for n, _ in self.spec["inputs"] + self.spec["outputs"]]
            if any(n not in self.addresses for n in names):
                return False
            n = self.shapes[self.spec["inputs"][0][0]][0]
            rows = np.zeros(n, np.float32)
            for name, _ in self.spec["inputs"]:
                rows += cudart.read(self.addresses[name], int(np.prod(self.shapes[name]))).reshape(n, -1).sum(1)
            for name, _ in self.spec["outputs"]:
                shape = self.get_tensor_shape(name)
                cudart.write(self.addresses[name], np.broadcast_to(rows.reshape(n, *[1] * (len(shape) - 1)), shape))
            return True

    class Engine:
        def __init__(self, spec):
            self.spec = spec
            self.names = [n for n, _ in spec["inputs"]] + [n for n, _ in spec["outputs"]]

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            inputs = [n for n, _ in self.spec["inputs"]]
            return trt.TensorIOMode.INPUT if name in inputs else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def create_execution_context(self):
            return Context(self.spec)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            trt.deserialized.append(bytes(data))
            try:
                return Engine(json.loads(data))
            except ValueError:
                return None

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    return trt


@pytest.fixture
def fakes(monkeypatch):
    """Install the stand-ins as ``tensorrt`` and ``cuda.bindings.runtime``; returns ``(trt, cudart)``."""
    def install(version: str = "10.3.0"):
        cudart = FakeCudart()
        trt = fake_tensorrt(cudart, version)
        cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        cuda.bindings, bindings.runtime = bindings, cudart
        for name, mod in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                          ("cuda.bindings.runtime", cudart)):
            monkeypatch.setitem(sys.modules, name, mod)
        return trt, cudart

    return install


@pytest.fixture
def bundle(tiny_bundle):
    return Bundle.load(tiny_bundle)


def _engine(bundle, cache, precision="fp32", **kw) -> TrtEngine:
    return TrtEngine(bundle, precision=precision, log=kw.pop("log", lambda *_: None), cache_dir=cache, **kw)


def _expected(x: np.ndarray, n_classes: int) -> np.ndarray:
    return np.repeat(x.reshape(len(x), -1).sum(1, dtype=np.float32)[:, None], n_classes, 1)


def test_buffers_are_allocated_once_per_binding_and_the_stream_once(fakes, bundle, tmp_path):
    trt, cudart = fakes()
    engine = _engine(bundle, tmp_path / "cache", max_batch=16)
    assert cudart.count("cudaStreamCreate") == 1 and cudart.count("cudaMalloc") == 0
    rng = np.random.default_rng(0)
    k, s = len(bundle.class_names), bundle.size
    for n in (4, 4, 2, 4, 1):  # no batch larger than the first: the classifier's two buffers are reused
        x = rng.random((n, 1, s, s), dtype=np.float32)
        np.testing.assert_allclose(engine.classify(x), _expected(x, k), rtol=1e-5)
    assert cudart.count("cudaMalloc") == 2 and cudart.count("cudaMallocHost") == 2  # image and probs
    assert cudart.count("cudaFree") == 0
    x = rng.random((8, 1, s, s), dtype=np.float32)  # a larger batch grows both, once
    np.testing.assert_allclose(engine.classify(x), _expected(x, k), rtol=1e-5)
    assert cudart.count("cudaMalloc") == 4 and cudart.count("cudaFree") == 2 and cudart.count("cudaFreeHost") == 2
    syncs = cudart.count("cudaStreamSynchronize")
    x = rng.random((40, 1, s, s), dtype=np.float32)  # past max_batch: chunks of 16, 16, 8
    np.testing.assert_allclose(engine.classify(x), _expected(x, k), rtol=1e-5)
    assert cudart.count("cudaMalloc") == 6 and cudart.count("cudaStreamSynchronize") == syncs + 3
    # the denoiser's two inputs and its output: three bindings, each allocated once over repeated steps
    for _ in range(3):
        x_t, t = rng.random((3, 1, s, s), dtype=np.float32), np.full(3, 50.0, np.float32)
        np.testing.assert_allclose(engine.eps(x_t, t), np.broadcast_to(_expected(x_t, 1)[:, :, None, None] + 50.0,
                                                                       x_t.shape), rtol=1e-5)
    assert cudart.count("cudaMalloc") == 9
    engine.score(x[:2]), engine.ood(x[:2])
    assert cudart.count("cudaMalloc") == 13
    assert all(c[5] is cudart.streams[0] for c in cudart.calls if c[0] == "cudaMemcpyAsync")
    assert not hasattr(cudart, "cudaMemcpy")  # only asynchronous copies on the engine's stream
    assert cudart.count("cudaStreamCreate") == 1
    engine.close()
    assert not cudart.device and not cudart.host and not cudart.live_streams  # everything freed
    assert cudart.count("cudaStreamDestroy") == 1
    engine.close()  # idempotent
    assert cudart.count("cudaStreamDestroy") == 1
    with pytest.raises(EngineError, match="closed"):
        engine.classify(x[:1])


def test_close_on_collection_frees_everything(fakes, bundle, tmp_path):
    _, cudart = fakes()
    engine = _engine(bundle, tmp_path / "cache")
    engine.classify(np.zeros((2, 1, bundle.size, bundle.size), np.float32))
    del engine
    assert not cudart.device and not cudart.host and not cudart.live_streams


@pytest.mark.parametrize("call", ["cudaMalloc", "cudaMallocHost", "cudaMemcpyAsync", "cudaStreamSynchronize"])
def test_a_failed_cuda_call_in_a_run_raises_naming_it(fakes, bundle, tmp_path, call):
    _, cudart = fakes()
    engine = _engine(bundle, tmp_path / "cache")
    cudart.fail[call] = CudaError.cudaErrorMemoryAllocation
    with pytest.raises(EngineError, match=rf"{call}.*cudaErrorMemoryAllocation"):
        engine.classify(np.zeros((2, 1, bundle.size, bundle.size), np.float32))
    cudart.fail.clear()
    engine.close()
    assert not cudart.device and not cudart.host and not cudart.live_streams  # what was allocated is freed


@pytest.mark.parametrize("call", ["cudaGetDeviceProperties", "cudaStreamCreate"])
def test_a_failed_cuda_call_at_start_raises_naming_it(fakes, bundle, tmp_path, call):
    _, cudart = fakes()
    cudart.fail[call] = CudaError.cudaErrorInvalidValue
    with pytest.raises(EngineError, match=rf"{call}.*cudaErrorInvalidValue"):
        _engine(bundle, tmp_path / "cache")


@pytest.mark.parametrize("call", ["cudaFree", "cudaFreeHost", "cudaStreamDestroy"])
def test_a_failed_release_raises_naming_it_after_releasing_the_rest(fakes, bundle, tmp_path, call):
    _, cudart = fakes()
    engine = _engine(bundle, tmp_path / "cache")
    engine.classify(np.zeros((2, 1, bundle.size, bundle.size), np.float32))
    cudart.fail[call] = CudaError.cudaErrorInvalidValue
    with pytest.raises(EngineError, match=rf"{call}.*cudaErrorInvalidValue"):
        engine.close()
    others = {"cudaFree": cudart.device, "cudaFreeHost": cudart.host, "cudaStreamDestroy": cudart.live_streams}
    assert all(not v for k, v in others.items() if k != call)
    cudart.fail.clear()
    engine.close()  # nothing is released twice
    assert cudart.count(call) == {"cudaStreamDestroy": 1}.get(call, 2)


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_engines_are_cached_outside_the_bundle_with_checksums(fakes, bundle, tmp_path, monkeypatch):
    trt, cudart = fakes()
    before = _listing(bundle.path)
    monkeypatch.setenv("MEDFEDPURE_HOME", str(tmp_path / "home"))
    engine = make_engine(bundle, "trt", "cuda", "fp32", log=lambda *_: None)
    cache = tmp_path / "home" / "trt-cache"
    assert engine.cache == cache and stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert _listing(bundle.path) == before  # nothing written into the verified bundle
    engines = sorted(cache.glob("*.engine"))
    assert len(engines) == len(GRAPHS) == len(trt.builds)
    for f in engines:
        graph = f.name.split(".")[0]
        onnx_sha = bundle.manifest["files"][bundle.file(graph, "fp32").name]["sha256"]
        assert f.name == f"{graph}.fp32.{onnx_sha}.sm89.trt10.3.0.b32.engine"
        sidecar = f.with_name(f.name + ".sha256")
        assert sidecar.read_text().split()[0] == hashlib.sha256(f.read_bytes()).hexdigest()
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0
    assert (cache / "timing.sm89.trt10.3.0.cache").exists() and (cache / "timing.sm89.trt10.3.0.cache.sha256").exists()
    assert not list(cache.glob(".*"))  # no temporary files left behind
    engine.close()

    # a second engine loads every cached engine, builds none
    _engine(bundle, cache).close()
    assert len(trt.builds) == len(GRAPHS)

    # a corrupted engine is rebuilt, never deserialized; one without its checksum too
    detector = next(f for f in engines if f.name.startswith("detector."))
    good = detector.read_bytes()
    bad = good.replace(b'"max_batch": 32', b'"max_batch": 99')  # still a loadable engine, but not the one cached
    detector.write_bytes(bad)
    classifier = next(f for f in engines if f.name.startswith("classifier."))
    classifier.with_name(classifier.name + ".sha256").unlink()
    lines, seen = [], len(trt.deserialized)
    engine = _engine(bundle, cache, log=lines.append)
    assert len(trt.builds) == len(GRAPHS) + 2
    assert bad != good and bad not in trt.deserialized[seen:]
    assert any(detector.name in line and "sha256" in line and "rebuilding" in line for line in lines)
    assert any(classifier.name in line and "rebuilding" in line for line in lines)
    assert detector.read_bytes() == good
    assert classifier.with_name(classifier.name + ".sha256").exists()
    engine.close()

    # without building, a corrupted engine is refused
    detector.write_bytes(b"garbage")
    with pytest.raises(EngineError, match="no valid TensorRT engine detector"):
        _engine(bundle, cache, build=False)


def test_an_engine_is_not_built_from_an_onnx_file_that_differs_from_the_manifest(fakes, bundle, tmp_path):
    fakes()
    bundle.manifest = json.loads(json.dumps(bundle.manifest))
    bundle.manifest["files"]["detector.onnx"]["sha256"] = "0" * 64
    with pytest.raises(EngineError, match="detector.onnx: sha256 does not match the manifest"):
        _engine(bundle, tmp_path / "cache")


def _distinct_fp16_detector(bundle: Bundle, tmp_path: Path) -> Bundle:
    """A copy of ``bundle`` whose detector.fp16.onnx differs in bytes (not in graph) from detector.onnx."""
    import shutil

    import onnx

    from runtime.bundle import sha256

    root = tmp_path / "bundle"
    shutil.copytree(bundle.path, root)
    f = root / "detector.fp16.onnx"
    model = onnx.load(str(f))
    model.doc_string = "the fp16 variant"
    onnx.save(model, str(f))
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["files"][f.name].update(sha256=sha256(f), bytes=f.stat().st_size)
    return Bundle(root, manifest)


def _built(trt, bundle) -> dict[str, dict]:
    """The builds by ONNX file name."""
    names = {meta["sha256"]: name for name, meta in bundle.manifest["files"].items()}
    return {names[b["onnx"]]: b for b in trt.builds}


def test_fp16_builds_only_the_classifier_and_the_denoiser_in_fp16_on_tensorrt_10(fakes, bundle, tmp_path):
    trt, _ = fakes("10.3.0")
    bundle = _distinct_fp16_detector(bundle, tmp_path)
    engine = _engine(bundle, tmp_path / "cache", precision="fp16")
    built = _built(trt, bundle)
    assert sorted(built) == ["classifier.onnx", "denoiser.onnx", "detector.onnx", bundle.manifest["ood"]["file"]]
    assert "FP16" in built["classifier.onnx"]["flags"] and "FP16" in built["denoiser.onnx"]["flags"]
    for name in ("detector.onnx", bundle.manifest["ood"]["file"]):
        assert built[name]["flags"] == [], name  # neither FP16 nor TF32
    assert not any(b["strongly_typed"] for b in trt.builds)
    assert engine.describe()["graph_precision"] == {"classifier": "fp16", "detector": "fp32", "denoiser": "fp16",
                                                    "ood": "fp32"}
    assert sorted(f.name.split(".")[1] for f in engine.cache.glob("*.engine")) == ["fp16", "fp16", "fp32", "fp32"]
    engine.close()


def test_fp16_on_tensorrt_11_builds_the_detector_from_the_fp32_onnx(fakes, bundle, tmp_path):
    trt, _ = fakes("11.0.0")
    bundle = _distinct_fp16_detector(bundle, tmp_path)
    engine = _engine(bundle, tmp_path / "cache", precision="fp16")
    built = _built(trt, bundle)
    assert sorted(built) == ["classifier.fp16.onnx", "denoiser.fp16.onnx", "detector.onnx",
                             bundle.manifest["ood"]["file"]]
    assert all(b["strongly_typed"] for b in trt.builds)
    assert built["detector.onnx"]["flags"] == []
    engine.close()


def test_tensorrt_engine_keys_differ_by_precision_and_version(fakes, bundle, tmp_path):
    cache = tmp_path / "cache"
    trt, _ = fakes("10.3.0")
    _engine(bundle, cache, precision="fp32").close()
    _engine(bundle, cache, precision="fp16").close()
    assert len(trt.builds) == len(GRAPHS) + 2  # the fp32 detector and ood engines serve both
    trt, _ = fakes("10.4.0")
    _engine(bundle, cache, precision="fp32").close()
    assert len(trt.builds) == len(GRAPHS)


def test_torch_engine_keeps_the_detector_and_ood_in_fp32(bundle):
    torch = pytest.importorskip("torch")
    from runtime.torch_engine import TorchEngine

    half, full = TorchEngine(bundle, precision="fp16"), TorchEngine(bundle, precision="fp32")
    assert half.dtypes == {"classifier": torch.float16, "detector": torch.float32, "denoiser": torch.float16,
                           "ood": torch.float32}
    for g in ("detector", "ood"):
        tensors = list(half.graphs[g].parameters()) + list(half.graphs[g].buffers())
        assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()), g
    for g in ("classifier", "denoiser"):
        assert {p.dtype for p in half.graphs[g].parameters()} == {torch.float16}, g
    x = np.random.default_rng(0).random((3, 1, bundle.size, bundle.size), dtype=np.float32)
    np.testing.assert_array_equal(half.score(x), full.score(x))
    np.testing.assert_array_equal(half.ood(x), full.ood(x))
