"""What a run writes besides its checkpoints: preview PNGs, the ring of views (``renders/view_NN.png``) and the
mesh (``mesh.<format>``), each never overwriting a file."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

from ..errors import CSDError
from .folders import quoted
from .progress import StageBars, bar, echo
from .stopping import raise_pending

#: previews (and tiny renders) are enlarged to at least this many pixels on their shorter side
MIN_PNG_SIDE = 256


@dataclasses.dataclass
class RunOutputs:
    """What a run writes after training, besides its checkpoint: the ring of views and the mesh (the output flags
    of ``generate``; ``quiet``: no progress bars)."""

    views: int = 8
    view_size: int = 256
    mesh: bool = True
    mesh_format: str = "glb"
    #: the mesh's export settings where given (None: the run's, ``run_export_config``)
    mesh_resolution: Optional[int] = None
    mesh_texture_size: Optional[int] = None
    mesh_face_budget: Optional[int] = None
    quiet: bool = False

    @classmethod
    def from_args(cls, args) -> "RunOutputs":
        d = cls()
        given = lambda name, default: default if getattr(args, name, None) is None else getattr(args, name)
        return cls(views=given("views", d.views), view_size=given("view_size", d.view_size),
                   mesh=not getattr(args, "no_mesh", False), mesh_format=given("mesh_format", d.mesh_format),
                   mesh_resolution=getattr(args, "mesh_resolution", None),
                   mesh_texture_size=getattr(args, "mesh_texture_size", None),
                   mesh_face_budget=getattr(args, "mesh_face_budget", None),
                   quiet=bool(getattr(args, "quiet", False)))

    def expected_files(self, out: Path) -> List[Path]:
        """The files a finished run folder holds: its last view and (unless no mesh) its mesh."""
        files = [out / "renders" / f"view_{self.views - 1:02d}.png"] if self.views > 0 else []
        return files + ([out / f"mesh.{self.mesh_format}"] if self.mesh else [])


def save_png(image, path: Path, min_side: int = 0) -> None:
    """Save an ``[H, W, 3]`` image in [0, 1]; with ``min_side`` enlarged by the smallest integer factor that makes
    its shorter side at least that long (nearest neighbour: every render pixel becomes a k×k block)."""
    import numpy as np
    from PIL import Image

    from ..io import atomic_write

    arr = (image.clamp(0, 1).numpy() * 255 + 0.5).astype("uint8")
    short = min(arr.shape[0], arr.shape[1])
    if min_side and 0 < short < min_side:
        k = -(-min_side // short)
        arr = np.repeat(np.repeat(arr, k, axis=0), k, axis=1)
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def render_views(scene, n_views: int, size: int, camera_cfg, shading: str, render_cfg, renderer, quiet: bool,
                 save) -> int:
    """Render a ring of views one at a time (a tick of the "views" bar each) and ``save(index, image)`` each as
    soon as it is done."""
    from ..render.cameras import orbit_cameras
    from ..render.views import prepare_renderer, render_cameras

    c = camera_cfg
    cams = orbit_cameras(n_views, c.eval_elevation, c.eval_distance, c.eval_fovy, size, size)
    views_bar = bar(quiet, total=n_views, desc="views", unit="view")
    try:
        renderer = prepare_renderer(scene, render_cfg, renderer)
        for i in range(n_views):
            raise_pending()
            save(i, render_cameras(scene, cams[i], shading, render_cfg, renderer)[0])
            if views_bar is not None:
                views_bar.update(1)
    finally:
        if views_bar is not None:
            views_bar.close()
    return n_views


def export_mesh(scene, config, quiet: bool):
    """The textured mesh of ``scene`` (``ExportConfig`` ``config``), with a bar per export stage."""
    from ..export import extract_textured_mesh

    bars = StageBars(quiet)
    try:
        return extract_textured_mesh(scene, config, progress=bars)
    finally:
        bars.close()


def run_export_config(preset: str, **given):
    """The ``ExportConfig`` of a run made with ``preset``: the preset's export settings (``presets.export_settings``;
    the CPU presets export smaller meshes) with the ``given`` settings that are not None on top."""
    from ..export import ExportConfig
    from ..presets import export_settings

    return ExportConfig(**{**export_settings(preset), **{k: v for k, v in given.items() if v is not None}}).validate()


def write_run_mesh(outputs: RunOutputs, scene, out: Path, preset: str, say=echo) -> Optional[Path]:
    """Export the mesh of a finished run (made with ``preset``) as ``out/mesh.<format>`` (a new name when it
    exists); None when the scene has no surface to export (a warning through ``say`` says how to export later)."""
    from ..errors import OutputExistsError
    from ..export import save_mesh, save_mesh_unique

    try:
        config = run_export_config(preset, resolution=outputs.mesh_resolution, texture_size=outputs.mesh_texture_size,
                                   face_budget=outputs.mesh_face_budget)
        mesh = export_mesh(scene, config, outputs.quiet)
        try:
            path = save_mesh(mesh, out / f"mesh.{outputs.mesh_format}", outputs.mesh_format)
        except OutputExistsError:  # a resumed run: keep the earlier mesh
            path = save_mesh_unique(mesh, out, "mesh", outputs.mesh_format)
        say(f"mesh: {path} ({mesh.num_faces} faces)")
        return path
    except CSDError as e:  # the run itself succeeded; say how to export later
        say(f"warning: no mesh written: {e}. Export later with: python -m csd_backend export {quoted(out)} "
            f"--out {quoted(out)} --threshold <value>")
        return None


def finish_run(scene, opt, out: Path, outputs: RunOutputs, say=echo, phase=None) -> dict:
    """Write the ring of views (``renders/view_NN.png``; new names when they exist) and the mesh of a trained run.
    Returns ``{"renders": [paths], "mesh": path or None}``. ``say(line)`` gets the mesh line or the warning that no
    mesh was written; ``phase(text)`` is told what is being done ("while rendering the views", ...)."""
    from ..io import unique_path

    written: dict = {"renders": [], "mesh": None}
    if phase is not None:
        phase("while rendering the views")
    raise_pending()  # a signal during the last step's update

    def save_view(i, img):
        path = out / "renders" / f"view_{i:02d}.png"
        path = path if not path.exists() else unique_path(path.parent, path.stem, ".png")
        save_png(img, path, MIN_PNG_SIDE)
        written["renders"].append(path)

    # render with the trained occupancy grid (EMA over the whole run), not one refitted from a single pass
    render_views(scene, outputs.views, outputs.view_size, opt.config.camera, "albedo", opt.config.render,
                 opt.renderer, outputs.quiet, save_view)
    if outputs.mesh:
        if phase is not None:
            phase("while exporting the mesh")
        written["mesh"] = write_run_mesh(outputs, scene, out, opt.config.preset, say)
    return written
