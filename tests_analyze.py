"""
Tests of analyze.py: its statistics against hand-computed values and known tables, its stimuli, and the
whole pipeline on tiny checkpoints of both models made here.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python -m pytest -q tests_analyze.py
"""

import os
import sys
import json
import math
import subprocess

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
_cache = os.path.join(HERE, '..', 'shared', 'tiktoken_cache')
if os.path.isdir(_cache) and 'TIKTOKEN_CACHE_DIR' not in os.environ:
    os.environ['TIKTOKEN_CACHE_DIR'] = _cache
sys.path.insert(0, HERE)

import analyze  # noqa: E402

# -----------------------------------------------------------------------------
# Welch's t and its p-values

def test_welch_t_hand_example():
    # a = [1, 2, 3, 4]: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, s2_a = 5/12
    # b = [2, 4, 6]:    mean 4,   unbiased variance (4 + 0 + 4) / 2 = 4,                  s2_b = 4/3
    # t  = (2.5 - 4) / sqrt(5/12 + 16/12) = -1.5 / sqrt(7/4) = -1.133893
    # df = (7/4)^2 / ((5/12)^2 / 3 + (4/3)^2 / 2) = 3.0625 / (0.0578704 + 0.8888889) = 3.234719
    t, df = analyze.welch_t(np.array([1, 2, 3, 4.]), np.array([2, 4, 6.]))
    assert t == pytest.approx(-1.5 / math.sqrt(7 / 4), abs=1e-12)
    assert t == pytest.approx(-1.133893, abs=1e-6)
    assert df == pytest.approx(3.0625 / (25 / 432 + 8 / 9), abs=1e-12)
    assert df == pytest.approx(3.234719, abs=1e-6)
    # per unit along axis 0, the sign follows a - b; silent units give t = 0 (not NaN)
    a = np.stack([[1, 2, 3, 4.], [5, 5, 5, 5], [0, 0, 0, 0]], axis=1)
    b = np.stack([[2, 4, 6.], [5, 5, 5], [0, 0, 0]], axis=1)
    t, df = analyze.welch_t(a, b)
    assert t[0] == pytest.approx(-1.133893, abs=1e-6) and t[1] == 0 and t[2] == 0
    assert np.isfinite(df).all()

def _t_pvalue_by_integration(t, df, n=400001):
    """Two-sided p of Student's t by numerical integration of its density (an independent check):
    f(x) = Gamma((v+1)/2) / (sqrt(v pi) Gamma(v/2)) (1 + x^2/v)^(-(v+1)/2), p = 1 - 2 int_0^|t| f."""
    x = np.linspace(0, abs(t), n)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = c * (1 + x**2 / df) ** (-(df + 1) / 2)
    return 1 - 2 * np.sum((f[1:] + f[:-1]) / 2 * np.diff(x))

def test_t_pvalue_table_values():
    # two-sided critical values from the t table: p = 0.05 at t = 2.228 (df 10) and 2.086 (df 20),
    # 0.01 at 2.845 (df 20); the Cauchy (df 1): P(|T| > 1) = 0.5 exactly; the normal limit: 1.96 -> 0.05
    t = np.array([2.228, 2.086, 2.845, 1.0, 1.96])
    df = np.array([10, 20, 20, 1, 1e6])
    np.testing.assert_allclose(analyze.t_pvalue(t, df), [0.05, 0.05, 0.01, 0.5, 0.05], atol=5e-4)
    assert analyze.t_pvalue(1.0, 1.0) == pytest.approx(0.5, abs=1e-12)
    # df = 2 has a closed form: p = 1 - |t| / sqrt(2 + t^2)
    ts = np.array([0.1, 0.5, 1.5, 3.0, 10.0])
    np.testing.assert_allclose(analyze.t_pvalue(ts, 2), 1 - ts / np.sqrt(2 + ts**2), atol=1e-12)
    # symmetric in t, 1 at t = 0, 0 at infinity, small but not 0 far out
    assert analyze.t_pvalue(-2.228, 10) == analyze.t_pvalue(2.228, 10)
    assert analyze.t_pvalue(0.0, 7) == 1.0 and analyze.t_pvalue(np.inf, 7) == 0.0
    assert 0 < analyze.t_pvalue(12.0, 300) < 1e-25

def test_t_pvalue_fractional_df_against_integration():
    # Welch's df is fractional: check against the density integrated numerically, incl. the hand example
    for t, df in [(-1.133893, 3.234719), (2.5, 7.3), (0.7, 45.6), (4.0, 2.5), (1.2, 150.2)]:
        assert analyze.t_pvalue(t, df) == pytest.approx(_t_pvalue_by_integration(t, df), abs=1e-7)
    # vectorised over arrays of any shape, one value per unit
    t = np.linspace(-5, 5, 12).reshape(3, 4)
    p = analyze.t_pvalue(t, np.full((3, 4), 12.5))
    assert p.shape == (3, 4)
    assert p.flat[0] == pytest.approx(_t_pvalue_by_integration(-5, 12.5), abs=1e-7)

# -----------------------------------------------------------------------------
# Benjamini-Hochberg

def test_bh_fdr_worked_example():
    # p = [0.04, 0.001, 0.03, 0.2, 0.031], m = 5. Sorted with ranks: 0.001 (1), 0.03 (2), 0.031 (3),
    # 0.04 (4), 0.2 (5). p * m / rank: 0.005, 0.075, 0.051667, 0.05, 0.2. Running minimum from the
    # largest rank down: 0.2, 0.05, min(0.051667, 0.05) = 0.05, min(0.075, 0.05) = 0.05, 0.005.
    # Back in the input order: q = [0.05, 0.005, 0.05, 0.2, 0.05].
    q = analyze.bh_fdr([0.04, 0.001, 0.03, 0.2, 0.031])
    np.testing.assert_allclose(q, [0.05, 0.005, 0.05, 0.2, 0.05], atol=1e-12)
    # shape kept, capped at 1, one family across all entries
    q = analyze.bh_fdr(np.array([[0.9, 0.8], [0.01, 0.95]]))
    assert q.shape == (2, 2) and q.max() <= 1
    assert q[1, 0] == pytest.approx(0.04)  # 0.01 * 4 / 1

# -----------------------------------------------------------------------------
# Moran's I (queen contiguity, row-standardised weights)

def _morans_i_brute_force(x):
    """The textbook formula with an explicit N x N weight matrix: I = N / S0 * z'Wz / z'z."""
    H, W = x.shape
    cells = [(r, c) for r in range(H) for c in range(W)]
    w = np.array([[1.0 if max(abs(r1 - r2), abs(c1 - c2)) == 1 else 0.0 for r2, c2 in cells] for r1, c1 in cells])
    w /= w.sum(1, keepdims=True)
    z = x.ravel() - x.mean()
    return len(z) / w.sum() * z @ w @ z / (z @ z)

def test_morans_i_checkerboard_hand_value():
    # 4 x 4 checkerboard of +-1 (mean 0, sum z^2 = 16). The 4 rook neighbours of a cell have the opposite
    # sign, the 4 diagonal ones the same sign; each cell's neighbours share weight 1 (row-standardised).
    #   interior cell (4):  (4 diagonal - 4 rook) / 8 = 0
    #   edge cell (8):      (2 diagonal - 3 rook) / 5 = -1/5
    #   corner (4):         (1 diagonal - 2 rook) / 3 = -1/3
    # I = (8 * -1/5 + 4 * -1/3) / 16 = -44/15 / 16 = -11/60. (With rook contiguity it would be -1;
    # with queen, rook and diagonal cancel inside and only the border is left.)
    board = (np.indices((4, 4)).sum(0) % 2) * 2 - 1.0
    assert analyze.morans_i(board) == pytest.approx(-11 / 60, abs=1e-12)

def test_morans_i_gradient_noise_and_brute_force():
    ramp = np.add.outer(np.arange(16.0), np.zeros(16))  # a smooth gradient along the rows
    assert analyze.morans_i(ramp) > 0.95
    assert analyze.morans_i(np.add.outer(np.arange(16.0), np.arange(16.0))) > 0.95
    # shuffled noise: expectation -1/(N-1) under randomisation
    rng = np.random.default_rng(0)
    values = [analyze.morans_i(rng.permutation(ramp.ravel()).reshape(16, 16)) for _ in range(20)]
    assert np.mean(values) == pytest.approx(-1 / 255, abs=0.02)
    # the shifted-sum implementation equals the explicit weight matrix, on a non-square map too
    x = rng.standard_normal((5, 7))
    assert analyze.morans_i(x) == pytest.approx(_morans_i_brute_force(x), abs=1e-12)
    assert math.isnan(analyze.morans_i(np.ones((4, 4))))

# -----------------------------------------------------------------------------
# Clusters and patches

def _mask(drawing):
    return np.array([[ch == '#' for ch in line] for line in drawing.split()])

def test_clusters_hand_drawn():
    mask = _mask("""
        ##..#
        #...#
        ..#..
        .###.
        #....""")
    labels, sizes = analyze.clusters(mask)
    # 4-connectivity, numbered in row-major order of their first cell; the corner cell (4, 0) touches
    # (3, 1) only diagonally, so it is a component of its own
    expected = np.array([[1, 1, 0, 0, 2],
                         [1, 0, 0, 0, 2],
                         [0, 0, 3, 0, 0],
                         [0, 3, 3, 3, 0],
                         [4, 0, 0, 0, 0]])
    np.testing.assert_array_equal(labels, expected)
    assert sizes == [3, 2, 4, 1]
    assert analyze.clusters(np.zeros((3, 3), bool))[1] == []

def test_patches_split_by_sign_and_size():
    t = np.zeros((8, 8))
    t[:3, :3] = 5.0  # 9 positive units
    t[5:, 4:] = -4.0  # 12 negative units
    t[3, 3] = 3.0  # a lone positive unit
    sig = t != 0
    assert analyze.patches(t, sig, min_size=1) == {'positive': [9, 1], 'negative': [12]}
    assert analyze.patches(t, sig, min_size=10) == {'positive': [], 'negative': [12]}
    # a positive and a negative block side by side are two patches, not one
    t2 = np.zeros((4, 4))
    t2[:, :2], t2[:, 2:] = 3.0, -3.0
    assert analyze.patches(t2, t2 != 0, min_size=8) == {'positive': [8], 'negative': [8]}

def test_contrast_stats_finds_a_planted_patch_and_the_null_does_not():
    # 30 + 30 stimuli on a 12 x 12 map of independent noise; the first group adds +1.5 inside a 6 x 6 square
    rng = np.random.default_rng(1)
    g = rng.standard_normal((60, 12, 12))
    g[:30, 2:8, 3:9] += 1.5
    ia, ib = np.arange(30), np.arange(30, 60)
    s = analyze.contrast_stats({'m': g}, ia, ib, 0.05, 25)['m']
    assert s['significant'][2:8, 3:9].all()
    assert len(s['patches']['positive']) == 1 and s['patches']['positive'][0] >= 36
    assert s['patches']['negative'] == []
    assert s['morans_i'] > 0.5
    perm = rng.permutation(60)
    null = analyze.contrast_stats({'m': g}, perm[:30], perm[30:], 0.05, 25)['m']
    assert null['percent'] < 5 and null['patches'] == {'positive': [], 'negative': []}

# -----------------------------------------------------------------------------
# Grids, smoothing, correlation vs distance

def test_to_grid_places_units_at_their_positions():
    side = 4
    rng = np.random.default_rng(0)
    perm = rng.permutation(side * side)
    pos = np.stack([perm // side, perm % side], axis=1)  # unit u sits at pos[u], as TopoLM's positions
    values = np.arange(side * side, dtype=float)
    grid = analyze.to_grid(values, pos)
    for u in range(side * side):
        assert grid[pos[u, 0], pos[u, 1]] == values[u]
    # fractional coordinates in [0, 1) (cell corners or centres) give the same lattice
    np.testing.assert_array_equal(analyze.to_grid(values, pos / side), grid)
    np.testing.assert_array_equal(analyze.to_grid(values, (pos + 0.5) / side), grid)
    # leading axes are kept: (N, D) -> (N, side, side)
    assert analyze.to_grid(np.ones((3, side * side)), pos).shape == (3, side, side)
    with pytest.raises(ValueError):
        analyze.to_grid(values, np.zeros((16, 2)))

def test_smooth_fwhm():
    # a single active cell becomes a Gaussian whose value at distance FWHM/2 is half its peak
    x = np.zeros((21, 21))
    x[10, 10] = 1.0
    y = analyze.smooth(x, 4.0)
    assert y[10, 12] / y[10, 10] == pytest.approx(0.5, abs=1e-5)
    assert y[12, 10] / y[10, 10] == pytest.approx(0.5, abs=1e-5)
    # a constant map stays constant up to the borders; leading axes are kept
    z = analyze.smooth(np.full((2, 6, 5), 3.0), 2.5)
    np.testing.assert_allclose(z, 3.0, atol=1e-12)

def test_correlation_profile():
    rng = np.random.default_rng(0)
    d, r = analyze.correlation_profile(rng.standard_normal((400, 6, 6)))
    np.testing.assert_array_equal(d, [1, 2, 3, 4, 5])
    assert np.abs(r).max() < 0.05  # independent units
    s = rng.standard_normal((50, 1, 1)) * np.linspace(1, 2, 36).reshape(1, 6, 6)  # one signal, scaled
    np.testing.assert_allclose(analyze.correlation_profile(s)[1], 1.0, atol=1e-12)
    # smoothed noise: neighbours correlate strongly, far units little
    _, r = analyze.correlation_profile(analyze.smooth(rng.standard_normal((200, 8, 8)), 3.0))
    assert r[0] > 0.6 and r[-1] < 0.2 and np.all(np.diff(r[:4]) < 0)

# -----------------------------------------------------------------------------
# Stimuli

def _letters(text):
    return [len(w.strip('.,')) for w in text.split()]

def test_language_stimuli_balanced_and_matched():
    s = analyze.language_stimuli(1337)
    sent, non = s['sentences'], s['nonwords']
    assert len(sent) == len(non) >= 200
    assert len(set(sent)) == len(sent) and len(set(non)) == len(non)
    for a, b in zip(sent, non):
        assert _letters(a) == _letters(b)  # word for word, letter for letter
        for w in b.lower().strip('.').split():
            assert w.isalpha() and w not in analyze._REAL_WORDS and set(w) & set('aeiou')

def test_word_stimuli_2x2():
    cells = analyze.WORDS
    assert set(cells) == {'concrete_nouns', 'abstract_nouns', 'concrete_verbs', 'abstract_verbs'}
    words = [w for ws in cells.values() for w in ws]
    assert all(len(ws) >= 40 for ws in cells.values())
    assert len(set(words)) == len(words)  # no word in two cells
    assert {len(ws) for ws in cells.values()} == {len(cells['concrete_nouns'])}  # balanced
    lengths = [np.mean([len(w) for w in ws]) for ws in cells.values()]
    assert max(lengths) - min(lengths) < 1.5  # letters, roughly matched
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    tokens = [np.mean([len(enc.encode_ordinary(w)) for w in ws]) for ws in cells.values()]
    assert max(tokens) - min(tokens) < 0.3  # what the model sees, matched

def test_sentiment_stimuli_paired():
    s = analyze.sentiment_stimuli(1337)
    assert len(s['positive']) == len(s['negative']) >= 200
    assert len(set(s['positive'])) == len(s['positive'])
    for p, n in zip(s['positive'], s['negative']):
        diff = [(a, b) for a, b in zip(p.split(), n.split()) if a != b]
        assert len(p.split()) == len(n.split()) and len(diff) == 1  # only the adjective differs

def test_stimuli_reproducible_from_seed():
    assert analyze.builtin_stimuli(7) == analyze.builtin_stimuli(7)
    assert analyze.builtin_stimuli(7)['sentences'] != analyze.builtin_stimuli(8)['sentences']
    assert analyze.builtin_stimuli(7)['nonwords'] != analyze.builtin_stimuli(8)['nonwords']

def test_every_contrast_has_its_stimuli():
    stim = analyze.builtin_stimuli(1)
    for name, ((la, ca), (lb, cb)) in analyze.CONTRASTS.items():
        assert all(stim[c] for c in ca + cb), name
        assert sum(len(stim[c]) for c in ca) == sum(len(stim[c]) for c in cb), name  # balanced

# -----------------------------------------------------------------------------
# Command line and bad input

def _run_main(argv, capsys):
    """analyze.main in-process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        analyze.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err

def _assert_one_line_error(code, err, *words):
    assert code != 0
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert 'Traceback' not in err
    for w in words:
        assert w in err, err

def test_help_lists_every_key(capsys):
    code, out, _ = _run_main(['--help'], capsys)
    assert code == 0
    for k, v in analyze.DEFAULTS.items():
        assert f"--{k}={v}" in out

def test_cli_usage_errors(capsys, tmp_path):
    _assert_one_line_error(*_run_main(['x.pt', '--bogus=1'], capsys)[::2], 'bogus')
    code, _, err = _run_main(['x.pt', '--n_shuffles=many'], capsys)
    assert code == 2
    _assert_one_line_error(code, err, 'n_shuffles')
    _assert_one_line_error(*_run_main([], capsys)[::2], 'usage')
    _assert_one_line_error(*_run_main(['x.pt', '--contrasts=language,colour'], capsys)[::2], 'colour')

def test_bad_checkpoints(capsys, tmp_path):
    import torch
    _assert_one_line_error(*_run_main([str(tmp_path / 'missing.pt')], capsys)[::2], 'no checkpoint')
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint\n')
    _assert_one_line_error(*_run_main([str(text)], capsys)[::2], 'not a torch checkpoint')
    foreign = tmp_path / 'foreign.pt'
    torch.save({'model': {}, 'config': {}}, foreign)
    _assert_one_line_error(*_run_main([str(foreign)], capsys)[::2], 'foreign')
    odd = tmp_path / 'odd.pt'
    torch.save({'model_type': 'resnet'}, odd)
    _assert_one_line_error(*_run_main([str(odd)], capsys)[::2], 'resnet')

@pytest.mark.parametrize('content,words', [
    ("label,sentence\na,hello there\nb,good bye\n", ['condition,text']),
    ("condition,text\na,one thing\na,another thing\na,a third\n", ['exactly two', '1']),
    ("condition,text\na,x y\na,y z\nb,u v\nb,v w\nc,w x\nc,x w\n", ['exactly two', '3']),
    ("condition,text\na,the cat\na,the dog\nb,\nb,\n", ["'b'", '0 non-empty']),
    ("condition,text\na,the cat\na,the dog\nb,one\n", ["'b'", '1 non-empty']),
    ("", ['condition,text']),
])
def test_bad_stimuli_csv(capsys, tmp_path, content, words):
    path = tmp_path / 'stim.csv'
    path.write_text(content)
    # the CSV is checked before any checkpoint is opened: a missing checkpoint does not mask it
    _assert_one_line_error(*_run_main([str(tmp_path / 'none.pt'), f'--stimuli={path}'], capsys)[::2], *words)

def test_read_stimuli_csv_ok(tmp_path):
    path = tmp_path / 'animals.csv'
    path.write_text('text,condition\n"Dogs bark, loudly.",animate\nStones sit.,inanimate\n'
                    'Cats purr.,animate\n,inanimate\nRocks fall.,inanimate\n')
    name, groups = analyze.read_stimuli_csv(str(path))
    assert name == 'animals'
    assert list(groups) == ['animate', 'inanimate']  # the file's order: t = animate - inanimate
    assert groups['animate'] == ['Dogs bark, loudly.', 'Cats purr.']
    assert groups['inanimate'] == ['Stones sit.', 'Rocks fall.']  # the empty text is skipped

# -----------------------------------------------------------------------------
# The pipeline on tiny checkpoints

def _tiny_topolm(path, alpha, seed):
    import torch
    import topo_gpt
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, radius=3, alpha=alpha, seed=seed)
    model = topo_gpt.GPT(topo_gpt.GPTConfig(**args))
    cfg = {**topo_gpt.DEFAULTS, **args}
    topo_gpt.save_checkpoint(str(path), model, torch.optim.AdamW(model.parameters()), 0, float('inf'), cfg)
    return model

@pytest.fixture(scope='module')
def topolm_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp('topolm')
    _tiny_topolm(d / 'ckpt.pt', 2.5, 1)
    _tiny_topolm(d / 'control.pt', 0.0, 2)
    return d

def test_unit_responses_mean_over_tokens_without_padding(topolm_ckpts):
    import torch
    model, info = analyze.load_model(str(topolm_ckpts / 'ckpt.pt'))
    assert info == dict(checkpoint=str(topolm_ckpts / 'ckpt.pt'), model_type='topolm', topographic=True)
    texts = ['The cat sat.', 'A much longer sentence than the others here.', 'Dogs bark.', 'justice']
    r = analyze.unit_responses(model, texts, batch_size=2, log=lambda *a: None)
    assert list(r) == ['h.0.attn', 'h.0.mlp', 'h.1.attn', 'h.1.mlp']
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    with torch.no_grad():
        for i, t in enumerate(texts):
            logits, _, maps = model(torch.tensor([enc.encode_ordinary(t)]), return_maps=True)
            for name, m in maps.items():
                np.testing.assert_allclose(r[name][i], m[0].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert logits.shape[1] == len(enc.encode_ordinary(texts[-1]))  # the head is whole again afterwards

def test_pipeline_topolm_with_control(topolm_ckpts, capsys):
    out = topolm_ckpts / 'analysis'
    code, stdout, err = _run_main([str(topolm_ckpts / 'ckpt.pt'), f'--control={topolm_ckpts / "control.pt"}',
                                   '--n_shuffles=2'], capsys)
    assert code == 0, err
    for name in analyze.CONTRASTS:
        assert (out / f'{name}.png').stat().st_size > 1000
        assert f"{name}: mean Moran's I topo" in stdout  # the one-line summary per contrast
    assert (out / 'correlation_distance.png').exists()
    m = json.loads((out / 'metrics.json').read_text())
    assert m['model']['topographic'] and not m['control_model']['topographic']
    assert m['model']['grid'] == [8, 8] and m['model']['maps'] == ['h.0.attn', 'h.0.mlp', 'h.1.attn', 'h.1.mlp']
    lang = m['model']['contrasts']['language']
    assert lang['conditions'] == ['sentences', 'nonwords'] and lang['n_stimuli'][0] >= 200
    v = lang['maps']['h.0.attn']
    for key in ('morans_i', 'morans_i_null', 'percent_selective', 'percent_selective_null', 'patches',
                'n_patches', 'n_patches_null'):
        assert key in v
    assert set(v['morans_i_null']) == {'mean', 'sd'} and set(v['patches']) == {'positive', 'negative'}
    assert -1 <= v['morans_i'] <= 1 and 0 <= v['percent_selective'] <= 100
    comp = m['comparison']['language']
    assert comp['ratio'] == pytest.approx(comp['mean_morans_i'][0] / comp['mean_morans_i'][1])
    assert len(m['model']['correlation_profile']['h.1.mlp']['distance']) == 7

def test_pipeline_fwhm_and_own_stimuli(topolm_ckpts, capsys, tmp_path):
    csv_path = tmp_path / 'animacy.csv'
    rows = ['condition,text'] + [f'animate,{w}' for w in 'dog cat horse farmer child bird'.split()] \
        + [f'inanimate,{w}' for w in 'stone table cup rock chair spoon'.split()]
    csv_path.write_text('\n'.join(rows) + '\n')
    code, stdout, err = _run_main([str(topolm_ckpts / 'ckpt.pt'), f'--stimuli={csv_path}', '--fwhm=2',
                                   f'--out_dir={tmp_path / "out"}', '--n_shuffles=1'], capsys)
    assert code == 0, err
    assert (tmp_path / 'out' / 'animacy.png').exists()
    m = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert list(m['model']['contrasts']) == ['animacy'] and m['config']['fwhm'] == 2.0
    assert m['model']['contrasts']['animacy']['conditions'] == ['animate', 'inanimate']
    assert 'smoothed with FWHM 2 grid units' in stdout  # labelled, also in the figures' titles

def test_cli_subprocess(topolm_ckpts, tmp_path):
    # the script as a user runs it: exit code 0, files written; and a bad file: one line, exit != 0
    cmd = [sys.executable, os.path.join(HERE, 'analyze.py'), str(topolm_ckpts / 'ckpt.pt'),
           '--contrasts=noun_verb_abstract', '--n_shuffles=1', f'--out_dir={tmp_path}']
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'noun_verb_abstract.png').exists() and (tmp_path / 'metrics.json').exists()
    p = subprocess.run(cmd[:2] + [str(tmp_path / 'metrics.json')], capture_output=True, text=True,
                       cwd=HERE, timeout=120)
    _assert_one_line_error(p.returncode, p.stderr, 'not a torch checkpoint')

def _topoformer_or_skip():
    if not os.path.exists(os.path.join(HERE, 'topoformer.py')):
        pytest.skip('topoformer.py does not exist yet')
    try:
        import topoformer
        return topoformer
    except Exception as e:  # a broken module is skipped here with its reason; its own tests fail
        pytest.skip(f'topoformer.py cannot be imported: {e}')

def test_pipeline_topoformer_with_control(tmp_path, capsys):
    tf = _topoformer_or_skip()
    import torch
    for name, s in (('ckpt.pt', 0.3), ('control.pt', 1.0)):
        torch.manual_seed(0)
        args = dict(n_layer=1, n_head=1, n_embd=64, ffn_size=128, block_size=64, sq=s, sr=s)
        model = tf.Topoformer(tf.TopoformerConfig(**args))
        tf.save_checkpoint(str(tmp_path / name), model, torch.optim.AdamW(model.parameters()), 0,
                           float('inf'), {**tf.DEFAULTS, **args})
    code, stdout, err = _run_main([str(tmp_path / 'ckpt.pt'), f'--control={tmp_path / "control.pt"}',
                                   '--contrasts=language,noun_verb_concrete', '--n_shuffles=1'], capsys)
    assert code == 0, err
    out = tmp_path / 'analysis'
    assert (out / 'language.png').exists() and (out / 'noun_verb_concrete.png').exists()
    m = json.loads((out / 'metrics.json').read_text())
    assert m['model']['model_type'] == 'topoformer' and m['model']['topographic']
    assert not m['control_model']['topographic']
    assert m['model']['maps'] == ['h.0.q', 'h.0.k', 'h.0.v', 'h.0.out']
    assert "language: mean Moran's I topo" in stdout
