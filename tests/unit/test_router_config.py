"""`fastboot router --config FILE`: TOML and YAML, every key checked, secrets from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastboot.cli import main as cli
from fastboot.errors import ConfigError
from fastboot.router.config import ModelConfig, RouterConfig, load_config

TOML = """
[router]
port = 9000
api_keys = ["k1"]
api_key_file = "keys.txt"
tick_s = 1.5

[router.timeouts]
first_byte_s = 30

[models.tiny]
snapshot = "3f2a9c"
served_model_name = "/models/tiny"
min_replicas = 1
max_replicas = 3
concurrency = 4
scale_down_delay_s = 120
scale_to_zero = false
queue_max = 50
queue_deadline_s = 60

[models.other]
snapshot = "77aa"

[[agents]]
url = "http://10.0.0.5:8700"
token_file = "agent.token"

[[agents]]
url = "http://10.0.0.6:8700"
token = "inline"
name = "host-b"
"""

YAML = """
router:
  port: 9000
  api_keys: [k1]
  api_key_file: keys.txt
  tick_s: 1.5
  timeouts: {first_byte_s: 30}
models:
  tiny:
    snapshot: "3f2a9c"
    served_model_name: /models/tiny
    min_replicas: 1
    max_replicas: 3
    concurrency: 4
    scale_down_delay_s: 120
    scale_to_zero: false
    queue_max: 50
    queue_deadline_s: 60
  other: {snapshot: "77aa"}
agents:
  - {url: "http://10.0.0.5:8700", token_file: agent.token}
  - {url: "http://10.0.0.6:8700", token: inline, name: host-b}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    (tmp_path / "keys.txt").write_text("# one key a line\nk2\n\nk3\n")
    (tmp_path / "agent.token").write_text("secret-token\n")
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_and_yaml_give_the_same_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "router.toml", TOML))
    assert config == load_config(write(tmp_path, "router.yaml", YAML))
    assert config.port == 9000 and config.host == "127.0.0.1"
    assert config.api_keys == frozenset({"k1", "k2", "k3"})
    assert config.timeouts.first_byte_s == 30 and config.timeouts.connect_s == 2
    tiny = config.model("tiny")
    assert tiny == ModelConfig(
        name="tiny",
        snapshot="3f2a9c",
        served_model_name="/models/tiny",
        min_replicas=1,
        max_replicas=3,
        concurrency=4,
        scale_down_delay_s=120,
        scale_to_zero=False,
        queue_max=50,
        queue_deadline_s=60,
    )
    assert config.model("other") == ModelConfig(name="other", snapshot="77aa")
    assert [a.token for a in config.agents] == ["secret-token", "inline"]
    assert [a.label for a in config.agents] == ["http://10.0.0.5:8700", "host-b"]


def test_secrets_stay_out_of_the_repr(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "router.toml", TOML))
    text = repr(config)
    assert "secret-token" not in text and "k2" not in text and "inline" not in text


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[models.m]\nsnapshot = "s"\nmax_replica = 2\n', "unknown key(s) max_replica"),
        ('[models.m]\nsnapshot = "s"\nconcurrency = "8"\n', "models.m.concurrency must be an"),
        ('[models.m]\nsnapshot = "s"\nmin_replicas = 3\n', "min_replicas > max_replicas"),
        ('[models.m]\nsnapshot = "s"\nqueue_deadline_s = -1\n', "must not be negative"),
        ('[models.m]\nsnapshot = ""\n', "snapshot is empty"),
        ("[router]\nport = 1\n", "no models"),
        ('[models.m]\nsnapshot = "s"\n[[agents]]\nurl = "10.0.0.1"\n', "must start with http"),
        (
            '[models.m]\nsnapshot = "s"\n[[agents]]\nurl = "http://a"\ntoken_file = "nope"\n',
            "cannot read",
        ),
        ("[other]\nx = 1\n", "unknown key(s) other"),
        ("[models.m\n", "not valid TOML"),
    ],
)
def test_bad_configs_say_which_key_and_what_to_do(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "router.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert needle in str(exc.value)
    assert str(path) in str(exc.value)


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "router.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match=r"\.toml, \.yaml or \.yml"):
        load_config(path)


def test_model_floor_respects_scale_to_zero() -> None:
    assert ModelConfig(name="m", snapshot="s").floor == 0
    assert ModelConfig(name="m", snapshot="s", scale_to_zero=False).floor == 1
    assert ModelConfig(name="m", snapshot="s", min_replicas=2).floor == 2
    assert RouterConfig().host == "127.0.0.1"


def test_cli_router_help_and_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["router", "--help"])
    assert exc.value.code == 0
    assert "--config" in capsys.readouterr().out
    path = tmp_path / "router.toml"
    path.write_text("[router]\n")
    assert cli.main(["router", "--config", str(path)]) == 1
    assert cli.main(["router", "--config", str(tmp_path / "missing.toml")]) == 1
