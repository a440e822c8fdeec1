"""Node contracts (INPUT_TYPES, defaults, RETURN_TYPES), pack loading and input validation, without ComfyUI."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import comfy_stubs as cs

MY_NODES = {"CSDLoadDiffusionModel", "CSDGuidance", "CSDScene", "CSDCameras", "CSDOptimize", "CSDRenderViews",
            "CSDRefineMesh", "CSDTextureMesh", "CSDLoadMesh", "CSDDepthControlNet", "CSDSaveGaussians"}
SMALL_SCENE = dict(radius=1.0, n_levels=4, log2_hashmap_size=12, max_resolution=64, background="neural_env")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def env(tmp_path, monkeypatch):
    return cs.install(monkeypatch, tmp_path)


@pytest.fixture
def pack(env):
    return cs.load_pack()


@pytest.fixture
def part(pack):
    """A helper module of the pack's nodes (``part("widgets")``), as the pack loaded it."""
    return lambda name: sys.modules[f"{cs.PACK_MODULE}.nodes.{name}"]


def defaults(cls) -> dict:
    out = {}
    for cat in ("required", "optional"):
        for name, entry in cls.INPUT_TYPES().get(cat, {}).items():
            typ, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if cs.is_widget(typ):
                out[name] = opts["default"] if "default" in opts else (typ[0] if isinstance(typ, list) and typ else None)
    return out


# --------------------------------------------------------------------------------------------------- loading
def test_pack_import_is_light_and_merges_every_module():
    """Importing the pack (as ComfyUI does) loads no torch/diffusers/transformers and no model."""
    code = textwrap.dedent(f"""
        import importlib.util, json, sys, time
        t0 = time.perf_counter()
        spec = importlib.util.spec_from_file_location("pack", {str(cs.ROOT / '__init__.py')!r},
                                                      submodule_search_locations=[{str(cs.ROOT)!r}])
        m = importlib.util.module_from_spec(spec); sys.modules["pack"] = m; spec.loader.exec_module(m)
        heavy = [h for h in ("torch", "diffusers", "transformers", "numpy", "PIL") if h in sys.modules]
        print(json.dumps({{"heavy": heavy, "nodes": sorted(m.NODE_CLASS_MAPPINGS),
                          "names": sorted(m.NODE_DISPLAY_NAME_MAPPINGS), "failures": sorted(sys.modules["pack.nodes"].IMPORT_FAILURES),
                          "seconds": time.perf_counter() - t0}}))
    """)
    # a clean interpreter outside the repo (csd_backend must be found through the pack itself, not sys.path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         env={"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["heavy"] == [], f"importing the pack imported {info['heavy']}"
    assert MY_NODES <= set(info["nodes"]), info
    assert set(info["nodes"]) == set(info["names"]), "every node needs a display name"
    assert info["failures"] == [], info["failures"]


@pytest.mark.parametrize("first_is_older", [False, True])
def test_two_copies_of_the_pack_log_one_warning_naming_both(tmp_path, first_is_older):
    """ComfyUI imports each pack folder under its own module name (the path with '.' replaced). A second copy of
    the pack logs one warning naming both folders, also when the first copy is an older version without the
    check; a single copy, or the same module imported again, none."""
    import shutil

    folders = []
    for where in ("custom_nodes", "extra_nodes"):
        folder = tmp_path / where / "comfyui-csd-3d"
        folder.mkdir(parents=True)
        init = (cs.ROOT / "__init__.py").read_text(encoding="utf-8")
        if first_is_older and not folders:  # a version before the check: neither records nor warns
            call = "else:\n    _warn_if_loaded_twice()\n"
            assert init.count(call) == 1
            init = init.replace(call, "else:\n    pass\n")
        (folder / "__init__.py").write_text(init, encoding="utf-8")
        for sub in ("nodes", "csd_backend"):
            shutil.copytree(cs.ROOT / sub, folder / sub, ignore=shutil.ignore_patterns("__pycache__"))
        folders.append(folder)
    code = textwrap.dedent(f"""
        import importlib.util, json, logging, sys
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())
        logging.getLogger().addHandler(Keep())
        def load(folder):  # nodes.py:load_custom_node of ComfyUI 0.3.64
            name = folder.replace(".", "_x_")
            spec = importlib.util.spec_from_file_location(name, folder + "/__init__.py")
            m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m)
            return sorted(m.NODE_CLASS_MAPPINGS)
        out = {{"nodes": [load({str(folders[0])!r})]}}
        out["after_one"] = list(records)
        out["nodes"].append(load({str(folders[1])!r}))
        out["after_two"] = list(records)
        out["heavy"] = [h for h in ("torch", "numpy", "PIL") if h in sys.modules]
        print(json.dumps(out))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         env={"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["nodes"][0] == out["nodes"][1] and MY_NODES <= set(out["nodes"][0])
    assert not [r for r in out["after_one"] if "two copies" in r], out["after_one"]
    warnings = [r for r in out["after_two"] if "two copies of this node pack are loaded" in r]
    assert len(warnings) == 1, out["after_two"]
    assert f"{folders[0]} (first) and {folders[1]}" in warnings[0], warnings[0]
    assert out["heavy"] == [], "the check must stay cheap"


def test_importing_the_same_pack_module_again_is_not_a_second_copy(env, pack):
    import logging

    loaded = logging.getLogger("csd3d").__dict__["_csd3d_pack_copies"]
    assert any(name == cs.PACK_MODULE for name, _shown, _real in loaded)
    before = list(loaded)
    pack._warn_if_loaded_twice()
    assert loaded == before


def test_a_broken_module_is_reported_and_the_others_load(tmp_path, pack):
    nodes_pkg = sys.modules[f"{cs.PACK_MODULE}.nodes"]
    pkg = tmp_path / "fakepack"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("class A: pass\nclass B: pass\n"
                                 "NODE_CLASS_MAPPINGS = {'A': A, 'B': B}\nNODE_DISPLAY_NAME_MAPPINGS = {'A': 'Node A'}\n")
    (pkg / "bad.py").write_text("raise RuntimeError('boom')\n")
    (pkg / "z_dupe.py").write_text("class A2: pass\nNODE_CLASS_MAPPINGS = {'A': A2, 'C': A2}\n")
    (pkg / "_helper.py").write_text("raise RuntimeError('helpers are not imported by the scan')\n")
    (pkg / "plain.py").write_text("X = 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        classes, names, failures = nodes_pkg.collect_mappings("fakepack", str(pkg))
    finally:
        sys.path.remove(str(tmp_path))
        for k in [k for k in sys.modules if k.startswith("fakepack")]:
            del sys.modules[k]
    assert set(classes) == {"A", "B", "C"} and classes["A"].__name__ == "A"
    assert names == {"A": "Node A"}
    assert "boom" in failures["bad"] and "z_dupe:A" in failures and "_helper" not in failures


def test_model_folders_are_merged_never_overwritten(env, part):
    fp = env.folder_paths
    extra = str(env.root / "elsewhere")
    fp.folder_names_and_paths["diffusers"] = ([extra], set())  # as extra_model_paths.yaml creates it: all files
    fp.folder_names_and_paths["checkpoints"] = ([extra], {".safetensors", ".gguf"})
    part("model_folders").register_model_folders()
    paths, exts = fp.folder_names_and_paths["diffusers"]
    assert paths == [extra, str(env.models_dir / "diffusers")] and exts == set()
    paths, exts = fp.folder_names_and_paths["checkpoints"]
    assert paths[0] == extra and str(env.models_dir / "checkpoints") in paths
    assert {".safetensors", ".gguf", ".ckpt"} <= exts
    del fp.folder_names_and_paths["diffusers"]
    part("model_folders").register_model_folders()
    assert fp.folder_names_and_paths["diffusers"][0] == [str(env.models_dir / "diffusers")]
    part("model_folders").register_model_folders()  # idempotent
    assert fp.folder_names_and_paths["diffusers"][0] == [str(env.models_dir / "diffusers")]


def test_model_list_finds_diffusers_folders_and_checkpoints(env, pack, tiny_sd):
    (env.models_dir / "diffusers" / "sd").mkdir()
    (env.models_dir / "diffusers" / "sd" / "tiny").symlink_to(tiny_sd["folder"], target_is_directory=True)
    (env.models_dir / "diffusers" / "not-a-model").mkdir()
    (env.models_dir / "checkpoints" / "tiny.safetensors").symlink_to(tiny_sd["single_file"])
    (env.models_dir / "checkpoints" / "notes.txt").write_text("x")
    spec = pack.NODE_CLASS_MAPPINGS["CSDLoadDiffusionModel"].INPUT_TYPES()["required"]
    assert spec["model"][0] == ["diffusers/sd/tiny", "checkpoints/tiny.safetensors", "toy"]
    assert spec["config_from"][0] == ["(auto)", "diffusers/sd/tiny"]


# ------------------------------------------------------------------------------------------------- contracts
def test_every_node_contract(env, pack):
    assert MY_NODES <= set(pack.NODE_CLASS_MAPPINGS)
    for node_id, cls in sorted(pack.NODE_CLASS_MAPPINGS.items()):
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, node_id
        for cat in ("required", "optional"):
            for name, entry in spec.get(cat, {}).items():
                assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, (node_id, name)
                typ, opts = entry[0], (entry[1] if len(entry) > 1 else {})
                assert isinstance(opts, dict), (node_id, name)
                assert isinstance(typ, (str, list)), (node_id, name)
                if typ in ("INT", "FLOAT"):
                    assert {"default", "min", "max"} <= set(opts), (node_id, name)
                    assert opts["min"] <= opts["default"] <= opts["max"], (node_id, name, opts)
                    if typ == "INT":
                        assert all(isinstance(opts[k], int) for k in ("default", "min", "max")), (node_id, name)
                elif typ == "BOOLEAN":
                    assert isinstance(opts.get("default"), bool), (node_id, name)
                elif typ == "STRING":
                    assert isinstance(opts.get("default"), str), (node_id, name)
                elif isinstance(typ, list) and "default" in opts:
                    assert opts["default"] in typ, (node_id, name)
        for name, kind in spec.get("hidden", {}).items():
            assert kind in ("PROMPT", "EXTRA_PNGINFO", "UNIQUE_ID", "DYNPROMPT"), (node_id, name)
        assert cls.CATEGORY.startswith("CSD 3D"), node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES), node_id
        for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
            if hasattr(cls, attr):
                assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES), (node_id, attr)
        assert node_id in pack.NODE_DISPLAY_NAME_MAPPINGS, node_id
        if node_id in MY_NODES:
            assert cls.DESCRIPTION and all("tooltip" in (e[1] if len(e) > 1 else {})
                                           for e in spec["required"].values()), node_id
        d = defaults(cls)
        if hasattr(cls, "VALIDATE_INPUTS"):  # the defaults pass the node's own validation
            import inspect

            args = inspect.getfullargspec(cls.VALIDATE_INPUTS).args
            assert cls.VALIDATE_INPUTS(**{k: v for k, v in d.items() if k in args}) is True, node_id
        if hasattr(cls, "IS_CHANGED"):
            hash(cls.IS_CHANGED(**d))


def test_widget_defaults_come_from_the_engine_configs(pack):
    from csd_backend.config import CameraConfig, OptimConfig, SceneConfig

    m = pack.NODE_CLASS_MAPPINGS
    cam, opt, scene = defaults(m["CSDCameras"]), defaults(m["CSDOptimize"]), defaults(m["CSDScene"])
    c = CameraConfig()
    assert (cam["width"], cam["height"], cam["batch_size"]) == (c.width, c.height, c.batch_size)
    assert [cam["elevation_min"], cam["elevation_max"]] == c.elevation_range
    assert [cam["fovy_min"], cam["fovy_max"]] == c.fovy_range
    o = OptimConfig()
    assert (opt["steps"], opt["lr"], opt["seed"], opt["checkpoint_every"]) == (o.steps, o.lr, o.seed, o.checkpoint_every)
    s = SceneConfig()
    assert (scene["radius"], scene["n_levels"], scene["log2_hashmap_size"]) == (s.radius, s.n_levels, s.log2_hashmap_size)
    seed = m["CSDOptimize"].INPUT_TYPES()["required"]["seed"][1]
    assert seed["control_after_generate"] is False  # a long run must not re-run with a new seed on every queue


@pytest.mark.parametrize("preset,steps", [("csd-coarse", 10000), ("preview-cpu", 150), ("csd-coarse", 1000)])
def test_guidance_defaults_reproduce_the_presets(pack, part, preset, steps):
    """The Guidance node's defaults are the spec's stage 1 (and the preset's t range): merged into the preset as
    Optimize does, with the preset's run length they give exactly the preset's schedules, and a shorter run keeps
    the same phases (as RunConfig.with_steps)."""
    from csd_backend.presets import get_preset

    node = pack.NODE_CLASS_MAPPINGS["CSDGuidance"]()
    (spec,) = node.build(**defaults(type(node)))
    want = get_preset(preset).with_steps(steps).guidance
    got = get_preset(preset).with_steps(steps).replace(guidance=spec.overrides(steps)).guidance
    from csd_backend.schedules import schedule_value

    for name in ("mode", "guidance_weight", "weighting", "grad_normalize", "min_step_percent", "negative_prompt",
                 "view_dependent", "cfg_scale"):
        assert getattr(got, name) == getattr(want, name), (name, getattr(got, name), getattr(want, name))
    for name in ("negative_weight", "max_step_percent"):
        g, w = getattr(got, name), getattr(want, name)
        if steps == get_preset(preset).optim.steps:
            assert g == w, (name, g, w)
        else:  # stretched: the same phases; a step change may land one step apart after rounding
            differ = [s for s in range(steps) if abs(schedule_value(g, s) - schedule_value(w, s)) > 1e-9]
            assert len(differ) <= 1, (name, g, w, differ)


@pytest.mark.parametrize("steps", [25000, 2500])
def test_cameras_later_size_reproduces_the_prolificdreamer_milestone(pack, part, steps):
    """CSD Cameras' later_width/later_height/later_from as the VSD template sets them give the
    preset's 64² → 512² switch at step 5000 of 25000, stretched with the run like the preset's own."""
    from csd_backend.presets import get_preset

    node = pack.NODE_CLASS_MAPPINGS["CSDCameras"]()
    values = {**defaults(type(node)), "later_width": 512, "later_height": 512, "later_from": 0.2}
    (cams,) = node.build(**values)
    got = part("specs").camera_overrides(cams, steps)
    want = get_preset("vsd-prolificdreamer").with_steps(steps).camera
    assert (got["height"], got["width"], got["resolution_milestones"]) == (
        want.height, want.width, want.resolution_milestones)
    (plain,) = node.build(**defaults(type(node)))  # later sizes 0: one phase, whatever the preset had
    assert plain.resolution_milestones == [] and plain.sizes() == [(4, 64, 64)]
    api = cs.load_api(cs.TEMPLATES["vsd"])
    cam_inputs = next(v["inputs"] for v in api.values() if v["class_type"] == "CSDCameras")
    assert (cam_inputs["later_width"], cam_inputs["later_height"], cam_inputs["later_from"]) == (512, 512, 0.2)


def test_small_nodes_return_their_types(env, pack):
    m = pack.NODE_CLASS_MAPPINGS
    for node_id, kwargs in [("CSDGuidance", defaults(m["CSDGuidance"])), ("CSDCameras", defaults(m["CSDCameras"])),
                            ("CSDScene", {**defaults(m["CSDScene"]), **SMALL_SCENE})]:
        cls = m[node_id]
        cs.check_return(node_id, cls, getattr(cls(), cls.FUNCTION)(**kwargs))
    (scene,) = m["CSDScene"]().make(**{**defaults(m["CSDScene"]), **SMALL_SCENE})
    (again,) = m["CSDScene"]().make(**{**defaults(m["CSDScene"]), **SMALL_SCENE})
    assert all((a == b).all() for a, b in zip(scene.state_dict().values(), again.state_dict().values()))
    assert scene.cfg.n_levels == 4 and scene.cfg.per_level_scale is None
    (views,) = m["CSDRenderViews"]().render(scene, 3, 16, 15.0, 2.0, 60.0, "textureless", "white", 16)
    cs.check_return("CSDRenderViews", m["CSDRenderViews"], (views,))
    assert views.shape == (3, 16, 16, 3)
    assert [p[1] for p in env.progress] == [1, 2, 3]


def test_live_preview_is_enlarged_by_nearest_neighbour(env, part):
    """Training renders are 64² px: the live preview sent to the browser is enlarged by an integer factor
    (nearest neighbour, so every render pixel is a sharp block) to a viewable 256-512 px."""
    import numpy as np
    import torch

    assert [part("previews").preview_factor(s, s) for s in (16, 64, 100, 200, 256, 257, 600)] == [32, 8, 5, 2, 2, 1, 1]
    assert part("previews").preview_factor(48, 64) == 8
    render = torch.rand(64, 48, 3)
    bar = part("execution").Progress(10, node_id="7")
    bar.update(3, 10, render)
    bar.update(4, 10)
    (node, value, total, (kind, image, max_size)), (_n, _v, _t, none) = env.progress
    assert (node, value, total, kind, max_size, none) == ("7", 3, 10, "JPEG", 512, None)
    assert image.size == (384, 512)  # width × height, each pixel an 8×8 block
    small = torch.from_numpy(np.array(image)).float()[::8, ::8] / 255.0
    expected = (render * 255.0 + 0.5).floor() / 255.0
    assert torch.allclose(small, expected, atol=1e-6)
    for y in range(8):
        assert image.getpixel((5, y)) == image.getpixel((0, 0))
    big = part("previews").enlarge_nearest(part("previews").to_pil(torch.rand(300, 300, 3)))
    assert big.size == (300, 300)
    assert [part("previews").preview_render_size(s, s) for s in (16, 64, 100, 200, 600)] == [64, 256, 400, 512, 600]
    assert part("previews").preview_render_size(64, 32) == 256


# ------------------------------------------------------------------------------------------------ validation
def _text_to_3d(pack):
    api = cs.load_api(cs.TEMPLATES["text_to_3d"])
    classes = cs.node_classes(pack)
    # without nodes/mesh.py (another module) the mesh branch is left out; validation of the rest is the same
    return cs.without_missing_nodes(api, classes), classes


BAD_VALUES = [
    ("CSDOptimize", {"steps": 0}, "steps"),
    ("CSDOptimize", {"lr": 0.0}, "lr"),
    ("CSDOptimize", {"run_name": "../elsewhere"}, "run_name"),
    ("CSDOptimize", {"resume": True}, "resume"),
    ("CSDOptimize", {"preset": "no-such-preset"}, "preset"),
    ("CSDCameras", {"elevation_min": 50.0, "elevation_max": 45.0}, "elevation_min/elevation_max"),
    ("CSDCameras", {"fovy_max": 200.0}, "fovy_max"),
    ("CSDCameras", {"batch_size": 0}, "batch_size"),
    ("CSDGuidance", {"prompt": "  "}, "prompt"),
    ("CSDGuidance", {"mode": "edit", "source_prompt": ""}, "source_prompt"),
    ("CSDGuidance", {"t_min": 0.6, "t_max_start": 0.5, "t_max_end": 0.5}, "t_min"),
    ("CSDGuidance", {"t_max_start": 0.9}, "t_max_start"),
    ("CSDGuidance", {"t_max_start": 0.9, "t_max_end": 0.4}, "t_max_switch_at"),
    ("CSDGuidance", {"t_max_end": 1.5}, "t_max_end"),
    ("CSDGuidance", {"mode": "no-such-mode"}, "mode"),
    ("CSDScene", {"max_resolution": 8}, "max_resolution"),
    ("CSDScene", {"log2_hashmap_size": 40}, "log2_hashmap_size"),
    ("CSDLoadDiffusionModel", {"device": "tpu"}, "device"),
    ("CSDLoadDiffusionModel", {"model": "diffusers/missing"}, "model"),
]


@pytest.mark.parametrize("class_type,values,named", BAD_VALUES)
def test_bad_widget_values_are_rejected_before_the_run(env, pack, class_type, values, named):
    prompt, classes = _text_to_3d(pack)
    node_id = next(k for k, v in prompt.items() if v["class_type"] == class_type)
    prompt[node_id]["inputs"].update(values)
    good, errors = cs.validate_prompt(json.loads(json.dumps(prompt)), classes)
    assert good == [], "a workflow with an invalid input must not run"
    messages = [f"{e['details']} {e['message']}" for e in errors.get(node_id, [])]
    assert messages and any(named in m for m in messages), (named, messages)
    with pytest.raises(cs.PromptRejected):
        cs.execute_prompt(prompt, classes, env)
    assert not (env.output_dir / "csd3d").exists(), "nothing may run or be written"


def test_validate_inputs_accepts_linked_values(pack):
    """ComfyUI passes None for inputs that are links (converted widgets); validation must not fail on them."""
    m = pack.NODE_CLASS_MAPPINGS
    assert m["CSDGuidance"].VALIDATE_INPUTS(prompt=None, mode="edit", source_prompt=None) is True
    assert m["CSDCameras"].VALIDATE_INPUTS(elevation_min=None, elevation_max=10.0) is True
    assert m["CSDOptimize"].VALIDATE_INPUTS(run_name=None, resume=True) is True
    assert m["CSDScene"].VALIDATE_INPUTS(preset=None, max_resolution=None) is True


def test_render_size_error_names_the_inputs(env, pack, tiny_sd):
    """A render size the model cannot take is an error naming the widgets, raised before any step."""
    (env.models_dir / "diffusers" / "tiny-sd").symlink_to(tiny_sd["folder"], target_is_directory=True)
    prompt, classes = _text_to_3d(pack)
    prompt = cs.for_tests(prompt, classes)
    cams = next(k for k, v in prompt.items() if v["class_type"] == "CSDCameras")
    prompt[cams]["inputs"].update({"width": 40, "height": 32})
    with pytest.raises(cs.NodeExecutionError) as info:
        cs.execute_prompt(prompt, classes, env)
    assert info.value.class_type == "CSDOptimize"
    assert "width/height (CSD Cameras)" in str(info.value.exception)
    assert not any(p[0] == info.value.node_id for p in env.progress)
    assert not (env.output_dir / "csd3d" / "runs" / "corgi_00001").exists(), "no run folder for a run never started"


def test_guidance_spec_is_the_guidance_config(part):
    spec = part("specs").GuidanceSpec(mode="edit", source_prompt="a corgi", negative_weight_start=1.0,
                               negative_weight_end=1.0, t_max_start=0.5, t_max_end=0.5)
    cfg = spec.config(2000)
    assert (cfg.mode, cfg.source_prompt, cfg.negative_weight, cfg.max_step_percent) == ("edit", "a corgi", 1.0, 0.5)
    ramp = dataclasses.replace(spec, negative_weight_start=0.0, negative_weight_anneal_until=0.25).config(2000)
    assert ramp.negative_weight == [0, 0.0, 1.0, 500]


def test_the_t_range_is_the_presets_unless_the_widgets_set_it(part):
    """t widgets at -1 (the default) leave each preset's schedule alone: texture-cpu's 0.98, sds-gaussian's linear
    anneal (a widget cannot express it); set, they override it as before."""
    from csd_backend.errors import ConfigError
    from csd_backend.presets import get_preset

    specs = part("specs")
    default = specs.GuidanceSpec()
    assert not {"min_step_percent", "max_step_percent"} & set(default.overrides(150))
    for preset in ("texture-cpu", "sds-gaussian", "preview-cpu"):
        cfg = get_preset(preset)
        merged = cfg.replace(guidance=default.overrides(cfg.optim.steps)).guidance
        assert (merged.min_step_percent, merged.max_step_percent) == \
            (cfg.guidance.min_step_percent, cfg.guidance.max_step_percent), preset
    chosen = specs.GuidanceSpec(t_min=0.05, t_max_start=0.9, t_max_end=0.4, t_max_switch_at=0.25).overrides(200)
    assert (chosen["min_step_percent"], chosen["max_step_percent"]) == (0.05, [50, 0.9, 0.4, 51])
    assert specs.GuidanceSpec(t_max_start=0.7, t_max_end=0.7).overrides(200)["max_step_percent"] == 0.7
    assert "max_step_percent" not in specs.GuidanceSpec(t_min=0.1).overrides(200)
    for bad, named in (({"t_max_end": 0.5}, "t_max_start"),  # the one left at -1
                       ({"t_max_start": 0.9, "t_max_end": 0.5}, "t_max_switch_at")):
        with pytest.raises(ConfigError) as info:
            specs.GuidanceSpec(**bad).validate()
        assert info.value.field == named


def test_is_changed_follows_the_checkpoint_on_disk(env, pack):
    """With resume on, the checkpoint is an input: ComfyUI must re-run Optimize when it changed."""
    m = pack.NODE_CLASS_MAPPINGS
    assert m["CSDOptimize"].IS_CHANGED(resume=False, run_name="x") == ""
    ckpt = env.output_dir / "csd3d" / "runs" / "x_00003" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"1")
    first = m["CSDOptimize"].IS_CHANGED(resume=True, run_name="x")
    assert "x_00003" in first
    ckpt.write_bytes(b"22")
    assert m["CSDOptimize"].IS_CHANGED(resume=True, run_name="x") != first
    assert m["CSDOptimize"].VALIDATE_INPUTS(run_name="x", resume=True) is True
    assert m["CSDScene"].IS_CHANGED(source="x_00003") != m["CSDScene"].IS_CHANGED(source="(new scene)")
    assert m["CSDScene"].INPUT_TYPES()["required"]["source"][0] == ["(new scene)", "x_00003"]



def test_refine_errors_name_presets_and_nodes_not_command_line_flags(env, pack):
    """Refine Mesh on a scene without a surface at the preset's density level: the error is in the node user's
    words (the node, the preset), never a command-line flag."""
    m = pack.NODE_CLASS_MAPPINGS
    (scene,) = m["CSDScene"]().make(**{**defaults(m["CSDScene"]), **SMALL_SCENE})
    setattr(scene, "_csd_untrained", False)
    with torch.no_grad():
        for p in scene.volume.density_mlp.parameters():
            p.zero_()
    (guidance,) = m["CSDGuidance"]().build(**{**defaults(m["CSDGuidance"]), "prompt": "a red ball"})
    from csd_backend.priors.analytic import AnalyticPrior

    node = m["CSDRefineMesh"]()
    with pytest.raises(Exception) as info:
        node.optimize(AnalyticPrior(16), guidance, scene, "csd-refine-object", 2, 0.01, 0, 1, 1, "r", False)
    text = str(info.value)
    assert "no surface at the density level 10" in text and "CSD Refine Mesh" in text and "preset" in text
    assert "--" not in text, text


def test_a_run_folder_in_use_is_not_resumed_by_the_node(env, pack):
    """Optimize's resume refuses a run folder that another process writes (its run.lock), naming that process."""
    import json as _json
    import socket

    m = pack.NODE_CLASS_MAPPINGS
    folder = env.output_dir / "csd3d" / "runs" / "busy_00001"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"not read")
    (folder / "run.lock").write_text(_json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": 0,
                                                 "command": "generate --resume"}))
    (guidance,) = m["CSDGuidance"]().build(**{**defaults(m["CSDGuidance"]), "prompt": "a red ball"})
    from csd_backend.priors.analytic import AnalyticPrior

    with pytest.raises(Exception, match=f"in use by PID {os.getppid()}"):
        m["CSDOptimize"]().optimize(AnalyticPrior(16), guidance, None, "preview-cpu", 2, 0.01, 0, 1, 1, "busy", True)
    assert (folder / "checkpoints" / "last.ckpt").read_bytes() == b"not read"


def test_load_mesh_from_a_file_or_a_comfy_mesh_and_refusals(env, pack):
    import numpy as np
    import trimesh

    m = pack.NODE_CLASS_MAPPINGS
    load = m["CSDLoadMesh"]
    choices = load.INPUT_TYPES()["required"]["mesh_file"][0]
    assert "example/csd_vase.obj" in choices
    (scene,) = load().load("example/csd_vase.obj", "y")
    cs.check_return("CSDLoadMesh", load, (scene,))
    assert scene.kind == "mesh" and scene.geometry.faces.shape[0] == 2496
    # a file uploaded to input/3d (where Load 3D puts it)
    up = env.input_dir / "3d" / "sub"
    up.mkdir(parents=True)
    box = trimesh.creation.box()
    box.export(up / "box.stl")
    assert "sub/box.stl" in load.INPUT_TYPES()["required"]["mesh_file"][0]
    assert load.VALIDATE_INPUTS("sub/box.stl") is True
    (scene,) = load().load("sub/box.stl", "z")
    assert scene.geometry.faces.shape[0] == 12 and not bool(scene.geometry.source_y_up)
    # ComfyUI's MESH (batched) wins over the file
    mesh = types.SimpleNamespace(vertices=torch.from_numpy(np.asarray(box.vertices, np.float32))[None],
                                 faces=torch.from_numpy(np.asarray(box.faces, np.int64))[None])
    (scene,) = load().load(NO_FILE := load.INPUT_TYPES()["required"]["mesh_file"][1]["default"], "y",
                           mesh=mesh)
    assert scene.geometry.faces.shape[0] == 12
    assert "outside" in load.VALIDATE_INPUTS("../../etc/passwd.obj")
    assert "not in" in load.VALIDATE_INPUTS("missing.glb")
    with pytest.raises(Exception, match="mesh_file: choose a file"):
        load().load(NO_FILE, "y")


def test_refine_and_texture_refuse_the_wrong_scene(env, pack):
    m = pack.NODE_CLASS_MAPPINGS
    (new,) = m["CSDScene"]().make(**{**defaults(m["CSDScene"]), **SMALL_SCENE})
    with pytest.raises(Exception, match="new .untrained.*CSD Optimize first"):
        m["CSDRefineMesh"].start_scene(new, "refine-cpu")
    setattr(new, "_csd_untrained", False)
    with pytest.raises(Exception, match="connect CSD Load Mesh"):
        m["CSDTextureMesh"].start_scene(new, "texture-cpu")
    presets = {n: m[n].INPUT_TYPES()["required"]["preset"][0] for n in ("CSDOptimize", "CSDRefineMesh",
                                                                         "CSDTextureMesh")}
    assert "csd-coarse" in presets["CSDOptimize"] and "csd-refine" not in presets["CSDOptimize"]
    assert presets["CSDRefineMesh"] == ["csd-refine", "csd-refine-object", "refine-cpu", "sds-refine"]
    assert presets["CSDTextureMesh"] == ["csd-texture", "texture-cpu"]
    assert "cameras" in m["CSDRefineMesh"].INPUT_TYPES()["optional"]


def test_depth_controlnet_node_returns_a_conditioned_copy(env, pack, part, tiny_sd, tiny_controlnet):
    from csd_backend.config import PriorConfig
    from csd_backend.priors import load_prior

    part("model_folders").register_model_folders()  # as at start-up: models/controlnet joins ComfyUI's controlnet paths
    m = pack.NODE_CLASS_MAPPINGS
    node = m["CSDDepthControlNet"]
    assert node.INPUT_TYPES()["required"]["controlnet"][0] == []  # nothing installed yet
    (env.models_dir / "controlnet").mkdir(parents=True, exist_ok=True)
    (env.models_dir / "controlnet" / "depth-tiny").symlink_to(tiny_controlnet, target_is_directory=True)
    assert node.INPUT_TYPES()["required"]["controlnet"][0] == ["depth-tiny"]
    prior = load_prior(PriorConfig(model=str(tiny_sd["folder"]), device="cpu"))
    (conditioned,) = node().attach(prior, "depth-tiny", 0.7)
    cs.check_return("CSDDepthControlNet", node, (conditioned,))
    assert prior.controlnet is None and conditioned.controlnet is not None and conditioned.unet is prior.unet
    assert conditioned.controlnet_scale == 0.7
    run = m["CSDOptimize"].run_config(conditioned, m["CSDGuidance"]().build(**defaults(m["CSDGuidance"]))[0],
                                      m["CSDScene"]().make(**{**defaults(m["CSDScene"]), **SMALL_SCENE})[0], None,
                                      "preview-cpu", 2, 0.01, 0, 0, 0)
    assert run.prior.controlnet.endswith("depth-tiny") and run.prior.controlnet_scale == 0.7
    with pytest.raises(Exception, match="not a diffusers ControlNet folder"):
        node().attach(prior, "missing", 1.0)


def test_load_model_with_a_vsd_lora_base_model(env, pack, tiny_sd, tiny_sd_v):
    """The optional vsd_lora_base_model loads a second model with the first (prior.lora_base_model), CSD Optimize
    records it in the run's configuration, and a mode other than vsd is told which widget to change."""
    (env.models_dir / "diffusers" / "tiny-sd").symlink_to(tiny_sd["folder"], target_is_directory=True)
    (env.models_dir / "diffusers" / "tiny-sd-v").symlink_to(tiny_sd_v["folder"], target_is_directory=True)
    m = pack.NODE_CLASS_MAPPINGS
    node = m["CSDLoadDiffusionModel"]
    choices, opts = node.INPUT_TYPES()["optional"]["vsd_lora_base_model"]
    assert choices[0] == "(none)" == opts["default"] and "diffusers/tiny-sd-v" in choices
    (plain,) = node().load("diffusers/tiny-sd", "cpu", "auto", 32, "(auto)")  # as saved workflows call it
    assert plain.lora_prior is None
    (prior,) = node().load("diffusers/tiny-sd", "cpu", "auto", 32, "(auto)", vsd_lora_base_model="diffusers/tiny-sd-v")
    cs.check_return("CSDLoadDiffusionModel", node, (prior,))
    assert prior.lora_prior.prediction_type == "v_prediction" and prior.lora_prior.source.endswith("tiny-sd-v")
    scene = m["CSDScene"]().make(**{**defaults(m["CSDScene"]), **SMALL_SCENE})[0]
    (vsd,) = m["CSDGuidance"]().build(**{**defaults(m["CSDGuidance"]), "mode": "vsd", "cfg_scale": 7.5})
    run = m["CSDOptimize"].run_config(prior, vsd, scene, None, "vsd-preview-cpu", 2, 0.01, 0, 0, 0)
    assert run.prior.lora_base_model.endswith("tiny-sd-v")
    (csd,) = m["CSDGuidance"]().build(**defaults(m["CSDGuidance"]))
    with pytest.raises(Exception, match="vsd_lora_base_model.*only VSD"):
        m["CSDOptimize"].run_config(prior, csd, scene, None, "preview-cpu", 2, 0.01, 0, 0, 0)
    with pytest.raises(Exception, match="vsd_lora_base_model.*not found"):
        node().load("diffusers/tiny-sd", "cpu", "auto", 32, "(auto)", vsd_lora_base_model="diffusers/gone")


def test_perp_neg_option_follows_the_preset_unless_set(env, pack, part):
    m = pack.NODE_CLASS_MAPPINGS
    assert m["CSDGuidance"].INPUT_TYPES()["optional"]["perp_neg"][0] == ["preset", "on", "off"]
    scene = m["CSDScene"]().make(**{**defaults(m["CSDScene"]), **SMALL_SCENE})[0]
    prior = types.SimpleNamespace(source="analytic:16", resolution=None)

    def run(perp_neg, preset):
        (spec,) = m["CSDGuidance"]().build(**{**defaults(m["CSDGuidance"]), "perp_neg": perp_neg})
        return m["CSDOptimize"].run_config(prior, spec, scene, None, preset, 10, 0.01, 0, 0, 0).guidance.perp_neg

    assert run("preset", "csd-coarse-character") is True and run("preset", "csd-coarse") is False
    assert run("off", "csd-coarse-character") is False and run("on", "csd-coarse") is True


def test_requeueing_a_finished_resume_rewrites_nothing(env, pack):
    """Optimize with resume on a run that has nothing left to train: the checkpoint is not rewritten, so ComfyUI's
    IS_CHANGED stays the same and the graph after it (Extract, Save Mesh) is not run again (no second GLB)."""
    from csd_backend.priors.analytic import AnalyticPrior

    m = pack.NODE_CLASS_MAPPINGS
    (scene,) = m["CSDScene"]().make(**{**defaults(m["CSDScene"]), **SMALL_SCENE})
    (guidance,) = m["CSDGuidance"]().build(**{**defaults(m["CSDGuidance"]), "prompt": "a red ball"})
    (cams,) = m["CSDCameras"]().build(**{**defaults(m["CSDCameras"]), "width": 16, "height": 16})
    prior = AnalyticPrior(16)
    node = m["CSDOptimize"]()
    node.optimize(prior, guidance, scene, "preview-cpu", 2, 0.01, 0, 1, 1, "again", False, cams)
    ckpt = env.output_dir / "csd3d" / "runs" / "again_00001" / "checkpoints" / "last.ckpt"
    signature = m["CSDOptimize"].IS_CHANGED(resume=True, run_name="again")
    data = ckpt.read_bytes()
    for _ in range(2):
        node.optimize(prior, guidance, scene, "preview-cpu", 2, 0.01, 0, 1, 1, "again", True, cams)
        assert m["CSDOptimize"].IS_CHANGED(resume=True, run_name="again") == signature
        assert ckpt.read_bytes() == data
    node.optimize(prior, guidance, scene, "preview-cpu", 3, 0.01, 0, 1, 1, "again", True, cams)  # one more step
    assert m["CSDOptimize"].IS_CHANGED(resume=True, run_name="again") != signature
