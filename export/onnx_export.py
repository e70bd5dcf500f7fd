"""The whole one-step inference as one ONNX graph: images in, anomaly map and image score out.

The graph holds everything a server would otherwise have to re-implement: the uint8 -> [0, 1] cast,
the [-1, 1] normalisation, the noising at t_s and t_l with the model's fixed noise (stored in the graph
as initializers), both UNet passes as one batched call, the norm-guided blend and clip, the segmentation
network, the sigmoid and the top-k mean score. The noise is the same for every image of a batch, so an
image's score never depends on what else is in the batch; the batch axis is dynamic.

Exporter: torch.onnx's dynamo exporter (torch.export + onnxscript), the default since torch 2.9; the
TorchScript exporter still works but is deprecated and slated for removal. The exported graph then goes
through ONNX Runtime's *basic* offline optimisation (constant folding, redundant-node removal, conv +
BN/add/mul fusion), which rewrites with standard ONNX operators only, so the optimised file still runs on
any provider and parses in TensorRT. Extended and higher levels are not saved: they insert
com.microsoft fused operators (FusedConv, QuickGelu) that only ONNX Runtime's CPU/CUDA providers know.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from ..models.diffusionad import DiffusionAD
from .bundle import CATEGORY_INPUT, INPUT_DTYPES, INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT

log = logging.getLogger("diffad.export")

# The dynamo exporter's operator library starts at opset 18. It would try to convert down to 17, but the
# ONNX version converter fails on this graph (ReduceMean's axes become a runtime input at 18) and the
# exporter then silently keeps 18, so 18 is the floor here. TensorRT 10 and ONNX Runtime 1.18+ read it.
DEFAULT_OPSET = 18
MIN_OPSET = 18
OPTIMIZATION = "onnxruntime ORT_ENABLE_BASIC (offline, standard ONNX operators only)"
EXAMPLE_BATCH = 2    # torch.export specialises a batch of 1; any other size keeps the axis symbolic
NETWORK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
MAX_BATCH = 4096     # the symbolic batch's upper bound, recorded in the graph; engines choose their own


class InferenceGraph(nn.Module):
    """A model's whole inference behind the bundle's input contract (uint8 or float32 NCHW): DiffusionAD's
    one-step pipeline, or DeCo-Diff's correction (models/decodiff.py: its UNet calls unrolled), each a module
    whose forward takes images in [0, 1] and returns (map, score). With `category_input` (a multi-category
    DeCo-Diff model) the graph takes each image's category index as a second input; without, a DeCo-Diff
    graph holds its model's category as a constant."""

    def __init__(self, model: DiffusionAD, input_dtype: str = "uint8", category_input: bool = False):
        super().__init__()
        if input_dtype not in INPUT_DTYPES:
            raise ValueError(f"input dtype must be one of {', '.join(INPUT_DTYPES)}, got {input_dtype!r}")
        self.model = model
        self.input_dtype = input_dtype
        self.category_input = category_input

    def forward(self, images: torch.Tensor,
                categories: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_dtype == "uint8":
            images = images.to(torch.float32) / 255.0
        if self.category_input:  # DeCo-Diff: each image's class embedding and map reference, gathered by index
            return self.model(images, categories)
        # DiffusionAD.forward is the pipeline: normalise, noise at t_s and t_l with the fixed noise buffer,
        # one batched UNet call, guided blend + clip, segmentation, sigmoid, top-k mean.
        return self.model(images)


@dataclass(frozen=True)
class OnnxExport:
    """What was exported, for bundle.json."""

    path: Path
    opset: int
    input_dtype: str
    exporter: str
    optimization: str
    num_nodes: int
    network_dtype: str = "float32"

    def to_dict(self) -> dict:
        return {"file": self.path.name, "opset": self.opset, "input_dtype": self.input_dtype,
                "network_dtype": self.network_dtype, "exporter": self.exporter, "optimization": self.optimization,
                "num_nodes": self.num_nodes}


def example_batch(model: DiffusionAD, input_dtype: str, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    cfg = model.config
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    g = torch.Generator().manual_seed(0)
    if input_dtype == "uint8":
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    return torch.rand(shape, generator=g)


def example_categories(model, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    """Category indices for the example batch, as the graph's category input takes them (int64 [batch])."""
    return torch.arange(batch, dtype=torch.int64) % len(model.config.categories)


def export_onnx(model: DiffusionAD, path: str | Path, input_dtype: str = "uint8",
                opset: int = DEFAULT_OPSET, network_dtype: str = "float32",
                category_input: bool = False) -> OnnxExport:
    """Export, check and optimise the one-step pipeline into `path` (a single self-contained .onnx file).
    category_input: a multi-category DeCo-Diff model's graph, which takes each image's category index as its
    second input (CATEGORY_INPUT) instead of holding one category as a constant.

    network_dtype "float16" writes the mixed-precision graph that TensorRT 11 builds fp16 engines from (it
    has no FP16 builder flag: a strongly typed network computes in the types the graph states): both networks
    with fp16 weights and compute, everything DiffusionAD.set_network_dtype keeps in fp32 in fp32, the same
    uint8 input and fp32 outputs. That graph is saved as the exporter wrote it: ONNX Runtime's offline
    optimisation on the CPU would wrap every fp16 operator it lacks in Casts to fp32 and save them.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be at least {MIN_OPSET}, got {opset}")
    if network_dtype not in NETWORK_DTYPES:
        raise ValueError(f"network dtype must be one of {', '.join(NETWORK_DTYPES)}, got {network_dtype!r}")
    path = Path(path)
    model = model.eval()  # BatchNorm must use its running statistics, not the batch's
    if network_dtype != "float32":
        model = copy.deepcopy(model).set_network_dtype(NETWORK_DTYPES[network_dtype])
    graph = InferenceGraph(model, input_dtype, category_input).eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    args, input_names, dynamic_shapes = (example_batch(model, input_dtype),), [INPUT_NAME], ({0: batch},)
    if category_input:
        args, input_names, dynamic_shapes = (*args, example_categories(model)), [*input_names, CATEGORY_INPUT], \
            (*dynamic_shapes, {0: batch})
    with tempfile.TemporaryDirectory(prefix="diffad-onnx-") as tmp:
        raw = Path(tmp) / "exported.onnx"
        log.info("exporting the %s pipeline to ONNX (opset %d, %s input)",
                 getattr(model.config, "method", "diffusionad"), opset, input_dtype)
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                graph, args, dynamo=True, opset_version=opset,
                input_names=input_names, output_names=[MAP_OUTPUT, SCORE_OUTPUT],
                dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)
        program.save(str(raw), external_data=False)
        onnx.checker.check_model(str(raw), full_check=True)
        got = _default_opset(onnx.load(str(raw), load_external_data=False))
        if got != opset:
            raise RuntimeError(f"asked the exporter for opset {opset} but it produced opset {got}")
        if network_dtype == "float32":
            optimize_onnx(raw, path)
        else:
            shutil.copyfile(raw, path)
    check_interface(path, model.config.in_channels, model.config.image_size, input_dtype, category_input)
    num_nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    log.info("wrote %s (%d nodes, %.1f MB, networks in %s)", path, num_nodes, path.stat().st_size / 1e6,
             network_dtype)
    optimization = (f"{OPTIMIZATION}, onnxruntime {ort.__version__}" if network_dtype == "float32"
                    else "the exporter's own (onnxscript) only: see export_onnx")
    return OnnxExport(path, opset, input_dtype, f"torch.onnx dynamo (torch {torch.__version__})", optimization,
                      num_nodes, network_dtype)


def optimize_onnx(source: Path, target: Path) -> None:
    """ONNX Runtime's basic offline optimisation, saved as a portable model (see the module docstring)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(target))
    foreign = sorted({n.domain for n in optimized.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise RuntimeError(f"ONNX Runtime's basic optimisation left non-standard operators ({', '.join(foreign)})")
    # ORT declares every domain it knows; keep only the ones the graph uses, so other runtimes see a
    # plain ONNX model.
    used = {n.domain for n in optimized.graph.node} | {""}
    kept = [o for o in optimized.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del optimized.opset_import[:]
    optimized.opset_import.extend(kept)
    onnx.checker.check_model(optimized, full_check=True)
    onnx.save(optimized, str(target))


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def check_interface(path: Path, channels: int, size: int, input_dtype: str, category_input: bool = False) -> None:
    """The saved graph has the bundle's contract: input `images` (and, for a multi-category graph, `category`,
    int64 [batch]), outputs map and score, dynamic batch."""
    model = onnx.load(str(path), load_external_data=False)
    elem = {"uint8": onnx.TensorProto.UINT8, "float32": onnx.TensorProto.FLOAT}[input_dtype]
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    expected = [INPUT_NAME, CATEGORY_INPUT] if category_input else [INPUT_NAME]
    problems = []
    if [i.name for i in inputs] != expected:
        problems.append(f"inputs are {[i.name for i in inputs]}, expected {expected}")
    else:
        if category_input:
            tensor = inputs[1].type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            if tensor.elem_type != onnx.TensorProto.INT64 or len(dims) != 1 or not isinstance(dims[0], str):
                problems.append(f"input {CATEGORY_INPUT} is {onnx.TensorProto.DataType.Name(tensor.elem_type)} "
                                f"{dims}, expected int64 [batch]")
        tensor = inputs[0].type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        if tensor.elem_type != elem:
            problems.append(f"input type {onnx.TensorProto.DataType.Name(tensor.elem_type)}, expected {input_dtype}")
        if len(dims) != 4 or not isinstance(dims[0], str) or dims[1:] != [channels, size, size]:
            problems.append(f"input shape {dims}, expected [batch, {channels}, {size}, {size}]")
    outputs = [o.name for o in model.graph.output]
    if outputs != [MAP_OUTPUT, SCORE_OUTPUT]:
        problems.append(f"outputs are {outputs}, expected ['{MAP_OUTPUT}', '{SCORE_OUTPUT}']")
    if problems:
        raise RuntimeError(f"exported graph {path} breaks the bundle contract: " + "; ".join(problems))


class _quiet_exporter:
    """The exporter narrates every stage and warns about torchvision ops this model never uses."""

    def __enter__(self):
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir"):
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.ERROR)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        return False
