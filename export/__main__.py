"""``python -m export --run RUN --site S --out BUNDLE``: one site's bundle (see ``export/bundle.py``).

A real site of a deployed federated run (docs/deployment.md) exports its own
bundle from its SuperNode's state folder, the run's global models and its own
scans (see ``export/deployment.py``):
``python -m export --site-state STATE_DIR --global RUN --data-dir SCANS --out BUNDLE``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="trained run folder (federated or centralised)")
    src.add_argument("--site-state", metavar="STATE_DIR",
                     help="a real site: its SuperNode's state-dir (needs --global and --data-dir)")
    p.add_argument("--site", type=int, help="with --run: site index (a centralised run has site 0; default 0)")
    p.add_argument("--global", dest="global_run", metavar="RUN",
                   help="with --site-state: the run folder of the SuperLink machine, or a copy of its config.toml, "
                        "server/state.json, server/classifier.pt and denoiser/best.pt (detector/best.pt with the MAE score)")
    p.add_argument("--data-dir", metavar="SCANS", help="with --site-state: the site's scans (its SuperNode's data-dir)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--parity-scans", type=int, default=64, help="test scans for the parity check (0: all)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--no-int8", action="store_true", help="do not write the int8 denoiser (denoiser.int8.onnx)")
    p.add_argument("--no-torch-programs", action="store_true",
                   help="do not write the .pt2 graphs of the torch engine (ONNX Runtime and TensorRT do not need them)")
    p.add_argument("--defense", action="append", metavar="KEY=VALUE",
                   help="override the run's defense settings in the bundle, e.g. --defense t_min=150,t_max=250,steps=1")
    args = p.parse_args(argv)
    if args.site_state is not None:
        if args.global_run is None or args.data_dir is None:
            p.error("--site-state needs --global RUN and --data-dir SCANS")
        if args.site is not None:
            p.error("--site goes with --run; a real site is named by --site-state")
    elif args.global_run is not None or args.data_dir is not None:
        p.error("--global and --data-dir go with --site-state")
    from export.bundle import export_site
    from export.deployment import export_deployed_site
    from training.config import defense_overrides

    try:
        options = dict(opset=args.opset, parity_scans=args.parity_scans, force=args.force,
                       defense=defense_overrides(args.defense), int8=not args.no_int8,
                       torch_programs=not args.no_torch_programs)
        if args.site_state is not None:
            export_deployed_site(args.site_state, args.global_run, args.data_dir, args.out, **options)
        else:
            export_site(args.run, 0 if args.site is None else args.site, args.out, **options)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
