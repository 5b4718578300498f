"""``headavatar subject ...``: tools on subject folders (kept apart from main.py to keep it small)."""

from __future__ import annotations

import argparse


def add_subject_parser(sub) -> None:
    sp = sub.add_parser("subject", help="subject folder tools: compact storage")
    ssub = sp.add_subparsers(dest="subject_command")
    c = ssub.add_parser("compact", help="rewrite a subject with its frames in compact video chunks (about 6x smaller)")
    c.add_argument("input", help="subject folder to read (left unchanged)")
    c.add_argument("-o", "--output", required=True, help="subject folder to write")
    c.add_argument("--crf", type=int, default=None, help="H.264 constant quality of the images (default: a compact input's own, else 16; lower = larger)")
    c.add_argument("--chunk-frames", type=int, default=None,
                   help="frames per chunk (default: a compact input's own, else 16); longer chunks are smaller (e.g. 64 to move a long clip), "
                        "random reads slower. A compact input kept at its own quality and chunk length is copied, not encoded again")
    c.add_argument("--lean", action="store_true", help="leave out the tracking overlay video and the dense landmarks (training does not read them)")
    c.add_argument("--overwrite", action="store_true")
    e = ssub.add_parser("expand", help="rewrite a compact subject with one image file per frame")
    e.add_argument("input")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--image-format", default="jpg", choices=["jpg", "png"])
    e.add_argument("--overwrite", action="store_true")


def cmd_subject(args: argparse.Namespace) -> int:
    from headavatar.errors import UserError
    from headavatar.subjects.chunks import DEFAULT_CRF
    from headavatar.subjects.convert import convert_subject

    if args.subject_command == "compact":
        if args.crf is not None and not 0 <= args.crf <= 51:
            raise UserError(f"--crf {args.crf} is outside 0..51 ({DEFAULT_CRF} is the default; 0 is lossless but large)")
        s = convert_subject(args.input, args.output, layout="chunks", crf=args.crf, overwrite=args.overwrite, extras=not args.lean,
                           chunk_frames=args.chunk_frames)
    elif args.subject_command == "expand":
        s = convert_subject(args.input, args.output, layout="frames", image_ext="." + args.image_format, overwrite=args.overwrite)
    else:
        raise UserError("subject needs an action: compact or expand (see 'headavatar subject --help')")
    size = sum(f.stat().st_size for f in s.root.rglob("*") if f.is_file())
    print(f"wrote {s.root}: {s.num_frames} frames, {s.layout} layout, {size / 2**20:.1f} MB")
    return 0
