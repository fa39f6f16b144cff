"""ray_cluster.yaml is a valid Ray autoscaler config that installs this project on every node."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "ray_cluster.yaml").read_text()))
    validate_config(config)
    assert {"head", "cpu_worker", "gpu_worker"} <= set(config["available_node_types"])
    assert any("pip install" in command and "subjectpairs" in command for command in config["setup_commands"])
    assert any("torch==2.13.0" in command for command in config["setup_commands"])
