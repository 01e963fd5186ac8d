"""fleetd's timing settings: the automatic margin and request timeout, and the start-up check
that refuses a configuration under which fencing could not be safe or would fence a healthy
machine, with one line naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetd.config import Config, load_config, validate_timing
from fleetd.errors import ConfigError

ID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("ttl", "margin", "timeout"),
    [(10.0, 3.0, 3.0), (30.0, 3.0, 3.0), (4.0, 4 / 3, 4 / 3), (3.0, 1.0, 1.0)],
)
def test_automatic_margin_and_request_timeout(ttl: float, margin: float, timeout: float) -> None:
    config = Config(agent_ttl=ttl)
    assert config.margin == pytest.approx(margin)
    assert config.request_timeout == pytest.approx(timeout)
    validate_timing(config)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"agent_ttl": 4.0, "etcd_request_timeout": 3.0}, "etcd_request_timeout 3s is too long"),
        ({"agent_ttl": 10.0, "fence_margin": 6.0}, "less than half of agent_ttl"),
        ({"agent_ttl": 1.0}, "at least 0.5"),
    ],
)
def test_unsafe_timing_is_refused_with_the_fix(values: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_timing(Config(**values))  # type: ignore[arg-type]
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_config_checks_timing_and_derives_the_runtime_directory(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        f'machine_id = "{ID}"\nagent_ttl = 4\netcd_request_timeout = 3\n'
        f'units_directory = "{tmp_path}/units"\n'
    )
    with pytest.raises(ConfigError, match="etcd_request_timeout"):
        load_config(str(path), {}, {})
    path.write_text(f'machine_id = "{ID}"\nagent_ttl = 4\nunits_directory = "{tmp_path}/units"\n')
    config = load_config(str(path), {}, {})
    assert config.runtime_dir == str(tmp_path)
    assert load_config(str(path), {"FLEET_RUNTIME_DIRECTORY": "/run/x"}, {}).runtime_dir == "/run/x"
