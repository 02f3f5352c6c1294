"""lm-evaluation-harness adapter: pocketlm models as lm-eval's `pocketlm` model.

From the shell, through this module (it registers the model, then hands over to lm-eval's own CLI):

    python -m pocketlm.evaluate.harness run --model pocketlm --model_args path=MODEL_DIR --tasks arc_easy

From Python, importing this module registers the model:

    import lm_eval, pocketlm.evaluate.harness
    lm_eval.simple_evaluate(model="pocketlm", model_args="path=MODEL_DIR", tasks=["arc_easy"])

Scoring goes through the same code as `pocketlm eval`, so both give the same numbers.
"""

from __future__ import annotations

import torch

try:
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models first: it skips that once the registry is not empty)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
except ImportError as exc:
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install 'pocketlm[eval]' "
                      "(or lm_eval==0.4.13)") from exc

from ..engine import SamplingParams
from ..loading import open_model
from ..streaming import generate
from .scoring import BATCH_TOKENS, encode_pair, loglikelihoods, prefix_token_id, rolling_nll

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": None}


class PocketLMHarness(LM):
    """`--model_args path=DIR[,dtype=float32|bfloat16][,batch_tokens=N]`."""

    def __init__(self, path: str, dtype: str = "auto", batch_tokens: int = BATCH_TOKENS, device: str | None = None,
                 batch_size=None, max_batch_size=None, **unused):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.model, self.tokenizer = open_model(path, dtype=DTYPES[dtype], device=device or "cpu")
        self.batch_tokens = int(batch_tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *request.args) for request in requests]
        return loglikelihoods(self.model, pairs, max_batch_tokens=self.batch_tokens)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        window = self.model.context_length
        out = []
        for request in requests:
            (text,) = request.args
            ids = [prefix_token_id(self.tokenizer)] + self.tokenizer.encode(text, add_special_tokens=False)
            nll, _ = rolling_nll(self.model, ids, window)
            out.append(-nll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            max_new = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            ids = self.tokenizer.encode(context)[-(self.model.context_length - max_new):]
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                    stop=[until] if isinstance(until, str) else list(until))
            out.append(generate(self.model, self.tokenizer, ids, params).text)
        return out


if "pocketlm" not in model_registry:
    model_registry.register("pocketlm")(PocketLMHarness)


def main() -> None:
    """lm-eval's own command line, with the `pocketlm` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
