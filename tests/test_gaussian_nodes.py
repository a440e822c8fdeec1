"""Gaussian splats in ComfyUI (issue 25 items 6 and 7), without ComfyUI: CSD 3D Scene makes splats for a Gaussian
preset and loads a Gaussian run, CSD Optimize trains them (its preset list has the Gaussian presets) and refuses a
new scene of the other kind naming the fix, CSD Save Gaussians writes a 3DGS .ply under the output folder with a
counter (never overwriting) and refuses a scene that is not splats, and Render Views and Extract Mesh take a
Gaussian scene. The template (10-text-to-3D-Gaussian-splats-GPU) runs end to end in test_workflows.py."""
from __future__ import annotations

import pytest
import torch

import comfy_stubs as cs
from csd_backend.priors.analytic import AnalyticPrior

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GAUSSIAN_PRESETS = ["csd-gaussian", "gaussian-preview-cpu", "sds-gaussian"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    return cs.install(monkeypatch, tmp_path)


@pytest.fixture
def nodes(env):
    return cs.load_pack().NODE_CLASS_MAPPINGS


def _defaults(cls) -> dict:
    out = {}
    for cat in ("required", "optional"):
        for name, entry in cls.INPUT_TYPES().get(cat, {}).items():
            if cs.is_widget(entry[0]):
                opts = entry[1] if len(entry) > 1 else {}
                out[name] = opts.get("default", entry[0][0] if isinstance(entry[0], list) else None)
    return out


def _new_scene(nodes, preset="gaussian-preview-cpu", **widgets):
    cls = nodes["CSDScene"]
    return cls().make(**{**_defaults(cls), "preset": preset, "background": "solid", **widgets})[0]


def test_the_scene_node_makes_splats_for_a_gaussian_preset(nodes):
    from csd_backend.scene.gaussians import GaussianScene

    scene = _new_scene(nodes, radius=1.5)
    again = _new_scene(nodes, radius=1.5)
    assert isinstance(scene, GaussianScene) and scene.kind == "gaussians" and scene._csd_untrained
    assert scene.num_gaussians == 2000 and scene.cfg.radius == 1.5 and scene.cfg.background == "solid"
    assert torch.equal(scene.means, again.means)  # a deterministic start, like the volume's
    assert _new_scene(nodes, preset="preview-cpu", n_levels=4, log2_hashmap_size=12, max_resolution=64).kind == "volume"
    presets = {n: nodes[n].INPUT_TYPES()["required"]["preset"][0] for n in ("CSDScene", "CSDOptimize",
                                                                            "CSDRefineMesh")}
    assert set(GAUSSIAN_PRESETS) <= set(presets["CSDScene"]) and set(GAUSSIAN_PRESETS) <= set(presets["CSDOptimize"])
    assert "csd-coarse" in presets["CSDOptimize"] and not set(GAUSSIAN_PRESETS) & set(presets["CSDRefineMesh"])
    assert "gaussian" in nodes["CSDScene"].INPUT_TYPES()["required"]["preset"][1]["tooltip"].lower()


def test_a_new_scene_of_the_other_kind_is_refused_naming_the_fix(nodes):
    optimize = nodes["CSDOptimize"]
    splats = _new_scene(nodes)
    volume = _new_scene(nodes, preset="preview-cpu", n_levels=4, log2_hashmap_size=12, max_resolution=64)
    with pytest.raises(Exception, match="new scene is a volume .*preset csd-gaussian trains Gaussian splats.*CSD 3D "
                                        "Scene"):
        optimize.start_scene(volume, "csd-gaussian")
    with pytest.raises(Exception, match="new scene is Gaussian splats .*preset csd-coarse trains a volume.*"
                                        "csd-gaussian, gaussian-preview-cpu, sds-gaussian"):
        optimize.start_scene(splats, "csd-coarse")
    with pytest.raises(Exception, match="new .untrained.*CSD Optimize first"):
        nodes["CSDRefineMesh"].start_scene(splats, "refine-cpu")
    assert optimize.start_scene(splats, "gaussian-preview-cpu") is splats


def test_optimize_trains_splats_and_the_scene_node_loads_the_run(env, nodes):
    from csd_backend.io import load_checkpoint

    guidance = nodes["CSDGuidance"]().build(**{**_defaults(nodes["CSDGuidance"]), "prompt": "a red ball"})[0]
    cameras = nodes["CSDCameras"]().build(**{**_defaults(nodes["CSDCameras"]), "width": 16, "height": 16})[0]
    new = _new_scene(nodes)
    kwargs = {**_defaults(nodes["CSDOptimize"]), "preset": "gaussian-preview-cpu", "steps": 2, "checkpoint_every": 1,
              "preview_every": 1, "run_name": "splats"}
    trained, preview = nodes["CSDOptimize"]().optimize(AnalyticPrior(16), guidance, new, cameras=cameras, **kwargs)
    assert trained.kind == "gaussians" and trained is not new and preview.shape == (1, 64, 64, 3)
    assert not torch.equal(trained.means, new.means) or not torch.equal(trained.sh_dc, new.sh_dc)
    state = load_checkpoint(env.output_dir / "csd3d" / "runs" / "splats_00001")
    assert state["step"] == 2 and state["config"]["scene"]["kind"] == "gaussians"
    scene_node = nodes["CSDScene"]
    assert "splats_00001" in scene_node.INPUT_TYPES()["required"]["source"][0]
    loaded = scene_node().make(**{**_defaults(scene_node), "source": "splats_00001"})[0]
    assert loaded.kind == "gaussians" and torch.equal(loaded.means, trained.means)


def test_save_gaussians_writes_a_splat_file_with_a_counter_and_refuses_other_scenes(env, nodes):
    from csd_backend.export import SplatFileError, load_splats

    save = nodes["CSDSaveGaussians"]
    assert save.RETURN_TYPES == ("STRING", "FILE_3D_SPLAT_ANY") and save.OUTPUT_NODE
    assert save.VALIDATE_INPUTS("csd3d/gaussians") is True
    assert "filename_prefix" in save.VALIDATE_INPUTS("../outside/splats")
    scene = _new_scene(nodes)
    first = save().save(scene, "csd3d/splats")
    second = save().save(scene, "csd3d/splats")
    assert [first["result"][0], second["result"][0]] == ["csd3d/splats_00001_.ply", "csd3d/splats_00002_.ply"]
    assert first["ui"]["3d"] == [{"filename": "splats_00001_.ply", "subfolder": "csd3d", "type": "output"}]
    assert first["result"][1] is None  # ComfyUI 0.3.64 (as these stubs): no 3D file type
    back = load_splats(env.output_dir / first["result"][0])
    assert torch.equal(back.means, scene.means) and back.num_gaussians == 2000
    volume = _new_scene(nodes, preset="preview-cpu", n_levels=4, log2_hashmap_size=12, max_resolution=64)
    with pytest.raises(Exception, match="got a volume scene, not Gaussian splats.*csd-gaussian.*CSD Extract Mesh"):
        save().save(volume, "csd3d/splats")
    with torch.no_grad():
        scene.log_scales[5] = float("nan")
    with pytest.raises(SplatFileError, match="not written, 1 of 2000 splats hold NaN.*earlier checkpoint"):
        save().save(scene, "csd3d/splats")
    assert sorted(p.name for p in (env.output_dir / "csd3d").iterdir()) == ["splats_00001_.ply",
                                                                            "splats_00002_.ply"]


def test_save_gaussians_gives_newer_comfyui_a_splat_file(env, nodes, monkeypatch):
    """Where ComfyUI has 3D file types (``comfy_api.latest.Types.File3D``, newer than 0.3.64), the second output is
    the saved .ply as one, for Preview Gaussian Splat."""
    import sys
    import types

    class File3D:  # the documented constructor: File3D(source=path or BytesIO, file_format=...)
        def __init__(self, source, file_format=""):
            self.source, self.format = source, file_format

    latest = types.ModuleType("comfy_api.latest")
    latest.Types = types.SimpleNamespace(File3D=File3D)
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    out = nodes["CSDSaveGaussians"]().save(_new_scene(nodes), "csd3d/splats")
    rel, splat = out["result"]
    assert isinstance(splat, File3D) and splat.format == "ply"
    assert splat.source == str(env.output_dir / rel) and (env.output_dir / rel).is_file()


def test_render_views_and_extract_mesh_take_a_gaussian_scene(env, nodes):
    scene = _new_scene(nodes)
    render = nodes["CSDRenderViews"]
    (views,) = render().render(**{**_defaults(render), "scene": scene, "n_views": 2, "size": 24})
    assert views.shape == (2, 24, 24, 3) and float(views.std()) > 0.01
    (white,) = render().render(**{**_defaults(render), "scene": scene, "n_views": 1, "size": 24,
                                  "background": "white"})
    assert float(white[0, 0, 0].min()) > 0.99  # a corner outside the ball of splats shows the background
    extract = nodes["CSDExtractMesh"]
    mesh, textured = extract().extract(scene, 32, 0.0, 128, 5000)
    assert mesh.vertices.shape[0] == 1 and textured.faces.shape[0] > 100
    lo, hi = textured.vertices.min(0), textured.vertices.max(0)
    assert (hi - lo).max() < 2 * scene.cfg.gaussians.init_radius + 0.3  # the ball of splats, not the whole box
