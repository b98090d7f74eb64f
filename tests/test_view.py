"""`aft view`: copied-span matching, the page built from real `aft infer` / `aft eval run` files, escaping,
and bad input through the CLI."""

import json
from html.parser import HTMLParser

import pytest
from conftest import FIXTURES, write_jsonl

from aft.cli import main
from aft.errors import AftError
from aft.view import build_html, copied_share, copied_spans, load_runs, page_of_records

GSM = FIXTURES / "eval" / "gsm8k_sample.jsonl"


# ------------------------------------------------------------ copied spans
def spans_as_text(text, sources, **kw):
    """(copied text, source index) per span, after checking each span equals its source slice."""
    out = []
    for sp in copied_spans(text, sources, **kw):
        assert text[sp.start:sp.end] == sources[sp.source][sp.src_start:sp.src_end]
        out.append((text[sp.start:sp.end], sp.source))
    return out


def test_an_aggregation_that_selects_one_proposal_is_one_span_of_it():
    props = ["The sum is 12 because 5 plus 7 is 12.", "Five and seven make thirteen, so 13."]
    assert spans_as_text(props[0], props) == [(props[0], 0)]
    assert spans_as_text("  " + props[1] + "\n", props) == [(props[1], 1)]


def test_a_merge_is_split_between_its_proposals():
    props = ["first we add the two numbers together carefully", "then the answer must be forty two exactly"]
    agg = "So first we add the two numbers and then the answer must be forty two, done."
    assert spans_as_text(agg, props) == [("first we add the two numbers", 0), ("then the answer must be forty two", 1)]
    # 18 words and punctuation marks: "So first ... forty two , done ."
    assert copied_share(agg, copied_spans(agg, props), 2) == [round(6 / 18, 3), round(7 / 18, 3)]


def test_new_text_and_short_overlaps_are_not_highlighted():
    props = ["the cat sat on the mat today"]
    assert spans_as_text("a dog ran in the park", props) == []
    assert spans_as_text("so the cat sat here", props) == []  # 3 common words < 4
    assert spans_as_text("so the cat sat here", props, min_words=3) == [("the cat sat", 0)]
    assert copied_spans("", props) == [] and copied_spans("the cat sat on", []) == []


def test_longest_match_wins_and_ties_go_to_the_lower_index():
    props = ["alpha beta gamma delta", "x alpha beta gamma delta epsilon zeta", "alpha beta gamma delta"]
    assert spans_as_text("alpha beta gamma delta epsilon zeta", props) == [("alpha beta gamma delta epsilon zeta", 1)]
    assert spans_as_text("alpha beta gamma delta", [props[0], props[2]]) == [("alpha beta gamma delta", 0)]


def test_no_word_is_claimed_twice_and_blocked_matches_keep_their_free_part():
    # "c d e f g h i" (7 words, source 1) is taken first; source 0's "a b c d e f" keeps only "a b" (< 4 words)
    props = ["a b c d e f", "c d e f g h i"]
    assert spans_as_text("a b c d e f g h i", props) == [("c d e f g h i", 1)]
    # equally long: the one earlier in the text first
    assert spans_as_text("a b c d e f g h", ["a b c d e f", "c d e f g h"]) == [("a b c d e f", 0)]
    # with a longer prefix, the free prefix of the blocked match survives and goes to its own source
    props = ["p q r s t c d e", "c d e f g h i j k"]
    assert spans_as_text("p q r s t c d e f g h i j k", props) == [("p q r s t", 0), ("c d e f g h i j k", 1)]
    # a repeated passage is matched each time it appears
    got = spans_as_text("one two three four and one two three four", ["one two three four"])
    assert got == [("one two three four", 0), ("one two three four", 0)]


def naive_tiling(t, sources, min_words):
    """The same rule, written the slow obvious way: (start word, length, source) of each tile."""
    taken, tiles = [False] * len(t), []
    while True:
        best = None  # longest free common run; ties: earlier in t, then lower source, then earlier in it
        for i in range(len(t)):
            for s, w in enumerate(sources):
                for j in range(len(w)):
                    n = 0
                    while i + n < len(t) and j + n < len(w) and t[i + n] == w[j + n] and not taken[i + n]:
                        n += 1
                    if n >= min_words and (best is None or (-n, i, s) < (-best[1], best[0], best[2])):
                        best = (i, n, s)
        if best is None:
            return sorted(tiles)
        i, n, s = best
        taken[i:i + n] = [True] * n
        tiles.append(best)


def test_copied_spans_agree_with_the_slow_obvious_tiling_on_repetitive_texts():
    import random

    rng = random.Random(0)
    for _ in range(400):
        vocab = [str(v) for v in range(rng.randint(2, 5))]  # few words: many repeats, loops, ties
        t = [rng.choice(vocab) for _ in range(rng.randint(0, 30))]
        sources = [[rng.choice(vocab) for _ in range(rng.randint(0, 20))] for _ in range(rng.randint(1, 3))]
        text = " ".join(t)
        starts = [k for k, c in enumerate(text) if c != " " and (k == 0 or text[k - 1] == " ")]
        got = [(starts.index(sp.start), len(text[sp.start:sp.end].split()), sp.source)
               for sp in copied_spans(text, [" ".join(w) for w in sources], min_words=3)]
        assert got == naive_tiling(t, sources, 3), (t, sources)


# ------------------------------------------------------------ real files
class Page(HTMLParser):
    """The tags, attributes and script contents of a page (a strict parse of what the browser gets)."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs, self.scripts, self._in = [], [], [], None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        if tag == "script":
            self._in = dict(attrs)
            self.scripts.append([dict(attrs), ""])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in = None

    def handle_data(self, data):
        if self._in is not None:
            self.scripts[-1][1] += data


def page_data(text):
    page = Page(text)
    data = [s for a, s in page.scripts if a.get("id") == "aft-data"]
    assert len(data) == 1 and page.tags.count("script") == 2
    # self-contained: nothing is loaded from anywhere
    assert not [v for k, v in page.attrs if k in ("src", "href") and v]
    return page, json.loads(data[0])


@pytest.fixture(scope="module")
def infer_file(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("view-infer")
    inp = write_jsonl(tmp / "q.jsonl", [{"id": "add", "query": [{"role": "user", "content": "What is 3 + 4?"}]},
                                        {"id": "sky", "prompt": "What color is the sky?"},
                                        {"id": "tea", "instruction": "Name a tea."}])
    out = tmp / "run.jsonl"
    assert main(["infer", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-k", "3", "-l", "2",
                 "--max_tokens", "6"]) == 0
    return out


def test_page_from_a_real_infer_run(infer_file, tmp_path, capsys):
    html_path = tmp_path / "report.html"
    assert main(["view", str(infer_file), "-o", str(html_path)]) == 0
    assert f"3 queries -> {html_path}" in capsys.readouterr().out
    _, data = page_data(html_path.read_text())
    rows = [json.loads(line) for line in infer_file.read_text().splitlines()]
    assert [q["id"] for q in data["queries"]] == ["add", "sky", "tea"]
    for q, row in zip(data["queries"], rows):
        assert q["kind"] == "infer" and q["response"] == row["response"]
        assert [len(layer["outputs"]) for layer in q["layers"]] == [3, 3, 1]
        assert [layer["role"] for layer in q["layers"]] == ["propose", "aggregate", "final"]
        assert [o["text"] for o in q["layers"][1]["outputs"]] == [o["text"] for o in row["trace"][1]["outputs"]]
        assert all(o["tokens"] <= 6 and o["finish_reason"] in ("length", "stop") for layer in q["layers"]
                   for o in layer["outputs"])
        assert ("truncated" in q["flags"]) == any(o["finish_reason"] == "length" for layer in row["trace"]
                                                  for o in layer["outputs"])
        for prev, layer in zip(q["layers"], q["layers"][1:]):  # every span is a real copy of the layer before
            for o in layer["outputs"]:
                for start, end, src, s0, s1 in o["spans"]:
                    assert o["text"][start:end] == prev["outputs"][src]["text"][s0:s1]
    assert [q["question"] for q in data["queries"]] == ["What is 3 + 4?", "What color is the sky?", "Name a tea."]
    assert data["summary"][0]["queries"] == 3 and data["summary"][0]["strategy"] == "infer"
    # default output name: next to the first file
    assert main(["view", str(infer_file)]) == 0 and infer_file.with_suffix(".html").exists()


def test_an_aggregation_copying_a_proposal_and_a_cut_proposal(infer_file):
    """A real trace edited by hand: aggregation 1 repeats proposal 3 word for word, and layer 1 records that
    proposal 2 (at shuffled position 0) was cut to fit the context."""
    row = json.loads(infer_file.read_text().splitlines()[0])
    props = ["one two three four five six", "alpha beta gamma delta epsilon", "red green blue cyan magenta"]
    for o, text in zip(row["trace"][0]["outputs"], props):
        o["text"] = text
    row["trace"][1]["outputs"][0]["text"] = "I pick: red green blue cyan magenta."
    row["trace"][1]["order"] = [1, 0, 2]
    row["trace"][1]["truncated"] = [{"index": 0, "from_chars": 30, "to_chars": 11}]
    row["trace"][0]["outputs"][2]["proposer"] = "other-model"  # written by a second proposer (--proposers)
    path = infer_file.with_name("edited.jsonl")
    path.write_text(json.dumps(row) + "\n")
    (q,) = load_runs([path])
    agg = q["layers"][1]["outputs"][0]
    assert agg["spans"] == [[8, 35, 2, 0, 27]]  # the final "." is not the proposal's
    assert agg["copied"] == [0.0, 0.0, round(5 / 9, 3)]  # 5 of "I pick : red green blue cyan magenta ."
    assert q["layers"][0]["outputs"][1]["cut"] == {"to_chars": 11, "from_chars": 30, "by_layer": 1}
    assert "cut" not in q["layers"][0]["outputs"][0] and "cut" in q["flags"]
    assert [o["proposer"] for o in q["layers"][0]["outputs"]] == [None, None, "other-model"]
    assert "other-model" in build_html([q])  # the page says "by other-model" on that proposal


def test_the_page_of_records_in_memory_is_the_page_of_their_file(infer_file):
    """What a server can answer with: P&A results as propose_and_aggregate returns them, no file."""
    rows = [json.loads(line) for line in infer_file.read_text().splitlines()]
    results = [{k: r[k] for k in ("id", "response", "trace")} for r in rows]
    _, data = page_data(page_of_records(results, source="POST /v1/chat/completions"))
    from_file = load_runs([infer_file])
    assert [q["id"] for q in data["queries"]] == ["add", "sky", "tea"]
    assert [q["layers"] for q in data["queries"]] == [q["layers"] for q in from_file]
    assert data["queries"][0]["file"] == "POST /v1/chat/completions" and data["queries"][0]["question"] is None
    with pytest.raises(AftError, match=r"request:2: not an `aft infer` output"):
        page_of_records([results[0], {"text": "hi"}])


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, tiny_engine):
    from aft.evaluate.run import load_config, run_eval

    out = tmp_path_factory.mktemp("view-eval") / "ev"
    flags = {"out": str(out), "model": "tiny", "tasks": [f"gsm8k:{GSM}"], "limit": 3, "max_tokens": 4,
             "strategies": ["greedy", "pa:k=2,l=1", "majority:n=2", "best_of_n:n=2,scorer=verifier"],
             "report": False}
    run_eval(load_config(None, flags), engine=tiny_engine)
    return out / "tiny" / "gsm8k-gsm8k_sample"


def test_page_from_real_eval_records(eval_dir, tmp_path):
    from aft.evaluate.tasks import load_gsm8k

    files = sorted(eval_dir.glob("*.jsonl"))
    assert len(files) == 4
    html_path = tmp_path / "eval.html"
    assert main(["view", *map(str, files), "-o", str(html_path)]) == 0
    _, data = page_data(html_path.read_text())
    qs = data["queries"]
    assert len(qs) == 12 and {q["strategy"] for q in qs} == {"greedy", "pa-k2-l1", "majority-n2", "bon-n2-oracle"}
    questions = {it.id: it.query[-1]["content"] for it in load_gsm8k(GSM)}
    for q in qs:
        assert q["kind"] == "eval" and q["question"] == questions[q["id"]]  # rebuilt from the file's meta.json
        assert isinstance(q["correct"], bool)
        outs = [o for layer in q["layers"] for o in layer["outputs"]] + q["candidates"]
        assert all(isinstance(o["correct"], bool) for o in outs)
        if q["strategy"] == "pa-k2-l1":
            assert [len(layer["outputs"]) for layer in q["layers"]] == [2, 1]
            assert q["layers"][-1]["outputs"][0]["correct"] == q["correct"]
        if q["strategy"] in ("majority-n2", "bon-n2-oracle"):
            assert len(q["candidates"]) == 2 and q["candidates"][q["picked"]]["text"] == q["response"]
    assert {(r["strategy"], r["queries"]) for r in data["summary"]} == {
        ("greedy", 3), ("pa-k2-l1", 3), ("majority-n2", 3), ("bon-n2-oracle", 3)}


def test_eval_filters_on_edited_real_records(eval_dir, tmp_path):
    """A right proposal under a wrong final answer, and all proposals wrong, are found as such."""
    rec = json.loads((eval_dir / "pa-k2-l1.seed0.jsonl").read_text().splitlines()[0])
    reference = rec["reference"]
    right, wrong = f"So the answer is {reference}.", f"So the answer is {int(float(reference)) + 1}."
    rows = []
    for n, (p0, p1, final) in enumerate([(right, wrong, wrong), (wrong, wrong, wrong), (wrong, right, right)]):
        r = json.loads(json.dumps(rec))
        r["trace"][0]["outputs"][0]["text"], r["trace"][0]["outputs"][1]["text"] = p0, p1
        r["trace"][1]["outputs"][0]["text"] = r["response"] = final
        for o in r["trace"][0]["outputs"]:
            o["finish_reason"] = "stop"
        r["trace"][1]["outputs"][0]["finish_reason"] = r["finish_reason"] = "length" if n == 1 else "stop"
        r["correct"] = final == right
        rows.append(r)
    path = eval_dir / "pa-k2-l1.seed9.jsonl"
    write_jsonl(path, rows)
    (eval_dir / "pa-k2-l1.seed9.meta.json").write_text((eval_dir / "pa-k2-l1.seed0.meta.json").read_text())
    try:
        qs = load_runs([path])
    finally:
        path.unlink()
        (eval_dir / "pa-k2-l1.seed9.meta.json").unlink()
    assert [[o["correct"] for o in q["layers"][0]["outputs"]] for q in qs] == [[True, False], [False, False],
                                                                                [False, True]]
    assert [o["extracted"] for o in qs[0]["layers"][0]["outputs"]] == [reference, str(int(float(reference)) + 1)]
    assert ["final_wrong_proposal_right" in q["flags"] for q in qs] == [True, False, False]
    assert ["all_proposals_wrong" in q["flags"] for q in qs] == [False, True, False]
    assert ["truncated" in q["flags"] for q in qs] == [False, True, False]


def test_eval_records_whose_task_cannot_be_rebuilt_are_checked_against_the_reference(eval_dir, tmp_path):
    rec = json.loads((eval_dir / "pa-k2-l1.seed0.jsonl").read_text().splitlines()[0])
    rec["trace"][0]["outputs"][0]["text"] = f"Answer: {rec['reference']}"
    path = write_jsonl(tmp_path / "moved.jsonl", [rec])  # no .meta.json beside it
    (q,) = load_runs([path])
    assert q["question"] is None and q["layers"][0]["outputs"][0]["correct"] is True


# ------------------------------------------------------------ escaping
NASTY = "</script><script>alert(1)</script><img src=x onerror=alert(2)> <!-- & \u2028 \"'"


def test_markup_in_any_text_stays_text(tmp_path):
    row = {"id": "x</script>", "query": [{"role": "user", "content": NASTY}], "response": NASTY,
           "trace": [{"layer": 0, "role": "propose", "outputs": [{"text": NASTY, "tokens": 3, "finish_reason": NASTY}]},
                     {"layer": 1, "role": "final", "outputs": [{"text": NASTY, "tokens": 3, "finish_reason": "stop"}]}]}
    path = write_jsonl(tmp_path / "x.jsonl", [row])
    page_text = build_html(load_runs([path]), title=NASTY)
    page, data = page_data(page_text)
    assert "img" not in page.tags and page.tags.count("script") == 2
    assert "</script><" not in page_text.split('id="aft-data">', 1)[1].split("</script>", 1)[0]
    q = data["queries"][0]
    assert q["question"] == NASTY and q["response"] == NASTY and q["id"] == "x</script>"
    assert q["layers"][1]["outputs"][0]["spans"] == [[0, len(NASTY), 0, 0, len(NASTY)]]
    assert "<title>&lt;/script&gt;" in page_text


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize("content, msg", [
    (None, "missing.jsonl: no such file"),
    ('{"id": "a", "trace": []}\n{"id": "b", "trace": [\n', "bad.jsonl:2: malformed JSON"),
    ('{"prompt": "What is 2 + 2?"}\n', 'bad.jsonl:1: not an `aft infer` output or `aft eval run` record'),
    ('[1, 2]\n', "bad.jsonl:1: expected a JSON object, got list"),
    ('\n\n', "bad.jsonl: no records"),
    ('{"id": "a", "trace": {"layer": 0}}\n', 'bad.jsonl:1: field "trace": expected a list of layers'),
    ('{"id": "a", "trace": [{"layer": 0}]}\n', 'bad.jsonl:1: field "trace": layer 0 has no "outputs" list'),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, msg):
    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        path.write_text(content)
    assert main(["view", str(path), "-o", str(tmp_path / "o.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aft view: error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "o.html").exists()


def test_a_folder_is_refused_with_a_hint(tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 2
    assert "is a folder; give the .jsonl files" in capsys.readouterr().err
