import pytest

from pipeline.config import ACTIVATIONS, FIELDS, INITS, ConfigError, RunConfig, from_dict


def test_defaults_are_valid_and_hash_is_stable():
    a, b = RunConfig(), RunConfig()
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != a.replace(seed=1).config_hash()


def test_remedies_are_part_of_the_identity():
    base = RunConfig()
    hashes = {base.replace(**change).config_hash() for change in
              ({}, {"norm": "batch"}, {"norm": "layer"}, {"residual": "plain"}, {"residual": "skipinit"},
               {"residual": "plain", "residual_scale": 0.5})}
    assert len(hashes) == 6


def test_values_that_cannot_matter_do_not_change_the_identity():
    """--clip-threshold without clipping, --init-std with another init, ...: the same numbers, the
    same configuration (reset to the default), so a grid trains them once."""
    base = RunConfig()
    for change in ({"clip_threshold": 5.0}, {"init_std": 0.1}, {"init_gain": 2.0}, {"bias_std": 0.3},
                   {"residual_scale": 0.5}):
        assert base.replace(**change) == base, change
    assert RunConfig(clip="norm", clip_threshold=5.0).clip_threshold == 5.0  # where they matter, they stay
    assert RunConfig(init="normal", init_std=0.1, init_gain=2.0).to_dict()["init_gain"] == 1.0
    assert RunConfig(init="he_normal", init_gain=2.0, bias_std=0.3).bias_std == 0.3
    assert RunConfig(residual="plain", residual_scale=0.5).residual_scale == 0.5
    with pytest.raises(ConfigError):  # a bad value is still an error, used or not
        RunConfig(clip_threshold=-1.0)


def test_hash_ignores_device_and_metric_stride():
    base = RunConfig()
    assert base.replace(device="cpu", log_every=1).config_hash() == base.config_hash()


@pytest.mark.parametrize(
    "key, value",
    [
        ("activation", "swish"),
        ("init", "glorot"),
        ("clip", "sometimes"),
        ("depth", 1),
        ("width", 0),
        ("lr", 0.0),
        ("lr", -1.0),
        ("batch_size", 0),
        ("clip_threshold", 0.0),
        ("train_subset", 60_001),
        ("momentum", 1.0),
        ("device", "tpu"),
        ("depth", 2.5),
        ("depth", True),
        ("bias_std", float("nan")),
        ("lr", float("inf")),
        ("init_std", float("nan")),
        ("residual_scale", float("inf")),
    ],
)
def test_bad_values_name_the_field(key, value):
    with pytest.raises(ConfigError) as err:
        from_dict({key: value})
    assert err.value.key == key


def test_unknown_key_fails_loudly():
    with pytest.raises(ConfigError, match="unknown config key") as err:
        from_dict({"activaton": "relu"})
    assert err.value.key == "activaton"


def test_yaml_style_floats_are_accepted():
    assert from_dict({"lr": "1e-2", "init_std": 2}).lr == 0.01


def test_total_steps():
    assert RunConfig(batch_size=100, epochs=2).total_steps == 1200
    assert RunConfig(batch_size=100, train_subset=250).total_steps == 3  # last batch is partial
    assert RunConfig(max_steps=7).total_steps == 7


def test_vocabulary_matches_design():
    assert set(ACTIVATIONS) == {"sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "selu", "softsign"}
    assert "orthogonal" in INITS and "default" in INITS
    for name in ("init_std", "clip_threshold", "batch_size", "max_steps", "train_subset", "log_every"):
        assert name in FIELDS


@pytest.mark.parametrize("fields, says", [
    (dict(batch_size=1), "batch_size 1"),
    (dict(batch_size=64, train_subset=641), "641 training images in batches of 64 leave a last batch of 1"),
])
def test_batchnorm_refuses_a_batch_of_one_example(fields, says):
    """A norm that mixes the examples (norms.NORMS) has no batch statistics for one example."""
    with pytest.raises(ConfigError) as found:
        RunConfig(norm="batch", **fields)
    assert found.value.key == "batch_size" and says in str(found.value)
    RunConfig(norm="layer", **fields)  # LayerNorm normalizes each example alone
    RunConfig(norm="batch", **{**fields, "batch_size": fields["batch_size"] + 1})


def test_configurations_that_differ_have_different_run_names():
    """Every hashed field, moved off its default (with what makes it count, e.g. clip for its
    threshold), changes the run's name: two runs of a grid never share a name and a summary row."""
    from pipeline.config import NOT_HASHED, run_name

    needs = {"init_std": dict(init="normal"), "init_gain": dict(init="he_normal"), "bias_std": dict(init="he_normal"),
             "clip_threshold": dict(clip="norm"), "residual_scale": dict(residual="plain"),
             "sequence": dict(arch="rnn"), "recurrent_init": dict(arch="rnn"), "recurrent_gain": dict(arch="rnn")}
    other = {"activation": "tanh", "init": "he_normal", "clip": "norm", "norm": "layer", "residual": "plain",
             "optimizer": "adam", "precision": "fp64", "arch": "gru", "sequence": "pixels", "recurrent_init": "identity"}
    for name, f in FIELDS.items():
        if name in NOT_HASHED:
            continue
        base = RunConfig(**needs.get(name, {}))
        if name in other:
            value = other[name]
        else:  # an int or a float, within its bounds
            value = f.default * 2 + 1 if isinstance(f.default, int) else f.default / 2 + 0.01
        changed = base.replace(**{name: value})
        assert changed.config_hash() != base.config_hash(), name
        assert run_name(changed) != run_name(base), (name, run_name(base))
