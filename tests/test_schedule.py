"""The noise schedule's arithmetic and the norm-guided one-step rule."""

import numpy as np
import pytest
import torch
from diffad.models.schedule import LinearNoiseSchedule, ScheduleConfig

SCHED = LinearNoiseSchedule(ScheduleConfig())


def test_linear_betas_and_cumulative_product_by_hand():
    assert SCHED.betas.shape == (1000,)
    assert SCHED.betas[0].item() == pytest.approx(1e-4)
    assert SCHED.betas[-1].item() == pytest.approx(0.02)
    assert SCHED.betas[1].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / 999)
    # alpha_bar_t = prod_{i <= t} (1 - beta_i)
    assert SCHED.alpha_bar[0].item() == pytest.approx(1 - 1e-4)
    betas = np.linspace(1e-4, 0.02, 1000)
    assert SCHED.alpha_bar[2].item() == pytest.approx(np.prod(1 - betas[:3]), rel=1e-6)
    assert SCHED.alpha_bar[999].item() == pytest.approx(np.prod(1 - betas), rel=1e-4)
    assert torch.all(SCHED.alpha_bar[1:] < SCHED.alpha_bar[:-1])


def test_q_sample_by_hand():
    x0, noise = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    a = SCHED.alpha_bar[100].item()
    expected = a**0.5 * 1.0 + (1 - a) ** 0.5 * 2.0
    assert torch.allclose(SCHED.q_sample(x0, 100, noise), torch.full_like(x0, expected))


def test_per_sample_timesteps():
    x0, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    out = SCHED.q_sample(x0, torch.tensor([0, 999]), noise)
    assert out[0, 0, 0, 0].item() == pytest.approx((1 - SCHED.alpha_bar[0].item()) ** 0.5)
    assert out[1, 0, 0, 0].item() == pytest.approx((1 - SCHED.alpha_bar[999].item()) ** 0.5)


@pytest.mark.parametrize("t", [0, 200, 400, 999])
def test_predict_x0_inverts_q_sample(t):
    g = torch.Generator().manual_seed(t)
    x0, eps = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1, torch.randn(3, 3, 4, 4, generator=g)
    x_t = SCHED.q_sample(x0, t, eps)
    assert torch.allclose(SCHED.predict_x0(x_t, t, eps), x0, atol=1e-4)
    assert torch.allclose(SCHED.predict_eps(x_t, t, x0), eps, atol=2e-3 if t == 0 else 1e-4)


def test_guidance_weight_for_paper_values():
    # lambda = w (1 - alpha_bar_{t_s}); the design card quotes 0.344 for t_s = 200, w = 1.
    lam = SCHED.guidance_weight(200, 1.0, torch.zeros(1, 1, 1, 1)).item()
    assert lam == pytest.approx(1 - SCHED.alpha_bar[200].item())
    assert lam == pytest.approx(0.344, abs=0.005)


@pytest.mark.parametrize("w", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("t_s", [50, 200])
def test_blend_form_equals_guided_epsilon_form(t_s, w):
    g = torch.Generator().manual_seed(t_s)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    x_ts = SCHED.q_sample(x0, t_s, torch.randn(2, 3, 8, 8, generator=g))
    eps_s = torch.randn(2, 3, 8, 8, generator=g)                  # some network's noise prediction
    x0_l = (torch.rand(2, 3, 8, 8, generator=g) * 2 - 1).clamp(-1, 1)  # clipped prediction from t_l

    blend = SCHED.guided_x0(SCHED.predict_x0(x_ts, t_s, eps_s), x0_l, t_s, w)
    eps_hat = SCHED.guided_eps(x_ts, eps_s, x0_l, t_s, w)
    guided = SCHED.predict_x0(x_ts, t_s, eps_hat).clamp(-1, 1)
    assert torch.allclose(blend, guided, atol=1e-5)
    # and w = 0 is the plain one-step prediction
    assert torch.allclose(SCHED.guided_x0(SCHED.predict_x0(x_ts, t_s, eps_s), x0_l, t_s, 0.0),
                          SCHED.predict_x0(x_ts, t_s, eps_s).clamp(-1, 1))


def test_ddim_timesteps():
    steps = SCHED.ddim_timesteps(200, 10)
    assert steps[0] == 200 and steps[-1] == 0 and len(steps) == 10
    assert all(a > b for a, b in zip(steps, steps[1:], strict=False))


def test_ddim_and_ancestral_steps_with_the_true_noise_recover_x0():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(1, 1, 4, 4, generator=g)
    x_t = SCHED.q_sample(x0, 300, eps)
    # DDIM to an earlier step stays on the same noise path: it equals q_sample at t_prev.
    assert torch.allclose(SCHED.ddim_step(x_t, 300, 100, eps), SCHED.q_sample(x0, 100, eps), atol=1e-4)
    assert torch.allclose(SCHED.ddim_step(x_t, 300, -1, eps), x0, atol=1e-4)
    # the ancestral step's mean with a perfect x0 estimate is the true posterior mean
    step = SCHED.ancestral_step(x_t, 300, eps, torch.zeros_like(x0))
    a, a_prev, beta = SCHED.alpha_bar[300], SCHED.alpha_bar_prev[300], SCHED.betas[300]
    mean = a_prev.sqrt() * beta / (1 - a) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * x_t
    assert torch.allclose(step, mean, atol=1e-5)
    assert torch.allclose(SCHED.ancestral_step(SCHED.q_sample(x0, 0, eps), 0, eps, eps), x0, atol=1e-3)
