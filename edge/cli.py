"""`cmdfed edge ...`: export, keygen, deploy, rollback, status, infer, serve (arguments only; the work
is in the library modules)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cmdfed.cli import STAIN_NORMALISE, emit, out, progress_bar
from cmdfed.errors import CmdfedError
from edge.bundle import DEFAULT_TILE

if TYPE_CHECKING:
    from cmdfed.inference.postprocess import WatershedParams

commands = typer.Typer(
    help="Edge role: export bundles, deploy them on workstations, run whole slides.", no_args_is_help=True
)

BACKEND_HELP = (
    "Force a backend: tensorrt, onnxruntime-cuda, onnxruntime-cpu (ONNX Runtime's graphs only) or openvino-cpu "
    "(the bf16 variant) (default: the first that works; on the CPU the fastest variant that passed its gate)."
)
TRT_SOURCE = typer.Option("onnx", "--trt-source", help="Build TensorRT engines from onnx or pt2.")
TELEMETRY_HELP = "Telemetry store (SQLite path or postgresql:// URL) to record this in."
# Defaults: HoVer-Net's, scaled to --mpp (WatershedParams.for_mpp); without --mpp, their 40x values.
POSTPROCESS_PANEL = "Post-processing (recorded in the bundle; infer and serve use it)"


def _log_backend_choice() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("cmdfed.edge").setLevel(logging.INFO)


@commands.command("keygen")
def keygen(prefix: Path = typer.Argument(..., help="Writes PREFIX.key (private, keep secret) and PREFIX.pub.")) -> None:
    """Make an ed25519 key pair for signing bundles."""
    from edge.signing import generate_key_pair

    private, public = generate_key_pair(prefix)
    out.print(f"private key: {private} (keep it secret)\npublic key:  {public} (give to workstations as --trust-key)")


@commands.command("export")
def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Fine-tuned run or checkpoint folder."),
    out_path: Path = typer.Option(..., "--out", help="Bundle folder to create (BUNDLE.tar is written beside it)."),
    sign_key: Path | None = typer.Option(None, "--sign-key", help="ed25519 private key to sign the manifest with."),
    tile: int = typer.Option(DEFAULT_TILE, help="Tile side the workstation runs (multiple of 32)."),
    overlap: int = typer.Option(64, help="Tile overlap in pixels: at least the largest nucleus diameter."),
    mpp: float | None = typer.Option(
        None,
        help="Micrometres per pixel the model was trained at (0.5 at 20x; default: what the checkpoint records); "
        "also scales the post-processing.",
    ),
    tolerance: float = typer.Option(1e-3, help="Largest ONNX Runtime vs PyTorch difference accepted."),
    foreground_threshold: float | None = typer.Option(
        None,
        rich_help_panel=POSTPROCESS_PANEL,
        help="Nucleus probability from which a pixel is nucleus, in (0, 1] (default 0.5).",
    ),
    min_object_size: int | None = typer.Option(
        None,
        rich_help_panel=POSTPROCESS_PANEL,
        help="Nuclei and markers with fewer pixels are dropped (default 10 at 40x, scaled to --mpp: 3 at 20x).",
    ),
    sobel_kernel_size: int | None = typer.Option(
        None,
        rich_help_panel=POSTPROCESS_PANEL,
        help="Odd Sobel size, 3..31, for the HV gradients (default 21 at 40x, scaled to --mpp: 11 at 20x).",
    ),
    marker_gradient_threshold: float | None = typer.Option(
        None,
        rich_help_panel=POSTPROCESS_PANEL,
        help="HV gradient from which a pixel is boundary, not marker, in (0, 1) (default 0.4).",
    ),
    marker_opening_size: int | None = typer.Option(
        None,
        rich_help_panel=POSTPROCESS_PANEL,
        help="Diameter of the opening that cleans markers (default 5 at 40x, scaled to --mpp: 3 at 20x).",
    ),
    int8: bool = typer.Option(
        True, help="Add the INT8 variant (static quantisation, gated on golden data and CPM-15 PQ)."
    ),
    calibration: Path | None = typer.Option(
        None,
        help="Folder of H&E images (PNG/JPEG/TIFF, at the model's resolution) to calibrate INT8 on "
        "(default: the bundled CPM-15 training images).",
    ),
    bf16: bool = typer.Option(
        True,
        help="Add the bf16 variant (OpenVINO, gated on golden data and CPM-15 PQ) where the openvino package is "
        "installed and this CPU computes bf16.",
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle."),
    telemetry: str | None = typer.Option(None, help=TELEMETRY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Export a checkpoint to a verified bundle (ONNX + torch.export program + manifest + golden data)."""
    from cmdfed.inference.postprocess import WatershedParams, postprocess_for
    from cmdfed.model.checkpoint import resolve_checkpoint
    from edge.export import check_settings, export_bundle, trained_mpp

    mpp = trained_mpp(checkpoint) if mpp is None else mpp
    if mpp is None:
        out.print(
            "[yellow]no --mpp, and the checkpoint does not record its training resolution: post-processing "
            "uses HoVer-Net's 40x settings; give the resolution the model was trained at (0.5 at 20x)[/]"
        )
    given = {
        "foreground_threshold": foreground_threshold,
        "min_object_size": min_object_size,
        "sobel_kernel_size": sobel_kernel_size,
        "marker_gradient_threshold": marker_gradient_threshold,
        "marker_opening_size": marker_opening_size,
    }
    watershed_params(WatershedParams(), **given)  # every option checked before any work
    check_settings(tile, overlap, tolerance, mpp)
    tuned_or_scaled, _ = postprocess_for(resolve_checkpoint(checkpoint), mpp)  # `cmdfed train tune`'s choice when made
    params = watershed_params(tuned_or_scaled, **given)
    images = calibration_images(calibration) if int8 and calibration is not None else None
    with progress_bar("export") as progress:
        result = export_bundle(
            checkpoint,
            out_path,
            tile=tile,
            overlap=overlap,
            mpp=mpp,
            sign_key=sign_key,
            tolerance=tolerance,
            postprocess=params,
            overwrite=overwrite,
            telemetry=telemetry,
            progress=progress,
            int8=int8,
            calibration=images,
            bf16=bf16,
        )
    emit(
        result,
        as_json,
        lambda r: out.print(
            f"bundle {r['version']}: {r['bundle']} and {r['tar']} ({'signed' if r['signed'] else 'unsigned'}; "
            f"ONNX Runtime vs PyTorch max diff {r['max_abs_diff']:.2g}; {variant_summary('int8', r['int8'])}; "
            f"{variant_summary('bf16', r['bf16'], r['bf16_skipped'])})"
        ),
    )


def calibration_images(folder: Path) -> list:
    """The RGB images of ``folder`` for INT8 calibration; one error naming what is wrong."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise CmdfedError(f"--calibration {folder} is not a folder; give a folder of H&E images")
    images = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff")):
        try:
            images.append(np.asarray(Image.open(path).convert("RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise CmdfedError(f"--calibration: cannot read {path} ({exc}); give PNG, JPEG or TIFF images") from exc
    if not images:
        raise CmdfedError(f"--calibration {folder} has no PNG, JPEG or TIFF images")
    return images


def variant_summary(variant: str, gate: dict | None, why_none: str | None = None) -> str:
    if gate is None:
        return f"no {variant} variant" + (f": {why_none}" if why_none else "")
    verdict = "passed" if gate["passed"] else f"FAILED ({gate['reason']}; workstations will not run it)"
    return f"{variant} gate {verdict}: PQ {gate[f'pq_{variant}']['mean']:.3f} vs fp32 {gate['pq_fp32']['mean']:.3f}"


def watershed_params(base: WatershedParams, **given) -> WatershedParams:
    """``base`` (the checkpoint's tuned settings, else HoVer-Net's scaled to the resolution)
    with the options given; a value it refuses is named by its option."""
    import dataclasses

    from cmdfed.inference.postprocess import WatershedParams

    values = {name: value for name, value in given.items() if value is not None}
    for name, value in values.items():
        try:
            WatershedParams(**{name: value})
        except CmdfedError as exc:
            raise CmdfedError(f"--{name.replace('_', '-')} {value}: {exc}") from exc
    return dataclasses.replace(base, **values)


@commands.command("deploy")
def deploy(
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle folder or .tar."),
    home: Path = typer.Option(..., "--home", help="Edge home folder on this workstation."),
    trust_key: Path | None = typer.Option(
        None,
        "--trust-key",
        help="Publisher's public key; the bundle must be signed by it. A home without a trusted "
        "key trusts this one from now on; a home that has one accepts only a key it already trusts (`edge trust add`).",
    ),
    allow_unsigned: bool = typer.Option(
        False,
        "--allow-unsigned",
        help="Install a bundle without a valid signature by a key this home trusts, or "
        "replace a signed copy with an unchecked one (recorded in HOME/audit.log).",
    ),
    backend: str | None = typer.Option(None, help=BACKEND_HELP),
    trt_source: str = TRT_SOURCE,
    telemetry: str | None = typer.Option(None, help=TELEMETRY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Verify a bundle (signature against the home's trusted keys, checksums), install it, check it
    runs here, and make it the active version."""
    from edge.deploy import deploy as deploy_bundle

    _log_backend_choice()
    with progress_bar("deploy") as progress:
        result = deploy_bundle(
            bundle_path,
            home,
            trust_key=trust_key,
            allow_unsigned=allow_unsigned,
            backend=backend,
            trt_source=trt_source,
            telemetry=telemetry,
            progress=progress,
        )
    emit(
        result,
        as_json,
        lambda r: out.print(
            f"active: {r['active']} (previous: {', '.join(r['history']) or 'none'}); backend {r['backend']['backend']}"
        ),
    )


@commands.command("rollback")
def rollback(
    home: Path = typer.Option(..., "--home", help="Edge home folder."),
    allow_unsigned: bool = typer.Option(
        False,
        "--allow-unsigned",
        help="Roll back to a version not signed by a key this home trusts (recorded in HOME/audit.log).",
    ),
    telemetry: str | None = typer.Option(None, help=TELEMETRY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Make the previous version active again (checked like a deploy)."""
    from edge.deploy import rollback as rollback_home

    result = rollback_home(home, allow_unsigned=allow_unsigned, telemetry=telemetry)
    emit(result, as_json, lambda r: out.print(f"active: {r['active']} (rolled back from {r['rolled_back_from']})"))


@commands.command("status")
def status(
    home: Path = typer.Option(..., "--home", help="Edge home folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Active version, previous versions, checksums, signature (checked now against the home's
    trusted keys) and cached engines."""
    from edge.deploy import status as home_status

    result = home_status(home)
    emit(
        result,
        as_json,
        lambda r: out.print(
            f"active: {r['active']} ({'intact' if r['intact'] else 'FAILED: ' + str(r['problem'])}; "
            f"signature: {r['signature']}); previous: {', '.join(r['previous']) or 'none'}; "
            f"engines cached: {len(r['engines'])}; "
            + "; ".join(variant_summary(name, gate) for name, gate in r["variants"].items())
            + "".join(
                f"; {c['for']} runs {c['chosen']} on the CPU ({c['threads']} threads, timed {c['timed_at']})"
                for c in r["cpu_graph_choices"]
            )
        ),
    )


trust_commands = typer.Typer(
    help="The publishers' keys this edge home trusts: once it trusts one, every deploy must be signed by a "
    "trusted key.",
    no_args_is_help=True,
)
commands.add_typer(trust_commands, name="trust")


@trust_commands.command("add")
def trust_add(
    key: Path = typer.Argument(..., help="The publisher's public key (the .pub file `cmdfed edge keygen` wrote)."),
    home: Path = typer.Option(..., "--home", help="Edge home folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Trust a publisher's key in this home (recorded in HOME/audit.log)."""
    from edge.deploy import add_trusted_key

    result = add_trusted_key(home, key)
    emit(
        result,
        as_json,
        lambda r: out.print(
            f"{'now trusts' if r['added'] else 'already trusted'} key {r['key_id']}; trusted: "
            + ", ".join(k["key_id"] for k in r["trusted"])
        ),
    )


@trust_commands.command("list")
def trust_list(
    home: Path = typer.Option(..., "--home", help="Edge home folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The keys this home trusts, with when and how each was added."""
    from edge.trust import describe

    keys = describe(home)
    emit(
        {"trusted": keys},
        as_json,
        lambda r: out.print(
            "\n".join(f"{k['key_id']}  added {k['added_at']} ({k['how']})" for k in r["trusted"])
            or "no trusted key: this home deploys unsigned bundles (`cmdfed edge trust add KEY` to require signatures)"
        ),
    )


@trust_commands.command("remove")
def trust_remove(
    key_id: str = typer.Argument(..., help="Key id, as `edge trust list` shows it."),
    home: Path = typer.Option(..., "--home", help="Edge home folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Stop trusting a key (not the last one: add its replacement first; recorded in HOME/audit.log)."""
    from edge.deploy import remove_trusted_key

    result = remove_trusted_key(home, key_id)
    emit(
        result,
        as_json,
        lambda r: out.print(f"removed {r['removed']}; trusted: " + ", ".join(k["key_id"] for k in r["trusted"])),
    )


# Where a workstation reports (edge.reports), shared by infer and serve.
REPORT_TO = typer.Option(
    None, "--report-to", help="Send telemetry to the federation's telemetry server at HOST:PORT instead of --telemetry."
)
REPORT_TOKEN = typer.Option(
    None, "--report-token", help="File with this workstation's token (`cmdfed server telemetry add-workstation`)."
)
REPORT_CA = typer.Option(
    None, "--report-ca", help="The federation CA certificate (`cmdfed certs init`'s ca.crt): report over HTTPS."
)
REPORT_INSECURE = typer.Option(False, "--report-insecure", help="Allow a non-loopback --report-to without TLS.")
RETIME_VARIANTS = typer.Option(
    False,
    "--retime-variants",
    help="Time the bundle's CPU graphs (fp32, int8, bf16) again instead of reusing the choice kept in the home "
    "(it is kept per bundle, CPU, threads and runtime versions, and redone when any of them changes).",
)


@commands.command("infer")
def infer(
    slide: Path = typer.Argument(..., help="Whole-slide image (SVS, NDPI, MRXS, TIFF) or plain image."),
    home: Path = typer.Option(..., "--home", help="Edge home folder with an active model."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (rerun with the same folder to resume)."),
    backend: str | None = typer.Option(None, help=BACKEND_HELP),
    batch: int | None = typer.Option(
        None, help="Tiles per forward pass (default: 8 of 256 px, 2 of 512 px: the same pixels per pass)."
    ),
    min_tissue: float = typer.Option(0.1, help="Skip tiles with less tissue than this fraction."),
    threads: int | None = typer.Option(None, help="CPU threads for ONNX Runtime (default: all available)."),
    trt_source: str = TRT_SOURCE,
    restart: bool = typer.Option(False, help="Discard earlier results in --out and start again."),
    retime_variants: bool = RETIME_VARIANTS,
    mpp: float | None = typer.Option(
        None,
        help="The slide's micrometres per pixel (0.25 at 40x, 0.5 at 20x) when its file does not record it; "
        "the model reads it resampled to its own.",
    ),
    stain_normalise: bool = STAIN_NORMALISE,
    telemetry: str | None = typer.Option(None, help=TELEMETRY_HELP + " The slide's summary goes there."),
    report_to: str | None = REPORT_TO,
    report_token: Path | None = REPORT_TOKEN,
    report_ca: Path | None = REPORT_CA,
    report_insecure: bool = REPORT_INSECURE,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Segment and classify every nucleus of a slide: OME-Zarr labels, QuPath GeoJSON, summary.json."""
    from edge.infer import infer_slide
    from edge.reports import open_reports

    _log_backend_choice()
    reports = open_reports(telemetry, report_to, report_token, report_ca, report_insecure)
    try:
        with progress_bar(f"infer {slide.name}") as progress:
            summary = infer_slide(
                slide,
                home,
                out_dir,
                backend=backend,
                batch=batch,
                min_tissue=min_tissue,
                restart=restart,
                threads=threads,
                trt_source=trt_source,
                mpp=mpp,
                retime_variants=retime_variants,
                stain_normalise=stain_normalise,
                telemetry=reports,
                progress=progress,
            )
    finally:
        if reports is not None:
            reports.close()  # a remote reporter sends what is queued before the command ends
    emit(
        summary,
        as_json,
        lambda s: out.print(
            f"{s['n_cells']} nuclei in {s['area_analysed_mm2'] or s['area_analysed_px']} "
            f"{'mm2' if s['area_analysed_mm2'] else 'px'} with {s['backend']['backend']}: "
            + ", ".join(f"{k} {v}" for k, v in s["counts_by_type"].items())
            + f" -> {out_dir}"
        ),
    )


@commands.command("serve")
def serve(
    home: Path = typer.Option(..., "--home", help="Edge home folder with an active model."),
    port: int = typer.Option(..., "--port", help="gRPC port."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="Serve Prometheus metrics on this port."),
    metrics_host: str = typer.Option(
        "127.0.0.1", help="Address the metrics listen on (0.0.0.0 for a Prometheus on another machine)."
    ),
    telemetry: str | None = typer.Option(None, help=TELEMETRY_HELP + " Heartbeats and slide summaries go there."),
    report_to: str | None = REPORT_TO,
    report_token: Path | None = REPORT_TOKEN,
    report_ca: Path | None = REPORT_CA,
    report_insecure: bool = REPORT_INSECURE,
    heartbeat: float = typer.Option(60.0, help="Seconds between telemetry heartbeats."),
    max_tiles: int = typer.Option(
        16, help="Most tiles accepted in one SegmentTiles request (fewer if --max-memory needs)."
    ),
    max_memory: str | None = typer.Option(
        None,
        "--max-memory",
        help="Memory the service may use, e.g. 4G or 1500M "
        "(default: half the machine's); the largest request it accepts is derived from it.",
    ),
    workers: int = typer.Option(8, help="Calls served at once."),
    backend: str | None = typer.Option(None, help=BACKEND_HELP),
    threads: int | None = typer.Option(None, help="CPU threads for ONNX Runtime (default: all available)."),
    trt_source: str = TRT_SOURCE,
    retime_variants: bool = RETIME_VARIANTS,
) -> None:
    """Serve the active model over gRPC (SegmentTiles, SegmentSlide, ModelInfo, health) until SIGTERM."""
    from edge.memory import parse_size
    from edge.reports import open_reports
    from edge.service import EdgeService

    budget = None if max_memory is None else parse_size(max_memory)
    _log_backend_choice()
    reports = open_reports(telemetry, report_to, report_token, report_ca, report_insecure)
    service = EdgeService(
        home,
        port=port,
        host=host,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        telemetry=reports,
        heartbeat_s=heartbeat,
        max_tiles=max_tiles,
        workers=workers,
        backend=backend,
        threads=threads,
        trt_source=trt_source,
        max_memory=budget,
        retime_variants=retime_variants,
    )
    metrics = "" if service.metrics_port is None else f", metrics on {metrics_host}:{service.metrics_port}"
    out.print(f"serving {service.version} ({service.selection.backend.name}) on {host}:{service.port}{metrics}")
    service.serve_until_signalled()
