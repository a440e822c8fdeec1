"""Preview images for the browser: training renders (64² px) enlarged by nearest neighbour so that they are
viewable, and the size of the "preview" output of CSD Optimize."""
from __future__ import annotations

#: longest side of the live preview sent to the browser: training renders (64² px) are enlarged by nearest
#: neighbour by the largest integer factor that keeps them within it (64² → 512², each pixel an 8×8 block)
PREVIEW_MAX_SIZE = 512
#: the "preview" IMAGE output of CSD Optimize is rendered at this multiple of the training render size (64² →
#: 256²), never above PREVIEW_MAX_SIZE nor below the render size
PREVIEW_RENDER_FACTOR = 4


def to_pil(image):
    """``[H, W, 3]`` float tensor in [0, 1] → PIL image."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype("uint8")
    return Image.fromarray(arr)


def preview_factor(height: int, width: int, limit: int = PREVIEW_MAX_SIZE) -> int:
    """The largest integer factor that keeps ``max(height, width) * factor`` within ``limit`` (at least 1)."""
    return max(1, int(limit) // max(1, int(height), int(width)))


def enlarge_nearest(image, limit: int = PREVIEW_MAX_SIZE):
    """A PIL image enlarged by nearest neighbour by ``preview_factor`` (sharp pixels, no blur): a 64² training
    render becomes 512², viewable in the browser; an image already larger than half the limit is unchanged."""
    from PIL import Image

    k = preview_factor(image.height, image.width, limit)
    if k == 1:
        return image
    return image.resize((image.width * k, image.height * k), Image.NEAREST)


def preview_render_size(height: int, width: int) -> int:
    """Side of the square "preview" output of CSD Optimize: PREVIEW_RENDER_FACTOR × the training render size,
    at most PREVIEW_MAX_SIZE and never below the render size."""
    side = max(int(height), int(width))
    return max(side, min(side * PREVIEW_RENDER_FACTOR, PREVIEW_MAX_SIZE))
