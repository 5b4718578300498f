"""`headavatar export`: a trained avatar to standard files (docs/EXPORT.md).

What an avatar can be written as follows from its capabilities (headavatar.methods.avatar):

* Gaussians (FlashAvatar) -> ``ply``: 3D Gaussians in the standard 3D Gaussian Splatting layout.
* a textured mesh (FLARE) -> ``glb`` (textures and expression morph targets embedded) or ``obj``
  (+ MTL + PNG maps): the mesh with baked albedo, roughness and specular maps.

Each for the canonical pose (the default), one tracked frame, or a sequence
of frames (a folder of files).
"""

from __future__ import annotations

from pathlib import Path

from headavatar.errors import UserError
from headavatar.methods.avatar import GAUSSIANS, MESH

EXPORT_DIR = "export"  # RUN_DIR/export: the default destination
# what each capability of an avatar (headavatar.methods.avatar) can be written as
CAPABILITY_FORMATS = {GAUSSIANS: ("ply",), MESH: ("glb", "obj")}
_WHAT = {"ply": "3D Gaussians", "glb": "a textured mesh", "obj": "a textured mesh"}


def method_formats(method_cls) -> tuple[str, ...]:
    """The formats a method's avatars export to, from its capabilities (first = the default)."""
    caps = getattr(method_cls, "capabilities", frozenset())
    return tuple(f for cap in (GAUSSIANS, MESH) if cap in caps for f in CAPABILITY_FORMATS[cap])


def resolve_format(method: str, fmt: str | None, out) -> str:
    """The format to write: ``fmt``, else the output's suffix, else the method's first format; checked against the method."""
    from headavatar.methods import get_method

    cls = get_method(method)
    allowed = method_formats(cls)
    if not allowed:
        raise UserError(f"runs of method '{method}' cannot be exported")
    if fmt is None:
        suffix = Path(out).suffix.lower().lstrip(".")
        fmt = suffix if suffix in _WHAT else allowed[0]
    fmt = fmt.lower()
    if fmt not in _WHAT:
        raise UserError(f"unknown export format '{fmt}'; choose one of: ply, glb, obj")
    if fmt not in allowed:
        raise UserError(f"--format {fmt} holds {_WHAT[fmt]}, but this is a {getattr(cls, 'describe', method + ' run')}: use --format {' or '.join(allowed)}")
    return fmt


def default_output(run_dir, fmt: str, frames=None) -> Path:
    """Where ``headavatar export`` writes without -o: RUN_DIR/export/ (the report links what is there)."""
    root = Path(run_dir) / EXPORT_DIR
    if frames is None or frames == "canonical":
        return root / f"canonical.{fmt}"
    s = str(frames).strip()
    if s.isdigit():
        return root / f"frame_{int(s):06d}.{fmt}"
    return root / f"{fmt}_{s.replace(',', '_')}"


def export_run(run_dir, out=None, format: str | None = None, frames=None, device="cpu", texture_size: int = 1024, uv: str = "auto",
               morph_targets: bool = True, head_overrides: dict | None = None) -> list[Path]:
    """Export a trained run; returns the files written.

    out: the file (or, for several frames, the folder) to write; None: ``default_output``.
    frames: None / "canonical" (neutral pose), a frame index (one file at ``out``), or
    "all" / "train" / "test" / a list of indices (``out`` is a folder, one file per frame).
    texture_size, uv, morph_targets: meshes only (see ``headavatar.methods.avatar.MeshAvatar``).
    """
    from headavatar.export.frames import parse_frames
    from headavatar.export.mesh import check_mesh_options
    from headavatar.methods import load_avatar
    from headavatar.methods.run import RunDir
    from headavatar.subjects.format import Subject

    info = RunDir(run_dir).read_info()
    # options are checked before the avatar is loaded, so a typo fails at once
    fmt = resolve_format(info.get("method"), format, out if out is not None else "")
    if fmt != "ply":
        check_mesh_options(texture_size, uv)
    if out is None:
        out = default_output(run_dir, fmt, frames if not isinstance(frames, (list, tuple)) else ",".join(map(str, frames)))
    sel = parse_frames(frames, Subject.open(info["subject"]))
    avatar = load_avatar(run_dir, device, head_overrides)
    if fmt == "ply":
        from headavatar.export.ply import export_ply

        return export_ply(avatar, out, sel)
    return export_mesh(avatar, out, fmt, sel, texture_size=texture_size, uv=uv, morph_targets=morph_targets)


def export_mesh(avatar, out, fmt: str, frames: None | int | list[int], texture_size: int = 1024, uv: str = "auto",
                morph_targets: bool = True) -> list[Path]:
    """Write an avatar with the MESH capability: canonical (frames None), one tracked frame (an int) or a sequence (a folder)."""
    import dataclasses

    from headavatar.export.files import write_json_file
    from headavatar.export.frames import frame_params
    from headavatar.export.mesh import write_glb, write_mesh, write_obj_geometry, write_obj_material

    if MESH not in avatar.capabilities:
        raise UserError(f"--format {fmt} holds a textured mesh: {avatar.run.root} is a '{avatar.method}' run without one")
    out = Path(out)
    if frames is None or isinstance(frames, int):
        if out.suffix.lower() != f".{fmt}":
            raise UserError(f"output {out} must end in .{fmt}")
        mesh = avatar.textured_mesh(None if frames is None else frame_params(avatar, frames), texture_size, uv, morph_targets)
        if frames is not None:
            mesh = dataclasses.replace(mesh, extras={**mesh.extras, "frame": int(frames)})
        return write_mesh(mesh, out, fmt)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: a sequence is written as a folder of .{fmt} files")
    out.mkdir(parents=True, exist_ok=True)
    base = avatar.textured_mesh(None, texture_size, uv, morph_targets=False)  # maps baked once, shared by every frame
    written: list[Path] = []
    mtl = None
    if fmt == "obj":
        material = write_obj_material(base, out / "material")
        written += material
        mtl = material[0].name
    tr = avatar.subject.tracking
    index = []
    for i in frames:
        m = avatar.posed_mesh(base, frame_params(avatar, i))
        m = dataclasses.replace(m, extras={**m.extras, "frame": int(i)})
        p = out / f"frame_{i:06d}.{fmt}"
        written.append(write_glb(m, p) if fmt == "glb" else write_obj_geometry(m, p, mtl))
        index.append({"frame": i, "file": p.name, "time": float(tr.timestamps[i])})
    written.append(write_json_file(out / "frames.json", {"format": fmt, "fps": avatar.subject.fps, "frames": index}))
    return written


def report_section(run_dir) -> tuple[str, str] | None:
    """("Exports", HTML list linking RUN_DIR/export/*) for report.html, or None when nothing was exported there."""
    import html

    root = Path(run_dir) / EXPORT_DIR
    if not root.is_dir():
        return None
    items = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue  # an interrupted write's temporary file
        rel = f"{EXPORT_DIR}/{p.name}"
        if p.is_dir():
            n = len([q for q in p.iterdir() if q.suffix in (".ply", ".glb", ".obj")])
            items.append(f"<li><a href='{html.escape(rel)}/'>{html.escape(p.name)}/</a> ({n} frames)</li>")
        elif p.suffix in (".ply", ".glb", ".obj"):
            items.append(f"<li><a href='{html.escape(rel)}'>{html.escape(p.name)}</a> ({p.stat().st_size / 1e6:.1f} MB)</li>")
    if not items:
        return None
    body = ("<p>Exported files (docs/EXPORT.md): .ply opens in 3D Gaussian Splatting viewers, .glb/.obj in Blender and game engines. "
            "Live viewer: <code>headavatar view " + html.escape(str(run_dir)) + "</code>.</p><ul>" + "".join(items) + "</ul>")
    return "Exports", body


__all__ = ["export_run", "export_mesh", "resolve_format", "method_formats", "default_output", "report_section", "CAPABILITY_FORMATS", "EXPORT_DIR"]
