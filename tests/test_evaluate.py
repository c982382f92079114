"""Per-domain held-out evaluation: losses against a per-text computation, equation and
exact-match accuracy against hand-counted answers, a run's eval sets through LLaMA-Factory
(response tokens only), LoRA adapter directories."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from datasteer.assets import BUILTIN_DOMAINS, build_tokenizer
from datasteer.evaluate import (
    DomainResult,
    EquationResult,
    MatchResult,
    domain_losses,
    equation_accuracy,
    evaluate_corpus,
    evaluate_run,
    find_model,
    format_results,
    load_model,
    load_run_eval_sets,
    load_tokenizer,
    read_corpus_texts,
    response_exact_match,
    results_to_json,
)
from tests.factories import make_model, tiny_config
from tests.integrations.test_trl import char_tokenizer

# Two texts, five equations. A model that mispredicts every "7" gets 3 right: "3 + 4 = 7" and
# "50 + 7 = 57" are wrong; "3 + 7 = 10" is right (its 7 is in the question, not the answer).
EQUATIONS = ["1 + 1 = 2\n3 + 4 = 7\n3 + 7 = 10", "50 + 7 = 57\n2 * 3 = 6"]

QA = [
    {"prompt": "Compute 3 + 4.", "response": "3 + 4 = 7"},
    {"prompt": "Compute 12 + 30 and 2 * 3.", "response": "12 + 30 = 42\n2 * 3 = 6"},
    {"prompt": "Say hello.", "response": "hello"},
]


def equation_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (offsets are exact), the characters of the equations."""
    chars = "0123456789 +-*=\n"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


class WrongOnSevens(torch.nn.Module):
    """Predicts each next token of the input it is given, except a token whose text holds a 7."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        vocab = tokenizer.get_vocab()
        self.size = len(vocab)
        self.sevens = torch.tensor([i for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if "7" in t])
        self.other = next(i for t, i in vocab.items() if "7" not in t and t != "<pad>")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        target = torch.roll(input_ids, -1, dims=1)
        target = torch.where(torch.isin(target, self.sevens), torch.full_like(target, self.other), target)
        return SimpleNamespace(logits=F.one_hot(target, self.size).float())


def test_domain_losses_equal_the_token_mean_over_each_text_scored_alone() -> None:
    model, tok = make_model(), char_tokenizer()
    texts = {"sums": ["1 + 1 = 2.", "12 + 30 = 42.", "7 = 7."], "words": ["the fox", "a quick brown dog"]}
    results = domain_losses(model, tok, texts, batch_size=2, max_length=10)
    for domain, rows in texts.items():
        total, count = 0.0, 0
        for text in rows:
            ids = torch.tensor([tok(text, truncation=True, max_length=10)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            total += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
        assert results[domain].loss == pytest.approx(total / count, rel=1e-5)
        assert results[domain].tokens == count
        assert results[domain].perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
        assert results[domain].accuracy is None
    assert model.training  # restored


@pytest.mark.parametrize("batch_size", [1, 2])
def test_equation_accuracy_needs_every_answer_token_right(batch_size: int) -> None:
    tok = equation_tokenizer()
    result = equation_accuracy(WrongOnSevens(tok), tok, EQUATIONS, batch_size=batch_size)
    assert result == EquationResult(correct=3, total=5)
    assert result.accuracy == pytest.approx(0.6)


def test_equation_accuracy_skips_answers_cut_by_max_length() -> None:
    tok = equation_tokenizer()
    # 29 characters keep "1" of the last answer "10" of the first text: that equation is not scored.
    result = equation_accuracy(WrongOnSevens(tok), tok, EQUATIONS, max_length=29)
    assert result == EquationResult(correct=2, total=4)


def test_equation_accuracy_with_multi_character_tokens(bpe_dir: Path) -> None:
    """A byte-level BPE tokenizer: answers are tokens like "Ġ57" (with the space), after "<s>"."""
    tok = AutoTokenizer.from_pretrained(bpe_dir)
    assert len(tok(EQUATIONS[1])["input_ids"]) < len(EQUATIONS[1])  # some tokens span several characters
    assert equation_accuracy(WrongOnSevens(tok), tok, EQUATIONS) == EquationResult(correct=3, total=5)


def test_corpus_evaluation_adds_equation_accuracy_to_arithmetic_only() -> None:
    tok = equation_tokenizer()
    model = WrongOnSevens(tok)
    results = evaluate_corpus(model, tok, {"arithmetic": EQUATIONS, "other": ["1 + 1 = 2"]})
    assert results["arithmetic"].accuracy == MatchResult(3, 5)
    assert results["other"].accuracy is None
    assert results["arithmetic"].tokens == sum(len(t) - 1 for t in EQUATIONS)  # every character after the first


class Continuations(torch.nn.Module):
    """``generate`` appends a fixed continuation per prompt (found by its unpadded ids)."""

    def __init__(self, replies: dict[tuple[int, ...], list[int]], eos: int) -> None:
        super().__init__()
        self.replies, self.eos = replies, eos
        self.calls: list[torch.Tensor] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.calls.append(input_ids)
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            assert mask.tolist() == sorted(mask.tolist())  # padded on the left
            reply = self.replies[tuple(ids[mask.bool()].tolist())][: kwargs["max_new_tokens"]]
            rows.append(reply + [self.eos] * (kwargs["max_new_tokens"] - len(reply)))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_response_exact_match_compares_stripped_greedy_replies() -> None:
    tok = equation_tokenizer()
    prompts = [tok(p)["input_ids"] for p in ("1 + 1", "2 + 2 +", "3", "4 * 4")]
    said = [" = 2\n", "= 5", " = 3", "= 16 + 0"]  # right (after stripping), wrong, right, too long
    model = Continuations({tuple(p): tok(s)["input_ids"] for p, s in zip(prompts, said, strict=True)}, tok.eos_token_id)
    references = ["= 2", "= 4", "= 3 ", "= 16"]
    result = response_exact_match(model, tok, prompts, references, batch_size=3, max_new_tokens=8)
    assert result == MatchResult(correct=2, total=4)
    assert [c.shape[0] for c in model.calls] == [3, 1]


def test_format_results_blank_accuracy_and_four_decimals() -> None:
    results = {
        "arithmetic": DomainResult(1.0, 10, MatchResult(1, 4)),
        "a_much_longer_domain_name": DomainResult(2.0, 20),
    }
    lines = format_results(results).splitlines()
    assert lines[0].split() == ["domain", "loss", "ppl", "tokens", "accuracy"]
    assert lines[1].split() == ["arithmetic", "1.0000", f"{math.e:.4f}", "10", "0.2500"]
    assert lines[2].split() == ["a_much_longer_domain_name", "2.0000", f"{math.exp(2):.4f}", "20"]
    assert lines[3].split() == ["mean", "1.5000", f"{math.exp(1.5):.4f}"]  # not every domain has an accuracy
    both = {**results, "a_much_longer_domain_name": DomainResult(2.0, 20, MatchResult(3, 4))}
    assert format_results(both).splitlines()[-1].split()[-1] == "0.5000"
    payload = results_to_json(results)
    assert payload["arithmetic"] == {
        "loss": 1.0,
        "perplexity": math.e,
        "tokens": 10,
        "accuracy": 0.25,
        "correct": 1,
        "total": 4,
    }
    assert payload["a_much_longer_domain_name"]["accuracy"] is None


def test_read_corpus_texts(tmp_path: Path) -> None:
    for d in ("a", "b"):
        (tmp_path / f"{d}_eval.jsonl").write_text(
            json.dumps({"text": f"{d} one"}) + "\n" + json.dumps({"text": f"{d} two"}) + "\n"
        )
    assert read_corpus_texts(tmp_path) == {"a": ["a one", "a two"], "b": ["b one", "b two"]}
    assert read_corpus_texts(tmp_path, ["b"]) == {"b": ["b one", "b two"]}
    with pytest.raises(FileNotFoundError, match=r"domains \['c'\]"):
        read_corpus_texts(tmp_path, ["c"])


# --- a tiny run on disk: BPE tokenizer, model directory, LoRA adapter, dataset_dir, run config


def build_tiny_run(root: Path) -> dict[str, Path]:
    """A byte-level BPE tokenizer and tiny Llama saved as a model directory, a LoRA adapter on
    it (without a tokenizer), a LLaMA-Factory dataset_dir with :data:`QA` (sft view ``qa_eval``,
    text view ``qa_text_eval``) and a corpus dir with ``arithmetic_eval`` and ``prose_eval``."""
    from peft import LoraConfig, get_peft_model

    corpus = root / "texts"
    corpus.mkdir()
    lines = [*EQUATIONS, *(f"Human: {r['prompt']}\nAssistant:{r['response']}" for r in QA), "Say hello to the fox."]
    for domain in BUILTIN_DOMAINS:
        (corpus / f"{domain}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines * 4))
    build_tokenizer(corpus, root / "model", vocab_size=300)
    tok = AutoTokenizer.from_pretrained(root / "model")
    config = tiny_config(
        vocab_size=len(tok),
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(root / "model")
        base = LlamaForCausalLM.from_pretrained(root / "model")
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(root / "lora")

    data = root / "data"
    data.mkdir()
    rows = [{**r, "text": f"{r['prompt']} {r['response']}"} for r in QA]
    (data / "qa_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "arithmetic_eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in EQUATIONS))
    (data / "prose_eval.jsonl").write_text(json.dumps({"text": "Say hello to the fox."}) + "\n")
    info = {
        "qa_eval": {"file_name": "qa_eval.jsonl", "columns": {"prompt": "prompt", "response": "response"}},
        "qa_text_eval": {"file_name": "qa_eval.jsonl", "columns": {"prompt": "text"}},
    }
    (data / "dataset_info.json").write_text(json.dumps(info))
    run = {
        "model_name_or_path": str(root / "model"),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "dataset_dir": str(data),
        "dataset": "qa_eval",
        "eval_dataset": "qa_eval",
        "template": "default",
        "cutoff_len": 64,
        "output_dir": str(root / "lora"),
        "overwrite_cache": True,
        "report_to": "none",
        "datasteer": {"paradigm": "select", "algorithm": "random"},
    }
    (root / "run.yaml").write_text(json.dumps(run))  # JSON is YAML
    return {"model": root / "model", "lora": root / "lora", "data": data, "run": root / "run.yaml"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_run(tmp_path_factory.mktemp("tiny-run"))


@pytest.fixture(scope="module")
def bpe_dir(tiny_run: dict[str, Path]) -> Path:
    return tiny_run["model"]


def run_args(tiny_run: dict[str, Path], **changes: object) -> dict[str, Any]:
    args: dict[str, Any] = json.loads(tiny_run["run"].read_text())
    return {**args, **changes}


def response_ids(tok: Any, response: str) -> list[int]:
    """The default template's assistant turn: the response, ``</s>``, then ``"\\n"``."""
    return [
        *tok(response, add_special_tokens=False)["input_ids"],
        tok.eos_token_id,
        *tok("\n", add_special_tokens=False)["input_ids"],
    ]


def test_sft_eval_set_scores_response_tokens_only(tiny_run: dict[str, Path]) -> None:
    pytest.importorskip("llamafactory")
    tok = AutoTokenizer.from_pretrained(tiny_run["model"])
    model = LlamaForCausalLM.from_pretrained(tiny_run["model"])
    sets = load_run_eval_sets(run_args(tiny_run), tok, with_responses=True)
    assert list(sets) == ["qa_eval"]
    assert sets["qa_eval"].references == [r["response"] + "\n" for r in QA]
    result = evaluate_run(model, sets, max_new_tokens=16)["qa_eval"]
    # By hand: each row is the templated prompt (from LLaMA-Factory's predict_with_generate
    # rows) followed by the assistant turn; only the assistant turn's tokens are scored.
    total, count = 0.0, 0
    for prompt, row in zip(sets["qa_eval"].prompts or [], QA, strict=True):
        answer = response_ids(tok, row["response"])
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        total += float(F.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
        count += len(answer)
    assert result.tokens == count == sum(len(response_ids(tok, r["response"])) for r in QA)
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.accuracy is not None and result.accuracy.total == len(QA)


def test_pt_eval_set_scores_every_token(tiny_run: dict[str, Path]) -> None:
    pytest.importorskip("llamafactory")
    tok = AutoTokenizer.from_pretrained(tiny_run["model"])
    args = run_args(tiny_run, stage="pt", eval_dataset="qa_text_eval", packing=False, finetuning_type="full")
    sets = load_run_eval_sets(args, tok)
    # Each text + "</s>" (no "<s>": LLaMA-Factory tokenises pt rows without special tokens).
    lengths = [len(tok(f"{r['prompt']} {r['response']}", add_special_tokens=False)["input_ids"]) + 1 for r in QA]
    assert [len(ids) for ids, _ in sets["qa_text_eval"].rows] == lengths
    assert all(ids == labels for ids, labels in sets["qa_text_eval"].rows)
    with pytest.raises(ValueError, match="no responses"):
        load_run_eval_sets(args, tok, with_responses=True)


def test_run_eval_sets_use_the_runs_own_tokenizer(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    """A saved output dir's tokenizer carries the chat template LLaMA-Factory wrote, which it cannot
    parse back for a run that named no template: the run's own tokenizer is used, the saved one
    only when that is missing (then the error says what to add)."""
    pytest.importorskip("llamafactory")
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    saved = AutoTokenizer.from_pretrained(tiny_run["model"])
    get_template_and_fix_tokenizer(saved, DataArguments(template="empty"))  # what a pt run saves
    assert saved.chat_template
    args = run_args(tiny_run, stage="pt", eval_dataset="qa_text_eval", finetuning_type="full", template=None)
    args["packing"] = False
    assert len(load_run_eval_sets(args, saved)["qa_text_eval"].rows) == len(QA)
    with pytest.raises(ValueError, match="add template=NAME"):
        load_run_eval_sets({**args, "model_name_or_path": str(tmp_path / "gone")}, saved)


def test_run_eval_set_errors(tiny_run: dict[str, Path]) -> None:
    pytest.importorskip("llamafactory")
    tok = AutoTokenizer.from_pretrained(tiny_run["model"])
    with pytest.raises(ValueError, match="names no eval_dataset"):
        load_run_eval_sets(run_args(tiny_run, eval_dataset=None), tok)
    with pytest.raises(ValueError, match=r"--domains: \['nope'\]"):
        load_run_eval_sets(run_args(tiny_run), tok, domains=["nope"])
    with pytest.raises(ValueError, match="eval set nope: Undefined dataset nope"):
        load_run_eval_sets(run_args(tiny_run, eval_dataset="nope"), tok)
    with pytest.raises(ValueError, match="eval set qa_text_eval: Cannot find sufficient samples"):
        load_run_eval_sets(run_args(tiny_run, stage="pt", eval_dataset="qa_text_eval", finetuning_type="full"), tok)


def test_lora_directory_loads_its_base_with_the_adapter_merged(tiny_run: dict[str, Path]) -> None:
    from peft import PeftModel

    source = find_model(str(tiny_run["lora"]))
    assert source.base == str(tiny_run["model"]) and source.tokenizer_dir == str(tiny_run["model"])
    model, tok = load_model(source), load_tokenizer(source)
    ids = torch.tensor([tok("1 + 1 = 2")["input_ids"]])
    base = LlamaForCausalLM.from_pretrained(tiny_run["model"])
    adapted = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_run["model"]), tiny_run["lora"])
    with torch.no_grad():
        expected, plain, got = (m(input_ids=ids).logits for m in (adapted, base, model))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, plain)  # the adapter changes the model


def test_find_model_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        find_model(str(tmp_path / "missing"))
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither a model .* last checkpoint is .*checkpoint-10$"):
        find_model(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="names no base model"):
        find_model(str(tmp_path))
    assert find_model(str(tmp_path), base_model="elsewhere").base == "elsewhere"
