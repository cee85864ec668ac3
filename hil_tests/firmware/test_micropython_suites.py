"""Runs every MicroPython test file (hil_tests/firmware/mp/test_*.py) on the unix port, and tests
the runner (hil_tests/firmware/mp_runner.py) itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from models.parity import find_micropython

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "mp_runner.py"
REPO = HERE.parent.parent
SUITES = sorted((HERE / "mp").glob("test_*.py"))


def run_runner(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(find_micropython()), "-X", "heapsize=100k", str(RUNNER), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.parametrize("suite", SUITES, ids=[p.name for p in SUITES])
def test_suite(suite: Path) -> None:
    proc = run_runner(suite.relative_to(REPO))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert " passed, 0 failed in " in proc.stdout, output
    assert "PASSED" in proc.stdout


def test_suites_found() -> None:
    names = {p.name for p in SUITES}
    assert {"test_cbor.py", "test_frame.py", "test_keys.py"} <= names


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_runner_reports_pass_and_fail_in_definition_order(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "test_sample_order.py",
        "import mptest\n"
        "def test_zz_first():\n    assert 1 + 1 == 2\n\n"
        "def test_aa_second():\n    assert [] == [1], 'boom'\n\n"
        "def test_mm_third():\n    mptest.raises(ValueError, int, 'x')\n\n"
        "def helper():\n    raise RuntimeError\n",
    )
    proc = run_runner(f)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert lines == [
        f"{f}::test_zz_first PASSED",
        f"{f}::test_aa_second FAILED",
        f"{f}::test_mm_third PASSED",
    ]
    assert "AssertionError: boom" in proc.stdout
    assert "Traceback" in proc.stdout
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("2 passed, 1 failed in ") and last.endswith("s"), last


def test_runner_all_passed_exit_0_and_keyword(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "test_sample_kw.py",
        "def test_alpha():\n    pass\n\ndef test_beta():\n    assert False\n",
    )
    proc = run_runner(f, "-k", "alph")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{f}::test_alpha PASSED" in proc.stdout
    assert "test_beta" not in proc.stdout
    assert "1 passed, 0 failed" in proc.stdout
    proc = run_runner(f, "-k", "nothing-matches")
    assert proc.returncode == 5, proc.stdout


def test_runner_empty_file_exit_5(tmp_path: Path) -> None:
    f = _write(tmp_path / "test_sample_empty.py", "# no tests here\nX = 1\n")
    proc = run_runner(f)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "0 passed, 0 failed in " in proc.stdout


def test_runner_import_error_exit_1(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "test_sample_import.py",
        "import no_such_module_anywhere\n\ndef test_never():\n    pass\n",
    )
    ok = _write(tmp_path / "test_sample_ok.py", "def test_fine():\n    pass\n")
    proc = run_runner(f, ok)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ERROR" in proc.stdout and "no_such_module_anywhere" in proc.stdout
    assert f"{ok}::test_fine PASSED" in proc.stdout  # the other file still runs
    assert "test_never" not in proc.stdout


def test_runner_syntax_error_exit_1(tmp_path: Path) -> None:
    f = _write(tmp_path / "test_sample_syntax.py", "def test_x(:\n    pass\n")
    proc = run_runner(f)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SyntaxError" in proc.stdout


def test_runner_paths_and_mptest(tmp_path: Path) -> None:
    # firmware/ and the test file's directory are importable; mptest works from any directory.
    _write(tmp_path / "sample_helper_mod.py", "VALUE = 41\n")
    f = _write(
        tmp_path / "test_sample_paths.py",
        "import os\n"
        "import mptest\n"
        "import sample_helper_mod\n"
        "from fogmesh import cbor\n"
        "def test_imports():\n"
        "    assert sample_helper_mod.VALUE + 1 == 42\n"
        "    assert cbor.loads(cbor.dumps([1])) == [1]\n"
        "def test_tmpdir_fresh():\n"
        "    a = mptest.tmpdir()\n"
        "    b = mptest.tmpdir()\n"
        "    assert a != b and a.startswith('/tmp/mptest-')\n"
        "    assert os.listdir(a) == [] and os.listdir(b) == []\n"
        "def test_approx():\n"
        "    assert mptest.approx(0.1 + 0.2, 0.3)\n"
        "    assert not mptest.approx(1.0, 1.001)\n"
        "    assert mptest.approx(1.0, 1.001, rel=1e-2)\n"
        "def test_raises_checks():\n"
        "    e = mptest.raises(ValueError, int, 'x')\n"
        "    assert isinstance(e, ValueError)\n"
        "    try:\n"
        "        mptest.raises(ValueError, int, '1')\n"
        "    except AssertionError as a:\n"
        "        assert 'DID NOT RAISE' in str(a)\n"
        "    else:\n"
        "        raise RuntimeError('raises accepted no exception')\n"
        "    try:\n"
        "        mptest.raises(KeyError, int, 'x')\n"
        "    except AssertionError as a:\n"
        "        assert 'ValueError' in str(a)\n"
        "    else:\n"
        "        raise RuntimeError('raises accepted the wrong exception')\n"
        "    e = mptest.raises(TypeError, lambda a, b=0: a + b, 1, b='x')\n"
        "    assert isinstance(e, TypeError)\n",
    )
    proc = run_runner(f)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed, 0 failed" in proc.stdout


def test_runner_usage_error() -> None:
    proc = run_runner()
    assert proc.returncode not in (0, 1, 5)
    assert "usage" in proc.stdout
