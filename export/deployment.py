"""A real site's bundle: its own state, the run's global models, its own scans.

``python -m export --site-state STATE_DIR --global RUN --data-dir SCANS --out BUNDLE``

After a federated run over real sites (docs/deployment.md) the parts of a
site's system are in two places:

- on the SuperLink machine, the run folder: the configuration, the global
  denoiser (and detector) and the global shared classifier arrays (the
  experts) after the last round -- the files of :func:`global_files`, which
  hold no scans and can be copied to every site;
- at the site, its SuperNode's ``state-dir``: its personal classifier arrays
  (the gates; batch-norm with FedBN) after every round, and ``classifier.pt``
  with the split digest of the scans it trained on -- and its ``data-dir``.

:func:`site_run` puts them together as a run folder of the centralised layout
(the site's classifier = the global experts + its own gates; the global
denoiser; the site's data folder), which :func:`export.bundle.export_site`
reads like any other run: the bundle is exported, checked and calibrated
exactly as a simulated site's, on this site's scans only (tau on its
validation scans, parity on its test scans).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from training import config as cfgmod
from training.checkpoint import load_checkpoint, save_checkpoint
from training.federated import task
from training.runs import write_data_record

GLOBAL_FILES = ("config.toml", "server/state.json", "server/classifier.pt")


def model_files(profile: cfgmod.Profile) -> list[str]:
    """The run's global defense models: the denoiser, and the detector when the detection score uses the MAE."""
    return ["denoiser/best.pt"] + (["detector/best.pt"] if profile.defense.score == "mae" else [])


def global_files(profile: cfgmod.Profile) -> list[str]:
    """The files of the run folder a site needs to export its bundle (no scans in them)."""
    return list(GLOBAL_FILES) + model_files(profile)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path}: not readable as {what} ({_one_line(err)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not {what}")
    return state


def _global(run: Path) -> tuple[cfgmod.Profile, int]:
    """The run's profile and its last classifier round, after checking the global files are there."""
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder (--global: the run folder of the SuperLink machine)")
    if not (run / "config.toml").is_file():
        raise FileNotFoundError(f"{run}/config.toml is missing: --global is the run folder of the SuperLink "
                                "machine, or a copy of it")
    try:
        profile = cfgmod.load_toml(run / "config.toml")
    except Exception as err:  # not TOML, or not this project's configuration
        raise ValueError(f"{run}/config.toml: not a run configuration ({_one_line(err)})") from None
    if profile.federated.method != "medfedpure":
        raise ValueError(f"{run}: method {profile.federated.method} trains no denoiser; "
                         "only a medfedpure run can be bundled")
    for name in global_files(profile):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run}/{name} is missing: copy {', '.join(global_files(profile))} "
                                    "from the run folder of the SuperLink machine")
    try:
        done = json.loads((run / "server" / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{run}/server/state.json: unreadable ({_one_line(err)})") from None
    rounds = profile.federated.phase_rounds
    for phase in profile.phases:
        if int(done.get(phase, 0)) < rounds[phase]:
            raise ValueError(f"{run}: the run has finished {phase} round {int(done.get(phase, 0))} of "
                             f"{rounds[phase]}; export once it is complete")
    return profile, rounds["classifier"]


def _site_checkpoint(ck_file: Path, profile: cfgmod.Profile, run: Path) -> dict:
    """The site's ``classifier.pt``, refused unless it is a classifier checkpoint of ``run``'s configuration."""
    try:
        ck = load_checkpoint(ck_file)
    except ValueError as err:  # a truncated or foreign file
        raise ValueError(_one_line(err)) from None
    try:
        trained_with = cfgmod.from_dict(ck["config"])
    except Exception as err:  # another kind of checkpoint
        raise ValueError(f"{ck_file}: not a site's classifier checkpoint ({_one_line(err)})") from None
    if "model" not in ck or "split_digest" not in ck:
        raise ValueError(f"{ck_file}: not a site's classifier checkpoint (no model or split digest)")
    if trained_with != task.classifier_profile(profile):
        raise ValueError(f"{ck_file} was trained with another configuration than {run}/config.toml: "
                         "the state folder and the run folder are not from the same run")
    return ck


def _load_site_arrays(model: torch.nn.Module, profile: cfgmod.Profile, run: Path, local_file: Path) -> None:
    """Load into ``model`` the global arrays of ``run/server/classifier.pt`` and the site's own of ``local_file``."""
    keys = task.local_keys("classifier", model, profile)
    shared = _tensors(run / "server" / "classifier.pt", "the global classifier arrays")
    local = _tensors(local_file, "the site's classifier arrays")
    state = model.state_dict()
    for what, source, wanted in ((f"{run}/server/classifier.pt", shared, set(state) - keys),
                                 (str(local_file), local, keys)):
        missing = sorted(wanted - set(source))
        if missing:
            raise ValueError(f"{what} lacks {len(missing)} array(s) of the classifier (first: {missing[0]}): "
                             "not from this run's configuration")
    state.update({k: v for k, v in shared.items() if k in state and k not in keys})
    state.update({k: v for k, v in local.items() if k in keys})
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"the arrays of {run}/server/classifier.pt and {local_file} do not fit the run's "
                         f"classifier ({_one_line(err)})") from None


def _check_same_run(ck: dict, model: torch.nn.Module, ck_file: Path, run: Path, local_file: Path, last: int) -> None:
    """Refuse a checkpoint written after round ``last``, or at it with arrays other than ``model``'s."""
    epoch = int(ck.get("epoch", 0))
    if epoch > last:
        raise ValueError(f"{ck_file} is from round {epoch}, after the last round {last} of {run}: "
                         "the state folder and the run folder are not from the same run")
    if epoch == last:  # written after the last evaluation: the same arrays
        saved, now = ck["model"], model.state_dict()
        differ = [k for k in now if k not in saved or not torch.equal(saved[k], now[k])]
        if differ:
            raise ValueError(f"{ck_file} differs from {run}/server/classifier.pt + {local_file.name} "
                             f"({len(differ)} array(s), first: {differ[0]}): the state folder and the run folder "
                             "are not from the same run")


def site_classifier(state_dir: str | Path, run: str | Path) -> tuple[cfgmod.Profile, torch.nn.Module, dict]:
    """The site's classifier after the run's last round: the global experts of ``run`` + the site's own arrays.

    Returns the run's profile, the classifier and the site's ``classifier.pt``
    checkpoint (its split digest, class names, metrics). Refuses a state
    folder that is incomplete or belongs to another run.
    """
    state_dir, run = Path(state_dir).expanduser(), Path(run).expanduser()
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{state_dir}: no such site state folder (--site-state: the SuperNode's state-dir)")
    profile, last = _global(run)
    ck_file, local_file = state_dir / "classifier.pt", state_dir / f"classifier-local-round{last}.pt"
    if not ck_file.is_file():
        raise FileNotFoundError(f"{ck_file} is missing: the site's classifier, written by its SuperNode after "
                                "every evaluation (is this the SuperNode's state-dir?)")
    if not local_file.is_file():
        raise FileNotFoundError(f"{local_file} is missing: the site's own arrays after the run's last round {last} "
                                "(did the site take part in it?)")
    ck = _site_checkpoint(ck_file, profile, run)
    model = task.build_model("classifier", profile)
    _load_site_arrays(model, profile, run, local_file)
    model.eval()
    _check_same_run(ck, model, ck_file, run, local_file, last)
    return profile, model, ck


def site_run(state_dir: str | Path, run: str | Path, data_dir: str | Path, dest: str | Path, *, log=print) -> Path:
    """Write ``dest``: the site's run folder (centralised layout) that :func:`export.bundle.export_site` reads.

    ``dest/config.toml`` (the run's), ``dest/data.txt`` (the site's data
    folder), ``dest/classifier/best.pt`` (:func:`site_classifier`) and the
    global ``dest/denoiser/best.pt`` (and detector). ``data_dir`` must hold
    the scans the site trained on: their split digest is checked against the
    site's ``classifier.pt``.
    """
    run, dest = Path(run).expanduser().resolve(), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest} exists and is not an empty folder")
    profile, model, ck = site_classifier(state_dir, run)
    data_dir = Path(data_dir).expanduser().resolve()
    source = str(data_dir)
    data = task.site_data(source, profile, None, None)
    if data.digest != ck["split_digest"]:
        raise ValueError(f"{data_dir}: not the scans this site trained on (split digest {data.digest[:12]}, "
                         f"the site's classifier.pt: {str(ck['split_digest'])[:12]}); give --data-dir as in the "
                         "SuperNode's node config")
    if ck.get("class_names") and list(ck["class_names"]) != list(data.class_names):
        raise ValueError(f"{data_dir}: classes {data.class_names}, the site trained on {list(ck['class_names'])}")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "config.toml", dest / "config.toml")
    write_data_record(dest, source, data.digest)
    save_checkpoint(dest / "classifier" / "best.pt", component="classifier", model=model.state_dict(),
                    config=cfgmod.to_dict(task.classifier_profile(profile)), split_digest=data.digest,
                    class_names=data.class_names, metrics=ck.get("metrics", {}),
                    epoch=profile.federated.phase_rounds["classifier"],
                    site=ck.get("site", 0), local_keys=ck.get("local_keys", []), shared_source="federated")
    for name in model_files(profile):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(run / name, dest / name)
        except OSError:
            shutil.copyfile(run / name, dest / name)
    sizes = ", ".join(f"{len(data[s])} {s}" for s in task.SPLITS)
    log(f"site {Path(state_dir).expanduser()}: classifier after round {profile.federated.phase_rounds['classifier']} "
        f"(global experts of {run} + the site's own arrays); scans {data_dir}: {sizes} "
        f"(split {data.digest[:12]})")
    return dest


def export_deployed_site(state_dir: str | Path, run: str | Path, data_dir: str | Path, out: str | Path, *,
                         log=print, **kwargs) -> dict:
    """Export a real site's bundle to ``out``; returns the manifest.

    ``kwargs`` go to :func:`export.bundle.export_site` (``opset``,
    ``parity_scans``, ``force``, ``defense``, ``int8``, ...).
    """
    from export.bundle import export_site

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not kwargs.get("force"):
        raise ValueError(f"{out} exists and is not empty; choose a new --out or pass --force")
    name = Path(run).expanduser().resolve().name or "run"
    with tempfile.TemporaryDirectory(prefix="medfedpure-site-") as tmp:
        folder = site_run(state_dir, run, data_dir, Path(tmp) / name, log=log)
        ck = load_checkpoint(folder / "classifier" / "best.pt")
        site = ck.get("site", 0)
        prov = {"run": str(Path(run).expanduser().resolve()), "site": site,
                "site_state": str(Path(state_dir).expanduser().resolve()), "exported_from": "deployment"}
        kwargs.setdefault("signer", f"site {site} export of {name}")
        return export_site(folder, 0, out, log=log, provenance={**prov, **kwargs.pop("provenance", {})}, **kwargs)
