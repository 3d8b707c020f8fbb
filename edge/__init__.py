"""cmdfed edge role: what runs on a scanner workstation.

    checkpoint --export--> bundle (ONNX + torch.export program + manifest + golden data,
                           checksummed, optionally ed25519-signed; a folder and a .tar)
    bundle --deploy--> HOME/models/<version>/, verified before anything is written,
                       activated atomically, the previous version kept for rollback
    HOME --backends--> TensorRT engine (built here, for this GPU) > ONNX Runtime CUDA
                       > ONNX Runtime CPU, each validated on the bundle's golden data
    slide --infer--> OME-Zarr instance labels, QuPath GeoJSON, summary.json (resumable)

Modules: ``export`` (checkpoint -> bundle), ``graph`` (the exported network),
``trt_ops`` (TensorRT ONNX-parser allow-list), ``bundle`` (manifest, checksums,
verification), ``signing`` (ed25519 keys and signatures), ``deploy`` (install, activate,
rollback, status), ``backends`` and ``tensorrt`` (runtimes), ``stitch`` (which tile owns a
nucleus), ``infer`` (whole-slide inference), ``outputs`` (GeoJSON, OME-Zarr), ``cli``.
"""
