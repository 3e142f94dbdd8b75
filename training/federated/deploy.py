"""A federated run over real sites: the run folder the ServerApp reads, and the command that starts it.

In a deployment the sites are ``flower-supernode`` processes at the hospitals
and the ServerApp runs next to the ``flower-superlink`` (see
docs/deployment.md). ``python -m training deploy-prepare --out RUN ...``
writes ``RUN/config.toml``, the resolved profile with its ``[federated]``
table (the number of sites the server waits for, rounds, method, ...), and
prints the ``flwr run`` command that starts the run with
``run-config run-dir=RUN``. Running that command again on the same folder
continues from the last finished round.

It takes every federated flag of ``python -m training train`` (one table,
``training.cli.FED_FLAGS``). There is no central data set here: every site
reads its own folder (``--node-config "data-dir=..."``), so ``--partition``
and ``--feature-skew`` are written to the configuration but play no part.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from training import cli
from training import config as cfgmod

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding pyproject.toml ([tool.flwr.app])
DEFAULT_CONNECTION = "medfedpure"


def prepare_deployment(profile: cfgmod.Profile, out: str | Path) -> Path:
    """Write ``out/config.toml`` for ``profile``; a folder that holds another configuration is refused.

    Returns the absolute run folder (the ServerApp's ``run-dir``).
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise cfgmod.UsageError(f"{out} exists and is not a folder")
    cfg_file = out / "config.toml"
    if cfg_file.exists() and cfgmod.load_toml(cfg_file) != profile:
        raise cfgmod.UsageError(f"{cfg_file} holds another configuration; use a new --out "
                                "(the same configuration resumes the run)")
    out.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(cfgmod.dump_toml(profile))
    return out


def run_command(run_dir: str | Path, connection: str = DEFAULT_CONNECTION, app: str | Path = PROJECT_ROOT,
                stream: bool = True) -> list[str]:
    """The ``flwr run`` command line (as a list) that trains ``run_dir`` on the SuperLink ``connection``."""
    run_cfg = f"run-dir={json.dumps(str(Path(run_dir).expanduser().resolve()))}"
    cmd = ["flwr", "run", str(app), connection, "--run-config", run_cfg]
    return cmd + ["--stream"] if stream else cmd


def _profile(args) -> cfgmod.Profile:
    base = cfgmod.load_toml(args.config, profile=args.profile) if args.config else cfgmod.get_profile(args.profile)
    return cfgmod.resolve(base, {"federated": cli.federated_overrides(args)})


def cmd_deploy_prepare(args) -> int:
    profile = _profile(args)
    run_dir = prepare_deployment(profile, args.out)
    fed = profile.federated
    rounds = ", ".join(f"{p} {fed.phase_rounds[p]}" for p in profile.phases)
    print(f"wrote {run_dir / 'config.toml'}: profile {profile.name}, method {fed.method}, "
          f"{fed.sites} sites, rounds: {rounds}")
    print("\nwith the SuperLink and all sites' SuperNodes running, start (or resume) the run with:\n")
    print("  " + shlex.join(run_command(run_dir, args.connection)))
    print(f"\nthe server waits until {fed.sites} registered sites are connected; results go to {run_dir}, "
          "each site keeps its classifier in its state-dir")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``deploy-prepare`` on a ``python -m training`` sub-parser set."""
    p = subparsers.add_parser("deploy-prepare", help="write the run folder for a federated run over real sites",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder, on the machine of the SuperLink (the ServerApp's run-dir)")
    p.add_argument("--profile", choices=sorted(cfgmod.PROFILES), default="edge")
    p.add_argument("--config", help="TOML file of overrides (see training/config.py)")
    p.add_argument("--connection", default=DEFAULT_CONNECTION,
                   help="name of the SuperLink connection in the Flower configuration ($FLWR_HOME/config.toml)")
    cli.add_federated_flags(p.add_argument_group("federated settings (override the profile's [federated] table)"),
                            p.add_argument_group("training-time defenses (docs/training-defenses.md)"))
    p.set_defaults(func=cmd_deploy_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.main(["deploy-prepare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
