"""The job's own Python environment on an instance, layered on the agent's.

A job's ``setup`` often runs ``pip install -r requirements.txt``. Run with
the agent's own interpreter, that would install into the environment GPU
Scout itself runs in: on a local instance, the control plane's, shared with
every other job (a project pinning ``numpy<2`` would change them all). So
each instance gets a small virtual environment of the job's own
(``make_job_env``): made without pip and in milliseconds, it sees every
package the agent's interpreter sees (gpuscout, the image's PyTorch) through
a ``.pth`` file that adds those folders as site folders, after its own. What
pip installs in it shadows them and stays on this instance; pip refuses to
uninstall what lies outside the environment, so the agent's packages are
never touched. ``pip``/``pip3`` in it run ``python -m pip`` with the pip
the agent's environment has.

This is how a venv with ``--system-site-packages`` relates to its base
interpreter (PEP 405), extended to a base that is itself a venv, which that
option cannot reach.
"""

from __future__ import annotations

import os
import site
import sys
import venv
from collections.abc import Mapping
from pathlib import Path

PTH_FILE = "_gpuscout_base.pth"
_PIP_SHIM = '#!/bin/sh\nexec "$(dirname "$0")/python" -m pip "$@"\n'


def base_site_dirs() -> list[str]:
    """The site folders of the running interpreter, in its order (its venv's
    site-packages, or the system's dist-packages on an image without one)."""
    dirs = [*site.getsitepackages()]
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def make_job_env(folder: Path) -> Path:
    """Create (or reuse) the job's environment at ``folder``; return its bin
    folder. Raises OSError if it cannot be made."""
    bin_dir = folder / "bin"
    if not (bin_dir / "python").exists():
        venv.EnvBuilder(with_pip=False, symlinks=True, clear=False).create(folder)
    purelib = Path(folder, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}",
                   "site-packages")
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in base_site_dirs())
    (purelib / PTH_FILE).write_text(lines)
    for name in ("pip", "pip3"):
        shim = bin_dir / name
        if not shim.exists():
            shim.write_text(_PIP_SHIM)
            shim.chmod(0o755)
    return bin_dir


def job_env_vars(env: Mapping[str, str], bin_dir: Path) -> dict[str, str]:
    """``env`` with the job's environment active, as its bin/activate would
    make it: first on PATH, and VIRTUAL_ENV."""
    rest = [d for d in env.get("PATH", os.defpath).split(os.pathsep) if d and d != str(bin_dir)]
    return {**env, "PATH": os.pathsep.join([str(bin_dir), *rest]),
            "VIRTUAL_ENV": str(bin_dir.parent)}
