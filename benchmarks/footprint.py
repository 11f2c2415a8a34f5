"""Peak resident memory of the `edge-ad` process on a video, and the installed size of the runtime.

Why: the industrial PC is small. The issue asks how much RAM the runtime takes while it runs a real
model (FP32 and INT8), and how much disk a runtime-only install (`pip install edge-ad`, no torch) needs.

    python -m benchmarks.footprint --variants variants.json --out benchmarks/results

Method:
- peak RSS: `python -m edge_ad --video V --model B --mode M` (publishing to a throw-away mosquitto when
  installed, else JSON lines) is started by a fresh wrapper process (`python -c WRAPPER`) that does only
  that; after the child exits, the wrapper's `getrusage(RUSAGE_CHILDREN).ru_maxrss` is the child's peak
  resident set (the kernel's VmHWM; a fresh wrapper so that no earlier child is in the maximum). The
  wrapper also samples the child's /proc/PID/status VmRSS every 50 ms: the median of the second half of
  the run is reported as the steady RSS. Per bundle and performance mode (latency = edge-ad's default,
  throughput = more streams and requests). Baseline: the same for a process that only imports the
  runtime's libraries (numpy, OpenCV, OpenVINO, paho-mqtt).
- installed size: a virtual environment made with this Python (`python -m venv`, then `pip install` of a
  copy of the package sources, base install without extras, as tests/test_runtime_clean_venv.py does),
  cached under --venv-cache and rebuilt only when pyproject.toml or the Python changes (or
  --rebuild-venv). Reported: the whole venv and its site-packages, apparent size and disk usage
  (allocated blocks, hard links once), the largest packages, pip's own share. The Python interpreter
  itself (a symlink to the system's) is not counted.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import pipeline_fps as pf
from benchmarks.speed import (BenchmarkError, InputError, base_parser, check_variant, log, machine, machine_line,
                              read_variants, run_cli, select_variants)
from benchmarks.variants import Variant

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-ad-bench" / "runtime-venv"
RUNTIME_IMPORTS = "import numpy, cv2, openvino, paho.mqtt.client"

# Runs argv[2:] (JSON list) as its only child, samples its VmRSS, writes a JSON result to argv[1].
WRAPPER = r"""
import json, resource, statistics, subprocess, sys, time
out, cmd = sys.argv[1], json.loads(sys.argv[2])
start = time.monotonic()
child = subprocess.Popen(cmd)
samples = []
while child.poll() is None:
    try:
        with open(f"/proc/{child.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    samples.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    time.sleep(0.05)
rc = child.wait()
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
tail = samples[len(samples) // 2:]
with open(out, "w") as f:
    json.dump({"returncode": rc, "peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": time.monotonic() - start,
               "cpu_s": usage.ru_utime + usage.ru_stime, "rss_samples": len(samples),
               "steady_rss_bytes": int(statistics.median(tail)) if tail else None}, f)
"""


# -- peak RSS ---------------------------------------------------------------------------------------

def peak_rss(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: float = 600.0) -> dict:
    """Peak (and steady) resident memory of `cmd`, run as the only child of a fresh wrapper process.

    ru_maxrss is in KiB on Linux (bytes on macOS, where this reports 1024x too much; Linux is the target).
    """
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        result_file = Path(tmp) / "rss.json"
        proc = subprocess.run([sys.executable, "-c", WRAPPER, str(result_file), json.dumps([str(c) for c in cmd])],
                              capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
        if proc.returncode != 0 or not result_file.is_file():
            raise BenchmarkError(f"the memory wrapper failed (exit {proc.returncode}): {pf._tail(proc.stderr, 3)}")
        result = json.loads(result_file.read_text())
    result["stderr_tail"] = pf._tail(proc.stderr, 4)
    if result["returncode"] != 0:
        raise BenchmarkError(f"{' '.join(map(str, cmd[:6]))} ... exited {result['returncode']}:\n{result['stderr_tail']}")
    return result


def edge_ad_rss(bundle: Path, video: Path, *, mode: str, frames: int, broker, workdir: Path, tag: str,
                timeout: float = 600.0) -> dict:
    """Peak RSS of `edge-ad --video` on one bundle, as an operator would run it."""
    args = ["--video", video, "--model", bundle, "--mode", mode, "--max-frames", frames, "--heartbeat", "5",
            "--device-id", f"footprint-{tag}", "--log-level", "warning"]
    args += ["--mqtt-host", "127.0.0.1", "--mqtt-port", broker.port] if broker else ["--jsonl", workdir / f"{tag}.jsonl"]
    load = pf.load_average()
    result = peak_rss(pf._edge_ad(*args), cwd=pf.REPO, env=pf._env(), timeout=timeout)
    result["load_average"] = [load, pf.load_average()]
    return result


def baseline_rss() -> dict:
    """A process that only imports the runtime's libraries: the floor under any edge-ad run."""
    return peak_rss([sys.executable, "-c", RUNTIME_IMPORTS], cwd=REPO)


# -- installed size ---------------------------------------------------------------------------------

def dir_size(path: Path) -> dict:
    """Apparent bytes and disk usage (allocated blocks) of a tree; symlinks not followed, hard links once."""
    apparent = disk = files = 0
    seen: set[tuple[int, int]] = set()
    for root, dirs, names in os.walk(path):
        for name in names + dirs:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if os.path.islink(os.path.join(root, name)):
                continue
            disk += st.st_blocks * 512
            if name in names:
                apparent += st.st_size
                files += 1
    return {"apparent_bytes": apparent, "disk_bytes": disk, "files": files}


def _cache_key(repo: Path) -> str:
    """What decides what a base install contains: pyproject.toml (dependencies) and the Python."""
    digest = hashlib.sha256((repo / "pyproject.toml").read_bytes())
    digest.update(f"{sys.version} {platform.machine()}".encode())
    return digest.hexdigest()[:16]


def _package_dirs(repo: Path) -> list[str]:
    try:
        import tomllib

        patterns = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    except (ImportError, KeyError):
        patterns = ["edge_ad*", "training*", "deploy*", "calibration*"]
    tops = {p.split(".")[0] for p in patterns}
    return sorted(d.name for d in repo.iterdir()
                  if d.is_dir() and (d / "__init__.py").is_file() and any(fnmatch.fnmatch(d.name, t) for t in tops))


def _clean_env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}}
    env.update(PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]), VIRTUAL_ENV=str(venv),
               PYTHONNOUSERSITE="1")
    return env


def ensure_runtime_venv(cache: Path, repo: Path = REPO, rebuild: bool = False, timeout: float = 900.0) -> dict:
    """The cached runtime-only venv (built when missing or stale); its path and how it was made.

    Built from a copy of pyproject.toml, README, LICENSE and the package folders, so pip writes no
    build/ or egg-info into the working tree.
    """
    cache = Path(cache)
    venv, marker = cache / "venv", cache / "built.json"
    key = _cache_key(repo)
    if not rebuild and marker.is_file() and (venv / "bin" / "python").exists():
        info = json.loads(marker.read_text())
        if info.get("key") == key:
            log(f"footprint: reusing the runtime venv in {venv} (built {info.get('built')})")
            return {**info, "venv": str(venv), "cached": True}
    log(f"footprint: building a runtime-only venv in {venv} (pip install, base package; a minute or more) ...")
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise BenchmarkError(f"python -m venv failed: {pf._tail(proc.stderr, 3)}")
    src = cache / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (repo / name).is_file():
            shutil.copy2(repo / name, src / name)
    for name in _package_dirs(repo):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                           str(src)], capture_output=True, text=True, timeout=timeout, cwd=cache, env=_clean_env(venv))
    shutil.rmtree(src, ignore_errors=True)
    if proc.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        raise BenchmarkError(f"pip install of the runtime failed (exit {proc.returncode}): {pf._tail(proc.stderr, 3)}")
    info = {"key": key, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_s": round(time.monotonic() - started, 1),
            "python": platform.python_version()}
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "venv": str(venv), "cached": False}


def site_packages(venv: Path) -> Path:
    found = sorted(Path(venv).glob("lib/python*/site-packages"))
    if not found:
        raise BenchmarkError(f"no lib/python*/site-packages in {venv}")
    return found[0]


def measure_venv(venv: Path, top: int = 10) -> dict:
    """Sizes of a venv, its site-packages and its largest top-level entries; what is installed."""
    venv = Path(venv)
    site = site_packages(venv)
    entries = []
    for entry in site.iterdir():
        size = dir_size(entry) if entry.is_dir() else {"apparent_bytes": entry.stat().st_size,
                                                       "disk_bytes": entry.stat().st_blocks * 512, "files": 1}
        entries.append({"name": entry.name, **size})
    entries.sort(key=lambda e: e["disk_bytes"], reverse=True)
    tooling = [e for e in entries if e["name"].split("-")[0].lower() in {"pip", "setuptools", "_distutils_hack",
                                                                       "distutils-precedence.pth"}]
    result = {"venv": str(venv), "venv_size": dir_size(venv), "site_packages_size": dir_size(site),
              "pip_setuptools_disk_bytes": sum(e["disk_bytes"] for e in tooling), "largest": entries[:top]}
    python = venv / "bin" / "python"
    if python.exists():
        proc = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                              capture_output=True, text=True, timeout=120, env=_clean_env(venv))
        if proc.returncode == 0:
            packages = {p["name"].lower(): p["version"] for p in json.loads(proc.stdout)}
            result["packages"] = packages
            result["torch_installed"] = "torch" in packages
    return result


# -- the whole measurement --------------------------------------------------------------------------

def measure_footprint(variants: list[Variant], out_dir: Path, *, category: str = "bottle", frames: int = 200,
                      modes: tuple[str, ...] = ("latency", "throughput"), venv: bool = True,
                      venv_cache: Path | None = None, rebuild_venv: bool = False, mqtt: bool | None = None,
                      video_size: tuple[int, int] = (256, 256), timeout: float = 600.0) -> dict:
    """Peak RSS of edge-ad per (variant, FP32/INT8, mode) and the runtime venv's size; footprint.json / .md."""
    if frames < 10 or not modes or any(m not in ("latency", "throughput") for m in modes):
        raise InputError("need frames >= 10 and modes from latency, throughput")
    chosen = select_variants(variants, category)
    for variant in chosen:
        check_variant(variant, need=("fp32", "int8"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    log(f"footprint: {machine_line(info)}")
    mosquitto = pf.find_mosquitto()
    use_mqtt = bool(mosquitto) if mqtt is None else mqtt
    if use_mqtt and not mosquitto:
        raise InputError("MQTT publishing needs the mosquitto binary (apt-get install mosquitto)")

    log("footprint: baseline (imports only) ...")
    baseline = baseline_rss()
    rows = []
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        workdir = Path(tmp)
        log(f"footprint: writing a synthetic {video_size[0]}x{video_size[1]} video of {frames} frames ...")
        video = pf.synthetic_video(workdir / "synthetic.avi", frames, *video_size)
        broker = pf.Mosquitto(workdir, binary=mosquitto) if use_mqtt else None
        if broker is not None:
            broker.__enter__()
        try:
            for i, variant in enumerate(chosen):
                for kind in ("fp32", "int8"):
                    for mode in modes:
                        log(f"footprint: edge-ad --video on {variant.name} {kind}, {mode} mode ...")
                        r = edge_ad_rss(getattr(variant, kind), video, mode=mode, frames=frames, broker=broker,
                                        workdir=workdir, tag=f"{i}-{kind}-{mode}", timeout=timeout)
                        log(f"footprint:   peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
                        rows.append({"variant": variant.name, "algorithm": variant.algorithm,
                                     "backbone": variant.backbone, "category": variant.category, "precision": kind,
                                     "bundle": str(getattr(variant, kind)), "mode": mode, "frames": frames,
                                     **{k: r[k] for k in ("peak_rss_bytes", "steady_rss_bytes", "wall_s", "cpu_s",
                                                          "rss_samples", "load_average")}})
        finally:
            if broker is not None:
                broker.__exit__()
    runtime = None
    if venv:
        built = ensure_runtime_venv(venv_cache or DEFAULT_VENV_CACHE, rebuild=rebuild_venv)
        runtime = {**measure_venv(Path(built["venv"])), "build": built}
    report = {"machine": info, "load_average_end": pf.load_average(),
              "settings": {"category": category, "frames": frames, "modes": list(modes),
                           "video": f"{video_size[0]}x{video_size[1]} synthetic",
                           "publishing": "MQTT to a local mosquitto" if use_mqtt else "JSON lines to a file"},
              "baseline": {"command": f"python -c '{RUNTIME_IMPORTS}'",
                           **{k: baseline[k] for k in ("peak_rss_bytes", "steady_rss_bytes")}},
              "edge_ad": rows, "runtime_env": runtime}
    (out_dir / "footprint.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "footprint.md").write_text(markdown(report) + "\n")
    return report


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"Machine: {machine_line(report['machine'])}.",
        "",
        f"Peak resident memory (ru_maxrss = VmHWM) of the `edge-ad` process on a {s['video']} video of "
        f"{s['frames']} frames, {s['publishing']}; steady = median VmRSS over the second half of the run. "
        f"Baseline (a process importing only numpy, OpenCV, OpenVINO, paho-mqtt): peak "
        f"{_mib(report['baseline']['peak_rss_bytes'])} MiB.",
        "",
        "| algorithm | backbone | model | mode | peak RSS (MiB) | steady RSS (MiB) |",
        "|---|---|---|---|---:|---:|",
    ]
    for row in report["edge_ad"]:
        lines.append(f"| {row['algorithm'].upper()} | {row['backbone']} | {row['precision'].upper()} IR | {row['mode']} | "
                     f"{_mib(row['peak_rss_bytes'])} | {_mib(row['steady_rss_bytes'])} |")
    env = report.get("runtime_env")
    if env:
        venv, site = env["venv_size"], env["site_packages_size"]
        versions = env.get("packages", {})
        named = ", ".join(f"{n} {versions[n]}" for n in ("openvino", "numpy", "opencv-python-headless", "paho-mqtt")
                          if n in versions)
        lines += [
            "",
            f"Runtime-only environment (`python -m venv` + `pip install .`, base package, Python "
            f"{env['build']['python']}; {named}; torch installed: {env.get('torch_installed')}): "
            f"venv **{venv['disk_bytes'] / 1e6:.0f} MB** on disk ({venv['apparent_bytes'] / 1e6:.0f} MB apparent, "
            f"{venv['files']} files), site-packages {site['disk_bytes'] / 1e6:.0f} MB, of which pip/setuptools "
            f"{env['pip_setuptools_disk_bytes'] / 1e6:.0f} MB. The Python interpreter itself is not included.",
            "",
            "| largest in site-packages | MB on disk |",
            "|---|---:|",
        ]
        lines += [f"| {e['name']} | {e['disk_bytes'] / 1e6:.1f} |" for e in env["largest"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = base_parser("python -m benchmarks.footprint",
                         "Peak RSS of edge-ad on a video (FP32, INT8) and the installed size of the runtime.")
    parser.add_argument("--frames", type=int, default=200, help="frames per edge-ad run (default: 200)")
    parser.add_argument("--modes", default="latency,throughput",
                        help="comma-separated performance modes to run (default: latency,throughput)")
    parser.add_argument("--venv-cache", type=Path, default=DEFAULT_VENV_CACHE,
                        help=f"where the runtime venv is kept between runs (default: {DEFAULT_VENV_CACHE})")
    parser.add_argument("--rebuild-venv", action="store_true", help="rebuild the cached runtime venv")
    parser.add_argument("--no-venv", dest="venv", action="store_false", help="skip the installed-size measurement")
    parser.add_argument("--mqtt", action=argparse.BooleanOptionalAction, default=None,
                        help="publish to a throw-away mosquitto (default: when installed)")
    args = parser.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    return run_cli(lambda: measure_footprint(
        read_variants(args.variants), args.out, category=args.category, frames=args.frames, modes=modes,
        venv=args.venv, venv_cache=args.venv_cache, rebuild_venv=args.rebuild_venv, mqtt=args.mqtt), markdown)


if __name__ == "__main__":
    sys.exit(main())
