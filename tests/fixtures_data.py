"""Real data for the data-pipeline tests, fetched once into the repository's ``.cache/``.

``imagenet_photos``: the 20 ImageNet validation photos that the PyPI package foolbox (MIT)
ships as ``foolbox/data/imagenet_<NN>_<class index>.jpg`` (512x512 or 1024x683). We download the
wheel with pip (no install) and unzip the photos. CI has network access to the package index;
the tests are skipped, saying so, only where pip cannot reach it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from infra import skip_or_fail

REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTO_CACHE = REPO_ROOT / ".cache" / "test-data" / "foolbox-imagenet"
FOOLBOX_REQUIREMENT = "foolbox==3.3.4"
NUM_PHOTOS = 20
_PHOTO_NAME = re.compile(r"^foolbox/data/(imagenet_(\d\d)_(\d+)\.jpg)$")
# What pip prints when it cannot reach the index at all.
_OFFLINE_SIGNS = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
                  "(from versions: none)", "ConnectTimeoutError", "ProxyError")


@pytest.fixture(scope="session")
def imagenet_photos() -> list[Path]:
    """Paths of the 20 real ImageNet photos, sorted by name."""
    photos = sorted(PHOTO_CACHE.glob("imagenet_*.jpg"))
    if len(photos) != NUM_PHOTOS:
        _fetch_photos(PHOTO_CACHE)
        photos = sorted(PHOTO_CACHE.glob("imagenet_*.jpg"))
    assert len(photos) == NUM_PHOTOS, f"expected {NUM_PHOTOS} photos in {PHOTO_CACHE}, found {len(photos)}"
    return photos


def photo_class_index(path: Path) -> int:
    """The ImageNet class index encoded in a foolbox photo's name."""
    return int(path.stem.split("_")[2])


def _fetch_photos(dest: Path) -> None:
    download_dir = dest.parent / "wheels"
    download_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(download_dir.glob("foolbox-*.whl"))
    if not wheels:
        env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}  # see docs/install.md
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "20",
             "--disable-pip-version-check", FOOLBOX_REQUIREMENT, "-d", str(download_dir)],
            capture_output=True, text=True, env=env)
        output = result.stdout + result.stderr
        if result.returncode != 0:
            if any(sign in output for sign in _OFFLINE_SIGNS):
                skip_or_fail(f"no network: cannot download {FOOLBOX_REQUIREMENT} for its ImageNet photos "
                            f"(CI has network access to the package index)")
            pytest.fail(f"pip download {FOOLBOX_REQUIREMENT} failed:\n{output[-2000:]}")
        wheels = sorted(download_dir.glob("foolbox-*.whl"))
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for member in wheel.namelist():
            match = _PHOTO_NAME.match(member)
            if match:
                tmp = dest / f".{match.group(1)}.tmp"
                tmp.write_bytes(wheel.read(member))
                tmp.replace(dest / match.group(1))  # concurrent test sessions never see half a file
