"""Renderers: 3D Gaussian splatting and triangle meshes, each a pure-PyTorch reference plus optional fast GPU backends."""
