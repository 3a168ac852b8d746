"""``fastdiff text`` and the pydoc corpus / objective used to train a built-in text model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from fastdiff.cli import main
from fastdiff.models import pydoc_text
from fastdiff.pipelines import MaskedDiffusionLMPipeline
from fastdiff.schedulers import MaskedDiffusionScheduler


@pytest.fixture(scope="module")
def tokenizer():
    train, _ = pydoc_text.corpus()
    return pydoc_text.train_tokenizer(train[:5])


def test_corpus_split_and_tokenizer(tokenizer):
    train, valid = pydoc_text.corpus()
    assert len(valid) >= 10 and not set(train) & set(valid)
    assert tokenizer.mask_token_id is not None and tokenizer.eos_token_id is not None
    text = 'The "assert" statement\n'
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: any text round-trips
    stream = pydoc_text.token_stream(tokenizer, train[:2])
    assert int((stream == tokenizer.eos_token_id).sum()) == 2


def test_objective_bounds_and_trains(tokenizer):
    model = pydoc_text.build_model(tokenizer)
    batch = pydoc_text.token_stream(tokenizer, pydoc_text.corpus()[0][:1])[:128].reshape(4, 32)
    elbo = pydoc_text.masked_diffusion_loss(model, batch, tokenizer.mask_token_id, torch.Generator().manual_seed(0))
    plain = pydoc_text.masked_diffusion_loss(model, batch, tokenizer.mask_token_id, torch.Generator().manual_seed(0),
                                             elbo=False)
    assert torch.isfinite(elbo) and torch.isfinite(plain)
    plain.backward()
    assert model.get_input_embeddings().weight.grad is not None
    evaluated = pydoc_text.evaluate(model.eval(), tokenizer, pydoc_text.corpus()[1][:2], passes=1)
    assert evaluated["valid_perplexity_bound"] > 1 and evaluated["valid_tokens"] % pydoc_text.SEQUENCE_LENGTH == 0


def test_larger_variants_keep_whole_heads(tokenizer):
    wide = pydoc_text.build_model(tokenizer, hidden=96, layers=1)
    assert wide.config.num_attention_heads == 2 and wide(torch.zeros(1, 8, dtype=torch.long)).logits.shape[1] == 8
    for hidden in (0, 100, 512):  # 512 would give heads 51.2 channels wide, which rotary positions cannot pair
        with pytest.raises(ValueError, match="hidden: must be a positive multiple of 48"):
            pydoc_text.build_model(tokenizer, hidden=hidden)
    with pytest.raises(ValueError, match="layers: must be >= 1"):
        pydoc_text.build_model(tokenizer, layers=0)


@pytest.fixture
def saved_pipe(tokenizer, tmp_path):
    """A one-layer BERT pipeline saved to disk, as a user's own folder would be."""
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)).eval()
    MaskedDiffusionLMPipeline(model, tokenizer, MaskedDiffusionScheduler()).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_cli_text(saved_pipe, tmp_path, capsys):
    path = tmp_path / "text.json"
    assert main(["text", "--model", str(saved_pipe), "--prompt", "Slicings\n", "--gen-length", "16",
                 "--sampler", "fast-dllm:threshold=0.9", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["nfe"] <= 16 and len(record["sequences"][0]) == 16
    assert "model calls for 16 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["text", "--model", str(saved_pipe), "--gen-length", "10", "--block-length", "4"])
    assert "--block-length: 4 does not divide --gen-length 10" in capsys.readouterr().err


@pytest.mark.slow
def test_text_bench_counts_calls_and_compares_caches(saved_pipe, tmp_path, capsys):
    from fastdiff.evals import text_bench

    path = tmp_path / "bench.json"
    assert text_bench.main(["--model", str(saved_pipe), "--gen-length", "16", "--prompts", "2",
                            "--reuse-steps", "60", "--cache-block", "8", "--confidence", "--infill", "2",
                            "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    one_per_step, margin, *thresholds, bound_1, bound_3, quarter, margin_quarter = record["samplers"]
    assert one_per_step["mean_nfe"] == one_per_step["mean_steps"] == 16 and quarter["mean_steps"] == 4
    assert margin["mean_steps"] == 16 and margin_quarter["mean_steps"] == 4
    assert [r["sampler"] for r in thresholds] == [f"threshold:threshold={x}" for x in (0.9, 0.5, 0.2, 0.1)]
    assert bound_1["mean_nfe"] >= bound_3["mean_nfe"] >= 1
    infill = record["infill"]
    assert len(infill) == len(record["samplers"]) and all(row["windows"] == 2 and row["span"] == 32 for row in infill)
    assert infill[0]["mean_calls"] == 32 and infill[-1]["mean_calls"] == 8  # one token per step; 16 / 4 → 32 / 8
    assert all(0 <= row["infill_accuracy"] <= 100 for row in infill)
    assert all(1 <= r["mean_nfe"] <= 16 and r["elbo_perplexity"] > 1 for r in thresholds)
    reuse = record["reuse"]
    # plain sampling calls the model at every step until no mask is left (it may finish a step early)
    assert reuse["identical_samples"] and 55 <= reuse["mean_nfe_plain"] <= 60
    assert reuse["mean_nfe_reused"] <= 16 < reuse["mean_nfe_plain"]
    assert record["reuse"]["mean_nfe_reused"] <= 17
    caches = record["kv_cache"]
    assert caches["none"]["token_agreement"] == 1.0
    assert all(2 <= caches[m]["mean_nfe"] <= 16 and 0 <= caches[m]["token_agreement"] <= 1
               for m in ("none", "prefix", "dual", "dkv"))  # at least one call per block
    assert "ELBO ppl" in capsys.readouterr().out
    assert text_bench.distinct_ngrams([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(4 / 5)
    assert record["seeds"] == [0] and "samplers_per_seed" not in record
    sure, unsure = record["confidence"]
    assert (sure["visible"], unsure["visible"]) == (0.95, 0.5) and unsure["masked_positions"] > sure["masked_positions"] > 0
    assert all(0 <= row[key] <= 1 for row in (sure, unsure) for key in ("top1_accuracy", "mean_confidence"))
    assert all(row["share_above_0.9"] <= row["share_above_0.5"] for row in (sure, unsure))


def test_corpus_snapshot_is_byte_stable_and_required(tmp_path):
    first, second = tmp_path / "a.json.gz", tmp_path / "b.json.gz"
    pydoc_text.write_snapshot(first)
    pydoc_text.write_snapshot(second)
    assert first.read_bytes() == second.read_bytes()
    train, valid = pydoc_text.corpus(first)
    assert len(valid) == len(set(train + valid)) // pydoc_text.HELD_OUT_EVERY and not set(train) & set(valid)
    shipped_train, shipped_valid = pydoc_text.corpus()
    assert (len(shipped_train), len(shipped_valid)) == (67, 11)
    with pytest.raises(FileNotFoundError, match="snapshot"):
        pydoc_text.corpus(tmp_path / "missing.json.gz")


@pytest.mark.slow
def test_shipped_model_reproduces_its_validation_bound():
    # the weights are part of the package: a checkout or wheel without them is broken
    assert (pydoc_text.PYDOC_MDLM_DIR / "config.json").is_file()
    record = json.loads((pydoc_text.PYDOC_MDLM_DIR / "training.json").read_text())
    weights = sum(p.stat().st_size for p in pydoc_text.PYDOC_MDLM_DIR.glob("*.safetensors"))
    assert weights < 8 * 2**20  # a few MB, in float16
    model, tokenizer = pydoc_text.load_pydoc_mdlm()
    assert tokenizer.mask_token_id is not None and len(tokenizer) == pydoc_text.VOCAB_SIZE
    torch.set_num_threads(min(2, torch.get_num_threads()))
    evaluated = pydoc_text.evaluate(model, tokenizer)
    assert evaluated["valid_tokens"] == record["valid_tokens"]
    assert evaluated["valid_nelbo_per_token"] == pytest.approx(record["valid_nelbo_per_token"], abs=2e-3)
    # well below the unigram entropy of the corpus (about 5.95 nats): the model reads its context
    assert record["valid_nelbo_per_token"] < 5.0


def test_cli_text_uses_the_shipped_model_by_default(tmp_path, capsys):
    path = tmp_path / "text.json"
    assert main(["text", "--prompt", 'The "while" statement\n', "--gen-length", "32", "--block-length", "16",
                 "--sampler", "fast-dllm:threshold=0.9", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["model"] == pydoc_text.PYDOC_MDLM_NAME and 2 <= record["nfe"] <= 32
    assert "model calls for 32 tokens" in capsys.readouterr().out


def test_text_bench_over_seeds_at_one_temperature(saved_pipe, tmp_path):
    from fastdiff.evals import text_bench

    path = tmp_path / "bench.json"
    assert text_bench.main(["--model", str(saved_pipe), "--gen-length", "8", "--prompts", "2", "--reuse-steps", "0",
                            "--seeds", "2", "--temperature", "1", "--sampler", "one=low-confidence@8",
                            "--sampler", "fast=threshold:threshold=0.5", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["seeds"] == [0, 1000] and record["temperature"] == 1
    assert [r["sampler"] for r in record["samplers"]] == ["low-confidence:temperature=1",
                                                          "threshold:threshold=0.5,temperature=1"]
    first, second = record["samplers_per_seed"]
    for mean, a, b in zip(record["samplers"], first, second):
        assert mean["mean_nfe"] == pytest.approx((a["mean_nfe"] + b["mean_nfe"]) / 2)
        assert mean["elbo_perplexity"] == pytest.approx((a["elbo_perplexity"] * b["elbo_perplexity"]) ** 0.5)
    assert first[0]["mean_nfe"] == 8 and 1 <= first[1]["mean_nfe"] <= 8
    with pytest.raises(SystemExit):
        text_bench.main(["--model", str(saved_pipe), "--seeds", "0"])
    with pytest.raises(SystemExit):
        text_bench.main(["--model", str(saved_pipe), "--temperature", "-1"])


def test_text_bench_refuses_a_negative_infill_count(capsys):
    from fastdiff.evals import text_bench

    with pytest.raises(SystemExit) as error:
        text_bench.main(["--infill", "-1"])
    assert error.value.code == 2 and "--infill: must be >= 0" in capsys.readouterr().err


def test_builtin_text_models_load_offline_and_warn_nothing(monkeypatch):
    """Every built-in name loads from the package (the hub is never asked), and a call through the
    current transformers API raises no deprecation warning: warnings are errors for that call."""
    import warnings

    import transformers

    from fastdiff import catalog
    from fastdiff.models.sudoku import is_valid_solution, parse_sudoku
    from fastdiff.pipelines.masked_diffusion_lm import BUILTIN_TEXT_MODELS

    assert list(catalog.TEXT_MODELS) == list(BUILTIN_TEXT_MODELS)

    def no_hub(*args, **kwargs):
        raise AssertionError("a built-in text model must not be looked up on the hub")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pydoc = MaskedDiffusionLMPipeline.from_pretrained("pydoc-mdlm")
        pydoc.set_progress_bar_config(disable=True)
        for mode in (None, "prefix", "dkv"):
            out = pydoc(BUILTIN_TEXT_MODELS["pydoc-mdlm"].example_prompt, gen_length=8, block_length=4,
                        kv_cache=mode, kv_refresh=2, sampler="threshold:threshold=0.9")
            assert out.sequences.shape == (1, 8), mode
        sudoku = MaskedDiffusionLMPipeline.from_pretrained("sudoku-mdlm")
        sudoku.set_progress_bar_config(disable=True)
        puzzle = BUILTIN_TEXT_MODELS["sudoku-mdlm"].example_prompt
        out = sudoku(puzzle, gen_length=81)
    grid = parse_sudoku(out.texts[0])
    # the clues are kept, only the blanks are decided, in far fewer calls than blanks (threshold 0.9)
    assert is_valid_solution(grid, parse_sudoku(puzzle)) and out.nfe < puzzle.count("0") / 3
    assert out.texts[0].startswith("\n") and len(out.texts[0].split()) == 9  # the grid, one row a line


def test_sudoku_model_through_the_text_pipeline(tmp_path, capsys):
    from fastdiff.pipelines.masked_diffusion_lm import BUILTIN_TEXT_MODELS

    puzzle = BUILTIN_TEXT_MODELS["sudoku-mdlm"].example_prompt
    pipe = MaskedDiffusionLMPipeline.from_pretrained("sudoku-mdlm", sampler="low-confidence")
    pipe.set_progress_bar_config(disable=True)
    out = pipe([puzzle, puzzle], gen_length=81, steps=6)
    assert out.nfe == 6 and out.texts[0] == out.texts[1]
    assert out.sequences[0][torch.tensor([c != "0" for c in puzzle])].tolist() == [int(c) for c in puzzle if c != "0"]
    for kwargs, message in (({"gen_length": 80}, "gen_length=81"), ({"prompt": puzzle[:-1]}, "got 80 cells"),
                            ({"kv_cache": "prefix"}, "kv_cache needs")):
        with pytest.raises(ValueError, match=message):
            pipe(**{"prompt": puzzle, "gen_length": 81, **kwargs})
    path = tmp_path / "sudoku.json"
    assert main(["text", "--model", "sudoku-mdlm", "--sampler", "threshold:threshold=0.9", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["prompts"] == [puzzle] and len(record["sequences"][0]) == 81
    assert puzzle + "\n" in capsys.readouterr().out
    for argv, message in ((["--prompt", "123"], "--prompt: a Sudoku is 81 cells"),
                          (["--gen-length", "50"], "--gen-length: sudoku-mdlm writes its 81 cells")):
        with pytest.raises(SystemExit) as error:
            main(["text", "--model", "sudoku-mdlm", *argv])
        err = capsys.readouterr().err
        assert error.value.code == 2 and message in err and err.count("\n") == 1


def test_unknown_text_model_names_fail_at_once(monkeypatch, capsys, tmp_path):
    """A near miss of a built-in name, a path or a name that cannot be a hub id never reaches the
    hub (which, without a network, retries for half a minute)."""
    import transformers

    from fastdiff.models import ModelLoadError

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be asked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    (tmp_path / "a-file").write_text("x")
    for name, message in (("sudoku", "did you mean 'sudoku-mdlm'"), ("pydoc_mdlm", "did you mean 'pydoc-mdlm'"),
                          ("./missing", "no such folder"), ("a b", "neither a built-in name"),
                          (str(tmp_path / "a-file"), "is a file")):
        with pytest.raises(ModelLoadError, match=message):
            MaskedDiffusionLMPipeline.from_pretrained(name)
    with pytest.raises(SystemExit) as error:
        main(["text", "--model", "sudoku"])
    err = capsys.readouterr().err
    assert error.value.code == 2 and err.count("\n") == 1 and "did you mean 'sudoku-mdlm'" in err


def test_text_bench_refuses_bad_requests_before_loading(tmp_path, capsys, monkeypatch):
    from fastdiff.evals import text_bench

    monkeypatch.chdir(tmp_path)
    for argv, message in ((["--gen-length", "0"], "--gen-length: must be >= 1"),
                          (["--sampler", "plain"], "expected LABEL=SAMPLER[@STEPS]"),
                          (["--sampler", "a=threshold@many"], "the steps after @ must be an integer"),
                          (["--sampler", "a=nosuch"], "sampler must be one of"),
                          (["--cache-sampler", "nosuch"], "sampler must be one of"),
                          (["--block-length", "5"], "--block-length: 5 does not divide --gen-length 128"),
                          (["--cache-block", "3"], "--cache-block: 3 does not divide"),
                          (["--prompts", "1000"], "--prompts: at most"),
                          (["--seed", "-1"], "--seed: must be >= 0"),
                          (["--model", "sudoku"], "did you mean 'sudoku-mdlm'"),
                          (["--model", "sudoku-mdlm"], "takes task prompts"),
                          (["--json", "missing/out.json"], "--json: cannot write")):
        with pytest.raises(SystemExit) as error:
            text_bench.main(argv)
        err = capsys.readouterr().err
        assert error.value.code == 2 and message in err and err.count("\n") == 1, argv
    assert list(tmp_path.iterdir()) == []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(text_bench, "run", interrupted)
    with pytest.raises(SystemExit) as error:
        text_bench.main(["--prompts", "1"])
    assert error.value.code == 130 and capsys.readouterr().err == "python -m fastdiff.evals.text_bench: interrupted\n"


def test_pydoc_text_command_line(tmp_path, capsys, monkeypatch):
    """Every argument is described; mistakes are one line and exit 2 before any work; Ctrl-C is one
    line and exit 130."""
    parser = pydoc_text._parser()
    for command in parser.commands.values():
        assert all(action.help for action in command._actions), command.prog
    for argv, message in ((["train", "--hidden", "100"], "--hidden: must be a multiple of 48"),
                          (["train", "--learning-rate", "0"], "--learning-rate: must be > 0"),
                          (["train", "--device", "nosuch"], "--device: 'nosuch' is not a torch device"),
                          (["train", "--out", str(tmp_path / "a" / "b")], "--out: cannot create folder"),
                          (["evaluate", "--model", str(tmp_path)], "holds no pydoc-mdlm model"),
                          (["snapshot", "--out", str(tmp_path / "a" / "b.json.gz")], "--out: cannot write")):
        with pytest.raises(SystemExit) as error:
            pydoc_text.main(argv)
        err = capsys.readouterr().err
        assert error.value.code == 2 and message in err and err.count("\n") == 1, argv
    assert list(tmp_path.iterdir()) == []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pydoc_text, "evaluate", interrupted)
    with pytest.raises(SystemExit) as error:
        pydoc_text.main(["evaluate"])
    assert error.value.code == 130
    assert capsys.readouterr().err == "python -m fastdiff.models.pydoc_text evaluate: interrupted\n"
