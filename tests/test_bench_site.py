"""The benchmarks compare a bundle with the PyTorch pipeline of the site its manifest names, never another site's."""

import json
import shutil

import numpy as np
import pytest


def _bundle_of_site(src, dst, site):
    """A copy of the bundle ``src`` whose manifest says it was exported for ``site``, signed again."""
    from runtime import signing

    shutil.copytree(src, dst)
    mf = dst / "manifest.json"
    m = json.loads(mf.read_text())
    m["provenance"]["site"] = site
    mf.write_text(json.dumps(m, indent=1, allow_nan=False))
    signing.sign_manifest(dst, signing.default_signing_key(), signer="t", role="export")
    return dst


@pytest.fixture
def site3_bundle(tiny_bundle, tmp_path):
    return _bundle_of_site(tiny_bundle, tmp_path / "tiny-site-3", 3)


def _one_line_naming_site_3(msg: str) -> None:
    assert "\n" not in msg.strip(), msg
    assert "site 3" in msg and "its sites: 0" in msg, msg


def test_the_bundle_site_is_read_from_its_signed_manifest(tiny_bundle, site3_bundle):
    from benchmarks.traffic import bundle_site, manifest_site

    assert bundle_site(tiny_bundle) == 0 and bundle_site(site3_bundle) == 3
    for bad in ({}, {"provenance": {}}, {"provenance": {"site": "3"}}, {"provenance": {"site": True}}):
        with pytest.raises(ValueError, match="names no site"):
            manifest_site(bad)


def test_a_site_the_run_does_not_have_is_refused_in_one_line(tiny_run, site3_bundle, tmp_path, capsys):
    from benchmarks import infer_accuracy, suite, traffic

    out = tmp_path / "s"
    with pytest.raises(ValueError) as err:
        suite.run_suite(str(tiny_run), str(site3_bundle), str(out), traffic_path=str(tmp_path / "t.npz"), log=lambda *_: None)
    _one_line_naming_site_3(str(err.value))
    assert not out.exists() and not (tmp_path / "t.npz").exists()  # refused before any work
    with pytest.raises(ValueError) as err:
        suite.Contenders(str(tiny_run), str(site3_bundle), str(tmp_path / "t.npz"))
    _one_line_naming_site_3(str(err.value))
    with pytest.raises(ValueError) as err:
        traffic.make_traffic(str(tiny_run), str(tmp_path / "t.npz"), site=3)
    _one_line_naming_site_3(str(err.value))
    capsys.readouterr()

    assert suite.main(["--run", str(tiny_run), "--bundle", str(site3_bundle), "--out", str(out),
                       "--traffic", str(tmp_path / "t.npz")]) == 2
    _one_line_naming_site_3(capsys.readouterr().err)
    assert traffic.main(["--run", str(tiny_run), "--bundle", str(site3_bundle), "--out", str(tmp_path / "t.npz")]) == 2
    _one_line_naming_site_3(capsys.readouterr().err)
    assert infer_accuracy.main(["files", "--run", str(tiny_run), "--site", "3", "--out", str(tmp_path / "l.txt")]) == 2
    _one_line_naming_site_3(capsys.readouterr().err)


def test_the_manifest_site_goes_to_the_traffic_and_the_pytorch_pipeline(tiny_run, site3_bundle, tmp_path, monkeypatch):
    """A run that (here, by a patched listing) has a site 3: the site-3 bundle's traffic and eager pipeline are site 3's."""
    from benchmarks import suite, traffic

    real = traffic.load_site
    asked = []

    def load_site(run, site, defense=None):
        asked.append(site)
        return real(run, 0, defense)  # the tiny run's only site stands in for site 3

    monkeypatch.setattr(traffic, "run_sites", lambda run: [0, 3])
    monkeypatch.setattr(traffic, "load_site", load_site)

    t3 = tmp_path / "t3.npz"
    assert traffic.main(["--run", str(tiny_run), "--bundle", str(site3_bundle), "--n", "4", "--out", str(t3)]) == 0
    assert asked == [3] and json.loads(str(np.load(t3)["meta"]))["site"] == 3

    c = suite.Contenders(str(tiny_run), str(site3_bundle), str(t3))
    assert asked == [3, 3] and c.site == 3 and c.eager is not None

    t0 = tmp_path / "t0.npz"  # an explicit --site wins over the bundle's
    assert traffic.main(["--run", str(tiny_run), "--bundle", str(site3_bundle), "--site", "0", "--n", "4",
                         "--out", str(t0)]) == 0
    assert asked[-1] == 0
    with pytest.raises(ValueError, match="holds test scans of site 0, the bundle is site 3's") as err:
        suite.Contenders(str(tiny_run), str(site3_bundle), str(t0))
    assert "\n" not in str(err.value)
    n = len(asked)
    with pytest.raises(ValueError, match="holds test scans of site 0"):
        suite.run_suite(str(tiny_run), str(site3_bundle), str(tmp_path / "s"), traffic_path=str(t0), log=lambda *_: None)
    assert len(asked) == n and not (tmp_path / "s").exists()


@pytest.mark.slow
def test_the_suite_runs_the_manifest_site(tiny_run, site3_bundle, tmp_path, monkeypatch):
    from benchmarks import suite, traffic

    real = traffic.load_site
    asked = []

    def load_site(run, site, defense=None):
        asked.append(site)
        return real(run, 0, defense)

    monkeypatch.setattr(traffic, "run_sites", lambda run: [0, 3])
    monkeypatch.setattr(traffic, "load_site", load_site)
    r = suite.run_suite(str(tiny_run), str(site3_bundle), str(tmp_path / "s"), n=4, iters=1, warmup=0, blocks=2,
                        skip_sweep=True, traffic_path=str(tmp_path / "t.npz"), command="suite-test", log=lambda *_: None)
    assert asked == [3, 3]  # the traffic, then the PyTorch pipeline
    assert r["site"] == 3 and r["command"] == "suite-test"
    assert json.loads(str(np.load(tmp_path / "t.npz")["meta"]))["site"] == 3
    assert "test scans of site 3 of" in (tmp_path / "s" / "summary.md").read_text()
