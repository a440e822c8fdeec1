"""The shipped toy prior (``--model toy``): it loads through the normal SD loader, ships as package data, and a
short CSD run with it makes the prompted object (silhouette IoU against the exact ground truth of
``benchmarks/toy_prior/objects.py``)."""
from __future__ import annotations

import fnmatch
import math
import sys
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from csd_backend.config import PriorConfig  # noqa: E402
from csd_backend.priors import TOY_MODEL, TOY_PROMPTS, load_prior, toy_model_path  # noqa: E402

#: the CI runs: (preset, object, steps, margins by which its silhouette IoU must beat every other object and the
#: starting blob). Measured (1 thread, the second toy prior, 64² scoring, seed 0): preview-cpu at 4 views a step:
#: cone 0.894 after the preset's 150 steps, best other object (mug) 0.590, blob 0.511 (at 1 view a step: 0.866,
#: 0.588; before the sparsity schedule: 0.806, 0.559); gaussian-preview-cpu after its 120 steps: cone 0.852, mug
#: 0.610, blob 0.509 (before its start radius and rates were set for the toy's cameras: below the blob). The curves
#: over longer runs are in the README ("Shape quality").
CI_RUNS = [("preview-cpu", "cone", 150, 0.2, 0.25), ("gaussian-preview-cpu", "cone", 120, 0.15, 0.25)]


@pytest.fixture(scope="module")
def toy_prior(one_torch_thread):
    return load_prior(PriorConfig(model=TOY_MODEL, device="cpu"))


def test_toy_prior_loads_through_the_sd_loader(toy_prior):
    p = toy_prior
    assert p.name == "toy" and p.source == "toy"
    assert p.resolution == 64 and p.vae_scale_factor == 4  # native 64², latents 4×16×16
    assert p.input_size(64, 64) == (64, 64)
    z = p.encode_images(torch.rand(1, 64, 64, 3))
    assert z.shape == (1, 4, 16, 16)
    emb = p.encode_text(["a red cube, front view", ""])
    eps = p.predict_noise(p.add_noise(z, torch.randn_like(z), torch.tensor([500])).repeat(2, 1, 1, 1),
                          torch.tensor([500, 500]), emb)
    assert eps.shape == (2, 4, 16, 16) and torch.isfinite(eps).all()
    # SD's noise schedule (scaled_linear 0.00085 → 0.012 over 1000 steps)
    assert p.num_train_timesteps == 1000
    assert abs(float(p.alphas_cumprod[-1]) - 0.0047) < 5e-4


def test_toy_prompts_match_the_ground_truth_objects():
    from toy_prior.objects import OBJECTS

    assert tuple(o.prompt for o in OBJECTS) == TOY_PROMPTS


def test_toy_model_is_package_data_and_small():
    files = [p for p in toy_model_path().rglob("*") if p.is_file()]
    assert (toy_model_path() / "model_index.json") in files
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "csd_backend.priors"]
    base = toy_model_path().parent
    missing = [str(p.relative_to(base)) for p in files
               if not any(fnmatch.fnmatch(str(p.relative_to(base).as_posix()), pat) for pat in patterns)]
    assert not missing, f"files of the toy prior that pip install would leave out: {missing}"
    assert sum(p.stat().st_size for p in files) < 20e6  # the budget for package data


def test_toy_model_is_selectable_in_the_cli():
    from csd_backend.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "a red cube", "--model", "toy", "--out", "x"])
    assert args.model == "toy"


@pytest.mark.parametrize("preset,name,steps,margin_objects,margin_blob", CI_RUNS, ids=[r[0] for r in CI_RUNS])
def test_short_csd_run_makes_its_own_object(toy_prior, preset, name, steps, margin_objects, margin_blob):
    """CSD with the toy prior for the preset's own length (a volume, Gaussian splats): the silhouette IoU against its
    own object beats every other object and the starting blob by a clear margin."""
    from shape_quality import Scorer, run_config
    from toy_prior.objects import OBJECTS, get_object

    from csd_backend.optimize import Optimization

    obj = get_object(name)
    cfg = run_config(obj, "csd", steps, seed=0, preset=preset)
    opt = Optimization(cfg, toy_prior)
    blob = opt.trained_scene()
    scorer = Scorer(OBJECTS, size=64, points=False)
    before = scorer.score(blob, cfg.render, own=[obj.name], meshes=False, normals=False)[0][obj.name]["iou"]
    opt.run()
    after = scorer.score(opt.trained_scene(), cfg.render, opt.renderer, own=[obj.name], meshes=False,
                         normals=False)[0][obj.name]["iou"]
    others = {k: v for k, v in after.items() if k != obj.name}
    msg = f"{preset}: IoU after {steps} steps {after}, blob {before}"
    assert after[obj.name] > max(others.values()) + margin_objects, msg
    assert after[obj.name] > before[obj.name] + margin_blob, msg


def test_shape_quality_scores_during_the_run(toy_prior):
    """``shape_quality.py --every N``: the scorer is called after every N-th step before the last (its time is not
    counted as training), and the curve table lists own and best-other IoU per step."""
    from shape_quality import curve_point, curve_table, run_config, train_scene
    from toy_prior.objects import get_object

    seen = []
    cfg = run_config(get_object("cone"), "csd", 5, seed=0)
    opt, secs = train_scene(cfg, toy_prior, every=2, on_step=lambda o: seen.append(o.step))
    assert seen == [2, 4] and opt.step == 5 and secs > 0

    point = curve_point(5, {"iou": {"cone": 0.7, "mug": 0.5, "ball": 0.6}, "size": 1.25}, "cone")
    assert point == [5, 0.7, 0.6, 1.25]
    results = {"cone/csd": {"curve": [[2, 0.55, 0.5, 0.9], point]}, "mug/csd": {}}
    lines = curve_table(results, [get_object("cone"), get_object("mug")], ["csd"])
    assert lines[3] == "| object | method | step 2 | step 5 |"
    assert lines[5] == "| cone | csd | 0.550 (0.500) ×0.90 | 0.700 (0.600) ×1.25 |"
    assert curve_table({"cone/csd": {}}, [get_object("cone")], ["csd"]) == []


def test_shape_quality_can_keep_the_presets_schedules_in_absolute_steps():
    """``shape_quality.py --steps 600 --no-rescale-schedules`` runs what ``generate --steps 600
    --no-rescale-schedules`` runs: the preset's 150-step schedules end at step 150 and hold their last values."""
    from csd_backend.presets import get_preset
    from shape_quality import run_config
    from toy_prior.objects import get_object

    preset, cube = get_preset("preview-cpu"), get_object("cube")
    kept = run_config(cube, "csd", 600, seed=0, rescale=False)
    assert kept.optim.steps == 600 and kept.loss.sparsity == preset.loss.sparsity == [0, 3.0, 1.0, 150]
    assert kept.guidance.max_step_percent == preset.guidance.max_step_percent
    assert kept.render.ambient_only_steps == preset.render.ambient_only_steps
    stretched = run_config(cube, "csd", 600, seed=0)
    assert stretched.loss.sparsity == [0, 3.0, 1.0, 600] and stretched.render.ambient_only_steps == 4 * 56


def test_silhouette_size_says_larger_or_smaller_where_the_iou_cannot():
    from shape_quality import silhouette_iou, silhouette_size

    truth = torch.zeros(1, 8, 8)
    truth[:, 2:6, 2:6] = 1  # 16 pixels
    big, small = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    big[:, 1:7, 1:7], small[:, 3:5, 3:5] = 0.9, 0.9  # 36 and 4 pixels: IoU 16/36 and 4/16
    assert silhouette_iou(big, truth) == pytest.approx(16 / 36) and silhouette_size(big, truth) == pytest.approx(2.25)
    assert silhouette_iou(small, truth) == pytest.approx(0.25) and silhouette_size(small, truth) == pytest.approx(0.25)


def test_an_exact_start_is_the_object_in_the_runs_own_scene(toy_prior):
    """``shape_quality.py --start exact``: the run's scene kind and settings fitted to exact renders, with the run's
    own (fresh) background instead of the fit's white one; it then trains as any run."""
    from capacity_fit import exact_start
    from csd_backend.convert.volume_to_dmtet import fresh_background
    from shape_quality import Scorer, run_config, train_scene
    from toy_prior.objects import get_object

    cone = get_object("cone")
    cfg = run_config(cone, "csd", 3, seed=0)
    scene = exact_start(cfg, cone, steps=30, size=32)
    assert scene.cfg.background == cfg.scene.background == "neural_env"
    fresh = fresh_background(cfg.scene, cfg.optim.seed).state_dict()  # the stage-2 conversion's fresh background
    assert all(torch.equal(v, fresh[k]) for k, v in scene.background.state_dict().items())
    scorer = Scorer([cone, get_object("ball")], size=32, points=False)
    fitted = scorer.score(scene, cfg.render, own=["cone"], meshes=False, normals=False)[0]["cone"]
    assert fitted["iou"]["cone"] > 0.75 > fitted["iou"]["ball"], fitted
    opt, _ = train_scene(cfg, toy_prior, scene=scene)
    assert opt.step == 3


def test_shape_quality_combines_seeds_into_means_and_an_iou_range():
    from shape_quality import _iou_cell, combine_seeds

    a = {"iou": {"cone": 0.8, "mug": 0.4}, "rgb": [0.0, 1.0, 0.0], "chamfer": float("nan"), "faces": 10,
         "curve": [[50, 0.6, 0.5, 1.0], [100, 0.8, 0.4, 1.2]], "error": "no surface"}
    b = {"iou": {"cone": 0.4, "mug": 0.6}, "rgb": [0.2, 0.8, 0.0], "chamfer": 0.1, "faces": 20,
         "curve": [[50, 0.4, 0.5, 1.0], [100, 0.4, 0.6, 0.8]]}
    r = combine_seeds({1: b, 0: a}, "cone")
    assert r["iou"] == pytest.approx({"cone": 0.6, "mug": 0.5})
    assert r["rgb"] == pytest.approx([0.1, 0.9, 0.0])
    assert r["chamfer"] == pytest.approx(0.1)  # the seeds with a mesh
    assert r["faces"] == 15 and r["error"] == "no surface"
    assert r["curve"] == [[50, 0.5, 0.5, 1.0], [100, pytest.approx(0.6), 0.5, pytest.approx(1.0)]]
    assert r["iou_range"] == [0.4, 0.8] and list(r["per_seed"]) == ["0", "1"]
    assert _iou_cell(r, "cone") == "0.600 (0.40–0.80)"
    assert combine_seeds({0: a}, "cone") == a and _iou_cell(a, "cone") == "0.800"


def test_part_shares_count_parts_by_area():
    """The floater score of shape_quality: area shares of the parts (faces joined by edges), largest first."""
    import numpy as np
    from shape_quality import part_shares

    big = np.array([[0, 0, 0], [2, 0, 0], [0, 3, 0]], np.float32)  # area 3
    small = big / np.sqrt(3) + 10  # area 1
    v = np.concatenate([big, small])
    f = np.array([[0, 1, 2], [3, 4, 5]])
    assert np.allclose(part_shares(v, f), [0.75, 0.25])
    assert part_shares(big, f[:1]) == [1.0]


def test_texture_quality_scores_the_mean_albedo_against_the_colour_word():
    import numpy as np
    from texture_quality import colour_word, scores
    from toy_prior.objects import get_object

    assert colour_word(get_object("cube")) == "red"
    albedo = np.array([[0.9, 0.1, 0.1], [0.7, 0.1, 0.1]])
    r = scores(albedo, (0.86, 0.12, 0.10))
    assert r["rgb"] == [0.8, 0.1, 0.1] and abs(r["error"] - 0.06) < 1e-6 and abs(r["spread"] - 0.1 / 3) < 1e-6


def test_demo_pictures_rows_of_run_renders_and_never_overwrite(tmp_path, monkeypatch):
    import demo_pictures
    from PIL import Image

    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / name / "renders").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (64, 64), colour).save(tmp_path / name / "renders" / f"view_{i:02d}.png")
    out = tmp_path / "pics" / "sheet.png"
    args = ["demo_pictures.py", "--out", str(out), "--views", "2", "--size", "32",
            f"before={tmp_path / 'a'}", f"now={tmp_path / 'b'}"]
    monkeypatch.setattr(sys, "argv", args)
    demo_pictures.main()
    sheet = Image.open(out).convert("RGB")
    assert sheet.size == (demo_pictures.LABEL_WIDTH + 2 * 32, 2 * 32)
    assert sheet.getpixel((demo_pictures.LABEL_WIDTH + 40, 10)) == (255, 0, 0)
    assert sheet.getpixel((demo_pictures.LABEL_WIDTH + 40, 40)) == (0, 0, 255)
    with pytest.raises(SystemExit, match="exists"):
        demo_pictures.main()
    monkeypatch.setattr(sys, "argv", ["demo_pictures.py", "--out", str(tmp_path / "x.png"), f"x={tmp_path}"])
    with pytest.raises(SystemExit, match="no renders"):
        demo_pictures.main()


def test_toy_training_views_can_keep_the_apparent_size():
    """``train.py --relative-distance A,B``: the training cameras' distance is U[A, B] / tan(fovy / 2) (the engine's
    ``camera.relative_distance``), so every object fills about the same part of every view; the presets' own
    distances (1.5–2, fovy 40–70° drawn apart) vary it about 2.6×."""
    import argparse

    from toy_prior.render_dataset import distance_range, sample_views

    g = torch.Generator().manual_seed(0)
    fixed = sample_views(64, g, relative_distance=(0.85, 0.95))
    k = fixed.distance * torch.tan(torch.deg2rad(fixed.fovy) / 2)
    assert fixed.c2w.shape == (64, 4, 4) and float(k.min()) >= 0.85 - 1e-5 and float(k.max()) <= 0.95 + 1e-5
    free = sample_views(64, g)
    k = free.distance * torch.tan(torch.deg2rad(free.fovy) / 2)
    assert float(k.max() / k.min()) > 1.8 and 1.5 - 1e-5 <= float(free.distance.min())
    assert distance_range("0.85,0.95") == (0.85, 0.95)
    for bad in ("0.9", "a,b", "0.95,0.85", "0,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            distance_range(bad)


def test_toy_variants_are_captioned_only_unconditionally():
    """``train.py --variants-per-object``: renders of each object larger or smaller than it is, or recoloured, that
    only the empty caption and the negative prompt name (so "a red cube" differs from ∅ in size and colour too)."""
    from toy_prior.objects import OBJECTS
    from toy_prior.render_dataset import _variant, render_dataset, sample_views
    from toy_prior.train import default_negative_prompt, draw_captions

    g = torch.Generator().manual_seed(0)
    cams = sample_views(8, g, relative_distance=(0.9, 0.9))
    seen = set()
    for _ in range(12):
        obj, moved = _variant(OBJECTS[0], cams, g)
        f = cams.distance / moved.distance  # the apparent size's factor
        colour = torch.tensor(obj.color) - torch.tensor(OBJECTS[0].color)
        if not torch.allclose(f, torch.ones(8)):
            assert bool(((f >= 0.6) & (f <= 0.8)).all() or ((f >= 1.25) & (f <= 1.6)).all()), f
            assert torch.allclose(moved.c2w[:, :3, 3], cams.c2w[:, :3, 3] / f[:, None])
            seen.add("size")
        if colour.abs().max() > 0:
            assert float(colour.abs().max()) <= 0.35 + 1e-6  # (at least 0.15 in one channel before the clipping)
            seen.add("colour")
    assert seen == {"size", "colour"}

    data = render_dataset(2, seed=0, batch=2, log=lambda *_: None, variants=True)
    assert data["variant"].all() and data["images"].shape == (10, 64, 64, 3)
    data["variant"][:5] = False
    caps = draw_captions(data, torch.arange(10).repeat(20), torch.Generator().manual_seed(0))
    objects = [c for n, c in enumerate(caps) if n % 10 < 5]
    variants = [c for n, c in enumerate(caps) if n % 10 >= 5]
    assert set(variants) == {"", default_negative_prompt()}
    assert any(c.startswith("a red cube") for c in objects)


def test_toy_morph_variants_blend_two_shapes_in_the_objects_colour():
    """``train.py --variant-kind morph``: each object's shape blended with another's, in the object's own colour
    (captioned only unconditionally, as every variant): "a red cube" is then not a red rounded box."""
    from toy_prior.objects import get_object, render_object
    from toy_prior.render_dataset import MORPH_MIX, MORPH_SIZE_MIX, _variant, morph_object, sample_views

    cube, ball = get_object("cube"), get_object("ball")
    p = torch.rand(64, 3) * 1.2 - 0.6
    assert torch.allclose(morph_object(cube, ball, 0.0).sdf(p), cube.sdf(p))
    assert torch.allclose(morph_object(cube, ball, 1.0).sdf(p), ball.sdf(p))
    half = morph_object(cube, ball, 0.5)
    assert torch.allclose(half.sdf(p), 0.5 * (cube.sdf(p) + ball.sdf(p)))
    assert (half.name, half.color) == (cube.name, cube.color)

    g = torch.Generator().manual_seed(0)
    cams = sample_views(2, g)
    obj, same = _variant(cube, cams, g, MORPH_MIX)
    assert same is cams and obj.color == cube.color and not torch.allclose(obj.sdf(p), cube.sdf(p))
    own, morphed = render_object(cube, cams)["mask"], render_object(obj, cams)["mask"]
    assert morphed.any() and (own != morphed).any()

    from toy_prior.train import main as train_main

    with pytest.raises(SystemExit):  # a kind without variants would change nothing: refused
        train_main(["--out", "unused", "--work", "unused", "--variant-kind", "morph"])

    kinds = set()  # half morphs, half resized
    for _ in range(12):
        obj, moved = _variant(cube, cams, g, MORPH_SIZE_MIX)
        assert obj.color == cube.color
        kinds.add("size" if moved is not cams else "morph")
        assert (moved is cams) != torch.allclose(obj.sdf(p), cube.sdf(p))
    assert kinds == {"size", "morph"}


def test_toy_blob_variants_are_the_object_on_its_way_from_the_starting_blob():
    """``train.py --variant-kind blob``: each object's distance blended with the starting blob's (a sphere of radius
    0.5) by a share in ``BLOB_RANGE``, in the object's colour: larger and rounder than the object, the ring's hole
    closing — the shapes a run from the blob passes through, which no caption names."""
    from toy_prior.objects import get_object, render_object
    from toy_prior.render_dataset import BLOB, BLOB_MIX, BLOB_RANGE, _variant, sample_views

    p = torch.rand(256, 3) * 1.2 - 0.6
    assert torch.allclose(BLOB.sdf(p), p.norm(dim=-1) - 0.5)
    g = torch.Generator().manual_seed(0)
    cams = sample_views(2, g)
    for name in ("cube", "ring"):
        own = get_object(name)
        obj, same = _variant(own, cams, g, BLOB_MIX)
        assert same is cams and (obj.name, obj.color) == (own.name, own.color)
        d, b = own.sdf(p), BLOB.sdf(p)
        share = float(((obj.sdf(p) - d) / (b - d)).median())  # the drawn share, recovered from the blend
        assert BLOB_RANGE[0] <= share <= BLOB_RANGE[1]
        assert torch.allclose(obj.sdf(p), (1 - share) * d + share * b, atol=1e-5)
        assert render_object(obj, cams)["mask"].sum() > render_object(own, cams)["mask"].sum()  # larger
    ring = get_object("ring")  # at the top of the range the hole (the origin, inside the torus's circle) has closed
    from toy_prior.render_dataset import morph_object

    origin = torch.zeros(1, 3)
    assert ring.sdf(origin) > 0 and morph_object(ring, BLOB, BLOB_RANGE[1]).sdf(origin) < 0

    from toy_prior.render_dataset import MORPH_BLOB_MIX  # half morphs (another object's shape), half blob morphs

    cube = get_object("cube")
    d, b, kinds = cube.sdf(p), BLOB.sdf(p), set()
    for _ in range(12):
        obj, same = _variant(cube, cams, g, MORPH_BLOB_MIX)
        assert same is cams and obj.color == cube.color and not torch.allclose(obj.sdf(p), d)
        ratio = (obj.sdf(p) - d) / (b - d)  # one share everywhere only for a blend with the blob
        kinds.add("blob" if torch.allclose(ratio, ratio.median().expand_as(ratio), atol=1e-4) else "morph")
    assert kinds == {"blob", "morph"}

    from toy_prior.render_dataset import MORPH_BLOB_RECOLOUR_MIX  # the same shapes, recoloured

    for _ in range(4):
        obj, same = _variant(cube, cams, g, MORPH_BLOB_RECOLOUR_MIX)
        assert same is cams and obj.color != cube.color and not torch.allclose(obj.sdf(p), d)
        assert max(abs(a - b) for a, b in zip(obj.color, cube.color)) > 0.05


def test_toy_sized_variants_look_as_large_as_their_object():
    """``"+sized"`` (``--variant-kind morph-blob-sized``): a morph or blob morph seen from cameras moved so that its
    silhouette is its object's size (``silhouette_area``), so that only its shape tells it from the object; half
    of them recoloured."""
    from toy_prior.objects import get_object, render_object
    from toy_prior.render_dataset import (BLOB, MORPH_BLOB_SIZED_MIX, _variant, morph_object, sample_views,
                                          silhouette_area)

    ball = get_object("ball")  # radius 0.4: a disc of area π·0.4² in the square [−0.6, 0.6]²
    assert silhouette_area(ball) == pytest.approx(math.pi * 0.16 / 1.44, rel=0.05)
    assert silhouette_area(BLOB) > silhouette_area(morph_object(ball, BLOB, 0.5)) > silhouette_area(ball)
    g = torch.Generator().manual_seed(0)
    cams = sample_views(4, g)
    p = torch.rand(256, 3) - 0.5
    for name in ("cube", "ring", "mug"):
        own = get_object(name)
        exact = render_object(own, cams)["mask"].sum()
        kinds, colours, ratios = set(), set(), []
        for _ in range(8):
            obj, moved = _variant(own, cams, g, MORPH_BLOB_SIZED_MIX)
            assert not torch.allclose(obj.sdf(p), own.sdf(p))
            f = float(moved.distance[0] / cams.distance[0])
            assert torch.allclose(moved.distance / cams.distance, torch.tensor(f))  # one move for the batch
            kinds.add("away" if f > 1 else "nearer")  # a blob morph (larger) is seen from further away
            colours.add(obj.color == own.color)
            ratios.append(float(render_object(obj, moved)["mask"].sum() / exact))
        assert colours == {True, False} and "away" in kinds  # (unsized, these ratios are 0.5–1.5)
        assert max(abs(r - 1) for r in ratios) < 0.2 and abs(sum(ratios) / len(ratios) - 1) < 0.08, (name, ratios)
    from toy_prior.render_dataset import MORPH_BLOB_SIZED_RESIZE_MIX  # and the object itself, resized

    cube, kinds = get_object("cube"), set()
    for _ in range(16):
        obj, moved = _variant(cube, cams, g, MORPH_BLOB_SIZED_RESIZE_MIX)
        resized = torch.allclose(obj.sdf(p), cube.sdf(p))
        kinds.add("resized" if resized else "shape")
        if resized:  # the cube itself, nearer or further
            assert obj.color == cube.color and not torch.allclose(moved.distance, cams.distance)
    assert kinds == {"resized", "shape"}
    ball = get_object("ball")  # a blob morph of the ball at its own size would be the ball: a morph instead
    for _ in range(8):
        obj, _ = _variant(ball, cams, g, MORPH_BLOB_SIZED_MIX)
        ratio = (obj.sdf(p) - ball.sdf(p)) / (BLOB.sdf(p) - ball.sdf(p))
        assert not torch.allclose(ratio, ratio.median().expand_as(ratio), atol=1e-3)  # not a blend with the blob


def test_prefer_exact_scores_the_prompt_higher_on_its_own_object():
    """``prefer_exact.py``: the prompt's advantage over "" (what CSD's direction climbs), here of "a red cube" on
    renders of the cube against renders of the ring (the shipped prior tells them apart: accuracy 0.99), and one
    value per view for the exact object and each blob share."""
    from csd_backend.priors.stable_diffusion import load_stable_diffusion
    from toy_prior.objects import get_object, render_object
    from toy_prior.prefer_exact import compare, prompt_advantage
    from toy_prior.render_dataset import sample_views

    prior = load_stable_diffusion(toy_model_path(), device="cpu", dtype="float32")
    cams = sample_views(2, torch.Generator().manual_seed(5))
    own, other = (prompt_advantage(prior, render_object(get_object(n), cams)["rgb"].clamp(0, 1), "a red cube")
                  for n in ("cube", "ring"))
    assert own.shape == (2,) and bool((own > other).all())
    adv = compare(prior, "cube", views=2, shares=(0.3,))
    assert set(adv) == {"exact", "blob 0.3"} and torch.allclose(adv["exact"], own)  # the same views and noise
    sized = compare(prior, "cube", views=2, shares=(0.3,), sized=True)  # the morph seen from further away
    assert torch.equal(sized["exact"], adv["exact"]) and not torch.allclose(sized["blob 0.3"], adv["blob 0.3"])
