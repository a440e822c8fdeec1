"""Small configurations for fast CPU tests (tiny grid, small renders, few samples)."""
from __future__ import annotations

from csd_backend.config import RunConfig


def small_config(prompt: str = "red", steps: int = 60, **sections) -> RunConfig:
    base = {
        "guidance": {"prompt": prompt, "negative_prompt": "", "negative_weight": 0.0,
                     "max_step_percent": 0.98, "view_dependent": True},
        "scene": {"radius": 1.0, "n_levels": 4, "log2_hashmap_size": 12, "base_resolution": 8,
                  "max_resolution": 64, "mlp_width": 32, "random_background_prob": 0.0, "background": "solid",
                  "background_color": [0.5, 0.5, 0.5]},
        "camera": {"height": 24, "width": 24, "batch_size": 2, "first_step_fixed_view": False},
        "render": {"num_samples_per_ray": 48, "ambient_only_steps": 10**6, "grid_warmup_steps": 8,
                   "grid_update_every": 4},
        "loss": {"orient": 0.0, "sparsity": 0.0},
        "optim": {"steps": steps, "lr": 3e-2, "checkpoint_every": 0, "preview_every": 0},
        "prior": {"model": "analytic:16"},
    }
    for name, over in sections.items():
        base.setdefault(name, {}).update(over)
    return RunConfig.from_dict(base)
