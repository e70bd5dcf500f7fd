"""DeCo-Diff: the forward process and its target, the patch mask, the correction, multi-category training."""

import asyncio
import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffad.export.bundle import BundleError, load_bundle, seal_bundle
from diffad.export.onnx_export import export_onnx
from diffad.export.parity import onnxruntime_runner
from diffad.export.tensorrt_engine import bundle_plan
from diffad.export.triton import TritonExportError, export_model
from diffad.models import checkpoint as ckpt
from diffad.models.decodiff import (
    DeCoDiff,
    DeCoDiffConfig,
    corrupt,
    deviation,
    masked_q_sample,
    patch_mask,
    shuffle_patches,
)
from diffad.models.map_reference import MapReference, squash
from diffad.models.presets import decodiff_preset
from diffad.models.schedule import cosine_alpha_bar
from diffad.service.backends import TorchBackend
from diffad.training.demo_data import make_category
from PIL import Image
from test_service import make_settings, serving, until_ready, wrapping_factory

from diffad.cli import main


def test_cosine_schedule_of_ten_steps_matches_the_formula():
    ab = cosine_alpha_bar(10)
    f = [math.cos((u / 10 + 0.008) / 1.008 * math.pi / 2) ** 2 for u in range(11)]
    assert ab[3].item() == pytest.approx(f[4] / f[0], rel=1e-5)   # no beta capped before the last step
    assert ab[9].item() == pytest.approx(ab[8].item() * 0.001, rel=1e-4)  # the last beta capped at 0.999


def test_forward_process_and_deviation_by_hand():
    x0 = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]])
    noise = torch.tensor([[[[1.0, 1.0], [-1.0, 0.5]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])   # 1 = kept clean
    ab = torch.tensor([0.64])                            # sqrt 0.8, sqrt(1 - ab) 0.6
    x_t = masked_q_sample(x0, ab, mask, noise)
    expected = torch.tensor([[[[0.5, 0.8 * -1.0 + 0.6], [0.8 * 2.0 - 0.6, 0.0]]]])
    assert torch.allclose(x_t, expected)
    d = deviation(x_t, x0, ab)
    # zero where clean; elsewhere (x_t - x0) / 0.6 = noise - (1 - 0.8) / 0.6 x0 (the paper's code's form)
    assert torch.allclose(d, torch.tensor([[[[0.0, 1.0 + 0.2 / 0.6], [-1.0 - 0.4 / 0.6, 0.0]]]]))


def test_patch_mask_corrupts_the_asked_share_in_whole_patches():
    g = torch.Generator().manual_seed(0)
    mask = patch_mask(3, 16, torch.tensor([0.0, 0.25, 0.7]), 4, g)
    assert mask.shape == (3, 1, 16, 16)
    assert [float(1 - m.mean()) for m in mask] == pytest.approx([0.0, 0.25, 11 / 16])  # round(0.7 x 16) cells
    cells = mask[:, 0].unfold(1, 4, 4).unfold(2, 4, 4)          # [3, 4, 4, 4, 4]: every 4 x 4 cell constant
    assert torch.all(cells.amax(dim=(-1, -2)) == cells.amin(dim=(-1, -2)))
    with pytest.raises(ValueError, match="divide"):
        patch_mask(1, 16, torch.tensor([0.5]), 5, g)


def test_shuffled_patches_are_the_batch_s_own_patches_moved():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    y = shuffle_patches(x, 2, torch.Generator().manual_seed(1))

    def patches(t):
        return sorted(tuple(p.flatten().tolist()) for p in t.unfold(2, 2, 2).unfold(3, 2, 2).reshape(-1, 4))

    assert patches(y) == patches(x) and not torch.equal(y, x)


def test_corrupt_targets_zero_where_clean_and_the_network_input_matches():
    cfg = DeCoDiffConfig(image_size=16, in_channels=1, unet=decodiff_preset("tiny", ("a",), 16, 1).unet,
                         coarse_factor=4)
    x0 = torch.randn(4, 1, 16, 16)
    t = torch.tensor([0, 3, 6, 9])
    x_t, target = corrupt(x0, cfg, cosine_alpha_bar(10), t, torch.Generator().manual_seed(0))
    clean = x_t == x0
    assert torch.all(target[clean] == 0)
    ab = cosine_alpha_bar(10)[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, x0 + (1 - ab).sqrt() * target, atol=1e-5)


def test_correction_follows_the_deterministic_rule():
    model = DeCoDiff(decodiff_preset("tiny", ("a", "b"), 32, 1)).eval()
    assert model.config.timesteps == [8, 6, 4, 2, 0]
    calls = []

    def fake_unet(x_t, t, classes):  # a constant deviation of 0.1: each step's rule can be followed by hand
        calls.append((int(t[0]), classes.tolist()))
        return torch.full_like(x_t, 0.1)

    model.unet.forward = fake_unet
    x = torch.zeros(2, 1, 32, 32)
    out = model.correct(x, torch.tensor([1, 0]))
    ab = model.alpha_bar
    # every step: x0 = x_t - sqrt(1 - ab_t) d, then x_prev = x0 + sqrt(1 - ab_prev) d; the last returns x0
    expected = 0.0 - (1 - ab[8]).sqrt() * 0.1 + (1 - ab[0]).sqrt() * 0.1 - (1 - ab[0]).sqrt() * 0.1
    assert [c[0] for c in calls] == [8, 6, 4, 2, 0] and calls[0][1] == [1, 0]
    assert torch.allclose(out, torch.full_like(x, float(expected)), atol=1e-6)


def test_an_untrained_model_maps_nothing_and_a_changed_pixel_shows():
    model = DeCoDiff(decodiff_preset("tiny", ("a",), 32, 1)).eval()
    images = torch.rand(2, 1, 32, 32)
    anomaly_map, score = model(images)   # the UNet's last layer starts at zero: correction = input
    assert torch.all(anomaly_map == 0) and torch.all(score == 0)
    x = model.normalize(images)
    corrected = x.clone()
    corrected[0, :, 10:14, 10:14] += 1.0
    amap = model.anomaly_map(x, corrected)
    assert amap[0, 0, 12, 12] > 0.3 and amap[0, 0, 28, 28] < amap[0, 0, 12, 12] and torch.all(amap[1] == 0)


def test_category_choice_and_model_file_round_trip(tmp_path):
    model = DeCoDiff(decodiff_preset("tiny", ("tile", "tire"), 32, 3))
    with torch.no_grad():
        for p in model.unet.parameters():  # zero-initialised layers would hide the condition
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    model.eval()
    images = torch.rand(2, 3, 32, 32)
    x = model.normalize(images)
    tile, tire = (model.correct(x, torch.full((2,), k)) for k in (0, 1))
    assert (tile - tire).abs().max() > 1e-3  # the condition matters
    tire_map = model.set_category("tire")(images)[0]
    assert torch.allclose(tire_map, model.anomaly_map(x, tire))
    ckpt.save_model(tmp_path / "m.safetensors", model)
    loaded = ckpt.load_model(tmp_path / "m.safetensors")
    assert isinstance(loaded, DeCoDiff) and loaded.config.categories == ("tile", "tire")
    assert torch.allclose(loaded.set_category("tire")(images)[0], tire_map, atol=1e-6)
    with pytest.raises(ValueError, match="unknown category"):
        model.set_category("tyre")


def test_map_reference_standardises_each_place_against_its_category():
    reference = MapReference(2, 2)
    good = torch.tensor([[0.2, 0.5], [0.1, 0.1]]).view(1, 1, 2, 2) + torch.tensor([-0.1, 0.1]).view(2, 1, 1, 1)
    reference.fit(1, good)  # per pixel: mean as given, std 0.1 (0.1 + the 0.01 floor divides)
    assert torch.allclose(reference.mean[1], torch.tensor([[0.2, 0.5], [0.1, 0.1]]).view(1, 2, 2))
    assert torch.all(reference.mean[0] == 0) and torch.all(reference.inverse_std[0] == 1)  # category 0: identity
    maps = torch.tensor([[0.4, 0.5], [0.1, 0.1]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    z = reference(maps, torch.tensor([1, 0]))
    assert torch.allclose(z[0, 0], torch.tensor([[0.2 / 0.11, 0.0], [0.0, 0.0]]), atol=1e-5)
    assert torch.equal(z[1], maps[1])
    values = torch.tensor([-100.0, -1.0, 0.0, 0.5, 3.0, 1e6])
    assert squash(torch.tensor(0.0)) == 0.5 and torch.all(squash(values).diff() > 0)
    assert torch.all((squash(values) > 0) & (squash(values) < 1))


def test_score_rules_top_k_and_reference_per_image_category():
    model = DeCoDiff(decodiff_preset("tiny", ("a", "b"), 32, 1)).eval()
    maps = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.score(maps), maps.flatten(1).amax(dim=1))  # the paper's maximum by default
    model.config.top_k = 10
    assert torch.allclose(model.score(maps), maps.flatten(1).topk(10, dim=1).values.mean(dim=1))
    rim = torch.zeros(1, 1, 32, 32)
    rim[..., 0, :] = 0.9  # every good part of category b is high along one edge
    model.map_reference.fit(1, rim.repeat(4, 1, 1, 1))
    model.config.score_reference = True
    scores = model.score(maps, torch.tensor([0, 1]))
    z_b = (maps[1] - rim[0]) / 0.01
    assert torch.allclose(scores[1], squash(z_b.flatten().topk(10).values.mean()), atol=1e-6)
    assert torch.allclose(scores[0], squash(maps[0].flatten().topk(10).values.mean()), atol=1e-6)


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return [make_category(root / name, size=32, channels=3, num_train=16, seed=i)
            for i, name in enumerate(("alpha", "beta"))]


@pytest.fixture(scope="module")
def multi_run(two_categories, tmp_path_factory):
    """One tiny DeCo-Diff model trained on two categories, then evaluated (which calibrates each)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *map(str, two_categories), "--method", "decodiff", "--out", str(run), "--preset",
                 "tiny", "--max-steps", "6", "--validate-every", "3"]) == 0
    # six steps barely teach the condition: perturbed, the categories score apart, so a graph or a backend
    # that scored the wrong category would be seen
    model = ckpt.load_model(run)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    # and scored against per-category map references, so that the graphs and backends below must gather
    # each category's own (training chose a rule on its validation sets; this forces the harder one)
    for index in range(2):
        reference = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(index)) * (index + 1) * 0.2
        model.map_reference.fit(index, reference)
    model.config.score_reference, model.config.top_k = True, 10
    ckpt.save_model(run / ckpt.MODEL_FILE, model)
    assert main(["evaluate", str(run), *map(str, two_categories), "--json", str(run / "eval_all.json")]) == 0
    return run


@pytest.fixture(scope="module")
def multi_bundle(multi_run, tmp_path_factory):
    bundle_dir = tmp_path_factory.mktemp("bundles") / "run"
    assert main(["export", str(multi_run), "--out", str(bundle_dir), "--no-fp16-graph"]) == 0
    return bundle_dir


def test_train_and_evaluate_several_categories_in_one_model(multi_run):
    run = multi_run
    config = json.loads((run / "config.json").read_text())
    assert config["categories"] == ["alpha", "beta"]
    assert set(config["held_out_images_by_category"]) == {"alpha", "beta"}
    history = [json.loads(line) for line in (run / "validation_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 6] and set(history[0]["categories"]) == {"alpha", "beta"}
    rule = json.loads((run / "train_summary.json").read_text())["validation"]["score_rule"]
    assert set(rule["chosen"]) == {"score_reference", "top_k"} and len(rule["scores"]) == 6
    model = ckpt.load_model(run)
    assert isinstance(model, DeCoDiff) and model.unet.class_embed.num_embeddings == 2
    result = json.loads((run / "eval_all.json").read_text())
    assert set(result["categories"]) == {"alpha", "beta"}
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1_max"):
        assert result["mean"][key] == pytest.approx(np.mean([r[key] for r in result["categories"].values()]))
    assert (run / "calibration.alpha.json").is_file() and (run / "calibration.beta.json").is_file()


def test_export_writes_one_graph_that_takes_each_image_s_category(multi_run, multi_bundle):
    bundle = load_bundle(multi_bundle)
    assert bundle.method == "decodiff" and bundle.t_s is None and bundle.manifest["categories"] == ["alpha", "beta"]
    assert bundle.manifest["correction"]["timesteps"] == [8, 6, 4, 2, 0]
    assert bundle.manifest["score"] == {"top_k": 10, "map_reference": True}  # what the fixture set
    assert bundle.category_input == "category" and bundle.manifest["input"]["category"]["dtype"] == "int64"
    assert sorted(p.name for p in multi_bundle.glob("*.onnx")) == ["model.onnx"], "one graph, one set of weights"
    parity = bundle.manifest["onnx"]["parity"]
    assert parity["passed"] and parity["batch_independence"]["batch_sizes"] == [1, 8], parity
    views = {view.name: view for view in bundle.models()}
    assert set(views) == {"run.alpha", "run.beta"}
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    uint8 = (images * 255).round().to(torch.uint8)
    model = ckpt.load_model(multi_run).eval()
    with torch.no_grad():
        expected = {c: model.set_category(c)(uint8.float() / 255)[1].numpy() for c in ("alpha", "beta")}
    assert np.abs(expected["alpha"] - expected["beta"]).max() > 1e-3, \
        "the categories must score apart for this test to see a mix-up"
    for index, category in enumerate(("alpha", "beta")):
        view = views[f"run.{category}"]
        assert (view.category, view.category_index, view.onnx_path) == (category, index, multi_bundle / "model.onnx")
        calibration = json.loads((multi_run / f"calibration.{category}.json").read_text())
        assert view.threshold == pytest.approx(calibration["threshold"])
    # one batch that mixes the categories: each image is scored as its own category, in the graph and in
    # the torch backend, and as it is alone
    mixed = np.array([0, 1, 1, 0])
    want = np.where(mixed == 0, expected["alpha"], expected["beta"])
    _, scores = onnxruntime_runner(multi_bundle / "model.onnx")(uint8.numpy(), mixed)
    assert np.allclose(scores, want, atol=1e-4)
    _, alone = onnxruntime_runner(multi_bundle / "model.onnx")(uint8.numpy()[2:3], mixed[2:3])
    assert np.allclose(alone, want[2:3], atol=1e-5)
    backend = TorchBackend(views["run.beta"])
    assert backend.takes_categories
    _, torch_scores = backend(uint8.numpy(), mixed)
    assert np.allclose(torch_scores, want, atol=1e-5)
    with pytest.raises(ValueError, match="category"):
        backend(uint8.numpy())  # a shared graph's backend will not guess an image's category


def test_multi_category_bundle_serves_each_category_from_one_runtime(multi_run, multi_bundle, two_categories):
    images = [np.asarray(Image.open(sorted((d / "test" / "good").glob("*.png"))[0]).convert("RGB"))
              for d in two_categories]

    def upload(image):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        return {"file": ("part.png", buffer.getvalue(), "image/png")}

    settings = make_settings(multi_bundle, max_queue_delay_ms=500)  # requests sent together share a batch
    created = {}

    async def inspect():
        async with serving(settings, wrapping_factory(created), wait_ready=False) as (app, client):
            for name in ("run.alpha", "run.beta"):
                await until_ready(client, model=name)
            registry = app.state.registry
            listed = (await client.get("/models")).json()
            # the same image for each category and the other image for beta, sent at once
            together = await asyncio.gather(*(
                client.post("/inspect", params={"model": model, "map": "none"}, files=upload(images[i]))
                for model, i in (("run.alpha", 0), ("run.beta", 0), ("run.beta", 1))))
            unchosen = await client.post("/inspect", params={"map": "none"}, files=upload(images[0]))
            metrics = (await client.get("/metrics")).text
            return registry, listed, together, unchosen, metrics

    registry, listed, together, unchosen, metrics = asyncio.run(inspect())
    assert len(registry.runtimes) == 1 and registry.runtimes[0].served_names == ("run.alpha", "run.beta")
    assert list(created) == ["run"], "one backend (one set of weights) for both categories"
    served = [sorted(c.tolist()) for c in created["run"].batch_categories]
    assert [0, 1, 1] in served, f"the three requests should have run as one mixed batch: {served}"
    entries = listed["models"] if isinstance(listed, dict) else listed
    assert {(m["name"], m["method"], m["category"], tuple(m["shares_runtime_with"])) for m in entries} == {
        ("run.alpha", "decodiff", "alpha", ("run.beta",)), ("run.beta", "decodiff", "beta", ("run.alpha",))}
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    answers = [r.json() for r in together]
    model = ckpt.load_model(multi_run).eval()
    views = load_bundle(multi_bundle).models()
    for answer, (category, i) in zip(answers, (("alpha", 0), ("beta", 0), ("beta", 1)), strict=True):
        with torch.no_grad():
            _, expected = model.set_category(category)(torch.from_numpy(images[i].transpose(2, 0, 1)[None].copy())
                                                       .float() / 255)
        assert answer["image_score"] == pytest.approx(float(expected[0]), abs=1e-4), (category, i)
        view = next(v for v in views if v.category == category)
        assert answer["model"] == view.name and answer["threshold"] == pytest.approx(view.threshold)
    assert unchosen.status_code == 422 and "model" in unchosen.text, "two models: the request must name one"
    assert all(f'diffad_model_ready{{model="run.{c}"}} 1.0' in metrics for c in ("alpha", "beta"))


def test_decodiff_bundle_needs_no_one_step_fields_and_an_unknown_method_is_refused(multi_bundle, tmp_path):
    manifest = json.loads((multi_bundle / "bundle.json").read_text())
    assert not {"t_s", "t_l", "w", "noise_seed", "top_k"} & set(manifest)
    copy = shutil.copytree(multi_bundle, tmp_path / "bundle")
    (copy / "bundle.json").write_text(json.dumps({**manifest, "method": "patchcore"}))
    with pytest.raises(BundleError, match="method 'patchcore'"):
        load_bundle(copy)
    (copy / "bundle.json").write_text(json.dumps({**manifest, "method": "diffusionad"}))
    with pytest.raises(BundleError, match="t_s"):  # a DiffusionAD bundle must carry its one-step constants
        load_bundle(copy)


def test_what_decodiff_bundles_do_not_have_yet_is_refused_clearly(multi_run, multi_bundle, tmp_path, capsys):
    with pytest.raises(BundleError, match="TensorRT engines for decodiff"):
        bundle_plan(load_bundle(multi_bundle), "11.0", "fp16")
    with pytest.raises(TritonExportError, match="decodiff bundle"):
        export_model(multi_bundle, tmp_path / "repo")
    assert main(["export-triton", str(multi_bundle), "--out", str(tmp_path / "repo")]) == 2
    assert "decodiff bundle" in capsys.readouterr().err and not (tmp_path / "repo").exists()
    assert main(["export", str(multi_run), "--out", str(tmp_path / "b"), "--tensorrt"]) == 2
    assert "TensorRT" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_diffusionad_refuses_several_categories(tmp_path, capsys):
    dirs = [make_category(tmp_path / n, size=32, channels=1, num_train=8, seed=i) for i, n in enumerate("ab")]
    assert main(["train", *map(str, dirs), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--max-steps", "1"]) == 2
    assert "--method decodiff" in capsys.readouterr().err


def test_a_shared_graph_s_categories_reload_together(multi_run, multi_bundle, tmp_path):
    served = shutil.copytree(multi_bundle, tmp_path / "run")
    retrained = shutil.copytree(multi_run, tmp_path / "retrained")
    model = ckpt.load_model(retrained)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    ckpt.save_model(retrained / ckpt.MODEL_FILE, model)
    new_bundle = tmp_path / "new"
    assert main(["export", str(retrained), "--out", str(new_bundle), "--name", "run", "--no-fp16-graph"]) == 0
    old_version, new_version = load_bundle(served).version, load_bundle(new_bundle).version
    assert old_version != new_version

    async def scenario():
        async with serving(make_settings(served)) as (app, client):
            unchanged = (await client.post("/models/run.beta/reload")).json()
            shutil.rmtree(served)
            shutil.copytree(new_bundle, served)
            reloaded = (await client.post("/models/run.beta/reload")).json()
            listed = (await client.get("/models")).json()["models"]
            return app.state.registry, unchanged, reloaded, listed

    registry, unchanged, reloaded, listed = asyncio.run(scenario())
    assert unchanged["reloaded"] is False and unchanged["model"] == "run.beta"
    assert reloaded["reloaded"] is True and (reloaded["previous_version"], reloaded["version"]) == (
        old_version, new_version)
    assert {m["name"]: m["version"] for m in listed} == {"run.alpha": new_version, "run.beta": new_version}, \
        "one graph: both categories switch"
    assert len(registry.runtimes) == 1


def test_a_bundle_with_a_graph_per_category_still_serves(multi_run, multi_bundle, tmp_path):
    """Bundles exported before the shared graph hold model.<category>.onnx with the category a constant,
    named in each `models` entry: they load and serve as before, one backend per category."""
    old = shutil.copytree(multi_bundle, tmp_path / "run")
    (old / "model.onnx").unlink()
    model = ckpt.load_model(multi_run).eval()
    manifest = json.loads((old / "bundle.json").read_text())
    entries = []
    for entry in manifest["models"]:
        info = export_onnx(model.set_category(entry["category"]), old / f"model.{entry['category']}.onnx")
        entries.append({k: v for k, v in entry.items() if k != "category_index"} | {"onnx": info.to_dict()})
    manifest = {k: v for k, v in manifest.items() if k != "category_index"} | {
        "onnx": entries[0]["onnx"], "models": entries,
        "input": {k: v for k, v in manifest["input"].items() if k != "category"}}
    seal_bundle(old, manifest)
    views = load_bundle(old).models()
    assert [(v.category_input, v.category_index) for v in views] == [(None, None), (None, None)]

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")

    async def scenario():
        async with serving(make_settings(old), wait_ready=False) as (app, client):
            for name in ("run.alpha", "run.beta"):  # /readyz alone turns 200 once any one model is ready
                await until_ready(client, model=name)
            answer = await client.post("/inspect", params={"model": "run.beta", "map": "none"},
                                       files={"file": ("part.png", buffer.getvalue(), "image/png")})
            return app.state.registry, answer

    registry, answer = asyncio.run(scenario())
    assert len(registry.runtimes) == 2 and answer.status_code == 200, answer.text
    with torch.no_grad():
        _, expected = model.set_category("beta")(torch.from_numpy(image.transpose(2, 0, 1)[None].copy()).float() / 255)
    assert answer.json()["image_score"] == pytest.approx(float(expected[0]), abs=1e-4)
