"""Files shipped inside the package: the bundled demo model."""

import os

DEMO_MODEL_DIR = os.path.join(os.path.dirname(__file__), "demo-model")


def demo_model_path() -> str:
    """Directory of the bundled demo code model (HuggingFace GPT-2 format)."""
    return DEMO_MODEL_DIR
