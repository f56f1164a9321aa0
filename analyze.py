"""
Selectivity maps of a trained topographic language model: where on each map do the units that prefer
sentences, nouns or good news sit, and are they clustered or merely smooth?

Takes a checkpoint of either model (topo_gpt.py's TopoLM or topoformer.py's Topoformer, recognised from
the file), runs stimulus suites through it, and for every spatial map the model exposes computes the
t-map of each contrast (Welch's t per unit), which units are selective (Benjamini-Hochberg FDR), how
smooth the t-map is (Moran's I, as TopoLM reports it) and how many patches the selective units form;
and the same numbers for label-shuffled stimuli, the null that tells functional clusters from mere
smoothness (a smooth model makes any t-map smooth), and for the selective units at scattered places,
the null for patches (many selective units touch by chance).

    python analyze.py out/ckpt.pt                                  # writes out/analysis/
    python analyze.py out/ckpt.pt --control=out_control/ckpt.pt    # topographic vs control, side by side
    python analyze.py out/ckpt.pt --contrasts=language,noun_verb --fwhm=2
    python analyze.py out/ckpt.pt --stimuli=my_contrast.csv        # columns condition,text; 2 conditions

Writes into out_dir: <contrast>.png (t-maps, layers x maps, the control's to the right, patches
outlined), correlation_distance.png, and metrics.json:
    {config, model: {checkpoint, model_type, topographic, grid, maps, correlation_profile: {map:
     {distance, mean_r}}, contrasts: {name: {conditions, n_stimuli, mean_morans_i, mean_morans_i_null,
     percent_selective, percent_selective_null, maps: {map: {morans_i, morans_i_null, percent_selective,
     percent_positive, percent_negative, percent_selective_null, patches: {positive, negative}
     (sizes), n_patches, n_patches_null, largest_patch, n_patches_scattered,
     largest_patch_scattered}}}}}, control: the same or null, comparison (with a control):
     {name: {mean_morans_i: [model, control], ratio, difference, percent_selective, map_ratio}}}
Every *_null is {mean, sd} over the label shuffles; every *_scattered the same over shuffles of the
selective units' places (the patches that chance adjacency makes).

Contrasts (t = first condition - second):
    language            sentences - non-word strings (Fedorenko et al. 2010; TopoLM's language patches)
    noun_verb           nouns - verbs (Moseley & Pulvermueller 2014, 2 x 2 design of single words)
    concrete_abstract   concrete - abstract words
    noun_verb_concrete  concrete nouns - concrete verbs
    noun_verb_abstract  abstract nouns - abstract verbs
    sentiment           positive - negative review sentences (the Topoformer's first task)
"""

import os
import sys
import csv
import json
import math
import time
import random
import itertools
from collections import OrderedDict, defaultdict, deque

import numpy as np

from topo_gpt import UsageError, parse_args as parse_keys  # the repo's one CLI convention

# -----------------------------------------------------------------------------
# config: plain defaults, each overridable on the command line as --key=value
# (the first positional argument is the checkpoint)
out_dir = ''  # where the PNGs and metrics.json go; '' = an 'analysis' folder beside the checkpoint
control = ''  # checkpoint of a non-topographic control trained the same way: analysed and shown beside
contrasts = 'all'  # comma list of the contrasts above, or all
stimuli = ''  # CSV with columns condition,text and exactly two conditions: replaces the built-in contrasts
n_shuffles = 5  # label-shuffled repetitions of every contrast (the null); 0 = none
fwhm = 0.0  # Gaussian smoothing of the response maps in grid units (an fMRI-like read-out); 0 = off
fdr = 0.05  # a unit is selective if its Benjamini-Hochberg q-value is below this
min_patch = 25  # a patch = at least this many 4-connected selective units of one sign (TopoLM counts 25)
batch_size = 64  # stimuli per forward pass
seed = 1337  # draws the stimuli and the shuffles
device = 'cpu'
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and k.islower() and isinstance(v, (bool, int, float, str))}

CONTRASTS = OrderedDict([  # name: ((label, conditions) of the first group, the same of the second)
    ('language', (('sentences', ['sentences']), ('nonwords', ['nonwords']))),
    ('noun_verb', (('nouns', ['concrete_nouns', 'abstract_nouns']),
                   ('verbs', ['concrete_verbs', 'abstract_verbs']))),
    ('concrete_abstract', (('concrete', ['concrete_nouns', 'concrete_verbs']),
                           ('abstract', ['abstract_nouns', 'abstract_verbs']))),
    ('noun_verb_concrete', (('concrete nouns', ['concrete_nouns']), ('concrete verbs', ['concrete_verbs']))),
    ('noun_verb_abstract', (('abstract nouns', ['abstract_nouns']), ('abstract verbs', ['abstract_verbs']))),
    ('sentiment', (('positive', ['positive']), ('negative', ['negative']))),
])

# -----------------------------------------------------------------------------
# Stimuli. Everything is written here and drawn from the seed, so a run is reproducible anywhere.

# Language localizer (Fedorenko et al. 2010): simple sentences vs strings of pronounceable non-words,
# matched word for word in number of words and letters per word. No one-letter words ("a", "I"), so
# that every word has a non-word twin that does not look like a word.
_SUBJECTS = """the old farmer|my sister|the young doctor|the new teacher|our neighbour|the tired driver|
his mother|the little boy|the quiet student|the busy nurse|my best friend|the tall waiter|her uncle|
the shy girl|the angry chef|our manager|the kind nurse|the local baker|his grandmother|the clever pupil"""
_PREDICATES = """fixed the broken fence|painted the kitchen wall|read the long letter|cooked dinner for
everyone|found the missing keys|washed the dirty dishes|opened the front door|sold the old car|wrote
the short story|planted tomatoes in the garden|carried the heavy boxes|bought fresh bread|called the
doctor|cleaned the small room|watched the funny film|visited some friends|lost the house keys|fed the
hungry dog|packed the blue suitcase|answered every email|closed the shop early|missed the last train|
baked the birthday cake|sang an old song|repaired the kitchen sink|walked the dog|made fresh coffee|
caught the early bus|moved the piano|ordered more paper"""
_ADVERBIALS = """after lunch|in the morning|before the storm|last week|on Sunday|near the station|with
great care|without any help|during the holidays|at the weekend|after the meeting|before dinner|in the
evening|two days ago|at the end of the day|on the way home|as usual|for the first time|by the river|
late at night"""

def _split(s):
    return [' '.join(x.split()) for x in s.split('|')]

_CONSONANTS, _VOWELS = 'bdfgklmnprstvz', 'aiou'  # no final e: "bame" reads as an English word
_ONSETS = ['bl', 'br', 'dr', 'fl', 'fr', 'gl', 'gr', 'kl', 'pl', 'pr', 'sl', 'sp', 'st', 'tr']

def nonword(rng, n_letters):
    """
    A pronounceable non-word of exactly n_letters letters, alternating consonants and vowels and ending
    in a vowel (a, i, o, u), which few English words do (CVC and -ed/-er endings would often make words):
    2 letters VC (ep), 3 VCV (oba), even CVCV... (bomuta), odd >= 5 CCVCV... or VCVCV (klosu, obimu).
    """
    while True:
        if n_letters == 2:
            w = rng.choice('aeiou') + rng.choice('bdfgkpvz')
        else:
            w = ''
            if n_letters % 2 == 1 and n_letters >= 5 and rng.random() < 0.5:
                w = rng.choice(_ONSETS)
            elif n_letters % 2 == 1:
                w = rng.choice(_VOWELS)
            while len(w) < n_letters:
                w += rng.choice(_VOWELS if len(w) % 2 != n_letters % 2 else _CONSONANTS)
        if w not in _REAL_WORDS:
            return w

def language_stimuli(seed, n=200):
    """n simple sentences and n non-word strings, pair i matched word for word in letters.
    Returns {'sentences': [...], 'nonwords': [...]}."""
    rng = random.Random(seed)
    combos = list(itertools.product(_split(_SUBJECTS), _split(_PREDICATES), _split(_ADVERBIALS)))
    sentences, nonwords = [], []
    for subject, predicate, adverbial in rng.sample(combos, n):
        words = f"{subject} {predicate} {adverbial}".split()
        fake = [nonword(rng, len(w)) for w in words]
        sentences.append(words[0].capitalize() + ' ' + ' '.join(words[1:]) + '.')
        nonwords.append(fake[0].capitalize() + ' ' + ' '.join(fake[1:]) + '.')
    return {'sentences': sentences, 'nonwords': nonwords}

# Word class x meaning (after Moseley & Pulvermueller 2014): 48 single words in each cell of
# concrete/abstract x noun/verb, chosen to be used mostly as one word class, the cells roughly matched
# in length (5.5-6.8 letters, 1.9-2.1 GPT-2 tokens on average).
WORDS = {
    'concrete_nouns': """apple banana carrot onion potato tomato lemon cherry cabbage sandwich spoon kettle
        teapot saucepan blanket pillow cushion sofa wardrobe window pencil basket bucket candle lamp
        necklace umbrella wallet jacket sweater scissors bicycle tractor helicopter violin piano rabbit
        horse tiger elephant giraffe donkey pebble cottage cucumber carpet rooster spider""".split(),
    'abstract_nouns': """justice freedom truth honesty wisdom courage patience loyalty liberty democracy
        theory concept idea notion belief faith virtue mercy grief sorrow jealousy happiness sadness
        kindness fairness duty glory poverty wealth knowledge logic purpose destiny fate chaos harmony
        mystery morality ethics philosophy religion tradition opinion ambition anxiety boredom
        curiosity dignity""".split(),
    'concrete_verbs': """grab throw chew lick squeeze scatter pour unbutton fasten sharpen sweep wipe scrub
        carry lift drag tighten climb crawl wriggle kneel grasp clutch shove fling stagger crouch wash
        bake tiptoe boil grind wrestle sneeze blink pinch tickle juggle knead crumple squat nibble swim
        unpack steer scribble sprinkle stumble""".split(),
    'abstract_verbs': """believe think know understand remember forget imagine suppose assume decide
        consider realize recognize pretend deserve intend prefer admire forgive hesitate ponder presume
        conclude infer deduce perceive dare yearn tolerate neglect ignore resent crave approve deny
        justify evaluate interpret analyze accept exist belong persuade convince reconcile seem expect
        envision""".split(),
}

# Sentiment (Topoformer's first task was sentiment; it suits a masked LM as well as a causal one):
# review sentences that differ only in one adjective, positive vs negative, paired by length.
_FRAMES = ["The {} was {}.", "I thought the {} was {}.", "Everyone said the {} was {}.",
           "Honestly, the {} was really {}.", "To be fair, the {} was {}.", "We all agreed the {} was {}."]
_TOPICS = """movie meal hotel concert trip book show party service weather game lecture play dinner
holiday album room view coffee class""".split()
_ADJECTIVES = [  # (positive, negative), similar in length
    ('wonderful', 'miserable'), ('excellent', 'dreadful'), ('lovely', 'awful'), ('great', 'grim'),
    ('superb', 'boring'), ('brilliant', 'horrible'), ('pleasant', 'unpleasant'), ('delightful', 'disgusting'),
    ('charming', 'annoying'), ('fantastic', 'pathetic'), ('good', 'bad'), ('perfect', 'terrible'),
    ('beautiful', 'hideous'), ('enjoyable', 'unbearable'), ('splendid', 'dismal'), ('amazing', 'tedious'),
    ('fabulous', 'wretched'), ('outstanding', 'disappointing'), ('nice', 'poor'), ('magnificent', 'depressing'),
]

def sentiment_stimuli(seed, n=200):
    """n positive and n negative sentences; pair i shares frame and topic. {'positive', 'negative'}"""
    rng = random.Random(seed + 1)
    combos = list(itertools.product(_FRAMES, _TOPICS, _ADJECTIVES))
    positive, negative = [], []
    for frame, topic, (good, bad) in rng.sample(combos, n):
        positive.append(frame.format(topic, good))
        negative.append(frame.format(topic, bad))
    return {'positive': positive, 'negative': negative}

# words a non-word must not be: every word used here, and short English words the generator can make
_REAL_WORDS = set(' '.join(_SUBJECTS.split('|') + _PREDICATES.split('|') + _ADVERBIALS.split('|')).split())
_REAL_WORDS |= {w for ws in WORDS.values() for w in ws}
_REAL_WORDS |= set("""ab ad id of up ok ox ex ax ago ado ego emu uno obi ova aka ufo data diva
lava menu memo nova pita polo sofa soda solo tuna visa kilo tofu demo gala mama papa tutu bozo dodo limo
logo taco toga vino veto zero mono sumo tuba puma koala bravo plaza drama pasta salami tomato banana
potato kimono bikini safari""".split())

def builtin_stimuli(seed):
    """Every condition of the built-in contrasts: {condition: [texts]}."""
    return {**language_stimuli(seed), **WORDS, **sentiment_stimuli(seed)}

def read_stimuli_csv(path):
    """A user's own contrast: a CSV with columns condition,text and exactly two conditions.
    Returns (contrast name = the file's stem, {condition: [texts]}) in the file's order."""
    if not os.path.isfile(path):
        raise UsageError(f"--stimuli: no file {path}")
    with open(path, newline='', encoding='utf-8-sig') as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {'condition', 'text'} <= set(reader.fieldnames):
            raise UsageError(f"{path}: needs the columns condition,text; it has {reader.fieldnames}")
        groups = OrderedDict()
        for row in reader:
            cond, text = (row['condition'] or '').strip(), (row['text'] or '').strip()
            if cond:
                groups.setdefault(cond, [])
                if text:  # an empty text is skipped; a condition left with none is an error below
                    groups[cond].append(text)
    if len(groups) != 2:
        raise UsageError(f"{path}: needs exactly two conditions, found {len(groups)}: {list(groups)}")
    for cond, texts in groups.items():
        if len(texts) < 2:
            raise UsageError(f"{path}: condition {cond!r} has {len(texts)} non-empty texts; "
                             f"a t-test needs 2 or more")
    return os.path.splitext(os.path.basename(path))[0], groups

# -----------------------------------------------------------------------------
# Models and their responses

def load_model(path, device='cpu'):
    """Either model from its checkpoint, recognised by the checkpoint's 'model_type'. Only the module
    that the checkpoint needs is imported. Returns (model in eval mode, info dict)."""
    import torch
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint file {path}")
    ckpt = unreadable = object()
    for mmap in (True, False):  # mmap: peek at the keys without reading every tensor (zip format only)
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=False, mmap=mmap)
            break
        except Exception:
            pass
    if ckpt is unreadable:
        raise UsageError(f"{path} is not a torch checkpoint")
    if not isinstance(ckpt, dict) or 'model_type' not in ckpt:
        raise UsageError(f"{path} is a foreign checkpoint (no 'model_type'): expected one written by "
                         f"topo_gpt.py or topoformer.py")
    kind, args = ckpt['model_type'], ckpt.get('model_args', {})
    if kind not in ('topolm', 'topoformer'):
        raise UsageError(f"{path}: unknown model_type {kind!r} (expected 'topolm' or 'topoformer')")
    try:
        if kind == 'topolm':
            from topo_gpt import GPT
            model = GPT.from_checkpoint(path, device=device)
            topographic = args.get('alpha', 0) > 0  # alpha = 0: the control
        else:
            from topoformer import Topoformer
            model = Topoformer.from_checkpoint(path, device=device)
            topographic = args.get('sq', 1) < 1 or args.get('sr', 1) < 1  # sq = sr = 1: the control
    except (ImportError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UsageError(f"{path}: could not rebuild the {kind} model: {str(e).splitlines()[0]}") from None
    return model.eval(), dict(checkpoint=path, model_type=kind, topographic=topographic)

def unit_responses(model, texts, batch_size=64, device='cpu', log=print):
    """
    Response of every unit of every map to every text: its activation averaged over the text's tokens.
    Texts are grouped by token length and each group runs as whole batches, so there is no padding
    (which a bidirectional model would otherwise attend to). Returns {map name: (N, D) float64}.
    """
    import torch
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    ids = [enc.encode_ordinary(t) for t in texts]
    block_size = getattr(getattr(model, 'config', None), 'block_size', None)
    by_length = defaultdict(list)
    for i, x in enumerate(ids):
        if not x:
            raise UsageError(f"stimulus {texts[i]!r} has no tokens")
        if block_size and len(x) > block_size:
            raise UsageError(f"stimulus {texts[i][:40]!r}... has {len(x)} tokens, more than the "
                             f"model's block_size {block_size}")
        by_length[len(x)].append(i)
    out, t0, done, shown = None, time.time(), 0, time.time()
    model.eval()
    # the logits are not needed here, and the output head (T x vocab per text) costs as much as all
    # the blocks of a small model: let it see only the last position
    head = getattr(model, 'lm_head', None)
    hook = head.register_forward_pre_hook(lambda mod, inp: (inp[0][:, -1:],)) if head is not None else None
    try:
        with torch.no_grad():
            for T, rows in sorted(by_length.items()):
                for s in range(0, len(rows), batch_size):
                    chunk = rows[s:s + batch_size]
                    idx = torch.tensor([ids[i] for i in chunk], dtype=torch.long, device=device)  # (B, T)
                    _, _, maps = model(idx, return_maps=True)  # {name: (B, T, D)}
                    if out is None:
                        out = OrderedDict((k, np.zeros((len(texts), m.size(-1)))) for k, m in maps.items())
                    for k, m in maps.items():
                        out[k][chunk] = m.float().mean(dim=1).cpu().numpy()
                    done += len(chunk)
                    if time.time() - shown > 10:  # a big model takes a while: say how far it got
                        log(f"  {done}/{len(texts)} stimuli...")
                        shown = time.time()
    finally:
        if hook is not None:
            hook.remove()
    log(f"  responses of {len(out)} maps to {len(texts)} stimuli in {time.time() - t0:.1f}s")
    return out

def to_lattice(positions):
    """
    Grid (row, col) indices of units from their coordinates (D, 2): integers (TopoLM) or fractions in
    [0, 1) (Topoformer) alike, since the k-th smallest distinct coordinate on an axis is lattice index k.
    """
    pos = np.round(np.asarray(positions, dtype=np.float64), 6)
    lattice = np.stack([np.unique(pos[:, k], return_inverse=True)[1].ravel() for k in (0, 1)], axis=1)
    H, W = lattice.max(0) + 1
    if H * W != len(pos) or len(np.unique(lattice[:, 0] * W + lattice[:, 1])) != len(pos):
        raise ValueError(f"the {len(pos)} unit positions do not tile a regular grid")
    return lattice

def to_grid(values, positions):
    """Place values (..., D) of D units at their grid positions (D, 2): returns (..., H, W)."""
    lattice = to_lattice(positions)
    H, W = lattice.max(0) + 1
    values = np.asarray(values)
    grid = np.zeros(values.shape[:-1] + (H, W), dtype=values.dtype)
    grid[..., lattice[:, 0], lattice[:, 1]] = values
    return grid

def smooth(grids, fwhm):
    """
    Gaussian smoothing of maps (..., H, W), FWHM in grid units: sigma = FWHM / sqrt(8 ln 2).
    Weights are renormalised at the borders, so a constant map stays constant. Separable:
    out = K_rows @ map @ K_cols^T with row-normalised Gaussian matrices K[i, j] ~ exp(-(i-j)^2 / 2 sigma^2).
    """
    sigma = fwhm / math.sqrt(8 * math.log(2))
    def kernel(n):
        d = np.arange(n)[:, None] - np.arange(n)[None, :]
        k = np.exp(-d**2 / (2 * sigma**2))
        return k / k.sum(1, keepdims=True)
    H, W = grids.shape[-2:]
    return kernel(H) @ grids @ kernel(W).T

# -----------------------------------------------------------------------------
# Statistics, written here (no scipy), each checked against hand values in test_topo.py

def welch_t(a, b):
    """
    Welch's t-test of mean(a) - mean(b) along axis 0, per unit. a: (n_a, ...), b: (n_b, ...).
        s2_a = var(a) / n_a (unbiased variance),  t = (mean a - mean b) / sqrt(s2_a + s2_b)
        df   = (s2_a + s2_b)^2 / (s2_a^2 / (n_a - 1) + s2_b^2 / (n_b - 1))    (Welch-Satterthwaite)
    A unit silent on every stimulus gets t = 0, df = n_a + n_b - 2. Returns t, df (...).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = len(a), len(b)
    sa, sb = a.var(0, ddof=1) / na, b.var(0, ddof=1) / nb
    with np.errstate(divide='ignore', invalid='ignore'):
        t = (a.mean(0) - b.mean(0)) / np.sqrt(sa + sb)
        df = (sa + sb)**2 / (sa**2 / (na - 1) + sb**2 / (nb - 1))
    return np.nan_to_num(t, nan=0.0), np.nan_to_num(df, nan=na + nb - 2.0)

_lgamma = np.vectorize(math.lgamma, otypes=[np.float64])

def _betacf(a, b, x, max_iter=10000, eps=1e-14):
    """Continued fraction of the incomplete beta function, evaluated by the modified Lentz method:
        I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 1 / (1 + d1 / (1 + d2 / (1 + ...)))
        d_(2m+1) = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)),   d_(2m) = m (b - m) x / ((a + 2m - 1)(a + 2m))
    It converges fast for x < (a + 1) / (a + b + 2), in about sqrt(max(a, b)) steps. Vectorised."""
    tiny = 1e-300
    def guard(v):  # keep Lentz's intermediate values away from 0
        return np.where(np.abs(v) < tiny, tiny, v)
    c = np.ones_like(x)
    d = 1 / guard(1 - (a + b) * x / (a + 1))
    h = d.copy()
    active = np.ones(x.shape, bool)
    for m in range(1, max_iter + 1):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step d_2m
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step d_2m+1
            d = 1 / guard(1 + aa * d)
            c = guard(1 + aa / c)
            delta = d * c
            h = np.where(active, h * delta, h)
        active &= np.abs(delta - 1) > eps
        if not active.any():
            break
    return h

def betainc(a, b, x):
    """Regularized incomplete beta function I_x(a, b), elementwise; uses I_x(a, b) = 1 - I_(1-x)(b, a)
    where x is past the point at which the continued fraction converges fast."""
    a, b, x = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (a, b, x)))
    swap = x > (a + 1) / (a + b + 2)
    a2, b2, x2 = np.where(swap, b, a), np.where(swap, a, b), np.where(swap, 1 - x, x)
    with np.errstate(divide='ignore'):  # log(0) at x = 0 or 1: the prefactor is then exactly 0
        log_front = a2 * np.log(x2) + b2 * np.log1p(-x2) - (_lgamma(a2) + _lgamma(b2) - _lgamma(a2 + b2))
    value = np.exp(log_front) * _betacf(a2, b2, x2) / a2
    return np.where(swap, 1 - value, value)

def t_pvalue(t, df):
    """Two-sided p-value of Student's t with df degrees of freedom (df may be fractional, as Welch's is):
        p = P(|T| >= |t|) = I_(df / (df + t^2))(df / 2, 1 / 2)"""
    t, df = np.asarray(t, np.float64), np.asarray(df, np.float64)
    return np.clip(betainc(df / 2, 0.5, df / (df + t**2)), 0.0, 1.0)

def bh_fdr(p):
    """
    Benjamini-Hochberg q-values of p-values of any shape (one family: all entries):
        q_(i) = min over j >= i of p_(j) * m / j, for the p-values sorted ascending, capped at 1.
    A unit is significant at FDR level alpha if its q < alpha.
    """
    p = np.asarray(p, np.float64)
    flat = p.ravel()
    m = flat.size
    order = np.argsort(flat)
    scaled = flat[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(scaled[::-1])[::-1]  # running min from the largest p down
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    return q.reshape(p.shape)

# -----------------------------------------------------------------------------
# Topography: Moran's I, patches, correlation vs distance

_QUEEN = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]

def morans_i(grid):
    """
    Moran's I of a map (H, W) with queen contiguity (the 8 surrounding cells are neighbours),
    the weights row-standardised (each cell's neighbours share weight 1), as TopoLM computes it:
        z = x - mean(x),   I = (N / S0) sum_ij w_ij z_i z_j / sum_i z_i^2,   S0 = sum_ij w_ij = N
    so I = sum_i z_i * (mean of z over i's neighbours) / sum_i z_i^2.
    About +1 for a smooth map, -1/(N-1) on average for shuffled noise; NaN for a constant map.
    """
    z = np.asarray(grid, np.float64)
    z = z - z.mean()
    H, W = z.shape
    zp, onep = np.pad(z, 1), np.pad(np.ones_like(z), 1)
    lag_sum, n_neighbours = np.zeros_like(z), np.zeros_like(z)
    for dr, dc in _QUEEN:
        lag_sum += zp[1 + dr:1 + dr + H, 1 + dc:1 + dc + W]
        n_neighbours += onep[1 + dr:1 + dr + H, 1 + dc:1 + dc + W]
    denom = (z * z).sum()
    return float((z * lag_sum / n_neighbours).sum() / denom) if denom > 0 else float('nan')

def clusters(mask):
    """
    Connected components of a boolean map (H, W) with 4-connectivity (up, down, left, right),
    by flood fill. Returns labels (H, W) int (0 = background, 1..k in order of first cell in
    row-major order) and sizes [size of component 1, ..., size of component k].
    """
    mask = np.asarray(mask, bool)
    H, W = mask.shape
    labels = np.zeros((H, W), dtype=np.int64)
    sizes = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if labels[r0, c0]:
            continue
        k = len(sizes) + 1
        labels[r0, c0] = k
        queue, size = deque([(r0, c0)]), 0
        while queue:
            r, c = queue.popleft()
            size += 1
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < H and 0 <= cc < W and mask[rr, cc] and not labels[rr, cc]:
                    labels[rr, cc] = k
                    queue.append((rr, cc))
        sizes.append(size)
    return labels, sizes

def patches(t, significant, min_size=25):
    """
    Patches of a t-map: the 4-connected clusters of significant units, positive and negative t
    separately, of at least min_size units. Returns {'positive': sizes, 'negative': sizes} (largest
    first) and a map (H, W) that is +1 on the units of positive patches, -1 on negative ones, else 0.
    """
    sizes, where = {}, np.zeros(t.shape, dtype=np.int64)
    for sign, s, mask in (('positive', 1, significant & (t > 0)), ('negative', -1, significant & (t < 0))):
        labels, all_sizes = clusters(mask)
        big = [k + 1 for k, n in enumerate(all_sizes) if n >= min_size]
        sizes[sign] = sorted((all_sizes[k - 1] for k in big), reverse=True)
        where[np.isin(labels, big)] = s
    return sizes, where

def correlation_profile(responses):
    """
    Smoothness without any contrast: the Pearson correlation of every pair of units over all stimuli,
    averaged in bins of grid distance (Euclidean, rounded to the nearest integer: 1, 2, ..., side - 1).
    responses: (N stimuli, H, W). Returns distances (B,), mean r (B,). Silent units are left out.
    """
    N, H, W = responses.shape
    x = responses.reshape(N, H * W)
    x = x - x.mean(0)
    norm = np.sqrt((x * x).sum(0))
    with np.errstate(divide='ignore', invalid='ignore'):
        z = np.where(norm > 0, x / norm, np.nan)
    r = z.T @ z  # (D, D)
    rows, cols = np.divmod(np.arange(H * W), W)
    dist = np.rint(np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])).astype(int)
    i, j = np.triu_indices(H * W, k=1)
    r, dist = r[i, j], dist[i, j]
    ok = np.isfinite(r) & (dist < min(H, W))  # farther bins hold only a few corner-to-corner pairs
    sums = np.bincount(dist[ok], weights=r[ok], minlength=min(H, W))
    counts = np.bincount(dist[ok], minlength=min(H, W))
    with np.errstate(invalid='ignore'):
        mean_r = sums / counts
    return np.arange(1, len(sums)), mean_r[1:]

# -----------------------------------------------------------------------------
# One model: responses -> t-maps -> every figure

def contrast_stats(grids, ia, ib, q_level, min_size):
    """Welch t of group ia - group ib for every unit of every map (grids: {map: (N, H, W)}), FDR over
    all units of all maps together. Returns {map: dict(t, significant, morans_i, percent, patches, ...)}."""
    ts, ps = {}, {}
    for name, g in grids.items():
        t, df = welch_t(g[ia], g[ib])
        ts[name], ps[name] = t, t_pvalue(t, df)
    q = bh_fdr(np.stack(list(ps.values())))
    out = OrderedDict()
    for (name, t), qk in zip(ts.items(), q):
        sig = qk < q_level
        sizes, where = patches(t, sig, min_size)
        out[name] = dict(t=t, significant=sig, morans_i=morans_i(t), patches=sizes, patch_map=where,
                         percent=100 * sig.mean(), percent_positive=100 * (sig & (t > 0)).mean(),
                         percent_negative=100 * (sig & (t < 0)).mean())
    return out

def _mean_sd(values):
    v = np.asarray(values, np.float64)
    # the sd is the spread of the shuffles themselves (population sd), 0 for a single shuffle
    return dict(mean=float(np.mean(v)), sd=float(np.std(v))) if len(v) else dict(mean=None, sd=None)

def analyze_model(model, info, suites, cfg, log=print):
    """
    Everything for one model. suites: [(contrast name, {condition: texts}, (label, conditions) of the
    first group, the same of the second)].
    Returns (metrics dict, {contrast: {map: (t grid, patch map)}}, {map: (distances, mean r)}).
    """
    conditions = OrderedDict()
    for _, groups, _, _ in suites:
        conditions.update(groups)
    texts = [t for ts in conditions.values() for t in ts]
    rows, start = {}, 0
    for cond, ts in conditions.items():
        rows[cond] = np.arange(start, start + len(ts))
        start += len(ts)
    responses = unit_responses(model, texts, cfg['batch_size'], cfg['device'], log)
    grids = OrderedDict((name, to_grid(r, model.positions(name).cpu().numpy()))
                        for name, r in responses.items())  # {map: (N, H, W)}
    if cfg['fwhm'] > 0:
        grids = OrderedDict((name, smooth(g, cfg['fwhm'])) for name, g in grids.items())
    H, W = next(iter(grids.values())).shape[1:]
    metrics = dict(**info, grid=[int(H), int(W)], maps=list(grids), contrasts=OrderedDict())
    tmaps = OrderedDict()
    rng = np.random.default_rng(cfg['seed'])
    for name, groups, (label_a, cond_a), (label_b, cond_b) in suites:
        ia = np.concatenate([rows[c] for c in cond_a])
        ib = np.concatenate([rows[c] for c in cond_b])
        real = contrast_stats(grids, ia, ib, cfg['fdr'], cfg['min_patch'])
        # the null: the same stimuli with their labels shuffled (group sizes kept)
        pooled = np.concatenate([ia, ib])
        nulls = []
        for _ in range(cfg['n_shuffles']):
            perm = rng.permutation(pooled)
            nulls.append(contrast_stats(grids, perm[:len(ia)], perm[len(ia):], cfg['fdr'], cfg['min_patch']))
        n_patches = lambda sizes: len(sizes['positive']) + len(sizes['negative'])
        largest = lambda sizes: max(sizes['positive'] + sizes['negative'] + [0])
        maps = OrderedDict()
        for m, s in real.items():
            # the patches that chance alone makes at this share of selective units: the same t-map with
            # its units' places shuffled (when most units are selective, random neighbours join into
            # big clusters too: percolation, as in the non-topographic control)
            scattered = [patches(s['t'].ravel()[p].reshape(s['t'].shape),
                                 s['significant'].ravel()[p].reshape(s['t'].shape), cfg['min_patch'])[0]
                         for p in (rng.permutation(s['t'].size) for _ in range(cfg['n_shuffles']))]
            maps[m] = dict(morans_i=s['morans_i'],
                           morans_i_null=_mean_sd([n[m]['morans_i'] for n in nulls]),
                           percent_selective=s['percent'], percent_positive=s['percent_positive'],
                           percent_negative=s['percent_negative'],
                           percent_selective_null=_mean_sd([n[m]['percent'] for n in nulls]),
                           patches=s['patches'], n_patches=n_patches(s['patches']),
                           n_patches_null=_mean_sd([n_patches(n[m]['patches']) for n in nulls]),
                           largest_patch=largest(s['patches']),
                           n_patches_scattered=_mean_sd([n_patches(x) for x in scattered]),
                           largest_patch_scattered=_mean_sd([largest(x) for x in scattered]))
        metrics['contrasts'][name] = dict(
            conditions=[label_a, label_b], n_stimuli=[len(ia), len(ib)],
            mean_morans_i=float(np.nanmean([v['morans_i'] for v in maps.values()])),
            mean_morans_i_null=_mean_sd([np.nanmean([n[m]['morans_i'] for m in n]) for n in nulls]),
            percent_selective=float(np.mean([v['percent_selective'] for v in maps.values()])),  # of all units
            percent_selective_null=_mean_sd([np.mean([n[m]['percent'] for m in n]) for n in nulls]),
            maps=maps)
        tmaps[name] = OrderedDict((m, (s['t'], s['patch_map'])) for m, s in real.items())
        log(f"  {name}: done ({cfg['n_shuffles']} shuffles)")
    profiles = OrderedDict((m, correlation_profile(g)) for m, g in grids.items())
    metrics['correlation_profile'] = OrderedDict(
        (m, dict(distance=d.tolist(), mean_r=r.tolist())) for m, (d, r) in profiles.items())
    return metrics, tmaps, profiles

# -----------------------------------------------------------------------------
# Plotting

def _layout(names):
    """Map names 'h.<layer>.<kind>' -> ({name: (row = layer, column = kind)}, n rows, n columns)."""
    keys = [tuple(n.split('.')[1:]) if n.count('.') == 2 else (n, '') for n in names]
    layers, kinds = list(dict.fromkeys(k[0] for k in keys)), list(dict.fromkeys(k[1] for k in keys))
    return {n: (layers.index(l), kinds.index(k)) for n, (l, k) in zip(names, keys)}, len(layers), len(kinds)

def _label(info):
    return f"{info['model_type']} ({'topographic' if info['topographic'] else 'non-topographic'})"

def plot_contrast(path, blocks, title):
    """
    t-maps of one contrast: a grid of layers x maps for each model, side by side (the model on the
    left, its control on the right), one symmetric colour scale, patches outlined.
    blocks: [(model label, {map: (t, patch map)}, {map: metrics of the map})].
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    layouts = [_layout(list(tm)) for _, tm, _ in blocks]
    n_rows = max(l[1] for l in layouts)
    # the blocks' columns, with a narrow empty column between two blocks
    ratios = [r for i, l in enumerate(layouts) for r in ([0.25] if i else []) + [1] * l[2]]
    vmax = max(float(np.abs(t).max()) for _, tm, _ in blocks for t, _ in tm.values()) or 1.0
    content = 2.0 * sum(ratios)  # inches of maps; plus 0.1 left, 1.0 right for the colour bar
    width, height = max(content + 1.1, 8.0), 2.2 * n_rows + 1.0  # at least 8 inches: room for the title
    pad = (width - content - 1.1) / 2  # centre narrow grids
    fig = plt.figure(figsize=(width, height))
    # fixed margins: constrained/tight layout would take seconds per figure
    gs = fig.add_gridspec(n_rows, len(ratios), width_ratios=ratios, left=(0.1 + pad) / width,
                          right=1 - (1.0 + pad) / width, bottom=0.2 / height, top=1 - 1.0 / height,
                          wspace=0.15, hspace=0.5)
    col0 = 0
    for (label, tm, mm), (where, _, n_kinds) in zip(blocks, layouts):
        for m, (t, patch_map) in tm.items():
            r, c = where[m]
            ax = fig.add_subplot(gs[r, col0 + c])
            ax.axis('off')
            im = ax.imshow(t, cmap='RdBu_r', vmin=-vmax, vmax=vmax, interpolation='nearest')
            H, W = patch_map.shape
            for patch in (patch_map > 0, patch_map < 0):
                if patch.any():  # outline along the cell edges: contour a 9x upsampled mask
                    ax.contour(np.kron(patch, np.ones((9, 9))), levels=[0.5], colors='k', linewidths=0.8,
                               extent=(-0.5, W - 0.5, -0.5, H - 0.5), origin='upper')
            null = mm[m]['morans_i_null']['mean']
            ax.set_title(f"{label.split(':')[0] if len(blocks) > 1 else ''} {m}\nI={mm[m]['morans_i']:.2f}"
                         + (f" (null {null:.2f})" if null is not None else ''), fontsize=8)
        col0 += n_kinds + 1
    fig.colorbar(im, cax=fig.add_axes([1 - (0.75 + pad) / width, 0.2, 0.15 / width, 0.6]), label="Welch's t")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)

def plot_profiles(path, models, title):
    """Correlation vs grid distance, one panel per model, one line per map (darker = deeper)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False, sharey=True)
    fig.subplots_adjust(left=0.8 / (5 * len(models)), right=0.98, bottom=0.13, top=0.85, wspace=0.1)
    for ax, (label, profiles) in zip(axes[0], models):
        colours = plt.cm.viridis(np.linspace(0.9, 0.1, len(profiles)))
        for (m, (d, r)), col in zip(profiles.items(), colours):
            ax.plot(d, r, color=col, label=m, lw=1.2)
        ax.axhline(0, color='grey', lw=0.5)
        ax.set_xlabel('grid distance (units)')
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=6, ncol=2)
    axes[0, 0].set_ylabel('mean response correlation')
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)

# -----------------------------------------------------------------------------
# main

def parse_args(argv):
    """First positional argument = the checkpoint; --key=value for the config keys, parsed as
    topo_gpt.py parses its own. Returns (checkpoint path, config dict)."""
    positional = [a for a in argv if not a.startswith('-')]
    if len(positional) != 1 and not {'-h', '--help'} & set(argv):
        raise UsageError("usage: python analyze.py CHECKPOINT [--key=value ...] (see --help)")
    cfg, _ = parse_keys([a for a in argv if a.startswith('-')], DEFAULTS, {}, __doc__)
    return positional[0], cfg

def select_suites(cfg):
    """[(contrast name, {condition: texts}, (label, conditions) of group A, the same of B)] for the run."""
    if cfg['n_shuffles'] < 0 or not 0 < cfg['fdr'] < 1 or cfg['fwhm'] < 0 or cfg['batch_size'] < 1:
        raise UsageError("need n_shuffles >= 0, 0 < fdr < 1, fwhm >= 0 and batch_size >= 1")
    if cfg['stimuli']:
        name, groups = read_stimuli_csv(cfg['stimuli'])
        a, b = list(groups)
        return [(name, groups, (a, [a]), (b, [b]))]
    names = list(CONTRASTS) if cfg['contrasts'] == 'all' else [c.strip() for c in cfg['contrasts'].split(',')]
    unknown = [n for n in names if n not in CONTRASTS]
    if unknown or not names:
        raise UsageError(f"unknown contrast(s) {unknown}; choose from {', '.join(CONTRASTS)} or all")
    stim = builtin_stimuli(cfg['seed'])
    return [(n, {c: stim[c] for c in CONTRASTS[n][0][1] + CONTRASTS[n][1][1]}, *CONTRASTS[n]) for n in names]

def _fmt(x, spec='.2f'):
    return '-' if x is None else format(x, spec)  # None: no shuffles, or a ratio with a zero control

def print_table(name, results):
    """
    The compact per-contrast table: per map and model, Moran's I and its shuffled-label null, % selective
    units and its null, patches (+/-), the largest patch and (in brackets) the largest one that the same
    selective units make at scattered places; then I_topo / I_control when there is a control.
    """
    first = results[0]['contrasts'][name]
    a, b = first['conditions']
    print(f"\n{name}: {a} - {b} ({first['n_stimuli'][0]} vs {first['n_stimuli'][1]} stimuli)")
    cols = ['I', 'null I', '%sel', 'null', 'patch+/-', 'max (scat)']
    widths = [6, 11, 5, 5, 8, 10]
    head = f"{'map':12s}"
    for label in ['model', 'control'][:len(results)]:
        head += ' | ' + ' '.join(f"{(label + ' ' + c) if c == 'I' else c:>{w}s}" for c, w in zip(cols, widths))
    print(head + (f" | {'I ratio':>7s}" if len(results) == 2 else ''))
    for m in first['maps']:
        line = f"{m:12s}"
        for res in results:
            v = res['contrasts'][name]['maps'].get(m)
            if v is None:  # a control with other maps
                line += ' | ' + ' '.join(' ' * w for w in widths)
                continue
            null, scat = v['morans_i_null'], v['largest_patch_scattered']['mean']
            cells = [_fmt(v['morans_i']), f"{_fmt(null['mean'])}±{_fmt(null['sd'])}",
                     f"{v['percent_selective']:.1f}", _fmt(v['percent_selective_null']['mean'], '.1f'),
                     f"{len(v['patches']['positive'])}/{len(v['patches']['negative'])}",
                     f"{v['largest_patch']} ({_fmt(scat, '.0f')})"]
            line += ' | ' + ' '.join(f"{c:>{w}s}" for c, w in zip(cells, widths))
        if len(results) == 2:
            vc = results[1]['contrasts'][name]['maps'].get(m)
            line += f" | {_fmt(_ratio(first['maps'][m]['morans_i'], vc and vc['morans_i'])):>7s}"
        print(line)

def _ratio(a, b):
    return None if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b) else a / b

def _json_ready(x):
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x

def run(ckpt_path, cfg, log=print):
    """The whole analysis; returns the metrics dict (also written to out_dir/metrics.json)."""
    suites = select_suites(cfg)  # bad stimuli fail before any model is loaded
    paths = [ckpt_path] + ([cfg['control']] if cfg['control'] else [])
    loaded = [load_model(p, cfg['device']) for p in paths]  # bad checkpoints fail before any work
    out = cfg['out_dir'] or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), 'analysis')
    os.makedirs(out, exist_ok=True)
    smoothing = f", maps smoothed with FWHM {cfg['fwhm']:g} grid units" if cfg['fwhm'] > 0 else ''
    results, tmaps, profiles = [], [], []
    for (model, info), role in zip(loaded, ['model', 'control']):
        if (role == 'model') != info['topographic']:
            log(f"note: the {role} {info['checkpoint']} is {_label(info)}")
        log(f"{role}: {info['checkpoint']}, {_label(info)}")
        m, t, p = analyze_model(model, info, suites, cfg, log)
        results.append(m)
        tmaps.append(t)
        profiles.append(p)

    labels = [f"{role}: {_label(r)}" for r, role in zip(results, ['model', 'control'])]
    for name, *_ in suites:
        c = results[0]['contrasts'][name]
        title = (f"{name}: t({c['conditions'][0]} - {c['conditions'][1]}); outlined: patches of >= "
                 f"{cfg['min_patch']} selective units (BH q < {cfg['fdr']}){smoothing}\n" + '   |   '.join(labels))
        blocks = [(lab, tm[name], r['contrasts'][name]['maps']) for lab, tm, r in zip(labels, tmaps, results)]
        plot_contrast(os.path.join(out, f"{name}.png"), blocks, title)
    plot_profiles(os.path.join(out, 'correlation_distance.png'), list(zip(labels, profiles)),
                  f"response correlation vs grid distance, over all stimuli{smoothing}")

    metrics = dict(config=cfg, model=results[0], control=results[1] if len(results) > 1 else None)
    if len(results) > 1:
        metrics['comparison'] = OrderedDict()
        for name, *_ in suites:
            a, b = results[0]['contrasts'][name], results[1]['contrasts'][name]
            metrics['comparison'][name] = dict(
                mean_morans_i=[a['mean_morans_i'], b['mean_morans_i']],
                # the ratio asked for; a control's I is near 0 (random places), so the difference is steadier
                ratio=_ratio(a['mean_morans_i'], b['mean_morans_i']),
                difference=a['mean_morans_i'] - b['mean_morans_i'],
                percent_selective=[a['percent_selective'], b['percent_selective']],
                map_ratio={m: _ratio(v['morans_i'], b['maps'].get(m, {}).get('morans_i'))
                           for m, v in a['maps'].items()})
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
        json.dump(_json_ready(metrics), f, indent=1)

    if smoothing:
        print(f"\nall numbers below{smoothing}")
    for name, *_ in suites:
        print_table(name, results)
    print()
    for name, *_ in suites:  # the one-line summary per contrast
        a = results[0]['contrasts'][name]
        topo = f"{_fmt(a['mean_morans_i'])} (shuffled {_fmt(a['mean_morans_i_null']['mean'])})"
        if len(results) == 1:
            print(f"{name}: mean Moran's I {topo}, {a['percent_selective']:.1f}% selective")
            continue
        b = results[1]['contrasts'][name]
        ctrl = f"{_fmt(b['mean_morans_i'])} (shuffled {_fmt(b['mean_morans_i_null']['mean'])})"
        comp = metrics['comparison'][name]
        print(f"{name}: mean Moran's I topo {topo} vs control {ctrl}: difference {_fmt(comp['difference'])}, "
              f"ratio {_fmt(comp['ratio'])}; selective {a['percent_selective']:.1f}% "
              f"vs {b['percent_selective']:.1f}%")
    print(f"\nwrote {out}/: {', '.join(f'{n}.png' for n, *_ in suites)}, correlation_distance.png, metrics.json")
    return metrics

def main(argv=None):
    try:
        ckpt_path, cfg = parse_args(sys.argv[1:] if argv is None else argv)
        run(ckpt_path, cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    main()
