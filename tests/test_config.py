import pytest

from hlora.config import ConfigError, RunConfig, apply_overrides, dump_yaml, load_config


def test_overrides_typed_and_nested(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train: {lr: 1e-3, batch_size: 2}\nlora: {targets: [q_proj]}\n")
    cfg = load_config(RunConfig, y, ["train.lr=5e-4", "lora.targets=q_proj,v_proj", "lora.rslora=true", "method.phi=1"])
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 2
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.lora.rslora is True
    assert cfg.method.phi == 1.0
    # round trip through YAML
    y2 = tmp_path / "d.yaml"
    y2.write_text(dump_yaml(cfg))
    assert load_config(RunConfig, y2) == cfg


def test_typed_mapping_values_are_coerced():
    """A dict[str, float] field reads YAML's `1e-3` (text to YAML: no dot) as a number, and a bad value names its
    key; a bare `dict` field still only has to be a mapping."""
    from hlora.budget.tune import TuneConfig
    from hlora.config import EvalConfig, from_dict

    cfg = apply_overrides(TuneConfig(), ["tune.lr={none: 1e-3, hlora: 3e-3}", "tune.start={ewc: 5}"])
    assert cfg.tune.lr == {"none": 1e-3, "hlora": 3e-3} and all(type(v) is float for v in cfg.tune.lr.values())
    assert cfg.tune.start == {"ewc": 5.0} and type(cfg.tune.start["ewc"]) is float
    assert from_dict(EvalConfig, {"task_limits": {"sciq": "1e2"}}).task_limits == {"sciq": 100}
    with pytest.raises(ConfigError, match=r"tune.lr.hlora: expected float, got 'fast'"):
        apply_overrides(TuneConfig(), ["tune.lr={hlora: fast}"])
    with pytest.raises(ConfigError, match=r"tune.start: expected a mapping"):
        apply_overrides(TuneConfig(), ["tune.start=3"])


@pytest.mark.parametrize(
    "override,needle",
    [("train.lrr=1", "unknown key"), ("nope.x=1", "unknown section"), ("train.lr", "key=value"),
     ("train.batch_size=abc", "expected int"), ("lora.rslora=maybe", "true/false")],
)
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(RunConfig(), [override])


def test_unknown_yaml_key_suggests(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("trian: {lr: 1}\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(RunConfig, y)


def test_removed_eval_split_is_an_unknown_key(tmp_path):
    """`eval.split` was never read (a task's split is named `task:split`); a YAML that still sets it is an error
    naming the field, like any unknown key."""
    y = tmp_path / "c.yaml"
    y.write_text("eval: {split: eval}\n")
    with pytest.raises(ConfigError, match=r"eval: unknown key 'split'"):
        load_config(RunConfig, y)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, tmp_path / "none.yaml")
