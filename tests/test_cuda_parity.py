"""Accelerator parity on CUDA (skipped without a GPU): the same inputs give the same encoding, rendered image and
gradients within tolerance on the accelerated and the reference backends, and on CUDA and CPU."""
from __future__ import annotations

import copy

import pytest
import torch

from csd_backend.config import RenderConfig, SceneConfig
from csd_backend.render.cameras import get_rays, orbit_cameras
from csd_backend.render.volume_renderer import VolumeRenderer
from csd_backend.scene import backends
from csd_backend.scene.encoding import HashGridEncoding
from csd_backend.scene.volume import Scene

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CFG = SceneConfig(radius=1.0, n_levels=16, log2_hashmap_size=19, base_resolution=16, max_resolution=2048)


@cuda
@pytest.mark.skipif(not backends.tcnn_available(0), reason="needs tinycudann")
def test_tcnn_encoding_matches_torch_forward_and_backward():
    torch.manual_seed(0)
    ref = HashGridEncoding(CFG.n_levels, 2, CFG.log2_hashmap_size, CFG.base_resolution, CFG.level_scale()).cuda()
    acc = backends.TcnnHashGridEncoding(CFG.n_levels, 2, CFG.log2_hashmap_size, CFG.base_resolution,
                                        CFG.level_scale(), torch.device("cuda"))
    acc.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ref.params.normal_(0, 1e-2)
        acc.params.copy_(ref.params)
    x = torch.rand(100_000, 3, device="cuda")
    a, b = ref(x), acc(x)
    torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-2)
    w = torch.randn_like(a)
    (a * w).sum().backward()
    (b * w).sum().backward()
    torch.testing.assert_close(acc.params.grad, ref.params.grad, atol=1e-3, rtol=1e-2)


@cuda
def test_render_and_gradients_match_between_cpu_and_cuda():
    torch.manual_seed(0)
    cpu_scene = Scene(SceneConfig(**{**CFG.__dict__, "encoding_backend": "torch", "background": "solid"}))
    gpu_scene = copy.deepcopy(cpu_scene).cuda()
    cams = orbit_cameras(2, 15.0, 2.0, 60.0, 32, 32)
    outs = []
    for scene, device in ((cpu_scene, "cpu"), (gpu_scene, "cuda")):
        r = VolumeRenderer(RenderConfig(num_samples_per_ray=256, stratified=False), 1.0).to(device)
        r.grid.update(0, scene.volume.density, r.step_size, torch.Generator().manual_seed(0))
        o, d = get_rays(cams.to(device))
        out = r(scene.volume, scene.background, o, d, "textureless", need_normals=True)
        out.rgb.square().sum().backward()
        outs.append((out.rgb.detach().cpu(), scene.volume.encoding.params.grad.cpu()))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-3)
