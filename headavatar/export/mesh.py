"""Textured triangle meshes to binary glTF (.glb) and Wavefront OBJ (+ MTL + PNG), with no third-party writer.

``TexturedMesh`` is the generic input: vertices (metres, headavatar's world
space: +y up, the face looking towards +z -- glTF's own axes), faces, one UV
per vertex (split along the UV seams: ``split_uv_seams``), optional normals,
optional texture maps and optional morph targets.

Material mapping (docs/EXPORT.md):

* albedo -> glTF ``baseColorTexture`` (sRGB PNG) / MTL ``map_Kd``;
* roughness -> the G channel of glTF's ``metallicRoughnessTexture`` (metallic
  B = 0: skin and hair are dielectrics) / MTL ``map_Pr`` (PBR extension);
* specular intensity (FLARE's k_o) -> the A channel of that same PNG, read
  through ``KHR_materials_specular``'s ``specularTexture`` (an optional
  extension: viewers without it use glTF's default F0), copied into the
  unused R channel so the map is visible in an image viewer / MTL ``map_Ks``
  (grey).

Morph targets (glb only) are position deltas; the mesh's ``extras.targetNames``
names them (the convention three.js, Blender and Babylon.js read).
"""

from __future__ import annotations

import io
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headavatar.errors import UserError
from headavatar.export.files import png_bytes, write_file

# glTF enums
_FLOAT, _UINT = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP = 9729, 9987, 33071
_GLB_MAGIC, _JSON_CHUNK, _BIN_CHUNK = 0x46546C67, 0x4E4F534A, 0x004E4942


@dataclass
class TexturedMesh:
    vertices: np.ndarray  # [V,3] float32, metres
    faces: np.ndarray  # [F,3] int, counter-clockwise seen from outside
    uvs: np.ndarray | None = None  # [V,2] in [0,1], v = 0 at the bottom of the texture (OBJ convention)
    normals: np.ndarray | None = None  # [V,3] unit
    albedo: np.ndarray | None = None  # [T,T,3] uint8 sRGB
    roughness: np.ndarray | None = None  # [T,T] uint8 (perceptual roughness x 255)
    specular: np.ndarray | None = None  # [T,T] uint8 (specular intensity x 255)
    morph_targets: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (name, [V,3] position deltas)
    name: str = "avatar"
    extras: dict = field(default_factory=dict)  # JSON-able notes kept in the glb (units, source run, frame)
    source_index: np.ndarray | None = None  # [V] vertex of the unsplit source mesh each vertex copies (not written)

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(self.vertices, np.float32)
        self.faces = np.ascontiguousarray(self.faces, np.int64)
        V = self.vertices.shape[0]
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3 or self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError("vertices must be [V,3] and faces [F,3]")
        if self.faces.size and (self.faces.min() < 0 or self.faces.max() >= V):
            raise ValueError("faces index vertices out of range")
        if self.uvs is not None:
            self.uvs = np.ascontiguousarray(self.uvs, np.float32)
            if self.uvs.shape != (V, 2):
                raise ValueError(f"uvs must be [V,2] = [{V},2] (one per vertex: split the seams first), got {self.uvs.shape}")
        if self.normals is not None:
            self.normals = np.ascontiguousarray(self.normals, np.float32)
        for name, d in self.morph_targets:
            if np.shape(d) != (V, 3):
                raise ValueError(f"morph target {name!r} must be [V,3], got {np.shape(d)}")
        if any(t is not None for t in (self.albedo, self.roughness, self.specular)) and self.uvs is None:
            raise ValueError("textures need uvs")

    @property
    def has_pbr_map(self) -> bool:
        return self.roughness is not None or self.specular is not None


# ------------------------------------------------------------------ geometry helpers
UV_MODES = ("auto", "head", "atlas")  # the head model's own UVs when the mesh still has its topology, else a generated atlas


def check_mesh_options(texture_size: int, uv: str) -> None:
    """The mesh export options (``--texture-size``, ``--uv``), checked before any work."""
    if uv not in UV_MODES:
        raise UserError(f"--uv must be one of {', '.join(UV_MODES)} (got {uv!r})")
    if not 16 <= int(texture_size) <= 8192:
        raise UserError(f"--texture-size must lie between 16 and 8192 (got {texture_size})")


def split_uv_seams(faces: np.ndarray, uv_faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One vertex per distinct (position, uv) corner pair.

    faces, uv_faces: [F,3].  Returns (vert_index [V'] into the original
    vertices, uv_index [V'] into the uvs, new faces [F,3] into the V' vertices).
    """
    faces = np.asarray(faces, np.int64)
    uv_faces = np.asarray(uv_faces, np.int64)
    pairs = np.stack([faces.reshape(-1), uv_faces.reshape(-1)], 1)
    uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
    return uniq[:, 0], uniq[:, 1], inv.reshape(faces.shape)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals (numpy; the exporter works on the host)."""
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(norm > 1e-20, n / np.maximum(norm, 1e-20), np.array([0.0, 0.0, 1.0]))
    return n.astype(np.float32)


def uv_texel_samples(uvs: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which triangle (and where in it) each texel centre of a size x size map lies in.

    Returns (face [T,T] int, -1 where no triangle; bary [T,T,3]; covered [T,T] bool).
    Row 0 is the top of the image (v = 1).
    """
    from headavatar.headmodels.procedural_texture import rasterize_uv

    face, bary, _ = rasterize_uv(uvs, faces, size)
    return face, bary, face >= 0


def atlas_uvs(vertices: np.ndarray, faces: np.ndarray, texture_size: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fresh UV atlas for a mesh without usable UVs (xatlas, MIT).

    Returns (vert_index [V'] into the input vertices, uvs [V',2] with v = 0 at the
    bottom, faces [F,3] into the V' vertices).  Charts are padded for
    ``texture_size`` so bilinear filtering does not bleed across them.  Slow on
    large meshes (seconds per 10k faces): it runs once per export.
    """
    try:
        import xatlas
    except ImportError:
        raise UserError("this mesh has no UVs of its own and generating a UV atlas needs xatlas: pip install xatlas") from None
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(faces, np.uint32))
    charts = xatlas.ChartOptions()
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = 2
    pack.bilinear = True
    atlas.generate(charts, pack)
    vmap, idx, uvs = atlas[0]
    # whichever way xatlas orients v, the maps are baked through these same UVs
    return vmap.astype(np.int64), np.asarray(uvs, np.float32), idx.astype(np.int64)


def fill_gutters(img: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Give every uncovered texel the value of the nearest covered one, so that bilinear
    filtering and mip-maps never blend in an undefined background along chart edges."""
    if covered.all() or not covered.any():
        return img
    from scipy.ndimage import distance_transform_edt

    _, (iy, ix) = distance_transform_edt(~covered, return_indices=True)
    return img[iy, ix]


def pbr_map(mesh: TexturedMesh) -> np.ndarray | None:
    """RGBA uint8: R = specular intensity, G = roughness, B = metallic (0), A = specular intensity."""
    if not mesh.has_pbr_map:
        return None
    ref = mesh.roughness if mesh.roughness is not None else mesh.specular
    T = ref.shape[:2]
    rough = mesh.roughness if mesh.roughness is not None else np.full(T, 255, np.uint8)
    spec = mesh.specular if mesh.specular is not None else np.full(T, 255, np.uint8)
    return np.stack([spec, rough, np.zeros(T, np.uint8), spec], -1).astype(np.uint8)


# ------------------------------------------------------------------ glb
class _Bin:
    """The binary chunk under construction: views 4-byte aligned (glTF requires it for floats)."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0
        self.views: list[dict] = []
        self.accessors: list[dict] = []

    def view(self, data: bytes, target: int | None = None) -> int:
        pad = (-self.size) % 4
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad
        v = {"buffer": 0, "byteOffset": self.size, "byteLength": len(data)}
        if target is not None:
            v["target"] = target
        self.parts.append(data)
        self.size += len(data)
        self.views.append(v)
        return len(self.views) - 1

    def accessor(self, arr: np.ndarray, kind: str, target: int | None, bounds: bool = False) -> int:
        comp = _UINT if arr.dtype == np.uint32 else _FLOAT
        arr = np.ascontiguousarray(arr, "<u4" if comp == _UINT else "<f4")
        acc = {"bufferView": self.view(arr.tobytes(), target), "componentType": comp,
               "count": int(arr.shape[0]), "type": kind}
        if bounds and arr.shape[0]:
            acc["min"] = [float(x) for x in arr.reshape(arr.shape[0], -1).min(0)]
            acc["max"] = [float(x) for x in arr.reshape(arr.shape[0], -1).max(0)]
        self.accessors.append(acc)
        return len(self.accessors) - 1

    def blob(self) -> bytes:
        data = b"".join(self.parts)
        return data + b"\0" * ((-len(data)) % 4)


def glb_bytes(mesh: TexturedMesh) -> bytes:
    """The mesh as one self-contained binary glTF 2.0 file (textures embedded)."""
    b = _Bin()
    attrs = {"POSITION": b.accessor(mesh.vertices, "VEC3", _ARRAY_BUFFER, bounds=True)}
    if mesh.normals is not None:
        attrs["NORMAL"] = b.accessor(mesh.normals, "VEC3", _ARRAY_BUFFER)
    if mesh.uvs is not None:
        # glTF puts the texture origin at the top-left: v runs downwards
        attrs["TEXCOORD_0"] = b.accessor(np.stack([mesh.uvs[:, 0], 1.0 - mesh.uvs[:, 1]], 1), "VEC2", _ARRAY_BUFFER)
    prim: dict = {"attributes": attrs, "indices": b.accessor(mesh.faces.reshape(-1).astype(np.uint32), "SCALAR", _ELEMENT_ARRAY_BUFFER), "mode": 4}
    gltf: dict = {"asset": {"version": "2.0", "generator": "headavatar"}, "scene": 0, "scenes": [{"nodes": [0]}],
                  "nodes": [{"mesh": 0, "name": mesh.name}]}
    images, textures = [], []

    def texture(img: np.ndarray) -> int:
        images.append({"bufferView": b.view(png_bytes(img)), "mimeType": "image/png"})
        textures.append({"source": len(images) - 1, "sampler": 0})
        return len(textures) - 1

    material: dict = {"name": f"{mesh.name}_material", "doubleSided": True,
                      "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0}}
    ext_used = []
    if mesh.albedo is not None:
        material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": texture(mesh.albedo)}
    pbr = pbr_map(mesh)
    if pbr is not None:
        t = texture(pbr)
        # metallic = factor x B; B is 0 anyway, the factor 1 keeps the map authoritative
        material["pbrMetallicRoughness"].update({"metallicFactor": 1.0, "metallicRoughnessTexture": {"index": t}})
        if mesh.specular is not None:
            material["extensions"] = {"KHR_materials_specular": {"specularFactor": 1.0, "specularTexture": {"index": t}}}
            ext_used.append("KHR_materials_specular")
    prim["material"] = 0
    gltf["materials"] = [material]
    if textures:
        gltf.update({"images": images, "textures": textures,
                     "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR, "wrapS": _CLAMP, "wrapT": _CLAMP}]})
    gmesh: dict = {"name": mesh.name, "primitives": [prim]}
    if mesh.morph_targets:
        prim["targets"] = [{"POSITION": b.accessor(np.asarray(d, np.float32), "VEC3", _ARRAY_BUFFER, bounds=True)} for _, d in mesh.morph_targets]
        gmesh["weights"] = [0.0] * len(mesh.morph_targets)
        gmesh["extras"] = {"targetNames": [n for n, _ in mesh.morph_targets]}
    gltf["meshes"] = [gmesh]
    if ext_used:
        gltf["extensionsUsed"] = ext_used
    if mesh.extras:
        gltf["asset"]["extras"] = mesh.extras
    blob = b.blob()
    gltf.update({"buffers": [{"byteLength": len(blob)}], "bufferViews": b.views, "accessors": b.accessors})
    js = json.dumps(gltf, separators=(",", ":")).encode("utf-8")
    js += b" " * ((-len(js)) % 4)
    total = 12 + 8 + len(js) + 8 + len(blob)
    return b"".join([struct.pack("<III", _GLB_MAGIC, 2, total), struct.pack("<II", len(js), _JSON_CHUNK), js,
                     struct.pack("<II", len(blob), _BIN_CHUNK), blob])


def write_glb(mesh: TexturedMesh, path: str | os.PathLike) -> Path:
    return write_file(path, glb_bytes(mesh))


# ------------------------------------------------------------------ obj
def write_obj_material(mesh: TexturedMesh, stem: str | os.PathLike) -> list[Path]:
    """STEM.mtl + STEM_albedo.png / _roughness.png / _specular.png (the maps the mesh has)."""
    stem = Path(stem)
    written: list[Path] = []
    maps = {}
    for key, img in (("albedo", mesh.albedo), ("roughness", mesh.roughness), ("specular", mesh.specular)):
        if img is not None:
            p = stem.parent / f"{stem.name}_{key}.png"
            written.append(write_file(p, png_bytes(img)))
            maps[key] = p.name
    mtl = [f"# headavatar material ({mesh.name})", f"newmtl {mesh.name}_material", "Ka 0 0 0", "Kd 1 1 1",
           "Ks 1 1 1" if "specular" in maps else "Ks 0.04 0.04 0.04", "Ns 50", "d 1", "illum 2", "Pm 0"]
    if "albedo" in maps:
        mtl.append(f"map_Kd {maps['albedo']}")
    if "roughness" in maps:
        mtl.append(f"map_Pr {maps['roughness']}")  # the PBR extension of MTL (Blender, trimesh read it)
    if "specular" in maps:
        mtl.append(f"map_Ks {maps['specular']}")
    written.insert(0, write_file(stem.parent / f"{stem.name}.mtl", "\n".join(mtl) + "\n"))
    return written


def write_obj_geometry(mesh: TexturedMesh, path: str | os.PathLike, mtl_name: str | None) -> Path:
    """PATH.obj referencing material file ``mtl_name`` (in the same folder) if given."""
    buf = io.StringIO()
    buf.write(f"# headavatar mesh: {mesh.vertices.shape[0]} vertices, {mesh.faces.shape[0]} faces; metres, +y up\n")
    if mtl_name:
        buf.write(f"mtllib {mtl_name}\n")
    buf.write(f"o {mesh.name}\n")
    np.savetxt(buf, mesh.vertices, fmt="v %.7g %.7g %.7g")
    if mesh.uvs is not None:
        np.savetxt(buf, mesh.uvs, fmt="vt %.7g %.7g")
    if mesh.normals is not None:
        np.savetxt(buf, mesh.normals, fmt="vn %.6g %.6g %.6g")
    if mtl_name:
        buf.write(f"usemtl {mesh.name}_material\n")
    buf.write("s 1\n")
    f1 = mesh.faces + 1  # OBJ counts from 1; uv and normal indices equal the vertex's (seams already split)
    if mesh.uvs is not None and mesh.normals is not None:
        np.savetxt(buf, np.repeat(f1, 3, axis=1), fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    elif mesh.uvs is not None:
        np.savetxt(buf, np.repeat(f1, 2, axis=1), fmt="f %d/%d %d/%d %d/%d")
    elif mesh.normals is not None:
        np.savetxt(buf, np.repeat(f1, 2, axis=1), fmt="f %d//%d %d//%d %d//%d")
    else:
        np.savetxt(buf, f1, fmt="f %d %d %d")
    return write_file(path, buf.getvalue())


def write_obj(mesh: TexturedMesh, path: str | os.PathLike) -> list[Path]:
    """PATH.obj + PATH.mtl + its PNG maps.  OBJ has no morph targets: they are not written (use glb)."""
    path = Path(path)
    material = write_obj_material(mesh, path.with_suffix(""))
    return [write_obj_geometry(mesh, path, material[0].name)] + material


def write_mesh(mesh: TexturedMesh, path: str | os.PathLike, fmt: str | None = None) -> list[Path]:
    """Write ``mesh`` as glb or obj (``fmt`` or the suffix of ``path``)."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if path.suffix.lower() != f".{fmt}":
        raise UserError(f"output {path} must end in .{fmt}")
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass a .{fmt} file name")
    if fmt == "glb":
        return [write_glb(mesh, path)]
    if fmt == "obj":
        return write_obj(mesh, path)
    raise UserError(f"unknown mesh format {fmt!r}; choose glb or obj")


# ------------------------------------------------------------------ head models
def head_model_mesh(head, shape=None, textures: dict | None = None, morph_targets: bool = True, name: str = "head") -> TexturedMesh:
    """A head model's neutral mesh with its own UVs, optional maps and its expression bases as morph targets.

    ``textures``: float maps in [0,1] as ``procedural_textures`` returns them (albedo linear
    RGB, roughness, specular), row 0 = v 1.  Used for the procedural head and as the
    generic path for any mesh whose vertices are the head model's.
    """
    import torch

    from headavatar.lighting.color import linear_to_srgb

    with torch.no_grad():
        s = None if shape is None else torch.as_tensor(shape, dtype=torch.float32).reshape(1, -1).to(head.template)
        verts = head.shaped(s)[0].cpu().numpy()
    vi, ti, faces = split_uv_seams(head.faces.cpu().numpy(), head.uv_faces.cpu().numpy())
    uvs = head.uvs.cpu().numpy()[ti]
    mesh_v = verts[vi]
    normals = vertex_normals(verts, head.faces.cpu().numpy())[vi]  # before the split, so seams stay smooth
    kw = {}
    if textures:
        if "albedo" in textures:
            kw["albedo"] = _to_u8(linear_to_srgb(torch.as_tensor(np.asarray(textures["albedo"], np.float32)).clamp(0, 1)).numpy())
        for key in ("roughness", "specular"):
            if key in textures:
                kw[key] = _to_u8(np.asarray(textures[key], np.float32).reshape(textures[key].shape[:2]))
    targets = []
    if morph_targets and head.num_expression:
        basis = head.expr_basis.detach().cpu().numpy()  # [V,3,E]
        targets = [(head.expression_names[e] if e < len(head.expression_names) else f"expression_{e}", basis[vi, :, e]) for e in range(basis.shape[-1])]
    return TexturedMesh(mesh_v, faces, uvs, normals, morph_targets=targets, name=name, source_index=vi, **kw)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)
