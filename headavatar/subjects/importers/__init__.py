"""Importers of other tools' data into native subjects (see docs/FORMATS.md).

* ``import_flashavatar``: FlashAvatar's ``dataset/<id>`` + metrical-tracker ``checkpoint/*.frame``.
* ``import_imavatar``: IMavatar / FLARE / PointAvatar sequences with ``flame_params.json``.
"""

from headavatar.subjects.importers.flashavatar import import_flashavatar, load_tracker_frame
from headavatar.subjects.importers.imavatar import import_imavatar

__all__ = ["import_flashavatar", "import_imavatar", "load_tracker_frame"]
