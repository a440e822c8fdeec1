"""Does a prior's prompt prefer its exact object over the object's blob morph? A diffusion-classifier check.

    python benchmarks/toy_prior/prefer_exact.py --model csd_backend/priors/toy_model
    python benchmarks/toy_prior/prefer_exact.py --model runs/toy_v7/model --shares 0.15,0.3 --views 24

For each object, ``--views`` training cameras (``render_dataset.sample_views``, seed 5) render the exact object and
its blob morphs (``render_dataset.BLOB``, at each of ``--shares``; albedo on white). Each render's **advantage** is
the prompt's log-likelihood edge over the empty caption, ``Σ_t ‖ε̂(z_t, ∅) − ε‖² − ‖ε̂(z_t, y) − ε‖²`` at the
timesteps of the caption-accuracy check (100…850, the same noise for every render of a view): what CSD's direction
ε(y) − ε(∅) climbs. Printed per object: the mean advantage of the exact renders and of each share's morphs, and how
often the exact render of a view beats its morph ("wins"; 0.5: the prompt cannot tell the object from its rounder,
larger version, so nothing pushes a run from one to the other). ``--sized``: the morphs seen from cameras moved so
that they look as large as the object, so that only their shape tells them from it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Sequence

import torch

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parents[1], _HERE.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from toy_prior.objects import OBJECTS, get_object, render_object  # noqa: E402
from toy_prior.render_dataset import BLOB, at_size_of, morph_object, sample_views  # noqa: E402
from toy_prior.train import CLASSIFIER_TIMESTEPS  # noqa: E402


@torch.no_grad()
def prompt_advantage(prior, images: torch.Tensor, prompt: str, seed: int = 1) -> torch.Tensor:
    """``[N]``: the advantage of ``prompt`` over "" for each image ``[N, H, W, 3]`` in [0, 1] (module docstring);
    ``prior``: the engine's loaded prior (``load_stable_diffusion``)."""
    vae, unet = prior.vae, prior.unet
    z = vae.encode(images.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    emb = prior.encode_text([prompt, ""]).float()  # [2, L, D], as the engine encodes its prompts
    ts = torch.tensor(CLASSIFIER_TIMESTEPS)
    a = prior.alphas_cumprod.float().cpu()[ts].view(-1, 1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(z.shape[0]):
        noise = torch.randn(len(ts), *z.shape[1:], generator=g)
        zt = a.sqrt() * z[i:i + 1] + (1 - a).sqrt() * noise
        pred = unet(zt.repeat_interleave(2, 0), ts.repeat_interleave(2),
                    encoder_hidden_states=emb.repeat(len(ts), 1, 1)).sample
        err = (pred - noise.repeat_interleave(2, 0)).pow(2).mean((1, 2, 3)).view(len(ts), 2).sum(0)
        out.append(err[1] - err[0])
    return torch.stack(out)


def compare(prior, name: str, views: int = 24, shares: Sequence[float] = (0.15, 0.3),
            sized: bool = False) -> Dict[str, torch.Tensor]:
    """The advantages of ``name``'s prompt on its exact renders (``exact``) and on its blob morphs (one key per
    share), ``[views]`` each, the same cameras and noise for all; ``sized``: each morph seen from cameras moved so
    that it looks as large as the object (``render_dataset.at_size_of``: only the shape differs)."""
    obj = get_object(name)
    cams = sample_views(views, torch.Generator().manual_seed(5))
    shapes = {"exact": obj, **{f"blob {s:g}": morph_object(obj, BLOB, s) for s in shares}}
    return {k: prompt_advantage(prior, render_object(o, at_size_of(obj, o, cams) if sized else cams)["rgb"]
                                .clamp(0, 1), obj.prompt)
            for k, o in shapes.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a saved prior (a diffusers folder)")
    ap.add_argument("--objects", default=",".join(o.name for o in OBJECTS))
    ap.add_argument("--views", type=int, default=24)
    ap.add_argument("--shares", default="0.15,0.3", help="the blob's shares of the morphs")
    ap.add_argument("--sized", action="store_true",
                    help="see each morph at the object's own apparent size (only the shape differs)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from csd_backend.priors.stable_diffusion import load_stable_diffusion

    prior = load_stable_diffusion(args.model, device="cpu", dtype="float32")
    shares = [float(s) for s in args.shares.split(",")]
    print(f"{args.model}: the prompt's advantage over \"\" (mean of {args.views} views) and how often the exact "
          f"render beats its morph" + (" (seen at the object's size)" if args.sized else ""))
    for name in args.objects.split(","):
        adv = compare(prior, name, args.views, shares, args.sized)
        exact = adv.pop("exact")
        cells = "  ".join(f"{k} {float(v.mean()):+.4f} (exact wins {float((exact > v).float().mean()):.2f})"
                          for k, v in adv.items())
        print(f"{name:5s} exact {float(exact.mean()):+.4f}  {cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
