"""Topoformer: a BERT whose attention units sit on a 2-D grid.

Binhuraib, Tuckute, Blauch. "Topoformer: brain-like topographic organization in Transformer language models through
spatial querying and reweighting". arXiv 2510.18745 (2025). Official code: TahaBinhuraib/topoformer, and its BERT in
TahaBinhuraib/cramming_local.

A pre-LayerNorm BERT (bidirectional attention, GELU-GLU feed-forward, tied embeddings) trained with masked language
modelling. The D = side*side units of the queries, keys, values and attention outputs sit on a side x side grid in
[0, 1)^2 (a torus by default), and two fixed local connectivity patterns make neighbouring units respond alike:

  spatial querying (SQ):    q' = q M,   scores = q' k^T / sqrt(D)
      M[i, j] = 1 when unit j is within radius r of unit i, r = sqrt(sq / pi) (a disc covering a fraction sq of the
      grid), normalised: each key unit is matched against the pooled queries of its disc.
  spatial reweighting (SR): out = y |W_o * M_sr|^T + b_sr,   then dense(out) joins the residual stream
      the output projection is locally connected: output unit i reads only the units of the attention output y
      within the disc of area sr around it; a dense projection follows, as in the official BERT.

sq = sr = 1 is the non-topographic control: plain queries and a dense output projection. Read top to bottom: config,
the grid, the model, data, the training loop and main(); last, the plumbing that is not the model (command line,
devices, files), the same as topo_gpt.py's.
"""

import os
# before torch loads OpenMP: waiting threads sleep, so that on shared cores they starve no other (docs/speed.md)
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import re, sys, math, time, json, ctypes, signal, argparse, warnings
from contextlib import nullcontext, contextmanager
from dataclasses import dataclass, asdict, fields
import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.distributed import init_process_group, destroy_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

# ---- config, each key a --key=value: its comment is its --help, a check before the colon (x >= 1, a|b) its values ----
# I/O
out_dir = 'out-topoformer'  # where ckpt.pt is written
eval_interval = 250  # x >= 1: evaluate, and save a checkpoint, every this many steps
log_interval = 10  # x >= 1: print a training line every this many steps
eval_iters = 20  # x >= 1: batches per split in an evaluation
resume = False  # continue the run in out_dir from its ckpt.pt
snapshot_iters = ''  # keep the model in out_dir/snapshots/ at these steps: 0,50,100, or log = 0, 25, 50, 100, ...
# task
task = 'mlm'  # mlm|sentiment: masked language modelling on data_dir/dataset, or IMDB reviews (TASK_DEFAULTS)
# data
data_dir = 'data'  # where prepare_data.py writes its folders
dataset = 'shakespeare'  # reads data_dir/dataset/{train,val}.bin, written by prepare_data.py
imdb_dir = 'data/imdb/aclImdb'  # --task=sentiment: the reviews, as aclImdb/{train,test}/{pos,neg}/*.txt
gradient_accumulation_steps = 1  # x >= 1: micro-batches per optimizer step, over all processes
batch_size = 16  # x >= 1: sequences per micro-batch
block_size = 128  # x >= 1: tokens per sequence
# model
n_layer = 4  # x >= 1: transformer blocks; each has 4 maps (q, k, v, out)
n_head = 1  # x >= 1: attention heads; the paper's is one head of size D
n_embd = 256  # x >= 1: D, a perfect square: 256 units = a 16 x 16 grid
ffn_size = 1024  # x >= 2: width of the GELU-GLU layer, halved by the gate
dropout = 0.0  # 0 <= x < 1: dropout of the embeddings and of each sublayer's output (none on attention weights)
dense_proj = True  # a dense Linear(D, D) after spatial reweighting, as the official BERT has
# topography (Binhuraib et al. 2025)
sq = 0.3  # 0 < x <= 1: spatial querying, the fraction of the grid pooled into each query; 1 = none (control)
sr = 0.3  # 0 < x <= 1: spatial reweighting, the fraction of the grid each output unit reads; 1 = dense (control)
wrap = True  # distances on a torus (the paper's default); False: a flat square with edges
sr_nonneg = True  # SR weights act as |W| >= 0, as in the official code (see SpatialSelfAttention)
# AdamW
learning_rate = 1e-3  # x > 0: peak learning rate
max_iters = 2500  # x >= 1: optimizer steps of the whole run
weight_decay = 0.01  # x >= 0: on 2-D weights (matmuls, embeddings)
beta1 = 0.9  # 0 <= x < 1: AdamW's decay of the gradient's mean
beta2 = 0.98  # 0 <= x < 1: AdamW's decay of the gradient's square
adam_eps = 1e-8  # x > 0: AdamW's epsilon (PyTorch's default; the official BERT's is 1e-12)
grad_clip = 0.5  # x >= 0: clip the gradient norm at this value; 0 = no clipping
# learning rate schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
warmup_iters = 100  # x >= 0: steps of linear warmup
lr_decay_iters = 0  # x >= 0: the step at which the cosine decay reaches min_lr; 0 = max_iters
min_lr = 1e-4  # x >= 0: the learning rate after the decay
# system
device = 'auto'  # auto = cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps
dtype = 'auto'  # auto|float32|bfloat16|float16: auto = bf16 where the device has it natively (see precision)
compile = False  # compile the model with torch.compile
seed = 1337  # x >= 0: seeds the batches and the masks
preset = ''  # a named set of overrides, applied before the other keys (see PRESETS)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k[0] != '_' and k.islower() and type(v) in (bool, int, float, str)}
# --task=sentiment brings its own defaults, under any preset and explicit key: the paper's first experiment, a 1-layer
# Topoformer on a 20 x 20 grid classifying IMDB reviews (the official config_text.yaml, train_imdb.py), one epoch's
# worth of draws (700 x 32 of the 22.5k training reviews, with replacement) instead of its 20 of 256, for a laptop
TASK_DEFAULTS = {
    'mlm': {},
    'sentiment': dict(out_dir='out-sentiment', n_layer=1, n_head=1, n_embd=400, ffn_size=1600, block_size=256,
                      sq=0.1, sr=0.3, dropout=0.1, dense_proj=False, batch_size=32, max_iters=700, eval_interval=100,
                      eval_iters=10, warmup_iters=50, learning_rate=1e-3, weight_decay=0.01, beta1=0.9, beta2=0.999,
                      grad_clip=0.1),
}
HELP = __doc__ + '\n--task=sentiment sets: ' + ', '.join(f'{k}={v}' for k, v in TASK_DEFAULTS['sentiment'].items())
PRESETS = {
    # the paper's BERT (cramming_local's arch/bert-c5_topo + train/bert-o3): 16 layers of D = 784, one head, GELU-GLU
    # 3072, sq = sr = 0.3, 4096 sequences of 128 a step, no dropout (the official pretraining runs in eval mode).
    # Ours, not the official: the step count, the cosine schedule and the corpus, FineWeb-Edu (as topo_gpt.py)
    'paper': dict(dataset='fineweb-edu', n_layer=16, n_head=1, n_embd=784, ffn_size=3072, block_size=128,
                  dropout=0.0, dense_proj=True, sq=0.3, sr=0.3, batch_size=128, gradient_accumulation_steps=32,
                  learning_rate=1e-3, weight_decay=0.01, beta1=0.9, beta2=0.98, adam_eps=1e-12, grad_clip=0.5,
                  warmup_iters=1000, max_iters=20000, min_lr=1e-5, eval_interval=1000, eval_iters=100),
    # the five-minute classroom loop (docs/classroom.md): a model and its control in about a minute each
    'classroom': dict(n_layer=2, n_head=1, n_embd=256, ffn_size=1024, block_size=64, batch_size=16,
                      max_iters=600, eval_interval=200, eval_iters=10, warmup_iters=30, snapshot_iters='log'),
}
MODEL_TYPE = 'topoformer'  # written into every checkpoint: analyze.py tells the models apart by it
# GPT-2's tokens are 0..50256, padded to 50304 (a multiple of 64, for speed): the tokens MLM needs live in the padding
EOT_ID = 50256  # <|endoftext|>, between documents in the .bin files
MASK_ID = 50257  # [MASK]
PAD_ID = 50258  # [PAD]: fills IMDB reviews up to the longest of the batch; never attended to
IGNORE_INDEX = -100  # MLM targets at the positions that were not masked (PyTorch's default)
MASK_PROB = 0.15  # BERT: 15% of the tokens are predicted

# ---- The grid: units on a side x side grid in [0, 1)^2, and the discs of SQ and SR -----------------------------------

def grid_coords(side):
    """(side*side, 2) integer lattice coordinates (row, col): unit i is at (i // side, i % side)."""
    i = torch.arange(side * side)
    return torch.stack([i // side, i % side], dim=1)

def grid_distances(side, wrap=True):
    """(D, D) distances of units at (row, col) / side in the unit square; wrap: on a torus, min(d, 1 - d) per axis."""
    d = (grid_coords(side)[:, None, :] - grid_coords(side)[None, :, :]).double().abs() / side  # (D, D, 2)
    return (torch.minimum(d, 1 - d) if wrap else d).norm(dim=-1)

def disc_mask(side, frac, wrap=True):
    """(D, D) 0/1 mask, M[i, j] = 1 when unit j is within r of unit i, the disc covering a fraction frac of the
    grid: pi r^2 = frac. Symmetric; on the flat grid the discs near an edge are cut off."""
    return (grid_distances(side, wrap) <= math.sqrt(frac / math.pi)).to(torch.get_default_dtype())

# ---- The model: a pre-LayerNorm BERT whose self-attention queries and reweights spatially ----------------------------

@dataclass
class TopoformerConfig:
    block_size: int = 128
    vocab_size: int = 50304  # GPT-2's 50257 tokens + [MASK], [PAD], padded to a multiple of 64
    n_layer: int = 16
    n_head: int = 1
    n_embd: int = 784  # D = side * side units on the grid
    ffn_size: int = 3072
    dropout: float = 0.0
    dense_proj: bool = True  # the official BERT's dense layer after SR
    sq: float = 0.3  # 1 = no spatial querying
    sr: float = 0.3  # 1 = dense output projection
    wrap: bool = True
    sr_nonneg: bool = True
    n_class: int = 0  # 0: masked LM head; > 0: mean-pool then a linear classifier (sentiment)

class SpatialSelfAttention(nn.Module):
    """Bidirectional self-attention with spatial querying (SQ) and spatial reweighting (SR):
        q = x W_q^T,  k = x W_k^T,  v = x W_v^T        (B, T, D) each
        q' = q M                                        SQ: the queries pooled over each unit's disc
        y = softmax(q' k^T / sqrt(D)) v                 one head of size D, as in the paper
        out = y |W_o * M_sr|^T + b_sr                   SR: a locally connected output projection
        dense(out)                                      what the block adds to the residual stream"""
    def __init__(self, config):
        super().__init__()
        D, side = config.n_embd, math.isqrt(config.n_embd)
        self.c_q = nn.Linear(D, D, bias=False)  # W_q
        self.c_kv = nn.Linear(D, 2 * D, bias=False)  # W_k and W_v
        self.c_proj = nn.Linear(D, D, bias=True)  # W_o and b_sr: SR, a Linear with a bias as the official one
        self.c_dense = nn.Linear(D, D, bias=False) if config.dense_proj else None  # the official BERT's dense
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.sr_nonneg = config.n_head, config.sr_nonneg
        # SQ: the disc matrix, normalised to unit Frobenius norm as in the official code; sq = 1: no pooling at all
        # (the official control normalises an all-ones M: every query becomes the mean query; docs/deviations.md)
        M = disc_mask(side, config.sq, config.wrap) if config.sq < 1 else None
        M = None if M is None else M / M.norm()
        self.register_buffer('sq_matrix', M, persistent=False)  # (D, D), symmetric
        # on the torus M is circulant: multiplying by M is a circular convolution of the grid with the disc around
        # unit 0, by FFT in D log D instead of D^2 (the disc is symmetric: a real spectrum)
        self.register_buffer('sq_kernel', torch.fft.rfft2(M[0].view(side, side)).real if M is not None and config.wrap
                             else None, persistent=False)  # (side, side // 2 + 1)
        self.register_buffer('sr_mask', disc_mask(side, config.sr, config.wrap) if config.sr < 1 else None,
                             persistent=False)  # (D, D) 0/1; None: dense

    def fold_queries(self, w_q):
        """A speed trick, set apart: q M = x (M W_q)^T (M fixed, symmetric), so M is folded into the D x D weight once a
        pass (by FFT on the torus) instead of pooling all B*T queries (the official (B*T) x D x D matmul). Tested."""
        if self.sq_kernel is None or w_q.device.type == 'mps':  # (the FFT path is untested on MPS)
            return self.sq_matrix @ w_q
        D, side = w_q.size(0), self.sq_kernel.size(0)
        w = w_q.t().reshape(D, side, side)  # (D_in, side, side): column j of W_q as an image on the grid
        return torch.fft.irfft2(torch.fft.rfft2(w) * self.sq_kernel, s=(side, side)).reshape(D, D).t()

    def forward(self, x, key_mask=None, return_maps=False):
        B, T, D = x.size()
        w_q = self.c_q.weight if self.sq_matrix is None else self.fold_queries(self.c_q.weight)  # (D, D)
        q = F.linear(x, w_q)  # (B, T, D) the pooled queries q' = q M
        k, v = self.c_kv(x).split(D, dim=2)  # (B, T, D) each
        qh, kh, vh = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # scores / sqrt(hs) (= sqrt(D) with one head); key_mask hides [PAD] keys; no dropout on the attention weights
        # (the official BERT's is 0). CUDA flash attention takes heads up to 256: the paper's 784 gets the efficient one
        y = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=key_mask).transpose(1, 2).contiguous().view(B, T, D)
        w_o = self.c_proj.weight  # (D, D): w_o[i, j] connects unit j of y to unit i of the output
        if self.sr_mask is not None:
            # SR: masked here, so the weights outside the disc get zero gradient (zero from the init on). sr_nonneg:
            # |W_o|, as the official code (in place): each output unit is a positive sum over its disc, mostly shared
            # with its neighbours, so the out maps turn topographic; signed ones do not (docs/deviations.md)
            w_o = (w_o.abs() if self.sr_nonneg else w_o) * self.sr_mask
        out = F.linear(y, w_o, self.c_proj.bias)  # (B, T, D): the 'out' map, where the official code looks
        # return_maps: the queries before pooling are the paper's query maps (an extra matmul, here only)
        maps = (F.linear(x, self.c_q.weight), k, v, out) if return_maps else None
        return self.resid_dropout(self.c_dense(out) if self.c_dense is not None else out), maps

class MLP(nn.Module):
    """GELU-GLU, as the paper's BERT: D -> ffn_size, one half gated by the GELU of the other, ffn_size / 2 -> D."""
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_size, bias=False)
        self.c_proj = nn.Linear(config.ffn_size // 2, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        a, gate = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(a * F.gelu(gate)))

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = SpatialSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, key_mask=None, return_maps=False):
        a, maps = self.attn(self.ln_1(x), key_mask, return_maps)
        x = x + a
        return x + self.mlp(self.ln_2(x)), maps

class Topoformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        side = math.isqrt(config.n_embd)
        if side * side != config.n_embd:
            raise UsageError(f"n_embd={config.n_embd} is not a perfect square (256 = 16 x 16, 400 = 20 x 20, ...)")
        if config.n_embd % config.n_head:
            raise UsageError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        if not (0 < config.sq <= 1 and 0 < config.sr <= 1):
            raise UsageError(f"sq={config.sq}, sr={config.sr}: each is a disc's fraction of the grid, in (0, 1]")
        if config.ffn_size < 2 or config.ffn_size % 2:
            raise UsageError(f"ffn_size={config.ffn_size} must be even: the GLU gate halves it")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        if config.n_class:
            self.classifier = nn.Linear(config.n_embd, config.n_class)
        else:  # the official BERT's prediction head (skip_head_transform: True): one dense Linear(D, D)
            self.prediction_head = nn.Linear(config.n_embd, config.n_embd, bias=False)  # before the decoder
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # the decoder
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if pn.endswith('c_proj.weight') or pn.endswith('c_dense.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        with torch.no_grad():  # SR: the weights outside the disc start (and stay) at zero
            for block in self.transformer.h:
                if block.attn.sr_mask is not None:
                    block.attn.c_proj.weight.mul_(block.attn.sr_mask)
        # four maps per layer, all on the same grid: unit i sits at (i // side, i % side)
        self.map_names = [f'h.{l}.{s}' for l in range(config.n_layer) for s in ('q', 'k', 'v', 'out')]
        self.register_buffer('unit_pos', grid_coords(side), persistent=False)  # (D, 2)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self):
        # the position embeddings are not counted, as in nanoGPT; the token embeddings are (tied)
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def positions(self, map_name):
        """(n_embd, 2) grid coordinates (row, col) of the units of one map, e.g. 'h.0.q'."""
        if map_name not in self.map_names:
            raise ValueError(f"no map {map_name!r}: maps are h.<layer>.{{q,k,v,out}}, e.g. h.0.q")
        return self.unit_pos.float()

    def forward(self, idx, targets=None, return_maps=False, picked=None):
        """idx: (B, T) token ids. Masked LM (n_class = 0): targets (B, T) hold the original token at the masked
        positions and IGNORE_INDEX elsewhere, picked (N,) their flat positions (found here if not given); the logits
        are then (N, vocab) for those N positions only, as BERT computes them, else (B, T, vocab). Classifier
        (n_class > 0): targets (B,) labels, logits (B, n_class). return_maps: also {'h.<l>.q|k|v|out': (B, T, D)}."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        # the classifier's batches are padded; the MLM chunks never are (no mask: the fastest attention)
        key_mask = (idx != PAD_ID)[:, None, None, :] if self.config.n_class else None  # (B, 1, 1, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device)))
        maps = []
        for block in self.transformer.h:
            x, m = block(x, key_mask, return_maps)
            maps += m or []
        x, loss = self.transformer.ln_f(x), None
        if self.config.n_class:
            keep = key_mask[:, 0, 0, :, None].to(x.dtype)  # (B, T, 1): mean over the review, not the padding
            logits = self.classifier((x * keep).sum(1) / keep.sum(1))  # (B, n_class)
            loss = None if targets is None else F.cross_entropy(logits, targets)
        elif targets is None:
            logits = self.lm_head(self.prediction_head(x))  # (B, T, vocab_size)
        else:
            # the head on the masked positions only: 15% of the (B*T) x vocab logits, as the official
            # sparse_prediction. picked comes with the batch: finding it here would wait for the device
            picked = (targets.view(-1) != IGNORE_INDEX).nonzero().squeeze(1) if picked is None else picked
            logits = self.lm_head(self.prediction_head(x.view(B * T, -1).index_select(0, picked)))  # (N, vocab)
            loss = F.cross_entropy(logits, targets.view(-1).index_select(0, picked))
        return (logits, loss, dict(zip(self.map_names, maps))) if return_maps else (logits, loss)

    @torch.no_grad()
    def fill_mask(self, idx, k=5):
        """The k likeliest tokens at each [MASK] of idx (B, T), and their probabilities: (probs, ids), each (N, k)
        for the N masks in row-major order; never a special token or the padding of the vocabulary."""
        if self.config.n_class:
            raise ValueError("a classifier has no masked-LM head")
        logits = self(idx)[0][idx == MASK_ID].float()  # (N, vocab_size)
        logits[:, EOT_ID:] = -float('inf')
        return torch.topk(F.softmax(logits, dim=-1), k, dim=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, eps=1e-8):
        # decay 2-D tensors, not biases or LayerNorms (the official BERT exempts by name and misses its LayerNorms)
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=(device_type == 'cuda') or None)

    @classmethod
    def from_checkpoint(cls, path, device='cpu'):
        """The trained model of a ckpt.pt or snapshot written by this script (or its loaded dict), in eval mode."""
        ckpt = load_checkpoint(path) if isinstance(path, str) else path
        model = cls(TopoformerConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
        return model.to(device).eval()

# ---- Data. MLM: nanoGPT's loader on the token files of prepare_data.py, masked as BERT does; sentiment: IMDB ---------

def mask_tokens(x, generator=None):
    """BERT's masking of a (B, T) batch: each token but the special ones (end-of-text, [PAD]) is picked with
    probability 0.15; a picked token becomes [MASK] 80% of the time, a random token 10%, and stays itself 10%.
    Returns the model's input and the targets: the original token where picked, IGNORE_INDEX elsewhere. All draws
    have fixed shapes, so a batch always consumes the same amount of the generator."""
    u = torch.rand(x.shape, generator=generator)
    u = u.masked_fill((x == EOT_ID) | (x == PAD_ID), 2.0)  # never picked, as in the official masking
    picked = u < MASK_PROB
    picked.view(-1)[u.view(-1).argmin()] |= bool(u.min() < 2)  # at least one target, even in a tiny batch
    r = torch.rand(x.shape, generator=generator)
    random_tokens = torch.randint(EOT_ID, x.shape, generator=generator)  # a real token, not end-of-text
    inp = torch.where(picked & (r < 0.8), MASK_ID, x)
    inp = torch.where(picked & (r >= 0.8) & (r < 0.9), random_tokens, inp)
    return inp, torch.where(picked, x, IGNORE_INDEX)

def open_split(cfg, split):
    """data_dir/dataset/split.bin as uint16 tokens, checked against meta.json, which prepare_data.py writes last."""
    folder = os.path.join(cfg['data_dir'], cfg['dataset'])
    path = os.path.join(folder, f'{split}.bin')
    rerun = f"run `python prepare_data.py` (Shakespeare) or `... --input=YOUR_TEXT --name={cfg['dataset']}`"
    if not os.path.isfile(path):
        raise UsageError(f"no {path}: {rerun}")
    try:
        with open(os.path.join(folder, 'meta.json'), encoding='utf-8') as f:
            n = json.load(f)[f'{split}_tokens']
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{folder} has no complete meta.json (an interrupted prepare_data.py?): {rerun}") from None
    if os.path.getsize(path) != 2 * n:
        raise UsageError(f"{path} does not hold the {n} tokens of meta.json, mixed or damaged: {rerun}")
    if n <= cfg['block_size'] + 1:
        raise UsageError(f"{path} has {n} tokens, too few for block_size={cfg['block_size']}")
    return np.memmap(path, dtype=np.uint16, mode='r')

def get_batch(data, batch_size, block_size, generator=None):
    # x: (B, T) masked random chunks of the token file, y: (B, T) the MLM targets, picked: (N,) where y is one
    ix = torch.randint(len(data) - block_size + 1, (batch_size,), generator=generator)
    x, y = mask_tokens(torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix]), generator)
    return x, y, (y.view(-1) != IGNORE_INDEX).nonzero().squeeze(1)

def load_imdb(imdb_dir, split, block_size):
    """The reviews of imdb_dir/<split>/{neg,pos}/*.txt (the aclImdb layout), GPT-2 tokenized, cut to their first
    block_size tokens: tokens (N, block_size) padded with PAD_ID, labels (N,), 0 = negative, in file name order."""
    texts, labels = [], []
    for label, sub in enumerate(('neg', 'pos')):
        folder = os.path.join(imdb_dir, split, sub)
        files = sorted(f for f in os.listdir(folder) if f.endswith('.txt')) if os.path.isdir(folder) else []
        if not files:
            raise UsageError(f"no reviews in {folder}: --imdb_dir must hold the IMDB layout {{train,test}}/"
                             f"{{pos,neg}}/*.txt (get it with `python prepare_data.py --dataset=imdb`)")
        for f in files:
            with open(os.path.join(folder, f), encoding='utf-8', errors='replace') as fh:
                texts.append(fh.read().replace('<br />', ' '))  # IMDB's line breaks are HTML
        labels += [label] * len(files)
    import tiktoken
    try:
        enc = tiktoken.get_encoding('gpt2')
    except Exception as e:
        raise UsageError(f"tiktoken could not load the GPT-2 vocabulary ({type(e).__name__}); offline, point "
                         f"TIKTOKEN_CACHE_DIR at a copy of tiktoken's cache (see README)") from None
    ids = [t[:block_size] for t in enc.encode_ordinary_batch(texts)]
    keep = [i for i, t in enumerate(ids) if t]  # an empty review has nothing to classify
    tokens = [F.pad(torch.tensor(ids[i]), (0, block_size - len(ids[i])), value=PAD_ID) for i in keep]
    return torch.stack(tokens), torch.tensor(labels)[keep]

def imdb_batch(tokens, labels, ix):
    # x: (B, T) reviews padded up to the longest of the batch, y: (B,) labels
    x = tokens[ix]
    return x[:, :int((x != PAD_ID).sum(1).max())], labels[ix]

# ---- The training loop: its own functions (the learning rate, one step, an evaluation), then main() ------------------

def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr. Depends on the iteration only (for resume)."""
    decay_iters = cfg['lr_decay_iters'] or cfg['max_iters']
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / (cfg['warmup_iters'] + 1)
    if it > decay_iters:
        return cfg['min_lr']
    ratio = (it - cfg['warmup_iters']) / max(1, decay_iters - cfg['warmup_iters'])
    return cfg['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg['learning_rate'] - cfg['min_lr'])

def train_step(model, optimizer, scaler, ctx, next_batch, accum, grad_clip):
    """One step of accum micro-batches, next_batch() -> (x, y, the model's other inputs) -> (loss, gradient norm)."""
    ddp = isinstance(getattr(model, '_orig_mod', model), DDP)  # (compiled: the DDP inside; no_sync reaches it)
    for micro_step in range(accum):
        x, y, kw = next_batch()
        with model.no_sync() if ddp and micro_step < accum - 1 else nullcontext():  # DDP: all-reduce at the last only
            with ctx:
                _, loss = model(x, y, **kw)
            scaler.scale(loss / accum).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
    scaler.step(optimizer)  # (fp16: a step with gradients that are not finite is skipped)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), norm  # tensors: nothing here waits for the device

@torch.no_grad()
def estimate_loss(model, batch, eval_iters, seed, ctx):
    """{split: (mean loss, mean accuracy)} over eval_iters batches (the accuracy of a classifier only). The same
    batches every time (own generator), the training RNG stream untouched (fork_rng): resume stays exact."""
    out = {}
    model.eval()
    with torch.random.fork_rng(devices=[]):
        for split in ('train', 'val'):
            g, losses, accs = torch.Generator().manual_seed(seed), torch.zeros(eval_iters), torch.zeros(eval_iters)
            for k in range(eval_iters):
                x, y, kw = batch(split, g)
                with ctx:
                    logits, loss = model(x, y, **kw)
                losses[k] = loss.item()
                accs[k] = (logits.argmax(-1) == y).float().mean().item() if model.config.n_class else 0
            out[split] = (losses.mean().item(), accs.mean().item())
    model.train()
    return out

@torch.no_grad()
def accuracy(model, tokens, labels, batch_size, dev, ctx):
    """Sentiment: the fraction of the reviews classified right, all of them, in order."""
    model.eval()
    right = 0
    for i in range(0, len(labels), batch_size):
        x, y = to_device(dev, *imdb_batch(tokens, labels, torch.arange(i, min(i + batch_size, len(labels)))))
        with ctx:
            right += (model(x)[0].argmax(-1) == y).sum().item()
    return right / len(labels)

def main(argv):
    cfg, given = parse_config(argv, DEFAULTS, PRESETS, HELP, __file__)
    cfg = {**cfg, **TASK_DEFAULTS[cfg['task']], **given}  # the task's defaults, under the preset and the keys
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    ckpt = load_checkpoint(ckpt_path, resume=True) if cfg['resume'] else None
    cfg = resume_config(ckpt, given, ckpt_path) if ckpt else cfg
    snapshots = check_schedule(cfg)
    ddp, rank, world, dev = start_processes(cfg['device'])
    dtype, ctx, scaler = precision(cfg['dtype'], dev)
    accum, B = share_step(cfg['gradient_accumulation_steps'], cfg['batch_size'], world)
    master, sentiment, T, side = rank == 0, cfg['task'] == 'sentiment', cfg['block_size'], math.isqrt(cfg['n_embd'])
    torch.manual_seed(cfg['seed'] + rank)  # each process draws its own batches and masks
    model_args = ckpt['model_args'] if ckpt else {**{f.name: cfg[f.name] for f in fields(TopoformerConfig)
                                                     if f.name in cfg}, 'n_class': 2 if sentiment else 0}
    if sentiment != bool(model_args['n_class']):
        raise UsageError(f"--task={cfg['task']} does not fit the saved {'masked LM' if sentiment else 'classifier'}")
    model = raw_model = Topoformer(TopoformerConfig(**model_args)).to(dev)
    optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'], (cfg['beta1'], cfg['beta2']),
                                           dev.split(':')[0], cfg['adam_eps'])
    iter_num, best_val_loss, first_val_loss = 0, float('inf'), None
    if ckpt:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt.get('scaler') or scaler.state_dict())  # fp16: the scale the run had reached
        iter_num, best_val_loss, first_val_loss = ckpt['iter_num'], ckpt['best_val_loss'], ckpt['first_val_loss']
        set_rng_state(ckpt['rng'], dev, cfg['seed'] + rank + 1000 * iter_num if ddp else None)
        ckpt = None  # free the memory
    if sentiment:  # the reviews, every 10th training review held out for validation
        tokens, labels = load_imdb(cfg['imdb_dir'], 'train', T)
        is_val = torch.arange(len(labels)) % 10 == 0
        data = {'train': (tokens[~is_val], labels[~is_val]), 'val': (tokens[is_val], labels[is_val])}
        test_set = load_imdb(cfg['imdb_dir'], 'test', T)
        batch = lambda split, g=None: (*to_device(dev, *imdb_batch(*data[split], torch.randint(
            len(data[split][1]), (B,), generator=g))), {})
    else:
        data = {split: open_split(cfg, split) for split in ('train', 'val')}
        def batch(split, generator=None):  # the masked positions come with the batch, from the CPU
            x, y, picked = to_device(dev, *get_batch(data[split], B, T, generator))
            return x, y, dict(picked=picked)
    writable_dir(cfg['out_dir'])  # in every process: a usage error that all of them stop on
    per_iter, unit = accum * world * B * (1 if sentiment else T), 'reviews' if sentiment else 'tok'
    if master:
        kind = 'the non-topographic control' if cfg['sq'] == cfg['sr'] == 1 else 'Topoformer'
        print(f"{kind}: {model.get_num_params() / 1e6:.2f}M parameters, {cfg['n_layer']} layers, {side}x{side} grid "
              f"({'torus' if cfg['wrap'] else 'flat'}), sq={cfg['sq']}, sr={cfg['sr']}, task {cfg['task']}\ndevice "
              f"{dev}, {dtype}, {world} process(es) of {accum} x {B} sequences, {per_iter:,} {unit} per iteration"
              + "\ncompiling the model... (under a minute on a CPU, during the first steps)" * cfg['compile'])
    if ddp:  # DDP, then compile, as PyTorch documents: the all-reduce then overlaps the compiled backward
        model = DDP(model, device_ids=[dev] if dev.startswith('cuda') else None, broadcast_buffers=False)
    if cfg['compile']:
        warnings.filterwarnings('ignore', module=r'torch\._inductor')  # notes on its internals, not on the model
        model = torch.compile(model)
    start_iter, saved = iter_num, (iter_num if cfg['resume'] else None)  # saved: the step ckpt.pt holds
    if saved is None and master and os.path.exists(ckpt_path):
        print(f"note: {ckpt_path} is an earlier run's; this run replaces it at its first save (--resume continues it)")
    t0, it0, what = time.time(), iter_num, 'loss' if sentiment else 'masked-token loss'
    diverged = lambda why: UsageError(f"training diverged at iter {iter_num} ({why}) and stopped; "
                                      f"{last_checkpoint(ckpt_path, saved)}. Try a lower learning_rate.")
    try:
        while True:
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group['lr'] = lr
            if master and (iter_num % cfg['eval_interval'] == 0 or iter_num in snapshots | {cfg['max_iters']}):
                (tl, ta), (vl, va) = estimate_loss(raw_model, batch, cfg['eval_iters'], cfg['seed'], ctx).values()
                print(f"step {iter_num}: train {what} {tl:.4f}, val {what} {vl:.4f}"
                      + (f", train acc {ta:.3f}, val acc {va:.3f}" if sentiment else ''))
                first_val_loss = vl if first_val_loss is None else first_val_loss
                if not math.isfinite(tl + vl) or vl > 2 * first_val_loss + 1:  # diverged: never saved
                    raise diverged(f"val loss {vl:.4g}, it started at {first_val_loss:.4g}")
                best_val_loss = min(best_val_loss, vl)
                if iter_num > start_iter:  # (a resumed run's first evaluation has nothing new to save)
                    left, saved = last_checkpoint(ckpt_path, saved), iter_num  # (a Ctrl-C in the save comes after it)
                    save_checkpoint(ckpt_path, checkpoint_of(raw_model, iter_num, cfg, optimizer, dev, best_val_loss,
                                                             first_val_loss, scaler=scaler.state_dict()), left)
                if iter_num in snapshots and (iter_num > start_iter or not cfg['resume']):
                    save_checkpoint(os.path.join(cfg['out_dir'], 'snapshots', f'step_{iter_num:06d}.pt'), checkpoint_of(
                        raw_model, iter_num, cfg, losses=dict(train=tl, val=vl)), last_checkpoint(ckpt_path, saved))
                t0, it0 = time.time(), iter_num
            if iter_num >= cfg['max_iters']:
                break
            loss, norm = train_step(model, optimizer, scaler, ctx, lambda: batch('train'), accum, cfg['grad_clip'])
            iter_num += 1
            if master and iter_num % cfg['log_interval'] == 0:  # the one wait for the device, every log_interval
                loss, dt = loss.item(), (time.time() - t0) / (iter_num - it0)
                if not math.isfinite(loss):  # (a non-finite step has reached the weights, unless fp16 skipped it)
                    raise diverged(f"loss {loss}, gradient norm {norm.item():.4g}")
                print(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                      f"{per_iter / dt:,.0f} {unit}/s", flush=True)
                t0, it0 = time.time(), iter_num
    except KeyboardInterrupt:
        raise KeyboardInterrupt(last_checkpoint(ckpt_path, saved)) from None
    if start_iter >= cfg['max_iters'] and master:
        print(f"nothing to train: the run is at iter {start_iter} and max_iters={cfg['max_iters']}")
    if master and sentiment:
        print(f"test accuracy {accuracy(raw_model, *test_set, 2 * B, dev, ctx):.4f} on {len(test_set[1])} reviews")
    if ddp:
        destroy_process_group()

# =============================================================================
# Plumbing that is not the model: command line, devices, precision, checkpoint files, command(). The same in
# topo_gpt.py and topoformer.py (a test keeps the copies identical), so that each script stands alone.

class UsageError(ValueError):
    """Bad input: one line, no traceback (command()). The models raise it for a shape they cannot take."""

def parse_config(argv, defaults, presets, doc, source):
    """The defaults, --preset=NAME over them, each --key=value (a bare --flag: True) over both -> (config, keys set)."""
    with open(source, encoding='utf-8') as f:
        notes = dict(re.findall(r"^(\w+) = .*?  # (.*)$", f.read().split('\nDEFAULTS')[0], re.M))
    checks = {k: (re.match(r"((?:\S+ <=? )?x [<>]=? \S+|[\w-]*(?:\|[\w-]*)+): ", notes[k]) or [''] * 2)[1]
              for k in defaults}
    parser = argparse.ArgumentParser(os.path.basename(source), '%(prog)s [--key=value ...]', doc, '\n'.join(
        f"--preset={name}: {p}" for name, p in presets.items()), formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False, argument_default=argparse.SUPPRESS)
    def error(message):  # argparse's own messages (a bad type, an unknown key, ...), as a UsageError
        raise UsageError(f"{message.removeprefix('argument ')} (see --help)")
    parser.error = error
    for key, default in defaults.items():
        choices = ['', *presets] if key == 'preset' else checks[key].split('|') if '|' in checks[key] else None
        flag = {'nargs': '?', 'const': True} if isinstance(default, bool) else {}  # a bare --flag is True
        parser.add_argument(f'--{key}', type=boolean if flag else type(default), choices=choices,
                            metavar='True|False' if flag else '', help=f"{notes[key]} ({default!r})", **flag)
    given = vars(parser.parse_args(argv))
    given = {**presets.get(given.get('preset'), {}), **given}  # explicit keys win over the preset
    for key, value in given.items():
        check = checks[key] if 'x' in checks[key] else 'True'
        if type(value) in (int, float) and not (math.isfinite(value) and eval(check, {'x': value})):
            raise UsageError(f"--{key}={value}: must be finite{f' and {check}' * (check != 'True')}")
    return {**defaults, **given}, given

def boolean(text):
    """A boolean on the command line: True, False, 1 or 0 (else a ValueError, which argparse reports)."""
    return ['false', '0', 'true', '1'].index(text.lower()) >= 2

def start_processes(device):
    """One process, or one per device under torchrun (DDP) -> (ddp, rank, world, device), a GPU made current."""
    rank, world, local, n_local = [int(os.environ.get(k, 0))
                                   for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE')]
    n_gpus, mps = torch.cuda.device_count() if torch.cuda.is_available() else 0, torch.backends.mps.is_available()
    dev = device if device != 'auto' else 'cuda' if n_gpus else 'mps' if mps else 'cpu'
    if dev.startswith('cuda:') and n_local > 1:
        raise UsageError(f"--device={dev} puts all {n_local} processes on one GPU; under torchrun use --device=cuda")
    dev = f'cuda:{local}' if dev == 'cuda' else dev
    if not (dev == 'cpu' or dev == 'mps' and mps or re.fullmatch(r'cuda:\d+', dev) and int(dev[5:]) < n_gpus):
        raise UsageError(f"--device={device}: not a device (this machine has cpu{f', {n_gpus} GPUs' * bool(n_gpus)}"
                         f"{', mps' * mps}){f'; start at most --nproc_per_node={n_gpus}' * bool(n_local)}")
    if 'cuda' in dev:
        torch.cuda.set_device(dev)  # synchronize, memory figures and bf16 support then ask this GPU
    if 'RANK' in os.environ:
        init_process_group(backend='nccl' if 'cuda' in dev else 'gloo')
        # torch 2.13 deprecates main()'s DDP(broadcast_buffers=False) (the buffers are alike everywhere): no notice
        warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated', category=FutureWarning)
    if dev == 'cpu':
        keep_freed_memory()
    return 'RANK' in os.environ, rank, max(world, 1), dev

def precision(name, dev):
    """--dtype -> (dtype, autocast, scaler); auto: bf16 where native, else fp16 with a scaler on CUDA, else float32."""
    kind = dev.split(':')[0]
    native = (torch.cuda.is_bf16_supported(including_emulation=False) if kind == 'cuda' else kind == 'cpu' and any(
        getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')))
    dtype = name if name != 'auto' else 'bfloat16' if native else 'float16' if kind == 'cuda' else 'float32'
    if dtype == 'float16' and kind == 'cpu' or dtype == 'bfloat16' and kind == 'cuda' and not native:
        raise UsageError(f"--dtype={dtype}: this {'GPU has no native bf16' if kind == 'cuda' else 'needs a GPU'}; use "
                         f"{'float16' if kind == 'cuda' else 'bfloat16'} or float32")
    torch.backends.cuda.matmul.allow_tf32 = dtype == 'float32'  # (so under autocast the float32 spatial loss is exact)
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=kind, dtype=getattr(torch, dtype))
    return dtype, ctx, torch.amp.GradScaler(kind, enabled=dtype == 'float16')

def share_step(accum, batch_size, world):
    """A step of accum x batch_size sequences over world processes: fewer micro-batches each, or smaller ones."""
    if accum % world and batch_size % world:
        raise UsageError(f"a step of {accum} x {batch_size} sequences cannot be shared evenly by {world} processes: "
                         f"make gradient_accumulation_steps or batch_size a multiple of {world}")
    return (accum // world, batch_size) if accum % world == 0 else (accum, batch_size // world)

def to_device(dev, *tensors):
    """CPU tensors (or None) on dev; on CUDA pinned and not waiting, so that the copy overlaps the GPU's work."""
    return [t if t is None else t.pin_memory().to(dev, non_blocking=True) if 'cuda' in dev else t.to(dev)
            for t in tensors]

def keep_freed_memory():
    """glibc returns big freed blocks (the logits) to the OS, and fresh pages are slow (docs/speed.md): keep them."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: big blocks come from the heap, not fresh mmaps
        libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD = -1: never hand freed heap memory back
    except (OSError, AttributeError):
        pass  # not glibc (macOS, Windows): nothing to do

def check_schedule(cfg):
    """Check the learning-rate schedule; the steps of --snapshot_iters (log: 0, 25, 50, 100, 200, ... and the last)."""
    spec, last = cfg['snapshot_iters'].replace(' ', ''), cfg['max_iters']
    if cfg['min_lr'] > cfg['learning_rate']:
        raise UsageError(f"--min_lr={cfg['min_lr']:g} is above --learning_rate={cfg['learning_rate']:g}")
    if spec != 'log' and (not re.fullmatch(r'(\d+(,\d+)*)?', spec) or any(int(s) > last for s in spec.split(',') if s)):
        raise UsageError(f"--snapshot_iters={spec}: expected log, or steps from 0 to max_iters={last} such as 0,50,100")
    if spec == 'log':
        return {0, last, *(25 * 2 ** k for k in range(last.bit_length()) if 25 * 2 ** k < last)}
    return {int(s) for s in spec.split(',') if s}

@contextmanager
def signals_deferred():
    """Ctrl-C (SIGINT) or SIGTERM inside this block waits until the block is done, then acts as usual."""
    caught = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            os.kill(os.getpid(), s)  # delivered now, to the handler that was there before

def save_checkpoint(path, ckpt, left):
    """ckpt into path via a temporary file and a rename, Ctrl-C held off: a kill or a full disk leaves the old file
    whole. If the save fails, its error says left: what the run leaves behind (last_checkpoint)."""
    with signals_deferred():
        try:
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
            with open(path + '.tmp', 'wb') as f:
                torch.save(ckpt, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + '.tmp', path)
        except (OSError, RuntimeError) as e:
            if os.path.exists(path + '.tmp'):
                os.remove(path + '.tmp')
            raise UsageError(f"could not write {path} ({(str(e) or type(e).__name__).splitlines()[0]}; a full disk?): "
                             f"{left}") from None
    print(f"saved {path}")

def checkpoint_of(model, iter_num, cfg, optimizer=None, dev=None, best_val_loss=None, first_val_loss=None, **more):
    """A snapshot (model, places, step, config); with the optimizer a checkpoint, all that a bit-exact resume needs."""
    ckpt = dict(model_type=MODEL_TYPE, model_args=asdict(model.config), model=model.state_dict(), iter_num=iter_num,
                config=cfg, **more)
    if optimizer is not None:
        ckpt.update(optimizer=optimizer.state_dict(), best_val_loss=best_val_loss, first_val_loss=first_val_loss, rng={
            'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(dev) if 'cuda' in dev else None})
    return ckpt

def last_checkpoint(path, step):
    """What a stopped run leaves behind; step: the step that path holds, if it is this run's (else None)."""
    if step is not None:
        return f"{path} holds step {step}, intact"
    return "no checkpoint was saved" + (f" ({path} is an earlier run's, intact)" if os.path.exists(path) else '')

def load_checkpoint(path, resume=False):
    """A checkpoint or snapshot of this script, checked for all that from_checkpoint (resume: --resume) reads."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}" + " (for --resume, set --out_dir to the run's folder)" * resume)
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise UsageError(f"{path} cannot be read: damaged, cut short or no torch file ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get('model_type') != MODEL_TYPE:
        raise UsageError(f"{path} is not a {MODEL_TYPE} checkpoint written by {os.path.basename(__file__)}")
    missing = [k for k in ['model_args', 'model'] + resume * ['optimizer', 'iter_num', 'best_val_loss',
                                                            'first_val_loss', 'config', 'rng'] if k not in ckpt]
    if missing:
        raise UsageError(f"{path} is incomplete{' for --resume (a snapshot?)' * resume}: it lacks {', '.join(missing)}")
    return ckpt

def set_rng_state(rng, dev, ddp_seed=None):
    """A checkpoint's RNG states, its GPU's on this GPU; under DDP (only rank 0's were saved) a per-process ddp_seed."""
    if ddp_seed is not None:
        return torch.manual_seed(ddp_seed)
    torch.set_rng_state(rng['torch'])
    if rng['cuda'] is not None and 'cuda' in dev:
        torch.cuda.set_rng_state(rng['cuda'], dev)

def resume_config(ckpt, given, path):
    """The run's config, the keys given now over it, the model's fields (shape, alpha, sq, ...) the checkpoint's."""
    old = {**DEFAULTS, **ckpt['config']}
    cfg = {**old, **given, **{k: v for k, v in ckpt['model_args'].items() if k in old}}
    ignored = ', '.join(f'--{k}' for k, v in ckpt['model_args'].items() if k in given and given[k] != v)
    changed = [k for k in 'learning_rate min_lr warmup_iters lr_decay_iters max_iters'.split() if cfg[k] != old[k]]
    if int(os.environ.get('RANK', 0)) == 0:
        it = ckpt['iter_num']
        print(f"resuming from step {it} of {path}" + f"; ignoring {ignored}: --resume keeps the model" * bool(ignored))
        if any(get_lr(i, cfg) != get_lr(i, old) for i in range(it, cfg['max_iters'])):  # (not: the same schedule)
            print(f"note: {', '.join(f'--{k}={cfg[k]:g} (the run had {old[k]:g})' for k in changed)}: the learning "
                  f"rate follows the new schedule, {get_lr(it, cfg):.2e} at step {it} instead of {get_lr(it, old):.2e}")
    return cfg

def writable_dir(path):
    """Fail now unless path is a folder this run can make and write (made at the first save only)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out_dir={path} is not a folder this run can write ({existing} is not a writable folder)")

def command(main, argv, interrupted=''):
    """main as a command: a UsageError is one line, exit 2; Ctrl-C one line, what is left, exit 130."""
    rank = int(os.environ.get('RANK', 0))
    try:
        main(argv)
        return 0
    except UsageError as e:
        if rank:
            # torchrun stops all when one exits: wait for process 0 to say why (still alive: it did not, so say it here)
            time.sleep(30)
        print(f"error: {f'process {rank}: ' * bool(rank)}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if not rank:
            print('; '.join(['error: interrupted'] + [s for s in (str(e), interrupted) if s][:1]), file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not rank:
            raise
        # under torchrun, when the first process stops (it says why), the others' collective calls fail
        print(f"error: process {rank} stopped: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 1

if __name__ == '__main__':
    sys.exit(command(main, sys.argv[1:]))
