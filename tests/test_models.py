"""The networks and the one-step pipeline: shapes, determinism, reconstruction rules, presets."""

import json

import pytest
import torch
from diffad.models.diffusionad import DiffusionAD, ModelConfig
from diffad.models.presets import count_parameters, describe, preset, top_k_for
from torch import nn


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = DiffusionAD(preset("tiny", in_channels=3)).eval()
    # Non-trivial weights everywhere (zero-initialised output layers would hide bugs).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_shapes(tiny):
    x = torch.rand(3, 3, 32, 32)
    assert tiny.unet(x, torch.tensor([0, 200, 999])).shape == x.shape
    assert tiny.segment(x, x).shape == (3, 1, 32, 32)
    anomaly_map, score = tiny(x)
    assert anomaly_map.shape == (3, 1, 32, 32) and score.shape == (3,)
    assert anomaly_map.min() >= 0 and anomaly_map.max() <= 1


def test_score_is_mean_of_top_k(tiny):
    anomaly_map = torch.rand(2, 1, 32, 32)
    k = tiny.config.top_k
    expected = torch.sort(anomaly_map.flatten(1), descending=True).values[:, :k].mean(1)
    assert torch.allclose(tiny.score(anomaly_map), expected)


@torch.no_grad()
def test_result_does_not_depend_on_batch(tiny):
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batch_maps, batch_scores = tiny(images)
    for i in range(5):
        m, s = tiny(images[i:i + 1])
        assert torch.allclose(m, batch_maps[i:i + 1], atol=1e-5)
        assert torch.allclose(s, batch_scores[i:i + 1], atol=1e-6)
    # and the same image twice gets the same score: the noise is fixed
    assert torch.equal(tiny(images[:2])[1], tiny(images[:2])[1])


def test_fixed_noise_follows_the_seed():
    a, b = DiffusionAD(preset("tiny")), DiffusionAD(preset("tiny"))
    assert torch.equal(a.noise, b.noise)
    cfg = preset("tiny")
    cfg.noise_seed = 7
    assert not torch.equal(DiffusionAD(cfg).noise, a.noise)
    assert a.noise.shape == (2, 3, 32, 32)
    assert "noise" in a.state_dict()  # saved with the weights


class OracleUNet(nn.Module):
    """Predicts the exact noise that takes a known clean image to x_t."""

    def __init__(self, schedule, x0):
        super().__init__()
        self.schedule, self.x0 = schedule, x0

    def forward(self, x_t, t):
        n = self.x0.shape[0]
        chunks = range(0, x_t.shape[0], n)  # the pipeline stacks the t_s and t_l batches
        return torch.cat([self.schedule.predict_eps(x_t[i:i + n], t[i:i + n], self.x0) for i in chunks])


@torch.no_grad()
def test_reconstructions_with_a_perfect_unet_return_the_image():
    model = DiffusionAD(preset("tiny", in_channels=1)).eval()
    x0 = torch.rand(2, 1, 32, 32) * 1.8 - 0.9
    model.unet = OracleUNet(model.schedule, x0)
    assert torch.allclose(model.reconstruct(x0), x0, atol=1e-4)
    assert torch.allclose(model.reconstruct_ddim(x0, 10), x0, atol=1e-4)


def test_config_round_trip():
    cfg = preset("small", image_size=64, in_channels=1)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.unet.in_channels == 1 and again.segmentation.in_channels == 2


def test_config_rejects_bad_steps():
    with pytest.raises(ValueError, match="t_s"):
        ModelConfig(t_s=400, t_l=200)


def test_unet_rejects_indivisible_size():
    with pytest.raises(ValueError, match="divisible"):
        DiffusionAD(preset("small", image_size=100))


def test_top_k_scales_with_area():
    assert top_k_for(256) == 50
    assert top_k_for(128) == 12
    assert top_k_for(16) == 1


def test_paper_preset_has_the_published_size():
    model = DiffusionAD(preset("paper"))
    # The paper: about 132 M (UNet) and 28 M (segmentation); this implementation is within 15 %/35 %.
    assert 112e6 < count_parameters(model.unet) < 152e6
    assert 20e6 < count_parameters(model.segmentation) < 40e6
    assert model.config.image_size == 256 and model.config.top_k == 50


def test_cost_counts_both_unet_passes():
    model = DiffusionAD(preset("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cost = describe(model)
    assert model.training  # mode restored, and counting changed no statistics
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert cost["pipeline_gmac_per_image"] == pytest.approx(2 * cost["unet_gmac_per_pass"] + cost["segmentation_gmac"])
    bigger = describe(DiffusionAD(preset("tiny", image_size=64)))
    # convolutions dominate: about 4x the MACs at twice the side
    assert 3.5 < bigger["pipeline_gmac_per_image"] / cost["pipeline_gmac_per_image"] < 4.5
    # training runs the networks channels-last: the same model costs the same (and stays in its layout)
    model.to(memory_format=torch.channels_last)
    assert describe(model) == cost
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_map_smoothing_keeps_flat_maps_and_spreads_peaks():
    from diffad.models.diffusionad import gaussian_kernel, smooth_map

    kernel = gaussian_kernel(2.0)
    assert kernel.sum().item() == pytest.approx(1.0) and kernel.numel() == 2 * 8 + 1
    flat = torch.full((2, 1, 16, 16), 0.3)
    assert torch.allclose(smooth_map(flat, kernel), flat, atol=1e-6)  # reflected borders: no dark rim
    peak = torch.zeros(1, 1, 33, 33)
    peak[0, 0, 16, 16] = 1.0
    out = smooth_map(peak, kernel)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5) and out.max() < 0.1
    assert torch.allclose(out[0, 0], out[0, 0].T, atol=1e-7)  # the same along both axes


def test_standardisation_and_smoothing_are_part_of_the_model():
    config = preset("tiny", in_channels=3)
    config.input_mean, config.input_std, config.map_sigma = (0.4, 0.5, 0.6), (0.1, 0.2, 0.3), 1.0
    model = DiffusionAD(config).eval()
    images = torch.rand(2, 3, 32, 32)
    x = model.normalize(images)
    assert torch.allclose(x[:, 1], (images[:, 1] - 0.5) / 0.2)
    low, high = model.pixel_bounds
    assert torch.allclose(low.flatten(), torch.tensor([-4.0, -2.5, -2.0]))
    assert torch.allclose(high.flatten(), torch.tensor([6.0, 2.5, 4 / 3]))
    recon = model.reconstruct(x)
    assert (recon >= low - 1e-6).all() and (recon <= high + 1e-6).all()  # clipped to valid pixels
    with torch.no_grad():
        anomaly_map, score = model(images)
        alone = model(images[1:])[1]
    assert torch.allclose(score[1:], alone, atol=1e-6)  # smoothing keeps images apart
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="input_std"):
        ModelConfig(in_channels=1, input_std=(0.0,))


@torch.no_grad()
def test_difference_input_makes_the_map_depend_on_the_reconstruction_only():
    torch.manual_seed(0)
    cfg = preset("tiny", in_channels=3)
    cfg.segmentation_input = "difference"
    model = DiffusionAD(ModelConfig.from_dict(cfg.to_dict())).eval()
    assert model.segmentation.encoder[0][0].in_channels == 3  # the difference only, not [x, reconstruction]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    a, b = torch.rand(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    # Reconstructions equal to their inputs: one map for any image (nothing differs), where the paper's
    # pair input would see the images themselves.
    assert torch.allclose(model.segment(a, a), model.segment(b, b), atol=1e-6)
    assert torch.allclose(model.segment(a, a - 0.3), model.segment(b, b - 0.3), atol=1e-6)
    assert not torch.allclose(model.segment(a, a), model.segment(a, a - 0.3), atol=1e-3)
    pair = DiffusionAD(preset("tiny", in_channels=3)).eval()
    with torch.no_grad():
        for p in pair.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert not torch.allclose(pair.segment(a, a), pair.segment(b, b), atol=1e-3)
    anomaly_map, score = model(a)  # and the whole pipeline runs on it
    assert anomaly_map.shape == (2, 1, 32, 32) and score.shape == (2,)


def test_segmentation_input_is_checked_and_old_configs_read_as_pair():
    cfg = preset("tiny").to_dict()
    del cfg["segmentation_input"]  # a model file from before the option
    assert ModelConfig.from_dict(cfg).segmentation_input == "pair"
    with pytest.raises(ValueError, match="segmentation_input must be one of"):
        ModelConfig.from_dict({**cfg, "segmentation_input": "residual"})
