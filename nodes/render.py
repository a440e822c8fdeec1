"""CSD Render Views: a ring of views around a scene as an IMAGE batch (for ComfyUI's image and video savers)."""
from __future__ import annotations

import inspect

from csd_backend.config import RenderConfig

from . import pack
from .execution import Progress, autograd_allowed, check_interrupt
from .widgets import combo_input, float_input, int_input

_SHADINGS = ["albedo", "textureless", "diffuse"]  # csd_backend.render.volume_renderer.SHADINGS (imports torch)
_BACKGROUNDS = {"scene": None, "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "grey": (0.5, 0.5, 0.5)}


def _ring_defaults() -> dict:
    from csd_backend.render.views import render_ring

    return {k: p.default for k, p in inspect.signature(render_ring).parameters.items()
            if p.default is not inspect.Parameter.empty}


class CSDRenderViews:
    DESCRIPTION = ("Renders n_views views evenly spaced around the scene (a turntable) as an IMAGE batch; connect "
                   "it to Save Image, Preview Image or a video saver.")
    CATEGORY = pack.CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("[n_views, size, size, 3] images in [0, 1].",)

    @classmethod
    def INPUT_TYPES(cls):
        d = _ring_defaults()
        return {"required": {
            "scene": (pack.SCENE, {"tooltip": "a scene from CSD Optimize or CSD 3D Scene (any kind: volume, "
                                              "Gaussian splats, mesh)"}),
            "n_views": int_input(d["n_views"], 1, 720, "number of views around the scene"),
            "size": int_input(d["size"], 8, 4096, "image width and height in pixels", step=8),
            "elevation": float_input(d["elevation"], -90.0, 90.0, 1.0, "camera elevation in degrees"),
            "distance": float_input(d["distance"], 0.01, 100.0, 0.05, "camera distance from the centre"),
            "fovy": float_input(d["fovy"], 1.0, 179.0, 1.0, "vertical field of view in degrees"),
            "shading": combo_input(_SHADINGS, d["shading"], "albedo: colours; textureless: the normal map "
                                                            "(geometry); diffuse: Lambertian shading"),
            "background": combo_input(list(_BACKGROUNDS), "scene", "scene: the learned background; or a solid "
                                                                   "colour"),
            "samples_per_ray": int_input(RenderConfig().num_samples_per_ray, 4, 8192,
                                         "samples per ray (quality vs. speed; volumes only)"),
        }}

    @autograd_allowed
    def render(self, scene, n_views, size, elevation, distance, fovy, shading, background, samples_per_ray):
        import torch

        from csd_backend.render.cameras import orbit_cameras
        from csd_backend.render.views import prepare_renderer, render_cameras

        render_cfg = RenderConfig(num_samples_per_ray=int(samples_per_ray))
        cams = orbit_cameras(int(n_views), float(elevation), float(distance), float(fovy), int(size), int(size))
        renderer = prepare_renderer(scene, render_cfg)
        bg = _BACKGROUNDS[background]
        bg = torch.tensor(bg, dtype=torch.float32) if bg is not None else None
        bar = Progress(len(cams))
        images = []
        for i in range(len(cams)):  # one view at a time: progress and Cancel between views
            check_interrupt()
            images.append(render_cameras(scene, cams[i], shading, render_cfg, renderer, background=bg))
            bar.update(i + 1, len(cams))
        return (torch.cat(images, 0),)


NODE_CLASS_MAPPINGS = {"CSDRenderViews": CSDRenderViews}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDRenderViews": "CSD Render Views"}
