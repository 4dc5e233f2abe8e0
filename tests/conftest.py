import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("LATENTAUDIT_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama-style model + byte tokenizer saved as a Hugging Face folder."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny_llama"))
