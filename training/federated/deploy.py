"""A federated run over real sites: the run folder the ServerApp reads, and the command that starts it.

In a deployment the sites are ``flower-supernode`` processes at the hospitals
and the ServerApp runs next to the ``flower-superlink`` (see
docs/deployment.md). ``python -m training deploy-prepare --out RUN ...``
writes ``RUN/config.toml``, the resolved profile with its ``[federated]``
table (the number of sites the server waits for, rounds, method, ...), and
prints the ``flwr run`` command that starts the run with
``run-config run-dir=RUN``. Running that command again on the same folder
continues from the last finished round.

There is no central data set here: every site reads its own folder
(``--node-config "data-dir=..."``), so ``--partition`` plays no part.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from training import config as cfgmod

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding pyproject.toml ([tool.flwr.app])
DEFAULT_CONNECTION = "medfedpure"

FED_FLAGS = {  # command-line flag -> FederatedConfig field
    "method": "method", "sites": "sites", "rounds": "rounds", "local_epochs": "local_epochs",
    "defense_rounds": "defense_rounds", "defense_local_epochs": "defense_local_epochs",
    "proximal_mu": "proximal_mu", "adv_fraction": "adv_fraction", "purify_fraction": "purify_fraction", "eval_every": "eval_every", "eval_max": "eval_max",
    "server_opt": "server_opt", "server_lr": "server_lr", "server_momentum": "server_momentum",
}


def prepare_deployment(profile: cfgmod.Profile, out: str | Path) -> Path:
    """Write ``out/config.toml`` for ``profile``; a folder that holds another configuration is refused.

    Returns the absolute run folder (the ServerApp's ``run-dir``).
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    cfg_file = out / "config.toml"
    if cfg_file.exists() and cfgmod.load_toml(cfg_file) != profile:
        raise ValueError(f"{cfg_file} holds another configuration; use a new --out "
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
    fed = {field: getattr(args, flag) for flag, field in FED_FLAGS.items() if getattr(args, flag) is not None}
    for flag in ("fedbn", "purify_train"):
        if getattr(args, flag):
            fed[flag] = True
    return cfgmod.resolve(base, {"federated": fed})


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
    f = p.add_argument_group("federated settings (override the profile's [federated] table)")
    f.add_argument("--method", choices=cfgmod.METHODS)
    f.add_argument("--sites", type=int, help="number of sites the server waits for and trains with every round")
    f.add_argument("--rounds", type=int, help="rounds of the classifier phase")
    f.add_argument("--local-epochs", type=int, help="local epochs per round (classifier)")
    f.add_argument("--defense-rounds", type=int, help="rounds of the denoiser and detector phases (default: --rounds)")
    f.add_argument("--defense-local-epochs", type=int, help="their local epochs (default: --local-epochs)")
    f.add_argument("--fedbn", action="store_true", help="keep batch-norm statistics and affine parameters at the sites")
    f.add_argument("--proximal-mu", type=float, help="FedProx term mu/2 ||w - w_global||^2 in every local objective")
    f.add_argument("--adv-fraction", type=float, help="fraction of each batch trained adversarially "
                   "(fat, pfeddef; medfedpure with --purify-fraction)")
    f.add_argument("--purify-fraction", type=float, help="medfedpure: fraction of each batch purified "
                   "(purification-consistent training)")
    f.add_argument("--purify-train", action="store_true", help="medfedpure: purify flagged training scans")
    f.add_argument("--eval-every", type=int, help="evaluate every N rounds")
    f.add_argument("--eval-max", type=int, help="at most N test scans per site in per-round evaluation (0: all)")
    f.add_argument("--server-opt", choices=cfgmod.SERVER_OPTS, help="how the server applies the averaged update")
    f.add_argument("--server-lr", type=float, help="server step size of --server-opt")
    f.add_argument("--server-momentum", type=float, help="server momentum (FedAvgM) or beta_1 (FedAdam, FedYogi)")
    p.set_defaults(func=cmd_deploy_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.federated.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["deploy-prepare", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
