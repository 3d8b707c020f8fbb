from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LabelEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_ENCODING_UNSPECIFIED: _ClassVar[LabelEncoding]
    UINT16_LE: _ClassVar[LabelEncoding]
    INT32_LE: _ClassVar[LabelEncoding]
LABEL_ENCODING_UNSPECIFIED: LabelEncoding
UINT16_LE: LabelEncoding
INT32_LE: LabelEncoding

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Tile(_message.Message):
    __slots__ = ("rgb", "height", "width")
    RGB_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    rgb: bytes
    height: int
    width: int
    def __init__(self, rgb: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class SegmentTilesRequest(_message.Message):
    __slots__ = ("tiles", "mpp", "as_scanned")
    TILES_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    AS_SCANNED_FIELD_NUMBER: _ClassVar[int]
    tiles: _containers.RepeatedCompositeFieldContainer[Tile]
    mpp: float
    as_scanned: bool
    def __init__(self, tiles: _Optional[_Iterable[_Union[Tile, _Mapping]]] = ..., mpp: _Optional[float] = ..., as_scanned: _Optional[bool] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class Nucleus(_message.Message):
    __slots__ = ("id", "type", "type_name", "type_probability", "centroid", "area", "contour")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TYPE_NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    CENTROID_FIELD_NUMBER: _ClassVar[int]
    AREA_FIELD_NUMBER: _ClassVar[int]
    CONTOUR_FIELD_NUMBER: _ClassVar[int]
    id: int
    type: int
    type_name: str
    type_probability: float
    centroid: Point
    area: int
    contour: _containers.RepeatedCompositeFieldContainer[Point]
    def __init__(self, id: _Optional[int] = ..., type: _Optional[int] = ..., type_name: _Optional[str] = ..., type_probability: _Optional[float] = ..., centroid: _Optional[_Union[Point, _Mapping]] = ..., area: _Optional[int] = ..., contour: _Optional[_Iterable[_Union[Point, _Mapping]]] = ...) -> None: ...

class TileResult(_message.Message):
    __slots__ = ("height", "width", "encoding", "instances", "nuclei")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    NUCLEI_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    encoding: LabelEncoding
    instances: bytes
    nuclei: _containers.RepeatedCompositeFieldContainer[Nucleus]
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., encoding: _Optional[_Union[LabelEncoding, str]] = ..., instances: _Optional[bytes] = ..., nuclei: _Optional[_Iterable[_Union[Nucleus, _Mapping]]] = ...) -> None: ...

class SegmentTilesResponse(_message.Message):
    __slots__ = ("results", "model_version", "backend")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TileResult]
    model_version: str
    backend: str
    def __init__(self, results: _Optional[_Iterable[_Union[TileResult, _Mapping]]] = ..., model_version: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class SegmentSlideRequest(_message.Message):
    __slots__ = ("path", "out_dir", "batch", "min_tissue", "restart", "mpp", "as_scanned")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OUT_DIR_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    MIN_TISSUE_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    AS_SCANNED_FIELD_NUMBER: _ClassVar[int]
    path: str
    out_dir: str
    batch: int
    min_tissue: float
    restart: bool
    mpp: float
    as_scanned: bool
    def __init__(self, path: _Optional[str] = ..., out_dir: _Optional[str] = ..., batch: _Optional[int] = ..., min_tissue: _Optional[float] = ..., restart: _Optional[bool] = ..., mpp: _Optional[float] = ..., as_scanned: _Optional[bool] = ...) -> None: ...

class SlideSummary(_message.Message):
    __slots__ = ("slide", "model_version", "backend", "tiles", "n_cells", "counts_by_type", "area_analysed_mm2", "summary_json")
    class CountsByTypeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SLIDE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    N_CELLS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_BY_TYPE_FIELD_NUMBER: _ClassVar[int]
    AREA_ANALYSED_MM2_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    slide: str
    model_version: str
    backend: str
    tiles: int
    n_cells: int
    counts_by_type: _containers.ScalarMap[str, int]
    area_analysed_mm2: float
    summary_json: str
    def __init__(self, slide: _Optional[str] = ..., model_version: _Optional[str] = ..., backend: _Optional[str] = ..., tiles: _Optional[int] = ..., n_cells: _Optional[int] = ..., counts_by_type: _Optional[_Mapping[str, int]] = ..., area_analysed_mm2: _Optional[float] = ..., summary_json: _Optional[str] = ...) -> None: ...

class SlideOutputs(_message.Message):
    __slots__ = ("out_dir", "labels", "geojson", "summary")
    OUT_DIR_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GEOJSON_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    out_dir: str
    labels: str
    geojson: str
    summary: str
    def __init__(self, out_dir: _Optional[str] = ..., labels: _Optional[str] = ..., geojson: _Optional[str] = ..., summary: _Optional[str] = ...) -> None: ...

class SlideProgress(_message.Message):
    __slots__ = ("done", "total", "stage", "summary", "outputs")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    stage: str
    summary: SlideSummary
    outputs: SlideOutputs
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ..., stage: _Optional[str] = ..., summary: _Optional[_Union[SlideSummary, _Mapping]] = ..., outputs: _Optional[_Union[SlideOutputs, _Mapping]] = ...) -> None: ...

class InputLimits(_message.Message):
    __slots__ = ("min_side", "max_side", "side_multiple_of", "max_tiles_per_request", "max_message_bytes")
    MIN_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    SIDE_MULTIPLE_OF_FIELD_NUMBER: _ClassVar[int]
    MAX_TILES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    min_side: int
    max_side: int
    side_multiple_of: int
    max_tiles_per_request: int
    max_message_bytes: int
    def __init__(self, min_side: _Optional[int] = ..., max_side: _Optional[int] = ..., side_multiple_of: _Optional[int] = ..., max_tiles_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("model_version", "backend", "device", "precision", "class_names", "tile_size", "overlap", "mpp", "limits", "stain_reference")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    STAIN_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    backend: str
    device: str
    precision: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    tile_size: int
    overlap: int
    mpp: float
    limits: InputLimits
    stain_reference: StainReference
    def __init__(self, model_version: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., tile_size: _Optional[int] = ..., overlap: _Optional[int] = ..., mpp: _Optional[float] = ..., limits: _Optional[_Union[InputLimits, _Mapping]] = ..., stain_reference: _Optional[_Union[StainReference, _Mapping]] = ...) -> None: ...

class StainReference(_message.Message):
    __slots__ = ("hematoxylin", "eosin", "max_concentrations")
    HEMATOXYLIN_FIELD_NUMBER: _ClassVar[int]
    EOSIN_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCENTRATIONS_FIELD_NUMBER: _ClassVar[int]
    hematoxylin: _containers.RepeatedScalarFieldContainer[float]
    eosin: _containers.RepeatedScalarFieldContainer[float]
    max_concentrations: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, hematoxylin: _Optional[_Iterable[float]] = ..., eosin: _Optional[_Iterable[float]] = ..., max_concentrations: _Optional[_Iterable[float]] = ...) -> None: ...
