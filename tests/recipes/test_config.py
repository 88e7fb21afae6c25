"""Recipe parsing: every shipped recipe parses; overrides, type checks and each error case."""

import pytest

from posttrain import UserError
from posttrain.recipes.config import builtin_recipes, find_recipe, load_recipe, parse_overrides
from posttrain.trainers import METHODS

RECIPES = builtin_recipes()


def test_recipes_are_found_recursively():
    methods = {name.split("/")[0] for name in RECIPES}
    assert {"sft", "dpo", "kto", "reward", "grpo", "rloo", "fedau"} <= methods
    for method in ("sft", "dpo", "kto", "reward", "grpo", "rloo"):
        assert f"{method}/tiny" in RECIPES and f"{method}/smollm2-135m" in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_parses(name):
    recipe = load_recipe(name)
    assert recipe.method in METHODS
    assert recipe.config is not None
    first = find_recipe(name).read_text().splitlines()[0]
    assert first.startswith("# ") and ("posttrain train" in first or "accelerate launch" in first), first


def test_values_land_in_the_right_dataclass():
    recipe = load_recipe("dpo/tiny", {"beta": 0.3, "lora_r": 4, "num_samples": 8, "learning_rate": "3e-4"})
    assert recipe.config.beta == 0.3 and recipe.config.learning_rate == 3e-4
    assert recipe.model_args.lora_r == 4 and recipe.model_args.model_name_or_path == "tiny:qwen3"
    assert recipe.data_args.num_samples == 8 and recipe.data_args.dataset == "builtin:preference_pairs"


def test_recipe_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("method: sft\nmodel_name_or_path: tiny:llama\ndataset: builtin:arithmetic\nmax_steps: 3\n")
    recipe = load_recipe(str(path))
    assert recipe.method == "sft" and recipe.config.max_steps == 3


def test_parse_overrides_both_forms():
    got = parse_overrides(
        ["--max_steps", "2", "--learning_rate=1e-3", "--report_to", "[a, b]", "--use_peft", "--bf16=false"]
    )
    assert got == {"max_steps": 2, "learning_rate": "1e-3", "report_to": ["a", "b"], "use_peft": True, "bf16": False}
    recipe = load_recipe("grpo/tiny", parse_overrides(["--reward_funcs", "numeric_match,length_penalty"]))
    assert recipe.data_args.reward_funcs == ["numeric_match", "length_penalty"]


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("method: dpo\nmodel_name_or_path: tiny:qwen3\nlearnig_rate: 0.1\n")
    with pytest.raises(UserError, match=r"typo\.yaml: unknown key 'learnig_rate' .*did you mean 'learning_rate'"):
        load_recipe(str(path))
    with pytest.raises(UserError, match=r"command line: unknown key 'bta'.*did you mean 'beta'"):
        load_recipe("dpo/tiny", {"bta": 0.2})


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("max_steps", "abc", "int"),
        ("learning_rate", "fast", "float"),
        ("bf16", "maybe", "bool"),
        ("max_steps", 2.5, "int"),
    ],
)
def test_wrong_type(key, value, expected):
    with pytest.raises(UserError, match=rf"key '{key}' expects {expected}"):
        load_recipe("dpo/tiny", {key: value})


def test_unknown_method_lists_valid_ones(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("method: dpoo\n")
    with pytest.raises(UserError, match=r"unknown method 'dpoo' \(did you mean 'dpo'\?\); valid methods: .*grpo.*sft"):
        load_recipe(str(path))
    path.write_text("model_name_or_path: x\n")
    with pytest.raises(UserError, match="missing 'method:' key"):
        load_recipe(str(path))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match=r"recipe 'dpo/tinyy' not found.*did you mean 'dpo/tiny'"):
        load_recipe("dpo/tinyy")
    with pytest.raises(UserError, match="not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dpo\n  beta: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(str(bad))


def test_invalid_value_from_config_validation():
    # TRL's own __post_init__ check becomes a one-line recipe error.
    with pytest.raises(UserError, match="invalid GRPOConfig"):
        load_recipe("grpo/tiny", {"num_generations": 3})


def test_custom_optimizer_is_kept_aside():
    recipe = load_recipe("dpo/tiny", {"optim": "lion_k", "optim_args": "K=l2"})
    assert recipe.optimizer == "lion_k" and recipe.config.optim != "lion_k"
    with pytest.raises(UserError, match="invalid optim_args for optim 'lion_k'"):
        load_recipe("dpo/tiny", {"optim": "lion_k", "optim_args": "K=nope"})


def test_yaml_12_booleans_keep_no_a_string(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: dpo\nmodel_name_or_path: tiny:qwen3\nsave_strategy: no\nuse_peft: true\n")
    recipe = load_recipe(str(path), parse_overrides(["--logging_strategy", "no", "--remove_unused_columns", "false"]))
    assert recipe.config.save_strategy == "no" and recipe.config.logging_strategy == "no"
    assert recipe.model_args.use_peft is True and recipe.config.remove_unused_columns is False
