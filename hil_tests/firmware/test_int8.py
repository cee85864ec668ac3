"""firmware/fogmesh/int8.py on the MicroPython unix port: blob checks, shared vectors, .mpy build."""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from hil_tests.models.conftest import PER_CHANNEL
from models.export import VERSION, export
from models.parity import FIRMWARE_DIR, find_micropython
from models.tflm_math import INT32_MAX, INT32_MIN, multiply_by_quantized_multiplier

_PRELUDE = """import sys, json
with open(sys.argv[1] + "/args.json") as f:
    args = json.load(f)
sys.path.insert(0, args["firmware"])
"""


def _run_mp(workdir: Path, script: str, **args: object) -> str:
    # Arguments travel in a file: the port crashes on a command-line argument over 255 bytes.
    micropython = find_micropython()
    (workdir / "args.json").write_text(json.dumps({"firmware": str(FIRMWARE_DIR), **args}))
    (workdir / "script.py").write_text(_PRELUDE + script)
    proc = subprocess.run(
        [str(micropython), "-X", "heapsize=100k", str(workdir / "script.py"), str(workdir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


_LOAD_ALL = """
from fogmesh.int8 import Model, ModelError
for path in args["paths"]:
    try:
        Model(open(path, "rb").read())
        print("ok")
    except ModelError as e:
        print("ModelError:", e)
"""


def _recrc(blob: bytes) -> bytes:
    return blob[:-4] + struct.pack("<I", zlib.crc32(blob[:-4]))


def test_loader_rejects_corrupt_blobs(tmp_path: Path) -> None:
    good = export(PER_CHANNEL.read_bytes())
    flipped = bytearray(good)
    flipped[100] ^= 0x40
    cases = {
        "good": (good, "ok"),
        "magic": (_recrc(b"ABCD" + good[4:]), "ModelError: bad magic"),
        "version": (
            _recrc(good[:4] + struct.pack("<H", VERSION + 1) + good[6:]),
            f"ModelError: unsupported version {VERSION + 1}",
        ),
        "crc": (bytes(flipped), "ModelError: CRC mismatch"),
        "truncated": (good[:-10], "ModelError: blob length"),
        "short": (good[:20], "ModelError: blob truncated"),
        "layers": (
            _recrc(good[:6] + struct.pack("<H", 5) + good[8:]),
            "ModelError: blob truncated",
        ),
    }
    paths = []
    for name, (data, _) in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        paths.append(str(path))
    lines = _run_mp(tmp_path, _LOAD_ALL, paths=paths).splitlines()
    assert len(lines) == len(cases)
    for line, (name, (_, want)) in zip(lines, cases.items(), strict=True):
        assert line.startswith(want), (name, line)


_VECTORS = [
    (100, 1 << 30, 0),
    (100, 1 << 30, 2),
    (-100, 1 << 30, -1),
    (1, 1 << 30, -1),
    (-1, 1 << 30, -1),
    (-3, 1 << 30, -1),
    (12345, 1717986918, -3),
    (-12345, 1717986918, -3),
    (INT32_MIN, INT32_MIN, 0),
    (INT32_MAX, INT32_MAX, 0),
    (INT32_MIN, INT32_MAX, -31),
    (-(1 << 30), 1 << 30, -30),
    (987654, 2058989207, -8),
    (-987654, 2058989207, -8),
]


def test_firmware_mbqm_matches_host_vectors(tmp_path: Path) -> None:
    script = (
        "from fogmesh.int8 import mbqm\n"
        "print(json.dumps([mbqm(x, m, s) for x, m, s in args['vectors']]))"
    )
    got = json.loads(_run_mp(tmp_path, script, vectors=_VECTORS))
    assert got == [multiply_by_quantized_multiplier(*v) for v in _VECTORS]


def test_crc_fallback_matches_zlib(tmp_path: Path) -> None:
    data = export(PER_CHANNEL.read_bytes())
    script = "from fogmesh.int8 import _crc32_py\nprint(_crc32_py(bytes.fromhex(args['hex'])))"
    assert int(_run_mp(tmp_path, script, hex=data.hex())) == zlib.crc32(data)


def test_run_rejects_a_wrong_input_width(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(export(PER_CHANNEL.read_bytes()))
    script = (
        "from fogmesh.int8 import Model, ModelError\n"
        "m = Model(open(args['blob'], 'rb').read())\n"
        "try:\n    m.run(bytes(7))\nexcept ModelError as e:\n    print(e)"
    )
    out = _run_mp(tmp_path, script, blob=str(path))
    assert out.strip() == "input has 7 values, model takes 8"


@pytest.mark.parametrize("arch", ["xtensawin", "x64"])
def test_compiles_to_mpy(tmp_path: Path, arch: str) -> None:
    # xtensawin is the ESP32: the viper MAC loop must compile for it, not only for the host.
    mpy_cross = find_micropython().parent / "mpy-cross"
    out = tmp_path / "int8.mpy"
    proc = subprocess.run(
        [
            str(mpy_cross),
            f"-march={arch}",
            "-o",
            str(out),
            str(FIRMWARE_DIR / "fogmesh" / "int8.py"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:1] == b"M"
