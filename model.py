"""The multi-domain Decision Transformer and L2M's modulation pool. Imports only torch.

Shape legend:
  B batch   K timesteps in the context   S = A + 3 tokens per timestep   T = S * K tokens
  C embed dim   H heads   L layers   A action tokens per step (max action dim, 6)   NB action bins (64)
  P pool entries   r low-rank rank

Token layout of one timestep t (the authors' `tok_to_pos`, reward-conditioned):
  [ s_t | R_t | a_t^1 ... a_t^A | r_t ]   state, return-to-go, one token per action dim, reward
Action dim j is predicted from the output at the token before it: a^1 from R_t, a^j from a^(j-1).
So the A outputs at positions 1..A of each timestep are the action predictions; s_t and r_t predict nothing.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DTConfig:
    n_layer: int = 4  # paper: 6
    n_head: int = 4  # paper: 12
    n_embd: int = 128  # paper: 768
    dropout: float = 0.1  # HF GPT-2 defaults (resid/embd/attn), as in the authors' DecisionTransformerConfig
    context_len: int = 5  # K timesteps (the authors' max_length and eval_context_len)
    state_dim: int = 204  # states zero-padded to the unified 204-d space (max_state_dim)
    act_dim: int = 6  # action dims padded to this; 6 covers DMControl, 4 suffices for Meta-World alone
    n_bins: int = 64  # uniform bins per action dimension (action_channels); bin n_bins is the padding token
    max_ep_len: int = 1000  # timestep embedding table (max_ep_len of dt_mediumplus_64.yaml)

    @property
    def tokens_per_step(self):
        return self.act_dim + 3


class ActionTokenizer:
    """Continuous actions in [-1, 1] <-> one of n_bins uniform bins per dimension (the authors' MinMaxTokenizer)."""

    def __init__(self, n_bins=64):
        self.n_bins = n_bins

    def encode(self, actions):
        """(..., A) float -> (..., A) long in [0, n_bins); values are clipped to [-1, 1] first."""
        bins = torch.floor((actions.clamp(-1.0, 1.0) + 1.0) / (2.0 / self.n_bins)).long()
        return bins.clamp(0, self.n_bins - 1)

    def decode(self, bins):
        """(..., A) long -> (..., A) float at the bin centre (the authors decode to the lower edge)."""
        return (bins.float() + 0.5) * (2.0 / self.n_bins) - 1.0


# ---------------------------------------------------------------------------------------------------------
# The transformer: attention, MLP, block, the Decision Transformer, its loss


def dropout(x, p, training):
    """Inverted dropout, its keep-mask drawn from 15 random bits per element: four elements share one int64 draw of
    torch's generator, which runs serially on a CPU (a float per element took a quarter of a bf16 pre-training step
    through bernoulli_, an eighth of an fp32 one through rand). An element drops where its bits are below
    round(p * 2^15): Bernoulli with p within 2^-16 of the requested (0.100006 for 0.1)."""
    if not training or p == 0.0:
        return x
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()  # [0, 2^63): the top bit is 0
    lanes = bits.view(torch.int16)[:n].view(x.shape).bitwise_and_(0x7FFF)  # 15 uniform bits in each 16-bit lane
    keep = (lanes >= round(p * 32768)).to(x.dtype)  # a multiply, forward and backward: masked_fill's were 2x slower
    if x.dtype == torch.float32:
        return x * keep.mul_(1.0 / (1.0 - p))
    return x * keep * (1.0 / (1.0 - p))  # bf16 would round 1/(1-p) in the mask (1.109 for 1.111): scale in x's op


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout  # on the attention weights and on the output

    def forward(self, x, attn_mask, mod=None, cache=None, rows=None):
        """x (B, T, C); attn_mask (B, 1, T, T_all) bool, True = may attend; mod: this layer's modulators or None;
        cache: None, or a dict holding the keys/values of earlier positions, extended in place (acting; its "room":
        how many more positions will come);
        rows: None, or the (R,) indices of the only rows whose outputs are wanted -> (B, R, C); every row's keys and
        values are still computed."""
        B, T, C = x.shape
        merged = mod is not None and "qkv" in mod  # speed-up (acting): each entry's LoRA folded into its weights
        qkv = grouped_linear(x, mod["qkv"], mod["qkv_bias"], mod["groups"]) if merged else self.qkv(x)
        q, k, v = qkv.split(C, dim=-1)  # (B, T, C) each
        if rows is not None:
            x_q, q, attn_mask = x.index_select(1, rows), q.index_select(1, rows), attn_mask.index_select(2, rows)
        else:
            x_q = x
        if mod is not None and "q_a" in mod:  # L2M: low-rank modulation of the query and value projections
            q = add_low_rank(q, x_q, mod["q_a"], mod["q_b"], mod["select"], mod["scale"])
            v = add_low_rank(v, x, mod["v_a"], mod["v_b"], mod["select"], mod["scale"])
        if mod is not None and "k_scale" in mod:  # (IA)3: keys and values rescaled (AttentionIA3.forward)
            k, v = k * mod["k_scale"], v * mod["v_scale"]
        if mod is not None and "prefix_k" in mod and not (cache and "k" in cache):  # L2P-PreT: the prompt's keys
            k, v = torch.cat([mod["prefix_k"], k], dim=1), torch.cat([mod["prefix_v"], v], dim=1)  # (B, N + T, C)
        q, k, v = (t.view(B, -1, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T', C/H)
        if cache is not None:  # written into buffers with room for the tokens to come: no copy of the old ones
            if "k" not in cache:
                cache["k"] = k.new_empty(B, self.n_head, k.shape[2] + cache["room"], C // self.n_head)
                cache["v"], cache["n"] = torch.empty_like(cache["k"]), 0
            n, n_new = cache["n"], cache["n"] + k.shape[2]
            cache["k"][:, :, n:n_new], cache["v"][:, :, n:n_new], cache["n"] = k, v, n_new
            k, v = cache["k"][:, :, :n_new], cache["v"][:, :, :n_new]  # (B, H, T_all, C/H)
        p = self.dropout if self.training else 0.0
        if q.device.type == "cuda":  # fused kernels
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, H, T, C/H)
        else:  # written out: on a CPU at our shapes, SDPA's kernels were slower in bf16 (docs/performance.md)
            scores = (q @ k.transpose(-2, -1)).mul_(1.0 / math.sqrt(k.shape[-1]))  # (B, H, T, T_all)
            blocked = torch.zeros(attn_mask.shape, dtype=scores.dtype, device=scores.device)  # (B, 1, T, T_all)
            att = scores.add_(blocked.masked_fill_(~attn_mask, float("-inf"))).softmax(dim=-1)  # added: no backward
            y = dropout(att, p, self.training) @ v  # (B, H, T, C/H)
        return dropout(self.proj(y.transpose(1, 2).reshape(B, q.shape[2], C)), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x, mod=None):
        merged = mod is not None and "fc" in mod  # speed-up (acting): each entry's LoRA folded into its weights
        u = grouped_linear(x, mod["fc"], mod["fc_bias"], mod["groups"]) if merged else self.fc(x)  # (B, T, 4C)
        if mod is not None and "mlp_a" in mod:  # L2M: low-rank residual on the pre-activations, u + s (u A) B (MLPIA3)
            a, a_bias, source = mod["mlp_a"], 0.0, u
            if mod["select"] is not None and 3 * x[..., 0].numel() > u.shape[-1]:  # speed-up: dense, > 4C/3 rows:
                # u A = x (W A) + b A reads the C-wide x instead of the 4C-wide u, forward and backward (those skinny
                # matmuls were a fifth of an L2M training step); W A costs 4C^2 r once, and saves 3C r per row
                a, a_bias, source = self.fc.weight.T @ a, self.fc.bias @ a, x
            u = add_low_rank(u, source, a, mod["mlp_b"], mod["select"], mod["scale"], a_bias)
        h = F.gelu(u)
        if mod is not None and "mlp_scale" in mod:  # (IA)3: the hidden activations rescaled, after the GELU (MLPIA3)
            h = h * mod["mlp_scale"]
        return dropout(self.proj(h), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2)."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask, mod=None, cache=None, rows=None):
        """rows: None, or the (R,) indices of the rows whose outputs are wanted -> (B, R, C): the final block computes
        only the rows that predict (the other rows' outputs would only feed a next block)."""
        a = self.attn(self.ln_1(x), attn_mask, mod, cache, rows)
        if mod is not None and "attn_adapter" in mod:  # adapters: one after attention, one after the MLP
            a = mod["attn_adapter"](a)
        x = (x if rows is None else x.index_select(1, rows)) + a
        m = self.mlp(self.ln_2(x), mod)
        if mod is not None and "mlp_adapter" in mod:
            m = mod["mlp_adapter"](m)
        return x + m


class DecisionTransformer(nn.Module):
    """A Decision Transformer over discretized actions, for many tasks and two domains at once (the MDDT)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.embed_state = nn.Linear(cfg.state_dim, C)
        self.embed_return = nn.Linear(1, C)
        self.embed_reward = nn.Linear(1, C)
        self.embed_action = nn.Embedding(cfg.n_bins + 1, C)  # one table shared by all action dims; index n_bins = pad
        self.embed_timestep = nn.Embedding(cfg.max_ep_len, C)
        self.embed_ln = nn.LayerNorm(C)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.action_head = nn.Linear(C, cfg.n_bins)  # one head for every action dim
        self.pool = None  # a ModulationPool, attached by fine-tuning (L2M, LoRA, (IA)3)
        self.adapters = None  # per layer a pair of Adapters (attention, MLP), attached by fine-tuning (adapter)
        self.owners = None  # PackNet: {weight name: int8 tensor of its shape, the task owning each weight, -1 none}
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2L)
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # --- inputs ------------------------------------------------------------------------------------------

    def embed(self, states, returns, action_bins, rewards, timesteps):
        """states (B, K, 204), returns (B, K), action_bins (B, K, A) long, rewards (B, K), timesteps (B, K)
        -> tokens (B, K*S, C), interleaved [s, R, a^1..a^A, r] per timestep, after the embedding LayerNorm."""
        B, K = returns.shape
        tokens = torch.cat(
            [
                self.embed_state(states).unsqueeze(2),  # (B, K, 1, C)
                self.embed_return(returns.unsqueeze(-1)).unsqueeze(2),  # (B, K, 1, C)
                self.embed_action(action_bins),  # (B, K, A, C)
                self.embed_reward(rewards.unsqueeze(-1)).unsqueeze(2),  # (B, K, 1, C)
            ],
            dim=2,
        )  # (B, K, S, C)
        tokens = tokens + self.embed_timestep(timesteps).unsqueeze(2)  # the step's embedding on every token of it
        return self.embed_ln(tokens.reshape(B, K * self.cfg.tokens_per_step, -1))  # (B, T, C)

    def attention_mask(self, step_mask, prompt=None):
        """step_mask (B, K) bool, True = real timestep (left padding is False) -> (B, 1, T, T) causal & not-padding.
        A padded query may see itself, so no row is empty (its output is never used). With L2P's prompt of N tokens,
        every token also sees the N prompt keys in front: (B, 1, N + T, N + T) where the prompt is a row of tokens
        (pt, pv2; prompt tokens see the prompt tokens before them, as in a causal GPT-2), (B, 1, T, N + T) for
        prefixes (pret)."""
        S = self.cfg.tokens_per_step
        key_valid = step_mask.repeat_interleave(S, dim=1)  # (B, T)
        B, T = key_valid.shape
        causal = torch.ones(T, T, dtype=torch.bool, device=step_mask.device).tril()  # (T, T)
        eye = torch.eye(T, dtype=torch.bool, device=step_mask.device)
        mask = (causal & (key_valid[:, None, :] | eye))[:, None]  # (B, 1, T, T)
        if prompt is None:
            return mask
        N = prompt["n"]
        mask = torch.cat([mask.new_ones(B, 1, T, N), mask], dim=-1)  # (B, 1, T, N + T)
        if prompt["tokens"] is None:
            return mask
        prompt_rows = torch.cat(
            [torch.ones(N, N, dtype=torch.bool, device=mask.device).tril(), mask.new_zeros(N, T)], 1
        )
        return torch.cat([prompt_rows.expand(B, 1, N, N + T), mask], dim=2)  # (B, 1, N + T, N + T)

    def query(self, tokens, step_mask):
        """L2M's query: masked mean of the embedded state tokens (frozen weights only). -> (B, C)"""
        S = self.cfg.tokens_per_step
        state_tokens = tokens[:, ::S]  # (B, K, C): position 0 of every timestep
        m = step_mask.unsqueeze(-1).to(tokens.dtype)  # (B, K, 1)
        return (state_tokens * m).sum(1) / m.sum(1).clamp(min=1.0)  # L2M: the query (B, C)

    # --- forward -----------------------------------------------------------------------------------------

    def forward(self, states, returns, action_bins, rewards, timesteps, step_mask, task_ids=None):
        """-> logits (B, K, A, NB) for every action token, and the pool's output (None without a pool):
        dict(index (B,) or (B, top_k), sim (B, P), pull = the cosines between each query and the keys it selected,
        summed over them, averaged over the batch)."""
        B, K = returns.shape
        tokens = self.embed(states, returns, action_bins, rewards, timesteps)  # (B, T, C)
        mods, routing, prompt = self.modulators(tokens, step_mask, task_ids)
        x = dropout(tokens, self.cfg.dropout, self.training)
        mask = self.attention_mask(step_mask, prompt)
        S, A = self.cfg.tokens_per_step, self.cfg.act_dim
        R0 = prompt["n"] if prompt is not None and prompt["tokens"] is not None else 0  # L2P's prompt rows (pt, pv2)
        predicting = R0 + torch.arange(K, device=x.device)[:, None] * S + 1 + torch.arange(A, device=x.device)
        x = self.run_blocks(x, mask, mods, prompt, rows=predicting.flatten())  # (B, K*A, C): R, a^1..a^(A-1)
        logits = self.action_head(self.ln_f(x)).view(B, K, A, -1)  # (B, K, A, NB)
        return logits, routing

    def run_blocks(self, x, mask, mods, prompt, caches=None, first=True, rows=None):
        """The blocks over x (B, T', C). L2P's prompt tokens enter here: before the first block (pt), or before every
        block in place of the previous block's prompt outputs (pv2); not in cached acting's later passes (first
        False), whose rows are single new tokens. rows: the (R,) rows whose outputs are wanted, the only ones the last
        block computes -> (B, R, C) (training: the predicting tokens; with caches, acting: the last row)."""
        for layer, block in enumerate(self.blocks):
            if prompt is not None and prompt["tokens"] is not None and first and layer < prompt["tokens"].shape[1]:
                fresh = prompt["tokens"][:, layer]  # (B, N, C)
                x = torch.cat([fresh, x if layer == 0 else x[:, fresh.shape[1] :]], dim=1)
            final = layer == len(self.blocks) - 1
            if final and caches is not None:
                rows = torch.tensor([x.shape[1] - 1], device=x.device)
            x = block(
                x, mask, mods[layer] if mods else None, caches[layer] if caches else None, rows if final else None
            )
        return x

    def modulators(self, tokens, step_mask, task_ids=None, merged=None):
        """Route each sample to its pool entries and add the adapters (merged: acting, L2M's entries may come folded
        into weights, ModulationPool.merge). -> (per-layer dicts of modulators or None,
        routing dict or None, L2P's prompt or None: dict(tokens (B, depth, N, C) to prepend, None for prefixes;
        n, the prompt keys every token attends to))."""
        mods = routing = prompt = None
        if self.pool is not None:
            index, sim = self.pool.select(self.query(tokens, step_mask), task_ids)  # (B,) or (B, top_k), (B, P)
            pull = sim.gather(1, index.view(len(index), -1)).sum(1).mean()  # L2M: the key pull (L2P's too)
            routing = dict(index=index, sim=sim, pull=pull)
            if isinstance(self.pool, PromptPool):
                chosen = self.pool.gather(index)  # (B, depth, N, C)
                if self.pool.kind == "pret":  # layer l: keys from prefix 2l, values from prefix 2l + 1
                    mods = [
                        dict(prefix_k=chosen[:, 2 * i], prefix_v=chosen[:, 2 * i + 1]) for i in range(len(self.blocks))
                    ]
                prompt = dict(tokens=None if self.pool.kind == "pret" else chosen, n=chosen.shape[2])
            else:
                folding = merged if self.adapters is None else None  # the folded first pass has no adapter keys
                mods = self.pool.gather(index, folding, self.blocks, tokens.shape[1])
        if self.adapters is not None:
            mods = [
                {**(mods[layer] if mods else {}), "attn_adapter": pair[0], "mlp_adapter": pair[1]}
                for layer, pair in enumerate(self.adapters)
            ]
        return mods, routing, prompt

    def attach_adapters(self, reduction=16):
        """Two adapters per layer (the authors' DecisionTransformerGPT2BlockWithAdapter)."""
        C = self.cfg.n_embd
        device = self.embed_ln.weight.device
        self.adapters = nn.ModuleList(
            nn.ModuleList([Adapter(C, reduction), Adapter(C, reduction)]) for _ in self.blocks
        ).to(device)

    @contextlib.contextmanager
    def weights_of_task(self, task_id):
        """PackNet: inside the block, the model task `task_id` was given, the weights of tasks <= task_id (the
        weights later tasks own, and free ones, are zero); the weights are restored on leaving."""
        params = dict(self.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.owners}
        try:
            with torch.no_grad():
                for name, owner in self.owners.items():
                    params[name].mul_((owner >= 0) & (owner <= task_id))
            yield self
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    # --- acting ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def act(
        self,
        states,
        returns,
        action_bins,
        rewards,
        timesteps,
        step_mask,
        act_dim,
        task_ids=None,
        use_cache=True,
        merged=None,
    ):
        """The next action of a batch of environments: argmax bins for dims 1..act_dim of the last timestep.

        Inputs are the context windows (as in forward) whose last timestep holds the current state and
        return-to-go; its action and reward tokens are ignored. Dim j is predicted after writing dims < j into
        the window. With use_cache, the tokens before a^1 are run once and their keys/values reused, so the
        act_dim passes cost about one forward; without it, each pass runs the whole window again. merged: None, or
        a dict a rollout keeps while the weights do not change, in which L2M's entries are folded into the weights
        they modulate (ModulationPool.merge; where a batch has at least n_embd rows per entry in use).
        -> (B, act_dim) bins, and the routing dict (or None)."""
        K, S = returns.shape[1], self.cfg.tokens_per_step
        action_bins = action_bins.clone()
        action_bins[:, -1] = self.cfg.n_bins  # the current step's actions are unknown
        tokens = self.embed(states, returns, action_bins, rewards, timesteps)  # (B, T, C)
        mods, routing, prompt = self.modulators(tokens, step_mask, task_ids, merged)
        first_mods, order = mods, None
        if mods and "order" in mods[0]:  # L2M's entries folded into weights for the first pass: the batch reordered
            first_mods, order = [mod["first"] for mod in mods], mods[0]["order"]  # ... so each entry's is one slice
            inputs = (tokens, states, returns, action_bins, rewards, timesteps, step_mask)
            tokens, states, returns, action_bins, rewards, timesteps, step_mask = (t[order] for t in inputs)
        prefix = (K - 1) * S + 2  # tokens up to and including the current R_t
        mask = self.attention_mask(step_mask, prompt)  # (B, 1, R0 + T, C0 + T)
        C0 = prompt["n"] if prompt is not None else 0  # L2P: prompt keys in front of the tokens' keys
        R0 = C0 if prompt is not None and prompt["tokens"] is not None else 0  # ... and rows (pt, pv2)
        if not use_cache:
            for j in range(act_dim):
                m = mask[:, :, : R0 + prefix + j, : C0 + prefix + j]
                x = self.run_blocks(tokens[:, : prefix + j], m, first_mods if j == 0 else mods, prompt)
                action_bins[:, -1, j] = self.action_head(self.ln_f(x[:, -1])).argmax(-1)  # (B,)
                tokens = self.embed(states, returns, action_bins, rewards, timesteps)
        caches = [dict(room=act_dim - 1) for _ in self.blocks]  # room: the action tokens after the first pass
        x, rows = tokens[:, :prefix], slice(0, R0 + prefix)
        for j in range(act_dim if use_cache else 0):
            m = mask[:, :, rows, : C0 - R0 + rows.stop]  # the new rows, against every key so far
            x = self.run_blocks(x, m, first_mods if j == 0 else mods, prompt, caches, first=j == 0)
            action_bins[:, -1, j] = self.action_head(self.ln_f(x[:, -1])).argmax(-1)  # (B,)
            if j + 1 < act_dim:  # embed just the new action token: its own embedding + time, then the LayerNorm
                t = timesteps[:, -1]
                x = self.embed_ln(self.embed_action(action_bins[:, -1, j]) + self.embed_timestep(t))[
                    :, None
                ]  # (B, 1, C)
                rows = slice(R0 + prefix + j, R0 + prefix + j + 1)
        chosen = action_bins[:, -1, :act_dim]  # (B, act_dim), in the batch's order
        return (chosen if order is None else chosen[torch.argsort(order)]), routing

    @classmethod
    def from_checkpoint(cls, pretrained, finetuned=None):
        """The model a pretrain.py checkpoint describes, in eval mode; with a finetune.py checkpoint on top, plus
        its pool and the weights it trained. Weights that do not fit the config (a hand-edited one) are a ValueError."""
        model = cls(DTConfig(**pretrained["model_args"]))
        try:
            model.load_state_dict(pretrained["model"])
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip()
            raise ValueError(f"the checkpoint's weights do not fit its model_args: {first}") from None
        if finetuned is not None:
            if finetuned["pool_args"] is not None:
                model.pool = make_pool(model.cfg.n_layer, model.cfg.n_embd, **finetuned["pool_args"])
            if finetuned.get("adapter_args") is not None:
                model.attach_adapters(**finetuned["adapter_args"])
            model.owners = finetuned.get("owners")
            model.load_state_dict({**model.state_dict(), **finetuned["model"]})
        return model.eval()

    # --- training helpers ----------------------------------------------------------------------------------

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.999)):
        """AdamW with decay on Linear weights only (the authors' get_optim_groups); only trainable parameters.
        The fused implementation: one kernel over the pool's many small tensors (docs/performance.md)."""
        linear_weights = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            dict(params=[p for p in params if id(p) in linear_weights], weight_decay=weight_decay),
            dict(params=[p for p in params if id(p) not in linear_weights], weight_decay=0.0),
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def action_loss(logits, target_bins, valid):
    """Cross-entropy over valid action tokens: logits (B, K, A, NB), target_bins (B, K, A), valid (B, K, A) bool.
    -> (mean loss, accuracy) over the valid tokens (padded timesteps and padded dims carry no loss)."""
    flat_valid = valid.reshape(-1)
    chosen_logits = logits.reshape(-1, logits.shape[-1])[flat_valid]  # (N, NB)
    chosen_targets = target_bins.reshape(-1)[flat_valid]  # (N,)
    loss = F.cross_entropy(chosen_logits.float(), chosen_targets)
    accuracy = (chosen_logits.argmax(-1) == chosen_targets).float().mean()
    return loss, accuracy


# ---------------------------------------------------------------------------------------------------------
# L2M: the pool of key-matched low-rank modulators (Schmied et al. 2023)

POOL_KINDS = ("lora", "ia3")  # what a modulation entry holds: low-rank residuals (L2M) or scaling vectors (L2M-(IA)3)


class KeyedPool(nn.Module):
    """P entries chosen by their keys, the part L2M shares with L2P (Schmied et al. 2023, Sec. 3; the authors'
    L2PPrompt): query = masked mean of the embedded state tokens; cosine similarity to every key; the top_k entries
    per sample. Training from the second task on, the score becomes ((cos + 1) / 2) * inv, inv = normalized
    1 / (selection frequency so far + 1e-6), refreshed at each task switch, so a new task takes entries no earlier
    task used. n_groups > 0 (the oracle): entries split into n_groups contiguous groups, masked by the task id;
    with task_stats (l2m-stats), the pool also learns to infer that id from the query (TaskStatistics)."""

    def __init__(self, pool_size, n_embd, n_groups=0, top_k=1, task_stats=False):
        super().__init__()
        P = pool_size
        self.n_groups, self.top_k = n_groups, top_k
        self.tasks = TaskStatistics(n_groups, n_embd) if task_stats else None
        self.keys = nn.Parameter(torch.empty(P, n_embd).uniform_(-1.0, 1.0))  # L2M: one key per entry (init_keys)
        self.register_buffer("counts", torch.zeros(P))  # running mean of the per-batch selection histogram
        self.register_buffer("n_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("inv_counts", torch.full((P,), 1.0 / P))
        self.register_buffer("penalize", torch.zeros((), dtype=torch.bool))

    @property
    def size(self):
        return self.keys.shape[0]

    def start_task(self, task_index):
        """At a task switch: refresh the inverse-frequency weights; the penalty applies from the second task on."""
        inv = 1.0 / (self.counts + 1e-6)  # L2M: inverse selection frequency of the tasks so far
        self.inv_counts.copy_(inv / inv.sum())
        self.penalize.fill_(task_index > 0)

    def select(self, query, task_ids=None):
        """query (B, C) -> entry index (B,) (top_k 1) or (B, top_k), cosine similarity to every key (B, P)."""
        with torch.autocast(query.device.type, enabled=False):  # fp32 even under bf16 autocast, as the authors
            sim = F.normalize(query.float(), dim=-1) @ F.normalize(self.keys.float(), dim=-1).T  # L2M: cosine (B, P)
            score = sim
            if self.training and self.penalize:
                score = (sim + 1.0) / 2.0 * self.inv_counts  # L2M: count penalty (B, P)
        if self.n_groups > 0:  # oracle: only the entries of the sample's own task group
            group = torch.arange(self.size, device=sim.device) // (self.size // self.n_groups)  # (P,)
            score = score.masked_fill(group[None, :] != task_ids[:, None], float("-inf"))
        index = score.argmax(dim=-1) if self.top_k == 1 else score.topk(self.top_k, dim=-1).indices  # L2M: top-1
        if self.training:
            histogram = torch.bincount(index.flatten(), minlength=self.size).float() / index.numel()  # (P,)
            self.n_batches += 1
            self.counts += (histogram - self.counts) / self.n_batches  # L2M: selection frequency
        return index, sim


class ModulationPool(KeyedPool):
    """L2M's pool: P entries, each a key in R^C and, for every layer, modulators of the attention and the MLP:
    kind "lora", low-rank residuals on Q, V and the MLP's hidden pre-activations (L2M); kind "ia3", vectors that
    scale K, V and the MLP's hidden activations ((IA)3, Liu et al. 2022; the authors' L2M-(IA)3). Top-1 selection
    (KeyedPool). A pool of one entry is one shared set (LoRA, (IA)3)."""

    def __init__(self, n_layer, n_embd, pool_size=30, rank=8, alpha=16.0, n_groups=0, kind="lora", task_stats=False):
        super().__init__(pool_size, n_embd, n_groups, task_stats=task_stats)
        if kind not in POOL_KINDS:
            raise ValueError(f"unknown modulator kind {kind!r}: use one of {', '.join(POOL_KINDS)}")
        P, L, C, r = pool_size, n_layer, n_embd, rank
        self.kind, self.n_layer = kind, L
        self.scale = alpha / rank  # l2m_lora.yaml: rank 8, lora_alpha = 2 * rank
        if kind == "ia3":  # L2MIA3._setup_prompt: ones, so a fresh entry changes nothing
            self.k_scale = nn.Parameter(torch.ones(P, L, C))
            self.v_scale = nn.Parameter(torch.ones(P, L, C))
            self.mlp_scale = nn.Parameter(torch.ones(P, L, 4 * C))
        else:  # L2M: the LoRA parameters; A kaiming-uniform (loralib), B zero: a fresh entry does nothing
            self.q_a = nn.Parameter(torch.empty(P, L, C, r).uniform_(-1.0, 1.0) / math.sqrt(C))
            self.v_a = nn.Parameter(torch.empty(P, L, C, r).uniform_(-1.0, 1.0) / math.sqrt(C))
            self.mlp_a = nn.Parameter(torch.empty(P, L, 4 * C, r).uniform_(-1.0, 1.0) / math.sqrt(4 * C))
            self.q_b = nn.Parameter(torch.zeros(P, L, r, C))
            self.v_b = nn.Parameter(torch.zeros(P, L, r, C))
            self.mlp_b = nn.Parameter(torch.zeros(P, L, r, 4 * C))

    def gather(self, index, merged=None, blocks=None, rows=0, dense=False):
        """Each sample's modulators, per layer: a list of L dicts; for "ia3" k_scale, v_scale (B, 1, C) and
        mlp_scale (B, 1, 4C); for "lora" q_a, q_b, v_a, v_b, mlp_a, mlp_b, select, scale, as follows; acting with
        merged weights (merged, a dict kept for one rollout; blocks; rows, the tokens per sample), see merge.

        A training batch uses a few entries (U, often 1). Applying those U entries to the whole batch, one matmul each,
        and zeroing the columns of other samples' entries (select (B, U*r)) is exact and much cheaper on a CPU than B
        tiny per-sample matmuls, whose gathers copy one entry per sample forward and scatter it back in backward
        (docs/performance.md), even when many entries are in use, as in the first steps of the first task.
        Acting on many tasks at once without gradients, the dense form would waste U times the work, so there each
        sample gets its own matrices (B, in, r) / (B, r, out) and select is None."""
        L = self.n_layer
        if self.kind == "ia3":  # vectors: a per-sample gather is as cheap as it gets
            return [
                dict(
                    k_scale=self.k_scale[index, layer, None],
                    v_scale=self.v_scale[index, layer, None],
                    mlp_scale=self.mlp_scale[index, layer, None],
                )
                for layer in range(L)
            ]
        used, slot = torch.unique(index, return_inverse=True)  # (U,), (B,): the entries in use, each sample's slot
        r, C = self.q_a.shape[-1], self.q_a.shape[2]
        if merged is not None and len(index) * rows >= len(used) * C:  # folding costs ~C rows' work per entry
            return self.merge(index, merged, blocks)
        if len(used) > DENSE_ENTRIES and not torch.is_grad_enabled() and not dense:
            return [
                dict(
                    q_a=self.q_a[index, layer],
                    q_b=self.q_b[index, layer],
                    v_a=self.v_a[index, layer],
                    v_b=self.v_b[index, layer],
                    mlp_a=self.mlp_a[index, layer],
                    mlp_b=self.mlp_b[index, layer],
                    select=None,
                    scale=self.scale,
                )
                for layer in range(L)
            ]
        select = F.one_hot(slot, len(used)).bool().repeat_interleave(r, dim=1)  # (B, U*r)
        a = [p[used].permute(1, 2, 0, 3).flatten(2) for p in (self.q_a, self.v_a, self.mlp_a)]  # (L, in, U*r) each
        b = [p[used].permute(1, 0, 2, 3).flatten(1, 2) for p in (self.q_b, self.v_b, self.mlp_b)]  # (L, U*r, out) each
        return [
            dict(
                q_a=a[0][layer],
                v_a=a[1][layer],
                mlp_a=a[2][layer],
                q_b=b[0][layer],
                v_b=b[1][layer],
                mlp_b=b[2][layer],
                select=select,
                scale=self.scale,
            )
            for layer in range(L)
        ]

    def merge(self, index, merged, blocks):
        """Acting: the batch ordered by entry (order, the argsort of index), each entry's LoRA folded into the frozen
        weights it modulates for the first pass over the context (key "first"), so each entry's slice of the batch
        costs one matmul per modulated layer and nothing more, and the dense form in that order for the later
        single-token passes. On a CPU the per-sample form ran at ~8 GFLOP/s, a fifth of an acting step. Folded:
        Q, V: x (W + s A B); the MLP's residual on its pre-activations, u + s (u A) B with u = x W + b, is
        u (I + s A B) = x (W + s (W A) B) + (b + s (b A) B). merged: entry -> its folded weights per layer, filled
        here as entries come up; it must not outlive the weights (a rollout keeps one)."""
        order = torch.argsort(index, stable=True)  # (B,)
        mods = self.gather(index[order], dense=True)  # in the new order
        used, counts = torch.unique(index, return_counts=True)  # (U,) ascending: the order's groups
        entries, bounds = used.tolist(), [0, *counts.cumsum(0).tolist()]
        device = index.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.q_a.dtype
        for e in entries:
            if (e, dtype) not in merged:
                with torch.autocast(device, enabled=False):
                    merged[e, dtype] = self.fold(e, blocks, dtype)
        groups = list(zip(bounds[:-1], bounds[1:]))
        for layer, mod in enumerate(mods):
            weights = [merged[e, dtype][layer] for e in entries]
            mod["first"] = dict(groups=groups, **{k: [w[i] for w in weights] for i, k in enumerate(FOLDED)})
            mod["order"] = order
        return mods

    def fold(self, e, blocks, dtype):
        """Entry e's LoRA folded into the blocks' weights (merge), computed in fp32 and cast to dtype -> per layer
        [qkv (C, 3C), qkv_bias (3C,), fc (C, 4C), fc_bias (4C,)], weights as x @ W."""
        s, C = self.scale, self.q_a.shape[2]
        folded = []
        for layer, block in enumerate(blocks):
            qkv = block.attn.qkv.weight.T.clone()  # (C, 3C)
            qkv[:, :C].addmm_(self.q_a[e, layer], self.q_b[e, layer], alpha=s)
            qkv[:, 2 * C :].addmm_(self.v_a[e, layer], self.v_b[e, layer], alpha=s)
            a, b, fc, fc_bias = self.mlp_a[e, layer], self.mlp_b[e, layer], block.mlp.fc.weight.T, block.mlp.fc.bias
            fc = torch.addmm(fc, fc @ a, b, alpha=s)  # (C, 4C)
            fc_bias = torch.addmv(fc_bias, b.T, fc_bias @ a, alpha=s)  # (4C,)
            folded.append([w.to(dtype) for w in (qkv, block.attn.qkv.bias, fc, fc_bias)])
        return folded


def make_pool(n_layer, n_embd, kind="lora", **kwargs):
    """The pool a checkpoint's pool_args describe: L2M's modulators or L2P's prompts."""
    if kind in PROMPT_KINDS:
        return PromptPool(n_layer, n_embd, kind=kind, **kwargs)
    return ModulationPool(n_layer, n_embd, kind=kind, **kwargs)


DENSE_ENTRIES = 4  # acting with more entries than this in a batch, modulators are applied per sample (see gather)


def add_low_rank(base, x, a, b, select, scale, a_bias=0.0):
    """base + a per-sample low-rank residual s * (x A_i) B_i -> (B, T, out), for base (B, T, out), x (B, T, in) and
    either
    dense: a (in, U*r), b (U*r, out), select (B, U*r): x @ a computes every used entry's r columns, select keeps the
           sample's own; or
    per sample: a (B, in, r), b (B, r, out), select None.
    a_bias (dense only): added to x @ a. The scale goes on the rank-r product and the sum into the last matmul: no
    extra pass over a (B, T, out) tensor."""
    if select is None:
        return torch.baddbmm(base, torch.bmm(x, a) * scale, b)
    h = (x @ a + a_bias) * (select * scale)[:, None, :]  # (B, T, U*r)
    return torch.addmm(base.flatten(0, 1), h.flatten(0, 1), b).view(base.shape)


# ---------------------------------------------------------------------------------------------------------
# The other methods' modules: L2P's prompts, adapters

PROMPT_KINDS = ("pt", "pv2", "pret")  # L2P's prompts: at the input, at every layer's input, as attention prefixes


class PromptPool(KeyedPool):
    """L2P's prompt pool (Wang et al. 2022; the authors' L2PPrompt with l2p.yaml: 100 prompts of 5 tokens, top-5):
    the top_k prompts chosen by their keys (KeyedPool) are concatenated into top_k * length tokens and, by kind,
    prepended to the input ("pt", prompt tuning), to every layer's input in place of the previous layer's prompt
    outputs ("pv2", P-tuning v2), or to every layer's attention keys and values ("pret", prefix tuning)."""

    def __init__(self, n_layer, n_embd, pool_size=100, length=5, top_k=5, n_groups=0, kind="pv2"):
        super().__init__(pool_size, n_embd, n_groups, top_k)
        if kind not in PROMPT_KINDS:
            raise ValueError(f"unknown prompt kind {kind!r}: use one of {', '.join(PROMPT_KINDS)}")
        self.kind = kind
        depth = {"pt": 1, "pv2": n_layer, "pret": 2 * n_layer}[kind]  # pret: a key and a value prefix per layer
        self.prompts = nn.Parameter(torch.empty(pool_size, depth, length, n_embd).uniform_(-1.0, 1.0))  # uniform

    @property
    def n_tokens(self):
        return self.top_k * self.prompts.shape[2]

    def gather(self, index):
        """index (B, top_k) -> the chosen prompts, concatenated: (B, depth, top_k * length, C)."""
        chosen = self.prompts[index].transpose(1, 2)  # (B, depth, top_k, length, C)
        return chosen.flatten(2, 3)


class Adapter(nn.Module):
    """A bottleneck adapter (Houlsby et al. 2019; the authors' adapter.py: reduction 16, swish), applied to a
    sublayer's output before the residual add: y + up(swish(down(y))). The up-projection starts at zero, so a fresh
    adapter changes nothing (the authors' default draws it from N(0, 0.02); their mam_adapter option zeroes it)."""

    def __init__(self, n_embd, reduction=16):
        super().__init__()
        self.down = nn.Linear(n_embd, max(1, n_embd // reduction))
        self.up = nn.Linear(max(1, n_embd // reduction), n_embd)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y):
        return y + self.up(F.silu(self.down(y)))  # swish = SiLU


# ---------------------------------------------------------------------------------------------------------
# Task inference for l2m-stats (beyond the paper): one Gaussian of the queries per task

SHRINK = 1e-3  # TaskStatistics: covariance + SHRINK * mean variance * I (our choice)


class TaskStatistics(nn.Module):
    """Task inference without a task id (l2m-stats, beyond the paper): each task's query distribution, a Gaussian
    with its own mean and covariance fitted to the queries of its training windows at the end of the task; a query
    goes to the task under which it is most likely (quadratic discriminant analysis). The queries come from frozen
    weights only, so a task's statistics never go stale. Why not keys: L2M's keys are pulled toward the queries by
    the loss, and on CW10 later tasks' keys took over earlier tasks' windows (push vs push-wall)."""

    def __init__(self, n_tasks, n_embd):
        super().__init__()
        T, C = n_tasks, n_embd
        self.register_buffer("mean", torch.zeros(T, C))
        self.register_buffer("precision", torch.eye(C).repeat(T, 1, 1))  # (T, C, C): inverse covariance
        self.register_buffer("logdet", torch.zeros(T))  # log det of each covariance
        self.register_buffer("fitted", torch.zeros(T, dtype=torch.bool))

    def fit(self, task_index, queries):
        """queries (N, C) of the task's training windows. The covariance is shrunk toward its mean variance by
        SHRINK, so a task whose queries span fewer than C directions still has an invertible one."""
        q = queries.double()
        centred = q - q.mean(0)
        cov = centred.T @ centred / max(len(q) - 1, 1)  # (C, C)
        cov = cov + SHRINK * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        self.mean[task_index] = q.mean(0).float()
        self.precision[task_index] = torch.linalg.inv(cov).float()
        self.logdet[task_index] = torch.linalg.slogdet(cov)[1].float()
        self.fitted[task_index] = True

    def infer(self, query):
        """query (B, C) -> the most likely fitted task (B,): argmin of (q - mu)^T S^-1 (q - mu) + log det S."""
        d = query.float()[:, None, :] - self.mean[None]  # (B, T, C)
        nll = torch.einsum("btc,tcd,btd->bt", d, self.precision, d) + self.logdet  # (B, T)
        return nll.masked_fill(~self.fitted, float("inf")).argmin(-1)


# ---------------------------------------------------------------------------------------------------------
# Speed-ups for acting: pool entries folded into the weights they modulate (ModulationPool.merge)

FOLDED = ("qkv", "qkv_bias", "fc", "fc_bias")  # ModulationPool.merge: the folded weights of an entry, per layer


def grouped_linear(x, weights, biases, groups):
    """x (B, T, in) whose samples groups[u] = (start, stop) go through weights[u] (in, out) and biases[u] (out,), one
    matmul per group -> (B, T, out) (ModulationPool.merge)."""
    x = x.to(weights[0].dtype)  # out= runs outside autocast: the weights carry its dtype
    out = x.new_empty(*x.shape[:-1], weights[0].shape[-1])
    for (start, stop), weight, bias in zip(groups, weights, biases):
        torch.addmm(bias, x[start:stop].flatten(0, 1), weight, out=out[start:stop].flatten(0, 1))
    return out
