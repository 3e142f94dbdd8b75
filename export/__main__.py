"""``python -m export --run RUN --site S --out BUNDLE``: one site's bundle (see ``export/bundle.py``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("--run", required=True, help="trained run folder (federated or centralised)")
    p.add_argument("--site", type=int, default=0, help="site index (a centralised run has site 0)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--parity-scans", type=int, default=64, help="test scans for the parity check (0: all)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--no-int8", action="store_true", help="do not write the int8 denoiser (denoiser.int8.onnx)")
    p.add_argument("--defense", action="append", metavar="KEY=VALUE",
                   help="override the run's defense settings in the bundle, e.g. --defense t_min=150,t_max=250,steps=1")
    args = p.parse_args(argv)
    from export.bundle import export_site
    from training.config import defense_overrides

    try:
        export_site(args.run, args.site, args.out, opset=args.opset, parity_scans=args.parity_scans, force=args.force,
                    defense=defense_overrides(args.defense), int8=not args.no_int8)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
