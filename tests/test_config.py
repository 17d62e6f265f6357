"""The typed config loader: YAML + dotted overrides, checked with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from srmri.config import ConfigError, config_hash, dump_config, load_config, require, save_config


@dataclass
class Optim:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)

    def check(self) -> None:
        require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")


@dataclass
class Root:
    seed: int = 0
    tags: list[str] = field(default_factory=list)
    warmup: int | None = None
    amp: bool = False
    optim: Optim = field(default_factory=Optim)


def test_yaml_then_overrides_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\noptim:\n  name: sgd\n  lr: 0.1\n")
    cfg = load_config(Root, path, ["optim.lr=3e-4", "tags=[a,b]", "warmup=5", "amp=true"])
    assert cfg.seed == 3 and cfg.optim.name == "sgd" and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.tags == ["a", "b"] and cfg.warmup == 5 and cfg.amp is True
    assert load_config(Root, None, ["warmup=null"]).warmup is None


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' \(did you mean 'lr'\?\)"):
        load_config(Root, None, ["optim.lrr=1"])
    path = tmp_path / "c.yaml"
    path.write_text("optm:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'optm' \(did you mean 'optim'\?\)"):
        load_config(Root, path)


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"seed: expected an integer, got 'x'"):
        load_config(Root, None, ["seed=x"])
    with pytest.raises(
        ConfigError, match=r"optim.name: 'adamx' is not one of .*did you mean 'adamw?'"
    ):
        load_config(Root, None, ["optim.name=adamx"])
    with pytest.raises(ConfigError, match=r"optim.lr: must be positive"):
        load_config(Root, None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"amp: expected true or false"):
        load_config(Root, None, ["amp=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Root, None, ["seed"])
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        load_config(Root, None, ["seed.x=1"])


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Root, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Root, bad)


def test_saved_config_round_trips_and_hash_is_stable(tmp_path):
    cfg = load_config(Root, None, ["optim.lr=0.5", "tags=[x]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Root, path) == cfg
    assert "lr: 0.5" in dump_config(cfg)
    assert config_hash(cfg) == config_hash(load_config(Root, path))
    assert config_hash(cfg) != config_hash(load_config(Root, path, ["seed=1"]))


# ------------------------------------------------------------ every shipped config is valid

_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", _CONFIGS, ids=[p.name for p in _CONFIGS])
def test_every_shipped_config_loads_and_checks(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A config is a pipeline (arms), a search (space) or a trainer run (task); each loads with
    # its own loader, and a pipeline's stage configs load with their overrides too.
    import yaml

    from trainer.config import load_train_config
    from trainer.experiment.config import load_pipeline_config, trainer_config
    from tune.config import load_search_config

    monkeypatch.chdir(path.parents[1])  # stage configs are named relative to the repo root
    doc = yaml.safe_load(path.read_text())
    if "arms" in doc:
        cfg = load_pipeline_config(str(path), [])
        trainer_config(cfg.classify, [])
        if cfg.sr.config:
            assert trainer_config(cfg.sr, []).task == "sr"
    elif "space" in doc:
        load_search_config(path)
    else:
        load_train_config(str(path), [])


def test_union_of_words_and_list_names_both_and_suggests() -> None:
    from trainer.config import load_train_config

    with pytest.raises(ConfigError, match=r"train.class_weights: 'autoo'.*did you mean 'auto'"):
        load_train_config(None, ["data.root=x", "train.class_weights=autoo"])
    cfg = load_train_config(None, ["data.root=x", "train.class_weights=[1, 2.5]"])
    assert cfg.train.class_weights == [1.0, 2.5]
    with pytest.raises(ConfigError, match=r"train\.class_weights: .*positive"):
        load_train_config(None, ["data.root=x", "train.class_weights=[1, 0]"])
