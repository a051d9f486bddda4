"""The registry and the method protocol: one line per method, typed configs, stages, config switching."""
from __future__ import annotations

import pytest

from hlora.config import ConfigError, RunConfig, apply_overrides, load_config, method_config
from hlora.methods import REGISTRY, StageContext, build_method, method_class
from hlora.methods.base import Method


def test_every_registered_method_has_its_own_config_and_default():
    for name in REGISTRY:
        cls = method_class(name)
        assert issubclass(cls, Method)
        cfg = method_config(name)
        assert type(cfg) is cls.config_class and cfg.name == name


def test_unknown_method_suggests():
    with pytest.raises(ValueError, match="did you mean 'hlora'"):
        method_class("hlorra")
    with pytest.raises(ConfigError, match="did you mean 'replay'"):
        apply_overrides(RunConfig(), ["method.name=replya"])


def test_switching_method_takes_the_new_method_fields(tmp_path):
    cfg = apply_overrides(RunConfig(), ["method.phi=2", "method.name=ewc", "method.lam=0.7"])
    assert cfg.method.name == "ewc" and cfg.method.lam == 0.7 and not hasattr(cfg.method, "phi")
    with pytest.raises(ConfigError, match="unknown key 'method.phi'"):
        apply_overrides(RunConfig(), ["method.name=replay", "method.phi=1"])
    y = tmp_path / "c.yaml"
    y.write_text("method: {name: kl_domain, beta: 0.05}\n")
    assert load_config(RunConfig, y).method.beta == 0.05
    y.write_text("method: {name: kl_domain, rho: 0.05}\n")
    with pytest.raises(ConfigError, match="method: unknown key 'rho'"):
        load_config(RunConfig, y)


def test_a_method_runs_only_in_its_stages():
    with pytest.raises(ValueError, match="method 'ewc' has no general stage"):
        build_method(method_config("ewc"), StageContext(stage="general"))
    assert build_method(method_config("none"), StageContext(stage="general"))
