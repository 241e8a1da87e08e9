"""The router load-balancing loss of mixture-of-experts models, and the expert load it is meant to even out.

Without it, a router trained on the language-model loss alone tends to send most tokens to a few experts
(the rich get richer: an expert that gets tokens gets gradient and gets better), leaving the others idle.
Qwen2-MoE adds Switch Transformer's auxiliary loss (Fedus et al. 2022, eq. 4-6) to the training loss, weighted
by ``router_aux_loss_coef`` (0.001 in Qwen2-MoE's config). ``load_balancing_loss`` is that loss exactly as
transformers' ``Qwen2MoeForCausalLM`` computes it; ``expert_load`` is what we log next to it.

``RoutedTokenLogProbs`` is ``TokenLogProbs`` that also returns the router logits of every MoE layer (an
empty tuple for a dense model), so one training loop serves both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignment.data import IGNORE
from alignment.logprobs import TokenLogProbs, backbone_and_head, chunked_logprobs


def is_moe(config) -> bool:
    """A model whose forward can return router logits (Qwen2-MoE, Mixtral, ...)."""
    return hasattr(config, "output_router_logits")


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Qwen2-MoE's load-balancing loss over the router logits of L layers, each (T, E).

    With the logits of all layers stacked as one list of L x T rows, p = softmax(logits) per row:

        f_e = (number of rows whose top-k experts include e) / (L x T)    (sums to k over e)
        P_e = mean over the L x T rows of p_e                             (sums to 1 over e)
        loss = E x sum_e f_e x P_e

    Its minimum, k, is reached when routing is uniform (f_e = k / E, P_e = 1 / E). As in transformers,
    expert e of every layer shares one f_e and one P_e (the layers are pooled, not balanced one by one).
    f_e carries no gradient (top-k is piecewise constant); the gradient flows through P_e.
    """
    probs = torch.cat([logits.float().softmax(-1) for logits in router_logits])  # (L x T, E)
    n_experts = probs.shape[-1]
    chosen = probs.topk(top_k, dim=-1).indices  # (L x T, k)
    f = (
        torch.zeros(n_experts, device=probs.device).index_add_(
            0, chosen.flatten(), torch.ones(chosen.numel(), device=probs.device)
        )
        / probs.shape[0]
    )
    return n_experts * (f * probs.mean(0)).sum()


@torch.no_grad()
def expert_load(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """(L, E) counts: how many tokens each layer's router sent to each expert (its top-k choices)."""
    counts = []
    for logits in router_logits:
        chosen = logits.topk(top_k, dim=-1).indices.flatten()
        counts.append(torch.bincount(chosen, minlength=logits.shape[-1]).float())
    return torch.stack(counts)


def load_metrics(counts: torch.Tensor) -> dict[str, float]:
    """The load of expert e in layer l is its share of that layer's routed slots times E: 1 when balanced.

    ``moe/load_max``: the most loaded (layer, expert), at most E / k; ``moe/load_min``: the least loaded, 0 for an
    expert that got no token.
    """
    load = counts / counts.sum(-1, keepdim=True) * counts.shape[-1]
    return {"moe/load_max": load.max().item(), "moe/load_min": load.min().item()}


class RouterBalance:
    """The load-balancing term of one SFT run: ``coef x load_balancing_loss`` per micro-batch, and its metrics.

    A dense model gets a balance that adds nothing and logs nothing, so the training loop never branches on
    the architecture. ``coef: None`` takes the model's own ``router_aux_loss_coef``; a coefficient set for a
    dense model is an error (there is no router to balance).
    """

    def __init__(self, model_config, coef: float | None):
        self.enabled = is_moe(model_config)
        if not self.enabled and coef:
            raise ValueError(
                f"model.router_aux_loss_coef is {coef} but {model_config.model_type} is not a mixture-of-experts "
                "model: there is no router to balance; leave it null"
            )
        self.coef = (model_config.router_aux_loss_coef if coef is None else coef) if self.enabled else 0.0
        self.top_k = model_config.num_experts_per_tok if self.enabled else 0
        if self.enabled:
            model_config.router_aux_loss_coef = self.coef  # the saved config records what was trained with
        self.reset()

    def reset(self) -> None:
        self._aux_sum, self._weight, self._counts = 0.0, 0.0, None

    def loss(self, router_logits: Sequence[torch.Tensor], share: float) -> torch.Tensor | float:
        """``coef x loss`` of one micro-batch, times its ``share`` of the global batch; 0.0 for a dense model.

        Each micro-batch's loss is its own (the f_e x P_e product does not add up across micro-batches), so
        1 process x 2 micro-batches and 2 x 1 agree on the NLL exactly and on this term only in expectation.
        """
        if not router_logits:
            return 0.0
        aux = load_balancing_loss(router_logits, self.top_k)
        self._aux_sum += aux.item() * share
        self._weight += share
        counts = expert_load(router_logits, self.top_k)
        self._counts = counts if self._counts is None else self._counts + counts
        return self.coef * aux * share

    def metrics(self, accelerator) -> dict[str, float]:
        """``aux_loss`` (TRL's name; without the coefficient) and the expert load of the global batch."""
        if not self.enabled or self._counts is None:
            return {}
        aux = torch.tensor([self._aux_sum, self._weight], device=accelerator.device)
        aux = accelerator.reduce(aux, reduction="sum")
        counts = accelerator.reduce(self._counts.to(accelerator.device), reduction="sum")
        self.reset()
        return {"aux_loss": (aux[0] / aux[1]).item(), **load_metrics(counts)}


class RoutedTokenLogProbs(TokenLogProbs):
    """forward(input_ids, position_ids, labels) -> (log-probs of the labelled tokens (N,), router logits).

    The router logits are one (T, E) tensor per MoE layer, in order; an empty tuple for a dense model.
    """

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        backbone, head = backbone_and_head(self.model)
        routed = {"output_router_logits": True} if is_moe(backbone.config) else {}
        out = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False, **routed)
        mask = labels != IGNORE  # (1, T)
        logps = chunked_logprobs(out.last_hidden_state[mask], head, labels[mask], self.chunk_size)
        return logps, tuple(getattr(out, "router_logits", None) or ())
