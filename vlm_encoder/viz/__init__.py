"""Pictures of what the encoder's layers hold.

- `pca.py`: `pca_rgb(patch_tokens (B, N, D), grid) -> (B, h, w, 3)`, one shared basis.
- `figures.py`: matplotlib (Agg) rendering and atomic PNG saving.
- `images.py`: loading images and preparing encoder input.
- `pictures.py`: image files to PNG in one call (`write_pca_picture`).
"""

from .figures import figure_size_px, pca_figure, render_grid, save_figure
from .images import load_image, prepare_images
from .pca import PcaBasis, fit_pca_basis, pca_rgb
from .pictures import write_pca_picture

__all__ = [
    "PcaBasis",
    "figure_size_px",
    "fit_pca_basis",
    "load_image",
    "pca_figure",
    "pca_rgb",
    "prepare_images",
    "render_grid",
    "save_figure",
    "write_pca_picture",
]
