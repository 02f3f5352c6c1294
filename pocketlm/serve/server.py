"""What every route of the server shares: its variants, the request log, the metrics and the limits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .config import ServeConfig
from .metrics import ServerMetrics
from .protocol import APIError
from .rag import Library
from .store import RequestLog, RequestRecord
from .variants import Variant, assign


class Server:
    """What the routes share: the variants, the request log, the metrics and the limits."""

    def __init__(self, config: ServeConfig, variants: list[Variant], library: Library | None = None):
        self.config = config
        self.library = library if library is not None else Library(config)
        self.variants = {v.name: v for v in variants}
        self.experiment = config.experiment.name if config.experiment else None
        self.arms = [v for v in variants if v.experiment is not None]
        self.log = RequestLog(config.database)
        self.metrics = ServerMetrics(self.variants)
        self.keys = config.keys()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pocketlm-log")  # one SQLite writer

    def route(self, model: str, user: str | None) -> Variant:
        if model in self.variants:
            return self.variants[model]
        if model == self.experiment:
            return assign(self.experiment, self.arms, user)
        names = list(self.variants) + ([self.experiment] if self.experiment else [])
        raise APIError(404, f"the model {model!r} does not exist on this server; it serves: {', '.join(names)}",
                       param="model", code="model_not_found")

    def max_tokens(self, wanted: int | None, default: int) -> int:
        if wanted is None:  # the server's default, within its own cap
            return min(default, self.config.max_tokens_cap)
        if wanted > self.config.max_tokens_cap:
            raise APIError(400, f"max_tokens is {wanted} but this server allows at most {self.config.max_tokens_cap}",
                           param="max_tokens")
        return wanted

    def record(self, record: RequestRecord) -> None:
        if not self.config.log_prompts:
            record.prompt_text = record.completion_text = None
        self._writer.submit(self.log.add_request, record)

    def close(self) -> None:
        for variant in self.variants.values():
            variant.scheduler.close()
        self.library.close()
        self._writer.shutdown(wait=True)
