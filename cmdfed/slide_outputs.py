"""The folder a whole-slide inference writes: what ``cmdfed edge infer`` leaves and the
dashboard's slide viewer reads (see ``edge.infer``; the GeoJSON features are written by
``cmdfed.inference.nuclei``, the labels by ``edge.outputs``).

    OUT/summary.json       counts per type, area analysed, model version, backend, timings
    OUT/cells.geojson      QuPath FeatureCollection: one polygon per nucleus, typed
    OUT/labels.ome.zarr    instance labels, NGFF 0.4 (napari)
"""

SUMMARY = "summary.json"
GEOJSON = "cells.geojson"
LABELS_DIR = "labels.ome.zarr"
