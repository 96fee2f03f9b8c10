"""Pictures of what the encoder's layers hold.

- `pca.py`: `pca_rgb(patch_tokens (B, N, D), grid) -> (B, h, w, 3)`, one shared basis.
- `attention.py`: CLS / MAP-head / mean-received attention maps and attention rollout.
- `similarity.py`: cosine similarity of one patch to every patch; points to patches.
- `overlays.py`: coloured patch maps blended over images, patch boxes.
- `figures.py`: matplotlib (Agg) rendering and atomic PNG saving.
- `images.py`: loading images and preparing encoder input (fixed or native resolution).
- `pictures.py`: image files to PNG in one call (`write_{pca,attention,similarity}_picture`).
"""

from .attention import (
    ATTENTION_QUERIES,
    attention_rollout,
    cls_attention,
    map_head_attention,
    mean_received_attention,
    query_maps,
    resolve_query,
)
from .figures import attention_figure, figure_size_px, pca_figure, render_grid, save_figure, similarity_figure
from .images import load_image, prepare_images, prepare_native_images
from .overlays import heat_overlay, mark_patch
from .pca import PcaBasis, fit_pca_basis, pca_rgb
from .pictures import RESOLUTIONS, write_attention_picture, write_pca_picture, write_similarity_picture
from .similarity import patch_at_point, patch_index, patch_similarity, point_in_processed_image, similarity_maps

__all__ = [
    "ATTENTION_QUERIES",
    "RESOLUTIONS",
    "PcaBasis",
    "attention_figure",
    "attention_rollout",
    "cls_attention",
    "figure_size_px",
    "fit_pca_basis",
    "heat_overlay",
    "load_image",
    "map_head_attention",
    "mark_patch",
    "mean_received_attention",
    "patch_at_point",
    "patch_index",
    "patch_similarity",
    "pca_figure",
    "pca_rgb",
    "point_in_processed_image",
    "prepare_images",
    "prepare_native_images",
    "query_maps",
    "render_grid",
    "resolve_query",
    "save_figure",
    "similarity_figure",
    "similarity_maps",
    "write_attention_picture",
    "write_pca_picture",
    "write_similarity_picture",
]
