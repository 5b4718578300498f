"""`headavatar relight` on the command line: argument definitions (no heavy imports, so --help stays
instant) and the handler, which hands the work to ``headavatar.methods.flare.relight``.
headavatar/cli/main.py wires them, as it does subject_cmd.py's."""

from __future__ import annotations


def add_relight_arguments(p) -> None:
    """Arguments of `headavatar relight RUN_DIR --envmap MAP.hdr -o OUT.mp4`."""
    p.add_argument("run", help="FLARE run folder")
    p.add_argument("--envmap", required=True, help="lat-long HDR environment map (.hdr or .exr), or 'sky' for the built-in procedural sky")
    p.add_argument("-o", "--output", required=True, help="output video (.mp4); intrinsic images go beside it (OUT_intrinsics.mp4, OUT_intrinsics/)")
    p.add_argument("--frames", default="all", help="all (default), train or test")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--env-size", type=int, default=256, help="cube-map face size for prefiltering (power of two; 512 as the reference, slower)")
    p.add_argument("--tonemap", default="reinhard", help="reinhard (the reference: x/(1+x), x2) or none (raw HDR, x2)")
    p.add_argument("--exposure", type=float, default=0.0, help="stops applied to the map before the tone map")
    p.add_argument("--rotate", type=float, default=0.0, help="turn the map about the vertical axis (degrees)")
    p.add_argument("--spin", type=float, default=0.0, help="degrees the map turns over the clip (a rotating light)")
    p.add_argument("--background", default="env", help="env (the map behind the head, default), white, black or grey")
    p.add_argument("--light-frame", default="world", help="world (default: the map is fixed in the room) or head (it turns with the head)")
    p.add_argument("--no-intrinsics", action="store_true", help="only the relit video")
    p.add_argument("--calibrate", default="auto",
                   help="exposure calibration of the learnt materials against the capture light: auto (the subject's recorded capture light "
                        "when it has one, as synthetic subjects do; else none), none, subject (require it), or a lat-long .hdr/.exr light "
                        "probe of the capture environment (docs/RELIGHTING.md)")


def relight_command(args) -> int:
    from headavatar.log import get_logger
    from headavatar.methods.flare.relight import relight_run

    res = relight_run(args.run, args.envmap, args.output, device=args.device, frames=args.frames, batch_size=args.batch_size,
                      env_size=args.env_size, tonemap=args.tonemap, exposure=args.exposure, rotation=args.rotate, spin=args.spin,
                      background=args.background, intrinsics=not args.no_intrinsics, light_frame=args.light_frame,
                      head_overrides={"dir": args.flame_dir} if getattr(args, "flame_dir", None) else None, calibrate=args.calibrate)
    k = res.get("exposure_scale")
    log = get_logger(__name__)
    log.info(f"wrote {res['frames']} relit frames to {res['video']}"
             + (f" (materials calibrated to the capture light: x{k[0]:.3f}, x{k[1]:.3f}, x{k[2]:.3f})" if k else " (uncalibrated exposure)"))
    if "intrinsics_video" in res:
        log.info(f"intrinsic images: {res['intrinsics_video']} ({res['intrinsics_layout']}) and {res['intrinsics_folder']}/")
    return 0
