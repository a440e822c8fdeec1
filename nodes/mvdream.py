"""CSD MVDream: text → a 3D scene with the MVDream prior, every setting but the prompts from a multi-view preset
(csd-mvdream: the official CSD-MVDream run value for value)."""
from __future__ import annotations

import dataclasses

from csd_backend.config import OptimConfig
from csd_backend.presets import MVDREAM_NEGATIVE_PROMPT, PRESETS

from . import pack
from .execution import autograd_allowed
from .input_errors import validate_config
from .optimize import CSDOptimize
from .run_folders import UNTRAINED_ATTR
from .widgets import bool_input, combo_input, int_input, string_input

_SEED_MAX = 2**63 - 1


def multiview_presets() -> list:
    """The presets that train with several views of one object a step (``camera.n_views`` > 1)."""
    return sorted(name for name, p in PRESETS.items() if p.get("camera", {}).get("n_views", 1) > 1)


class CSDMVDream(CSDOptimize):
    DISPLAY = "CSD MVDream"
    DEFAULT_PRESET = "csd-mvdream"
    DEFAULT_RUN_NAME = "mvdream"
    DESCRIPTION = ("Text to 3D with the MVDream prior (load sd-v2.1-base-4view.pt from models/checkpoints, with "
                   "its sd-v2-base.yaml beside it, or a diffusers-style MVDream folder from models/diffusers, in CSD "
                   "Load Diffusion Model). Every step renders whole objects: 4 views of one object at equally spaced "
                   "azimuths, seen together by MVDream. The preset gives everything but the prompts: csd-mvdream is "
                   "the official CSD-MVDream run (ε_y − ε_neg with std normalisation, batch 8 then 4 at 64² then "
                   "256², 10000 steps; a GPU), sds-mvdream the MVDream SDS baseline, mvdream-cpu a 150-step run "
                   "for a CPU. Live preview, Cancel and resume as CSD Optimize; connect the scene to CSD Extract "
                   "Mesh.")
    FUNCTION = "generate"
    PRESET_TOOLTIP = ("csd-mvdream: the official CSD-MVDream run (R2 csd.yaml); sds-mvdream: threestudio-mvdream's "
                      "SDS (mvdream-sd21.yaml); mvdream-cpu: one 4-view object at 64², 150 steps")

    @classmethod
    def INPUT_TYPES(cls):
        d = OptimConfig()
        return {
            "required": {
                "prior": (pack.PRIOR, {"tooltip": "an MVDream model from CSD Load Diffusion Model"}),
                "prompt": string_input("an astronaut riding a horse", "what to generate", multiline=True),
                "negative_prompt": string_input(MVDREAM_NEGATIVE_PROMPT, "what to move away from (CSD-MVDream: "
                                                                         "ε_y − ε_neg)", multiline=True),
                "preset": combo_input(multiview_presets(), cls.DEFAULT_PRESET, cls.PRESET_TOOLTIP),
                "steps": int_input(d.steps, 1, 10_000_000, "optimisation steps (CSD-MVDream: 10000); the preset's "
                                                           "schedules are stretched to this length"),
                "seed": int_input(d.seed, 0, _SEED_MAX, "seed of every random draw (cameras, timesteps, noise, "
                                                        "initial weights)", control_after_generate=False),
                "checkpoint_every": int_input(d.checkpoint_every, 0, 10_000_000, "save a resumable checkpoint every N "
                                                                                 "steps (0: only at the end and on "
                                                                                 "cancel)"),
                "preview_every": int_input(10, 0, 10_000_000, "send a live preview of the current render every N "
                                                              "steps (0: never)"),
                "run_name": string_input(cls.DEFAULT_RUN_NAME, "runs are saved in output/csd3d/runs/<run_name>_NNNNN"),
                "resume": bool_input(False, "continue the latest checkpoint of run_name instead of starting a new run"),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def run_config(cls, prior, guidance, scene, cameras, preset, steps, lr, seed, checkpoint_every, preview_every,
                   where: str = "CSD MVDream"):
        """The preset's RunConfig with the prompts ``guidance`` = (prompt, negative prompt) and the run settings."""
        cfg = cls.preset_config(preset, steps, where)
        prompt, negative = guidance
        cfg = cfg.replace(guidance={"prompt": str(prompt), "negative_prompt": str(negative)},
                          scene=dataclasses.asdict(scene.cfg),
                          optim={"seed": int(seed), "checkpoint_every": int(checkpoint_every),
                                 "preview_every": int(preview_every)},
                          prior={"model": str(getattr(prior, "source", "") or getattr(prior, "name", "")),
                                 "resolution": getattr(prior, "resolution", None)})
        return validate_config(cfg, where)

    @autograd_allowed
    def generate(self, prior, prompt, negative_prompt, preset, steps, seed, checkpoint_every, preview_every,
                 run_name, resume, unique_id=None):
        from csd_backend.errors import ConfigError

        if not getattr(prior, "multiview", False):
            raise ConfigError("prior", f"CSD MVDream needs a multi-view prior, not '{getattr(prior, 'name', prior)}': "
                                       "load sd-v2.1-base-4view.pt (models/checkpoints, with its sd-v2-base.yaml) or a "
                                       "diffusers-style MVDream folder in CSD Load Diffusion Model")
        if not str(prompt).strip():
            raise ConfigError("prompt", "the prompt is empty; describe the object to generate")
        return self.optimize(prior, (prompt, negative_prompt), self.new_scene(preset), preset, steps, None, seed,
                             checkpoint_every, preview_every, run_name, resume, unique_id=unique_id)

    @staticmethod
    def new_scene(preset: str):
        """The preset's new volume (a deterministic start; the run re-initialises it from its seed)."""
        import torch

        from csd_backend.presets import get_preset
        from csd_backend.scene.volume import Scene

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            scene = Scene(get_preset(preset).scene)
        setattr(scene, UNTRAINED_ATTR, True)
        return scene.eval()


NODE_CLASS_MAPPINGS = {"CSDMVDream": CSDMVDream}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDMVDream": "CSD MVDream"}
