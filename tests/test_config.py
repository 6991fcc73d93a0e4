"""The typed configuration: the embedded default, dotted overrides, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sci_scale.cli import main as cli
from sci_scale.config import Config, ConfigError, config_from_dict, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def config_error(*overrides: str, path: Path | None = TINY) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    assert message.strip() == message and message
    return message


# --- the embedded default ------------------------------------------------------------------------


def test_tiny_yaml_is_the_embedded_default():
    cfg = load_config(TINY)
    assert isinstance(cfg, Config)
    assert cfg == Config()
    assert config_to_dict(cfg) == config_to_dict(Config())
    assert load_config(None) == cfg


def test_tiny_yaml_sets_only_known_keys_with_default_values():
    import yaml

    data = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    defaults = config_to_dict(Config())
    assert set(data) == set(defaults)  # every section appears
    for section, values in data.items():
        for key, value in values.items():
            assert key in defaults[section], f"{section}.{key}"
            assert value == defaults[section][key], f"{section}.{key}"


def test_cli_falls_back_to_the_tiny_config():
    assert cli.DEFAULT_CONFIG == TINY
    assert cli._resolve_config(None) == TINY
    assert cli._resolve_config("other.yaml") == Path("other.yaml")


# --- overrides -----------------------------------------------------------------------------------


def test_overrides_change_values_with_their_types():
    cfg = load_config(
        TINY,
        [
            "train.steps=5",
            "sci.fuse=false",
            "data.pair_sources=[scan]",
            "train.lr=0.001",
            "model.rotary_base=500000",  # an int where a float is expected becomes a float
            "model.ffn_hidden_size=256",
            "data.max_docs=null",
            "sci.mode=frozen",
            "run.name=exp 1",
        ],
    )
    assert cfg.train.steps == 5 and type(cfg.train.steps) is int
    assert cfg.sci.fuse is False
    assert cfg.data.pair_sources == ["scan"]
    assert cfg.train.lr == 0.001
    assert cfg.model.rotary_base == 500000.0 and type(cfg.model.rotary_base) is float
    assert cfg.model.ffn_hidden_size == 256
    assert cfg.data.max_docs is None
    assert cfg.sci.mode == "frozen"
    assert cfg.run.name == "exp 1"
    # untouched values keep the file's
    assert cfg.train.global_batch_size == Config().train.global_batch_size


def test_list_overrides_take_yaml_flow_lists():
    cfg = load_config(None, ["data.pair_sources=[scan, arithmetic]"])
    assert cfg.data.pair_sources == ["scan", "arithmetic"]
    assert load_config(None, ["data.pair_sources=[]"]).data.pair_sources == []
    # a bare word is not a list
    assert "expected list[str]" in config_error("data.pair_sources=scan")


def test_later_override_wins():
    assert load_config(None, ["train.steps=5", "train.steps=7"]).train.steps == 7


def test_overrides_do_not_touch_the_defaults():
    cfg = load_config(None, ["data.pair_sources=[scan]", "sci.alpha=0.5"])
    cfg.data.pair_sources.append("cogs")
    fresh = load_config(None)
    assert fresh.data.pair_sources == ["scan", "arithmetic"] == Config().data.pair_sources
    assert fresh.sci.alpha == 0.05


# --- errors: one line, naming the problem --------------------------------------------------------


def test_unknown_key_names_it_and_the_valid_keys():
    message = config_error("model.hiden_size=3")
    assert "model.hiden_size" in message
    assert "did you mean 'hidden_size'" in message
    for key in ("hidden_size", "num_layers", "num_attention_heads", "seq_length"):
        assert key in message


def test_unknown_section_names_it_and_the_sections():
    message = config_error("modle.num_layers=2")
    assert "'modle'" in message and "did you mean 'model'" in message
    for section in ("model", "sci", "data", "train", "parallel", "checkpoint", "logging", "run"):
        assert section in message


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n", encoding="utf-8")
    message = config_error(path=path)
    assert "train.stepz" in message and "did you mean 'steps'" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=abc", "train.steps: expected int, got 'abc'"),
        ("train.steps=1.5", "train.steps: expected int, got 1.5"),
        ("sci.fuse=1", "sci.fuse: expected bool"),
        ("train.lr=fast", "train.lr: expected float, got 'fast'"),
        ("model.ffn_hidden_size=abc", "model.ffn_hidden_size: expected int | null, got 'abc'"),
        ("run.name=[a, b]", "run.name: expected str"),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(override, expected):
    assert expected in config_error(override)


def test_bad_choice_names_the_valid_choices():
    message = config_error("sci.mode=bogus")
    assert "sci.mode" in message and "'bogus'" in message
    for choice in ("joint", "frozen", "sci_only", "off"):
        assert choice in message


def test_bad_pair_source_names_the_valid_sources():
    message = config_error("data.pair_sources=[scan, bogus]")
    assert "'bogus'" in message
    for source in ("scan", "arithmetic", "cogs", "user"):
        assert source in message


def test_fuse_layer_out_of_range():
    message = config_error("sci.fuse_layer=7")
    assert "sci.fuse_layer (7)" in message and "0..3" in message
    assert "sci.fuse_layer (-1)" in config_error("sci.fuse_layer=-1")
    # the last layer is in range; with the branch off the layer is not checked
    assert load_config(TINY, ["sci.fuse_layer=3"]).sci.fuse_layer == 3
    assert load_config(TINY, ["sci.mode=off", "sci.fuse_layer=7"]).sci.mode == "off"


def test_fuse_layer_must_be_on_the_first_pipeline_stage():
    message = config_error("parallel.pipeline=2", "sci.fuse_layer=2")
    assert "sci.fuse_layer (2)" in message
    assert "first pipeline stage" in message and "0..1" in message
    assert load_config(TINY, ["parallel.pipeline=2", "sci.fuse_layer=1"]).parallel.pipeline == 2


def test_heads_must_divide_by_query_groups():
    message = config_error("model.num_attention_heads=4", "model.num_query_groups=3")
    assert "model.num_attention_heads (4)" in message
    assert "model.num_query_groups (3)" in message


def test_global_batch_must_be_a_multiple_of_micro_batch():
    message = config_error("train.global_batch_size=12", "train.micro_batch_size=8")
    assert "train.global_batch_size (12)" in message
    assert "train.micro_batch_size (8)" in message
    assert load_config(TINY, ["train.global_batch_size=24", "train.micro_batch_size=8"])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.steps=0"], "train.steps must be positive, got 0"),
        (["model.hidden_size=130"], "model.hidden_size (130)"),
        (["parallel.pipeline=3"], "parallel.pipeline (3)"),
        (["data.pair_rate=1.0"], "data.pair_rate must be in [0, 1)"),
        (["data.examples_per_template=1"], "data.examples_per_template must be >= 2"),
        (["data.pair_sources=[cogs]"], "data.cogs_path is not set"),
        (["train.min_lr=0.1"], "train.min_lr (0.1) must not exceed train.lr"),
        (["sci.tau=2.0"], "sci.tau (2.0) must lie in"),
    ],
)
def test_cross_field_rules_name_the_numbers(overrides, fragment):
    assert fragment in config_error(*overrides)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.steps", "is not of the form key.sub=value"),
        ("steps=3", "the key must be section.name"),
        ("train.steps.x=3", "'steps' is not a section"),
        ("train.steps=[1", "value is not valid YAML"),
    ],
)
def test_malformed_overrides(override, fragment):
    message = config_error(override)
    assert fragment in message and override in message


def test_malformed_yaml_files(tmp_path):
    missing = config_error(path=tmp_path / "nope.yaml")
    assert "config file not found" in missing and "nope.yaml" in missing
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1\n", encoding="utf-8")
    assert "not valid YAML" in config_error(path=broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n", encoding="utf-8")
    assert "top level must be a mapping" in config_error(path=scalar)
    section = tmp_path / "section.yaml"
    section.write_text("train: 5\n", encoding="utf-8")
    assert config_error(path=section) == "train: expected a mapping, got 5"


def test_scientific_notation_without_a_dot_is_a_float():
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_bad_key_exits_2_with_one_line(capsys):
    status = cli.main(["train", str(TINY), "bad.key=1"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("sci-scale train: error: unknown key 'bad'")
    assert "valid keys:" in err


def test_cli_first_positional_override_is_checked(capsys):
    # "train KEY=VALUE" without a config file: the default config plus the override
    assert cli.main(["train", "model.hiden_size=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "model.hiden_size" in err and "hidden_size" in err


def test_cli_missing_config_file_exits_2(capsys, tmp_path):
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config file not found" in err


# --- YAML 1.1 spellings, strictness, round trips -------------------------------------------------


def test_yaml_booleans_for_choices_become_the_spelling_meant(tmp_path):
    path = tmp_path / "off.yaml"
    path.write_text("sci:\n  mode: off\n", encoding="utf-8")  # YAML 1.1 reads `off` as False
    assert load_config(path).sci.mode == "off"
    assert load_config(None, ["sci.mode=off"]).sci.mode == "off"
    # a boolean with no spelling among the choices is still an error, naming the boolean
    assert config_error("logging.wandb_mode=off") == (
        "logging.wandb_mode: False is not one of the valid choices: offline, online, disabled"
    )
    assert "model.fp8: expected 'delayed' | 'current' | null, got False" in config_error(
        "model.fp8=off"
    )


def test_nothing_is_coerced_but_ints_and_spelled_floats_to_floats():
    cfg = load_config(None, ["experiment.pair_rates=[0, 1e-2]", "train.max_wall_minutes=1e1"])
    assert cfg.experiment.pair_rates == [0.0, 0.01]
    assert all(type(r) is float for r in cfg.experiment.pair_rates)
    assert cfg.train.max_wall_minutes == 10.0
    assert config_error("train.lr=true") == "train.lr: expected float, got True"
    assert config_error("train.steps=true") == "train.steps: expected int, got True"
    assert load_config(None, ["sci.fuse=yes"]).sci.fuse is True  # YAML 1.1's own boolean
    assert config_error("sci.fuse='true'") == "sci.fuse: expected bool (true/false), got 'true'"
    assert config_error("run.name=5") == "run.name: expected str, got 5"
    assert config_error("experiment.seeds=[1, x]") == "experiment.seeds[1]: expected int, got 'x'"


def test_an_empty_section_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("model:\ntrain:\n  steps: 5\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.model == Config().model and cfg.train.steps == 5


def test_the_first_problem_in_the_input_is_reported():
    def first(*overrides: str) -> str:
        return config_error(*overrides, path=None)  # keys in the order the overrides give them

    assert first("train.stepz=3", "train.steps=abc").startswith("unknown key 'train.stepz'")
    assert first("train.steps=abc", "train.stepz=3") == "train.steps: expected int, got 'abc'"
    assert first("sci.mode=bogus", "model.seq_length=x").startswith("sci.mode: 'bogus'")
    assert first("model.seq_length=x", "sci.mode=bogus").startswith("model.seq_length:")


def test_non_string_keys_are_unknown_keys():
    with pytest.raises(ConfigError, match=r"^unknown key 'train\.1'; valid keys: adam_beta1"):
        config_from_dict({"train": {1: 2}})
    with pytest.raises(ConfigError, match=r"^config: expected a mapping, got"):
        config_from_dict([1])  # type: ignore[arg-type]


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=str)
def test_every_shipped_config_validates_and_round_trips_exactly(path):
    cfg = load_config(path)
    data = config_to_dict(cfg)
    # plain data: what checkpoints (JSON) and run directories (YAML) store
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert repr(json.loads(json.dumps(data))) == repr(data)  # floats stay floats, None stays None
    assert config_from_dict(json.loads(json.dumps(data))) == cfg
    assert config_from_dict(data) == cfg and config_to_dict(config_from_dict(data)) == data


def test_replace_copies_and_checks_the_changed_values():
    cfg = Config()
    off = cfg.replace(sci=cfg.sci.replace(mode="off"), train=cfg.train.replace(lr=1))
    assert off.sci.mode == "off" and cfg.sci.mode == "joint"
    assert type(off.train.lr) is float
    with pytest.raises(ValueError):
        cfg.train.replace(steps="10")


def test_sizes_the_sci_branch_divides_by_are_positive():
    assert config_error("sci.num_attention_heads=0") == (
        "sci.num_attention_heads must be positive, got 0"
    )


def test_model_parallel_must_divide_the_world():
    from sci_scale.config.layout import check_model_parallel_fits, data_parallel_size

    expected = (
        "parallel layout does not fit: parallel.tensor (2) x parallel.pipeline (2) = 4 must "
        "divide the world size (6)"
    )
    with pytest.raises(ConfigError) as info:
        check_model_parallel_fits(2, 2, 6)
    assert str(info.value) == expected
    cfg = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2"])
    with pytest.raises(ConfigError) as info:
        data_parallel_size(cfg, 6)
    assert str(info.value) == expected
    assert data_parallel_size(cfg, 4) == 1


def test_importing_the_config_stays_light():
    code = "import sys, sci_scale.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- values that cannot make sense ---------------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
        ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
        ("train.lr=-inf", "train.lr: expected a finite number, got '-inf'"),
        ("sci.tau=.inf", "sci.tau: expected a finite number, got inf"),
        ("data.corpus_weights=[1, .nan]", "data.corpus_weights[1]: expected a finite number"),
        ("experiment.pair_rates=[.inf]", "experiment.pair_rates[0]: expected a finite number"),
        # null, not infinity, lifts a limit
        ("train.max_wall_minutes=.inf", "train.max_wall_minutes: expected a finite number or null"),
        ("train.loss_spike_factor=.inf", "train.loss_spike_factor: expected a finite number or"),
    ],
)
def test_no_float_setting_takes_nan_or_infinity(override, expected):
    assert config_error(override).startswith(expected)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=0", "train.lr must be positive, got 0.0"),
        ("train.lr=-1e-3", "train.lr must be positive, got -0.001"),
        ("train.min_lr=-1e-5", "train.min_lr must be >= 0, got -1e-05"),
        ("train.warmup_steps=-1", "train.warmup_steps must be >= 0, got -1"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
        ("train.adam_beta1=1.0", "train.adam_beta1 must be in [0, 1), got 1.0"),
        ("train.adam_beta2=-0.5", "train.adam_beta2 must be in [0, 1), got -0.5"),
        ("train.adam_eps=0", "train.adam_eps must be positive, got 0.0"),
        ("train.clip_grad=-1", "train.clip_grad must be >= 0 (0 turns clipping off), got -1.0"),
        ("train.eval_batches=0", "train.eval_batches must be positive, got 0"),
        ("train.max_consecutive_skips=0", "train.max_consecutive_skips must be >= 1, got 0"),
        ("train.loss_spike_factor=1.0", "train.loss_spike_factor must be > 1 (or null"),
        ("train.loss_spike_window=1", "train.loss_spike_window must be >= 2, got 1"),
        ("model.hidden_dropout=1.5", "model.hidden_dropout must be in [0, 1), got 1.5"),
        ("model.hidden_dropout=1", "model.hidden_dropout must be in [0, 1), got 1.0"),
        ("model.attention_dropout=-0.1", "model.attention_dropout must be in [0, 1), got -0.1"),
        ("model.norm_epsilon=0", "model.norm_epsilon must be positive, got 0.0"),
        ("model.init_method_std=-0.02", "model.init_method_std must be positive"),
        ("sci.lr_scale=-1", "sci.lr_scale must be >= 0, got -1.0"),
        ("sci.alpha_warmup_steps=-5", "sci.alpha_warmup_steps must be >= 0, got -5"),
        ("data.max_docs=0", "data.max_docs must be positive (or null for every document), got 0"),
    ],
)
def test_out_of_range_values_are_refused_with_the_key(override, expected):
    assert config_error(override).startswith(expected)


@pytest.mark.parametrize(
    "override",
    [
        "train.clip_grad=0",  # clipping off
        "train.warmup_steps=0",
        "train.min_lr=0",
        "train.weight_decay=0",
        "train.adam_beta1=0",
        "model.hidden_dropout=0.1",
        "train.max_consecutive_skips=1",
        "train.loss_spike_factor=1.5",
        "train.loss_spike_window=2",
        "sci.lr_scale=0",  # the branch keeps its initial weights
        "train.max_wall_minutes=null",
    ],
)
def test_the_edges_that_mean_something_are_accepted(override):
    load_config(TINY, [override])


def test_llama3_rope_factors_must_be_ordered():
    message = config_error("model.rope_scaling_factor=8", "model.rope_low_freq_factor=4")
    assert message.startswith("model.rope_low_freq_factor (4.0) and model.rope_high_freq_factor")
    assert load_config(TINY, ["model.rope_scaling_factor=8"]).model.rope_scaling_factor == 8.0
    assert load_config(TINY, ["model.rope_low_freq_factor=4"])  # unused without the scaling


@pytest.mark.parametrize(
    "split, expected",
    [
        ("abc", "data.split must be one to three comma-separated non-negative numbers"),
        ("-1,2,1", "data.split must be one to three"),  # megatron would drop the sign
        ("1e-3", "data.split must be one to three"),  # megatron would read 1 and 3
        ("98,1,1,0", "data.split must be one to three"),
        ("98;1;1", "data.split must be one to three"),
        ("", "data.split must be one to three"),
        ("0,0,0", "data.split must have a positive weight, got '0,0,0'"),
        ("0,1,1", "data.split='0,1,1' leaves the training share empty"),
        ("99,0,1", "data.split='99,0,1' leaves the validation share empty"),
        ("100", "data.split='100' leaves the validation share empty"),
    ],
)
def test_data_split_is_what_megatron_reads_as_written(split, expected):
    assert config_error(f"data.split='{split}'").startswith(expected)


@pytest.mark.parametrize("split", ["98,1,1", "99,1,0", "99,1", "0.9, 0.1, 0", ".5,.5,1", "8,2,0."])
def test_data_split_in_megatron_format_is_accepted_and_read_alike(split):
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    from sci_scale.config.split import split_weights

    cfg = load_config(TINY, [f"data.split='{split}'"])
    weights = split_weights(cfg.data.split)
    total = sum(weights)
    assert parse_and_normalize_split(cfg.data.split) == pytest.approx([w / total for w in weights])
