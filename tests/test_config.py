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
