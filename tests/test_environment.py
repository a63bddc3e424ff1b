"""The installed environment: exact numpy/scipy pins, clean imports with no binary-incompatibility warning."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not pinned with =="
            pins[name.split("[")[0].lower()] = version  # misaki[en]: the lock pins the package, extras resolved
    return pins


def test_direct_requirements_are_pinned_and_locked():
    direct = _pins(REPO / "requirements.in")
    locked = _pins(REPO / "requirements.txt")
    assert direct["numpy"] == "1.26.4" and direct["scipy"] == "1.13.1"
    for name, version in direct.items():
        assert locked.get(name) == version, f"requirements.txt (lock) has {name}=={locked.get(name)}, not {version}"


@pytest.mark.parametrize(
    "name",
    ["numpy", "scipy", "torch", "transformers", "diffusers", "librosa", "xfuser", "cog", "kokoro", "spacy", "thinc"],
)
def test_installed_versions_match_pins(name):
    pinned = _pins(REPO / "requirements.in")[name]
    installed = importlib.metadata.version(name)
    assert installed.split("+")[0] == pinned, f"{name} {installed} installed, {pinned} pinned"


IMPORT_CHECK = """
import warnings
warnings.filterwarnings("error", message=".*numpy.dtype size changed.*")
warnings.filterwarnings("error", message=".*binary incompatibility.*")
warnings.filterwarnings("error", category=RuntimeWarning, module="importlib._bootstrap")
import numpy, scipy.signal, scipy.sparse, sklearn, numba, librosa
import transformers, diffusers, cog, coglet
import soundfile, pyloudnorm, sentencepiece, safetensors, einops, ftfy, PIL
import flash_attn.cute, cudnn  # the GPU kernels' Python sides import on any machine
# Text to speech: spaCy's and thinc's compiled parts (built against numpy 2's ABI) run on numpy 1.26; espeak-ng from
# its wheel phonemises offline.
import spacy, thinc.api, blis.py, kokoro, misaki.en, misaki.espeak
ops = thinc.api.NumpyOps()
assert ops.gemm(numpy.ones((2, 3), "f"), numpy.ones((3, 2), "f")).tolist() == [[3.0, 3.0], [3.0, 3.0]]
assert [token.text for token in spacy.blank("en")("Hello, world")] == ["Hello", ",", "world"]
assert misaki.espeak.EspeakFallback(british=False).backend.phonemize(["hello"])[0].strip()
"""


@pytest.mark.slow
def test_imports_raise_no_binary_incompatibility():
    # A fresh interpreter, so that nothing imported by pytest hides an import-order problem.
    result = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dtype size changed" not in result.stderr


def test_incompatible_numpy_abi_would_be_caught():
    # The check above must be able to fail: the warning text numpy emits turns into an error under our filter.
    code = IMPORT_CHECK.split("import numpy")[0] + (
        "warnings.warn('numpy.dtype size changed, may indicate binary incompatibility. Expected 96 from C header, "
        "got 88 from PyObject', RuntimeWarning)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "dtype size changed" in result.stderr


def test_pip_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_xfuser_is_installed_but_needs_an_accelerator():
    # xfuser 0.7.0 refuses to import without a GPU; the project imports it only on the multi-GPU path.
    result = subprocess.run([sys.executable, "-c", "import xfuser"], capture_output=True, text=True)
    if result.returncode == 0:
        pytest.fail("xfuser imported on a machine without accelerators; expected its NotImplementedError")
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("NotImplementedError: No Accelerators"), result.stderr[-2000:]


def test_project_never_imports_xfuser_at_module_level():
    offenders = [
        str(p.relative_to(REPO))
        for p in [*REPO.glob("wan/**/*.py"), *REPO.glob("src/**/*.py"), REPO / "predict.py"]
        if p.exists() and any(line.startswith(("import xfuser", "from xfuser")) for line in p.read_text().splitlines())
    ]
    assert not offenders
