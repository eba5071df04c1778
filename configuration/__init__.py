"""IVTP presets (JSON `IvtpConfig`s), installed as the `llava_ivtp_presets` package: `preset_path("7b")`."""

from pathlib import Path


PRESETS = {"7b": "llava-1.5-7b-ivtp.json", "13b": "llava-1.5-13b-ivtp.json"}


def preset_path(size: str) -> Path:
    """Path of the LLaVA-1.5 preset of `size` ("7b" or "13b")."""
    if size not in PRESETS:
        raise ValueError(f"preset size must be one of {sorted(PRESETS)}, got {size!r}.")
    return Path(__file__).with_name(PRESETS[size])
