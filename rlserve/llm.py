"""LLM: the offline, in-process API (shaped like vLLM's so it feels familiar)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

from rlserve.config import EngineConfig
from rlserve.engine.engine import Engine
from rlserve.engine.pooling import PoolingParams
from rlserve.outputs import RequestOutput
from rlserve.sampling import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """`LLM(model=None | path | .gguf | preset, **options)`; None serves the default SmolLM2-135M-Instruct.

    `options` are EngineConfig options by name (its fields and those of its cache and scheduler sections:
    `LLM("qwen3-0.6b", dtype="bfloat16", max_total_tokens=4096)`; `rlserve.config.option_names()` lists
    them, and an unknown one is a TypeError that does too). `config=EngineConfig(...)` passes a whole
    config; `model` and `options` then change it."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **options: Any) -> None:
        if model is not None:
            options["model"] = model
        self.config = (config or EngineConfig()).with_options(**options)
        self.engine = Engine(self.config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ---- generation ----
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; results in the order of the prompts."""
        rids = self._submit(prompts, sampling_params)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(rids) > 1:
            from tqdm import tqdm
            bar = tqdm(total=len(rids), desc="generating", unit="req")
        try:
            while len(done) < len(rids):
                for out in self.engine.step(emit_unfinished=False):
                    if out.finished:
                        done[out.request_id] = out
                        if bar:
                            bar.update(1)
        except BaseException:
            for rid in rids:          # leave the engine clean for the next call
                if rid not in done:
                    self.engine.abort(rid)
            raise
        finally:
            if bar:
                bar.close()
        return [done[r] for r in rids]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[RequestOutput]:
        """Yield a cumulative RequestOutput each time a request advances (text grows, or it finishes).
        Stopping the iteration early aborts whatever is still running."""
        rids = self._submit(prompts, sampling_params)
        pending = set(rids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for rid in pending:
                self.engine.abort(rid)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or several; rendered with the tokenizer's chat template."""
        conversations = cast(list[list[Message]], [messages] if messages and isinstance(messages[0], dict)
                             else messages)
        prompts = [self.apply_chat_template(c, add_generation_prompt, **(chat_template_kwargs or {}))
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[Message], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        return tok.apply_chat_template(conversation, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **kwargs)

    # ---- pooling: embeddings and classification (engine/pooling.py) ----
    def embed(self, prompts: Prompt | Sequence[Prompt], pooling: str | None = None, normalize: bool = True,
              dimensions: int | None = None) -> list[list[float]]:
        """One embedding per prompt: the final-norm hidden states pooled (`last` token or `mean`; None: the
        engine's pooling option, else the model's sentence-transformers config, else last), normalised."""
        return self._pool(prompts, PoolingParams("embed", pooling, normalize, dimensions))

    def classify(self, prompts: Prompt | Sequence[Prompt]) -> list[list[float]]:
        """A classification or reward model's scores (its head over the last token), one list per prompt."""
        return self._pool(prompts, PoolingParams("classify"))

    def _pool(self, prompts: Prompt | Sequence[Prompt], params: PoolingParams) -> list[list[float]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [cast(Prompt, prompts)]
        encoded = [self.encode(p) for p in cast(Sequence[Prompt], prompts)]
        if not encoded:
            raise ValueError("no prompts given")
        rids: list[str] = []
        results: dict[str, list[float]] = {}
        try:
            for text, ids in encoded:
                rids.append(self.engine.add_request(ids, prompt=text, pooling=params))
            while len(results) < len(rids):
                for out in self.engine.step(emit_unfinished=False):
                    if out.finished:
                        if out.embedding is None:      # aborted (a pause in abort mode)
                            raise RuntimeError(f"pooling request {out.request_id} was aborted")
                        results[out.request_id] = out.embedding
        finally:
            for rid in rids:
                if rid not in results:
                    self.engine.abort(rid)
        return [results[r] for r in rids]

    # ---- colocated training: lend the engine's memory to the trainer between rollouts ----
    def release_memory(self, tags: tuple[str, ...] | list[str] = ("kv_cache", "weights")) -> None:
        self.engine.release_memory(tags)

    def resume_memory(self, tags: tuple[str, ...] | list[str] = ("kv_cache", "weights")) -> None:
        self.engine.resume_memory(tags)

    def shutdown(self) -> None:
        """Stop the worker ranks of a tensor-parallel engine now (they stop at exit otherwise); another
        tensor-parallel LLM can then start in this process. This one cannot generate afterwards."""
        from rlserve.engine.weights import tp_workers
        workers = tp_workers(self.engine)
        if workers is not None:
            workers.close()

    # ---- helpers ----
    def encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            tok = self.engine.tokenizer
            if tok is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            # Chat-rendered prompts already carry their special tokens.
            return prompt, tok.encode(prompt, add_special_tokens=False)
        return None, list(prompt)

    def _submit(self, prompts, sampling_params) -> list[str]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        encoded = [self.encode(p) for p in prompts]     # validate everything before queueing anything
        rids: list[str] = []
        try:
            for (text, ids), sp in zip(encoded, params):
                rids.append(self.engine.add_request(ids, sp, prompt=text))
        except Exception:
            for rid in rids:
                self.engine.abort(rid)
            raise
        return rids
