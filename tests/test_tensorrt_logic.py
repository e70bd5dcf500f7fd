"""Our TensorRT code's logic, run against small fake `tensorrt` / cuda-python modules.

These tests check our code (which graph, typing and flags we choose, what we call and in which order,
buffer and lock handling), not TensorRT.
"""

import ctypes
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
from diffad.export import tensorrt_engine as te


@pytest.mark.parametrize("version,precision,graph,expected", [
    ("10.13.3.9", "fp32", False, te.BuilderPlan("fp32", False, (), ("TF32",))),
    ("10.13.3.9", "fp32", True, te.BuilderPlan("fp32", False, (), ("TF32",))),
    ("10.13.3.9", "fp16", False, te.BuilderPlan("fp32", False, ("FP16",), ())),
    ("10.13.3.9", "fp16", True, te.BuilderPlan("fp32", False, ("FP16",), ())),
    ("11.4.0.106", "fp32", False, te.BuilderPlan("fp32", True, (), ("TF32",))),
    ("11.4.0.106", "fp32", True, te.BuilderPlan("fp32", True, (), ("TF32",))),
    ("11.4.0.106", "fp16", True, te.BuilderPlan("fp16", True, (), ())),
])
def test_builder_plan(version, precision, graph, expected):
    assert te.builder_plan(version, precision, graph) == expected


def test_builder_plan_refuses_fp16_on_11_without_the_fp16_graph():
    with pytest.raises(te.TensorRTUnavailable, match=r"TensorRT 11\.4\.0\.106 .*re-export the bundle with "
                                                     r"`diffad export` \(which writes model\.fp16\.onnx\)"):
        te.builder_plan("11.4.0.106", "fp16", False)


def test_workspace_is_checked():
    assert te.EngineOptions().workspace_mib == 2048
    with pytest.raises(ValueError, match="--workspace-mib must be a positive integer, got 0"):
        te.EngineOptions(workspace_mib=0)


def fake_trt(version, calls, profile_index=0):
    """A fake tensorrt module recording what our code calls."""
    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class Config:
        def set_memory_pool_limit(self, pool, size): calls.append(("workspace", pool, size))
        def add_optimization_profile(self, profile): return profile_index
        def set_flag(self, flag): calls.append(("set", flag))
        def clear_flag(self, flag): calls.append(("clear", flag))
        def create_timing_cache(self, data): return Obj(serialize=lambda: b"cache")
        def set_timing_cache(self, cache, ignore_mismatch): return True
        def get_timing_cache(self): return Obj(serialize=lambda: b"cache")

    class Builder:
        def __init__(self, logger): pass
        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Obj(get_input=lambda i: Obj(shape=(-1, 3, 32, 32)))
        def create_builder_config(self): return Config()
        def create_optimization_profile(self): return Obj(set_shape=lambda *a: calls.append(("profile", a)))
        def build_serialized_network(self, network, config): return b"engine"

    class Parser:
        def __init__(self, network, logger): pass
        def parse_from_file(self, path):
            calls.append(("parse", path))
            return True

    flags = types.SimpleNamespace(FP16="FP16", TF32="TF32") if version < "11" else types.SimpleNamespace(TF32="TF32")
    return types.SimpleNamespace(
        __version__=version, Logger=type("Logger", (), {"WARNING": 0, "__init__": lambda self, level: None}),
        Builder=Builder, OnnxParser=Parser, BuilderFlag=flags,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))


@pytest.mark.parametrize("version,precision,network_flags,flag_calls", [
    ("10.13.3.9", "fp32", 0, [("clear", "TF32")]),
    ("10.13.3.9", "fp16", 0, [("set", "FP16")]),
    ("11.4.0.106", "fp32", 0, [("clear", "TF32")]),   # create_network(0) is strongly typed in 11
])
def test_build_engine_calls(monkeypatch, tmp_path, version, precision, network_flags, flag_calls):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(version, calls))
    options = te.EngineOptions(fp16=precision == "fp16", workspace_mib=512)
    te.build_engine(tmp_path / "model.onnx", tmp_path / "e.engine", options, tmp_path / "t.cache")
    assert ("create_network", network_flags) in calls
    assert [c for c in calls if c[0] in ("set", "clear")] == flag_calls
    assert ("workspace", "WORKSPACE", 512 << 20) in calls
    assert (tmp_path / "e.engine").read_bytes() == b"engine"


def test_build_engine_strongly_typed_on_10_passes_the_flag(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt("10.13.3.9", calls))
    te.build_engine(tmp_path / "m.onnx", tmp_path / "e", te.EngineOptions(), tmp_path / "t",
                    plan=te.BuilderPlan("fp32", True, (), ()))
    assert ("create_network", 1 << 1) in calls


def test_build_engine_fp16_on_11_from_the_fp16_graph_sets_no_flags(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt("11.4.0.106", calls))
    plan = te.builder_plan("11.4.0.106", "fp16", True)
    te.build_engine(tmp_path / "model.fp16.onnx", tmp_path / "e", te.EngineOptions(fp16=True), tmp_path / "t",
                    plan=plan)
    assert ("parse", str(tmp_path / "model.fp16.onnx")) in calls
    assert not [c for c in calls if c[0] in ("set", "clear")]


def test_failing_optimization_profile_raises(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt("10.13.3.9", [], profile_index=-1))
    with pytest.raises(te.EngineBuildError, match="refused the batch profile 1/8/32"):
        te.build_engine(tmp_path / "m.onnx", tmp_path / "e", te.EngineOptions(), tmp_path / "t")


def test_fp16_on_11_without_graph_is_refused_before_parsing(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt("11.4.0.106", calls))
    bundle = types.SimpleNamespace(method="diffusionad", onnx_fp16_path=None, onnx_path=tmp_path / "model.onnx")
    with pytest.raises(te.TensorRTUnavailable, match="re-export the bundle"):
        te.build_checked_engine(bundle, te.GpuInfo("Fake GPU", "9.0"), tmp_path / "e", te.EngineOptions(fp16=True))
    with pytest.raises(te.TensorRTUnavailable, match="re-export the bundle"):
        te.build_engine(tmp_path / "model.onnx", tmp_path / "e", te.EngineOptions(fp16=True), tmp_path / "t")
    assert calls == []


class FakeCudart:
    """cuda-python's runtime, with real host memory so pinned views can be read and written."""

    def __init__(self, fail_free=()):
        self.cudaError_t = types.SimpleNamespace(cudaSuccess=0)
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.memory, self.freed, self.fail_free, self.mallocs = {}, [], set(fail_free), []

    def _alloc(self, n):
        buf = ctypes.create_string_buffer(n)
        self.memory[ctypes.addressof(buf)] = buf
        self.mallocs.append(n)
        return 0, ctypes.addressof(buf)

    def cudaMalloc(self, n): return self._alloc(n)
    def cudaMallocHost(self, n): return self._alloc(n)
    def _free(self, p):
        self.freed.append(p)
        return (1 if p in self.fail_free else 0),
    def cudaFree(self, p): return self._free(p)
    def cudaFreeHost(self, p): return self._free(p)
    def cudaStreamCreate(self): return 0, 7
    def cudaStreamDestroy(self, s): return self._free(s)
    def cudaStreamSynchronize(self, s): return (0,)
    def cudaSetDevice(self, d): return (0,)
    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        return (0,)


def fake_engine():
    shapes = {}

    class Context:
        def set_input_shape(self, name, shape):
            shapes["n"] = shape[0]
            return True
        def get_tensor_shape(self, name): return (shapes["n"], 1, 2, 2) if name == "anomaly_map" else (shapes["n"],)
        def set_tensor_address(self, name, p): pass
        def execute_async_v3(self, stream): return True

    names = ["images", "anomaly_map", "score"]
    trt = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(OUTPUT="out", INPUT="in"),
                                nptype=lambda d: d)
    engine = types.SimpleNamespace(
        create_execution_context=Context, num_io_tensors=3, get_tensor_name=lambda i: names[i],
        get_tensor_mode=lambda n: "in" if n == "images" else "out",
        get_tensor_dtype=lambda n: np.uint8 if n == "images" else np.float32)
    return engine, trt


def test_engine_runner_grows_and_reuses_buffers_and_close_frees_all():
    engine, trt = fake_engine()
    cudart = FakeCudart()
    runner = te.EngineRunner(engine, device=0, trt=trt, cudart=cudart)
    runner(np.zeros((2, 3, 2, 2), np.uint8))
    first = len(cudart.mallocs)
    assert first == 6  # 3 device + 3 pinned
    runner(np.zeros((1, 3, 2, 2), np.uint8))
    assert len(cudart.mallocs) == first  # reused
    maps, scores = runner(np.zeros((4, 3, 2, 2), np.uint8))
    assert maps.shape == (4, 1, 2, 2) and scores.shape == (4,) and len(cudart.mallocs) == 2 * first
    pointers = [p for p, _ in [*runner._buffers.values(), *runner._host.values()]]
    cudart.fail_free = {pointers[0]}
    with pytest.raises(RuntimeError, match="CUDA runtime error"):
        runner.close()
    assert set(pointers) | {7} <= set(cudart.freed)  # every buffer and the stream tried despite the failure
    runner.close()  # nothing left


@pytest.mark.parametrize("visible,device,expected", [
    (None, 0, "0"), ("2,3", 0, "2"), ("2,3", 1, "3"), ("GPU-1234abcd", 0, "GPU-1234abcd"), ("", 0, None),
    ("-1", 0, None), ("5", 1, None)])
def test_nvidia_smi_id(visible, device, expected):
    assert te.nvidia_smi_id(device, visible) == expected


def test_nvidia_smi_uses_cuda_visible_devices(monkeypatch):
    seen = []

    def run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "NVIDIA H200, 9.0\n", "")

    monkeypatch.setattr(te.subprocess, "run", run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc,1")
    assert te._gpu_from_nvidia_smi(0) == te.GpuInfo("NVIDIA H200", "9.0")
    assert seen[-1][-2:] == ["-i", "GPU-abc"]


def test_lock_second_builder_sees_the_first_result(tmp_path):
    results, builds = {}, []

    def build():
        time.sleep(0.2)
        builds.append(1)
        results["done"] = {"status": "built"}
        return results["done"]

    def cached_now():
        return {"status": "cached"} if "done" in results else None

    out = []
    threads = [threading.Thread(target=lambda: out.append(te.build_under_lock(tmp_path, "x.engine", cached_now,
                                                                                build))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and sorted(r["status"] for r in out) == ["built", "cached"]
    assert (tmp_path / ".x.engine.lock").exists()


def test_unique_temp_names(tmp_path):
    a, b = te.unique_temp(tmp_path, ".e.", ".partial"), te.unique_temp(tmp_path, ".e.", ".partial")
    assert a != b and a.parent == tmp_path and a.name.startswith(".e.") and a.name.endswith(".partial")
    te._write_atomic(tmp_path / "f", b"data")
    assert (tmp_path / "f").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name, "f"])


def test_tensorrt_backend_pads_a_batch_below_the_profile_minimum(monkeypatch):
    """A batch smaller than the engine's min batch runs padded with copies of its last image, and only
    its own results come back; batches inside the profile run as they are. Checks our padding, not TensorRT."""
    from diffad.service.backends import EngineChoice, TensorRTBackend

    seen = []

    class FakeRunner:  # each image's score is its mean, so results show which image they belong to
        def __init__(self, engine):
            pass

        def __call__(self, images):
            seen.append(len(images))
            scores = images.reshape(len(images), -1).mean(axis=1).astype(np.float32)
            return np.broadcast_to(scores[:, None, None, None], (len(images), 1, 2, 2)).copy(), scores

    monkeypatch.setattr(te, "EngineRunner", FakeRunner)
    monkeypatch.setattr(te, "load_engine", lambda folder, record: object())
    bundle = types.SimpleNamespace(input=types.SimpleNamespace(dtype="uint8"), category_input=None)
    record = {"file": "model.x.trt10.16.1.11.fp16.engine", "precision": "fp16", "min_batch": 4, "max_batch": 16}
    backend = TensorRTBackend(bundle, EngineChoice("/nowhere", record, "bundle"))
    assert (backend.min_batch_size, backend.max_batch_size) == (4, 16)

    images = np.stack([np.full((3, 2, 2), v, np.uint8) for v in (10, 20)])
    maps, scores = backend(images)
    assert seen == [4], "two images padded to the minimum of four"
    assert scores.tolist() == [10.0, 20.0] and maps.shape == (2, 1, 2, 2)
    backend(np.zeros((5, 3, 2, 2), np.uint8))
    assert seen == [4, 5], "a batch inside the profile is not padded"


@pytest.mark.parametrize("or_fp32", [False, True])
def test_engines_cli_builds_fp32_for_a_bundle_without_the_fp16_graph_only_when_asked(monkeypatch, tmp_path, capsys,
                                                                                      or_fp32):
    """`diffad engines --fp16 --or-fp32` (what the container entrypoint runs): an old bundle on TensorRT 11 gets
    an fp32 engine and a warning; without --or-fp32 it fails with the reason. Our CLI's logic, not TensorRT."""
    from diffad import cli

    builds = []

    def fake_build(bundle_dir, cache_dir, options):
        builds.append(options.precision)
        if options.precision == "fp16":
            te.builder_plan("11.4.0.106", "fp16", has_fp16_graph=False)  # raises what the real build would
        return {"bundle": str(bundle_dir), "status": "built", "file": f"{cache_dir}/x.{options.precision}.engine"}

    monkeypatch.setattr(te, "missing_for_tensorrt", lambda: [])
    monkeypatch.setattr(te, "build_cached_engine", fake_build)
    monkeypatch.setattr("diffad.export.bundle.load_bundle", lambda path: None)
    argv = ["engines", str(tmp_path / "old_bundle"), "--cache-dir", str(tmp_path / "cache"), "--fp16"]
    status = cli.main(argv + (["--or-fp32"] if or_fp32 else []))
    out, err = capsys.readouterr()
    assert "needs the bundle's fp16 graph" in err
    if or_fp32:
        assert status == 0 and builds == ["fp16", "fp32"]
        assert "Building an fp32 engine instead" in err and "x.fp32.engine" in out
    else:
        assert status == 1 and builds == ["fp16"] and "error:" in err
