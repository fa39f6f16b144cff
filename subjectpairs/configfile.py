"""Configs written next to outputs, so every run can be reproduced with ``--config``."""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from subjectpairs import __version__

# The config every command writes beside its output.
CONFIG_FILE = "config.yaml"


def config_yaml(config: BaseModel, command: str) -> bytes:
    header = f"# subjectpairs {__version__} {command} configuration; rerun with: subjectpairs {command} --config THIS\n"
    return (header + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)).encode()
