import subprocess
import sys


def test_engine_does_not_import_dagster() -> None:
    # In a fresh interpreter: this test process may have Dagster loaded by other tests.
    code = (
        "import sys, osa_dagster.engine\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster'))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
