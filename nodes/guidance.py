"""CSD Guidance: prompts and the score-distillation settings (CSD, the SDS baseline, editing, or VSD)."""
from __future__ import annotations

import dataclasses

from csd_backend.config import GUIDANCE_MODES, WEIGHTINGS

from . import pack
from .input_errors import error_text
from .specs import GuidanceSpec
from .widgets import PRESET_VALUE, bool_input, check_widgets, combo_input, float_input, string_input

_D = GuidanceSpec()
PERP_NEG = ("preset", "on", "off")  # widget defaults = the spec's stage-1 settings (GuidanceConfig defaults)


class CSDGuidance:
    DESCRIPTION = ("Prompts and score-distillation settings. csd: Classifier Score Distillation (ω1 on the "
                   "classifier score, ω2 on the annealed negative prompt); sds: the DreamFusion baseline with "
                   "classifier-free guidance; edit: change a trained scene, the source prompt describing it. Step "
                   "schedules are fractions of the run, so they follow the steps set on CSD Optimize. vsd: "
                   "ProlificDreamer's Variational Score Distillation (a camera-conditioned LoRA of the model learns "
                   "the renders; use the vsd-prolificdreamer or vsd-preview-cpu preset and a Stable Diffusion "
                   "model).")
    CATEGORY = pack.CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (pack.GUIDANCE,)
    RETURN_NAMES = ("guidance",)
    OUTPUT_TOOLTIPS = ("Guidance settings for CSD Optimize.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prompt": string_input(_D.prompt, "what to generate (or, in edit mode, what the scene should become)",
                                   multiline=True),
            "negative_prompt": string_input(_D.negative_prompt, "csd/sds: what to move away from", multiline=True),
            "mode": combo_input(list(GUIDANCE_MODES), _D.mode, "csd: Classifier Score Distillation; sds: the "
                                                               "DreamFusion baseline; edit: edit the input scene; "
                                                               "vsd: ProlificDreamer (trains a LoRA of the model "
                                                               "alongside the scene)"),
            "source_prompt": string_input(_D.source_prompt, "edit mode: a description of the current scene (it "
                                                            "takes the negative prompt's place)", multiline=True),
            "guidance_weight": float_input(_D.guidance_weight, 0.0, 1000.0, 0.1,
                                           "ω1: weight of the classifier score (spec: 1)"),
            "negative_weight_start": float_input(_D.negative_weight_start, 0.0, 1000.0, 0.1,
                                                 "ω2 at the start of the run (spec: 0)"),
            "negative_weight_end": float_input(_D.negative_weight_end, 0.0, 1000.0, 0.1,
                                               "ω2 at the end of its ramp (spec: 1)"),
            "negative_weight_anneal_until": float_input(
              _D.negative_weight_anneal_until, 0.0, 1.0, 0.01,
              "fraction of the run over which ω2 ramps linearly from start to end (spec: 0.5 = steps 0 → 5000 of "
              "10000); 0: ω2 = end from the first step"),
            "cfg_scale": float_input(_D.cfg_scale, 0.0, 1000.0, 0.5,
                                     "sds and vsd: classifier-free guidance scale (DreamFusion: 100 in "
                                     "threestudio's form ε_y + s(ε_y − ε_u); vsd: ProlificDreamer's 7.5 in "
                                     "diffusers' form ε_u + s(ε_y − ε_u))"),
            "weighting": combo_input(list(WEIGHTINGS), _D.weighting,
                                     "w(t): uniform (CSD), sds (1 − ᾱ, DreamFusion) or fantasia3d"),
            "grad_normalize": bool_input(_D.grad_normalize, "divide the gradient by its L2 norm over the whole batch "
                                                             "(CSD stage 1: on)"),
            "t_min": float_input(_D.t_min, PRESET_VALUE, 1.0, 0.01,
                                 "smallest diffusion timestep, as a fraction of T (paper: 0.02). -1: the preset's"),
            "t_max_start": float_input(_D.t_max_start, PRESET_VALUE, 1.0, 0.01,
                                       "largest diffusion timestep (fraction of T) before the switch (paper: "
                                       "0.98). -1 here and in t_max_end: the preset's schedule (some anneal "
                                       "linearly, which these widgets cannot express)"),
            "t_max_end": float_input(_D.t_max_end, PRESET_VALUE, 1.0, 0.01,
                                     "largest diffusion timestep (fraction of T) after the switch (paper: 0.5). "
                                     "-1: the preset's"),
            "t_max_switch_at": float_input(_D.t_max_switch_at, PRESET_VALUE, 1.0, 0.01,
                                           "fraction of the run at which the largest timestep drops from "
                                           "t_max_start to t_max_end (paper: 0.5 = step 5000 of 10000); needed "
                                           "when they differ"),
            "view_dependent": bool_input(_D.view_dependent,
                                         "add ', front view' / ', side view' / ', back view' / ', overhead view' "
                                         "to the prompt by camera angle"),
        }, "optional": {
            "perp_neg": combo_input(list(PERP_NEG), _D.perp_neg,
                                    "Perp-Neg (the official character config): interpolated view prompts and the "
                                    "other views' scores, perpendicular to the prompt's, as negatives (about 5/3 "
                                    "the UNet cost). preset: the preset's choice (on for csd-coarse-character)"),
            "lora_lr": float_input(_D.lora_lr, PRESET_VALUE, 0.1, 0.00001,
                                   "vsd only: learning rate of the LoRA that learns the renders (ProlificDreamer: "
                                   "0.0001). -1: the preset's", round=0.00001),
            "camera_condition_drop": float_input(_D.camera_condition_drop, PRESET_VALUE, 1.0, 0.01,
                                                 "vsd only: probability that a LoRA training step drops its "
                                                 "camera condition (ProlificDreamer: 0.1). -1: the preset's"),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, prompt=None, mode=None, source_prompt=None, t_min=None, t_max_start=None,
                        t_max_end=None):
        values = dict(prompt=prompt, mode=mode, source_prompt=source_prompt, t_min=t_min, t_max_start=t_max_start,
                      t_max_end=t_max_end)
        err = check_widgets(cls, values)
        if err:
            return err
        if prompt is None or mode is None or source_prompt is None:  # linked: checked when the node runs
            return True
        spec = dataclasses.replace(_D, **{k: v for k, v in values.items() if v is not None})
        return error_text(spec.validate) or True

    def build(self, **kwargs):
        spec = GuidanceSpec(**kwargs)
        spec.validate()
        return (spec,)


NODE_CLASS_MAPPINGS = {"CSDGuidance": CSDGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"CSDGuidance": "CSD Guidance"}
