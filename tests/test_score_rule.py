"""The image score's rule: z against good images' per-pixel maps, chosen on validation, for both methods."""

import numpy as np
import pytest
import torch
from diffad.models import checkpoint as ckpt
from diffad.models.decodiff import DeCoDiff
from diffad.models.diffusionad import DiffusionAD
from diffad.models.map_reference import squash
from diffad.models.presets import decodiff_preset, preset
from diffad.training import decodiff as decodiff_training
from diffad.training import trainer
from diffad.training.trainer import ValidationSet

SIZE = 32


def rim_maps(rng: np.random.Generator, count: int) -> np.ndarray:
    """Maps [N, 32, 32] of good parts: dim everywhere, and bright along one edge (an object's rim)."""
    maps = rng.uniform(0, 0.1, (count, SIZE, SIZE)).astype(np.float32)
    maps[:, 0, :] += rng.uniform(0.5, 0.9, (count, 1)).astype(np.float32)
    return maps


def select(method: str, maps: np.ndarray, labels: np.ndarray, monkeypatch):
    """(model, result): the method's own score-rule selection on validation maps [N, 32, 32]."""
    if method == "decodiff":
        model = DeCoDiff(decodiff_preset("tiny", ("tire",), SIZE, 1)).eval()
        model.map_reference.fit(0, torch.from_numpy(rim_maps(np.random.default_rng(1), 64))[:, None])
        return model, decodiff_training.select_score_rule(model, {"tire": maps}, {"tire": labels})
    model = DiffusionAD(preset("tiny", in_channels=1)).eval()
    model.config.top_k = 4  # not among the other candidates, so that a tie shows it is kept
    model.map_reference.fit(0, torch.from_numpy(rim_maps(np.random.default_rng(1), 64))[:, None])
    monkeypatch.setattr(trainer, "predict", lambda m, images, *a, **k: (maps, None))
    vset = ValidationSet(np.zeros((len(maps), SIZE, SIZE, 1), np.float32), np.zeros_like(maps), labels, "test")
    return model, trainer.select_score_rule(model, vset)


@pytest.mark.parametrize("method, own_top_k", [("decodiff", 1), ("diffusionad", 4)])
def test_score_rule_is_chosen_on_validation_and_ties_keep_the_methods_own(method, own_top_k, monkeypatch):
    rng = np.random.default_rng(0)
    maps, labels = rim_maps(rng, 40), np.repeat([0, 1], 20)
    maps[20:, 16, 16] += 0.3  # the defects: faint, where good parts are dark, far below the rim
    model, result = select(method, maps, labels, monkeypatch)
    assert result["scores"]["map top-1"] < 0.75 and result["scores"]["reference top-1"] == 1.0
    assert len(result["scores"]) == 2 * len({1, 10, 50, own_top_k})
    assert result["chosen"]["score_reference"] and model.config.score_reference
    assert model.config.top_k == result["chosen"]["top_k"]

    flat = np.zeros((4, SIZE, SIZE), np.float32)  # nothing tells good from bad: every rule ties at 0.5
    model, result = select(method, flat, np.array([0, 0, 1, 1]), monkeypatch)
    assert result["chosen"] == result["default"] == {"score_reference": False, "top_k": own_top_k}
    assert not model.config.score_reference and model.config.top_k == own_top_k


def test_diffusionad_score_against_the_reference_by_hand():
    model = DiffusionAD(preset("tiny", in_channels=1)).eval()
    model.config.top_k = 3
    maps = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model.score(maps), maps.flatten(1).topk(3, dim=1).values.mean(dim=1))
    good = torch.rand(6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    model.map_reference.fit(0, good)
    model.config.score_reference = True
    z = (maps - good.mean(0)) / (good.std(0, unbiased=False) + 0.01)
    expected = squash(z.flatten(1).topk(3, dim=1).values.mean(dim=1))
    torch.testing.assert_close(model.score(maps), expected)
    assert torch.all((model.score(maps) > 0) & (model.score(maps) < 1))
    # the map itself is not changed, and each image is scored on its own
    images = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    batch_maps, batch_scores = model(images)
    one_map, one_score = model(images[1:2])
    torch.testing.assert_close(batch_maps[1:2], one_map)
    torch.testing.assert_close(batch_scores[1:2], one_score)


def new_model(method: str):
    if method == "decodiff":
        return DeCoDiff(decodiff_preset("tiny", ("a",), SIZE, 1)).eval()
    return DiffusionAD(preset("tiny", in_channels=1)).eval()


@pytest.mark.parametrize("method", ["decodiff", "diffusionad"])
def test_model_files_from_before_the_map_reference_still_load(method, tmp_path):
    from safetensors.torch import load_file, save_file

    model = new_model(method)
    images = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    before = model(images)[1]
    ckpt.save_model(tmp_path / "m.safetensors", model)
    tensors = load_file(tmp_path / "m.safetensors")
    metadata = ckpt.read_metadata(tmp_path / "m.safetensors")
    old = {k: v for k, v in tensors.items() if "map_reference" not in k}
    assert len(old) < len(tensors), "the reference is saved with the model"
    save_file(old, tmp_path / "old.safetensors", metadata=metadata)
    loaded = ckpt.load_model(tmp_path / "old.safetensors")
    assert torch.all(loaded.map_reference.mean == 0) and torch.all(loaded.map_reference.inverse_std == 1)
    assert not loaded.config.score_reference
    torch.testing.assert_close(loaded(images)[1], before)


def test_training_states_from_before_the_map_reference_resume(tmp_path):
    from safetensors.torch import load_file, save_file

    model = new_model("diffusionad")
    optimizer = trainer.make_optimizer(model, trainer.TrainConfig())
    ckpt.save_training_state(tmp_path / "s.safetensors", model, optimizer, 7, ema=new_model("diffusionad"))
    tensors = load_file(tmp_path / "s.safetensors")
    metadata = ckpt.read_metadata(tmp_path / "s.safetensors")
    save_file({k: v for k, v in tensors.items() if "map_reference" not in k}, tmp_path / "old.safetensors",
              metadata=metadata)
    resumed, ema = new_model("diffusionad"), new_model("diffusionad")
    resumed.map_reference.mean.fill_(1.0)
    step = ckpt.load_training_state(tmp_path / "old.safetensors", resumed,
                                    trainer.make_optimizer(resumed, trainer.TrainConfig()), ema)
    assert step == 7 and torch.all(resumed.map_reference.mean == 0) and torch.all(ema.map_reference.mean == 0)
