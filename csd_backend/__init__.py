"""CSD text-to-3D engine: a plain PyTorch library (never imports ComfyUI).

Heavy modules (torch, diffusers) are imported by the submodules that need them, so importing this package is
cheap. Main entry points:

- ``csd_backend.config.RunConfig`` and ``csd_backend.presets.get_preset`` – configuration;
- ``csd_backend.priors.load_prior`` – a diffusion prior from a folder, file or hub id;
- ``csd_backend.optimize.Optimization`` – the optimisation loop, checkpoints and resume;
- ``csd_backend.render.views.render_ring`` – views of a scene.
"""
__version__ = "0.1.0"
