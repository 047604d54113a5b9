"""A plain-PyTorch reference of Cartesia's Llamba, for parity tests (not a test module).

Llamba (Bick et al. 2025, arXiv 2502.14458) is Llama-3 distilled into Mamba-2-like mixers; it is
MAR's teacher. Its published PyTorch code is cartesia-ai/edge, ``cartesia-pytorch/cartesia_pytorch/
Llamba/`` (``llamba.py``, ``configuration_llamba.py``, ``modeling_llama.py``), whose mixer is
``DiscreteMamba2`` from goombalab/phi-mamba (``modules/mixers/discrete_mamba2.py``). That code needs
mamba_ssm's Triton kernels, and the ``cartesia-pytorch`` wheel on the package registry is empty (it
ships no module), so it cannot be installed and run here. This file is written from reading that
source: the same module tree and parameter names (so ``state_dict()`` has Cartesia's tensor names),
the mixer as a plain per-token recurrence instead of the chunked Triton scan.

Layout, in Cartesia's names (``backbone.`` prefix, ``lm_head`` only when untied)::

    embedding.weight                           [V_pad, d]   vocab padded to pad_vocab_size_multiple
    layers.{i}.input_layernorm.weight          [d]          RMSNorm, eps hard-coded 1e-5
    layers.{i}.mixer.in_proj.weight            [2·E + 2·G·N + H, d]   rows split [x | B | C | z | Δ]
    layers.{i}.mixer.in_proj.bias              (ssm_cfg bias=True only)
    layers.{i}.mixer.z_bias                    [E]          only when ssm_cfg bias=False
    layers.{i}.mixer.conv1d.weight             [E + 2·G·N, 1, d_conv]   depthwise, causal
    layers.{i}.mixer.conv1d.bias               (conv_bias=True, the default)
    layers.{i}.mixer.D                         [H]
    layers.{i}.mixer.out_proj.weight (+ bias)  [d, E]
    layers.{i}.post_attention_layernorm.weight [d]          RMSNorm, eps hard-coded 1e-5
    layers.{i}.mlp.{gate,up}_proj.weight       [F, d]       Llama MLP: down(act(gate·h) ⊙ up·h)
    layers.{i}.mlp.down_proj.weight            [d, F]
    final_layernorm.weight                     [d]          RMSNorm, eps = norm_epsilon

with E = expand·d (d_inner), H = n_v_heads (head dim P = E / H), G = n_qk_heads, N = d_state.

The mixer, per v-head h with its B/C group g = h // (H / G), for tokens t = 0 … L−1::

    [x̃ | B | C] = act(causal_conv([x | B | C]))     act: identity by default ("activation": "silu")
    δ_t = softplus(Δ_t[h])                           the in_proj's last H rows; no dt_bias
    S_t = exp(−δ_t) · S_{t−1} + δ_t · (x̃_t / δ_t) ⊗ B_t[g]     A = −1; the scan's input is x̃/δ
    y_t = S_t · C_t[g] + D[h] · x̃_t                  D multiplies the undivided x̃
    out = out_proj(y ⊙ SiLU(z + z_bias))             no norm inside the mixer

(the δ · (x̃/δ) is written out because that is what the source computes: it hands x̃/δ to
mamba_ssm's scan, whose input term is δ·x; "A_log" in the source is this Δ channel, not a
parameter). Block: h += mixer(input_layernorm(h)); h += mlp(post_attention_layernorm(h)).
``hidden_states`` as Cartesia returns them: index 0 is the embedding and index j the input of layer
j (its pre-norm residual stream), index n_layer the last layer's output before the final norm.

Config keys are Cartesia's (``LlambaConfig``): vocab_size, d_model, n_layer, tie_embeddings (default
False; Hugging Face's ``tie_word_embeddings`` is never read), pad_vocab_size_multiple (8),
lm_head_bias (False), norm_epsilon (1e-5), mlp_cfg, ssm_cfg. A given ``ssm_cfg``/``mlp_cfg``
replaces the default dict wholesale; missing ssm keys then take DiscreteMamba2's argument defaults,
and mlp_cfg must name intermediate_size, bias and act_fn (LlamaMLP has no defaults).

Two deliberate differences from the source, neither of which changes float32 results: RMSNorm
computes in float32 *or wider* (the source always casts to float32, which would cap a float64
reference at float32 precision), and logits keep the model's dtype (the source casts to float32).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# LlambaConfig's defaults, and DiscreteMamba2's argument defaults for keys a given ssm_cfg omits.
SSM_CFG_DEFAULT = {
    "d_state": 64,
    "n_v_heads": 32,
    "n_qk_heads": 32,
    "expand": 1,
    "chunk_size": 128,
    "activation": "identity",
    "bias": False,
}
SSM_ARG_DEFAULTS = {
    "d_state": 64,
    "n_qk_heads": 32,
    "n_v_heads": 32,
    "d_conv": 4,
    "expand": 1,
    "activation": "identity",
    "bias": False,
    "conv_bias": True,
    "chunk_size": 128,
}
MLP_CFG_DEFAULT = {"intermediate_size": 14336, "bias": False, "act_fn": "silu"}
BLOCK_NORM_EPS = 1e-5  # hard-coded for both block norms in Cartesia's Block

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Cartesia's config with its defaults filled in, plus ``vocab_size_padded``."""
    for key in ("vocab_size", "d_model"):
        if key not in config:
            raise ValueError(f"Llamba config: missing required key {key!r}")
    out = {
        "tie_embeddings": False,
        "pad_vocab_size_multiple": 8,
        "lm_head_bias": False,
        "n_layer": 32,
        "resid_dropout": 0.0,
        "norm_epsilon": 1e-5,
        **dict(config),
    }
    ssm = dict(config.get("ssm_cfg") or SSM_CFG_DEFAULT)
    out["ssm_cfg"] = {**SSM_ARG_DEFAULTS, **ssm}
    mlp = dict(config.get("mlp_cfg") or MLP_CFG_DEFAULT)
    missing = [k for k in ("intermediate_size", "bias", "act_fn") if k not in mlp]
    if missing:
        raise ValueError(f"Llamba mlp_cfg {mlp} lacks {missing} (LlamaMLP has no defaults)")
    out["mlp_cfg"] = mlp
    vocab, multiple = int(out["vocab_size"]), int(out["pad_vocab_size_multiple"])
    out["vocab_size_padded"] = multiple * math.ceil(vocab / multiple)
    return out


def tiny_llamba_config(**overrides: Any) -> dict[str, Any]:
    """A small Llamba config in Cartesia's keys (unpadded vocabulary, B/C groups < v-heads)."""
    config: dict[str, Any] = {
        "model_type": "llamba",
        "vocab_size": 61,  # padded to 64 in the tensors, as Hub configs may hold the unpadded size
        "d_model": 32,
        "n_layer": 2,
        "tie_embeddings": False,
        "pad_vocab_size_multiple": 8,
        "lm_head_bias": False,
        "norm_epsilon": 1e-5,
        "mlp_cfg": {"intermediate_size": 48, "bias": False, "act_fn": "silu"},
        "ssm_cfg": {
            "d_state": 8,
            "n_v_heads": 4,
            "n_qk_heads": 2,
            "expand": 2,
            "d_conv": 4,
            "chunk_size": 16,
            "activation": "identity",
            "bias": False,
        },
    }
    config.update(overrides)
    return config


class RMSNorm(nn.Module):
    """Llama's RMSNorm: w · x / sqrt(mean(x²) + eps), computed in float32 (or float64)."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, h: Tensor) -> Tensor:
        wide = torch.promote_types(h.dtype, torch.float32)
        x = h.to(wide)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(h.dtype)


class LlamaMLP(nn.Module):
    def __init__(self, d: int, intermediate_size: int, bias: bool, act_fn: str) -> None:
        super().__init__()
        if act_fn not in _ACTIVATIONS:
            raise ValueError(
                f"Llamba mlp_cfg act_fn={act_fn!r}: expected one of {sorted(_ACTIVATIONS)}"
            )
        self.gate_proj = nn.Linear(d, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(d, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, d, bias=bias)
        self.act = _ACTIVATIONS[act_fn]

    def forward(self, h: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))


def discrete_mamba2_scan(
    x: Tensor, delta: Tensor, B: Tensor, C: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The DiscreteMamba2 scan as a recurrence, one token at a time (D not included).

    x [b, L, H, P] (the conv output, undivided), delta [b, L, H] (the raw Δ channel),
    B, C [b, L, G, N]; state [b, H, P, N] or None. Returns y [b, L, H, P] and the final state.
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    group = torch.arange(H, device=x.device) // (H // G)
    Bh, Ch = B[:, :, group], C[:, :, group]  # v-head h reads B/C group h // (H / G)
    dt = F.softplus(delta)
    u = x / dt.unsqueeze(-1)  # what the source hands the scan
    S = x.new_zeros(b, H, P, N) if state is None else state
    ys = []
    for t in range(L):
        decay = torch.exp(-dt[:, t])[..., None, None]
        S = decay * S + (dt[:, t, :, None] * u[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((S * Ch[:, t, :, None, :]).sum(-1))
    return torch.stack(ys, dim=1), S


def discrete_mamba2_scan_chunked(
    x: Tensor, delta: Tensor, B: Tensor, C: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """The same scan in the parallel (SSD) form: quadratic inside chunks, state carried across.

    Written independently of ``discrete_mamba2_scan`` so each checks the other. Within a chunk,
    y_t = Σ_{s≤t} exp(−(c_t − c_s)) (C_t·B_s) δ_s u_s + exp(−c_t) C_t·S_in, with c the running
    sum of δ from the chunk's start; the chunk's final state is
    exp(−c_end) S_in + Σ_s exp(−(c_end − c_s)) δ_s u_s ⊗ B_s.
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    group = torch.arange(H, device=x.device) // (H // G)
    Bh, Ch = B[:, :, group], C[:, :, group]
    dt = F.softplus(delta)
    v = dt.unsqueeze(-1) * (x / dt.unsqueeze(-1))  # δ·u, as the scan's input term
    S = x.new_zeros(b, H, P, N)
    ys = []
    for start in range(0, L, chunk):
        sl = slice(start, min(start + chunk, L))
        c = torch.cumsum(dt[:, sl], dim=1)  # [b, l, H]
        diff = c[:, :, None, :] - c[:, None, :, :]  # [b, t, s, H]: c_t − c_s
        n = c.shape[1]
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device))
        decay = torch.where(causal[None, :, :, None], torch.exp(-diff.clamp(min=0)), 0.0)
        scores = torch.einsum("bthn,bshn->btsh", Ch[:, sl], Bh[:, sl]) * decay
        y = torch.einsum("btsh,bshp->bthp", scores, v[:, sl])
        y = y + torch.einsum("bthn,bhpn->bthp", Ch[:, sl], S) * torch.exp(-c)[..., None]
        ys.append(y)
        to_end = torch.exp(-(c[:, -1:] - c))  # [b, l, H]
        S = torch.exp(-c[:, -1])[..., None, None] * S + torch.einsum(
            "bsh,bshp,bshn->bhpn", to_end, v[:, sl], Bh[:, sl]
        )
    return torch.cat(ys, dim=1), S


class DiscreteMamba2(nn.Module):
    """Cartesia's / phi-mamba's DiscreteMamba2 mixer, as a plain recurrence."""

    def __init__(self, d_model: int, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.d_state, self.d_conv = int(cfg["d_state"]), int(cfg["d_conv"])
        self.d_inner = int(cfg["expand"]) * d_model
        self.n_v_heads, self.n_qk_heads = int(cfg["n_v_heads"]), int(cfg["n_qk_heads"])
        if self.d_inner % self.n_v_heads or self.n_v_heads % self.n_qk_heads:
            raise ValueError(
                f"Llamba ssm_cfg: d_inner {self.d_inner} must split into n_v_heads "
                f"{self.n_v_heads}, which must be a multiple of n_qk_heads {self.n_qk_heads}"
            )
        self.headdim = self.d_inner // self.n_v_heads
        if cfg["activation"] == "identity":
            self.act = nn.Identity()
        elif cfg["activation"] in ("silu", "swish"):
            self.act = nn.SiLU()
        else:
            raise ValueError(
                f"Llamba ssm_cfg activation={cfg['activation']!r}: expected identity or silu"
            )
        bias = bool(cfg["bias"])
        self.conv_dim = self.d_inner + 2 * self.n_qk_heads * self.d_state
        self.in_proj = nn.Linear(d_model, self.conv_dim + self.d_inner + self.n_v_heads, bias=bias)
        if not bias:  # the source keeps a z_bias exactly when the projections have none
            self.z_bias = nn.Parameter(torch.zeros(self.d_inner))
        else:
            self.z_bias = None
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            self.d_conv,
            groups=self.conv_dim,
            padding=self.d_conv - 1,
            bias=bool(cfg["conv_bias"]),
        )
        self.D = nn.Parameter(torch.ones(self.n_v_heads))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _split(self, proj: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.split(proj, [self.conv_dim, self.d_inner, self.n_v_heads], dim=-1)

    def _heads(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, B, C = torch.split(
            xBC, [self.d_inner, self.n_qk_heads * self.d_state, self.n_qk_heads * self.d_state], -1
        )
        lead = x.shape[:-1]
        x = x.reshape(*lead, self.n_v_heads, self.headdim)  # head-major: channel h·P + p
        B = B.reshape(*lead, self.n_qk_heads, self.d_state)
        C = C.reshape(*lead, self.n_qk_heads, self.d_state)
        return x, B, C

    def _out(self, y: Tensor, x: Tensor, z: Tensor) -> Tensor:
        y = y + self.D[:, None] * x
        y = y.reshape(*y.shape[:-2], self.d_inner)
        gate = z if self.z_bias is None else z + self.z_bias
        return self.out_proj(y * F.silu(gate))

    def forward(self, u: Tensor) -> Tensor:
        L = u.shape[1]
        xBC, z, delta = self._split(self.in_proj(u))
        # conv1d pads d_conv − 1 on both sides; the first L outputs are the causal ones, the last
        # tap (weight[..., -1]) on the current token
        xBC = self.act(self.conv1d(xBC.transpose(1, 2))[..., :L].transpose(1, 2))
        x, B, C = self._heads(xBC)
        y, _ = discrete_mamba2_scan(x, delta, B, C)
        return self._out(y, x, z)

    def init_state(self, batch: int, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        dtype = dtype or self.in_proj.weight.dtype
        dev = self.in_proj.weight.device
        return {
            "conv": torch.zeros(batch, self.conv_dim, self.d_conv, dtype=dtype, device=dev),
            "ssm": torch.zeros(
                batch, self.n_v_heads, self.headdim, self.d_state, dtype=dtype, device=dev
            ),
        }

    def step(self, u: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One token u [b, d]; the conv state holds the last d_conv conv inputs, newest last."""
        xBC, z, delta = self._split(self.in_proj(u))
        conv = torch.cat([state["conv"][..., 1:], xBC[..., None]], dim=-1)
        xBC = (conv * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        x, B, C = self._heads(self.act(xBC))
        y, ssm = discrete_mamba2_scan(
            x[:, None], delta[:, None], B[:, None], C[:, None], state["ssm"]
        )
        return self._out(y[:, 0], x, z), {"conv": conv, "ssm": ssm}


class Block(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        d = int(cfg["d_model"])
        self.mixer = DiscreteMamba2(d, cfg["ssm_cfg"])
        self.input_layernorm = RMSNorm(d, BLOCK_NORM_EPS)
        self.post_attention_layernorm = RMSNorm(d, BLOCK_NORM_EPS)
        mlp = cfg["mlp_cfg"]
        self.mlp = LlamaMLP(d, int(mlp["intermediate_size"]), bool(mlp["bias"]), mlp["act_fn"])

    def forward(self, h: Tensor) -> Tensor:
        h = self.mixer(self.input_layernorm(h)).to(h.dtype) + h
        return h + self.mlp(self.post_attention_layernorm(h))

    def step(self, h: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        out, state = self.mixer.step(self.input_layernorm(h), state)
        h = out.to(h.dtype) + h
        return h + self.mlp(self.post_attention_layernorm(h)), state


class Backbone(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        d = int(cfg["d_model"])
        self.embedding = nn.Embedding(int(cfg["vocab_size_padded"]), d)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(int(cfg["n_layer"])))
        self.final_layernorm = RMSNorm(d, float(cfg["norm_epsilon"]))


class LlambaReference(nn.Module):
    """Cartesia's ``LlambaLMHeadModel`` without mamba_ssm: ``state_dict()`` uses its names."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = resolve_config(config)
        self.backbone = Backbone(self.config)
        self.tied = bool(self.config["tie_embeddings"])
        if not self.tied:
            d, V = int(self.config["d_model"]), int(self.config["vocab_size_padded"])
            self.lm_head = nn.Linear(d, V, bias=bool(self.config["lm_head_bias"]))

    def _logits(self, h: Tensor) -> Tensor:
        h = self.backbone.final_layernorm(h)
        return h @ self.backbone.embedding.weight.t() if self.tied else self.lm_head(h)

    def forward(
        self, input_ids: Tensor, return_hidden_states: bool = False
    ) -> Tensor | tuple[Tensor, tuple[Tensor, ...]]:
        """Logits [b, L, V_pad]; with ``return_hidden_states`` also Cartesia's tuple (see above)."""
        h = self.backbone.embedding(input_ids)
        hidden = [h]
        for layer in self.backbone.layers:
            h = layer(h)
            hidden.append(h)
        logits = self._logits(h)
        return (logits, tuple(hidden)) if return_hidden_states else logits

    def init_state(self, batch: int) -> list[dict[str, Tensor]]:
        return [layer.mixer.init_state(batch) for layer in self.backbone.layers]

    def step(
        self, tokens: Tensor, state: list[dict[str, Tensor]]
    ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """One token per sequence, tokens [b]: logits [b, V_pad] and the new state."""
        h = self.backbone.embedding(tokens)
        new_state = []
        for layer, s in zip(self.backbone.layers, state, strict=True):
            h, s = layer.step(h, s)
            new_state.append(s)
        return self._logits(h), new_state

    @torch.no_grad()
    def generate_greedy(self, prompt: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy continuation of prompt [b, L] by stepping: [b, L + max_new_tokens]."""
        state = self.init_state(prompt.shape[0])
        out = prompt
        for t in range(prompt.shape[1]):
            logits, state = self.step(prompt[:, t], state)
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1)
            out = torch.cat([out, nxt[:, None]], dim=1)
            logits, state = self.step(nxt, state)
        return out


def random_llamba_state_dict(config: Mapping[str, Any], seed: int = 0) -> dict[str, Tensor]:
    """Random weights in Cartesia's names, scaled so activations stay O(1) (float32)."""
    model = LlambaReference(config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("layernorm.weight"):  # away from 1 so a dropped norm weight shows
            t = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
        elif name.endswith("embedding.weight"):
            t = torch.randn(p.shape, generator=gen)
        elif name.endswith("conv1d.weight"):
            t = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
        elif name.endswith(".D"):
            t = 1.0 + 0.5 * torch.randn(p.shape, generator=gen)
        elif leaf == "weight":  # Linear [out, in]
            t = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1])
        else:  # biases, z_bias
            t = 0.3 * torch.randn(p.shape, generator=gen)
        out[name] = t.contiguous()
    return out


def write_llamba_checkpoint(
    directory: str | Path,
    config: Mapping[str, Any],
    seed: int = 0,
    *,
    weights: str = "safetensors",
    shards: int = 1,
) -> Path:
    """Write a random Llamba checkpoint directory in Cartesia's layout; return its path.

    ``config.json`` holds ``config`` as given (Cartesia's keys; an unpadded vocab_size stays
    unpadded, as on the Hub), the tensors are padded. ``weights``: 'safetensors'
    (``model.safetensors``) or 'bin' (``pytorch_model.bin``, what Cartesia's own save_pretrained
    writes). ``shards`` > 1 splits the tensors over files with Hugging Face's index json
    (``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``).
    """
    if weights not in ("safetensors", "bin"):
        raise ValueError(f"weights={weights!r}: expected 'safetensors' or 'bin'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dict(config), indent=2))
    tensors = random_llamba_state_dict(config, seed)
    names = list(tensors)
    stem, ext = ("model", "safetensors") if weights == "safetensors" else ("pytorch_model", "bin")

    def save(part: dict[str, Tensor], filename: str) -> None:
        if weights == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(directory / filename), metadata={"format": "pt"})
        else:
            torch.save(part, directory / filename)

    if shards <= 1:
        save(tensors, f"{stem}.{ext}")
        return directory
    weight_map = {}
    per = math.ceil(len(names) / shards)
    for i in range(shards):
        filename = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        save(part, filename)
        weight_map.update({n: filename for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return directory


def read_checkpoint_tensors(directory: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (single or sharded, safetensors or bin)."""
    directory = Path(directory)
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        index = directory / f"{stem}.{ext}.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else [f"{stem}.{ext}"]
        )
        if not all((directory / f).exists() for f in files):
            continue
        tensors: dict[str, Tensor] = {}
        for f in files:
            if ext == "safetensors":
                from safetensors.torch import load_file

                tensors.update(load_file(str(directory / f)))
            else:
                tensors.update(torch.load(directory / f, map_location="cpu", weights_only=True))
        return tensors
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or pytorch_model.bin (sharded or not)"
    )


def load_llamba_checkpoint(
    directory: str | Path, dtype: torch.dtype = torch.float32
) -> LlambaReference:
    """The reference with a checkpoint directory's weights (strict: every name, every shape)."""
    directory = Path(directory)
    model = LlambaReference(json.loads((directory / "config.json").read_text()))
    model.load_state_dict(read_checkpoint_tensors(directory), strict=True)
    return model.to(dtype).eval()
