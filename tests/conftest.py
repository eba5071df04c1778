"""Every test runs offline: nothing may reach a hub. Shared fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest


@pytest.fixture(scope="session")
def toy_testbed_checkpoint(tmp_path_factory):
    """A testbed checkpoint trained at toy scale (32 scenes, one step per stage) by the real training and saving
    code: the files `eval`, `calibrate-tau` and the CLI read, not an accurate model. Read-only: copy it to change it."""
    from llava_ivtp.testbed import train as testbed_train

    root = tmp_path_factory.mktemp("toy-testbed")
    work = root / "work"
    testbed_train.train_clip(work, 32, 8, steps=1, batch_size=8, lr=1e-3, seed=0, log=lambda line: None)
    testbed_train.train_llava(work, 32, 8, steps=1, batch_size=8, lr=1e-3, seed=0, log=lambda line: None)
    return testbed_train.save_checkpoint(work, root / "model", tau_questions=8)
