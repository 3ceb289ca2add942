"""FSDP2 in the trainer, on real processes (gloo, world size 2) against one unsharded process in fp32:
the same loss, gradient norm and updated weights after AdamW steps with the batch split across ranks;
gathered full tensors under the unsharded model's names; an exact resume from a sharded checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from rlserve.config import ModelConfig
from rlserve.models.llama import LlamaForCausalLM
from rlserve.net import free_port
from rlserve.rl.logprobs import completion_logprobs

WORLD = 2
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12], [13, 14, 15]]
COMPLETIONS = [[16, 17], [18, 19, 20], [21], [22, 23, 24, 25], [26, 27], [28]]
BATCHES = [(PROMPTS[:4], COMPLETIONS[:4]), (PROMPTS[2:], COMPLETIONS[2:])]
LR, MAX_NORM, BUCKET_BYTES = 1e-2, 0.5, 4096
# k_proj's bias has an exactly zero gradient (it shifts all of a query's scores alike), so what reaches
# AdamW there is rounding noise, which its default eps (1e-8) would turn into full-size steps of either
# sign; a larger eps keeps such noise from deciding the comparison.
ADAM_EPS = 1e-4


def config(tied: bool) -> ModelConfig:
    # vocab and intermediate sizes odd so that ranks hold shards of unequal size
    return ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=67, hidden_size=32, intermediate_size=45,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6,
                       rope_theta=10000.0, max_position=128, tie_word_embeddings=tied, attention_bias=True)


def build(tied: bool) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config(tied))
    model.init_dummy(seed=0, std=0.1)
    model.stack_projections()      # as a served model would be; sharding must undo it
    return model


def nll(model: LlamaForCausalLM, prompts: list[list[int]], completions: list[list[int]], total: int) -> torch.Tensor:
    """Summed completion NLL over these samples divided by the whole batch's token count."""
    return -sum(lp.sum() for lp in completion_logprobs(model, prompts, completions)) / total


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, scale: float) -> float:
    from rlserve.rl.fsdp import clip_grad_norm
    opt.zero_grad(set_to_none=True)
    (loss * scale).backward()
    norm = clip_grad_norm(model, MAX_NORM)
    opt.step()
    return norm


def reference(tied: bool) -> dict[str, object]:
    """One process, whole batches, no sharding."""
    torch.manual_seed(0)
    model = build(tied)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS)
    out: dict[str, object] = {"losses": [], "norms": []}
    for i, (prompts, completions) in enumerate(BATCHES):
        loss = nll(model, prompts, completions, sum(map(len, completions)))
        out["norms"].append(step(model, opt, loss, 1.0))  # type: ignore[attr-defined]
        out["losses"].append(loss.item())  # type: ignore[attr-defined]
        out[f"weights{i}"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _rank_step(model, opt, batch, rank: int) -> tuple[float, float]:
    import torch.distributed as dist
    prompts, completions = batch
    loss = nll(model, prompts[rank::WORLD], completions[rank::WORLD], sum(map(len, completions)))
    # FSDP averages gradients over ranks; each rank's loss is its part of the batch's sum, so scale up.
    norm = step(model, opt, loss, float(WORLD))
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item(), norm


def _worker(rank: int, port: int, tied: bool, out_dir: str) -> None:
    import torch.distributed as dist

    from rlserve.rl.fsdp import init_trainer_mesh, is_sharded, shard_policy
    from rlserve.rl.fsdp_checkpoint import load_sharded, save_sharded
    from rlserve.rl.fsdp_sync import gather_full_tensors_in_buckets

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_trainer_mesh()
        assert mesh.device_type == "cpu" and mesh.size() == WORLD

        def fresh(cpu_offload: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
            torch.manual_seed(0)
            model = shard_policy(build(tied), mesh, cpu_offload=cpu_offload)
            assert is_sharded(model)
            return model, torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS)

        def gathered(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[int]]:
            full: dict[str, torch.Tensor] = {}
            sizes = []
            for bucket in gather_full_tensors_in_buckets(model, BUCKET_BYTES):
                sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
                full |= {name: t.clone() for name, t in bucket}
            return full, sizes

        model, opt = fresh()
        out: dict[str, object] = {"losses": [], "norms": []}
        loss, norm = _rank_step(model, opt, BATCHES[0], rank)
        out["losses"].append(loss)  # type: ignore[attr-defined]
        out["norms"].append(norm)  # type: ignore[attr-defined]
        out["weights0"], out["bucket_sizes"] = gathered(model)
        save_sharded(Path(out_dir) / "ckpt", {"policy": model}, {"policy": opt})
        loss, norm = _rank_step(model, opt, BATCHES[1], rank)
        out["losses"].append(loss)  # type: ignore[attr-defined]
        out["norms"].append(norm)  # type: ignore[attr-defined]
        out["weights1"] = gathered(model)[0]

        # Resume: a fresh sharded model and optimizer (different weights until loaded) take the checkpoint.
        model, opt = fresh()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        load_sharded(Path(out_dir) / "ckpt", {"policy": model}, {"policy": opt})
        out["resumed_loss"], out["resumed_norm"] = _rank_step(model, opt, BATCHES[1], rank)
        out["resumed_weights1"] = gathered(model)[0]

        # CPU offload (on a CPU mesh only the code path, no copies): the same step.
        model, opt = fresh(cpu_offload=True)
        out["offload_loss"] = _rank_step(model, opt, BATCHES[0], rank)[0]
        out["offload_weights0"] = gathered(model)[0]

        # Mixed precision: bf16 compute over fp32 shards, close to the fp32 loss.
        torch.manual_seed(0)
        mp_model = shard_policy(build(tied), mesh, mixed_precision=True)
        prompts, completions = BATCHES[0]
        with torch.no_grad():
            mp_loss = nll(mp_model, prompts[rank::WORLD], completions[rank::WORLD], sum(map(len, completions)))
        dist.all_reduce(mp_loss)
        out["mp_loss"] = mp_loss.item()
        mp_model.reshard()      # type: ignore[operator]  # an FSDPModule now; the root keeps its gathered weights
        out["mp_dtypes"] = {p.dtype for p in mp_model.parameters()}
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Done and saved: skip the interpreter's teardown, where gloo's threads have (rarely) aborted rank 0
    # with SIGABRT after everything above had succeeded.
    os._exit(0)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fsdp_matches_one_process_and_resumes_exactly(tmp_path, tied):
    ref = reference(tied)
    mp.spawn(_worker, args=(free_port(), tied, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    names = [n for n, _ in LlamaForCausalLM(config(tied)).named_parameters()]
    for got in ranks:
        assert got["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert got["norms"] == pytest.approx(ref["norms"], abs=1e-5)
        assert got["norms"][0] > MAX_NORM          # so that clipping took part
        for i in (0, 1):
            weights = got[f"weights{i}"]
            assert list(weights) == names          # the engine's parameter names, in its order
            for name in names:
                torch.testing.assert_close(weights[name], ref[f"weights{i}"][name], atol=1e-5, rtol=0)
        # several buckets, each within the budget unless a single tensor is larger
        assert len(got["bucket_sizes"]) > 1
        largest = max(p.numel() * 4 for p in ref["weights0"].values())
        assert max(got["bucket_sizes"]) <= max(BUCKET_BYTES, largest)
        # the resumed step is the uninterrupted one
        assert got["resumed_loss"] == pytest.approx(got["losses"][1], abs=1e-6)
        assert got["resumed_norm"] == pytest.approx(got["norms"][1], abs=1e-6)
        for name in names:
            torch.testing.assert_close(got["resumed_weights1"][name], got["weights1"][name], atol=1e-6, rtol=0)
        assert got["offload_loss"] == pytest.approx(ref["losses"][0], abs=1e-5)
        for name in names:
            torch.testing.assert_close(got["offload_weights0"][name], ref["weights0"][name], atol=1e-5, rtol=0)
        assert got["mp_dtypes"] == {torch.float32}
        assert got["mp_loss"] == pytest.approx(ref["losses"][0], abs=5e-2)
        assert got["mp_loss"] != ref["losses"][0]   # bf16 compute did happen
