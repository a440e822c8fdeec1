"""CSD Extract Mesh and CSD Save Mesh (nodes/mesh.py) with ComfyUI's ``folder_paths`` (and, where a test needs
them, ``comfy.*`` / ``comfy_api``) replaced by tiny fake modules, restored afterwards by monkeypatch."""
from __future__ import annotations

import importlib.util
import json
import math
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from test_export import AnalyticScene

ROOT = Path(__file__).resolve().parents[1]


#: nodes/mesh.py and its helper modules are imported fresh under this package name (without the pack's other nodes)
PACKAGE = "csd_mesh_nodes_under_test"


def load_nodes():
    """nodes/mesh.py with its helpers, imported afresh as a module of a ``nodes`` package of its own (the rest of
    the pack is not loaded)."""
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(ROOT / "nodes")]
    sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.mesh")


@pytest.fixture
def nodes():
    return load_nodes()


@pytest.fixture
def output_dir(tmp_path, monkeypatch):
    out = tmp_path / "output"
    out.mkdir()
    fake = types.ModuleType("folder_paths")
    fake.get_output_directory = lambda: str(out)
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    return out


@pytest.fixture(scope="module")
def extracted():
    """One extraction through the node, shared by the save tests: (MESH, textured mesh)."""
    return load_nodes().CSDExtractMesh().extract(AnalyticScene(kind="sphere"), resolution=64, threshold=10.0,
                                                 texture_size=128, face_budget=3000)


def core_save_glb(mesh, path: Path) -> None:
    """What ComfyUI's core SaveGLB does with a MESH: for each batch item, ``vertices[i]`` as float32 positions and
    ``faces[i]`` as uint32 indices in a minimal glTF 2.0 binary (no normals, UVs or materials)."""
    for i in range(mesh.vertices.shape[0]):
        v = mesh.vertices[i].cpu().numpy().astype(np.float32)
        f = mesh.faces[i].cpu().numpy().astype(np.uint32)
        blob = v.tobytes() + f.tobytes()
        gltf = {"asset": {"version": "2.0"}, "buffers": [{"byteLength": len(blob)}],
                "bufferViews": [{"buffer": 0, "byteOffset": 0, "byteLength": v.nbytes, "target": 34962},
                                {"buffer": 0, "byteOffset": v.nbytes, "byteLength": f.nbytes, "target": 34963}],
                "accessors": [{"bufferView": 0, "componentType": 5126, "count": len(v), "type": "VEC3",
                               "min": v.min(0).tolist(), "max": v.max(0).tolist()},
                              {"bufferView": 1, "componentType": 5125, "count": f.size, "type": "SCALAR"}],
                "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1, "mode": 4}]}],
                "nodes": [{"mesh": 0}], "scenes": [{"nodes": [0]}], "scene": 0}
        js = json.dumps(gltf).encode()
        js += b" " * (-len(js) % 4)
        data = struct.pack("<4sII", b"glTF", 2, 28 + len(js) + len(blob)) + struct.pack("<II", len(js), 0x4E4F534A)
        path.write_bytes(data + js + struct.pack("<II", len(blob), 0x004E4942) + blob)


# --------------------------------------------------------------------------------------------- contracts
def test_importing_the_node_module_is_cheap():
    """No torch, no mesh library and nothing of the engine but its error types until a node runs."""
    code = ("import importlib, sys, types; p = types.ModuleType('pk'); p.__path__ = [sys.argv[1]]; "
            "sys.modules['pk'] = p; m = importlib.import_module('pk.mesh'); "
            "heavy = [n for n in ('torch', 'trimesh', 'xatlas', 'skimage', 'numpy') if n in sys.modules]; "
            "engine = sorted(n for n in sys.modules if n.startswith('csd_backend.') and n != 'csd_backend.errors'); "
            "print(sorted(m.NODE_CLASS_MAPPINGS), heavy, engine)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "nodes")], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "['CSDExtractMesh', 'CSDSaveMesh'] [] []"


def test_node_contracts(nodes):
    ext, save = nodes.NODE_CLASS_MAPPINGS["CSDExtractMesh"], nodes.NODE_CLASS_MAPPINGS["CSDSaveMesh"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS == {"CSDExtractMesh": "CSD Extract Mesh", "CSDSaveMesh": "CSD Save Mesh"}
    req = ext.INPUT_TYPES()["required"]
    assert list(req) == ["scene", "resolution", "threshold", "texture_size", "face_budget"]
    assert req["scene"][0] == "CSD_SCENE"
    expect = {"resolution": ("INT", 256, 32, 512, 32), "threshold": ("FLOAT", 0.0, 0.0, 1000.0, None),
              "texture_size": ("INT", 1024, 128, 4096, 128), "face_budget": ("INT", 100000, 0, 2000000, None)}
    for name, (typ, default, lo, hi, step) in expect.items():
        t, opts = req[name]
        assert (t, opts["default"], opts["min"], opts["max"]) == (typ, default, lo, hi), name
        if step is not None:
            assert opts["step"] == step, name
        assert lo <= opts["default"] <= hi
    assert (ext.RETURN_TYPES, ext.RETURN_NAMES) == (("MESH", "CSD_TEXTURED_MESH"), ("mesh", "textured_mesh"))
    assert ext.CATEGORY == save.CATEGORY == "CSD 3D" and hasattr(ext, ext.FUNCTION) and hasattr(save, save.FUNCTION)
    sreq = save.INPUT_TYPES()["required"]
    assert list(sreq) == ["textured_mesh", "format", "filename_prefix"]
    assert sreq["textured_mesh"][0] == "CSD_TEXTURED_MESH" and sreq["format"][0] == ["glb", "obj", "ply"]
    assert sreq["filename_prefix"] == ("STRING", sreq["filename_prefix"][1])
    assert sreq["filename_prefix"][1]["default"] == "csd3d/mesh"
    assert save.OUTPUT_NODE is True and (save.RETURN_TYPES, save.RETURN_NAMES) == (("STRING",), ("model_file",))


# ---------------------------------------------------------------------------------------------- extract
def test_mesh_output_works_with_a_core_saveglb_style_consumer(extracted, tmp_path):
    mesh, textured = extracted
    assert mesh.vertices.shape == (1, textured.num_vertices, 3) and mesh.vertices.dtype == torch.float32
    assert mesh.faces.shape == (1, textured.num_faces, 3) and mesh.faces.dtype == torch.int64
    core_save_glb(mesh, tmp_path / "core.glb")
    loaded = trimesh.load(tmp_path / "core.glb", force="mesh", process=False)
    assert len(loaded.faces) == textured.num_faces and loaded.is_watertight and loaded.volume > 0
    assert abs(loaded.volume / (4 / 3 * math.pi * 0.4 ** 3) - 1) < 0.03
    assert textured.texture.shape == (128, 128, 3) and textured.threshold == 10.0


def test_extract_uses_comfyuis_mesh_class_when_available(nodes, monkeypatch):
    class MESH:  # comfy_api.latest._util.MESH in newer ComfyUI
        def __init__(self, vertices, faces):
            self.vertices, self.faces = vertices, faces

    for name in ("comfy_api", "comfy_api.latest"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    util = types.ModuleType("comfy_api.latest._util")
    util.MESH = MESH
    monkeypatch.setitem(sys.modules, "comfy_api.latest._util", util)
    assert nodes.mesh_class() is MESH
    mesh, _ = nodes.CSDExtractMesh().extract(AnalyticScene(kind="sphere"), 32, 10.0, 128, 1000)
    assert isinstance(mesh, MESH) and mesh.vertices.shape[0] == 1


def test_extract_falls_back_to_a_local_mesh_class(nodes, monkeypatch):
    for name in ("comfy_api.latest._util", "comfy_extras.nodes_hunyuan3d"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    assert nodes.mesh_class() is nodes.Mesh


def test_threshold_zero_means_automatic_and_the_scene_is_not_changed(nodes):
    from engine_helpers import small_config

    from csd_backend.scene.volume import Scene

    scene = Scene(small_config().scene).eval()
    before = {k: v.clone() for k, v in scene.state_dict().items()}
    _mesh, textured = nodes.CSDExtractMesh().extract(scene, 32, 0.0, 128, 2000)
    assert textured.info["config"]["threshold"] == "auto" and textured.threshold > 0
    assert not scene.training and all(torch.equal(before[k], v) for k, v in scene.state_dict().items())


def test_no_surface_is_a_clear_error(nodes):
    from csd_backend.errors import CSDError

    with pytest.raises(CSDError, match=r"no surface at threshold 1000: density range is \[.*\].*lower the threshold"):
        nodes.CSDExtractMesh().extract(AnalyticScene(kind="sphere"), 32, 1000.0, 128, 1000)


def test_extract_reports_progress_and_stops_on_cancel(nodes, monkeypatch):
    updates = []

    class Interrupted(Exception):
        pass

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    mm = types.ModuleType("comfy.model_management")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            updates.append((value, total))

    state = {"cancel": False}

    def throw_exception_if_processing_interrupted():
        if state["cancel"]:
            raise Interrupted()

    utils.ProgressBar = ProgressBar
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    comfy.utils, comfy.model_management = utils, mm
    for name, mod in (("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", mm)):
        monkeypatch.setitem(sys.modules, name, mod)
    nodes.CSDExtractMesh().extract(AnalyticScene(kind="sphere"), 32, 10.0, 128, 1000)
    values = [v for v, _ in updates]
    assert values[-1] == 1000 and all(t == 1000 for _, t in updates) and values == sorted(values)
    assert len(updates) > 5
    state["cancel"] = True
    scene = AnalyticScene(kind="sphere")
    with pytest.raises(Interrupted):
        nodes.CSDExtractMesh().extract(scene, 64, 10.0, 128, 1000)
    assert scene.volume.calls <= 1, "the extraction went on after Cancel"


# ------------------------------------------------------------------------------------------------- save
def test_save_glb_for_preview3d_and_never_overwrite(nodes, output_dir, extracted):
    textured = extracted[1]
    out = nodes.CSDSaveMesh().save(textured, "glb", "csd3d/mesh")
    assert out["result"] == ("csd3d/mesh_00001_.glb",)
    assert out["ui"] == {"3d": [{"filename": "mesh_00001_.glb", "subfolder": "csd3d", "type": "output"}]}
    # Preview3D loads /view?type=output&subfolder=<dirname>&filename=<basename> of the relative path
    path = output_dir / out["result"][0]
    first = path.read_bytes()
    geom = trimesh.load(path, force="mesh", process=False)
    assert geom.visual.uv is not None and len(geom.faces) == textured.num_faces
    again = nodes.CSDSaveMesh().save(textured, "glb", "csd3d/mesh")
    assert again["result"] == ("csd3d/mesh_00002_.glb",) and path.read_bytes() == first
    top = nodes.CSDSaveMesh().save(textured, "glb", "plain")
    assert top["result"] == ("plain_00001_.glb",) and top["ui"]["3d"][0]["subfolder"] == ""


def test_save_obj_and_ply(nodes, output_dir, extracted):
    textured = extracted[1]
    obj = nodes.CSDSaveMesh().save(textured, "obj", "meshes/thing")["result"][0]
    assert obj == "meshes/thing_00001_.obj"
    for suffix in (".obj", ".mtl", ".png"):
        assert (output_dir / "meshes" / f"thing_00001_{suffix}").is_file()
    ply = nodes.CSDSaveMesh().save(textured, "ply", "meshes/thing")["result"][0]
    assert ply == "meshes/thing_00002_.ply"
    loaded = trimesh.load(output_dir / ply, process=False)
    assert len(loaded.vertices) == textured.num_vertices and loaded.visual.vertex_colors.shape[0] > 0


@pytest.mark.parametrize("prefix", ["../escape", "csd3d/../../escape", "/tmp/escape", "C:\\escape", "~/escape",
                                    "", "csd3d/"])
def test_save_refuses_prefixes_that_leave_the_output_folder(nodes, output_dir, extracted, prefix):
    with pytest.raises(ValueError, match="filename_prefix"):
        nodes.CSDSaveMesh().save(extracted[1], "glb", prefix)
    assert not list(output_dir.parent.rglob("*.glb"))


def test_save_rejects_something_else_than_a_textured_mesh(nodes, output_dir, extracted):
    with pytest.raises(ValueError, match="textured_mesh"):
        nodes.CSDSaveMesh().save(extracted[0], "glb", "csd3d/mesh")  # the MESH output, wired by mistake


def test_face_budget_between_1_and_3_is_rejected_before_the_run():
    from nodes.mesh import CSDExtractMesh

    assert CSDExtractMesh.VALIDATE_INPUTS(face_budget=0) is True
    assert CSDExtractMesh.VALIDATE_INPUTS(face_budget=100000) is True
    assert CSDExtractMesh.VALIDATE_INPUTS(face_budget=None) is True
    for bad in (1, 3, -5, 2000001):
        assert "face_budget" in CSDExtractMesh.VALIDATE_INPUTS(face_budget=bad)


@pytest.mark.parametrize("prefix", ["con", "csd3d/NUL", "aux.glb", "csd3d/com1/mesh", "lpt9", "m" * 250,
                                    "csd3d/" + "d" * 256 + "/mesh", "/".join(["folder"] * 40)])
def test_save_mesh_refuses_windows_reserved_and_long_names_when_queued(nodes, output_dir, prefix):
    """VALIDATE_INPUTS names filename_prefix, so ComfyUI rejects the prompt before anything runs."""
    err = nodes.CSDSaveMesh.VALIDATE_INPUTS(filename_prefix=prefix)
    assert isinstance(err, str) and err.startswith("filename_prefix: "), err
    assert not any(output_dir.iterdir()), "validation creates nothing"


def test_save_mesh_validation_accepts_good_and_linked_prefixes(nodes, output_dir):
    for ok in ("csd3d/mesh", "console", "csd3d/com10/mesh", None):
        assert nodes.CSDSaveMesh.VALIDATE_INPUTS(filename_prefix=ok) is True, ok
    assert nodes.CSDSaveMesh.VALIDATE_INPUTS(filename_prefix="../up").startswith("filename_prefix: ")


def test_a_reserved_prefix_rejects_the_whole_workflow_before_it_runs(tmp_path, monkeypatch):
    """Through the stub ComfyUI graph runner: Save Mesh with filename_prefix 'csd3d/con' fails validation, so
    neither Optimize nor Extract Mesh runs."""
    import comfy_stubs as cs

    env = cs.install(monkeypatch, tmp_path)
    classes = cs.node_classes(cs.load_pack())
    api = cs.load_api(cs.TEMPLATES["text_to_3d"])
    save = next(k for k, v in api.items() if v["class_type"] == "CSDSaveMesh")
    api[save]["inputs"]["filename_prefix"] = "csd3d/con"
    good, errors = cs.validate_prompt(api, classes)
    messages = json.dumps(errors.get(save, []))
    assert save in errors and "filename_prefix" in messages and "Windows reserves" in messages, errors
    with pytest.raises(cs.PromptRejected):
        cs.execute_prompt(api, classes, env)
    assert not (env.output_dir / "csd3d").exists()
