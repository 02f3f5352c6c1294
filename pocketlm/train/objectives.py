"""Training objectives: each turns a batch into (loss, metrics). The loop does the rest.

    pretrain, sft   cross-entropy on labels (SFT's prompt positions are labelled IGNORE)
    distill         (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher_T || student_T)
    dpo             -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))  over summed reply log-probs

A mixture of experts adds coef * its load-balancing loss to any of them (`with_router_loss`), and a FedProx client
mu / 2 * ||w - w_global||^2 (`with_proximal_term`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .instruct import IGNORE

Metrics = dict[str, torch.Tensor]


@dataclass
class Objective:
    loss: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, Metrics]]
    # validation: the figure that stays comparable across objectives (plain cross-entropy for distillation)
    eval_loss: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, Metrics]]
    # `loss` returns a sum over labelled tokens, which the loop divides by the step's labelled tokens across
    # every micro-batch and process: rows with more reply tokens weigh more, exactly as in one big batch
    token_sum: bool = False


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, Metrics]:
    return cross_entropy(model(batch["input_ids"]), batch["labels"]), {}


def masked_lm_loss(model, batch: dict, reduction: str = "mean") -> tuple[torch.Tensor, Metrics]:
    """Cross-entropy on the labelled positions only, with the output head run only there (SFT)."""
    keep = batch["labels"] != IGNORE
    logits = model(batch["input_ids"], select=keep).float()
    return F.cross_entropy(logits, batch["labels"][keep], reduction=reduction), {}


def per_example_lm_loss(model, batch: dict) -> tuple[torch.Tensor, Metrics]:
    """The mean over rows of each row's mean cross-entropy over its own labelled tokens. Private training needs
    it: each row's gradient must depend on that row alone (a mean over the batch's labelled tokens divides by
    a count other rows set), and the head runs over every position, so that each row keeps its own batch index
    for the per-sample gradients."""
    logits = model(batch["input_ids"]).float()
    labels = batch["labels"]
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    labelled = (labels != IGNORE).sum(1)
    return (per_token.sum(1) / labelled.clamp(min=1)).mean(), {}


LANGUAGE_MODELLING = Objective(loss=lm_loss, eval_loss=lm_loss)
SFT = Objective(loss=lambda model, batch: masked_lm_loss(model, batch, "sum"), eval_loss=masked_lm_loss,
                token_sum=True)
PRIVATE_SFT = Objective(loss=per_example_lm_loss, eval_loss=masked_lm_loss)


# ---- distillation -----------------------------------------------------------------------------
def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                  labels: torch.Tensor, teacher_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over trained positions of KL(softmax(teacher / T) || softmax(student / T)).

    With `teacher_ids` (batch, seq, k), `teacher_logits` are the teacher's top-k logits at those ids:
    the teacher distribution is renormalised over its top k and the student is read at the same ids."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher_ids is not None:
        log_q = log_q.gather(-1, teacher_ids)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    keep = (labels != IGNORE).float()
    return (per_position * keep).sum() / keep.sum().clamp(min=1)


def distillation(teacher, alpha: float, temperature: float) -> Objective:
    """`teacher` is a module (run here without gradients) or None when the batch carries cached
    teacher top-k logits (teacher_ids, teacher_logits)."""

    def loss(model, batch):
        logits = model(batch["input_ids"])
        ce = cross_entropy(logits, batch["labels"])
        if teacher is None:
            t_logits, t_ids = batch["teacher_logits"], batch["teacher_ids"]
        else:
            with torch.no_grad():
                t_logits, t_ids = teacher(batch["input_ids"]), None
        kl = kd_divergence(logits, t_logits, temperature, batch["labels"], t_ids)
        return (1 - alpha) * ce + alpha * temperature ** 2 * kl, {"ce": ce.detach(), "kl": kl.detach()}

    return Objective(loss=loss, eval_loss=lm_loss)


# ---- DPO --------------------------------------------------------------------------------------
def reply_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens (the reply), (batch,)."""
    keep = labels != IGNORE
    logits = model(input_ids, select=keep).float()  # (labelled positions, vocab)
    picked = torch.log_softmax(logits, dim=-1).gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(input_ids.shape[0], device=picked.device, dtype=picked.dtype).index_add(0, rows, picked)


def dpo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> tuple[torch.Tensor, Metrics]:
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    return loss, {"reward_chosen": chosen_reward.mean().detach(), "reward_rejected": rejected_reward.mean().detach(),
                  "reward_margin": margin.mean().detach(), "preference_accuracy": (margin > 0).float().mean()}


def dpo(beta: float) -> Objective:
    """Reference log-probs come with the batch (ref_chosen, ref_rejected): the reference is frozen, so
    they are computed once before training (see pocketlm.train.preference)."""

    def loss(model, batch):
        n = batch["chosen_input_ids"].shape[0]
        both = reply_logprobs(model, torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
                              torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
        return dpo_terms(both[:n], both[n:], batch["ref_chosen"], batch["ref_rejected"], beta)

    return Objective(loss=loss, eval_loss=loss)


# ---- federated: FedProx ------------------------------------------------------------------------
def with_proximal_term(objective: Objective, mu: float, model: torch.nn.Module) -> Objective:
    """`objective` plus FedProx's mu / 2 * ||w - w_global||^2 over the trainable weights (Li et al. 2020), anchored
    at their values now (the global model a client starts its round from). The loop scales each call's loss (1 /
    micro-batches, or 1 / the step's labelled tokens for a token-sum objective) and adds the calls up, so each call
    adds the term with the weight that makes the step's total carry it exactly once."""
    pairs = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def loss(model, batch):
        value, metrics = objective.loss(model, batch)
        term = mu / 2 * sum(((p - anchor) ** 2).sum() for p, anchor in pairs)
        weight = (batch["labels"] != IGNORE).sum() if objective.token_sum else 1
        return value + weight * term, {**metrics, "proximal": term.detach()}

    return Objective(loss=loss, eval_loss=objective.eval_loss, token_sum=objective.token_sum)


# ---- mixtures of experts ----------------------------------------------------------------------
def expert_counts(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """How many of the tokens' top-k choices went to each expert, (layers, E), from the routers'
    probabilities (layers, tokens, E): the experts the model ran them through."""
    chosen = torch.topk(probs, top_k, dim=-1).indices.flatten(1)
    return torch.zeros(probs.shape[0], probs.shape[-1], device=probs.device).scatter_add_(
        1, chosen, torch.ones_like(chosen, dtype=torch.float))


def _summed_over_processes(counts: torch.Tensor) -> torch.Tensor:
    counts = counts.clone()
    dist.all_reduce(counts)
    return counts


def with_router_loss(objective: Objective, coef: float, top_k: int, world: int = 1) -> Objective:
    """`objective` plus coef * the load-balancing loss of the routers in the model's forward passes (logged as
    `router_loss`, and the top-k choices each expert got per layer as `expert_counts`). The routers' logits come
    back from each call in a list of its own, so slices of a batch on several threads do not mix them. With a
    token-sum objective the term is weighted by the batch's labelled tokens, as the loop divides the sum by them.

    The loss is E * sum_e share_e * mean_prob_e over a micro-batch's tokens, which is not linear in the tokens:
    the mean of `world` processes' own terms is not the term of their union. So the counts (and a token-sum
    objective's labelled tokens) are summed over the processes first, and each process adds world * its tokens'
    part of the product (the counts carry no gradient), which DDP's average turns into the term of the whole
    micro-batch, its value and its gradient. Under gradient accumulation a micro-batch's backward runs before
    the next one's routing is known, and batch threads run their slices apart: each of those keeps a term of
    its own (as transformers computes one per forward pass)."""

    # a collective runs eagerly, between the compiled forward and the loss; wrapped here rather than at import,
    # since torch.compiler.disable imports torch._dynamo (seconds for every process that imports the loop)
    summed_over_processes = torch.compiler.disable(_summed_over_processes) if world > 1 else None

    def loss(model, batch):
        collected: list = []
        value, metrics = objective.loss(lambda *a, **k: model(*a, router_logits=collected, **k), batch)
        probs = torch.stack([F.softmax(logits.float(), dim=-1) for logits in collected])  # (layers, tokens, E)
        counts = expert_counts(probs, top_k)
        weight = torch.ones((), device=probs.device)
        if objective.token_sum:
            weight = (batch["labels"] != IGNORE).sum().float()
        total = counts
        if world > 1:
            summed = summed_over_processes(torch.cat([counts.flatten(), weight.reshape(1)]))
            total, weight = summed[:-1].view_as(counts), summed[-1] / world
        n = total.sum() / top_k  # layers x tokens, over every process
        router = world * probs.shape[-1] * (total.sum(0) / n * probs.sum((0, 1)) / n).sum()
        return value + coef * weight * router, {**metrics, "router_loss": router.detach(), "expert_counts": counts}

    return Objective(loss=loss, eval_loss=objective.eval_loss, token_sum=objective.token_sum)
