"""Opening a trained run: its profile, its data record, its sites and their models.

One place that knows a run folder's layout, used by export, evaluation, fine-tuning and the benchmarks:

    RUN/config.toml                the resolved profile (``training.config``)
    RUN/data.txt                   ``source = ...`` and ``split_digest = ...`` (:func:`data_record`)
    RUN/classifier/best.pt         a centralised run's classifier
    RUN/sites/site-<k>/classifier.pt   a federated run's site k (shared experts + its gates)
    RUN/denoiser/best.pt, RUN/detector/best.pt   the purifier and (when the score uses it) the MAE
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from training import config as cfgmod
from training.checkpoint import load_checkpoint
from training.defense import DefensePipeline
from training.federated import task
from training.models import create_model


def data_record(run: str | Path) -> dict[str, str]:
    """``RUN/data.txt`` as a dict (``source``, ``split_digest``); a missing file or source is an error."""
    f = Path(run) / "data.txt"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing; not a run folder (or not a finished one)")
    rec = {}
    for line in f.read_text().splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            rec[key.strip()] = value.strip()
    if "source" not in rec:
        raise cfgmod.UsageError(f"{f}: no 'source = ...' line")
    return rec


def read_source(run: str | Path) -> str:
    """The data source a run was trained on."""
    return data_record(run)["source"]


def write_data_record(run: str | Path, source: str, split_digest: str) -> None:
    (Path(run) / "data.txt").write_text(f"source = {source}\nsplit_digest = {split_digest}\n")


@dataclass
class Site:
    site: int
    classifier: nn.Module
    data: task.SiteData
    pipe: DefensePipeline | None = None


def _load_model(path: Path, component: str) -> nn.Module:
    ck = load_checkpoint(path)
    model = create_model(component, cfgmod.from_dict(ck["config"]))
    model.load_state_dict(ck["model"])
    return model.eval()


def load_sites(run: str | Path, source: str | None = None,
               defense: dict | None = None) -> tuple[cfgmod.Profile, list[Site], dict]:
    """The run's profile, its sites (classifier, data, pipeline) and a description.

    ``defense`` overrides the run's defense settings (score, flag rate, t*
    range, purification steps): the trained models are the same, only the
    way the scanner-side pipeline uses them changes.
    """
    run = Path(run)
    if not (run / "config.toml").exists():
        raise FileNotFoundError(f"{run}: not a run folder (no config.toml)")
    profile = cfgmod.with_defense(cfgmod.load_toml(run / "config.toml"), defense)
    source = source or read_source(run)
    federated = (run / "sites").is_dir()
    detector = denoiser = None
    if (run / "denoiser" / "best.pt").exists() and (not federated or profile.federated.method == "medfedpure"):
        denoiser = _load_model(run / "denoiser" / "best.pt", "denoiser")
        if (run / "detector" / "best.pt").exists():  # a run whose score is the noise floor may have no MAE
            detector = _load_model(run / "detector" / "best.pt", "detector")
    sites: list[Site] = []
    if federated:
        n = profile.federated.sites
        for k in range(n):
            f = run / "sites" / f"site-{k}" / "classifier.pt"
            if not f.exists():
                raise FileNotFoundError(f"{f} is missing: has the federated run finished?")
            sites.append(Site(k, _load_model(f, "classifier"), task.site_data(source, profile, k, n)))
    else:
        sites.append(Site(0, _load_model(run / "classifier" / "best.pt", "classifier"), task.site_data(source, profile, None, None)))
    for s in sites:
        if denoiser is not None:
            s.pipe = task.make_defense(s.classifier, detector, denoiser, profile, s.data["val"])
    kind = f"federated ({profile.federated.method}, {len(sites)} sites)" if federated else "centralised"
    return profile, sites, {"run": str(run), "source": source, "kind": kind, "defended": denoiser is not None}


