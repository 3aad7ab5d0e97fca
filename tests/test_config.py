"""The config: TOML + key=value overrides into one dataclass; every mistake is a clear error."""
from pathlib import Path

import pytest

from model.errors import SFTError
from training.config import Config, all_keys, help_text, load_config, options_markdown, to_toml

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_toml_values_override_defaults_and_overrides_override_toml(tmp_path):
    p = write(tmp_path, '[optim]\nlr = 1e-3\n[run]\nname = "a"\n')
    cfg = load_config(p, ["optim.lr=2e-4", "run.resume=true", "train.batch_size=3"])
    assert cfg.optim.lr == 2e-4 and cfg.run.resume is True and cfg.train.batch_size == 3
    assert cfg.run.name == "a" and cfg.optim.warmup_steps == Config().optim.warmup_steps


def test_override_values_are_converted_to_the_field_type():
    cfg = load_config(None, ["optim.lr=1", "run.name=123", "lora.targets=q_proj,k_proj",
                             "data.train=some/path.jsonl", 'lora.targets=["o_proj"]'])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.run.name == "123" and cfg.data.train == "some/path.jsonl"
    assert cfg.lora.targets == ["o_proj"]


def test_bare_key_is_accepted_when_one_section_owns_it():
    assert load_config(None, ["lr=5e-4"]).optim.lr == 5e-4


def test_unknown_key_in_file_names_it_the_file_and_the_closest_key(tmp_path):
    p = write(tmp_path, "[optim]\nlearning_rate = 1e-3\nwarmup_step = 3\n")
    with pytest.raises(SFTError, match=r"c\.toml.*'optim\.learning_rate'.*did you mean 'optim\.lr'"):
        load_config(p)


def test_typo_on_command_line_suggests_the_closest_key():
    with pytest.raises(SFTError, match=r"'optim\.warmup_step'.*'optim\.warmup_steps'"):
        load_config(None, ["optim.warmup_step=5"])
    with pytest.raises(SFTError, match=r"'trian\.batch_size'.*'train\.batch_size'"):
        load_config(None, ["trian.batch_size=5"])


def test_wrong_type_and_bad_choice_are_errors_naming_the_key():
    with pytest.raises(SFTError, match=r"'train\.batch_size' must be int"):
        load_config(None, ["train.batch_size=abc"])
    with pytest.raises(SFTError, match=r"'run\.resume' must be bool"):
        load_config(None, ["run.resume=3"])
    with pytest.raises(SFTError, match=r"'model\.finetune' must be one of"):
        load_config(None, ["model.finetune=ful"])
    with pytest.raises(SFTError, match=r"'data\.template' must be one of .*did you mean 'chatml'"):
        load_config(None, ["data.template=chatm"])
    with pytest.raises(SFTError, match="expected key=value"):
        load_config(None, ["optim.lr"])


def test_invalid_toml_and_missing_file_are_sft_errors(tmp_path):
    with pytest.raises(SFTError, match="not valid TOML"):
        load_config(write(tmp_path, "[optim\nlr = 1"))
    with pytest.raises(SFTError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-5", 'run.name=x "y"', "lora.targets=a,b"])
    p = tmp_path / "r.toml"
    p.write_text(to_toml(cfg))
    assert load_config(p) == cfg


def test_help_lists_every_option_with_its_default():
    text = help_text()
    for key in all_keys():
        assert key in text
    assert "3e-4" in text or "0.0003" in text


TRAIN_RECIPES = [p for p in sorted((ROOT / "configs").glob("*.toml"))
                 if "python train.py --config" in p.read_text()]  # other tools have their own


def test_quickstart_is_a_recipe():
    assert ROOT / "configs" / "quickstart.toml" in TRAIN_RECIPES


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.name)
def test_shipped_training_recipes_load(path):
    load_config(path)


def test_readme_options_table_is_current():
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md missing")
    assert options_markdown() in readme.read_text(), "regenerate with training.config.options_markdown()"
