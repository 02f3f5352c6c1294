"""Adapting models: SFT data and masking, LoRA / prefix adapters against PEFT itself, DPO,
distillation (logits, top-k cache, sequence level) and the vocabulary check, all through
`pocketlm train`'s one loop."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import byte_level_tokenizer, tiny_model_dir

from pocketlm.errors import ConfigError
from pocketlm.train import load_recipe, train
from pocketlm.train.instruct import (
    IGNORE,
    RowsReport,
    pack_rows,
    preference_rows,
    sft_rows,
)

WORDS = ["the", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("base") / "base")


def write_recipe(tmp_path: Path, **sections) -> Path:
    recipe = {"name": "t", "out_dir": str(tmp_path / "run"), "seed": 3,
              "train": {"max_steps": 8, "batch_size": 4, "block_size": 64, "dtype": "float32", "threads": 1},
              "optim": {"lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.0},
              "eval": {"interval": 4, "iters": 2}, "checkpoint": {"interval": 4, "keep_last": 1},
              "log": {"interval": 1, "progress": False, "tensorboard": False}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "sft.json"
    records = [{"instruction": f"Repeat the word {w}", "input": "", "output": f"{w} {w} {w}"} for w in WORDS] * 6
    path.write_text(json.dumps(records))
    return path


# ---- SFT data ----------------------------------------------------------------------------------
def trained_text(tokenizer, rows) -> list[str]:
    out = []
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        out.append(tokenizer.decode([int(t) for t in labels if t != IGNORE]))
    return out


def test_sft_labels_only_the_assistant_replies(tmp_path):
    tok = byte_level_tokenizer()
    convo = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                          {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(convo) + "\n")
    rows = sft_rows([str(path)], tok, block=128, fmt="auto", system=None, packing=False, report=RowsReport())
    # the template renders "<s>assistant\n{content}</s>\n": the reply and its end-of-turn carry loss
    assert trained_text(tok, rows) == ["hello there</s>\nbye</s>\n"]
    full = tok.decode([int(t) for t in rows["input_ids"][0]])
    assert full.startswith("<s>user\nhi</s>\n<s>assistant\nhello there")
    # every prompt token (user turns, role headers) is IGNORE: the labelled positions are exactly the replies'
    labels = rows["labels"][0]
    prompt_only = tok.encode("<s>user\nhi</s>\n<s>assistant\n", add_special_tokens=False)
    assert (labels[:len(prompt_only) - 1] == IGNORE).all()


def test_sft_loss_ignores_prompt_tokens(base, tmp_path):
    """Changing the prompt's *targets* changes nothing; the loss equals cross-entropy over reply tokens."""
    from pocketlm.checkpoint import load_model
    from pocketlm.train.objectives import masked_lm_loss

    model, tok = load_model(base)
    ids = torch.tensor([tok.encode("<s>user\nhi</s>\n<s>assistant\nhello</s>\n", add_special_tokens=False)])
    labels = torch.full_like(ids, IGNORE)
    labels[0, -6:-1] = ids[0, -5:]  # only the reply's last five tokens are targets
    loss, _ = masked_lm_loss(model, {"input_ids": ids, "labels": labels})
    logits = model(ids)[0]
    keep = labels[0] != IGNORE
    expected = F.cross_entropy(logits[keep], labels[0][keep])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(logits[:-1], ids[0, 1:]), atol=1e-3)


def test_alpaca_and_prompt_completion_formats(tmp_path):
    tok = byte_level_tokenizer()
    tok.chat_template = None
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"instruction": "Add", "input": "2 and 2", "output": "4"}) + "\n"
                    + json.dumps({"prompt": "Question: sky?\nAnswer:", "completion": " blue"}) + "\n"
                    + json.dumps({"instruction": "Read.\n\nThen answer.", "output": "ok"}) + "\n")
    rows = sft_rows([str(path)], tok, block=256, fmt="auto", system=None, packing=False, report=RowsReport())
    assert trained_text(tok, rows) == ["4</s>", " blue</s>", "ok</s>"]
    alpaca = tok.decode([int(t) for t in rows["input_ids"][0]])
    assert "### Instruction:\nAdd\n\n### Input:\n2 and 2\n\n### Response:\n4</s>" in alpaca
    # an instruction with a blank line in it stays one instruction, with no Input section
    third = tok.decode([int(t) for t in rows["input_ids"][2]])
    assert "### Instruction:\nRead.\n\nThen answer.\n\n### Response:\nok</s>" in third


def test_packing_keeps_examples_whole():
    examples = [([1] * n, [False] + [True] * (n - 1), f"ex{n}") for n in (5, 9, 3, 6, 40)]
    report = RowsReport()
    rows = pack_rows(examples, block=15, pad_id=0, packing=True, report=report)
    # 16-token rows, first fit: 5+9 | 3+6 | 40 cut to 16; an example's first token is never a target
    assert rows["input_ids"].shape == (3, 15)
    assert report.truncated == 1 and report.rows == 3
    assert int((rows["labels"] != IGNORE).sum()) == report.trained_tokens == 4 + 8 + 2 + 5 + 15


@pytest.mark.parametrize("record, message", [
    ({"text": "x"}, "expected Alpaca fields"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role (system, user or assistant)"),
])
def test_bad_instruction_records_are_named(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        sft_rows([str(path)], byte_level_tokenizer(), 64, "auto", None, True, RowsReport())
    assert f"{path}:2" in str(info.value)


# ---- LoRA and prefix tuning against PEFT -----------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(base, sft_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    path = write_recipe(tmp, init_from=str(base), data={"source": str(sft_file)},
                        train={"objective": "sft"}, adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1})
    final = train(load_recipe(path))
    return tmp / "run", final


def hf_peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        before = plain(input_ids=ids).logits
        after = PeftModel.from_pretrained(plain, adapter).eval()(input_ids=ids).logits
    return before, after


def test_lora_sft_writes_a_peft_adapter_and_merged_model(lora_run):
    run, final = lora_run
    assert final == run / "model"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert Path(config["base_model_name_or_path"]).is_dir()
    records = log(run)
    assert records[-1]["val_loss"] < records[0]["loss"]
    provenance = json.loads((final / "pocketlm.json").read_text())
    assert provenance["adapter"]["merged"] is True


def test_lora_logits_match_peft_unmerged_and_merged(base, lora_run):
    from pocketlm.adapt.adapters import load_adapter
    from pocketlm.checkpoint import load_model
    from pocketlm.loading import open_model

    run, merged_dir = lora_run
    ids = torch.randint(3, 290, (2, 20), generator=torch.Generator().manual_seed(0))
    before, reference = hf_peft_logits(base, run / "adapter", ids)
    assert (reference - before).abs().max() > 1e-2  # the adapter does change the model
    model, _ = load_model(base)
    load_adapter(model, run / "adapter")
    merged, _ = load_model(merged_dir)
    via_dir, _ = open_model(run / "adapter")  # an adapter directory opens as base + adapter
    with torch.no_grad():
        for got in (model(ids), merged(ids), via_dir(ids)):
            assert (got - reference).abs().max() <= 1e-4


def test_prefix_tuning_matches_peft(base, sft_file, tmp_path):
    from pocketlm.loading import open_model

    path = write_recipe(tmp_path, init_from=str(base), data={"source": str(sft_file)}, train={"objective": "sft"},
                        adapter={"type": "prefix", "num_virtual_tokens": 5})
    final = train(load_recipe(path))
    assert final == tmp_path / "run" / "adapter"
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    ids = torch.randint(3, 290, (2, 16), generator=torch.Generator().manual_seed(1))
    before, reference = hf_peft_logits(base, final, ids)
    assert (reference - before).abs().max() > 1e-2
    model, _ = open_model(final)
    with torch.no_grad():
        assert (model(ids) - reference).abs().max() <= 1e-4


def test_several_adapters_over_one_base(base, lora_run, sft_file, tmp_path):
    from pocketlm.adapt.adapters import load_adapter, use_adapter
    from pocketlm.checkpoint import load_model
    from pocketlm.loading import open_model

    path = write_recipe(tmp_path, init_from=str(base), data={"source": str(sft_file)}, train={"objective": "sft"},
                        adapter={"r": 2, "target_modules": ["q_proj", "v_proj"]}, seed=11)
    train(load_recipe(path))
    first, second = lora_run[0] / "adapter", tmp_path / "run" / "adapter"
    ids = torch.randint(3, 290, (1, 12), generator=torch.Generator().manual_seed(2))
    model, _ = load_model(base)
    load_adapter(model, first, name="first")
    load_adapter(model, second, name="second")
    with torch.no_grad():
        for name, directory in (("first", first), ("second", second), ("first", first)):
            use_adapter(model, name)
            alone, _ = open_model(directory)
            assert (model(ids) - alone(ids)).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="no adapter called 'third'"):
        use_adapter(model, "third")


@pytest.fixture(scope="module")
def prefs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Pick {i}", "chosen": WORDS[4 + i % 4], "rejected": WORDS[i % 4]})
                            + "\n" for i in range(24)))
    return path


@pytest.mark.parametrize("objective", ["sft", "dpo", "distill"])
def test_adapting_runs_resume_exactly(objective, base, sft_file, prefs_file, text_file, tmp_path):
    """4 steps, then a resumed run to 8, log the same losses as 8 steps straight (LoRA SFT, LoRA DPO
    with its cached reference log-probs, and distillation with a cached teacher)."""
    from safetensors.torch import load_file

    common = {"optim": {"lr": 3e-3, "decay_steps": 8, "warmup_steps": 0, "weight_decay": 0.0}}
    if objective == "distill":
        common |= {"model": STUDENT, "data": {"source": str(text_file), "tokenizer": str(base), "dedupe": False},
                   "distill": {"teacher": str(base), "cache_top_k": 8}}
    else:
        common |= {"init_from": str(base), "adapter": {"r": 4},
                   "data": {"source": str(sft_file if objective == "sft" else prefs_file)}}
    straight = write_recipe(tmp_path / "a", train={"objective": objective, "max_steps": 8, "block_size": 32}, **common)
    train(load_recipe(straight))
    halves = write_recipe(tmp_path / "b", train={"objective": objective, "max_steps": 4, "block_size": 32}, **common)
    train(load_recipe(halves))
    if objective != "distill":  # the frozen base is not copied into adapter checkpoints
        ckpt = tmp_path / "b" / "run" / "checkpoints" / "step-0000004" / "model.safetensors"
        assert all("lora_" in k for k in load_file(ckpt))
    train(load_recipe(halves, overrides=["resume=true", "train.max_steps=8"]))
    a = {r["step"]: r["loss"] for r in log(tmp_path / "a" / "run")}
    b = {r["step"]: r["loss"] for r in log(tmp_path / "b" / "run")}
    assert sorted(a) == list(range(1, 9)) and a == b


def test_adapter_recipe_errors(base, sft_file, tmp_path):
    path = write_recipe(tmp_path, init_from=str(base), data={"source": str(sft_file)}, train={"objective": "sft"},
                        adapter={"target_modules": ["q_prj"]})
    with pytest.raises(ConfigError, match=r"\['q_prj'\] are not linear layers of this model"):
        train(load_recipe(path))
    path = write_recipe(tmp_path, model={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
                        data={"source": str(sft_file)}, train={"objective": "sft"})
    with pytest.raises(ConfigError, match="set init_from"):
        load_recipe(path)


# ---- DPO ---------------------------------------------------------------------------------------
def test_dpo_raises_preference_accuracy_on_its_pairs(base, tmp_path):
    from pocketlm.checkpoint import load_model
    from pocketlm.train.batches import Rows
    from pocketlm.train.objectives import reply_logprobs

    # one rule to learn: four-letter words over three-letter ones; the base prefers the shorter (fewer tokens)
    pairs = [{"prompt": f"Pick a word {i}", "chosen": WORDS[4 + i % 4], "rejected": WORDS[(3 * i) % 4]}
             for i in range(16)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    path = write_recipe(tmp_path, init_from=str(base), data={"source": str(data), "val_fraction": 0.2},
                        train={"objective": "dpo", "max_steps": 80, "batch_size": 4},
                        optim={"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0},
                        adapter={"r": 8, "alpha": 16, "dropout": 0.0}, dpo={"beta": 0.1},
                        eval={"interval": 40, "iters": 4})
    final = train(load_recipe(path))

    def accuracy(model_dir):
        model, tok = load_model(model_dir)
        rows = Rows(preference_rows([str(data)], tok, 64, "auto", None, RowsReport()), 4)
        b = rows.batch(np.arange(rows.n), torch.device("cpu"))
        with torch.no_grad():
            chosen = reply_logprobs(model, b["chosen_input_ids"], b["chosen_labels"])
            rejected = reply_logprobs(model, b["rejected_input_ids"], b["rejected_labels"])
        return chosen, rejected

    c0, r0 = accuracy(base)
    c1, r1 = accuracy(final)
    # DPO's preference accuracy: the implicit reward beta * (log pi - log ref) ranks chosen above rejected
    implicit = ((c1 - c0) - (r1 - r0) > 0).float().mean()
    assert implicit >= 0.9, implicit
    # and the model itself moved: it now likes the chosen replies more, absolutely
    before, after = ((c0 - r0) > 0).float().mean(), ((c1 - r1) > 0).float().mean()
    assert before <= 0.25 and after >= 0.5, (before, after)
    assert ((c1 - r1) - (c0 - r0)).mean() > 1.0
    records = log(tmp_path / "run")
    assert records[-1]["preference_accuracy"] >= records[0]["preference_accuracy"]
    assert {"reward_margin", "reward_chosen", "reward_rejected", "val_preference_accuracy"} <= set(records[-1])


def test_dpo_terms_match_the_formula():
    from pocketlm.train.objectives import dpo_terms

    pc, pr, rc, rr = (torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]),
                      torch.tensor([-3.0, -3.0]))
    loss, m = dpo_terms(pc, pr, rc, rr, beta=0.5)
    logits = 0.5 * ((pc - rc) - (pr - rr))
    assert torch.allclose(loss, -torch.log(torch.sigmoid(logits)).mean())
    assert float(m["preference_accuracy"]) == 0.5


# ---- distillation ------------------------------------------------------------------------------
def test_kd_divergence_is_kl_at_temperature():
    from pocketlm.train.objectives import kd_divergence

    s, t = torch.randn(2, 5, 30), torch.randn(2, 5, 30)
    labels = torch.zeros(2, 5, dtype=torch.long)
    got = kd_divergence(s, t, 2.0, labels)
    expected = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1).mean()
    assert torch.allclose(got, expected, atol=1e-6)
    values, ids = t.topk(30, dim=-1)  # the top-k form with k = vocab is the full KL
    assert torch.allclose(kd_divergence(s, values, 2.0, labels, ids), expected, atol=1e-5)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    rng = np.random.default_rng(0)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS, 12)) + "." for _ in range(300)))
    return path


STUDENT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "tie_word_embeddings": True}


def test_logit_distillation_on_the_fly_and_cached(base, text_file, tmp_path):
    from pocketlm.checkpoint import load_model
    from pocketlm.train.distill import TeacherCache, cache_key

    for name, extra in (("fly", {}), ("cached", {"cache_top_k": 16}), ("int8-teacher", {"teacher_quantize": "int8"})):
        path = write_recipe(tmp_path / name, model=STUDENT, train={"objective": "distill", "block_size": 32},
                            data={"source": str(text_file), "tokenizer": str(base), "dedupe": False},
                            distill={"teacher": str(base), "alpha": 0.5, "temperature": 2.0, **extra})
        final = train(load_recipe(path))
        records = log(tmp_path / name / "run")
        assert {"ce", "kl"} <= set(records[0]) and records[-1]["loss"] < records[0]["loss"]
        assert (final / "model.safetensors").is_file()
    # an int8 teacher teaches nearly what the float one does
    fly, int8 = log(tmp_path / "fly" / "run"), log(tmp_path / "int8-teacher" / "run")
    assert abs(fly[0]["kl"] - int8[0]["kl"]) < 0.05 * fly[0]["kl"] + 1e-3
    # the cache holds the teacher's top 16 logits for every chunk the run read, written once
    teacher, _ = load_model(base)
    run = tmp_path / "cached" / "run"
    cache_dir = run / "teacher-cache"
    done = np.load(cache_dir / "done.npy")
    chunk = int(np.flatnonzero(done)[0])
    from pocketlm.data import load_shards

    shards = load_shards(run / "data")
    cache = TeacherCache(cache_dir, shards.train, 32, 16, cache_key(base, shards))
    assert cache.done.sum() == done.sum()  # reopened, not recomputed
    ids = torch.from_numpy(shards.train[chunk * 32:(chunk + 1) * 32].astype(np.int64))[None]
    vocab = json.loads((final / "config.json").read_text())["vocab_size"]  # the student's; the teacher pads to 300
    with torch.no_grad():
        values, top = teacher(ids)[..., :vocab].topk(16, dim=-1)
    got = cache.lookup(np.array([chunk]), "cpu")
    assert torch.equal(got["teacher_ids"], top)
    assert torch.allclose(got["teacher_logits"], values, atol=2e-2)  # stored as fp16


def test_a_shared_teacher_cache_trains_the_same_student(base, text_file, tmp_path):
    """`pocketlm distill-cache` fills the teacher's top-k once; a student that reads it (distill.cache_dir) ends
    with the weights of a student that filled its own cache. A cache for another k, or one that lacks chunks the
    student reads, is refused rather than rewritten."""
    from safetensors.torch import load_file

    from pocketlm.train.loop import fill_teacher_cache

    def recipe(name: str, steps: int = 8, **distill) -> Path:
        return write_recipe(tmp_path / name, model=STUDENT, train={"objective": "distill", "block_size": 32,
                                                                   "max_steps": steps},
                            data={"source": str(text_file), "tokenizer": str(base), "dedupe": False},
                            distill={"teacher": str(base), "cache_top_k": 16, **distill})

    own = train(load_recipe(recipe("own")))
    shared = fill_teacher_cache(load_recipe(recipe("teacher")), progress=False)
    assert shared == tmp_path / "teacher" / "run" / "teacher-cache" and not (tmp_path / "teacher" / "run" / "model").exists()
    filled = np.load(shared / "done.npy").sum()
    student = train(load_recipe(recipe("student", cache_dir=str(shared))))
    assert not (tmp_path / "student" / "run" / "teacher-cache").exists()
    assert np.load(shared / "done.npy").sum() == filled  # read, not written
    mine, theirs = load_file(own / "model.safetensors"), load_file(student / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(ConfigError, match="made for another teacher, k or data"):
        train(load_recipe(recipe("other-k", cache_dir=str(shared), cache_top_k=8)))
    with pytest.raises(ConfigError, match=r"lacks \d+ of the \d+ chunks this run reads"):
        train(load_recipe(recipe("longer", steps=40, cache_dir=str(shared))))


def test_logit_distillation_reads_a_prepared_folder(base, text_file, tmp_path):
    """data.prepared (a `pocketlm prepare` folder, its tokenizer in tokenizer/) for a distillation run: the
    vocabulary check finds the tokenizer there."""
    from pocketlm.data import prepare

    prepare([str(text_file)], tmp_path / "prepared", tokenizer=str(base), dedupe=False)
    path = write_recipe(tmp_path / "run", model=STUDENT, train={"objective": "distill", "block_size": 32, "max_steps": 2},
                        data={"prepared": str(tmp_path / "prepared")}, distill={"teacher": str(base), "cache_top_k": 8})
    assert (train(load_recipe(path)) / "model.safetensors").is_file()


def test_logit_distillation_with_another_vocabulary_stops_first(base, text_file, tmp_path):
    path = write_recipe(tmp_path, model=STUDENT, train={"objective": "distill"},
                        data={"source": str(text_file), "tokenizer": "char"}, distill={"teacher": str(base)})
    with pytest.raises(ConfigError) as info:
        train(load_recipe(path))
    message = str(info.value)
    assert "\n" not in message and "distill.mode: sequence" in message and "vocabulary" in message
    assert not (tmp_path / "run" / "data").exists()  # stopped before preparing any data


def test_sequence_level_distillation(base, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nthe dog\n\na bird\n")
    path = write_recipe(tmp_path, model=STUDENT, train={"objective": "distill", "block_size": 16},
                        data={"tokenizer": "char", "dedupe": False, "val_fraction": 0.2},
                        distill={"teacher": str(base), "mode": "sequence", "prompts": str(prompts),
                                 "num_sequences": 12, "max_new_tokens": 24, "generate_batch": 5})
    final = train(load_recipe(path))
    corpus = [json.loads(line) for line in (tmp_path / "run" / "teacher-corpus" / "corpus.jsonl").read_text().splitlines()]
    assert len(corpus) == 12
    assert [c["prompt"] for c in corpus[:4]] == ["the cat", "the dog", "a bird", "the cat"]
    assert all(c["text"].startswith(c["prompt"]) and len(c["text"]) > len(c["prompt"]) for c in corpus)
    from pocketlm.tokenizer import Tokenizer

    assert Tokenizer.load(final).vocab_size < 300  # the student's own (character) vocabulary


def test_sequence_corpus_resumes_after_a_torn_line(base, tmp_path):
    from pocketlm.train.distill import write_corpus
    from pocketlm.train.recipe import DistillSpec

    spec = DistillSpec(teacher=str(base), mode="sequence", seed_openings=["one", "two"], num_sequences=5,
                       max_new_tokens=8, generate_batch=2)
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "corpus.jsonl").write_text(json.dumps({"prompt": "one", "text": "one x"}) + "\n" + '{"prompt": "tw')
    write_corpus(spec, out, "cpu", seed=0)
    lines = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and lines[0]["text"] == "one x"
    assert [line["prompt"] for line in lines] == ["one", "two", "one", "two", "one"]


# ---- held-out splits ---------------------------------------------------------------------------
def test_split_task_holds_out_questions(shared_data, tmp_path):
    from pocketlm.evaluate.loaders import resolve_tasks
    from pocketlm.evaluate.split import split_task

    record = split_task("arc_easy", tmp_path, test_fraction=0.2, seed=0)
    assert record["train"] + record["test"] == 2376 and record["test"] == 475
    train_prompts = {json.loads(line)["prompt"] for line in (tmp_path / "train.jsonl").read_text().splitlines()}
    task = resolve_tasks([str(tmp_path / "test.yaml")])[0]
    held_out = task.load()
    assert len(held_out) == 475 and not {e.query for e in held_out} & train_prompts
    builtin = {e.query: e for e in resolve_tasks(["arc_easy"])[0].load()}
    for e in held_out[:50]:  # the held-out task asks exactly what the built-in task asks
        assert builtin[e.query].choices == e.choices and builtin[e.query].gold == e.gold
    prefs = [json.loads(line) for line in (tmp_path / "preferences.jsonl").read_text().splitlines()]
    assert len(prefs) == record["train"] and all(p["chosen"] != p["rejected"] for p in prefs)
    assert not {p["prompt"] for p in prefs} & {e.query for e in held_out}
    again = tmp_path / "again"
    split_task("arc_easy", again, test_fraction=0.2, seed=0)
    assert (again / "test.jsonl").read_text() == (tmp_path / "test.jsonl").read_text()


# ---- the command line --------------------------------------------------------------------------
def test_cli_sft_eval_and_merge(base, tmp_path):
    from test_cli import assert_clean_error, pocketlm

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {w}?\nA:", "completion": f" {w}"}) + "\n" for w in WORDS * 4))
    recipe = write_recipe(tmp_path, init_from=str(base), data={"source": str(data)}, train={"objective": "sft"},
                          adapter={"r": 4, "merge": False})
    result = pocketlm("train", recipe, "train.max_steps=4")
    assert result.returncode == 0, result.stderr
    adapter = tmp_path / "run" / "adapter"
    assert "lora adapter:" in result.stderr and "trainable parameters" in result.stderr
    assert not (tmp_path / "run" / "model").exists()  # merge: false
    task = tmp_path / "task.yaml"
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"q": f"Q: {w}?\nA:", "choices": [f" {w}", " no"], "gold": 0})
                                               + "\n" for w in WORDS))
    task.write_text("task: qa\ndata: qa.jsonl\nprompt: '{{q}}'\nchoices: choices\ntarget: '{{gold}}'\ntarget_delimiter: ''\n")
    evaluated = pocketlm("eval", adapter, "--tasks", task, "-o", tmp_path / "r.json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "r.json").read_text())["results"]["qa"]["n"] == len(WORDS)
    merged = pocketlm("merge", adapter, tmp_path / "run" / "model")  # where adapter.merge: true puts it
    assert merged.returncode == 0, merged.stderr
    assert json.loads((tmp_path / "run" / "model" / "pocketlm.json").read_text())["adapter"]["merged"] is True
    assert_clean_error(pocketlm("merge", base, tmp_path / "x"), "not a PEFT adapter directory")
    assert_clean_error(pocketlm("merge", tmp_path / "run" / "model", tmp_path / "x"),
                       f"already a merged model (its training run keeps the LoRA adapter in {adapter})")
    bad = write_recipe(tmp_path / "bad", init_from=str(base), data={"source": str(data)},
                       train={"objective": "sft"}, distill={"teacher": str(base)})
    assert_clean_error(pocketlm("train", bad), "train.objective distill needs a `distill` section")


@pytest.mark.parametrize("name", ["distill-smollm2-tinystories", "distill-sequence-smollm2", "lora-sft-arc-easy",
                                  "dpo-arc-easy"])
def test_adapt_recipes_are_valid(name):
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml", check_paths=False)
    assert recipe.train.objective in ("distill", "sft", "dpo")


def test_ddp_lora_sft_matches_one_process(base, sft_file, tmp_path):
    """Two gloo processes, each on half of every batch, log the losses of one process (LoRA SFT)."""
    import os
    import subprocess
    import sys

    common = {"init_from": str(base), "data": {"source": str(sft_file)}, "adapter": {"r": 4, "dropout": 0.0}}
    one = write_recipe(tmp_path / "one", train={"objective": "sft", "max_steps": 6}, **common)
    two = write_recipe(tmp_path / "two", train={"objective": "sft", "max_steps": 6}, **common)
    train(load_recipe(one))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pocketlm", "train", str(two)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = {r["step"]: r["loss"] for r in log(tmp_path / "one" / "run")}
    b = {r["step"]: r["loss"] for r in log(tmp_path / "two" / "run")}
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5


def test_sft_gradient_accumulation_matches_one_batch(base, sft_file, tmp_path):
    """Rows hold different numbers of reply tokens; the step's loss is still the mean over all of them."""
    common = {"init_from": str(base), "data": {"source": str(sft_file)}, "adapter": {"r": 4, "dropout": 0.0}}
    one = write_recipe(tmp_path / "one", train={"objective": "sft", "max_steps": 4}, **common)
    accum = write_recipe(tmp_path / "accum", train={"objective": "sft", "max_steps": 4, "grad_accum": 4}, **common)
    train(load_recipe(one))
    train(load_recipe(accum))
    a = {r["step"]: r["loss"] for r in log(tmp_path / "one" / "run")}
    b = {r["step"]: r["loss"] for r in log(tmp_path / "accum" / "run")}
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5


def test_generation_with_a_prefix_adapter(base, sft_file, tmp_path):
    """The prefix fills the first cache positions: cached greedy decoding (one and several sequences)
    picks the tokens a full forward pass without any cache picks."""
    from pocketlm.engine import SamplingParams, generate_batch, generate_tokens
    from pocketlm.loading import open_model

    path = write_recipe(tmp_path, init_from=str(base), data={"source": str(sft_file)}, train={"objective": "sft"},
                        adapter={"type": "prefix", "num_virtual_tokens": 6})
    model, _ = open_model(train(load_recipe(path)))
    assert model.context_length == 128 - 6
    prompts = [[5, 80, 81, 82, 90], [7, 100, 101]]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(10):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            expected.append(ids[len(prompt):])
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    assert list(generate_tokens(model, prompts[0], params)) == expected[0]
    assert generate_batch(model, prompts, params) == expected


def test_compiled_dpo_trains_as_eager(base, prefs_file, tmp_path):
    """DPO runs the output head on the reply positions only, a row count that depends on the data: with
    train.compile it is traced as a symbolic size (Linear's few-rows path once stopped that), and trains
    as the eager loop does, to rounding."""
    common = {"init_from": str(base), "adapter": {"r": 4, "dropout": 0.0}, "data": {"source": str(prefs_file)},
              "optim": {"lr": 3e-3, "decay_steps": 4, "warmup_steps": 0, "weight_decay": 0.0}}
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        path = write_recipe(tmp_path / name, train={"objective": "dpo", "max_steps": 4, "block_size": 32,
                                                     "compile": compiled}, **common)
        train(load_recipe(path))
        runs[name] = {r["step"]: r["loss"] for r in log(tmp_path / name / "run")}
    assert sorted(runs["eager"]) == sorted(runs["compiled"]) == [1, 2, 3, 4]
    assert max(abs(runs["eager"][s] - runs["compiled"][s]) for s in runs["eager"]) < 1e-4
