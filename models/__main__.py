"""Command line: ``python -m models export|describe|data ...`` (thin wrapper over the API)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models import MODEL_NAMES, describe, export
from models.data import SPLITS, model_feeds, save_feeds_npz


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    export_cmd = commands.add_parser("export", help="export reference models to the ONNX cache")
    export_cmd.add_argument("name", nargs="?", default="all", choices=("all", *MODEL_NAMES))
    export_cmd.add_argument("--cache-dir", type=Path)
    export_cmd.add_argument("--force", action="store_true", help="re-export even if cached")

    describe_cmd = commands.add_parser("describe", help="print a model's info.json (exports if needed)")
    describe_cmd.add_argument("name", choices=MODEL_NAMES)
    describe_cmd.add_argument("--cache-dir", type=Path)

    data_cmd = commands.add_parser("data", help="write calibration/evaluation feeds to .npz")
    data_cmd.add_argument("name", choices=MODEL_NAMES)
    data_cmd.add_argument("--split", required=True, choices=SPLITS)
    data_cmd.add_argument("-o", "--output", required=True, type=Path)
    data_cmd.add_argument("--n", type=int, help="keep only the first N feeds")
    data_cmd.add_argument("--cache-dir", type=Path)

    args = parser.parse_args(argv)
    if args.command == "export":
        for name in MODEL_NAMES if args.name == "all" else (args.name,):
            model = export(name, args.cache_dir, force=args.force)
            print(f"{name}: {model.onnx_path} ({model.info['export_seconds']} s export)")
    elif args.command == "describe":
        print(json.dumps(describe(args.name, args.cache_dir), indent=2))
    else:
        feeds = model_feeds(args.name, args.split, args.n, args.cache_dir)
        save_feeds_npz(feeds, args.output)
        print(f"{len(feeds)} feeds -> {args.output}")


if __name__ == "__main__":
    main()
