"""Scene kinds (``scene.kind``) as data: which module holds the scene and which renderer draws it.

The optimisation loop, checkpoints, previews, exports and nodes build scenes and renderers only through
``make_scene`` / ``make_renderer``, so a new kind is one row here.
"""
from __future__ import annotations

import importlib
from typing import Optional

from .config import RenderConfig, SceneConfig

#: kind → (scene class, renderer class), as "module:name" so that importing this table is cheap
KINDS = {
    "volume": ("csd_backend.scene.volume:Scene", "csd_backend.render.volume_renderer:VolumeRenderer"),
    "dmtet": ("csd_backend.scene.mesh_scene:MeshScene", "csd_backend.render.mesh_renderer:MeshRenderer"),
    "mesh": ("csd_backend.scene.mesh_scene:MeshScene", "csd_backend.render.mesh_renderer:MeshRenderer"),
}


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def make_scene(cfg: SceneConfig, device=None):
    """An untrained scene of ``cfg.kind`` (a fixed mesh is empty until its mesh is set or loaded)."""
    return _load(KINDS[cfg.kind][0])(cfg, device)


def make_renderer(render_cfg: RenderConfig, scene_cfg: SceneConfig, device=None):
    """The renderer of ``scene_cfg.kind`` on ``device``."""
    renderer = _load(KINDS[scene_cfg.kind][1])(render_cfg, scene_cfg.radius, device=device)
    return renderer.to(device) if device is not None else renderer


def starting_scene(scene, cfg: SceneConfig):
    """The scene a run starts from (``--init-scene``, the nodes' init scene): a stage-1 volume is converted to a
    DMTet grid when ``cfg`` (the preset's scene settings) asks for a dmtet scene (stage 2); any other scene is used
    as it is, with its own settings (editing a volume, a refined mesh or a textured mesh)."""
    if cfg.kind == "dmtet" and scene.kind == "volume":
        from .scene.dmtet import volume_to_dmtet

        return volume_to_dmtet(scene, cfg.tet_resolution, cfg.isosurface_threshold, cfg.fix_geometry)
    return scene


def scene_device(scene) -> Optional[object]:
    for t in list(scene.parameters()) + list(scene.buffers()):
        return t.device
    return None
