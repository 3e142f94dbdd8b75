"""Real sites on loopback: a SuperLink with TLS and SuperNode authentication, two registered sites,
one round of each MedFedPure phase of the tiny profile started with ``flwr run``, an unregistered site
that is refused, and a site that exports its bundle from its own state folder, the run's global models
and its own scans.

Every process is started in its own session and carries a marker in its
environment; the ``finally`` block stops the sessions (SIGTERM, then SIGKILL)
and then any descendant that still carries the marker (the SuperLink starts
its SuperExec detached, in a session of its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXECUTABLES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")
CONNECTION = "test-link"
MARK = "MEDFEDPURE_DEPLOYMENT_TEST"


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))


MISSING = [name for name in EXECUTABLES if _which(name) is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"Flower executables not found: {', '.join(MISSING)}"),
    pytest.mark.skipif(sys.platform != "linux", reason="process clean-up reads /proc"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    if not path.exists():
        return f"({path} missing)"
    lines = path.read_text(errors="replace").splitlines()
    return f"--- {path.name} (last {min(n, len(lines))} lines) ---\n" + "\n".join(lines[-n:])


def _json_out(text: str):
    """The JSON document in a command's output (the Flower CLI may print a line before it)."""
    start = text.find("{")
    end = text.rfind("}")
    if start < 0 or end < start:
        raise ValueError(f"no JSON in output:\n{text}")
    return json.loads(text[start:end + 1])


class Processes:
    """Long-running processes of the test; each in its own session, each marked through its environment."""

    def __init__(self, logs: Path):
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        self.started: dict[str, subprocess.Popen] = {}

    def env(self, flwr_home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")]),
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "MEDFEDPURE_CACHE": str(self.logs.parent / "cache"),  # the sites' preprocessed-scan cache
            MARK: self.tag,
        })
        flwr_home.mkdir(parents=True, exist_ok=True)
        return env

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str, args: list[str], flwr_home: Path, cwd: Path, stderr_apart: bool = False) -> subprocess.Popen:
        """Start ``args``; output to ``logs/<name>.log`` (stderr to ``<name>.err`` with ``stderr_apart``)."""
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(self.log(name), "wb"))
            err = files.enter_context(open(self.logs / f"{name}.err", "wb")) if stderr_apart else subprocess.STDOUT
            proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    env=self.env(flwr_home), cwd=cwd, start_new_session=True)
        self.started[name] = proc
        return proc

    def _marked(self) -> list[int]:
        """Live processes (not this one) whose environment carries this test's marker."""
        needle = f"{MARK}={self.tag}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def stop_all(self, timeout: float = 20.0) -> list[str]:
        """Stop everything started here; returns what had to be killed (for the report)."""
        killed = []
        for proc in reversed(list(self.started.values())):  # sites first, the SuperLink last
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in self.started.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in its session
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # descendants outside the sessions
            strays = self._marked()
            for pid in strays:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            end = time.monotonic() + 10
            while strays and time.monotonic() < end:
                time.sleep(0.2)
                strays = [p for p in self._marked() if p in strays and not _is_zombie(p)]
            if not strays:
                break
            killed += [f"pid {p}" for p in strays]
        return killed


def _is_zombie(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _wait_for(what: str, check, timeout: float, interval: float = 1.0, alive=(), diagnose=lambda: ""):
    """Poll ``check()`` until it returns a truthy value; fail after ``timeout`` or when a process in ``alive`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        for name, proc in alive:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited (code {proc.returncode}) while waiting for {what}\n{diagnose()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")
        time.sleep(interval)


def _collect(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for ``proc`` (started with its output piped) as ``subprocess.run`` would: killed after ``timeout``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def _tls_ready(port: int, ca: Path) -> bool:
    """A TLS handshake with the SuperLink succeeds, verifying its certificate (and the IP in it) against our CA."""
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                return tls.version() is not None
    except (OSError, ssl.SSLError):
        return False


@pytest.fixture
def sigterm_interrupts():
    """A SIGTERM (``timeout``, a CI runner) interrupts the test as Ctrl-C does, so that its ``finally`` block stops
    the SuperLink and the sites: they run in sessions of their own and would outlive a terminated pytest."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sites_over_tls_with_registered_supernodes_only(tmp_path, sigterm_interrupts):
    from training import config as cfgmod
    from training.data.phantom import write_dataset
    from training.federated.certs import create_federation
    from training.federated.deploy import prepare_deployment, run_command

    t0 = time.monotonic()
    procs = Processes(tmp_path / "logs")
    cli_home = tmp_path / "cli-home"
    cli_env = procs.env(cli_home)

    def flwr_start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([_which("flwr"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=cli_env, cwd=tmp_path, stdin=subprocess.DEVNULL)

    def flwr(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return _collect(flwr_start(*args), timeout)

    def diagnose() -> str:
        return "\n".join(_tail(procs.log(name)) for name in procs.started if name != "flwr-run")

    try:
        # ----------------------------------------------------------------- keys and certificates
        fed = create_federation(tmp_path / "certs", sites=3)
        registered, intruder = fed.sites[:2], fed.sites[2]

        # ----------------------------------------------------------------- SuperLink: TLS + site authentication
        # Its state in memory (docs/deployment.md gives it a SQLite file, to keep the registered sites over a
        # restart, which this test does not do): every model array of a message travels as objects of its own,
        # one request each, and the file costs the SuperLink several SQL statements per request -- most of the
        # run's time on a small machine, and "database is locked" failures when the machine is busy.
        port = _free_port()
        link_dir = tmp_path / "superlink"
        link_dir.mkdir()
        link = procs.start("superlink", [
            _which("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(fed.superlink_ca_cert), "--ssl-certfile", str(fed.server_cert),
            "--ssl-keyfile", str(fed.server_key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--database", ":flwr-in-memory:",
        ], flwr_home=link_dir / "flwr-home", cwd=link_dir)

        # ----------------------------------------------------------------- while it starts: the sites' data, the run folder
        data_dirs = {}
        for k, site in enumerate(registered):
            data_dirs[site.name] = tmp_path / site.name / "scans"
            write_dataset(data_dirs[site.name], 40, size=40, seed=11 + k, progress=False)
        profile = cfgmod.resolve("tiny", {"federated": {"method": "medfedpure", "sites": 2, "rounds": 1,
                                                        "local_epochs": 1, "eval_max": 8}})
        run_dir = prepare_deployment(profile, tmp_path / "run")
        cmd = run_command(run_dir, CONNECTION, app=ROOT, stream=False)
        assert cmd[:2] == ["flwr", "run"]

        _wait_for("the SuperLink to accept TLS connections", lambda: _tls_ready(port, fed.ca_cert), 60,
                  interval=0.5, alive=[("superlink", link)], diagnose=diagnose)

        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{port}"\nroot-certificates = "{fed.ca_cert.resolve()}"\n')

        # ----------------------------------------------------------------- register two sites (not the third), both at once
        node_ids = {}
        registering = {site.name: flwr_start("supernode", "register", str(site.public_key), CONNECTION,
                                             "--name", site.name, "--format", "json") for site in registered}
        for site in registered:
            res = _collect(registering[site.name], 60)
            assert res.returncode == 0, f"registering {site.name} failed:\n{res.stdout}\n{res.stderr}\n{diagnose()}"
            out = _json_out(res.stdout)
            assert out["success"], out
            node_ids[site.name] = int(out["node-id"])

        # ----------------------------------------------------------------- the sites, each with its own data folder
        sites = {}
        for site in registered:
            data_dir = data_dirs[site.name]
            state_dir = tmp_path / site.name / "state"
            sites[site.name] = state_dir
            procs.start(site.name, [
                _which("flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(site.ca_cert), "--auth-supernode-private-key", str(site.private_key),
                "--port", str(_free_port()),
                "--node-config", f"data-dir='{data_dir}' state-dir='{state_dir}' threads=1",
            ], flwr_home=tmp_path / site.name / "flwr-home", cwd=tmp_path / site.name)

        # ----------------------------------------------------------------- start the run at once
        # (the ServerApp waits until the configured number of sites is connected)
        launcher = procs.start("flwr-run", [_which("flwr"), *cmd[1:], "--format", "json"], flwr_home=cli_home,
                               cwd=tmp_path, stderr_apart=True)

        # ----------------------------------------------------------------- an unregistered site is refused
        intruder_proc = procs.start("unregistered", [
            _which("flower-supernode"), "--superlink", f"127.0.0.1:{port}",
            "--root-certificates", str(intruder.ca_cert), "--auth-supernode-private-key", str(intruder.private_key),
            "--port", str(_free_port()),
            "--node-config", f"data-dir='{tmp_path / registered[0].name / 'scans'}' state-dir='{tmp_path / 'intruder'}'",
        ], flwr_home=tmp_path / "intruder" / "flwr-home", cwd=tmp_path)
        try:
            code = intruder_proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the unregistered SuperNode was not refused within 90 s\n{diagnose()}")
        refusal = procs.log("unregistered").read_text(errors="replace")
        assert code != 0, f"the unregistered SuperNode exited with code {code}\n{refusal}"
        assert "Exit Code: 305" in refusal and "Failed to activate SuperNode" in refusal, refusal
        assert "No SuperNode found with the given public key" in procs.log("superlink").read_text(errors="replace")

        # ----------------------------------------------------------------- both registered sites come online
        def online() -> set[int] | None:
            res = flwr("supernode", "list", CONNECTION, "--format", "json")
            if res.returncode != 0:
                return None
            nodes = {int(n["node-id"]): n["status"] for n in _json_out(res.stdout)["nodes"]}
            assert set(nodes) == set(node_ids.values()), f"unexpected SuperNodes at the SuperLink: {nodes}"
            return set(nodes) if all(s == "online" for s in nodes.values()) else None

        alive = [(name, procs.started[name]) for name in ("superlink", *sites)]
        _wait_for("both registered SuperNodes to be online", online, 90, interval=2, alive=alive, diagnose=diagnose)

        # ----------------------------------------------------------------- the run was accepted
        try:
            code = launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"flwr run did not return within 120 s\n{diagnose()}")
        launched = procs.log("flwr-run").read_text()
        assert code == 0, f"flwr run failed:\n{launched}\n{(procs.logs / 'flwr-run.err').read_text()}\n{diagnose()}"
        run_id = str(_json_out(launched)["run-id"])

        def run_logs() -> str:
            r = flwr("log", run_id, CONNECTION, "--show", timeout=30)
            return f"--- flwr log {run_id} ---\n{r.stdout}{r.stderr}\n{diagnose()}"

        def status() -> str:
            r = flwr("list", CONNECTION, "--run-id", run_id, "--format", "json")
            return _json_out(r.stdout)["runs"][0]["status"] if r.returncode == 0 else ""

        def serverapp_running() -> bool:
            return any(b"flwr-serverapp" in _cmdline(pid) for pid in procs._marked())

        # The CLI costs seconds of CPU that the sites need: it is asked once the ServerApp has exited without
        # a summary, and otherwise once a minute.
        seen, last_check = [False], [time.monotonic()]

        def finished() -> str | None:
            if (run_dir / "summary.json").exists():
                return "summary"
            running = serverapp_running()
            seen[0] = seen[0] or running
            if (seen[0] and not running) or time.monotonic() - last_check[0] > 60:
                last_check[0] = time.monotonic()
                s = status()
                if s.startswith("finished"):
                    return s
            return None

        how = _wait_for(f"run {run_id} to finish", finished, 360, interval=1, alive=alive, diagnose=run_logs)
        final = _wait_for(f"run {run_id} to be reported finished", lambda: (s := status()).startswith("finished") and s,
                          60, interval=2, diagnose=run_logs)
        assert final == "finished:completed", f"{how}, {final}\n{run_logs()}"

        # ----------------------------------------------------------------- what the run left behind
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["method"] == "medfedpure" and summary["sites"] == 2
        assert len(summary["per_site"]) == 2
        rows = [json.loads(line) for line in (run_dir / "metrics" / "rounds.jsonl").read_text().splitlines() if line]
        for kind in ("train", "eval"):
            nodes = {r["node"] for r in rows if r["kind"] == kind and r["round"] == 1}
            assert nodes == set(node_ids.values()), f"{kind} rows from {nodes}, expected {node_ids}"
        state = json.loads((run_dir / "server" / "state.json").read_text())
        assert state["denoiser"] == state["classifier"] == 1
        assert set(state["phase_seconds"]) == {"denoiser", "classifier"}
        for name, state_dir in sites.items():
            assert (state_dir / "classifier.pt").is_file(), f"{name} kept no classifier in {state_dir}"
    finally:
        killed = procs.stop_all()
        print(f"deployment test: {time.monotonic() - t0:.0f} s; had to kill: {killed or 'nothing'}")
    assert not procs._marked(), "processes of the test are still running"

    # --------------------------------------------------------------------- a site exports its bundle
    # With what it holds: its state-dir, its scans, the run's global files copied from the SuperLink machine,
    # and its own signing key (made on first use in its MEDFEDPURE_HOME).
    from export.deployment import global_files

    site = registered[0].name
    global_copy = tmp_path / site / "global" / run_dir.name
    for name in global_files(profile):
        (global_copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / name, global_copy / name)
    site_env = procs.env(tmp_path / site / "flwr-home")
    site_env["MEDFEDPURE_HOME"] = str(tmp_path / site / "medfedpure-home")

    def site_command(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=site_env, cwd=ROOT,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    running: list[subprocess.Popen] = []

    def site_start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=site_env, cwd=ROOT, stdin=subprocess.DEVNULL)
        running.append(proc)
        return proc

    try:
        # another site's scans are refused (checked below): the bundle is calibrated and checked on the site's own
        other = registered[1].name
        refused = site_start("-m", "export", "--site-state", str(sites[site]), "--global", str(global_copy),
                             "--data-dir", str(tmp_path / other / "scans"), "--out", str(tmp_path / site / "other"))
        bundle = tmp_path / site / "bundle"
        res = site_command("-m", "export", "--site-state", str(sites[site]), "--global", str(global_copy),
                           "--data-dir", str(tmp_path / site / "scans"), "--out", str(bundle), "--no-int8")
        assert res.returncode == 0, f"the site's export failed:\n{res.stdout}\n{res.stderr}"
        key = tmp_path / site / "medfedpure-home" / "signing" / "ed25519.pub"
        info = site_start("-m", "runtime.cli", "info", "--bundle", str(bundle), "--trusted-key", str(key))
        _check_site_bundle(bundle, key, sites[site], tmp_path / site / "scans", profile)
        res = _collect(info, 120)
        assert res.returncode == 0 and "signed by" in res.stdout, f"{res.stdout}\n{res.stderr}"

        res = _collect(refused, 300)
        assert res.returncode == 2 and "not the scans this site trained on" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / site / "other").exists()
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _check_site_bundle(bundle: Path, key: Path, state_dir: Path, data_dir: Path, profile) -> None:
    """The bundle is complete, signed by the site, made from the site's own split, and classifies the site's scans."""
    import numpy as np
    import torch

    from runtime.bundle import Bundle
    from runtime.engines import OrtEngine
    from training.data.datasets import load_dataset

    b = Bundle.load(bundle, trusted=[key])
    assert b.signature.status == "verified", b.signature
    m = b.manifest
    names = ("classifier", "detector", "denoiser")
    assert {f"{n}{ext}" for n in names for ext in (".onnx", ".fp16.onnx", ".pt2")} <= set(m["files"])
    assert m["parity"]["passed"] and m["class_names"] == ["no", "yes"]
    assert m["provenance"]["profile"]["federated"]["method"] == "medfedpure"
    site_ck = torch.load(state_dir / "classifier.pt", map_location="cpu", weights_only=False)
    assert m["provenance"]["split_digest"] == site_ck["split_digest"]
    data = load_dataset(str(data_dir), profile.preprocess, seed=profile.seed, cache=False, progress=False)
    assert m["detector"]["calibration"]["n_scans"] == len(data["val"])
    x = data["test"].images[:, None].astype(np.float32)
    probs = OrtEngine(b, threads=1).classify(x)
    assert probs.shape == (len(x), 2) and np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_a_site_export_names_what_is_missing(tmp_path, capsys):
    """A state folder or run folder that is missing a part is refused in one line that names it (exit 2)."""
    import torch

    from export.__main__ import main
    from training import config as cfgmod
    from training.checkpoint import save_checkpoint
    from training.data.phantom import write_dataset
    from training.federated import task
    from training.federated.deploy import prepare_deployment
    from training.models import create_model

    profile = cfgmod.resolve("tiny", {"federated": {"method": "medfedpure", "sites": 2, "rounds": 1}})
    run = prepare_deployment(profile, tmp_path / "run")
    model = task.build_model("classifier", profile)
    local = task.local_keys("classifier", model, profile)
    state = model.state_dict()
    (run / "server").mkdir()
    (run / "server" / "state.json").write_text(json.dumps({"denoiser": 1, "classifier": 1}))
    torch.save({k: v for k, v in state.items() if k not in local}, run / "server" / "classifier.pt")
    save_checkpoint(run / "denoiser" / "best.pt", component="denoiser", model=create_model("denoiser", profile).state_dict(),
                    config=cfgmod.to_dict(profile))
    site = tmp_path / "state"
    save_checkpoint(site / "classifier.pt", component="classifier", model=state, epoch=1, split_digest="0" * 64,
                    config=cfgmod.to_dict(task.classifier_profile(profile)), class_names=["no", "yes"])
    torch.save({k: v for k, v in state.items() if k in local}, site / "classifier-local-round1.pt")
    scans = tmp_path / "scans"
    write_dataset(scans, 12, size=40, seed=3, progress=False)

    def refused(*, state=site, glob=run, data=scans) -> str:
        code = main(["--site-state", str(state), "--global", str(glob), "--data-dir", str(data),
                     "--out", str(tmp_path / "bundle")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bundle").exists()
        return err

    def without(path: Path, expected: str) -> None:
        hidden = path.with_name(path.name + ".away")
        path.rename(hidden)
        try:
            assert expected in refused(), expected
        finally:
            hidden.rename(path)

    assert "no such site state folder" in refused(state=tmp_path / "nowhere")
    without(run / "config.toml", "run/config.toml is missing")
    without(run / "server" / "state.json", "run/server/state.json is missing")
    without(run / "server" / "classifier.pt", "run/server/classifier.pt is missing")
    without(run / "denoiser" / "best.pt", "run/denoiser/best.pt is missing")
    without(site / "classifier.pt", "state/classifier.pt is missing")
    without(site / "classifier-local-round1.pt", "state/classifier-local-round1.pt is missing")
    # the run is not over
    (run / "server" / "state.json").write_text(json.dumps({"denoiser": 1, "classifier": 0}))
    assert "finished classifier round 0 of 1" in refused()
    (run / "server" / "state.json").write_text(json.dumps({"denoiser": 1, "classifier": 1}))
    # the site's gates are not those of its last classifier
    gates = {k: v + 1 if v.is_floating_point() else v for k, v in state.items() if k in local}
    torch.save(gates, site / "classifier-local-round1.pt")
    assert "not from the same run" in refused()
    torch.save({k: v for k, v in state.items() if k in local}, site / "classifier-local-round1.pt")
    # scans other than those the site trained on
    assert "not the scans this site trained on" in refused()
    # a run without a denoiser
    fedavg = cfgmod.resolve("tiny", {"federated": {"method": "fedavg", "sites": 2, "rounds": 1}})
    other = prepare_deployment(fedavg, tmp_path / "fedavg")
    assert "only a medfedpure run can be bundled" in refused(glob=other)
    # --site-state needs --global and --data-dir
    with pytest.raises(SystemExit) as exc:
        main(["--site-state", str(site), "--out", str(tmp_path / "bundle")])
    assert exc.value.code == 2
