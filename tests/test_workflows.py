"""The shipped example workflows: UI/API twins agree, and the API workflows run end to end (tiny model, stubbed
ComfyUI), with progress previews, Cancel and resume."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest
import torch

import comfy_stubs as cs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_sd, tiny_mvdream):
    env = cs.install(monkeypatch, tmp_path)
    (env.models_dir / "diffusers" / "tiny-sd").symlink_to(tiny_sd["folder"], target_is_directory=True)
    (env.models_dir / "diffusers" / "tiny-mvdream").symlink_to(tiny_mvdream["folder"], target_is_directory=True)
    return env


@pytest.fixture
def classes(env):
    return cs.node_classes(cs.load_pack())


def _mesh_nodes_available(classes) -> bool:
    return "CSDExtractMesh" in classes and "CSDSaveMesh" in classes


def _prompt(name, classes):
    api = cs.load_api(name)
    if not all(node["class_type"] in classes for node in api.values()):
        pytest.skip("nodes/mesh.py (CSDExtractMesh, CSDSaveMesh) is not in the pack")
    return cs.for_tests(api, classes)


def _checkpoint(env, run_folder):
    from csd_backend.io import load_checkpoint

    return load_checkpoint(env.output_dir / "csd3d" / "runs" / run_folder)


# ------------------------------------------------------------------------------------------------ the files
def test_every_ui_workflow_has_an_api_twin():
    ui = sorted(p.stem for p in cs.UI_DIR.glob("*.json"))
    assert ui == cs.workflow_names() and cs.TEMPLATES["text_to_3d"] in ui and len(ui) >= 3
    for name in ui:
        wf = cs.load_ui(name)
        ids = [n["id"] for n in wf["nodes"]]
        assert len(set(ids)) == len(ids) and wf["last_node_id"] >= max(ids), name
        link_ids = [link[0] for link in wf["links"]]
        assert len(set(link_ids)) == len(link_ids) and wf["last_link_id"] >= max(link_ids), name
        nodes = {n["id"]: n for n in wf["nodes"]}
        for lid, src, slot, dst, dst_slot, typ in wf["links"]:  # both ends of every link agree
            assert lid in nodes[src]["outputs"][slot]["links"] and nodes[src]["outputs"][slot]["type"] == typ, name
            assert nodes[dst]["inputs"][dst_slot]["link"] == lid, name


@pytest.mark.parametrize("name", cs.workflow_names())
def test_ui_and_api_twins_have_the_same_nodes_links_and_values(name, classes):
    ui = cs.load_ui(name)
    if not all(n["type"] in classes for n in ui["nodes"] if n["type"] not in cs.FRONTEND_ONLY_NODES):
        pytest.skip("nodes/mesh.py (CSDExtractMesh, CSDSaveMesh) is not in the pack")
    strip = lambda wf: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in wf.items()}  # noqa: E731
    assert strip(cs.ui_to_api(ui, classes)) == strip(cs.load_api(name))


def _notes(ui):
    return [n for n in ui["nodes"] if n["type"] in cs.FRONTEND_ONLY_NODES]


@pytest.mark.parametrize("name", cs.workflow_names())
def test_every_template_has_a_note_on_hardware_and_time_in_the_ui_file_only(name):
    """A Note as the real frontend stores it (type "Note", widgets_values [text], no inputs or outputs): the UI
    file has one, the API twin none (a Note has no class on the server)."""
    ui, api = cs.load_ui(name), cs.load_api(name)
    notes = _notes(ui)
    assert len(notes) == 1, name
    note = notes[0]
    assert note["type"] == "Note" and note["inputs"] == [] and note["outputs"] == [] and note.get("mode", 0) == 0
    assert isinstance(note["properties"], dict) and len(note["widgets_values"]) == 1
    text = note["widgets_values"][0]
    assert isinstance(text, str) and len(text) > 200
    assert "GPU" in text and "CPU" in text and "minutes" in text and "measured" in text.lower(), text
    if name != cs.TEMPLATES["cpu"]:  # numbers that were not measured are said to be estimates
        assert "estimate, not measured" in text and "not measured yet" in text, text
    assert not any(v["class_type"] in cs.FRONTEND_ONLY_NODES for v in api.values())
    assert len(api) == len(ui["nodes"]) - 1
    assert note["id"] <= ui["last_node_id"] and note["id"] not in {link[1] for link in ui["links"]}


@pytest.mark.parametrize("name", cs.workflow_names())
def test_notes_name_only_templates_and_presets_that_exist(name):
    """A Note that sends users to another template or a preset names one that exists (templates were renamed;
    the old names must not linger)."""
    import re

    from csd_backend.presets import preset_names

    text = _notes(cs.load_ui(name))[0]["widgets_values"][0]
    for ref in re.findall(r"\b\d\d-[A-Za-z0-9-]*[A-Za-z0-9]", text):
        assert ref in cs.workflow_names(), ref
    old_names = {"csd_text_to_3d_cpu", "csd_text_to_3d", "csd_two_stage", "csd_edit_scene", "csd_texture_mesh",
                 "csd_comfy_checkpoint", "sds_baseline", "vsd_prolificdreamer"}
    old = [w for w in re.findall(r"\b(?:csd|sds|vsd)_[a-z0-9_]+", text) if w in old_names]
    assert not old, old
    named = re.findall(r"\b[a-z0-9]+(?:-[a-z0-9]+)*-cpu\b", text) + re.findall(r"preset ([a-z0-9]+(?:-[a-z0-9]+)+)", text)
    assert named and set(named) <= set(preset_names()), named


@pytest.mark.parametrize("name,batch", [(cs.TEMPLATES["text_to_3d"], 4), (cs.TEMPLATES["edit"], 4),
                                        (cs.TEMPLATES["sds"], 1), (cs.TEMPLATES["cpu"], 4)])
def test_template_camera_batch_sizes(name, batch):
    """The official CSD object config trains with batch 4 (csd-edit follows); threestudio's dreamfusion-sd uses 1;
    the CPU template preview-cpu's 4 (a better shape than 1 for 1.4× to 3.3× the time a step)."""
    cams = [v for v in cs.load_api(name).values() if v["class_type"] == "CSDCameras"]
    assert cams and all(c["inputs"]["batch_size"] == batch for c in cams), name


def test_cpu_template_is_the_small_preset_end_to_end():
    names = [n for n in cs.workflow_names() if "cpu" in n.lower()]
    assert names == [cs.TEMPLATES["cpu"]]
    api = cs.load_api(cs.TEMPLATES["cpu"])
    by_class = {v["class_type"]: v["inputs"] for v in api.values()}
    assert by_class["CSDScene"]["preset"] == by_class["CSDOptimize"]["preset"] == "preview-cpu"
    assert by_class["CSDOptimize"]["steps"] <= 400 and by_class["CSDCameras"]["width"] <= 64
    assert by_class["CSDExtractMesh"]["resolution"] <= 128 and by_class["CSDExtractMesh"]["texture_size"] <= 512
    assert by_class["CSDSaveMesh"]["format"] == "glb"
    assert "CSDRenderViews" not in by_class
    note = _notes(cs.load_ui(cs.TEMPLATES["cpu"]))[0]["widgets_values"][0]
    assert "bench_cpu_template.py" in note
    readme = (cs.ROOT / "README.md").read_text(encoding="utf-8")
    assert cs.TEMPLATES["cpu"] in readme and "bench_cpu_template.py" in readme


def test_cpu_template_uses_the_shipped_toy_prior_and_says_how_to_switch():
    """The CPU template runs on a fresh install: the toy prior ships with the pack (a 5 GB download was HTTP 400
    for everyone who had not made it), with a prompt the toy knows at its native 64² (resolution 0); its Note says
    so and how to switch to a real model."""
    from csd_backend.priors import TOY_MODEL, TOY_PROMPTS

    api = cs.load_api(cs.TEMPLATES["cpu"])
    by_class = {v["class_type"]: v["inputs"] for v in api.values()}
    assert by_class["CSDLoadDiffusionModel"]["model"] == TOY_MODEL == "toy"
    assert by_class["CSDLoadDiffusionModel"]["resolution"] == 0
    assert by_class["CSDGuidance"]["prompt"] in TOY_PROMPTS
    note = _notes(cs.load_ui(cs.TEMPLATES["cpu"]))[0]["widgets_values"][0]
    assert "toy" in note and all(p in note for p in TOY_PROMPTS)
    assert "stable-diffusion-2-1-base" in note and "resolution" in note  # how to switch to a real model


@pytest.fixture
def fresh_install(tmp_path, monkeypatch):
    """A ComfyUI with no model in its folders (a fresh install)."""
    env = cs.install(monkeypatch, tmp_path)
    return env, cs.node_classes(cs.load_pack())


def test_cpu_template_as_shipped_is_accepted_by_a_fresh_install(fresh_install):
    """Queued unchanged on a ComfyUI without any model, the CPU template passes validation (no HTTP 400)."""
    _env, classes = fresh_install
    good, errors = cs.validate_prompt(cs.load_api(cs.TEMPLATES["cpu"]), classes)
    assert errors == {} and good


def test_cpu_template_runs_with_its_own_toy_prior(fresh_install):
    """The CPU template end to end with the toy prior it ships with (only sizes and steps cut for CI)."""
    env, classes = fresh_install
    overrides = {k: v for k, v in cs.TEST_OVERRIDES.items() if k != "CSDLoadDiffusionModel"}
    prompt = cs.for_tests(cs.load_api(cs.TEMPLATES["cpu"]), classes, overrides)
    run = cs.execute_prompt(prompt, classes, env)
    loader = next(k for k, v in prompt.items() if v["class_type"] == "CSDLoadDiffusionModel")
    assert run.results[loader][0].name == "toy"
    preview = next(k for k, v in prompt.items() if v["class_type"] == "Preview3D")
    assert (env.output_dir / run.outputs[preview]["result"][0]).is_file()


@pytest.mark.parametrize("name", [cs.TEMPLATES["text_to_3d"], cs.TEMPLATES["cpu"]])
def test_text_to_3d_ends_with_mesh_export_and_preview_3d(name):
    api = cs.load_api(name)
    by_class = {v["class_type"]: (k, v) for k, v in api.items()}
    _, preview = by_class["Preview3D"]
    save_id, save = by_class["CSDSaveMesh"]
    extract_id, _ = by_class["CSDExtractMesh"]
    optimize_id, _ = by_class["CSDOptimize"]
    assert preview["inputs"]["model_file"] == [save_id, 0]
    assert save["inputs"]["textured_mesh"] == [extract_id, 1]
    assert api[extract_id]["inputs"]["scene"] == [optimize_id, 0]


# ---------------------------------------------------------------------------------------- the Templates dialog
def test_template_names_read_as_descriptions_in_order():
    """Frontend 1.27.10 shows a custom-node template's file name as the card title and the name with - and _ as
    spaces as its description: names are numbered (the CPU demo first), spelled with hyphens (a break point for
    the two-line title) and only use characters every file system and URL takes."""
    import re

    names = cs.workflow_names()
    assert names[0] == cs.TEMPLATES["cpu"] and sorted(cs.TEMPLATES.values()) == names
    for i, name in enumerate(names, 1):
        assert re.fullmatch(r"\d\d(-[A-Za-z0-9]+)+", name) and name.startswith(f"{i:02d}-"), name
        assert len(name) <= 48, "two lines of a card title"
        assert name.endswith("-GPU") == (name != cs.TEMPLATES["cpu"]), "the GPU tag says which need a GPU"


@pytest.mark.parametrize("name", cs.workflow_names())
def test_every_template_has_a_thumbnail_that_is_a_render(name):
    """<name>.jpg beside the UI file is the card's image (/api/workflow_templates/<pack>/<name>.jpg): a small square
    JPEG of renders, made by benchmarks/template_thumbnails.py, and the Note says what it shows."""
    from PIL import Image, ImageStat

    path = cs.UI_DIR / f"{name}.jpg"
    assert path.is_file(), f"no thumbnail {path.name}: run python benchmarks/template_thumbnails.py"
    assert 5_000 <= path.stat().st_size <= 100_000, path.stat().st_size
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.mode == "RGB"
        assert img.size[0] == img.size[1] and 256 <= img.size[0] <= 512, img.size
        assert max(ImageStat.Stat(img).stddev) > 20, "not a blank image"
    note = _notes(cs.load_ui(name))[0]["widgets_values"][0]
    assert "thumbnail" in note.lower() and "toy" in note and "template_thumbnails.py" in note, name


def _thumbnail_script():
    bench = str(cs.ROOT / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import template_thumbnails

    return template_thumbnails


def test_no_stray_thumbnails_and_the_script_knows_every_template():
    tt = _thumbnail_script()

    assert sorted(p.stem for p in cs.UI_DIR.glob("*.jpg")) == cs.workflow_names()
    assert sorted(tt.RECIPES) == cs.workflow_names() and tt.CPU_DEMO == cs.TEMPLATES["cpu"]


def test_thumbnail_script_runs_a_template_with_the_toy_prior(tmp_path):
    """The checkpoint template's recipe (the toy weights as ComfyUI's MODEL/CLIP/VAE, CPU presets) for one step:
    the graph runs and a 384x384 JPEG comes out."""
    from PIL import Image

    tt = _thumbnail_script()
    (tmp_path / "out").mkdir()
    r = tt.make_thumbnail(cs.TEMPLATES["checkpoint"], tmp_path / "out", tmp_path / "work", steps=1)
    with Image.open(r["jpg"]) as img:
        assert img.size == (tt.SIZE, tt.SIZE) and img.format == "JPEG"
    assert r["presets"] == {"6": "preview-cpu"} and r["steps"] == {"6": 1}


@pytest.mark.parametrize("name", cs.workflow_names())
def test_thumbnail_recipes_run_every_trainer_cpu_sized(name):
    """Every node that trains (CSD Optimize, Refine, Texture, MVDream) runs a CPU preset for at most 150 steps in
    the thumbnail's graph (a GPU preset left in place ran csd-mvdream's 8 x 4 views of 512 samples and took 20 GB)."""
    tt = _thumbnail_script()
    recipe = tt.RECIPES[name]
    if recipe.prompt is None:  # the CPU demo runs as shipped
        api = cs.load_api(name)
    else:
        api = tt.cpu_sized(cs.load_api(name), recipe)
    trainers = [n["inputs"] for n in api.values() if n["class_type"] in tt.TRAINERS]
    assert trainers, "a template trains something"
    for inputs in trainers:
        assert inputs["preset"].endswith("-cpu") and inputs["steps"] <= 150, inputs
        guidance = api[inputs["guidance"][0]]["inputs"] if "guidance" in inputs else {}
        # the t range is the preset's (texture-cpu's t up to 0.98 colours the vase in 150 steps; sds-gaussian and
        # mvdream anneal t linearly, which the widgets cannot express)
        assert all(guidance.get(k, -1) == -1 for k in ("t_min", "t_max_start", "t_max_end", "t_max_switch_at"))


# ------------------------------------------------------------------------------------- the default view
@dataclass(frozen=True)
class Screen:
    """ComfyUI's frontend 1.27.10 at a window size, first run, default settings (measured in headless Chromium by
    loading every template through the Templates dialog): where the graph canvas is in the window and which parts
    of it the interface covers. Window pixels."""
    canvas: tuple  # x, y, width, height of the canvas element (right of the side bar, below the top menu)
    covered_top: float  # the workflow tab bar covers the canvas down to this y (at 1280x720 it floats over it)
    corner: tuple  # x, y of the bottom-right corner that the minimap and the zoom controls cover


SCREENS = {
    "1280x720": Screen(canvas=(40, 40, 1240, 680), covered_top=78, corner=(956, 454)),
    "1920x1080": Screen(canvas=(64, 78, 1856, 1002), covered_top=78, corner=(1596, 814)),
}
#: LiteGraph.NODE_TITLE_HEIGHT: a node's title bar sits above its "pos"
TITLE_HEIGHT = 30
#: the sizes frontend 1.27.10 gives nodes whose stored size is smaller (it grows a node to fit its widgets)
FRONTEND_MIN_SIZE = {"CSDCameras": (420, 370)}
#: the least space between two nodes' boxes (title bars included), graph units
NODE_GAP = 20


def _box(node):
    """A node's box in graph units, title bar included: x0, y0, x1, y1."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def _on_screen(box, ds, screen: Screen):
    """``box`` in window pixels at the view ``ds`` (extra.ds: screen = canvas origin + (graph + offset) · scale)."""
    (ox, oy), s = ds["offset"], ds["scale"]
    cx, cy = screen.canvas[:2]
    return cx + (box[0] + ox) * s, cy + (box[1] + oy) * s, cx + (box[2] + ox) * s, cy + (box[3] + oy) * s


def _unobstructed(rect, screen: Screen) -> bool:
    cx, cy, cw, ch = screen.canvas
    x0, y0, x1, y1 = rect
    inside = x0 >= cx and x1 <= cx + cw and y0 >= max(cy, screen.covered_top) and y1 <= cy + ch
    in_corner = x1 > screen.corner[0] and y1 > screen.corner[1]
    return inside and not in_corner


@pytest.mark.parametrize("screen", sorted(SCREENS))
@pytest.mark.parametrize("name", cs.workflow_names())
def test_note_and_first_node_are_in_view_at_the_default_zoom(name, screen):
    """Loaded from the Templates dialog, a template opens at its saved view (extra.ds): the Note ("Hardware and
    time") and the first node (id 1, where the graph starts) must be fully on the canvas at 1280x720 and
    1920x1080, below the tab bar and clear of the minimap, at a readable zoom."""
    ui = cs.load_ui(name)
    ds = ui["extra"]["ds"]
    assert 0.6 <= ds["scale"] <= 1.0, "a zoom at which the widgets stay readable"
    nodes = {n["id"]: n for n in ui["nodes"]}
    first = nodes[1]
    assert all(inp.get("link") is None for inp in first.get("inputs", [])), "node 1 starts the graph"
    for node in _notes(ui) + [first]:
        rect = _on_screen(_box(node), ds, SCREENS[screen])
        assert _unobstructed(rect, SCREENS[screen]), (node["type"], [round(v) for v in rect])


@pytest.mark.parametrize("name", cs.workflow_names())
def test_nodes_do_not_overlap_and_keep_the_size_the_frontend_gives_them(name):
    ui = cs.load_ui(name)
    for node in ui["nodes"]:
        least = FRONTEND_MIN_SIZE.get(node["type"], (0, 0))
        assert node["size"][0] >= least[0] and node["size"][1] >= least[1], (node["type"], node["size"], least)
    boxes = [(n["type"], n["id"], _box(n)) for n in ui["nodes"]]
    for i, (ta, ia, a) in enumerate(boxes):
        for tb, ib, b in boxes[i + 1:]:
            apart = (a[2] + NODE_GAP <= b[0] or b[2] + NODE_GAP <= a[0] or a[3] + NODE_GAP <= b[1]
                     or b[3] + NODE_GAP <= a[1])
            assert apart, f"{ta}#{ia} {a} and {tb}#{ib} {b} overlap or touch"


def test_the_screen_model_catches_what_it_looks_for():
    """The shipped layout before this check: the Note at x = -620 was off-screen, a node at y = 0 under the tab
    bar at 1280x720 (its title at y = 47 < 78), a node in the minimap's corner hidden."""
    ds = {"offset": [40, 40], "scale": 0.75}
    small = SCREENS["1280x720"]
    note = {"pos": [-620, 0], "size": [560, 360]}
    assert not _unobstructed(_on_screen(_box(note), ds, small), small)
    loader = {"pos": [0, 0], "size": [420, 180]}
    assert not _unobstructed(_on_screen(_box(loader), ds, small), small)
    assert _unobstructed(_on_screen(_box(loader), ds, SCREENS["1920x1080"]), SCREENS["1920x1080"])
    assert not _unobstructed(_on_screen(_box({"pos": [1300, 500], "size": [200, 100]}), ds, small), small)
    assert _unobstructed(_on_screen(_box({"pos": [0, 100], "size": [420, 180]}), ds, small), small)


# ------------------------------------------------------------------------------------------ end to end
def _check_optimize_progress(env, node_id, steps):
    updates = [p for p in env.progress if p[0] == node_id]
    assert [p[1] for p in updates] == list(range(1, steps + 1)), "one progress update per step"
    assert all(p[2] == steps for p in updates)
    for _node, _value, _total, preview in updates:  # preview_every = 1 in the test settings
        kind, image, max_size = preview
        # 16² training renders, enlarged ×32 by nearest neighbour to be viewable: blocks of one colour
        assert kind == "JPEG" and image.size == (512, 512) and image.mode == "RGB" and max_size == 512
        small = image.resize((16, 16), resample=0)  # Image.NEAREST: one pixel per block
        blocks = small.resize((512, 512), resample=0)
        rows = 512 - 64  # above the caption band, which says what the render shows ("step 1: colour ...")
        assert blocks.crop((0, 0, 512, rows)).tobytes() == image.crop((0, 0, 512, rows)).tobytes()
        assert blocks.crop((0, rows, 512, 512)).tobytes() != image.crop((0, rows, 512, 512)).tobytes()


@pytest.mark.parametrize("name", cs.workflow_names())
def test_api_workflow_runs_end_to_end(name, env, classes):
    prompt = _prompt(name, classes)
    run = cs.execute_prompt(prompt, classes, env)
    steps = cs.TEST_OVERRIDES["CSDOptimize"]["steps"]
    for nid, node in prompt.items():
        kind = node["class_type"]
        assert nid in run.results, f"{kind} did not run"
        if kind == "CSDOptimize":
            _check_optimize_progress(env, nid, steps)
            ckpt = _checkpoint(env, f"{node['inputs']['run_name']}_00001")
            assert ckpt["step"] == steps
            assert ckpt["config"]["guidance"]["mode"] == prompt[node["inputs"]["guidance"][0]]["inputs"]["mode"]
            assert run.results[nid][1].shape == (1, 64, 64, 3)  # rendered at 4× the 16² training size
        elif kind == "SaveImage":
            images = run.outputs[nid]["images"]
            assert len(images) == cs.TEST_OVERRIDES["CSDRenderViews"]["n_views"]
            for img in images:
                assert (env.output_dir / img["subfolder"] / img["filename"]).is_file()
        elif kind == "Preview3D":
            model_file = run.outputs[nid]["result"][0]
            assert not model_file.startswith("/") and (env.output_dir / model_file).is_file()
            assert model_file.endswith(".glb")
        elif kind == "CSDSaveGaussians":  # the trained splats as a 3DGS .ply under the output folder
            from csd_backend.export import load_splats

            rel = run.results[nid][0]
            (item,) = run.outputs[nid]["3d"]
            assert rel == f"{item['subfolder']}/{item['filename']}" and rel.endswith("_00001_.ply")
            splats = load_splats(env.output_dir / rel)
            assert torch.equal(splats.means, run.results[node["inputs"]["scene"][0]][0].means)
    if name == cs.TEMPLATES["edit"]:
        _check_edit(env, prompt, run)
    if name in (cs.TEMPLATES["two_stage"], cs.TEMPLATES["texture"]):
        _check_stage2(env, prompt, run, name)


def _check_stage2(env, prompt, run, name):
    """Refine converts the trained volume into a DMTet mesh scene (its input untouched); Texture paints the loaded
    mesh without moving it; both runs checkpoint and export their own mesh."""
    import trimesh

    kind, node = ("dmtet", "CSDRefineMesh") if name == cs.TEMPLATES["two_stage"] else ("mesh", "CSDTextureMesh")
    nid = next(k for k, v in prompt.items() if v["class_type"] == node)
    scene = run.results[nid][0]
    assert scene.kind == kind and run.results[nid][1].shape[0] == 1
    ckpt = _checkpoint(env, f"{prompt[nid]['inputs']['run_name']}_00001")
    assert ckpt["step"] == 2 and ckpt["config"]["scene"]["kind"] == kind
    assert ckpt["config"]["guidance"]["weighting"] == "sds"  # the stage-2 guidance node's coefficients
    source = run.results[prompt[nid]["inputs"]["scene"][0]][0]
    if kind == "dmtet":
        assert source.kind == "volume"  # the stage-1 output is not replaced by the converted scene
    else:
        assert torch.equal(source.geometry.vertices, scene.geometry.vertices)
    preview = next(k for k, v in prompt.items() if v["class_type"] == "Preview3D")
    mesh = trimesh.load(env.output_dir / run.outputs[preview]["result"][0], force="mesh")
    v, f = scene.mesh()
    budget = next(v["inputs"]["face_budget"] for v in prompt.values() if v["class_type"] == "CSDExtractMesh")
    if f.shape[0] <= budget:  # the scene's own mesh, not a marching-cubes remesh
        assert len(mesh.faces) == f.shape[0]
    else:  # decimated to the budget
        assert budget * 0.9 <= len(mesh.faces) <= budget


def _check_edit(env, prompt, run):
    """ComfyUI caches node outputs: Optimize must return a new scene and never modify its input."""
    from csd_backend.optimize import load_scene

    generate = next(k for k, v in prompt.items() if v["class_type"] == "CSDOptimize" and v["inputs"]["run_name"] == "corgi")
    edit = next(k for k, v in prompt.items() if v["class_type"] == "CSDOptimize" and k != generate)
    assert prompt[edit]["inputs"]["scene"] == [generate, 0]
    saved, _ = load_scene(env.output_dir / "csd3d" / "runs" / "corgi_00001")
    generated, edited = run.results[generate][0], run.results[edit][0]
    assert generated is not edited
    for key, value in saved.state_dict().items():
        assert torch.equal(value, generated.state_dict()[key]), f"the edit changed its input scene ({key})"
    assert any(not torch.equal(v, edited.state_dict()[k]) for k, v in generated.state_dict().items())
    cfg = _checkpoint(env, "corgi_party_hat_00001")["config"]
    assert cfg["guidance"]["mode"] == "edit" and cfg["guidance"]["source_prompt"] == "a DSLR photo of a corgi"
    assert cfg["scene"] == _checkpoint(env, "corgi_00001")["config"]["scene"]


def _optimize_only(classes, steps):
    """The text-to-3D workflow up to Optimize (+ its preview), for the Cancel tests."""
    api = cs.for_tests(cs.without_missing_nodes(cs.load_api(cs.TEMPLATES["text_to_3d"]), classes), classes)
    keep = {"CSDLoadDiffusionModel", "CSDGuidance", "CSDScene", "CSDCameras", "CSDOptimize", "PreviewImage"}
    prompt = {k: v for k, v in api.items() if v["class_type"] in keep}
    opt = next(k for k, v in prompt.items() if v["class_type"] == "CSDOptimize")
    prompt[opt]["inputs"].update({"steps": steps, "checkpoint_every": 0, "run_name": "cancel_me"})
    return prompt, opt


@pytest.mark.parametrize("when", ["during_step", "between_steps"])
def test_cancel_keeps_a_checkpoint_and_resume_finishes_the_run(env, classes, when):
    """Cancel (ComfyUI's interrupt flag) stops Optimize within a step with InterruptProcessingException, a
    checkpoint is kept although checkpoint_every is 0, and resume=True continues it to the same result."""
    prompt, opt = _optimize_only(classes, steps=3)

    def press_cancel(env, value, total):
        if env.current_node == opt and value == 1:
            env.interrupt()

    # during a step: the flag is seen by ComfyUI's progress hook; between steps: by the engine's cancel check
    if when == "during_step":
        env.on_progress = press_cancel
    else:
        env.on_progress_after = press_cancel
    with pytest.raises(env.mm.InterruptProcessingException):
        cs.execute_prompt(prompt, classes, env)
    assert env.mm.processing_interrupted() is False, "the interrupt is consumed, as ComfyUI does"
    assert _checkpoint(env, "cancel_me_00001")["step"] == 1
    env.on_progress = env.on_progress_after = None

    env.progress.clear()
    prompt[opt]["inputs"]["resume"] = True
    resumed = cs.execute_prompt(prompt, classes, env)
    assert [p[1] for p in env.progress if p[0] == opt] == [1, 2, 3]  # the bar starts where the run was
    assert _checkpoint(env, "cancel_me_00001")["step"] == 3
    assert not (env.output_dir / "csd3d" / "runs" / "cancel_me_00002").exists()
    if when == "between_steps":  # the saved run is offered by CSD 3D Scene and loads the trained scene
        scene_node = classes["CSDScene"]
        assert "cancel_me_00001" in scene_node.INPUT_TYPES()["required"]["source"][0]
        kwargs = {name: entry[1]["default"] for name, entry in scene_node.INPUT_TYPES()["required"].items()}
        (loaded,) = scene_node().make(**{**kwargs, "source": "cancel_me_00001"})
        for key, value in resumed.results[opt][0].state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key]), key
        return
    prompt[opt]["inputs"]["resume"] = False  # the same run without Cancel
    straight = cs.execute_prompt(prompt, classes, env)
    assert _checkpoint(env, "cancel_me_00002")["step"] == 3
    a, b = resumed.results[opt][0].state_dict(), straight.results[opt][0].state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_resume_without_a_checkpoint_is_rejected(env, classes):
    prompt, opt = _optimize_only(classes, steps=2)
    prompt[opt]["inputs"]["resume"] = True
    with pytest.raises(cs.PromptRejected) as info:
        cs.execute_prompt(prompt, classes, env)
    assert "resume" in json.dumps(info.value.errors)


def test_resume_never_falls_back_to_an_older_run(env, classes):
    """The newest run of a name crashed before its first checkpoint: resume must say so, not silently continue
    the older run (with its other settings)."""
    prompt, opt = _optimize_only(classes, steps=2)
    cs.execute_prompt(prompt, classes, env)
    assert _checkpoint(env, "cancel_me_00001")["step"] == 2
    crashed = env.output_dir / "csd3d" / "runs" / "cancel_me_00002"
    crashed.mkdir()
    (crashed / "config.json").write_text("{}")
    prompt[opt]["inputs"]["resume"] = True
    with pytest.raises(cs.PromptRejected) as info:
        cs.execute_prompt(prompt, classes, env)
    assert "cancel_me_00002 has no checkpoint" in json.dumps(info.value.errors)
