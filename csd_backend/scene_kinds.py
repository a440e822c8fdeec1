"""Scene kinds (``scene.kind``) as data: the module of each kind's scene, of its renderer, and of the conversions
that start a scene of that kind from a scene of another kind.

The optimisation loop, checkpoints, previews, exports and nodes build scenes and renderers only through
``make_scene`` / ``make_renderer`` / ``starting_scene``, so a new kind is one row here. The rows name their
classes and functions as "module:name" strings, resolved on use: this table imports none of them, so the
representations (``scene/``), the renderers (``render/``) and the conversions (``convert/``) may all use it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Dict, Optional

from .config import RenderConfig, SceneConfig


@dataclass(frozen=True)
class SceneKind:
    scene: str  # "module:class" of the representation, built as ``cls(cfg, device)``
    renderer: str  # "module:class" of its renderer, built as ``cls(render_cfg, radius, device=device)``
    #: kind of a scene → "module:function" turning such a scene into this kind, called as
    #: ``fn(scene, cfg, seed, progress=None)`` (``seed``: the run's, for whatever the conversion initialises afresh;
    #: ``progress(fraction)`` for a conversion that takes a while)
    starts_from: Dict[str, str] = field(default_factory=dict)
    #: a ``SceneConfig`` field whose value the renderer also gets, as ``settings=`` (None: none)
    renderer_settings: Optional[str] = None


KINDS: Dict[str, SceneKind] = {
    "volume": SceneKind("csd_backend.scene.volume:Scene", "csd_backend.render.volume_renderer:VolumeRenderer"),
    "dmtet": SceneKind("csd_backend.scene.mesh_scene:MeshScene", "csd_backend.render.mesh_renderer:MeshRenderer",
                       starts_from={"volume": "csd_backend.convert.volume_to_dmtet:convert",
                                    "gaussians": "csd_backend.convert.volume_to_dmtet:convert"}),
    "mesh": SceneKind("csd_backend.scene.mesh_scene:MeshScene", "csd_backend.render.mesh_renderer:MeshRenderer"),
    "gaussians": SceneKind("csd_backend.scene.gaussians:GaussianScene",
                           "csd_backend.render.gaussian_renderer:GaussianRenderer",
                           starts_from={"volume": "csd_backend.convert.to_gaussians:from_volume",
                                        "dmtet": "csd_backend.convert.to_gaussians:from_mesh",
                                        "mesh": "csd_backend.convert.to_gaussians:from_mesh"},
                           renderer_settings="gaussians"),
}


def resolve(ref: str):
    """The class or function a "module:name" entry of the table names."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def make_scene(cfg: SceneConfig, device=None):
    """An untrained scene of ``cfg.kind`` (a fixed mesh is empty until its mesh is set or loaded)."""
    return resolve(KINDS[cfg.kind].scene)(cfg, device)


def make_renderer(render_cfg: RenderConfig, scene_cfg: SceneConfig, device=None):
    """The renderer of ``scene_cfg.kind`` on ``device``."""
    row = KINDS[scene_cfg.kind]
    extra = {"settings": getattr(scene_cfg, row.renderer_settings)} if row.renderer_settings else {}
    renderer = resolve(row.renderer)(render_cfg, scene_cfg.radius, device=device, **extra)
    return renderer.to(device) if device is not None else renderer


def converts(scene, cfg: SceneConfig) -> bool:
    """Whether a run with scene settings ``cfg`` converts ``scene`` first (``starting_scene``)."""
    return scene.kind in KINDS[cfg.kind].starts_from


def starting_scene(scene, cfg: SceneConfig, seed: int = 0, progress=None):
    """The scene a run starts from (``--init-scene``, the nodes' init scene): converted to ``cfg.kind`` (the preset's
    scene settings) when that kind starts from ``scene``'s kind (a stage-1 volume becomes a DMTet grid for stage 2,
    with a fresh background from the run's ``seed`` unless ``cfg.keep_background``); any other scene is used as it
    is, with its own settings (editing a volume, a refined mesh or a textured mesh). ``progress(fraction)`` follows
    a conversion."""
    converter = KINDS[cfg.kind].starts_from.get(scene.kind)
    return scene if converter is None else resolve(converter)(scene, cfg, seed, progress=progress)


def scene_device(scene) -> Optional[object]:
    for t in list(scene.parameters()) + list(scene.buffers()):
        return t.device
    return None
