"""wsiproc: find every cell nucleus in H&E whole-slide images (Valkonen et al.'s detector, made a product)."""
__version__ = "0.1.0"
