"""The one path from pixels to nuclei, shared by evaluation, `cmdfed predict` and the edge.

    tiling.py       where tiles are cut (one grid) and which tile keeps a seam nucleus
    tissue.py       where the tissue is on a thumbnail (slides' tiles, INT8 calibration)
    stain.py        an image re-stained as the model's training images (Macenko), before
                    the model, when its checkpoint records their stains
    segment.py      image -> NP/HV/NC maps (PyTorch; sliding windows for large images)
                    -> instances; `cmdfed predict`
    postprocess.py  maps -> instance map: HoVer-Net's watershed and its WatershedParams
    nuclei.py       instance map -> per-nucleus records (centroid, contour, type) and
                    their QuPath GeoJSON features; the +0.5 pixel-centre rule

The edge swaps segment.py's PyTorch forward for ONNX Runtime / TensorRT (edge.backends)
and uses the rest as it is. Nothing here imports ``cmdfed.evaluate``, which only scores.
"""
