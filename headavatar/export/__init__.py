"""`headavatar export`: a trained avatar to standard files (docs/EXPORT.md).

* FlashAvatar -> ``ply``: 3D Gaussians in the standard 3D Gaussian Splatting layout.
* FLARE -> ``glb`` (textures and expression morph targets embedded) or ``obj``
  (+ MTL + PNG maps): the mesh with baked albedo, roughness and specular maps.

Each for the canonical pose (the default), one tracked frame, or a sequence
of frames (a folder of files).
"""

from __future__ import annotations

from pathlib import Path

from headavatar.errors import UserError

EXPORT_DIR = "export"  # RUN_DIR/export: the default destination
FORMATS = {"flashavatar": ("ply",), "flare": ("glb", "obj")}
_WHAT = {"ply": "3D Gaussians", "glb": "a textured mesh", "obj": "a textured mesh"}
_METHOD_WHAT = {"flashavatar": "FlashAvatar run (3D Gaussians)", "flare": "FLARE run (a mesh)"}


def resolve_format(method: str, fmt: str | None, out) -> str:
    """The format to write: ``fmt``, else the output's suffix, else the method's first format; checked against the method."""
    allowed = FORMATS.get(method)
    if allowed is None:
        raise UserError(f"runs of method '{method}' cannot be exported")
    if fmt is None:
        suffix = Path(out).suffix.lower().lstrip(".")
        fmt = suffix if suffix in _WHAT else allowed[0]
    fmt = fmt.lower()
    if fmt not in _WHAT:
        raise UserError(f"unknown export format '{fmt}'; choose one of: ply, glb, obj")
    if fmt not in allowed:
        raise UserError(f"--format {fmt} holds {_WHAT[fmt]}, but this is a {_METHOD_WHAT.get(method, method)}: use --format {' or '.join(allowed)}")
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
    texture_size, uv, morph_targets: FLARE meshes only (see ``bake_flare_mesh``).
    """
    from headavatar.export.flare_mesh import check_options
    from headavatar.export.frames import parse_frames
    from headavatar.methods import load_avatar
    from headavatar.methods.run import RunDir
    from headavatar.subjects.format import Subject

    info = RunDir(run_dir).read_info()
    # options are checked before the avatar is loaded, so a typo fails at once
    fmt = resolve_format(info.get("method"), format, out if out is not None else "")
    if fmt != "ply":
        check_options(texture_size, uv)
    if out is None:
        out = default_output(run_dir, fmt, frames if not isinstance(frames, (list, tuple)) else ",".join(map(str, frames)))
    sel = parse_frames(frames, Subject.open(info["subject"]))
    avatar = load_avatar(run_dir, device, head_overrides)
    if fmt == "ply":
        from headavatar.export.ply import export_ply

        return export_ply(avatar, out, sel)
    return export_flare_mesh(avatar, out, fmt, sel, texture_size=texture_size, uv=uv, morph_targets=morph_targets)


def export_flare_mesh(avatar, out, fmt: str, frames: None | int | list[int], texture_size: int = 1024, uv: str = "auto",
                      morph_targets: bool = True) -> list[Path]:
    from headavatar.export.files import write_json_file
    from headavatar.export.flare_mesh import bake_flare_mesh, frame_mesh
    from headavatar.export.mesh import write_glb, write_mesh, write_obj_geometry, write_obj_material

    out = Path(out)
    if frames is None or isinstance(frames, int):
        if out.suffix.lower() != f".{fmt}":
            raise UserError(f"output {out} must end in .{fmt}")
        return write_mesh(bake_flare_mesh(avatar, frames, texture_size, uv, morph_targets), out, fmt)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: a sequence is written as a folder of .{fmt} files")
    out.mkdir(parents=True, exist_ok=True)
    base = bake_flare_mesh(avatar, None, texture_size, uv, morph_targets=False)  # maps baked once, shared by every frame
    written: list[Path] = []
    mtl = None
    if fmt == "obj":
        material = write_obj_material(base, out / "material")
        written += material
        mtl = material[0].name
    tr = avatar.subject.tracking
    index = []
    for i in frames:
        m = frame_mesh(base, avatar, i)
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


__all__ = ["export_run", "export_flare_mesh", "resolve_format", "default_output", "report_section", "FORMATS", "EXPORT_DIR"]
