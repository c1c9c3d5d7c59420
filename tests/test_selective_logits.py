"""SelectiveLogitsHFLM: the same log-likelihoods and greedy flags as lm-eval's HFLM.

Every test compares against stock HFLM on the same model object and requests. The models are tiny
(hidden 16, one layer) with a large vocabulary (60k tokens), built in code with a word-level
tokenizer (``<unk> <s> </s> w3 w4 ... w59999``), so that the full-vocabulary path and the selective
path differ in what they compute but must agree in what they return.
"""

from __future__ import annotations

import json
import random
import textwrap

import pytest
import torch
from adamergex_lm_eval.selective_logits import SelectiveLogitsHFLM
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

VOCAB = 60_000
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _llama(seed: int = 0, cls=None, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **overrides,
    )
    model = (cls or LlamaForCausalLM)(config).eval()
    with torch.no_grad():  # a peaked next-token distribution, so that greedy continuations exist and matter
        model.lm_head.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def llama():
    return _llama()


def _greedy(model, context: list[int], n: int) -> list[int]:
    """The model's greedy continuation of ``context`` (``n`` tokens)."""
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context) :]


def _requests(model, seed: int = 0, n: int = 24) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """Token-level requests: contexts of 1-20 tokens, continuations of 1-5, greedy and not, shared
    contexts with one-token continuations (HFLM's logits cache), a context/continuation split of the
    same tokens (the cache's trailing-slice case) and a duplicate."""
    rng = random.Random(seed)

    def toks(k):
        return [rng.randrange(3, VOCAB) for _ in range(k)]

    out = []
    for i in range(n):
        ctx = toks(rng.randint(1, 20))
        if i % 3 == 0:
            cont = _greedy(model, ctx, rng.randint(1, 4))  # greedy flag True
        elif i % 3 == 1:
            cont = _greedy(model, ctx, 2)[:1] + toks(rng.randint(1, 3))  # greedy first token, then not
        else:
            cont = toks(rng.randint(1, 5))
        out.append(((f"c{i}", f"x{i}"), ctx, cont))
    shared = toks(7)
    out += [((f"s{j}", f"y{j}"), shared, [tok]) for j, tok in enumerate([*_greedy(model, shared, 1), *toks(4)])]
    a, b, c, d = toks(4)
    out += [(("p", "q"), [a, b], [c, d]), (("p2", "q2"), [a, b, c], [d]), out[0]]
    return out


def _both(model, tokenizer, **kwargs) -> tuple[HFLM, SelectiveLogitsHFLM]:
    kwargs = {"tokenizer": tokenizer, "device": "cpu", "batch_size": 1, **kwargs}
    return HFLM(pretrained=model, **kwargs), SelectiveLogitsHFLM(pretrained=model, **kwargs)


def _assert_same(expected: list[tuple[float, bool]], got: list[tuple[float, bool]]) -> None:
    assert len(got) == len(expected)
    assert [g for _, g in got] == [g for _, g in expected]  # greedy flags: exactly equal
    torch.testing.assert_close(
        torch.tensor([x for x, _ in got], dtype=torch.float64),
        torch.tensor([x for x, _ in expected], dtype=torch.float64),
        atol=ATOL,
        rtol=RTOL,
    )


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_matches_hflm_on_token_requests(llama, tokenizer, batch_size):
    reference, selective = _both(llama, tokenizer, batch_size=batch_size)
    requests = _requests(llama)
    expected = reference._loglikelihood_tokens(requests, disable_tqdm=True)
    got = selective._loglikelihood_tokens(requests, disable_tqdm=True)
    assert selective.selective_mode == "mask"
    _assert_same(expected, got)
    flags = [g for _, g in expected]
    assert any(flags) and not all(flags)  # both kinds of greedy flag are exercised
    assert len({round(x, 3) for x, _ in expected}) > len(expected) // 2  # real, varied numbers


def test_last_mode_matches_hflm(llama, tokenizer):
    """``logits_to_keep=<int>`` (the route for transformers without boolean masks) gives the same results."""
    reference, selective = _both(llama, tokenizer, batch_size=5)
    assert selective._check_selective_mode("last") is None
    selective._selective_mode = "last"
    requests = _requests(llama, seed=1)
    _assert_same(reference._loglikelihood_tokens(requests), selective._loglikelihood_tokens(requests))


def test_left_truncation_matches_hflm(llama, tokenizer):
    reference, selective = _both(llama, tokenizer, batch_size=4, max_length=6)
    requests = _requests(llama, seed=2)
    assert any(len(c) + len(x) > 7 for _, c, x in requests)
    _assert_same(reference._loglikelihood_tokens(requests), selective._loglikelihood_tokens(requests))


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_and_rolling_on_strings(llama, tokenizer):
    reference, selective = _both(llama, tokenizer, batch_size=4, max_length=16)
    rng = random.Random(3)

    def words(k):
        return " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(k))

    pairs = [(words(rng.randint(1, 12)), " " + words(rng.randint(1, 4))) for _ in range(10)]
    _assert_same(
        reference.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True),
        selective.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True),
    )
    texts = [(words(k),) for k in (3, 15, 40)]  # 40 tokens: several rolling windows of max_length 16
    expected = reference.loglikelihood_rolling(_instances("loglikelihood_rolling", texts), disable_tqdm=True)
    got = selective.loglikelihood_rolling(_instances("loglikelihood_rolling", texts), disable_tqdm=True)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))
    assert selective.selective_mode == "mask"


def test_peft_model(llama, tokenizer):
    """A PeftModel (LoRA on attention and on the output head, as with merge_into_base=false)."""
    from peft import LoraConfig, get_peft_model

    base = _llama(seed=5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    reference, selective = _both(model, tokenizer, batch_size=4)
    requests = _requests(llama, seed=4)
    expected = reference._loglikelihood_tokens(requests)
    _assert_same(expected, selective._loglikelihood_tokens(requests))
    assert selective.selective_mode == "mask"
    with model.disable_adapter():  # the adapter is in use: the base model scores differently
        base_scores = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu")._loglikelihood_tokens(requests)
    assert max(abs(a - b) for (a, _), (b, _) in zip(expected, base_scores)) > 1e-2


def test_gemma2_final_logit_softcapping(tokenizer):
    """The model's own head runs on the kept rows, soft-capping included."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
        final_logit_softcapping=2.0,  # small cap: clearly active on these logits
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = Gemma2ForCausalLM(config).eval()
    requests = _requests(model, seed=6, n=12)
    reference, selective = _both(model, tokenizer, batch_size=4)
    _assert_same(reference._loglikelihood_tokens(requests), selective._loglikelihood_tokens(requests))
    assert selective.selective_mode == "mask"


def test_model_path_string(llama, tokenizer, tmp_path):
    """``pretrained=<folder>`` (HFLM loads the model itself) works the same."""
    llama.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    kwargs = {"device": "cpu", "batch_size": 4, "dtype": "float32"}
    reference = HFLM(pretrained=str(tmp_path), **kwargs)
    selective = SelectiveLogitsHFLM(pretrained=str(tmp_path), **kwargs)
    requests = _requests(llama, seed=7, n=9)
    _assert_same(reference._loglikelihood_tokens(requests), selective._loglikelihood_tokens(requests))
    assert selective.selective_mode == "mask"


# ------------------------------------------------------------------------------------ fall-backs
def _ignores_logits_to_keep():
    from transformers import LlamaForCausalLM

    class IgnoresLogitsToKeep(LlamaForCausalLM):
        """Full logits whatever ``logits_to_keep`` says (as a model without the feature would)."""

        def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
            return super().forward(input_ids=input_ids, **kwargs)

    return IgnoresLogitsToKeep


def _rescales_kept_logits():
    from transformers import LlamaForCausalLM

    class RescalesKeptLogits(LlamaForCausalLM):
        """A head whose sliced path differs from its full path (an unsupported architecture)."""

        def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
            out = super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
            if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
                out.logits = out.logits * 1.5
            return out

    return RescalesKeptLogits


def _rejects_logits_to_keep():
    from transformers import LlamaForCausalLM

    class RejectsLogitsToKeep(LlamaForCausalLM):
        def forward(self, input_ids=None):
            return super().forward(input_ids=input_ids)

    return RejectsLogitsToKeep


@pytest.mark.parametrize("make_cls", [_ignores_logits_to_keep, _rescales_kept_logits, _rejects_logits_to_keep])
def test_unsupported_head_falls_back(tokenizer, make_cls, caplog):
    model = _llama(seed=8, cls=make_cls())
    reference, selective = _both(model, tokenizer, batch_size=3)
    requests = _requests(model, seed=8, n=9)
    with caplog.at_level("INFO", logger="lm_eval.models.selective_logits"):
        assert selective.selective_mode is None
    assert "HFLM's path" in caplog.text
    _assert_same(reference._loglikelihood_tokens(requests), selective._loglikelihood_tokens(requests))


def test_disabled_and_prompt_learning_fall_back(llama, tokenizer):
    from peft import PromptTuningConfig, get_peft_model

    _, disabled = _both(llama, tokenizer, selective_logits="false")
    assert disabled.selective_mode is None
    with pytest.raises(ValueError, match="selective_logits"):
        SelectiveLogitsHFLM(pretrained=llama, tokenizer=tokenizer, device="cpu", selective_logits="maybe")

    model = get_peft_model(_llama(seed=9), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    reference, selective = _both(model, tokenizer, batch_size=3)
    assert selective.selective_mode is None
    requests = _requests(llama, seed=9, n=9)
    _assert_same(reference._loglikelihood_tokens(requests), selective._loglikelihood_tokens(requests))


def test_seq2seq_falls_back(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    model = T5ForConditionalGeneration(config).eval()
    reference, selective = _both(model, tokenizer, batch_size=3)
    assert selective.backend == "seq2seq" and selective.selective_mode is None
    requests = _requests(_llama(), seed=10, n=6)
    _assert_same(reference._loglikelihood_tokens(requests), selective._loglikelihood_tokens(requests))


# ------------------------------------------------------------------------------ an lm-eval run
def test_lm_eval_multiple_choice_acc_and_acc_norm(llama, tokenizer, tmp_path):
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    rng = random.Random(11)

    def words(k):
        return " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(k))

    docs = [
        {"premise": words(rng.randint(3, 12)), "choices": [words(rng.randint(1, 4)) for _ in range(4)], "label": i % 4}
        for i in range(24)
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "sel_mc.yaml").write_text(
        textwrap.dedent(f"""\
        task: sel_mc
        dataset_path: json
        dataset_kwargs:
          data_files: {tmp_path / "mc.jsonl"}
        test_split: train
        output_type: multiple_choice
        doc_to_text: "{{{{premise}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
          - metric: acc_norm
        metadata:
          version: 1.0
        """)
    )
    results = {}
    for name, lm in zip(("hf", "selective"), _both(llama, tokenizer, batch_size=4), strict=True):
        out = simple_evaluate(
            model=lm,
            tasks=["sel_mc"],
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            log_samples=True,
            bootstrap_iters=0,
        )
        samples = out["samples"]["sel_mc"]
        results[name] = (
            out["results"]["sel_mc"]["acc,none"],
            out["results"]["sel_mc"]["acc_norm,none"],
            [ll for s in samples for ll, _ in s["filtered_resps"]],
        )
    (acc, acc_norm, lls), (acc_s, acc_norm_s, lls_s) = results["hf"], results["selective"]
    assert (acc_s, acc_norm_s) == (acc, acc_norm)
    assert len(lls) == 4 * len(docs)
    torch.testing.assert_close(torch.tensor(lls_s, dtype=torch.float64), torch.tensor(lls, dtype=torch.float64))


def test_bfloat16_model_uses_the_selective_path(tokenizer):
    """The probe's tolerance follows the model's dtype: a bf16 model is not sent to the full path."""
    model = _llama(seed=12).to(torch.bfloat16)
    reference, selective = _both(model, tokenizer, batch_size=4)
    assert selective.selective_mode == "mask"
    requests = _requests(model, seed=12, n=6)
    expected = reference._loglikelihood_tokens(requests)
    got = selective._loglikelihood_tokens(requests)
    assert [g for _, g in got] == [g for _, g in expected]
    # bf16 round-off allowance (on this CPU the two paths agree exactly)
    assert max(abs(a - b) / max(1.0, abs(a)) for (a, _), (b, _) in zip(expected, got)) <= 1e-2
