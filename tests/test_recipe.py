"""Recipes: strict YAML validation with errors that name the file, key and valid choices."""

import pytest

from quantkit.errors import RecipeError, UsageError
from quantkit.recipe import Recipe, load_recipe, shipped_recipes_dir


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_shipped_recipes_load(name):
    r = load_recipe(shipped_recipes_dir() / f"{name}.yaml")
    assert [p.name for p in r.passes] == [name, "embeddings"]
    cfg = r.passes[0].config
    assert cfg.blocksize == 64 and cfg.double_quant is True and cfg.ignore == ("lm_head",)
    emb = r.passes[1].config  # the head the first pass ignores, and the embedding, as int8 rows
    assert (emb.embed, emb.head) == ("int8", "int8")
    assert load_recipe(name) == r  # shipped name resolves to the same file
    assert Recipe.from_dict(r.to_dict()) == r  # dict round trip


def test_shipped_recipes_document_every_key():
    import yaml

    for path in shipped_recipes_dir().glob("*.yaml"):
        header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
        doc = yaml.safe_load(path.read_text())
        keys = set(doc) | {k for entry in doc["passes"] for k in entry}  # every key the recipe uses
        assert {"version", "name", "passes", "pass"} <= keys
        for key in sorted(keys):
            assert key in header, f"{path.name} header does not explain {key!r}"


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_pass_key_names_key_file_and_valid_keys(tmp_path):
    p = _write(tmp_path, "passes:\n  - pass: nf4\n    blocksze: 64\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "blocksze" in msg and str(p) in msg and "blocksize" in msg and "double_quant" in msg


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(RecipeError, match="unknown key 'stages'.*valid keys"):
        load_recipe(_write(tmp_path, "stages: []\npasses:\n  - pass: nf4\n"))


def test_unknown_pass_name_lists_valid_passes(tmp_path):
    with pytest.raises(RecipeError, match="unknown pass 'nf5'.*nf4, fp4"):
        load_recipe(_write(tmp_path, "passes:\n  - pass: nf5\n"))


@pytest.mark.parametrize("line, expect", [
    ("blocksize: '64'", "'blocksize' must be an integer"),
    ("blocksize: 48", "'blocksize' must be one of"),
    ("double_quant: yes please", "'double_quant' must be true or false"),
    ("targets: q_proj", "'targets' must be a list"),
    ("ignore: ['re:(']", "invalid regex"),
])
def test_bad_values(tmp_path, line, expect):
    with pytest.raises(RecipeError, match=expect):
        load_recipe(_write(tmp_path, f"passes:\n  - pass: nf4\n    {line}\n"))


@pytest.mark.parametrize("text, expect", [
    ("passes: []\n", "non-empty list"),
    ("- pass: nf4\n", "must be a mapping"),
    ("passes:\n  - blocksize: 64\n", "needs a 'pass' key"),
    ("version: 2\npasses:\n  - pass: nf4\n", "version 2 is not supported"),
    ("passes: [\n", "not valid YAML"),
])
def test_bad_structure(tmp_path, text, expect):
    with pytest.raises(RecipeError, match=expect):
        load_recipe(_write(tmp_path, text))


def test_missing_recipe_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match="shipped: .*nf4"):
        load_recipe("no-such-recipe")
