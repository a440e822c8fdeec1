"""Before/after pictures of the README's demos: rows of turntable renders of run folders, one row per run.

    python benchmarks/demo_pictures.py --out docs/images/demo_cone.png \
        "before (first toy prior)=runs/cone_v1" "now=runs/cone"

Each argument is ``LABEL=RUN_FOLDER``; the row shows ``--views`` of the run's ``renders/view_NN.png`` (spread over
the ring), each cropped to its central ``--crop`` fraction (the demos' objects fill about half of a render), with
the label on the left. The README's pictures were made this way; the "before" runs came from the first toy prior
(``git archive 249b6f7~1 csd_backend/priors/toy_model``) with the presets of that time (the cone: ``--set
loss.opaque=0 --set loss.sparsity=1 --set camera.batch_size=1``; the vase: ``--set guidance.max_step_percent=0.5``),
the previous release's cone with ``--set camera.batch_size=1``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

LABEL_WIDTH = 150


def row(label: str, run: Path, views: int, crop: float, size: int) -> Image.Image:
    files = sorted((run / "renders").glob("view_*.png"))
    if not files:
        raise SystemExit(f"{run}: no renders/view_NN.png (a finished generate, refine or texture run folder)")
    picks = [files[round(i * len(files) / views)] for i in range(views)]
    out = Image.new("RGB", (LABEL_WIDTH + views * size, size), "white")
    for i, f in enumerate(picks):
        im = Image.open(f).convert("RGB")
        w, h = im.size
        m = (1 - crop) / 2
        im = im.crop((round(w * m), round(h * m), round(w * (1 - m)), round(h * (1 - m))))
        out.paste(im.resize((size, size), Image.LANCZOS), (LABEL_WIDTH + i * size, 0))
    ImageDraw.Draw(out).multiline_text((8, size // 2 - 12), label.replace(" (", "\n("), fill="black")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN_FOLDER")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--crop", type=float, default=0.6)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    rows = []
    for item in args.runs:
        label, sep, folder = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: expected LABEL=RUN_FOLDER")
        rows.append(row(label, Path(folder), args.views, args.crop, args.size))
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, r in enumerate(rows):
        sheet.paste(r, (0, i * r.height))
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it or choose another --out")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
