"""From a slide to nucleus centroids: the tile grid (`tiling`), the tissue mask (`tissue`), the tile iterator
(`tiles`: plan, read with halo, batch), the network (`model`, `architectures`, `forward`) and the files beside it
(`model_files`), the engines that run it (`engines`, `inference`), confidence → nuclei (`postprocess`), tiles →
one slide (`stitch`), the result type (`detections`), the loop that drives them (`loop`; `images` for annotated
crops) and the parameters it reads (`params`).

TensorFlow and OpenVINO are imported only inside the functions that build, load or run a network.

Grids and units, as names say them: `*_model_px` / `model_mpp` is the network's 0.5 µm/px grid (tiles, halos,
confidence maps), `*_level0_px` / `level0_mpp` the slide's full-resolution grid (every output coordinate),
`*_um` micrometres; `DetectionParams.mpp` is only the user's override of the slide's stored pixel size. Coordinates are
pixel indices (the centre of pixel (0, 0) is (0, 0)). The tile grid and the samplers go row first
(`y0, x0, height, width`, as numpy indexes); the two thin wrappers of outside libraries keep theirs:
`Slide.read_level` OpenSlide's `x, y, width, height`, `resample_box` Pillow's `(x0, y0, x1, y1)` box and `(w, h)` size.
"""
