"""
Tests of topoformer.py: the spatial geometry, spatial querying and reweighting, the control, MLM masking,
training (MLM and sentiment), checkpoints, resume, the CLI's errors and --compile.

    cd /work/main && TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python -m pytest -q tests_topoformer.py
"""

import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
_cache = os.path.join(HERE, '..', 'shared', 'tiktoken_cache')
if os.path.isdir(_cache) and 'TIKTOKEN_CACHE_DIR' not in os.environ:
    os.environ['TIKTOKEN_CACHE_DIR'] = _cache

import topoformer as tf  # noqa: E402
from topoformer import Topoformer, TopoformerConfig, SpatialSelfAttention  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one thread is as fast as two, and immune to the stalls a second
    OpenMP thread suffers on a busy machine (measured here: 10x slower steps at times)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw):
    args = dict(n_layer=2, n_head=1, n_embd=64, ffn_size=128, block_size=32, dropout=0.0, sq=0.3, sr=0.3)
    return TopoformerConfig(**{**args, **kw})


def write_bins(root, name='tiny', n=20000, seed=0):
    """A token file MLM can learn from: sentences drawn from a small vocabulary, EOT between them."""
    rng = np.random.default_rng(seed)
    words = rng.choice(50000, size=40, replace=False)
    toks = []
    while len(toks) < n:
        toks += list(rng.choice(words, size=rng.integers(5, 15))) + [tf.EOT_ID]
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    arr = np.array(toks[:n], dtype=np.uint16)
    arr[: n * 9 // 10].tofile(os.path.join(d, 'train.bin'))
    arr[n * 9 // 10:].tofile(os.path.join(d, 'val.bin'))
    return str(root)


def write_imdb(root, n_train=120, n_test=50, seed=0):
    """The aclImdb layout, with reviews that are plainly positive or negative."""
    rnd = random.Random(seed)
    pos = "great wonderful excellent superb loved brilliant amazing delightful".split()
    neg = "awful terrible boring hated dreadful horrible worst dull".split()
    neutral = "the movie film was a and it this of plot actor scene story".split()
    for split, n in (('train', n_train), ('test', n_test)):
        for label, words in (('pos', pos), ('neg', neg)):
            d = os.path.join(root, split, label)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                w = [rnd.choice(neutral) for _ in range(rnd.randint(10, 30))]
                for _ in range(3):
                    w.insert(rnd.randrange(len(w)), rnd.choice(words))
                with open(os.path.join(d, f'{i}_{rnd.randint(1, 10)}.txt'), 'w') as f:
                    f.write(' '.join(w) + '<br /><br />')
    return str(root)


def run_cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, 'topoformer.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


# -----------------------------------------------------------------------------
# spatial geometry

def test_disc_masks_are_symmetric_and_cover_their_fraction():
    for side, tol in ((16, 0.035), (20, 0.01), (28, 0.015), (40, 0.005)):  # lattice rounding, shrinking
        for frac in (0.1, 0.3):
            M = tf.disc_mask(side, frac, wrap=True)
            assert torch.equal(M, M.t())
            assert torch.all(M.diagonal() == 1)
            # on the torus every disc is the same: each covers ~frac of the grid, up to lattice rounding
            cover = M.sum(1) / side**2
            assert torch.all(cover == cover[0])
            assert abs(cover[0].item() - frac) < tol, (side, frac, cover[0].item())
            flat = tf.disc_mask(side, frac, wrap=False)
            assert torch.equal(flat, flat.t())
            # on the flat grid the discs of edge units are cut: less coverage, never more
            assert flat.sum(1).max() <= M.sum(1)[0] and flat.sum(1).min() < M.sum(1)[0]


def test_torus_and_flat_distances_on_a_4x4_grid_by_hand():
    # units at (row, col) / 4; unit 3 = (0, 3), unit 12 = (3, 0), unit 15 = (3, 3), unit 5 = (1, 1)
    d_torus, d_flat = tf.grid_distances(4, wrap=True), tf.grid_distances(4, wrap=False)
    assert d_torus[0, 3].item() == pytest.approx(0.25)  # one step the other way round
    assert d_flat[0, 3].item() == pytest.approx(0.75)
    assert d_torus[0, 15].item() == pytest.approx(math.sqrt(2) / 4)
    assert d_flat[0, 15].item() == pytest.approx(3 * math.sqrt(2) / 4)
    assert d_torus[0, 5].item() == d_flat[0, 5].item() == pytest.approx(math.sqrt(2) / 4)
    assert d_torus.max().item() == pytest.approx(math.sqrt(0.5))
    # a disc of radius 0.26 (frac = pi 0.26^2) holds a unit and its 4 nearest neighbours only
    frac = math.pi * 0.26**2
    torus, flat = tf.disc_mask(4, frac, wrap=True), tf.disc_mask(4, frac, wrap=False)
    assert sorted(torch.nonzero(torus[0]).flatten().tolist()) == [0, 1, 3, 4, 12]
    assert sorted(torch.nonzero(flat[0]).flatten().tolist()) == [0, 1, 4]
    assert sorted(torch.nonzero(flat[5]).flatten().tolist()) == [1, 4, 5, 6, 9]


def test_positions_are_the_integer_lattice():
    model = Topoformer(tiny_config())
    assert model.map_names[:4] == ['h.0.q', 'h.0.k', 'h.0.v', 'h.0.out']
    pos = model.positions('h.1.out')
    assert pos.shape == (64, 2) and pos.dtype == torch.float32
    assert torch.equal(pos, pos.round())
    assert sorted(map(tuple, pos.long().tolist())) == [(r, c) for r in range(8) for c in range(8)]
    with pytest.raises(ValueError):
        model.positions('h.2.q')


# -----------------------------------------------------------------------------
# spatial querying, spatial reweighting, the control

def literal_attention(attn, x):
    """The paper's equations, written out: q' = q M, softmax(q' k^T / sqrt(D)) v, (W_o * mask)."""
    D = x.size(-1)
    q = x @ attn.c_q.weight.t()
    if attn.sq_matrix is not None:
        q = q @ attn.sq_matrix
    k, v = (x @ attn.c_kv.weight.t()).split(D, dim=-1)
    y = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1) @ v
    w_o = attn.c_proj.weight
    if attn.sr_mask is not None:
        w_o = (w_o.abs() if attn.sr_nonneg else w_o) * attn.sr_mask
    return y @ w_o.t()


@pytest.mark.parametrize('wrap', [True, False])
def test_folded_spatial_querying_equals_the_literal_formula(wrap):
    torch.manual_seed(0)
    attn = SpatialSelfAttention(tiny_config(n_embd=100, sq=0.2, sr=0.3, wrap=wrap))
    x = torch.randn(3, 9, 100)
    w = attn.c_q.weight
    folded = F.linear(x, attn.fold_queries(w))
    literal = (x @ w.t()) @ attn.sq_matrix
    torch.testing.assert_close(folded, literal, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn(x)[0], literal_attention(attn, x), atol=1e-6, rtol=1e-5)
    # M is the disc, normalised to unit Frobenius norm
    M = attn.sq_matrix
    assert M.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(M > 0, tf.disc_mask(10, 0.2, wrap) > 0)


def test_spatial_querying_pools_queries_locally():
    # a query that is one unit's impulse becomes, after pooling, nonzero exactly on that unit's disc
    torch.manual_seed(0)
    attn = SpatialSelfAttention(tiny_config(n_embd=256, sq=0.1))
    with torch.no_grad():
        attn.c_q.weight.copy_(torch.eye(256))
    x = torch.zeros(1, 1, 256)
    x[0, 0, 37] = 1.0
    pooled = F.linear(x, attn.fold_queries(attn.c_q.weight))[0, 0]
    assert torch.equal(pooled.abs() > 1e-6, tf.disc_mask(16, 0.1)[37] > 0)


@pytest.mark.parametrize('nonneg', [False, True])
def test_masked_sr_weights_get_zero_gradient_and_stay_zero(nonneg):
    torch.manual_seed(0)
    model = Topoformer(tiny_config(sr_nonneg=nonneg))
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.98), 'cpu')
    idx = torch.randint(0, 50257, (4, 32))
    inp, targets = tf.mask_tokens(idx)
    for _ in range(3):
        _, loss = model(inp, targets)
        loss.backward()
        for block in model.transformer.h:
            off = block.attn.sr_mask == 0
            assert off.float().mean() > 0.5
            assert torch.all(block.attn.c_proj.weight.grad[off] == 0)
            assert block.attn.c_proj.weight.grad[~off].abs().sum() > 0
        opt.step()
        opt.zero_grad()
    for block in model.transformer.h:  # weight decay and Adam leave them at exactly zero
        assert torch.all(block.attn.c_proj.weight[block.attn.sr_mask == 0] == 0)
    if nonneg:  # the forward pass uses |W_o| inside the disc: the sign of the stored weights is ignored
        attn = model.transformer.h[0].attn
        x = torch.randn(1, 5, 64)
        out = attn(x)[0]
        torch.testing.assert_close(out, literal_attention(attn, x))
        with torch.no_grad():
            attn.c_proj.weight.neg_()
        torch.testing.assert_close(attn(x)[0], out)


def test_control_is_plain_multihead_attention():
    torch.manual_seed(0)
    attn = SpatialSelfAttention(tiny_config(sq=1.0, sr=1.0))
    assert attn.sq_matrix is None and attn.sr_mask is None
    mha = nn.MultiheadAttention(64, 1, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.c_q.weight, attn.c_kv.weight]))
        mha.out_proj.weight.copy_(attn.c_proj.weight)
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(attn(x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-6, rtol=1e-5)
    # with more heads too
    attn4 = SpatialSelfAttention(tiny_config(sq=1.0, sr=1.0, n_head=4))
    mha4 = nn.MultiheadAttention(64, 4, bias=False, batch_first=True)
    with torch.no_grad():
        mha4.in_proj_weight.copy_(torch.cat([attn4.c_q.weight, attn4.c_kv.weight]))
        mha4.out_proj.weight.copy_(attn4.c_proj.weight)
    torch.testing.assert_close(attn4(x)[0], mha4(x, x, x, need_weights=False)[0], atol=1e-6, rtol=1e-5)
    # and the control's output projection is dense: no weight is zero
    assert torch.all(Topoformer(tiny_config(sq=1.0, sr=1.0)).transformer.h[0].attn.c_proj.weight != 0)


def test_return_maps():
    torch.manual_seed(0)
    model = Topoformer(tiny_config()).eval()
    idx = torch.randint(0, 50257, (3, 12))
    logits, loss, maps = model(idx, return_maps=True)
    assert loss is None and logits.shape == (3, 12, 50304)
    assert list(maps) == [f'h.{l}.{s}' for l in range(2) for s in ('q', 'k', 'v', 'out')]
    assert all(m.shape == (3, 12, 64) for m in maps.values())
    # the query map is the queries before pooling; the pooled ones feed the scores
    x = model.transformer.h[0].ln_1(model.transformer.wte(idx) + model.transformer.wpe(torch.arange(12)))
    torch.testing.assert_close(maps['h.0.q'], x @ model.transformer.h[0].attn.c_q.weight.t())
    torch.testing.assert_close(model(idx)[0], logits)


# -----------------------------------------------------------------------------
# masked language modelling

def test_mlm_masking_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.full((400, 500), 1234)
    inp, targets = tf.mask_tokens(x, g)
    picked = targets != tf.IGNORE_INDEX
    assert abs(picked.float().mean().item() - 0.15) < 0.005
    assert torch.all(targets[picked] == 1234)
    assert torch.equal(inp[~picked], x[~picked])  # unpicked tokens are untouched
    n = picked.sum().item()
    masked = (inp[picked] == tf.MASK_ID).sum().item() / n
    kept = (inp[picked] == 1234).sum().item() / n
    rand = inp[picked][(inp[picked] != tf.MASK_ID) & (inp[picked] != 1234)]
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(len(rand) / n - 0.1) < 0.01
    assert rand.min() >= 0 and rand.max() < tf.N_TOKENS  # random replacements are real GPT-2 tokens
    assert len(rand.unique()) > 1000
    # the special ids sit in the padded part of the vocabulary
    assert tf.N_TOKENS <= tf.MASK_ID < 50304 and tf.N_TOKENS <= tf.PAD_ID < 50304 and tf.MASK_ID != tf.PAD_ID
    # a tiny batch still has a target
    _, t = tf.mask_tokens(torch.zeros(1, 2, dtype=torch.long), torch.Generator().manual_seed(3))
    assert (t != tf.IGNORE_INDEX).sum() >= 1


def test_mlm_loss_is_on_the_masked_positions_only():
    torch.manual_seed(0)
    model = Topoformer(tiny_config()).eval()
    idx = torch.randint(0, 50257, (2, 16))
    inp, targets = tf.mask_tokens(idx, torch.Generator().manual_seed(1))
    logits, loss = model(inp, targets)
    picked = targets != tf.IGNORE_INDEX
    assert logits.shape == (picked.sum().item(), 50304)
    full, _ = model(inp)
    torch.testing.assert_close(logits, full[picked])
    torch.testing.assert_close(loss, F.cross_entropy(full.view(-1, 50304), targets.view(-1), ignore_index=-100))


def test_a_few_dozen_mlm_steps_lower_the_loss(tmp_path, capsys):
    data = write_bins(tmp_path / 'data')
    tf.main([f'--data_dir={data}', '--dataset=tiny', f'--out_dir={tmp_path / "out"}', '--n_layer=2',
             '--n_embd=64', '--ffn_size=128', '--block_size=32', '--batch_size=16', '--max_iters=40',
             '--eval_interval=40', '--eval_iters=4', '--warmup_iters=5', '--learning_rate=3e-3',
             '--log_interval=40'])
    out = capsys.readouterr().out
    vals = [float(line.split('val masked-token loss ')[1].split()[0].rstrip(','))
            for line in out.splitlines() if line.startswith('step')]
    assert vals[0] > 10 and vals[-1] < vals[0] - 3, out


# -----------------------------------------------------------------------------
# sentiment

def test_sentiment_beats_chance_on_a_separable_set(tmp_path, capsys):
    imdb = write_imdb(tmp_path / 'aclImdb')
    tf.main(['--task=sentiment', f'--imdb_dir={imdb}', f'--out_dir={tmp_path / "out"}', '--n_embd=64',
             '--ffn_size=128', '--block_size=48', '--batch_size=16', '--max_iters=40', '--eval_interval=40',
             '--eval_iters=2', '--warmup_iters=5', '--learning_rate=3e-3', '--log_interval=40'])
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith('test accuracy')][0]
    assert line.endswith('on 100 reviews')
    assert float(line.split()[2]) >= 0.85, out
    model = Topoformer.from_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))
    assert model.config.n_class == 2 and model.config.n_layer == 1 and model.config.sq == 0.1


def test_padding_does_not_change_the_classification():
    torch.manual_seed(0)
    model = Topoformer(tiny_config(n_class=2)).eval()
    review = torch.randint(0, 50257, (1, 10))
    padded = torch.cat([review, torch.full((1, 7), tf.PAD_ID)], dim=1)
    torch.testing.assert_close(model(review)[0], model(padded)[0], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# checkpoints, resume, CLI

def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Topoformer(tiny_config(wrap=False, sq=0.2, dropout=0.1))
    opt = model.configure_optimizers(0.01, 1e-3, (0.9, 0.98), 'cpu')
    inp, targets = tf.mask_tokens(torch.randint(0, 50257, (2, 32)))
    model(inp, targets)[1].backward()
    opt.step()
    path = str(tmp_path / 'ckpt.pt')
    tf.save_checkpoint(path, model, opt, 1, 5.0, {'task': 'mlm'})
    assert not os.path.exists(path + '.tmp')
    ckpt = torch.load(path, weights_only=False)
    assert ckpt['model_type'] == 'topoformer' and ckpt['iter_num'] == 1
    assert {'torch', 'numpy', 'python', 'cuda'} <= set(ckpt['rng'])
    loaded = Topoformer.from_checkpoint(path)
    assert not loaded.training and loaded.config == model.config
    model.eval()
    a, b = model(inp, targets, return_maps=True), loaded(inp, targets, return_maps=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_resume_is_bit_exact(tmp_path):
    data = write_bins(tmp_path / 'data')
    common = [f'--data_dir={data}', '--dataset=tiny', '--n_layer=2', '--n_embd=64', '--ffn_size=128',
              '--block_size=32', '--batch_size=4', '--dropout=0.1', '--eval_iters=2', '--warmup_iters=2',
              '--lr_decay_iters=8', '--eval_interval=4', '--log_interval=100']
    a, b = tmp_path / 'a', tmp_path / 'b'
    tf.main(common + [f'--out_dir={a}', '--max_iters=8'])
    tf.main(common + [f'--out_dir={b}', '--max_iters=4'])
    halfway = torch.load(b / 'ckpt.pt', weights_only=False)
    assert halfway['iter_num'] == 4
    tf.main([f'--out_dir={b}', '--resume', '--max_iters=8'])
    ca = torch.load(a / 'ckpt.pt', weights_only=False)
    cb = torch.load(b / 'ckpt.pt', weights_only=False)
    assert ca['iter_num'] == cb['iter_num'] == 8
    assert ca['model'].keys() == cb['model'].keys()
    assert all(torch.equal(ca['model'][k], cb['model'][k]) for k in ca['model'])
    sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
    assert all(torch.equal(sa[i]['exp_avg_sq'], sb[i]['exp_avg_sq']) for i in sa)
    assert not torch.equal(halfway['model']['transformer.h.0.attn.c_q.weight'],
                           cb['model']['transformer.h.0.attn.c_q.weight'])  # the resumed half did train


def test_parse_args_presets_and_task_defaults():
    cfg, _ = tf.parse_args(['--compile'])
    assert cfg['compile'] is True and cfg['n_embd'] == 256 and cfg['task'] == 'mlm'
    cfg, _ = tf.parse_args(['--preset=paper', '--n_layer=2'])
    assert (cfg['n_embd'], cfg['ffn_size'], cfg['n_layer'], cfg['sq'], cfg['sr'], cfg['grad_clip']) == \
        (784, 3072, 2, 0.3, 0.3, 0.5)
    cfg, _ = tf.parse_args(['--task=sentiment', '--sq=0.2'])
    assert (cfg['n_layer'], cfg['n_embd'], cfg['sq'], cfg['sr']) == (1, 400, 0.2, 0.3)
    cfg, _ = tf.parse_args(['--preset=classroom', '--sq=1', '--sr=1'])
    assert cfg['sq'] == cfg['sr'] == 1.0 and cfg['max_iters'] == tf.PRESETS['classroom']['max_iters']


@pytest.mark.parametrize('args, message', [
    (['--n_embd=250'], 'perfect square'),
    (['--sq=0'], 'sq=0.0 is outside (0, 1]'),
    (['--sr=1.5'], 'sr=1.5 is outside (0, 1]'),
    (['--dataset=nope'], 'prepare_data.py'),
    (['--task=sentiment', '--imdb_dir=WRONG'], 'IMDB layout'),
    (['--n_layr=3'], "unknown config key 'n_layr'"),
    (['--batch_size=big'], '--batch_size=big: expected'),
    (['--task=translate'], 'unknown task'),
    (['--preset=huge'], 'unknown preset'),
])
def test_bad_input_is_one_clean_line(tmp_path, args, message):
    if args[0] == '--task=sentiment':  # an IMDB folder without the pos/neg layout
        os.makedirs(tmp_path / 'WRONG' / 'train')
        args = ['--task=sentiment', f'--imdb_dir={tmp_path / "WRONG"}']
    r = run_cli(*args, f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "out"}', cwd=tmp_path)
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and message in lines[0], r.stderr


def test_context_overflow_is_rejected(tmp_path):
    model = Topoformer(tiny_config(block_size=16))
    with pytest.raises(ValueError, match='longer than block_size'):
        model(torch.zeros(1, 17, dtype=torch.long))
    cfg, _ = tf.parse_args(['--n_layer=2', '--n_embd=64', '--ffn_size=128', '--block_size=16'])
    os.makedirs(tmp_path / 'out')
    tf.save_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'), model,
                       model.configure_optimizers(0.0, 1e-3, (0.9, 0.98), 'cpu'), 0, 9.9, cfg)
    r = run_cli(f'--out_dir={tmp_path / "out"}', '--resume', '--block_size=64')
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: block_size=64 is longer than the model's context (16 tokens)"]


def test_help_lists_every_key():
    r = run_cli('--help')
    assert r.returncode == 0
    for key in tf.DEFAULTS:
        assert f'--{key}=' in r.stdout
    assert 'paper' in r.stdout and 'classroom' in r.stdout and '--task=sentiment sets' in r.stdout


def test_bench_compares_with_the_control(tmp_path):
    r = run_cli('--bench', '--n_layer=1', '--n_embd=64', '--ffn_size=128', '--block_size=16', '--batch_size=2',
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'control (sq=1.0, sr=1.0)' in r.stdout and 'topoformer (sq=0.3, sr=0.3)' in r.stdout
    ratio = float(r.stdout.split('topoformer/control ratio: ')[1].split()[0])
    assert 0.3 < ratio < 3


def test_compile_runs_a_step(tmp_path, capsys):
    data = write_bins(tmp_path / 'data')
    tf.main([f'--data_dir={data}', '--dataset=tiny', f'--out_dir={tmp_path / "out"}', '--compile',
             '--n_layer=1', '--n_embd=64', '--ffn_size=128', '--block_size=16', '--batch_size=4',
             '--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--log_interval=1'])
    out = capsys.readouterr().out
    assert 'compiling' in out and 'iter 2: loss' in out
    loss = float(out.split('iter 2: loss ')[1].split(',')[0])
    assert math.isfinite(loss) and 5 < loss < 12
