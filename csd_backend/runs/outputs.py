"""What a run writes besides its checkpoints: preview PNGs, the ring of views (``renders/view_NN.png``) and the
mesh (``mesh.<format>``), each never overwriting a file."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

from ..errors import ConfigError, CSDError, DiskFullError
from .folders import quoted
from .progress import StageBars, bar, echo
from .stopping import raise_pending

#: previews (and tiny renders) are enlarged to at least this many pixels on their shorter side
MIN_PNG_SIDE = 256
#: the sizes a ring of views may have (pixels a side)
VIEW_SIZES = (8, 4096)
#: the flags that set each output field (``generate``; ``render`` names its own)
OUTPUT_FLAGS = {"views": "--views", "view_size": "--view-size", "mesh_format": "--mesh-format",
                "mesh_resolution": "--mesh-resolution", "mesh_texture_size": "--mesh-texture-size",
                "mesh_face_budget": "--mesh-face-budget"}


def view_name(index: int) -> str:
    """The file name of view ``index`` of a ring (``generate`` and ``render`` alike): ``view_00.png``."""
    return f"view_{index:02d}.png"


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

    def validate(self, flags: Optional[dict] = None, at_least_one_view: bool = False) -> "RunOutputs":
        """Check every output setting before anything runs (a bad one would fail only after training); errors
        name the flag (``flags``: field → flag, default ``OUTPUT_FLAGS``)."""
        from ..export import ExportConfig
        from ..export.writers import FORMATS

        flags = {**OUTPUT_FLAGS, **(flags or {})}
        lowest = 1 if at_least_one_view else 0
        if not _int(self.views) or self.views < lowest:
            raise ConfigError(flags["views"], f"must be a whole number of views, at least {lowest}"
                                              + ("" if lowest else " (0: no ring of views)") + f", got {self.views!r}")
        lo, hi = VIEW_SIZES
        if not _int(self.view_size) or not lo <= self.view_size <= hi:
            raise ConfigError(flags["view_size"], f"must be a size in pixels in [{lo}, {hi}], got {self.view_size!r}")
        if self.mesh_format not in FORMATS:
            raise ConfigError(flags["mesh_format"], f"must be one of {', '.join(FORMATS)}, got {self.mesh_format!r}")
        for name, field in (("mesh_resolution", "resolution"), ("mesh_texture_size", "texture_size"),
                            ("mesh_face_budget", "face_budget")):
            value = getattr(self, name)
            if value is not None:
                try:
                    ExportConfig(**{field: value}).validate()
                except ConfigError as e:
                    raise ConfigError(flags[name], str(e).split(": ", 1)[-1]) from None
        return self

    def expected_files(self, out: Path) -> List[Path]:
        """The files a finished run folder holds: its last view and (unless no mesh) its mesh."""
        files = [out / "renders" / view_name(self.views - 1)] if self.views > 0 else []
        return files + ([out / f"mesh.{self.mesh_format}"] if self.mesh else [])


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def save_png(image, path: Path, min_side: int = 0, caption: Optional[str] = None) -> None:
    """Save an ``[H, W, 3]`` image in [0, 1]; with ``min_side`` enlarged by the smallest integer factor that makes
    its shorter side at least that long (nearest neighbour: every render pixel becomes a k×k block); with
    ``caption`` the text on a dark band along its bottom edge (``captioned``)."""
    import numpy as np
    from PIL import Image

    from ..io import atomic_write

    arr = (image.clamp(0, 1).numpy() * 255 + 0.5).astype("uint8")
    short = min(arr.shape[0], arr.shape[1])
    if min_side and 0 < short < min_side:
        k = -(-min_side // short)
        arr = np.repeat(np.repeat(arr, k, axis=0), k, axis=1)
    picture = Image.fromarray(arr)
    if caption:
        picture = captioned(picture, caption)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


#: height of a caption band, as a fraction of the image height (at least 12 px)
CAPTION_BAND = 0.07


def captioned(picture, text: str):
    """A copy of the PIL image with ``text`` in white on a dark band along its bottom edge (same size), or the
    image itself when it is too small to hold a line of text."""
    from PIL import ImageDraw, ImageFont

    band = max(12, int(round(picture.height * CAPTION_BAND)))
    if picture.height < 3 * band or picture.width < 64:
        return picture
    out = picture.convert("RGB").copy()
    draw = ImageDraw.Draw(out, "RGBA")
    draw.rectangle([0, out.height - band, out.width, out.height], fill=(0, 0, 0, 170))
    try:
        font = ImageFont.load_default(size=max(9, band - 4))
    except TypeError:  # Pillow < 10.1: one fixed size
        font = ImageFont.load_default()
    draw.text((4, out.height - band + 1), text, fill=(255, 255, 255, 255), font=font)
    return out


def render_views(scene, n_views: int, size: int, camera_cfg, shading: str, render_cfg, renderer, quiet: bool,
                 save, indices: Optional[List[int]] = None) -> int:
    """Render a ring of ``n_views`` views one at a time (a tick of the "views" bar each) and ``save(k, image)``
    each as soon as it is done (``k``: its position in ``indices``, the views of the ring to render; all by
    default). Returns the number rendered."""
    from ..render.cameras import orbit_cameras
    from ..render.views import prepare_renderer, render_cameras

    c = camera_cfg
    indices = list(range(n_views)) if indices is None else list(indices)
    if not indices:
        return 0
    cams = orbit_cameras(n_views, c.eval_elevation, c.eval_distance, c.eval_fovy, size, size)
    views_bar = bar(quiet, total=len(indices), desc="views", unit="view")
    try:
        renderer = prepare_renderer(scene, render_cfg, renderer)
        for k, i in enumerate(indices):
            raise_pending()
            save(k, render_cameras(scene, cams[i], shading, render_cfg, renderer)[0])
            if views_bar is not None:
                views_bar.update(1)
    finally:
        if views_bar is not None:
            views_bar.close()
    return len(indices)


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
    except DiskFullError:
        raise  # not a property of the scene: the caller says how to finish once there is space
    except CSDError as e:  # the run itself succeeded; say how to export later
        say(f"warning: no mesh written: {e}. Export later with: python -m csd_backend export {quoted(out)} "
            f"--out {quoted(out)} --threshold <value>")
        return None


#: the splats of a Gaussian run, beside its mesh
SPLATS_FILE = "gaussians.ply"


def write_run_splats(scene, out: Path, say=echo) -> Path:
    """``out/gaussians.ply`` (a new name beside it when it exists: a resumed run keeps the earlier file)."""
    from ..export.splats import write_splats
    from ..io import unique_path

    path = out / SPLATS_FILE
    path = path if not path.exists() else unique_path(out, "gaussians", ".ply")
    write_splats(scene, path)
    say(f"splats: {path} ({scene.num_gaussians} Gaussians)")
    return path


def finish_run(scene, opt, out: Path, outputs: RunOutputs, say=echo, phase=None, only_missing: bool = False) -> dict:
    """Write the splats of a Gaussian run (``gaussians.ply``), the ring of views (``renders/view_NN.png``) and the
    mesh of a trained run. Returns ``{"renders": [paths], "mesh": path or None}`` (and ``"splats"``: what this call
    wrote). ``only_missing``: the scene is the one the existing
    files show (a resumed run with nothing left to train), so only the views and the mesh that are not there yet
    are written; otherwise an existing file gets a new name beside it. ``say(line)`` gets the mesh line or the
    warning that no mesh was written; ``phase(text)`` is told what is being done ("while rendering the views")."""
    from ..io import unique_path

    written: dict = {"renders": [], "mesh": None}
    if getattr(scene, "kind", None) == "gaussians" and not (only_missing and (out / SPLATS_FILE).is_file()):
        if phase is not None:
            phase("while writing the splats")
        written["splats"] = write_run_splats(scene, out, say)
    if phase is not None:
        phase("while rendering the views")
    raise_pending()  # a signal during the last step's update
    todo = [i for i in range(outputs.views)
            if not (only_missing and (out / "renders" / view_name(i)).is_file())]

    def save_view(i, img):
        path = out / "renders" / view_name(todo[i])
        path = path if not path.exists() else unique_path(path.parent, path.stem, ".png")
        save_png(img, path, MIN_PNG_SIDE)
        written["renders"].append(path)

    if todo:  # render with the trained occupancy grid (EMA over the whole run), not one refitted from one pass
        render_views(scene, outputs.views, outputs.view_size, opt.config.camera, "albedo", opt.config.render,
                     opt.renderer, outputs.quiet, save_view, indices=todo)
    mesh_file = out / f"mesh.{outputs.mesh_format}"
    if outputs.mesh and not (only_missing and mesh_file.is_file()):
        if phase is not None:
            phase("while exporting the mesh")
        written["mesh"] = write_run_mesh(outputs, scene, out, opt.config.preset, say)
    return written
