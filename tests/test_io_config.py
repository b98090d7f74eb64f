import json

import pytest

from aft.errors import AftError
from aft.infer import InferConfig, load_config
from aft.io import JsonlAppender, read_jsonl, read_queries
from conftest import write_jsonl


def test_query_formats_and_ids(tmp_path):
    f = write_jsonl(tmp_path / "in.jsonl", [
        {"query": [{"role": "user", "content": "a"}]},
        {"messages": [{"role": "user", "content": "b"}], "id": 7},
        "",
        {"prompt": "c", "id": "x"},
        {"instruction": "d", "input": "more"},
    ])
    items = read_queries(f)
    assert [i.id for i in items] == ["0", "7", "x", "3"]
    assert [i.query[-1]["content"] for i in items] == ["a", "b", "c", "d\n\nmore"]
    assert [i.line for i in items] == [1, 2, 4, 5]


@pytest.mark.parametrize("line, msg", [
    ('{"query": [{"role": "user", "content": "a"}', "in.jsonl:2: malformed JSON"),
    ('[1, 2]', "in.jsonl:2: expected a JSON object"),
    ('{"text": "a"}', "in.jsonl:2: no usable query"),
    ('{"query": [{"role": "bot", "content": "a"}]}', 'in.jsonl:2: field "query": message 0 has unknown role'),
    ('{"prompt": "  "}', 'in.jsonl:2: field "prompt": empty'),
    ('{"prompt": "a", "id": 1}', 'in.jsonl:2: field "id": duplicate'),
])
def test_bad_input_names_file_line_and_field(tmp_path, line, msg):
    f = tmp_path / "in.jsonl"
    f.write_text('{"prompt": "ok", "id": 1}\n' + line + "\n")
    with pytest.raises(AftError) as e:
        read_queries(f)
    assert msg in str(e.value)


def test_appender_repairs_a_torn_line_and_resumes(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "response": "1"}\n{"id": "b", "resp')  # killed mid-write
    with JsonlAppender(out) as w:
        assert w.done == {"a"}
        w.write({"id": "b", "response": "2"})
    rows = [r for _, r in read_jsonl(out)]
    assert [r["id"] for r in rows] == ["a", "b"]
    # a complete but invalid last line is cut too
    out.write_text(out.read_text() + '{"id": "c", "respo\n')
    assert JsonlAppender(out).done == {"a", "b"}
    assert out.read_text().count("\n") == 2


def test_official_config_keys_and_flag_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model_name: some/model\ngeneration_params:\n  temperature: 0.5\n  top_p: 0.9\n  max_tokens: 64\n"
                 "  n: 3\n  final_layer_temperature: 0.0\n  final_layer_top_p: 1.0\nvllm_seed: 11\nnum_aggregation: 3\n")
    cfg = load_config(str(y), {"n": 2})
    assert (cfg.model, cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.seed, cfg.num_aggregation) == \
        ("some/model", 0.5, 0.9, 64, 11, 3)
    assert cfg.n == 2 and cfg.final_layer_temperature == 0.0
    pa = cfg.pa()
    assert pa.n == 2 and pa.style.name == "aft"


@pytest.mark.parametrize("text, msg", [
    ("temprature: 0.5\n", "unknown key 'temprature'"),
    ("generation_params:\n  beams: 2\n", "unknown key 'generation_params.beams'"),
    ("n: many\n", "key 'n' expects int"),
    ("style: fancy\n", "key 'style' must be one of"),
    ("top_p: 1.5\n", "top_p"),
    ("a: 1\nb: [1\n", "c.yaml:3: invalid YAML"),
])
def test_bad_config_is_a_one_line_error(tmp_path, text, msg):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(AftError) as e:
        load_config(str(y), {})
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_defaults_are_the_official_ones():
    cfg = InferConfig()
    assert (cfg.n, cfg.num_aggregation, cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.final_layer_temperature,
            cfg.final_layer_top_p, cfg.seed) == (5, 2, 0.7, 0.95, 4096, 0.7, 1.0, 2024)
    official = json.loads((__import__("conftest").FIXTURES / "aft_prompts.json").read_text())["official_config_keys"]
    gp = official["generation_params"]
    assert (gp["n"], gp["temperature"], gp["top_p"], gp["max_tokens"]) == (cfg.n, cfg.temperature, cfg.top_p,
                                                                          cfg.max_tokens)
    assert official["vllm_seed"] == cfg.seed and official["num_aggregation"] == cfg.num_aggregation


def test_shipped_configs_load():
    root = __import__("pathlib").Path(__file__).parents[1] / "configs"
    official = load_config(str(root / "official_default.yaml"), {})
    assert (official.model, official.n, official.num_aggregation) == ("linzw/Llama-AFT-On-Policy", 5, 2)
    quick = load_config(str(root / "quickstart.yaml"), {})
    assert (quick.model, quick.n, quick.num_aggregation, quick.max_tokens) == ("smollm2-135m", 4, 1, 128)
