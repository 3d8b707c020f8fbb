"""Importers from public nuclei datasets, in their on-disk formats, into cmdfed site stores.

Every importer has the signature::

    import_<format>(source_path, store_path, *, tile_size=256, overlap=0, overwrite=False,
                    progress=None, **format_options) -> StoreInfo

and builds the store beside the target, renaming it into place only when complete.
``IMPORTERS`` maps the format names the CLI accepts (``cmdfed data import FORMAT SRC STORE``)
to these functions. Each module's docstring describes its format and where that knowledge
comes from.
"""

from __future__ import annotations

from collections.abc import Callable

from cmdfed.data.importers.consep import import_consep
from cmdfed.data.importers.folder import import_folder
from cmdfed.data.importers.lizard import import_lizard
from cmdfed.data.importers.monuseg import import_monuseg
from cmdfed.data.importers.pannuke import import_pannuke
from cmdfed.data.store import StoreInfo

IMPORTERS: dict[str, Callable[..., StoreInfo]] = {
    "pannuke": import_pannuke,
    "consep": import_consep,
    "monuseg": import_monuseg,
    "lizard": import_lizard,
    "folder": import_folder,
}

__all__ = [
    "IMPORTERS",
    "import_consep",
    "import_folder",
    "import_lizard",
    "import_monuseg",
    "import_pannuke",
]
