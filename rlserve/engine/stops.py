"""When a request stops, and what the caller sees of a request group (RequestOutput)."""
from __future__ import annotations

from dataclasses import dataclass, field

from rlserve.engine.request import Request
from rlserve.outputs import CompletionOutput, RequestOutput

Ending = tuple[str, int | str | None]     # (finish reason, stop reason)


@dataclass
class Group:
    """The n samples of one add_request call."""
    rid: str
    prompt: str | None
    prompt_ids: list[int]
    reqs: list[Request] = field(default_factory=list)


def stop_of(req: Request, token: int, eos_ids: set[int], max_model_len: int) -> Ending | None:
    """Whether req, having just taken `token`, stops: a stop token id, EOS, a stop string (the
    detokenizer takes the token here), or its length limit. The grammar's verdict comes first (see
    Constraints.accept)."""
    p = req.params
    if p.stop_token_ids and token in p.stop_token_ids:
        return "stop", token
    if not p.ignore_eos and token in eos_ids:
        return "stop", None
    detok = req.detokenizer
    if detok is not None:
        detok.append(token)
        if detok.stopped:
            return "stop", detok.stop_string
    if len(req.output_ids) >= req.max_new_tokens or req.num_tokens >= max_model_len:
        return "length", None
    return None


def output_of(group: Group, copy: bool) -> RequestOutput:
    """The group's output now. copy: the output owns copies of the growing token and logprob lists."""
    comps = [CompletionOutput(index=r.index, text=r.detokenizer.text if r.detokenizer else "",
                              token_ids=list(r.output_ids) if copy else r.output_ids,
                              logprobs=(list(r.logprobs) if copy else r.logprobs) if r.logprobs is not None else None,
                              finish_reason=r.finish_reason, stop_reason=r.stop_reason,
                              weight_version_spans=r.weight_version_spans)
             for r in group.reqs]
    first = group.reqs[0]
    return RequestOutput(request_id=group.rid, prompt=group.prompt, prompt_token_ids=group.prompt_ids,
                         outputs=comps, prompt_logprobs=first.prompt_logprobs,
                         cached_tokens=first.cached_tokens, embedding=first.pooled)
