"""Reading and classifying scans with a site's bundle: the part of ``runtime infer`` that ``runtime serve`` shares."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from runtime.imageio import ImageReadError, read_image
from runtime.preprocess import implausible, preprocess


def trust_args(args) -> dict:
    return {"trusted": list(args.trusted_key or []), "allow_unsigned": bool(args.allow_unsigned)}


def provider(engine) -> str:
    d = engine.describe()
    if d.get("engine") == "ort":
        return sorted({v[0] for v in d["providers"].values()})[0] if d.get("providers") else "?"
    if d.get("engine") == "trt":
        return f"TensorRT {d.get('tensorrt')} {d.get('gpu')}"
    return f"torch {d.get('device')}"


def file_sha256(path: Path) -> str | None:
    """sha256 of a regular file (None for anything else, such as a FIFO, which would block)."""
    import stat

    from runtime.bundle import sha256

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        return sha256(path)
    except OSError:
        return None


def secret_path(args) -> Path:
    if args.secret:
        return Path(args.secret)
    return Path(str(Path(args.bundle)).rstrip("/\\") + ".secret")


class Inference:
    """``runtime infer`` and ``runtime serve``: the loaded bundle, its pipeline and secret, and the counts of what happened."""

    def __init__(self, args):
        import time

        from runtime.bundle import Bundle
        from runtime.engines import make_engine
        from runtime.pipeline import Pipeline, PurifyConfig, load_site_secret

        t0 = time.perf_counter()
        self.args = args
        self.bundle = Bundle.load(args.bundle, **trust_args(args))
        if self.bundle.signature.status != "verified":
            print(f"warning: bundle {self.bundle.path} is {self.bundle.signature.describe()}", file=sys.stderr)
        self.secret = None
        if args.seed is None:
            sp = secret_path(args)
            made = not sp.exists()
            self.secret = load_site_secret(sp)
            if made:
                print(f"made the site secret {sp} (keep it; it makes every scan's noise unpredictable from outside)",
                      file=sys.stderr)
        m = self.bundle.manifest
        self.draws = args.draws or int(m["purification"].get("draws", 1))
        self.mode = m["purification"].get("mode", "adaptive")  # signed with the rest of the manifest
        if not 1 <= self.draws <= 16:
            raise ValueError(f"--draws must be in 1..16, got {self.draws}")
        self.engine = make_engine(self.bundle, args.engine, args.device, args.precision, args.threads,
                                  log=lambda s: print(s, file=sys.stderr))
        self.pipe = Pipeline(self.engine, PurifyConfig.from_manifest(m), self.bundle.ood_threshold)
        self.load_seconds = time.perf_counter() - t0
        self.base = {"engine": args.engine, "provider": provider(self.engine), "precision": args.precision,
                     "bundle_signature": self.bundle.signature.record()}
        self.counts = dict.fromkeys(("classified", "failed", "flagged", "refused", "skipped"), 0)

    def skipped(self, f: Path, reason: str) -> dict:
        """The record of an input that is not read: a non-image file found in a folder is skipped, not failed."""
        from runtime.inputs import NOT_AN_IMAGE

        not_image = reason == NOT_AN_IMAGE
        self.counts["skipped" if not_image else "failed"] += 1
        return {"file": str(f), "sha256": None, "skipped": not_image, "error": reason, **self.base}

    def read(self, f: Path) -> tuple[np.ndarray | None, str | None, dict | None]:
        """(the preprocessed scan, its sha256, None) or (None, sha256, the record of an error or refusal)."""
        sha = file_sha256(f)
        cfg = self.bundle.preprocess_config
        try:
            img = read_image(f)
            why = implausible(img, cfg)
            x = None if why else preprocess(img, cfg)
        except (ImageReadError, ValueError, MemoryError, OSError) as err:
            self.counts["failed"] += 1
            reason = err.reason if isinstance(err, ImageReadError) else (str(err) or type(err).__name__)
            return None, sha, {"file": str(f), "sha256": sha, "error": reason, **self.base}
        if why:  # not a head slice at all: refused before any model sees it
            self.counts["refused"] += 1
            return None, sha, {"file": str(f), "sha256": sha, "prediction": None, "probability": None,
                               "probabilities": None, "refused": True, "refusal": f"{why}; no diagnosis",
                               "ood_score": None, **self.base, "error": None}
        if sha is None:
            self.counts["failed"] += 1
            return None, None, {"file": str(f), "sha256": None, "error": "cannot read file to hash it", **self.base}
        return x, sha, None

    def seeds(self, shas: list[str]) -> np.ndarray:
        from runtime.pipeline import scan_seed

        a, d = self.args, range(self.draws)
        return np.array([[a.seed + k if self.secret is None else scan_seed(self.secret, h, k) for k in d]
                         for h in shas], np.int64)

    def classify(self, files: list[Path], xs: list[np.ndarray], shas: list[str], pre_ms: list[float]) -> list[dict]:
        """One record per scan of a batch that went through the pipeline."""
        seeds = self.seeds(shas)
        res = self.pipe.run(np.stack(xs)[:, None], seed=seeds, mode=self.mode)
        n, n_flag, tm = len(files), int(res["flagged"].sum()), res["timings"]
        names, thr = self.bundle.class_names, self.bundle.ood_threshold
        recs = []
        for i, f in enumerate(files):
            k, flagged, t_star = int(res["probs"][i].argmax()), bool(res["flagged"][i]), int(res["t_star"][i])
            rec = {"file": str(f), "sha256": shas[i]}
            if res["refused"][i]:
                rec |= {"prediction": None, "probability": None, "probabilities": None, "refused": True,
                        "refusal": f"not like the scans this site's model was trained on (out-of-distribution "
                                   f"score {float(res['ood'][i]):.4g} > {thr:.4g}); no diagnosis"}
            else:
                rec |= {"prediction": names[k], "probability": round(float(res["probs"][i][k]), 6),
                        "probabilities": {c: round(float(p), 6) for c, p in zip(names, res["probs"][i])},
                        "refused": False}
            rec |= {
                "ood_score": float(res["ood"][i]), "score": float(res["scores"][i]), "flagged": flagged,
                "t_star": t_star, "purification_steps": (self.pipe.cfg.steps or t_star) if flagged else 0,
                "purification_draws": self.draws if flagged else 0,
                "ms": {"preprocess": round(pre_ms[i], 3), "ood": round(1000.0 * tm["ood"] / n, 3),
                       "detect": round(1000.0 * tm["detect"] / n, 3),
                       "purify": round(1000.0 * tm["purify"] / n_flag, 3) if flagged else 0.0,
                       "classify": round(1000.0 * tm["classify"] / n, 3)},
                "seed": int(seeds[i, 0]), **({"seeds": [int(v) for v in seeds[i]]} if self.draws > 1 else {}),
                "seed_source": "--seed" if self.secret is None else "content+secret", **self.base, "error": None,
            }
            recs.append(rec)
        self.counts["classified"] += n - int(res["refused"].sum())
        self.counts["refused"] += int(res["refused"].sum())
        self.counts["flagged"] += n_flag
        return recs

    def summary(self) -> str:
        import json

        c = self.counts
        parts = [f"{c['classified']} scans classified ({c['flagged']} flagged and purified)",
                 f"{c['refused']} refused as not like the site's scans"]
        if c["failed"]:
            parts.append(f"{c['failed']} failed")
        if c["skipped"]:
            parts.append(f"{c['skipped']} non-image files skipped")
        line = ", ".join(parts) + f"; engine {json.dumps(self.engine.describe())}; load {self.load_seconds:.1f} s"
        return line + (f"; results in {self.args.out}" if self.args.out else "")
