"""Create or update the project's virtual environment without ever replacing torch.

Used by `make test` and `make demo`; standard library only, so any Python >= 3.10 can run it.

Rules (see FACTS.md in the design notes):
- If the interpreter running this script already has torch (a GPU box: CUDA torch, no network),
  the venv sees that interpreter's packages and nothing already there is reinstalled.
- Otherwise torch is installed first with an exact pin (`torch==2.13.0`, a CPU wheel on our
  machines) and triton with the version that torch pairs with; everything else is then installed
  with ranges that the installed torch satisfies, so pip never resolves a newer (CUDA) torch.
- interlace itself is installed editable with `--no-deps --no-build-isolation`: an isolated
  build environment would resolve build requirements from the network.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

TORCH_PIN = "torch==2.13.0"
TRITON_PIN = "triton==3.7.1"
# Distribution name -> requirement used when it is missing. Ranges only: torch is already there.
REQUIREMENTS = {
    "numpy": "numpy>=1.24",
    "nvidia-ml-py": "nvidia-ml-py>=12.535",
    "pytest": "pytest>=7.4",
    "pytest-timeout": "pytest-timeout>=2.1",
    "setuptools": "setuptools>=70.1",  # builds editable wheels without the `wheel` package
    "transformers": "transformers>=4.48",  # tests: parallelize() on Hugging Face Llama
    "pybind11": "pybind11>=2.12",  # builds interlace._C (with cmake from the system)
}
LINK_FILE = "_interlace_base_site.pth"
PROBE = (
    "import importlib.metadata as m, json, sys\n"
    "out = {}\n"
    "for name in sys.argv[1:]:\n"
    "    try: out[name] = m.version(name)\n"
    "    except m.PackageNotFoundError: out[name] = None\n"
    "print(json.dumps(out))\n"
)


def plan_installs(installed: dict[str, str | None], linux: bool) -> list[list[str]]:
    """The pip install steps, in order, for what `installed` (name -> version or None) lacks."""
    steps = []
    if installed.get("torch") is None:
        steps.append([TORCH_PIN])
    if linux and installed.get("triton") is None:
        steps.append([TRITON_PIN])
    missing = [req for name, req in REQUIREMENTS.items() if not satisfies(installed.get(name), req)]
    if missing:
        steps.append(missing)
    return steps


def satisfies(version: str | None, requirement: str) -> bool:
    """Whether an installed version meets a `name>=X.Y` requirement (a bare name: any version)."""
    if version is None:
        return False
    _, _, minimum = requirement.partition(">=")
    return not minimum or _release(version) >= _release(minimum)


def _release(version: str) -> tuple[int, ...]:
    """(2, 13, 0) from '2.13.0+cpu' or '2.13.0rc1': the leading numeric release segment."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(piece):
            break
    return tuple(parts)


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def has_torch() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def create_venv(venv_dir: Path) -> None:
    """A venv that also sees this interpreter's packages when it already has torch.

    A sharing venv gets no pip or setuptools of its own: the interpreter's serve, where a bundled
    older setuptools (Python 3.11 ships 65) would shadow them and fail offline.
    """
    share = has_torch()
    print(f"bootstrap: creating {venv_dir} (sees {sys.executable}'s packages: {share})")
    venv.EnvBuilder(with_pip=not share, system_site_packages=share).create(venv_dir)
    if share and sys.prefix != sys.base_prefix:
        # This interpreter is itself a venv: --system-site-packages would expose its *base*
        # interpreter, not the venv where torch lives. Link that venv's site-packages explicitly,
        # with addsitedir so that their own .pth files (such as this link, one venv further) count.
        sites = [p for p in site.getsitepackages() if os.path.isdir(p)]
        target = Path(
            subprocess.check_output(
                [venv_python(venv_dir), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                text=True,
            ).strip()
        )
        (target / LINK_FILE).write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in sites))


def installed_versions(python: Path, names: list[str]) -> dict[str, str | None]:
    out = subprocess.check_output([python, "-c", PROBE, *names], text=True)
    return json.loads(out)


def pip(python: Path, *args: str, why: str | None = None) -> None:
    """``pip install args``; ``why``: what a failure means, if not a package that could not be had."""
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    print("bootstrap:", " ".join(cmd[1:]), flush=True)
    if subprocess.call(cmd) != 0:
        why = why or f"If this machine is offline, install the missing packages into {sys.executable} first; nothing else was changed."
        raise SystemExit(f"bootstrap: `{' '.join(cmd)}` failed. {why}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path(".venv"))
    parser.add_argument("--extra", action="append", default=[], help="extra 'name=requirement' to ensure")
    args = parser.parse_args(argv)
    for item in args.extra:
        name, _, req = item.partition("=")
        REQUIREMENTS[name] = req or name
    python = venv_python(args.venv)
    if not python.exists():
        create_venv(args.venv)
    names = ["torch", "triton", *REQUIREMENTS]
    before = installed_versions(python, names)
    for step in plan_installs(before, linux=sys.platform.startswith("linux")):
        pip(python, *step)
    after = installed_versions(python, names)
    if before["torch"] is not None and after["torch"] != before["torch"]:
        raise SystemExit(f"bootstrap: torch changed from {before['torch']} to {after['torch']}; refusing")
    pip(python, "--no-deps", "--no-build-isolation", "-e", str(Path(__file__).resolve().parents[1]),
        why="Building interlace's extension (interlace._C) failed: the CMake, compiler or nvcc errors are above.")
    print(f"bootstrap: ready: torch {after['torch']}, triton {after['triton']}, python {python}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
