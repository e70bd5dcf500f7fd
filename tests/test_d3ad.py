"""D3AD: the noise-free, input-guided DDIM, the score-to-noise-level rule, batch invariance with a start step
per image, and a tiny model exported in d3ad mode and served."""

import asyncio
import io
import json

import numpy as np
import pytest
import torch
from diffad.evaluation.evaluate import CALIBRATION_FILE
from diffad.export.bundle import load_bundle
from diffad.export.exporter import ExportOptions, export_bundle
from diffad.export.parity import onnxruntime_runner
from diffad.models import checkpoint as ckpt
from diffad.models.d3ad import (
    D3ADConfig,
    guided_reconstruction,
    score_bins,
    score_histogram_edges,
    start_steps,
    timesteps,
)
from diffad.models.diffusionad import DiffusionAD, ModelConfig
from PIL import Image
from test_service import make_settings, serving
from tiny_models import perturbed_tiny_model


# --- the reconstruction rule, by hand ----------------------------------------------------------------
def test_noise_free_start_and_one_guided_step_by_hand():
    alpha_bar = torch.tensor([0.99, 0.9, 0.8, 0.7, 0.64])
    calls = []

    def eps_model(x_t, t):
        calls.append((x_t.clone(), t.clone()))
        return torch.full_like(x_t, 0.5)

    x = torch.tensor([1.0, -2.0]).view(2, 1, 1, 1)
    out = guided_reconstruction(eps_model, alpha_bar, x, torch.tensor([4, 4]), steps=1, w=2.0, bounds=(-10.0, 10.0))
    # start: sqrt(0.64) x, no noise
    assert torch.allclose(calls[0][0].flatten(), torch.tensor([0.8, -1.6])) and calls[0][1].tolist() == [4, 4]
    # y_t = 0.8 x + 0.6 * 0.5; eps_hat = 0.5 - 2 * 0.6 * (y_t - x_t) = 0.5 - 1.2 * 0.3 = 0.14;
    # x0 = (x_t - 0.6 * 0.14) / 0.8 = x - 0.105; the last step goes to alpha 1: the result is x0
    assert torch.allclose(out.flatten(), torch.tensor([0.895, -2.105]))
    # and x0 is clipped to the pixel range
    clipped = guided_reconstruction(eps_model, alpha_bar, x, torch.tensor([4, 4]), 1, 2.0, (-1.0, 1.0))
    assert torch.allclose(clipped.flatten(), torch.tensor([0.895, -1.0]))


def test_timesteps_run_evenly_from_each_start_to_clean():
    start = torch.tensor([10, 128])
    steps = [timesteps(start, k, 4).tolist() for k in range(5)]
    assert steps == [[10, 128], [8, 96], [5, 64], [2, 32], [-1, -1]]  # rounded; -1 = the clean image
    alpha_bar = torch.linspace(0.999, 0.5, 200)
    seen = []
    guided_reconstruction(lambda x_t, t: seen.append(t.tolist()) or torch.zeros_like(x_t), alpha_bar,
                          torch.zeros(2, 1, 2, 2), start, 4, 4.0, (-1.0, 1.0))
    assert seen == steps[:4], "one UNet pass per step, each image at its own timestep"


# --- the noise level per image: the paper's rule -----------------------------------------------------
def test_score_bins_follow_the_papers_digitize_rule_and_levels():
    edges = score_histogram_edges(np.linspace(0.0, 1.0, 50))
    assert np.allclose(edges, np.linspace(0.0, 1.0, 11))
    scores = np.array([-0.5, 0.0, 0.05, 0.15, 0.55, 0.999, 1.0, 5.0])
    bins = score_bins(torch.tensor(scores), torch.tensor(edges)).tolist()
    # the paper's code: b = digitize(s, edges, right=True) - 1; b = min(b, len(edges) - 2) + 1
    paper = [min(int(np.digitize(s, edges, right=True)) - 1, len(edges) - 2) + 1 for s in scores]
    assert bins == paper == [0, 0, 1, 2, 6, 10, 10, 10]
    # T = max(b, 2) / 10 x max_step: 0.2 .. 1 of the highest level
    assert start_steps(torch.tensor(bins), 128).tolist() == [26, 26, 26, 26, 77, 128, 128, 128]
    with pytest.raises(ValueError, match="at least 2 good images"):
        score_histogram_edges(np.array([0.3]))


def test_d3ad_config_is_checked_and_travels_with_the_model():
    with pytest.raises(ValueError, match="needs bin_edges"):
        D3ADConfig(mode="dynamic")
    with pytest.raises(ValueError, match="11 ascending values"):
        D3ADConfig(mode="dynamic", bin_edges=tuple(range(10, -1, -1)))
    with pytest.raises(ValueError, match="mode must be one of off, fixed, dynamic"):
        D3ADConfig(mode="d3ad")
    config = perturbed_tiny_model().config
    config.d3ad = D3ADConfig(mode="dynamic", bin_edges=tuple(np.linspace(0, 1, 11)), w=3.0)
    again = ModelConfig.from_dict(json.loads(config.to_json()))
    assert again.d3ad == config.d3ad
    old = config.to_dict()
    del old["d3ad"]
    assert ModelConfig.from_dict(old).d3ad.mode == "off", "a model file from before D3AD is one-step"


def spread_edges(model: DiffusionAD, images: torch.Tensor) -> tuple[float, ...]:
    """Bin edges over these images' own one-step scores, so that they fall into different bins."""
    with torch.no_grad():
        _, scores = model(images)
    return score_histogram_edges(scores.numpy())


def test_batch_invariance_with_a_start_step_per_image():
    model = perturbed_tiny_model()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    images[3:] = images[3:] * 0.3  # darker ones score differently
    model.set_d3ad(D3ADConfig(mode="dynamic", bin_edges=spread_edges(model, images)))
    with torch.no_grad():
        starts = model.d3ad_start_steps(images)
        assert len(set(starts.tolist())) >= 3, f"the test needs different start steps in one batch, got {starts}"
        maps, scores = model(images)
        for i in range(len(images)):
            alone_map, alone_score = model(images[i:i + 1])
            assert torch.allclose(alone_map, maps[i:i + 1], atol=1e-5) and torch.allclose(alone_score, scores[i:i + 1],
                                                                                          atol=1e-6)
        one_step = DiffusionAD(model.config)  # the mode changes the output: it is not the one-step graph
        one_step.load_state_dict(model.state_dict())
        one_step.set_d3ad(D3ADConfig())
        assert not torch.allclose(one_step.eval()(images)[1], scores)


# --- export and serve ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def d3ad_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "weave"
    model = perturbed_tiny_model()
    model.set_d3ad(D3ADConfig(steps=3))  # 3 guided DDIM steps, not the paper's 10: a graph 3x faster to export
    ckpt.save_model(run / ckpt.MODEL_FILE, model)
    (run / CALIBRATION_FILE).write_text(json.dumps({"threshold": 0.5, "method": "f1", "score_min": 0.0,
                                                    "score_max": 1.0, "num_images": 4}))
    good = run.parent / "held_out"
    good.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = good / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (run / ckpt.CONFIG_FILE).write_text(json.dumps({"held_out_images": paths}))
    return run


def test_export_in_d3ad_mode_and_serve_it(d3ad_run, tmp_path):
    out = tmp_path / "bundle"
    manifest = export_bundle(d3ad_run, out, ExportOptions(mode="d3ad", fp16_graph=False))
    assert manifest["reconstruction"]["mode"] == "d3ad"
    d3ad = manifest["reconstruction"]["d3ad"]
    assert d3ad["mode"] == "dynamic" and len(d3ad["bin_edges"]) == 11 and d3ad["steps"] == 3
    assert manifest["onnx"]["parity"]["passed"], "the graph holds both passes and matches PyTorch"
    assert manifest["threshold"] != 0.5, "the run's one-step threshold does not carry over to D3AD scores"
    # the weights file carries the mode too, so the torch backend serves what the graph computes
    model = ckpt.load_model(out / "model.safetensors")
    assert model.config.d3ad.mode == "dynamic"

    # the graph: the held-out images themselves span the bins (their scores made the edges), so one batch
    # of them holds several start steps; each image's result is the one it gets alone
    held = np.stack([np.asarray(Image.open(p)) for p in json.loads((d3ad_run / ckpt.CONFIG_FILE).read_text())
                     ["held_out_images"]]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        starts = model.d3ad_start_steps(torch.from_numpy(held).float() / 255)
    assert len(set(starts.tolist())) >= 2, starts
    run_graph = onnxruntime_runner(out / "model.onnx")
    maps, scores = run_graph(held)
    for i in range(len(held)):
        alone_map, alone_score = run_graph(held[i:i + 1])
        assert np.allclose(alone_map, maps[i:i + 1], atol=1e-5) and np.allclose(alone_score, scores[i:i + 1],
                                                                                atol=1e-6)

    async def inspect():
        buffer = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buffer, "PNG")
        async with serving(make_settings(out)) as (_, client):
            response = await client.post("/inspect", params={"map": "none"},
                                         files={"file": ("part.png", buffer.getvalue(), "image/png")})
            return response.status_code, response.json()

    status, body = asyncio.run(inspect())
    assert status == 200 and body["threshold"] == pytest.approx(load_bundle(out).threshold)
    with torch.no_grad():
        _, expected = model(torch.full((1, 3, 32, 32), 128 / 255))
    assert body["image_score"] == pytest.approx(float(expected[0]), abs=1e-4), "served score = the D3AD model's"


def test_d3ad_export_needs_good_images(tmp_path):
    run = tmp_path / "run"
    ckpt.save_model(run / ckpt.MODEL_FILE, perturbed_tiny_model())
    with pytest.raises(ValueError, match="--good-images DIR"):
        export_bundle(run, tmp_path / "bundle", ExportOptions(mode="d3ad"))
    assert not (tmp_path / "bundle").exists()
