"""open_model, the one way a command or stage opens a model: a model directory, a quantized directory,
an adapter directory (alone or given as `adapter=`), and a known name, against loading the pieces by hand."""

import pytest
import torch

from helpers import tiny_model_dir
from pocketlm.adapt.adapters import attach, load_adapter, lora_config, save_adapter
from pocketlm.checkpoint import load_model
from pocketlm.errors import CheckpointError, ModelNotFoundError
from pocketlm.loading import open_model
from pocketlm.quant import Int8Linear, QuantScheme
from pocketlm.quantize import quantize_dir

IDS = torch.tensor([[5, 17, 42, 7, 99, 3]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("loading") / "tiny")


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    model, _ = load_model(tiny)
    attach(model, lora_config(4, 8, 0.0, ["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return save_adapter(model, tmp_path_factory.mktemp("loading") / "adapter", tiny)


def logits(model):
    with torch.no_grad():
        return model(IDS)


def test_a_model_directory_opens_as_load_model_opens_it(tiny):
    opened, tokenizer = open_model(tiny)
    loaded, _ = load_model(tiny)
    assert torch.equal(logits(opened), logits(loaded))
    assert tokenizer.vocab_size <= loaded.config.vocab_size


def test_a_quantized_directory_opens_quantized(tiny, tmp_path):
    opened, _ = open_model(quantize_dir(tiny, tmp_path / "q8", QuantScheme("int8")))
    assert isinstance(opened.model.layers[0].self_attn.q_proj, Int8Linear)


def test_an_adapter_directory_opens_on_its_base(tiny, adapter):
    by_hand, _ = load_model(tiny)
    load_adapter(by_hand, adapter)
    expected = logits(by_hand)
    assert (logits(load_model(tiny)[0]) - expected).abs().max() > 1e-3  # the adapter changes the model
    for opened in (open_model(adapter)[0], open_model(tiny, adapter=adapter)[0]):
        assert (logits(opened) - expected).abs().max() <= 1e-4
    unmerged, _ = open_model(adapter, merge=False)
    assert any("lora_A" in name for name, _ in unmerged.named_parameters())


def test_the_model_directory_loader_refuses_an_adapter_directory_clearly(adapter):
    with pytest.raises(CheckpointError, match="adapter directory opens with pocketlm.loading.open_model"):
        load_model(adapter)


def test_an_unknown_name_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model directory, and not a known model name"):
        open_model(str(tmp_path / "nothing-here"))
