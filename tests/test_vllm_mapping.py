"""The vllm engine without vLLM: the pure mappings, the install hint, and the glue around LLM.chat.

vLLM cannot be installed on these machines. The glue test puts a stand-in
`vllm` module (LLM / SamplingParams with the documented signatures) in
sys.modules to check that generate makes one batched chat call with one
SamplingParams per request; it says nothing about vLLM itself.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace as NS

import pytest

from aft.engines.base import Completion, Request, SamplingParams
from aft.engines.vllm import VLLMEngine, finish_reason, sampling_kwargs, to_result
from aft.errors import AftError


def test_sampling_kwargs():
    p = SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=0, max_tokens=64, stop=("\n\n", "###"), seed=3)
    assert sampling_kwargs(p) == {"n": 4, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 64,
                                  "stop": ["\n\n", "###"], "seed": 3}
    q = sampling_kwargs(SamplingParams(top_k=50, temperature=0.0))
    assert q["top_k"] == 50 and q["temperature"] == 0.0 and q["stop"] is None and q["seed"] is None and q["n"] == 1


def request_output(prompt_len, outs):
    """Shaped like vllm.RequestOutput: prompt_token_ids and outputs (CompletionOutput), possibly out of order."""
    return NS(request_id="0", prompt="", prompt_token_ids=list(range(prompt_len)), finished=True,
              outputs=[NS(index=i, text=t, token_ids=list(range(k)), finish_reason=f, stop_reason=None)
                       for i, t, k, f in outs])


def test_to_result():
    out = request_output(7, [(1, "b", 5, "length"), (0, "a", 2, "stop")])
    res = to_result(out, SamplingParams(n=2, seed=10))
    assert res.completions == [Completion("a", 2, "stop"), Completion("b", 5, "length")]
    assert res.prompt_tokens == 7
    assert res.seeds == [10, 11]  # vLLM V1 seeds child j with seed + j
    assert to_result(out, SamplingParams(n=2)).seeds == [None, None]


def test_finish_reason():
    assert finish_reason("length") == "length"
    assert finish_reason("stop") == "stop"
    assert finish_reason("abort") == "stop" and finish_reason(None) == "stop"


def test_missing_vllm_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(AftError, match=r"pip install 'aft\[vllm\]'"):
        VLLMEngine("some/model")


class FakeLLM:
    """Stand-in for vllm.LLM with the documented call shapes; records what it is given."""

    calls: list = []

    def __init__(self, **kw):
        self.kw = kw
        self.llm_engine = NS(model_config=NS(max_model_len=kw.get("max_model_len") or 2048))

    def get_tokenizer(self):
        return NS(apply_chat_template=lambda m, tokenize, add_generation_prompt, **kw: "|".join(x["content"] for x in m),
                  encode=lambda text, add_special_tokens: list(text), chat_template="{{ the model's own }}")

    def chat(self, messages, sampling_params=None, use_tqdm=True, chat_template=None):
        FakeLLM.calls.append((messages, sampling_params, use_tqdm))
        return [request_output(3, [(j, f"{conv[-1]['content']}-{j}", 2, "stop") for j in range(sp.n)])
                for conv, sp in zip(messages, sampling_params)]


def test_generate_is_one_batched_chat_call(monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    fake.SamplingParams = lambda **kw: NS(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    FakeLLM.calls.clear()

    eng = VLLMEngine("m", max_model_len=1024, tensor_parallel_size=2)
    assert eng.llm.kw["enable_prefix_caching"] is True and eng.llm.kw["tensor_parallel_size"] == 2
    assert eng.context_window == 1024 and eng.count_tokens([{"role": "user", "content": "abc"}]) == 3
    reqs = [Request([{"role": "user", "content": "x"}], SamplingParams(n=2, seed=1)),
            Request([{"role": "user", "content": "y"}], SamplingParams(n=1, top_k=5))]
    results = eng.generate(reqs)
    assert len(FakeLLM.calls) == 1
    conversations, sps, use_tqdm = FakeLLM.calls[0]
    assert conversations == [r.messages for r in reqs] and use_tqdm is False
    assert [(sp.n, sp.seed, sp.top_k) for sp in sps] == [(2, 1, -1), (1, None, 5)]
    assert [[c.text for c in r.completions] for r in results] == [["x-0", "x-1"], ["y-0"]]
    with pytest.raises(AftError, match="data-parallel-size"):
        VLLMEngine("m", data_parallel_size=2)


def test_chat_template_falls_back_to_chatml_and_close_frees_the_engine(monkeypatch):
    from aft.engines.base import CHATML_TEMPLATE
    from aft.engines.vllm import pick_chat_template

    assert pick_chat_template(None, None) is CHATML_TEMPLATE  # a base model: ChatML, as the hf engine
    assert pick_chat_template(None, "{{ own }}") is None  # the tokenizer's own template
    assert pick_chat_template("{{ given }}", "{{ own }}") == "{{ given }}"

    shut = []

    class BaseModelLLM(FakeLLM):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.llm_engine.shutdown = lambda: shut.append(True)

        def get_tokenizer(self):
            tok = super().get_tokenizer()
            tok.chat_template = None
            return tok

    fake = types.ModuleType("vllm")
    fake.LLM = BaseModelLLM
    fake.SamplingParams = lambda **kw: NS(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    FakeLLM.calls.clear()
    seen = []
    BaseModelLLM.chat = lambda self, m, sampling_params=None, use_tqdm=True, chat_template=None: (
        seen.append(chat_template) or FakeLLM.chat(self, m, sampling_params, use_tqdm, chat_template))
    eng = VLLMEngine("base-model")
    eng.generate([Request([{"role": "user", "content": "x"}], SamplingParams())])
    assert seen == [CHATML_TEMPLATE]
    eng.close()
    assert shut == [True] and eng.llm is None
    eng.close()  # twice is fine
    assert shut == [True]


def test_two_vllm_models_in_one_data_build_share_the_gpu():
    from aft.data.build import DataConfig, vllm_models
    from aft.engines.vllm import memory_shares

    cfg = DataConfig(out="o", model="vllm:org/base", target="teacher", teacher="vllm:org/teacher")
    assert vllm_models(cfg, on_policy=True, scorer_name="none") == {"org/base", "org/teacher"}
    assert memory_shares(2) == 0.45  # each engine's gpu_memory_utilization
    assert vllm_models(cfg, on_policy=False, scorer_name="none") == {"org/teacher"}  # off-policy: no proposer
    same = DataConfig(out="o", model="vllm:org/base", target="teacher", teacher="vllm:org/base")
    assert len(vllm_models(same, on_policy=True, scorer_name="none")) == 1  # one model, loaded once
