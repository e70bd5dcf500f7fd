"""Checkpoints in safetensors, with the configuration as JSON: no pickles anywhere.

Two kinds of file:
- a model file (`model.safetensors`): the weights and buffers (the fixed noise among them), with the
  model configuration in the file's metadata, so the file alone rebuilds the model;
- a training state (`checkpoints/step_XXXXXXX.safetensors`): the model, its moving average (EMA) when
  training keeps one, the optimiser's moments and the step, for resuming.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .decodiff import METHOD as DECODIFF
from .decodiff import DeCoDiff, DeCoDiffConfig
from .diffusionad import DiffusionAD, ModelConfig

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A missing, corrupted or incompatible checkpoint; the message names the file."""


def _tensors(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_model(path: str | Path, model: DiffusionAD, metadata: dict | None = None) -> None:
    meta = {"config": model.config.to_json(), "format": "diffad-model-1", **(metadata or {})}
    _atomic_save(_tensors(model), Path(path), {k: str(v) for k, v in meta.items()})


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupted or unreadable checkpoint {path}: {e}") from e


def load_model(path: str | Path) -> DiffusionAD:
    """A model from a model file, a training state, or a run folder (its model.safetensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    meta = read_metadata(path)
    if "config" not in meta:
        raise CheckpointError(f"{path} has no model configuration in its metadata: not a diffad checkpoint")
    config = json.loads(meta["config"])
    model = (DeCoDiff(DeCoDiffConfig.from_dict(config)) if config.get("method") == DECODIFF
             else DiffusionAD(ModelConfig.from_dict(config)))
    state = _load_tensors(path)
    weights = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith(("optimizer.", "ema."))}
    _identity_reference_if_missing(model, weights)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match its own configuration: {e}") from e
    return model.eval()


def save_training_state(path: str | Path, model: DiffusionAD, optimizer: torch.optim.Optimizer,
                        step: int, metadata: dict | None = None, ema: DiffusionAD | None = None) -> None:
    """Model, EMA, Adam moments and step: everything needed to continue exactly where training stopped."""
    tensors = _tensors(model, "model.")
    if ema is not None:
        tensors.update(_tensors(ema, "ema."))
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    meta = {
        "config": model.config.to_json(),
        "format": "diffad-training-1",
        "step": str(step),
        "param_groups": json.dumps(opt["param_groups"]),
        **{k: str(v) for k, v in (metadata or {}).items()},
    }
    _atomic_save(tensors, Path(path), meta)


def load_training_state(path: str | Path, model: DiffusionAD, optimizer: torch.optim.Optimizer,
                        ema: DiffusionAD | None = None) -> int:
    """Restore model, EMA (a state without one starts it from the model) and optimiser in place; returns the
    step the state was saved at."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != "diffad-training-1":
        raise CheckpointError(f"{path} is not a diffad training state (format {meta.get('format')!r})")
    tensors = _load_tensors(path)
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(_identity_reference_if_missing(model, weights))
    if ema is not None:
        averaged = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        ema.load_state_dict(_identity_reference_if_missing(ema, averaged) if averaged else model.state_dict())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = json.loads(meta["param_groups"])
    for group in groups:  # JSON has no tuples; Adam compares betas as one
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return int(meta["step"])


def _identity_reference_if_missing(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict:
    """Files from before the score's map reference lack it: theirs is the identity, which leaves their scores
    as they were."""
    reference = model.map_reference
    weights.setdefault("map_reference.mean", torch.zeros_like(reference.mean))
    weights.setdefault("map_reference.inverse_std", torch.ones_like(reference.inverse_std))
    return weights


def latest_training_state(run_dir: str | Path) -> Path | None:
    states = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step_*.safetensors"))
    return states[-1] if states else None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupted or unreadable checkpoint {path}: {e}") from e


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary name, then rename: an interrupted save never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
