import json

import pytest

from steer.core.attributes import BUILTIN_SCHEMAS, AttributeSchema, AttributeValueError, get_schema


def test_builtin_schemas_have_expected_order():
    assert get_schema("oasst").names == [
        "quality", "toxicity", "humor", "creativity", "helpfulness", "violence", "not_appropriate"
    ]
    assert get_schema("helpsteer").names == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    assert get_schema("steerlm").names == [
        "quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence", "complexity",
        "verbosity",
    ]
    for schema in BUILTIN_SCHEMAS.values():
        for attr in schema.attributes:
            assert (attr.min, attr.max) == (0, 4) and attr.description


@pytest.mark.parametrize("name", list(BUILTIN_SCHEMAS))
def test_label_string_round_trip(name):
    schema = get_schema(name)
    values = {n: (i * 3) % 5 for i, n in enumerate(schema.names)}
    text = schema.format_labels(values)
    assert text == ",".join(f"{n}:{v}" for n, v in values.items())
    assert schema.parse_labels(text) == values
    assert schema.format_labels(schema.parse_labels(text)) == text


def test_label_items_are_exactly_the_pieces_of_label_strings():
    schema = get_schema("helpsteer")
    items = schema.label_items()
    assert len(items) == len(set(items)) == 5 * len(schema)
    for values in ({n: 0 for n in schema.names}, {n: 4 for n in schema.names}, {"verbosity": 2}):
        assert set(schema.format_labels(values).split(",")) <= set(items)
    assert "helpfulness:3" in items and "helpfulness:5" not in items


def test_format_orders_by_schema_and_fills_defaults():
    schema = get_schema("oasst")
    text = schema.format_labels({"humor": 3, "quality": 1})
    assert text.startswith("quality:1,toxicity:0,humor:3,")
    assert schema.parse_labels("humor:3", fill_defaults=False) == {"humor": 3}


def test_humour_alias_everywhere():
    schema = get_schema("steerlm")
    assert schema.validate({"humour": 4}, fill_defaults=False) == {"humor": 4}
    assert schema.parse_labels("humour:2,Creativity:1", fill_defaults=False) == {"humor": 2, "creativity": 1}
    assert "humour" in schema and schema["HUMOUR"].name == "humor"
    with pytest.raises(AttributeValueError, match="twice"):
        schema.validate({"humor": 1, "humour": 2})


@pytest.mark.parametrize(
    "values, match, field",
    [
        ({"funniness": 2}, "unknown attribute 'funniness'", "funniness"),
        ({"humor": 5}, "outside its range 0-4", "humor"),
        ({"humor": -1}, "outside its range 0-4", "humor"),
        ({"humor": 2.5}, "expected an integer", "humor"),
        ({"humor": "lots"}, "expected an integer", "humor"),
        ({"humor": True}, "boolean", "humor"),
        ({"humor": None}, "expected an integer", "humor"),
    ],
)
def test_validation_errors_name_the_problem(values, match, field):
    with pytest.raises(AttributeValueError, match=match) as info:
        get_schema("oasst").validate(values)
    assert info.value.field == field


@pytest.mark.parametrize("text", ["humor", "humor:", ":3", "humor:3,,quality:2", "humor=3", "humor:3,humor:2"])
def test_malformed_label_strings(text):
    with pytest.raises(AttributeValueError):
        get_schema("oasst").parse_labels(text)


def test_integral_floats_and_numeric_strings_accepted():
    schema = get_schema("oasst")
    assert schema.validate({"humor": 3.0, "quality": " 2 "}, fill_defaults=False) == {"quality": 2, "humor": 3}


def test_round_and_clip():
    schema = get_schema("helpsteer")
    assert schema.round_and_clip({"helpfulness": 4.7, "verbosity": -0.4, "coherence": 2.5}) == {
        "helpfulness": 4, "verbosity": 0, "coherence": 2
    }


def test_custom_schema_from_yaml_and_json(tmp_path):
    yaml_file = tmp_path / "npc.yaml"
    yaml_file.write_text(
        "name: npc\nattributes:\n  - {name: humor, max: 9, default: 2, description: Jokes}\n  - name: menace\n"
    )
    schema = get_schema(str(yaml_file))
    assert schema.name == "npc" and schema.names == ["humor", "menace"]
    assert schema["humour"].max == 9
    assert schema.parse_labels("humor:9,menace:0") == {"humor": 9, "menace": 0}
    with pytest.raises(AttributeValueError, match="outside its range 0-9"):
        schema.validate({"humor": 10})
    json_file = tmp_path / "s.json"
    schema.save(json_file)
    assert AttributeSchema.from_file(json_file) == schema
    assert json.loads(json_file.read_text())["attributes"][0]["max"] == 9


@pytest.mark.parametrize(
    "data, match",
    [
        ({"attributes": []}, "no attributes"),
        ({"attributes": ["a", "a"]}, "repeats"),
        ({"attributes": [{"name": "a", "min": 3, "max": 1}]}, "below max"),
        ({"attributes": [{"name": "a", "default": 7}]}, "outside"),
        ({"attributes": [{"name": "a b"}]}, "letters"),
        ({"attributes": [{"name": "a", "colour": 1}]}, r"attributes\[0\]\.colour: unknown field"),
        ({"attributes": ["a"], "alias": {"funny": "a"}}, "alias: unknown field"),
        ({}, "attributes: required field missing"),
        ({"attributes": [{"name": "a", "max": 2, "levels": ["none", "some"]}]}, "2 words for the 3 values 0-2"),
        ({"attributes": [{"name": "a", "max": 1, "levels": ["none", "a lot\nmore"]}]}, "one line"),
        ({"attributes": [{"name": "a", "max": 1, "levels": ["none", "some; more"]}]}, "without ';'"),
        ({"attributes": [{"name": "a", "max": 1, "levels": ["", "some"]}]}, "non-empty"),
    ],
)
def test_bad_custom_schemas(data, match):
    with pytest.raises(AttributeValueError, match=match):
        AttributeSchema.from_dict(data)


def test_unknown_schema_name():
    with pytest.raises(AttributeValueError, match="unknown schema"):
        get_schema("nope")


@pytest.mark.parametrize("entry, got", [
    ({"name": "humor", "max": 4.7}, "4.7"),
    ({"name": "humor", "max": "four"}, "'four'"),
    ({"name": "humor", "max": True}, "True"),
    ({"name": "humor", "default": "2"}, "'2'"),
])
def test_schema_file_values_are_checked_naming_the_file_and_field(tmp_path, entry, got):
    """A value that is not an integer is an error, never rounded (4.7 once became 4) or converted."""
    path = tmp_path / "npc.json"
    path.write_text(json.dumps({"name": "npc", "attributes": ["menace", entry]}))
    field = next(k for k in entry if k != "name")
    with pytest.raises(AttributeValueError) as e:
        get_schema(str(path))
    assert str(e.value).startswith(f"{path}: attributes[1].{field}: ") and got in str(e.value)
    assert e.value.field == f"attributes[1].{field}"


def test_schema_files_that_do_not_parse_name_the_file_and_line(tmp_path):
    bad_json = tmp_path / "s.json"
    bad_json.write_text('{"attributes": [\n  "humor",\n]}')
    with pytest.raises(AttributeValueError, match=rf"{bad_json} line 3: not valid JSON"):
        get_schema(str(bad_json))
    bad_yaml = tmp_path / "s.yaml"
    bad_yaml.write_text("attributes:\n  - humor\n  - {name: menace\n")
    with pytest.raises(AttributeValueError, match=rf"{bad_yaml} line \d+: not valid YAML"):
        get_schema(str(bad_yaml))
    not_a_schema = tmp_path / "list.json"
    not_a_schema.write_text('["humor"]')
    with pytest.raises(AttributeValueError, match=rf"{not_a_schema}: "):
        get_schema(str(not_a_schema))


def test_cli_reports_a_bad_schema_file_in_one_line(tmp_path, capsys):
    from steer.cli.main import main

    path = tmp_path / "npc.json"
    path.write_text(json.dumps({"attributes": [{"name": "humor", "max": 4.7}]}))
    code = main(["apm", "train", "--data", str(tmp_path / "unused.jsonl"), "--format", "steer", "--schema", str(path),
                 "--output", str(tmp_path / "apm")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert str(path) in err[0] and "attributes[0].max" in err[0] and "4.7" in err[0]


def test_level_words_describe_values_and_survive_a_schema_file(tmp_path):
    """Level words are the label text of ``--label-wording words``: one per value, min to max,
    kept through a schema file, and absent from files whose attributes have none."""
    path = tmp_path / "npc.yaml"
    path.write_text("name: npc\nattributes:\n  - {name: menace, min: 1, max: 3, default: 1, "
                    "levels: [harmless, threatening, terrifying]}\n  - name: humor\n")
    schema = get_schema(str(path))
    assert schema["menace"].levels == ("harmless", "threatening", "terrifying")
    assert schema.describe_labels({"menace": 3}, fill_defaults=False) == ["terrifying"]
    assert schema.without_level_words() == ["humor"]
    with pytest.raises(AttributeValueError, match="'humor' has no level words") as e:
        schema.describe_labels({"menace": 1, "humor": 0})
    assert e.value.field == "humor"
    saved = tmp_path / "npc.json"
    schema.save(saved)
    entries = json.loads(saved.read_text())["attributes"]
    assert entries[0]["levels"] == ["harmless", "threatening", "terrifying"] and "levels" not in entries[1]
    assert AttributeSchema.from_file(saved) == schema


@pytest.mark.parametrize("name", sorted(BUILTIN_SCHEMAS))
def test_builtin_attributes_have_distinct_words_for_every_value(name):
    schema = BUILTIN_SCHEMAS[name]
    assert schema.without_level_words() == []
    for attr in schema.attributes:
        words = [schema.describe_labels({attr.name: v}, fill_defaults=False)[0] for v in range(attr.min, attr.max + 1)]
        assert len(set(words)) == len(words), attr.name
    assert get_schema("oasst").describe_labels({"humor": 0, "creativity": 4}, fill_defaults=False) == [
        "completely serious", "wildly imaginative"]
