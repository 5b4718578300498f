"""headavatar: monocular video -> animatable 3D head avatars (FlashAvatar, FLARE)."""

__version__ = "0.1.0"
