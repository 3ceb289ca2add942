"""Advantage estimators and policy/value losses for PPO- and GRPO-family training.

Everything here is a small pure function over torch tensors. Token-level tensors are padded
``[B, T]`` with a ``mask`` of the same shape that is 1 on response tokens and 0 elsewhere
(prompt or padding). Sequence-level tensors are ``[B]`` (or ``[N]``, with ``N = groups * group_size``
and the samples of one prompt stored next to each other).

Advantage estimators run without autograd: advantages are constants of the policy update.
"""
from __future__ import annotations

from typing import Literal

import torch

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLKind = Literal["k1", "k2", "k3"]


# ----------------------------------------------------------------------------- masked helpers

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """mean over masked entries: sum(x·m) / sum(m), over all entries or along ``dim``.

    An empty mask gives 0 rather than NaN (the numerator is 0 too).
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance over masked entries: sum(m·(x − μ)²) / sum(m)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """Whiten over the masked entries: (x − μ) / sqrt(σ² + eps), μ and σ² (population) over the mask.

    With ``shift_mean=False`` only the scale changes: x / sqrt(σ² + eps). Unmasked entries become 0.
    """
    mean = masked_mean(x, mask)
    out = (x - mean) if shift_mean else x
    out = out * torch.rsqrt(masked_var(x, mask) + eps)
    return out * mask.to(x.dtype)


def last_token_onehot(mask: torch.Tensor) -> torch.Tensor:
    """One-hot [B, T] of each row's last masked position (all zeros for an empty row)."""
    m = mask.to(torch.long)
    return ((m.cumsum(-1) == m.sum(-1, keepdim=True)) & (m == 1)).float()


def seq_to_token_rewards(seq_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place a sequence reward r_i [B] on the last response token of row i → [B, T]."""
    onehot = last_token_onehot(mask).to(seq_rewards.dtype)
    return onehot * seq_rewards.unsqueeze(-1)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or x.numel() % group_size != 0:
        raise ValueError(f"{x.numel()} rewards do not split into groups of {group_size}")
    return x.reshape(-1, group_size)


# ----------------------------------------------------------------------------- advantages

@torch.no_grad()
def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages per sequence: A_i = (r_i − mean_g(r)) / (std_g(r) + eps).

    ``std_g`` is the *unbiased* (Bessel-corrected, divide by G − 1) standard deviation of the group,
    as in the GRPO paper's reference implementations. ``normalize_std=False`` gives the Dr. GRPO form
    A_i = r_i − mean_g(r). A group of one has advantage 0.
    """
    g = _grouped(rewards.float(), group_size)
    adv = g - g.mean(-1, keepdim=True)
    if normalize_std and group_size > 1:
        adv = adv / (g.std(-1, unbiased=True, keepdim=True) + eps)
    return adv.reshape(rewards.shape)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (leave-one-out) advantages: A_i = r_i − 1/(G − 1) · Σ_{j≠i} r_j.

    Equivalently A_i = G/(G − 1) · (r_i − mean_g(r)).
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least two samples per group")
    g = _grouped(rewards.float(), group_size)
    others_mean = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return (g - others_mean).reshape(rewards.shape)


@torch.no_grad()
def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = m_t · (r_t + γ · G_{t'}), computed right to left, G_T = 0, where t' is the next masked
    position: unmasked positions inside a response (a multi-turn sample's tool results) are skipped, not
    steps, so a reward at the end still reaches the earlier turns."""
    m = mask.to(token_rewards.dtype)
    out = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        running = torch.where(m[:, t] > 0, token_rewards[:, t] + gamma * running, running)
        out[:, t] = running * m[:, t]
    return out


@torch.no_grad()
def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            baseline: bool = False, group_size: int | None = None,
                            eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++ token advantages.

    ``rewards`` is either token-level [B, T] or sequence-level [B] (placed on the last response token).
    Without ``baseline``:

        G_t = Σ_{k≥t} γ^{k−t} r_k,    A = whiten(G) over all masked tokens of the batch,

    whiten being (G − μ) / sqrt(σ² + eps) with population σ².

    With ``baseline`` (reinforce++-baseline), each sequence's total reward R_i = Σ_t r_{i,t} — *everything*
    on its tokens, so under kl.mode=reward the verifier score minus the summed KL penalty — is reduced by
    the mean b_g of R over its group of ``group_size`` samples (over the whole batch when ``group_size``
    is None). b_g is subtracted once, at the last response token, before the returns are taken. With
    γ = 1 token t of sample i therefore gets, before whitening,

        G_{i,t} = score_i − b_g − Σ_{k≥t} coef · kl_{i,k}     (b_g = mean_j (score_j − Σ_k coef · kl_{j,k}))

    i.e. the KL penalty *to go* from t, not the whole sequence's: only without a per-token penalty does
    every token see the same R_i − b_g. (verl broadcasts R_i − b_g to every token instead; OpenRLHF takes
    b_g over the scores alone and adds the KL afterwards.) With γ < 1 the baseline is discounted like the
    score, by γ^{L−1−t} at token t of a completion of length L.
    """
    mask_f = mask.to(torch.float32)
    token_rewards = rewards.float()
    if token_rewards.dim() == 1:
        token_rewards = seq_to_token_rewards(token_rewards, mask_f)
    token_rewards = token_rewards * mask_f
    if baseline:
        totals = token_rewards.sum(-1)
        if group_size is None:
            b = totals.mean().expand_as(totals)
        else:
            g = _grouped(totals, group_size)
            b = g.mean(-1, keepdim=True).expand_as(g).reshape(totals.shape)
        token_rewards = token_rewards - seq_to_token_rewards(b, mask_f)
    returns = discounted_returns(token_rewards, mask_f, gamma)
    return masked_whiten(returns, mask_f, shift_mean=True, eps=eps)


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation → (advantages, returns), both [B, T] and zero off the mask.

        δ_t = r_t + γ · m_{t+1} · V_{t+1} − V_t
        A_t = δ_t + γλ · m_{t+1} · A_{t+1}
        R_t = A_t + V_t

    The m_{t+1} factor stops bootstrapping past the last response token, whatever the value head
    says at padding positions. t+1 is the next *masked* position: unmasked positions inside a response
    (a multi-turn sample's tool results) are skipped, so the turns before them still bootstrap from the
    turns after.
    """
    m = mask.to(values.dtype)
    B, T = values.shape
    adv = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    next_mask = torch.zeros_like(next_value)
    for t in range(T - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_mask * next_value - values[:, t]
        a = (delta + gamma * lam * next_mask * next_adv) * m[:, t]
        adv[:, t] = a
        on = m[:, t] > 0
        next_value = torch.where(on, values[:, t], next_value)
        next_adv = torch.where(on, a, next_adv)
        next_mask = torch.where(on, m[:, t], next_mask)
    returns = (adv + values) * m
    return adv, returns


@torch.no_grad()
def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: bool [num_groups], True where the group's rewards are not all equal.

    A group whose rewards all agree has zero advantage everywhere and contributes no gradient.
    """
    g = _grouped(rewards, group_size)
    return (g != g[:, :1]).any(-1)


# ----------------------------------------------------------------------------- KL and entropy

def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k3",
                log_ratio_clamp: float | None = None, k3_clamp: float | None = None) -> torch.Tensor:
    """Per-token estimators of KL(π ‖ π_ref) from samples of π (Schulman's k1, k2, k3).

        k1 = logp − ref_logp
        k2 = ½ · (logp − ref_logp)²
        k3 = exp(ref_logp − logp) − (ref_logp − logp) − 1      (unbiased and ≥ 0)

    Optional guards for k3 (both off by default), as verl's low_var_kl does with 20 and 10: the log
    ratio is clamped to ±``log_ratio_clamp`` before the exp, and k3 itself to ±``k3_clamp``. Where a
    clamp is active its gradient is 0.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        if log_ratio_clamp is not None:
            log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
        k3 = torch.expm1(-log_ratio) + log_ratio
        return k3 if k3_clamp is None else k3.clamp(-k3_clamp, k3_clamp)
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1, k2 or k3")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v, logits [B, T, V] → [B, T]."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


# ----------------------------------------------------------------------------- losses

def aggregate(loss_tokens: torch.Tensor, mask: torch.Tensor, mode: AggMode = "token-mean",
              max_len: int | None = None) -> torch.Tensor:
    """Reduce per-token losses [B, T] to a scalar.

        token-mean               (DAPO)     Σ_{i,t} m·ℓ / Σ_{i,t} m
        seq-mean-token-mean      (GRPO)     1/B · Σ_i (Σ_t m·ℓ / Σ_t m)
        seq-mean-token-sum-norm  (Dr. GRPO) 1/B · Σ_i (Σ_t m·ℓ / L),  L = ``max_len`` (default T)

    The last form divides by a constant, so a sequence's weight does not depend on its length.
    """
    m = mask.to(loss_tokens.dtype)
    if mode == "token-mean":
        return masked_mean(loss_tokens, m)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss_tokens, m, dim=-1).mean()
    if mode == "seq-mean-token-sum-norm":
        length = loss_tokens.shape[-1] if max_len is None else max_len
        return ((loss_tokens * m).sum(-1) / length).mean()
    raise ValueError(f"unknown aggregation {mode!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, agg: AggMode = "token-mean",
                max_len: int | None = None, tis_weights: torch.Tensor | None = None,
                log_ratio_clamp: float | None = None, dual_clip: float | None = None,
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with separate lower/upper clip ranges (clip-higher when they differ).

        r_t  = exp(logp_t − old_logp_t)
        ℓ_t  = −min(r_t · A_t, clip(r_t, 1 − clip_low, 1 + clip_high) · A_t)
        loss = aggregate(w_t · ℓ_t)

    ``advantages`` is [B, T] or [B] (one value per sequence, broadcast over tokens). ``tis_weights``
    are optional truncated importance-sampling weights w_t (e.g. min(π_old / π_rollout, C)) for the
    mismatch between the rollout engine and the trainer; they are treated as constants.

    Options, off by default: ``log_ratio_clamp`` clamps logp − old_logp to ±value before the exp (verl
    uses 20, against overflow); ``dual_clip`` = c > 1 is dual-clip PPO (Ye et al. 2020): where A_t < 0
    the token loss is min(ℓ_t, −c · A_t), bounding how far a very large ratio can push a bad token.
    Metrics: clip_fraction (tokens where the clipped term is the active one), approx_kl (k3 of the
    new policy against the old), ratio_mean, and with dual-clip dual_clip_fraction.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logp.dtype)
    log_ratio = logp - old_logp
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_tokens = torch.maximum(unclipped, clipped)
    dual = None
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss_tokens > bound)
        loss_tokens = torch.where(advantages < 0, torch.minimum(loss_tokens, bound), loss_tokens)
    if tis_weights is not None:
        loss_tokens = loss_tokens * tis_weights.detach().to(loss_tokens.dtype)
    loss = aggregate(loss_tokens, mask, agg, max_len)
    with torch.no_grad():
        m = mask.to(logp.dtype)
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).to(logp.dtype), m).item(),
            "approx_kl": masked_mean(kl_estimate(logp, old_logp, "k3"), m).item(),
            "ratio_mean": masked_mean(ratio, m).item(),
        }
        if dual is not None:
            metrics["dual_clip_fraction"] = masked_mean(dual.to(logp.dtype), m).item()
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> torch.Tensor:
    """Clipped value loss, masked mean over tokens of

        ½ · max((V − R)², (V_clip − R)²),   V_clip = V_old + clip(V − V_old, −clip, clip)
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return masked_mean(per_token, mask)
