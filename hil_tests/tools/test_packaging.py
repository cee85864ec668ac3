"""A non-editable install must carry everything the commands read at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_package_data_and_the_console_script(tmp_path: Path) -> None:
    # Build from a copy: setuptools leaves build/ behind, and a stale build/ would ship deleted files.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "var"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        cwd=src,
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fogmesh-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in (
        "tools/configs/demo.toml",
        "tools/configs/example.toml",
        "gateway/py.typed",
        "firmware/README.md",
        "gateway/runtime.py",
        "retrofit_adapters/simulated/adapter.py",
        "models/__init__.py",
        "models/testdata/tiny_ae_int8.tflite",
        "firmware/fogmesh/int8.py",
    ):
        assert must in names, must
    assert not any(n.startswith("hil_tests/") for n in names), "tests are not shipped"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fogmesh = tools.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()

    # Installed without the source tree, the demo config is still found.
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "import tools.demo as d; print(len(d.demo_config_text()) > 100, d.__file__)",
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    flag, path = out.stdout.split()
    assert flag == "True"
    assert path.startswith(str(target))
