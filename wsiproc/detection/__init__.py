"""From a slide to nucleus centroids: the tile grid (`tiling`), the tissue mask (`tissue`), the network (`model`,
`architectures`), the engines that run it (`engines`, `inference`), confidence → nuclei (`postprocess`), tiles →
one slide (`stitch`), the result type (`detections`) and the loop that drives them (`loop`).

TensorFlow and OpenVINO are imported only inside the functions that build, load or run a network.
"""
