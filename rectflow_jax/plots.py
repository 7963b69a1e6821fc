"""Pictures people would rather look at than read: sample grids and 2-D flow plots."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from rectflow_jax import storage


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """(N, H, W, C) in [-1, 1] -> one (rows*H, cols*W, 3) uint8 grid."""
    images = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = image
    return grid


def save_png(array: np.ndarray, path: str | Path) -> Path:
    buffer = io.BytesIO()  # PIL opens only local files: encode here, write through storage (local or gs://)
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    target = storage.path(path)
    target.write_bytes(buffer.getvalue())
    return target


def _figure_to_array(fig) -> np.ndarray:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def trajectory_figure(trajectory: np.ndarray, data: np.ndarray | None = None, *, title: str = "",
                      max_paths: int = 300) -> np.ndarray:
    """2-D flow as the seeds draw it: source (blue), paths (grey), outputs (red), data (green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trajectory = np.asarray(trajectory)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if data is not None:
        ax.scatter(data[:, 0], data[:, 1], s=2, c="tab:green", alpha=0.25, label=r"$\pi_1$ data")
    paths = trajectory[:, :max_paths]
    ax.plot(paths[..., 0], paths[..., 1], c="grey", lw=0.4, alpha=0.5)
    ax.scatter(trajectory[0, :, 0], trajectory[0, :, 1], s=2, c="tab:blue", alpha=0.5, label=r"$X_0$")
    ax.scatter(trajectory[-1, :, 0], trajectory[-1, :, 1], s=2, c="tab:red", alpha=0.5, label=r"$X_1$")
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=7, markerscale=3)
    image = _figure_to_array(fig)
    plt.close(fig)
    return image


def scatter_figure(points: np.ndarray, data: np.ndarray | None = None, *, title: str = "") -> np.ndarray:
    """Generated 2-D samples (red) over data (green)."""
    return trajectory_figure(np.asarray(points)[None], data, title=title, max_paths=0)
