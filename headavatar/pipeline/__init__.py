"""One command from video to finished avatar (`headavatar make`), and many of them (`headavatar batch`).

* ``headavatar.pipeline.make.make``: track -> train -> evaluate -> export -> report into one folder,
  each stage resumable (layout.py: the folder and its stage markers; stages.py: the stages, thin
  calls of the library functions the separate commands call; recipe.py: settings per device).
* ``headavatar.pipeline.batch.batch``: the same pipeline per input, as Ray tasks (optional extra
  ``[scale]``) or one after another, with OUT/summary.csv and summary.html.
"""

from headavatar.pipeline.layout import STAGES, Layout

__all__ = ["STAGES", "Layout"]
