"""The privacy audit: canaries planted as asked, every candidate's score equal to a plain forward pass, exposure
as Carlini et al. define it, a memorised canary exposed while controls stay at chance, the membership AUC equal
to SciPy's Mann-Whitney U, and the command line end to end with one-line errors."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from helpers import byte_level_tokenizer, tiny_config

from pocketlm import cli
from pocketlm.checkpoint import save_model_dir
from pocketlm.config import ModelConfig
from pocketlm.data import scrub_pii, split_documents
from pocketlm.errors import ConfigError
from pocketlm.evaluate import privacy_audit as pa
from pocketlm.model import LlamaForCausalLM
from pocketlm.tokenizer import Tokenizer

STORIES = [
    "once upon a time, there was a little dog named max. max liked to run in the park with his ball.",
    "one day, a girl named sue found a red box under her bed. she opened it and saw a tiny bird.",
    "the sun was hot and the sky was blue. tom and his mom went to the beach to play in the sand.",
    "a big cat sat on the wall. it looked at the fish in the pond and wanted to eat one for lunch.",
    "lily had a new toy car. she pushed it across the floor and laughed when it hit the door.",
    "the old tree in the garden was very tall. birds lived in it and sang songs every morning.",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run small ops: one thread is faster than two, and steady on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digit_tokenizer(merged: str = "0123456789") -> Tokenizer:
    """byte_level_tokenizer's vocabulary plus a token for " d" for each digit d in `merged`: with some digits
    merged and others not, a digit is one token or two, so tree rows differ in length."""
    return byte_level_tokenizer(extra_merges=[("Ġ", d) for d in merged])


def tiny_model(dtype=torch.float64, seed: int = 0) -> LlamaForCausalLM:
    return LlamaForCausalLM(ModelConfig.from_dict(tiny_config())).init_weights(std=0.1, seed=seed).to(dtype).eval()


def brute_force_nlls(model, fmt: pa.SecretFormat) -> np.ndarray:
    """Every candidate as its own sequence through the plain forward pass: the reference for the tree rows."""
    c = len(fmt.context)
    by_length: dict[int, list[int]] = {}  # candidates of one length batch without padding
    for v in range(fmt.candidates):
        by_length.setdefault(len(fmt.secret_ids(f"{v:0{fmt.digits}d}")), []).append(v)
    nll = np.zeros(fmt.candidates)
    with torch.inference_mode():
        for values in by_length.values():
            ids = torch.tensor([list(fmt.context) + fmt.secret_ids(f"{v:0{fmt.digits}d}") for v in values])
            logprobs = torch.log_softmax(model(ids).double(), -1)
            nll[values] = -logprobs[:, c - 1:-1].gather(-1, ids[:, c:, None])[..., 0].sum(1).numpy()
    return nll


@pytest.mark.parametrize("template", [pa.DEFAULT_TEMPLATE, "pin={secret}."], ids=["default", "no-space"])
@pytest.mark.parametrize("tokenizer", [byte_level_tokenizer(), digit_tokenizer("01234")], ids=["two-token", "mixed"])
def test_every_candidate_scored_as_a_plain_forward_pass_does(tokenizer, template, monkeypatch):
    monkeypatch.setattr(pa, "ROW_NODES", 40)  # short rows: a fixed leading digit per row, several rows per batch
    model = tiny_model()
    fmt = pa.secret_format(tokenizer, template, 3)
    assert (fmt.first == fmt.rest) == (template == pa.DEFAULT_TEMPLATE)  # no space before: "3" then " 1" " 4"
    table = pa.candidate_nlls(model, fmt, batch_tokens=300)
    reference = brute_force_nlls(model, fmt)
    np.testing.assert_allclose(table, reference, rtol=0, atol=1e-9)
    canaries = [pa.Canary(f"{v:03d}", 1, template) for v in (0, 7, 123, 555, 999)]
    result = pa.canary_exposure(model, tokenizer, canaries)
    for row in result.canaries:
        mine = reference[int(row["secret"])]
        rank = 1 + np.sum(reference < mine) + (np.sum(reference == mine) - 1) / 2
        assert row["rank"] == rank
        assert row["exposure"] == pytest.approx(math.log2(1000) - math.log2(rank), abs=1e-12)


def test_digits_that_begin_alike_share_their_tokens():
    fmt = pa.secret_format(byte_level_tokenizer(), pa.DEFAULT_TEMPLATE, 3)  # " 7" is " " then "7"
    row = pa._tree_row(fmt, 4, fixed=1, levels=1)  # "4", then every second digit, then the third read off
    assert len(row.tokens) == len(fmt.context) + 2 + (1 + 10) + 10  # one " " per parent, not one per digit
    assert sorted(row.values) == list(range(400, 500))


def test_one_digit_and_single_token_digits(monkeypatch):
    model = tiny_model()
    for digits in (1, 2):
        fmt = pa.secret_format(digit_tokenizer(), pa.DEFAULT_TEMPLATE, digits)
        assert all(len(p) == 1 for p in fmt.first + fmt.rest)
        np.testing.assert_allclose(pa.candidate_nlls(model, fmt), brute_force_nlls(model, fmt), rtol=0, atol=1e-9)


def test_a_tokenizer_that_merges_digits_is_refused():
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 "))
    vocab = {ch: i for i, ch in enumerate(chars)} | {"<s>": len(chars), " 1": len(chars) + 1, " 1 ": len(chars) + 2}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[(" ", "1"), (" 1", " ")]))  # no pre-tokenizer
    tokenizer = Tokenizer(backend, bos_token="<s>", eos_token="<s>")
    with pytest.raises(ConfigError, match="digit by digit"):
        pa.secret_format(tokenizer, pa.DEFAULT_TEMPLATE, 2)


def test_exposure_formula_and_chance(monkeypatch):
    size = 1000
    order = np.random.default_rng(0).permutation(size)
    table = np.empty(size)
    table[order] = np.arange(size) * 0.1  # the secret order[k] ranks k + 1
    monkeypatch.setattr(pa, "candidate_nlls", lambda model, fmt, progress=None: table)
    canaries = [pa.Canary(f"{v:03d}", 1) for v in range(size)]
    result = pa.canary_exposure(None, byte_level_tokenizer(), canaries)
    for c in result.canaries:
        rank = int(np.nonzero(order == int(c["secret"]))[0][0]) + 1
        assert c["rank"] == rank
        assert c["exposure"] == pytest.approx(math.log2(size / rank))
    # every candidate a canary: ranks 1..|R| once each, mean exposure log2|R| - log2(|R|!)/|R|, near log2(e)
    mean = result.groups[0]["mean"]
    assert mean == pytest.approx(math.log2(size) - math.lgamma(size + 1) / math.log(2) / size)
    assert abs(mean - pa.CHANCE_EXPOSURE) < 0.01
    assert result.max_exposure == pytest.approx(math.log2(size))


def test_sampled_exposure_formula(monkeypatch):
    scores = {"0000": 5.0, "1111": 0.5}  # two canaries, then the sampled candidates' scores in order
    sampled = np.concatenate([[1.0, 2.0, 3.0, 5.0], np.full(95, 9.0)])  # 99 samples

    def fake(model, fmt, secrets):
        return np.concatenate([[scores[s] for s in secrets[:2]], sampled])
    monkeypatch.setattr(pa, "sampled_nlls", fake)
    result = pa.canary_exposure(None, byte_level_tokenizer(), [pa.Canary("0000", 4), pa.Canary("1111", 0)], samples=99)
    first, second = result.canaries
    assert first["exposure"] == pytest.approx(-math.log2((3 + 0.5 + 1) / 100))  # 3 more likely, 1 tie
    assert second["exposure"] == pytest.approx(math.log2(100)) == pytest.approx(result.max_exposure)
    assert second["rank"] == pytest.approx(10**4 / 100)
    assert result.method == "sampled"


def _train_on(model, tokenizer, texts, steps=120, lr=1e-2):
    """A few steps of AdamW on whole texts (each after a start token): enough for a tiny model to memorise."""
    start = tokenizer.bos_token_id
    rows = [[start] + tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    targets = torch.tensor([r[1:] + [-100] * (width - len(r)) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), targets[:, :width - 1].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def memorised(one_thread):
    """A tiny model trained on four stories and, eight times among them, one canary."""
    torch.manual_seed(0)
    tokenizer = digit_tokenizer()
    canary = pa.Canary("3817", 8)
    model = _train_on(tiny_model(torch.float32), tokenizer, STORIES[:4] + [canary.text] * 8)
    return model, tokenizer, canary


def test_memorised_canary_is_exposed_and_controls_are_not(memorised):
    model, tokenizer, canary = memorised
    controls = [pa.Canary(s, 0) for s in ("0452", "5260", "7093", "9624", "6148")]
    result = pa.canary_exposure(model, tokenizer, [canary] + controls)
    inserted, control = result.groups[1], result.groups[0]
    assert inserted["repeats"] == 8 and result.canaries[0]["rank"] == 1
    assert inserted["mean"] == pytest.approx(math.log2(10**4))  # the most likely of all 10,000 secrets
    assert control["max"] < 6 and control["mean"] < 4, result.canaries
    sampled = pa.canary_exposure(model, tokenizer, [canary] + controls, samples=500)
    assert sampled.groups[1]["mean"] == pytest.approx(math.log2(501))
    assert sampled.groups[0]["mean"] < 4
    text = pa.format_report(pa.PrivacyReport("m", sampled, None))
    assert "estimated from 500 sampled candidates" in text and "| 0 (controls) | 5 |" in text


def test_auc_equals_mann_whitney_u():
    rng = np.random.default_rng(1)
    for n1, n2 in ((1, 1), (7, 13), (200, 150)):
        members = np.round(rng.normal(1.0, 0.5, n1), 1)  # rounded: ties between and within the groups
        others = np.round(rng.normal(1.2, 0.5, n2), 1)
        u = mannwhitneyu(others, members).statistic  # pairs where the non-member's loss is higher, ties half
        assert pa.auc(members, others) == pytest.approx(u / (n1 * n2), abs=1e-12)
    assert pa.auc([1.0, 1.0], [1.0]) == 0.5
    assert pa.auc([0.1], [0.2]) == 1.0


def test_membership_on_the_memorised_model(memorised):
    model, tokenizer, _ = memorised
    result = pa.membership_inference(model, tokenizer, STORIES[:4], STORIES[4:], block_size=64)
    u = mannwhitneyu(result.non_member_losses, result.member_losses).statistic
    assert result.auc == pytest.approx(u / (4 * 2)) == 1.0  # trained on: lower loss, every pair
    assert result.member_loss < result.non_member_loss


def test_example_losses_equal_one_example_at_a_time():
    model, tokenizer = tiny_model(), byte_level_tokenizer()
    losses = pa.example_losses(model, tokenizer, STORIES, block_size=40, batch_tokens=100)
    for text, loss in zip(STORIES, losses):
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)])[:, :40]
        with torch.inference_mode():
            expected = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:]).item()
        assert loss == pytest.approx(expected, abs=1e-10)


def test_canaries_planted_as_many_times_as_asked(tmp_path):
    source = tmp_path / "source.txt"
    source.write_text("\n\n".join(STORIES * 5) + "\n")
    canaries = pa.make_canaries(count=2, repeats=[1, 3, 5], digits=4, seed=7)
    assert sorted(c.repeats for c in canaries) == [0, 0, 1, 1, 3, 3, 5, 5]
    assert len({c.secret for c in canaries}) == 8 and all(len(c.secret) == 4 for c in canaries)
    json_path = pa.insert_canaries(source, canaries, tmp_path / "out.txt", seed=3)
    assert json_path == tmp_path / "out.canaries.json"
    documents = split_documents((tmp_path / "out.txt").read_text(), "blank-line")
    for c in canaries:
        assert documents.count(c.text) == c.repeats
        assert scrub_pii(c.text)[0] == c.text  # `prepare` scrubs PII: space-separated digits are no phone number
    assert [d for d in documents if d not in {c.text for c in canaries}] == STORIES * 5  # the source, in order
    assert len(documents) == 30 + 18
    assert pa.load_canaries(json_path) == canaries
    assert json.loads(json_path.read_text())["documents"] == 30
    assert pa.make_canaries(2, [1, 3, 5], 4, 7) == canaries  # the seed fixes them


def test_notes_from_the_models_record(tmp_path):
    source = tmp_path / "source.txt"
    source.write_text("\n\n".join(STORIES))
    json_path = pa.insert_canaries(source, pa.make_canaries(1, [1, 4], digits=3), tmp_path / "train.txt")

    def record(**data):
        return {"recipe": {"data": {"source": str(tmp_path / "train.txt"), "dedupe": False} | data}}
    assert pa.training_notes(record(), json_path) == []
    assert pa.training_notes({}, json_path) == []  # no record (an imported model): nothing to say
    assert "dedupe on" in pa.training_notes(record(dedupe=True), json_path)[0]
    assert "trained on" in pa.training_notes(record(source=[str(source)]), json_path)[0]


def _run(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["pocketlm", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        cli.main()
    captured = capsys.readouterr()
    return exit.value.code, captured.out, captured.err


def test_command_line_end_to_end(tmp_path, capsys, monkeypatch, memorised):
    model, tokenizer, _ = memorised
    model_dir = save_model_dir(tmp_path / "model", tiny_config(), model.state_dict(), tokenizer)
    (tmp_path / "members.txt").write_text("\n\n".join(STORIES[:4]))
    (tmp_path / "held_out.txt").write_text("\n\n".join(STORIES[4:]))
    code, out, _ = _run(capsys, monkeypatch, "audit", "canaries", tmp_path / "members.txt", tmp_path / "train.txt",
                        "--count", "2", "--repeats", "1,4", "--digits", "3", "--seed", "1")
    assert code == 0 and str(tmp_path / "train.canaries.json") in out
    code, out, _ = _run(capsys, monkeypatch, "audit", "privacy", model_dir, "--canaries", tmp_path / "train.canaries.json",
                        "--members", tmp_path / "members.txt", "--non-members", tmp_path / "held_out.txt",
                        "--examples", "10", "--block-size", "64", "--json", tmp_path / "report.json")
    assert code == 0
    assert "1,000 candidates, exact" in out and "| 4 | 2 |" in out and "AUC 1.000 over 4 members and 2" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert [g["repeats"] for g in report["exposure"]["groups"]] == [0, 1, 4]
    assert report["membership"]["auc"] == 1.0 and report["model"] == str(model_dir)


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    model_dir = save_model_dir(tmp_path / "model", tiny_config(), tiny_model(torch.float32).state_dict(),
                               byte_level_tokenizer())
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(STORIES))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n\n")
    cases = [
        (("audit", "privacy", model_dir, "--canaries", tmp_path / "missing.json"), "no such canary file"),
        (("audit", "canaries", text, tmp_path / "o.txt", "--digits", "0"), "at least 1 digit"),
        (("audit", "canaries", text, tmp_path / "o.txt", "--template", "my code"), "must contain {secret}"),
        (("audit", "privacy", model_dir, "--members", text, "--non-members", blank), "no documents"),
        (("audit", "privacy", model_dir, "--members", text), "both member and non-member"),
        (("audit", "privacy", model_dir), "nothing to audit"),
        (("audit", "privacy", model_dir, "--members", text, "--non-members", text), "do not overlap"),
        (("audit", "canaries", text, text), "would overwrite the source"),
    ]
    for args, fragment in cases:
        code, out, err = _run(capsys, monkeypatch, *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], (args, err)
    big = pa.make_canaries(1, [1], digits=8)
    pa.insert_canaries(text, big, tmp_path / "big.txt")
    code, _, err = _run(capsys, monkeypatch, "audit", "privacy", model_dir, "--canaries", tmp_path / "big.canaries.json")
    assert code == 1 and "100,000,000 candidates" in err and "samples" in err
    with pytest.raises(ConfigError, match="must contain"):
        pa.load_canaries(_write(tmp_path / "bad.json", {"template": "no secret", "digits": 2, "canaries": []}))
    with pytest.raises(ConfigError, match="not 3 decimal digits"):
        pa.load_canaries(_write(tmp_path / "bad.json", {"template": pa.DEFAULT_TEMPLATE, "digits": 3,
                                                        "canaries": [{"secret": "12", "repeats": 1}]}))


def _write(path, record):
    path.write_text(json.dumps(record))
    return path
