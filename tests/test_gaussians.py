"""Gaussian splats (scene kind ``gaussians``): the scene, the pure-PyTorch splatter against a brute-force
compositing of every Gaussian at every pixel, its gradients, shading, the density control and the scene-kind
plumbing (conversions, optimiser groups, state resizing)."""
from __future__ import annotations

import math

import pytest
import torch

from csd_backend.config import RenderConfig, SceneConfig
from csd_backend.errors import ConfigError
from csd_backend.gaussian_config import GaussianConfig, position_lr
from csd_backend.render.cameras import make_cameras, orbit_cameras
from csd_backend.render.gaussian_renderer import GaussianRenderer, opencv_cameras, splat_backend
from csd_backend.render.splatting import ALPHA_MAX, ALPHA_MIN, T_MIN, project, splat
from csd_backend.scene.gaussians import GaussianScene, neighbour_scales, quaternion_matrix, sh_basis
from csd_backend.scene_kinds import KINDS, make_renderer, make_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gaussian_cfg(**over) -> SceneConfig:
    g = {"num_points": 200, "init_radius": 0.4, **over.pop("gaussians", {})}
    return SceneConfig(kind="gaussians", radius=1.0, background="solid", background_color=[0.2, 0.3, 0.4],
                       gaussians=GaussianConfig(**g), **over)


def random_scene(n=60, seed=0, **over) -> GaussianScene:
    torch.manual_seed(seed)
    scene = GaussianScene(gaussian_cfg(gaussians={"num_points": n, **over.pop("gaussians", {})}, **over))
    with torch.no_grad():
        scene.log_scales.data = torch.log(torch.rand(n, 3) * 0.08 + 0.02)
        scene.quaternions.data = torch.randn(n, 4)
        scene.opacity_logits.data = torch.randn(n) * 2
        scene.sh_dc.data = torch.randn(n, 3)
    return scene


def brute_force(scene, cams, features, tile):
    """Every Gaussian at every pixel of the tiles its radius touches (3DGS's reach), sorted by depth per camera,
    composited with 3DGS's rules, without binning."""
    c2w, f = cams.c2w, cams.focal
    H, W = cams.height, cams.width
    proj = project(scene.means, scene.covariances(), c2w, f, W, H)
    j, i = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    pix = torch.stack([i, j], -1).view(1, -1, 1, 2)  # [1, HW, 1, 2]
    d = pix - proj.means2d.unsqueeze(1)  # [B, HW, N, 2]
    con = proj.conic.unsqueeze(1)
    power = -0.5 * (con[..., 0] * d[..., 0] ** 2 + con[..., 2] * d[..., 1] ** 2) - con[..., 1] * d[..., 0] * d[..., 1]
    alpha = (scene.opacities() * torch.exp(power)).clamp_max(ALPHA_MAX)
    m, r = proj.means2d.detach().unsqueeze(1), proj.radius.unsqueeze(1)  # [B, 1, N, 2], [B, 1, N]
    tx, ty = torch.floor(pix[..., 0] / tile), torch.floor(pix[..., 1] / tile)  # [1, HW, 1]
    reach = (tx >= torch.floor((m[..., 0] - r) / tile)) & (tx < torch.floor((m[..., 0] + r + tile - 1) / tile)) \
        & (ty >= torch.floor((m[..., 1] - r) / tile)) & (ty < torch.floor((m[..., 1] + r + tile - 1) / tile))
    alpha = torch.where((alpha >= ALPHA_MIN) & (r > 0) & reach, alpha, torch.zeros_like(alpha))
    order = torch.argsort(proj.depth.detach(), -1)  # [B, N]
    a = torch.gather(alpha, 2, order.unsqueeze(1).expand_as(alpha))
    trans = torch.cumprod(torch.cat([torch.ones_like(a[..., :1]), 1 - a[..., :-1]], -1), -1)
    keep = trans * (1 - a) >= T_MIN
    w = torch.where(keep, trans * a, torch.zeros_like(a))  # [B, HW, N] in depth order
    feats = torch.gather(features, 1, order.unsqueeze(-1).expand_as(features))  # [B, N, D]
    img = torch.einsum("bpn,bnd->bpd", w, feats)
    return img.view(len(cams), H, W, -1), w.sum(-1).view(len(cams), H, W)


def test_the_table_has_the_gaussian_kind_and_its_conversions():
    row = KINDS["gaussians"]
    assert set(row.starts_from) == {"volume", "dmtet", "mesh"} and row.renderer_settings == "gaussians"
    scene = make_scene(gaussian_cfg())
    assert scene.kind == "gaussians" and scene.num_gaussians == 200
    assert isinstance(make_renderer(RenderConfig(), scene.cfg), GaussianRenderer)


def test_random_start_is_dreamgaussians_ball():
    torch.manual_seed(1)
    scene = GaussianScene(gaussian_cfg(gaussians={"num_points": 2000, "init_radius": 0.5}))
    r = scene.means.norm(dim=-1)
    assert r.max() <= 0.5 and abs(float((r < 0.5 * 0.5 ** (1 / 3)).float().mean()) - 0.5) < 0.05  # uniform
    assert torch.allclose(scene.opacities(), torch.full((2000,), 0.1))
    assert torch.allclose(scene.colors(torch.zeros(1, 3))[0], torch.full((2000, 3), 0.5), atol=1e-6)
    assert torch.equal(scene.quaternions[:, 0], torch.ones(2000)) and scene.sh_rest.shape == (2000, 0, 3)
    # scales: sqrt of the mean squared distance to the 3 nearest neighbours, exactly
    d2 = torch.cdist(scene.means, scene.means).pow(2) + torch.eye(2000) * 1e9
    expected = torch.sqrt(d2.topk(3, largest=False).values.mean(-1))
    assert torch.allclose(scene.scales()[:, 0], expected, rtol=1e-4)


def test_sh_basis_is_orthonormal_and_degree_zero_is_the_dc_colour():
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(200000, 3, generator=g), dim=-1)
    Y = sh_basis(dirs, 3)  # [M, 16]
    gram = Y.T @ Y / dirs.shape[0] * 4 * math.pi
    assert torch.allclose(gram, torch.eye(16), atol=0.03)
    q = quaternion_matrix(torch.randn(5, 4))
    assert torch.allclose(q @ q.transpose(1, 2), torch.eye(3).expand(5, 3, 3), atol=1e-5)


def test_tiled_splatter_equals_brute_force_compositing_and_its_gradients():
    scene = random_scene(60)
    cams = orbit_cameras(2, 20.0, 1.6, 50.0, 40, 36)  # a width and height that are no multiple of the tiles
    feats = torch.rand(2, 60, 5, requires_grad=True)
    proj = project(scene.means, scene.covariances(), cams.c2w, cams.focal, 36, 40)
    for tile in (4, 16):
        img, alpha, pairs = splat(proj, scene.opacities(), feats, 36, 40, tile)
        ref, ref_alpha = brute_force(scene, cams, feats, tile)
        assert pairs > 0 and float(alpha.detach().max()) > 0.5  # opaque enough that early termination and order matter
        assert torch.allclose(img, ref, atol=1e-5) and torch.allclose(alpha, ref_alpha, atol=1e-5)
    grads = torch.autograd.grad(img.square().sum(), [scene.means, scene.log_scales, scene.quaternions,
                                                      scene.opacity_logits, feats])
    ref_grads = torch.autograd.grad(ref.square().sum(), [scene.means, scene.log_scales, scene.quaternions,
                                                          scene.opacity_logits, feats])
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


def test_one_gaussian_has_the_ewa_footprint_with_the_low_pass_dilation():
    scene = GaussianScene(gaussian_cfg(gaussians={"num_points": 1}))
    with torch.no_grad():
        scene.means.zero_()
        scene.log_scales.fill_(math.log(0.05))
        scene.opacity_logits.fill_(math.log(0.5 / 0.5))
    cams = make_cameras([0.0], [0.0], [2.0], [60.0], 33, 33)
    proj = project(scene.means, scene.covariances(), cams.c2w, cams.focal, 33, 33)
    f = float(cams.focal[0])
    var = (f * 0.05 / 2.0) ** 2 + 0.3
    assert torch.allclose(proj.means2d[0, 0], torch.tensor([16.5, 16.5]))
    assert torch.allclose(proj.conic[0, 0], torch.tensor([1 / var, 0.0, 1 / var]), rtol=1e-4)
    _, alpha, _ = splat(proj, scene.opacities(), torch.ones(1, 1, 1), 33, 33)
    alpha = alpha.detach()
    assert alpha[0, 16, 16] == pytest.approx(0.5, rel=1e-5)
    assert alpha[0, 16, 18] == pytest.approx(0.5 * math.exp(-0.5 * 4 / var), rel=1e-4)
    assert alpha[0, 16, 19] == 0  # below 1/255: dropped


def test_renderer_composites_over_the_background_with_shadings_and_normal_map():
    scene = random_scene(80)
    renderer = GaussianRenderer(RenderConfig(), 1.0, settings=scene.cfg.gaussians)
    cams = orbit_cameras(2, 15.0, 1.6, 50.0, 32, 32)
    torch.set_grad_enabled(False)
    out = renderer.render(scene, cams, "albedo")
    bg = torch.tensor([0.2, 0.3, 0.4])
    far = out.opacity[..., 0] < 1e-6
    assert far.any() and torch.allclose(out.rgb[far], bg.expand(int(far.sum()), 3))
    assert out.rgb.shape == (2, 32, 32, 3) and out.normal.shape == (2, 32, 32, 3)
    assert float((out.normal.norm(dim=-1)[~far]).max()) <= math.sqrt(3) + 1e-5
    for shading in ("textureless", "diffuse"):
        other = renderer.render(scene, cams, shading)
        assert torch.isfinite(other.rgb).all() and not torch.allclose(other.rgb, out.rgb)
    white = renderer.render(scene, cams, "albedo", bg_colors=torch.ones(2, 3))
    torch.set_grad_enabled(True)
    assert torch.allclose(white.rgb[far], torch.ones(int(far.sum()), 3))


def test_normals_are_the_shortest_axis_facing_the_camera():
    scene = GaussianScene(gaussian_cfg(gaussians={"num_points": 2}))
    with torch.no_grad():
        scene.means.data = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0]])
        scene.log_scales.data = torch.log(torch.tensor([[0.1, 0.1, 0.01], [0.01, 0.1, 0.1]]))
        scene.quaternions.data = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    n = scene.normals(torch.tensor([[0.0, 0.0, -2.0], [2.0, 0.0, 0.0]]))
    assert torch.allclose(n[0], torch.tensor([[0.0, 0, -1], [-1.0, 0, 0]]))  # from below: both face down / −x
    assert torch.allclose(n[1], torch.tensor([[0.0, 0, 1], [1.0, 0, 0]]))


def test_backends_resolve_to_torch_on_the_cpu_and_gsplat_is_refused_there():
    assert splat_backend("auto", "cpu") == "torch" and splat_backend("torch", "cpu") == "torch"
    with pytest.raises(ConfigError, match="scene.gaussians.backend.*CUDA only.*pip install gsplat"):
        splat_backend("gsplat", "cpu")
    c2w = orbit_cameras(1, 30.0, 2.0, 50.0, 8, 8).c2w
    viewmats, K = opencv_cameras(c2w, torch.tensor([10.0]), 8, 8)
    p = torch.tensor([0.1, 0.2, 0.05, 1.0])
    cam = viewmats[0] @ p  # OpenCV: z forward, y down
    gl = torch.linalg.inv(c2w[0]) @ p
    assert cam[2] > 0 and torch.allclose(cam[:3], gl[:3] * torch.tensor([1.0, -1.0, -1.0]), atol=1e-6)


def test_position_lr_decays_log_linearly_and_holds():
    g = GaussianConfig()
    assert position_lr(g, 0) == pytest.approx(1e-2)
    assert position_lr(g, 150) == pytest.approx(10 * math.sqrt(1e-3 * 2e-5))
    assert position_lr(g, 300) == pytest.approx(2e-4) and position_lr(g, 999) == pytest.approx(2e-4)


def test_a_cap_below_the_start_and_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="scene.gaussians.max_gaussians.*below the 5000.*raise max_gaussians"):
        GaussianConfig(max_gaussians=100).validate()
    with pytest.raises(ConfigError, match="scene.gaussians.sh_degree"):
        GaussianConfig(sh_degree=4).validate()
    with pytest.raises(ConfigError, match="scene.gaussians.densify_grad_threshold"):
        GaussianConfig(densify_grad_threshold=[0, -1.0, 1.0, 10]).validate()


def test_state_dict_takes_the_saved_count():
    a, b = random_scene(30, seed=1), random_scene(70, seed=2)
    params = [id(p) for p in a.parameters()]
    a.load_state_dict(b.state_dict())
    assert a.num_gaussians == 70 and [id(p) for p in a.parameters()] == params  # same objects: optimiser groups
    assert torch.equal(a.means, b.means) and torch.equal(a.sh_dc, b.sh_dc)


def test_neighbour_scales_in_chunks_equal_one_pass():
    pts = torch.rand(300, 3)
    assert torch.allclose(neighbour_scales(pts, chunk=7), neighbour_scales(pts, chunk=1000))


def test_ply_round_trip_renders_the_same_image(tmp_path):
    from csd_backend.export.splats import attribute_names, load_splats, write_splats

    scene = random_scene(50, gaussians={"sh_degree": 2})
    with torch.no_grad():
        scene.sh_rest.data = torch.randn_like(scene.sh_rest) * 0.2
    path = write_splats(scene, tmp_path / "gaussians.ply")
    header = path.read_bytes().split(b"end_header")[0].decode()
    names = [line.split()[-1] for line in header.splitlines() if line.startswith("property")]
    assert names == attribute_names(2) and len(names) == 9 + 24 + 8 and "binary_little_endian" in header
    back = load_splats(path, scene.cfg)
    for name, p in scene.gaussian_parameters().items():
        assert torch.equal(p, getattr(back, name)), name
    cams = orbit_cameras(2, 25.0, 1.6, 50.0, 24, 24)
    with torch.no_grad():
        a = GaussianRenderer(RenderConfig(), 1.0, settings=scene.cfg.gaussians).render(scene, cams)
        b = GaussianRenderer(RenderConfig(), 1.0, settings=back.cfg.gaussians).render(back, cams)
    assert torch.equal(a.rgb, b.rgb)
    with pytest.raises(Exception, match="exists"):
        write_splats(scene, path)


def test_a_ply_that_is_not_a_splat_file_is_refused_with_what_it_has(tmp_path):
    from csd_backend.export.splats import SplatFileError, load_splats

    mesh = tmp_path / "mesh.ply"
    mesh.write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
                    "element face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n1 0 0\n0 1 0\n"
                    "3 0 1 2\n")
    with pytest.raises(SplatFileError, match="not a Gaussian-splat .ply: it lacks f_dc_0.*it has x, y, z.*INRIA"):
        load_splats(mesh)
    (tmp_path / "x.ply").write_bytes(b"\x00garbage")
    with pytest.raises(SplatFileError, match="not a PLY file"):
        load_splats(tmp_path / "x.ply")


def test_a_short_run_keeps_a_positive_position_decay_length():
    """with_steps stretches position_lr_steps with the run; a run of a few steps (of any preset: every scene config
    holds the Gaussian settings) keeps it at 1 instead of rounding it to an invalid 0."""
    from csd_backend.presets import get_preset

    for name in ("csd-edit", "csd-coarse", "gaussian-preview-cpu"):
        cfg = get_preset(name).with_steps(2).replace(guidance={"prompt": "a cat", "source_prompt": "a dog"})
        assert cfg.scene.gaussians.position_lr_steps >= 1, name
        cfg.validate(require_model=False)
    assert get_preset("gaussian-preview-cpu").with_steps(240).scene.gaussians.position_lr_steps == 144
