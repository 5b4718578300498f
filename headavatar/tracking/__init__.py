"""From a monocular head video to a subject: decoding, crop, landmarks, matte, parsing, fitting, overlay.

Heavy dependencies (PyAV, MediaPipe, onnxruntime) are imported where they
are used, so importing this package stays cheap.
"""

from headavatar.tracking.pipeline import track_video

__all__ = ["track_video"]
