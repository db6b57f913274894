"""cluster.yaml against the autoscaler JSON schema shipped inside the installed ray package."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def schema():
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid(schema, config):
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert types[config["head_node_type"]]["resources"].get("train_driver", 0) >= 1
    text = (ROOT / "cluster.yaml").read_text()
    assert "AKIA" not in text and "aws_secret_access_key" not in text.lower()  # no committed credentials


@pytest.mark.parametrize("breakage", ["fractional_gpu", "unknown_top_level_key", "missing_node_config"])
def test_schema_rejects_broken_variants(schema, config, breakage):
    broken = copy.deepcopy(config)
    if breakage == "fractional_gpu":
        broken["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5
    elif breakage == "unknown_top_level_key":
        broken["min_workers"] = 1
    else:
        del broken["available_node_types"]["gpu_1x"]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
