"""Config contracts: typos and bad values fail with the key and the valid choices; overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrlab.config import Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_seed_config() -> None:
    cfg = load_config()
    assert (cfg.seed, cfg.epochs, cfg.model_name, cfg.img_size) == (42, 20, "tf_efficientnetv2_b3", (320, 300))
    assert (cfg.batch_size, cfg.optimizer, cfg.learning_rate, cfg.lr_scheduler) == (32, "AdamW", 1e-3, None)
    assert (cfg.momentum, cfg.weight_decay, cfg.label_smoothing) == (0.9, 5e-6, 0.0)


def test_unknown_top_level_key_names_it_and_suggests(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("epochz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "epochz" in msg and "did you mean 'epochs'" in msg and "model_name" in msg


def test_unknown_nested_key_lists_nested_valid_keys() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["augment.hflip=0.2"])
    msg = str(e.value)
    assert "augment.hflip" in msg and "hflip_p" in msg and "rotate_limit" in msg


def test_bad_choice_lists_valid_values() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optimizer=Adam"])
    msg = str(e.value)
    assert "optimizer" in msg and "RAdam" in msg and "Ranger21" in msg


def test_overrides_parse_yaml_values() -> None:
    cfg = load_config(None, ["epochs=3", "img_size=[64,64]", "lr_scheduler=null", "augment.scale=[0.9,1.1]"])
    assert cfg.epochs == 3 and cfg.img_size == (64, 64) and cfg.lr_scheduler is None
    assert cfg.augment.scale == (0.9, 1.1)


@pytest.mark.parametrize("bad", ["epochs", "=3", "img_size=[4,4]", "augment.scale=[1.2,0.9]"])
def test_malformed_overrides_fail_clearly(bad: str) -> None:
    with pytest.raises(ConfigError):
        load_config(None, [bad])


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_fine_tune_without_weights_is_rejected() -> None:
    with pytest.raises(ConfigError, match="fine_tune"):
        load_config(None, ["fine_tune=true", "pre_trained=false"])


@pytest.mark.parametrize("name", ["baseline.yaml", "challenger.yaml", "cpu.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    assert isinstance(load_config(CONFIGS / name), Config)
