"""Selectivity maps of a trained topographic language model: where on each map do the units that prefer sentences,
nouns or good news sit, and are they clustered or merely smooth? TopoLM's read-out (Rathi et al. 2025, the official
eval/: responses.py, hrf.py, visualize.py, localize.py, moran.py) in numpy alone, with a null beside every number.

Takes a checkpoint of topo_gpt.py (TopoLM), of topoformer.py (Topoformer) or of the official TopoLM code (the
published models), recognised from the file, runs stimulus suites through it, and for every spatial map the model
exposes and every contrast of two conditions computes
  - the t-map: Welch's t per unit between the two conditions' responses (a unit's response to a stimulus = its
    activation averaged over the stimulus's tokens);
  - how smooth the t-map is, Moran's I, unsmoothed and smoothed: the smoothed read-out first blurs every stimulus's
    response map with a Gaussian of FWHM 2 grid units, as the paper reads the model out;
  - the units selective for the first condition (Benjamini-Hochberg q < fdr over all units of all maps, and t > 0)
    and the patches they form;
and the same with the labels redrawn (the null that tells functional clusters from mere smoothness: a smooth model
makes any t-map smooth) and with the selective units at scattered places (the null for patches: many selective
units touch by chance). A folder of snapshots (--snapshot_iters) is analysed at every step: the map as it forms.

    python analyze.py out/ckpt.pt --control=out_control/ckpt.pt    # writes out/analysis/
    python analyze.py out/ckpt.pt --contrasts=language,noun_verb --fwhm=0
    python analyze.py out/ckpt.pt --stimuli=my_contrast.csv        # columns condition,text; 2 conditions
    python analyze.py official.pt --positions=DIR                  # a checkpoint of the official TopoLM code
    python analyze.py out/snapshots/ --control=out_control/ckpt.pt # over training: out/snapshots/analysis/
    python analyze.py out/ckpt.pt --control=out_control/ckpt.pt --sample="To be, or not to be"

Contrasts (t = first condition - second) and their nulls (how the null redraws the labels):
    language            paired    sentences - non-word strings, 12 words, twins (Fedorenko et al. 2010)
    noun_verb           shuffled  "the X the Y" - "to X to Y", 4 categories each (Hauptman et al. 2024)
    noun_verb_words     shuffled  nouns - verbs, single words (Moseley & Pulvermueller 2014, 2 x 2 design)
    concrete_abstract   shuffled  concrete - abstract single words
    noun_verb_concrete  shuffled  concrete nouns - concrete verbs
    noun_verb_abstract  shuffled  abstract nouns - abstract verbs
    sentiment           paired    positive - negative sentences, pairs that differ in one adjective
paired: the labels of each matched pair swap with probability 1/2; shuffled: the labels are permuted over all
stimuli, group sizes kept. A --stimuli CSV is shuffled. (The official noun_verb is verbs - nouns.)

Writes into out_dir, each file whole (a folder holds this analysis or the one before): <contrast>.png (the
unsmoothed t-maps, layers x maps, the control's to the right, patches outlined), correlation_distance.png and
metrics.json (its keys: docs/results.md); for a folder of snapshots over_training.png, over_training_maps.png,
over_training.gif and metrics.json with the list over_training.
"""

import os
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads, as in the model scripts
import re, sys, csv, json, math, time, random, pathlib, textwrap, itertools
from collections import OrderedDict, defaultdict, deque

import numpy as np
import torch

import topo_gpt
from topo_gpt import UsageError, command, parse_config

# -----------------------------------------------------------------------------
# config, each key overridable as --key=value (the first argument is the checkpoint, or a folder of
# snapshots); a check before a comment's colon says which values the command line accepts
out_dir = ''  # where the PNGs and metrics.json go; '' = an 'analysis' folder beside the checkpoint(s)
control = ''  # checkpoint of a non-topographic control of the same kind of model, shown beside it
positions = ''  # folder of an official TopoLM checkpoint's layer.{i}.{attn,mlp}.pkl; '' = its position_dir
contrasts = 'all'  # comma list of the contrasts above, or all
stimuli = ''  # CSV with columns condition,text and exactly two conditions: replaces the built-in contrasts
n_shuffles = 5  # x >= 0: redraws of the labels per contrast, the null (per snapshot of a folder: 2); 0 = none
fwhm = 2.0  # x >= 0: FWHM in grid units of the smoothed read-out's Gaussian (the paper's 2); 0 = unsmoothed only
fdr = 0.05  # 0 < x < 1: a unit is selective if its Benjamini-Hochberg q-value is below this (and t > 0)
min_patch = 25  # x >= 1: a patch = at least this many 4-connected selective units of one sign (TopoLM counts 25)
batch_size = 64  # x >= 1: stimuli per forward pass
sample = ''  # only print what the model and its control say: a TopoLM continues it, a Topoformer fills its [MASK]
seed = 1337  # x >= 0: draws the stimuli, the nulls and the samples
device = 'auto'  # auto = cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k[0] != '_' and k.islower() and isinstance(v, (int, float, str))}

# ---- Stimuli. Everything is written here and drawn from the seed, so a run is reproducible anywhere. ----

# Language localizer (Fedorenko et al. 2010): sentences of 12 words, as in the original, against strings of 12
# pronounceable non-words, each sentence's twin matched word for word in letters. A sentence = subject (3 words) +
# verb and object (4) + when, where or how (5); no one-letter words ("a", "I"): their twins would look like words.
_SUBJECTS = """the old farmer|my older sister|the young doctor|our new teacher|the friendly neighbour|
the tired driver|his elderly mother|the little boy|the quiet student|the busy nurse|my best friend|
the tall waiter|her favourite uncle|the shy girl|the angry chef|our new manager|the local baker|
his clever grandmother|the careful pilot|the famous singer|my youngest brother|the patient librarian|
the cheerful postman|their eldest daughter"""
_PREDICATES = """fixed the broken fence|painted the kitchen wall|read the long letter|cooked dinner for
everyone|found the missing keys|washed the dirty dishes|opened the front door|sold the old car|wrote the
short story|carried the heavy boxes|bought some fresh bread|called the family doctor|cleaned the spare
room|watched the funny film|visited some old friends|lost the house keys|fed the hungry dog|packed the
blue suitcase|answered every single email|closed the shop early|missed the last train|baked the birthday
cake|sang an old song|repaired the kitchen sink|made some fresh coffee|caught the early bus|moved the old
piano|mended the torn jacket|borrowed three library books|emptied the kitchen bins"""
_ADVERBIALS = """in the morning before work|just before the storm arrived|on the way back home|after the
long staff meeting|during the summer school holidays|with great care and patience|without any help from
anyone|for the very first time|by the river last weekend|near the station this morning|two days before
the wedding|as usual on Monday mornings|in the evening after dinner|before the guests had arrived|while
the children were asleep|after school on Friday afternoon|despite the cold and rain|at the weekend with
friends|in the middle of winter|three times in one week"""

_CONSONANTS, _VOWELS = 'bdfgklmnprstvz', 'aiou'  # no final e: "bame" reads as an English word
_ONSETS = ['bl', 'br', 'dr', 'fl', 'fr', 'gl', 'gr', 'kl', 'pl', 'pr', 'sl', 'sp', 'st', 'tr']

def nonword(rng, n_letters):
    """A pronounceable non-word of exactly n_letters letters, alternating consonants and vowels and ending
    in a vowel (a, i, o, u), which few English words do (CVC and -ed/-er endings would often make words):
    2 letters VC (ep), 3 VCV (oba), even CVCV... (bomuta), odd >= 5 CCVCV... or VCVCV (klosu, obimu)."""
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

def language_stimuli(seed, n=240):
    """n sentences of 12 words and n non-word strings, pair i matched word for word: {'sentences', 'nonwords'}"""
    rng = random.Random(seed)
    parts = [[' '.join(x.split()) for x in s.split('|')] for s in (_SUBJECTS, _PREDICATES, _ADVERBIALS)]
    combos = list(itertools.product(*parts))
    sentences, nonwords = [], []
    for subject, predicate, adverbial in rng.sample(combos, n):
        words = f"{subject} {predicate} {adverbial}".split()
        fake = [nonword(rng, len(w)) for w in words]
        sentences.append(words[0].capitalize() + ' ' + ' '.join(words[1:]) + '.')
        nonwords.append(fake[0].capitalize() + ' ' + ' '.join(fake[1:]) + '.')
    return {'sentences': sentences, 'nonwords': nonwords}

# Nouns and verbs as TopoLM tests them (Hauptman et al. 2024, after Elli et al. 2019): two-word phrases, a noun as
# "the X the Y", a verb as "to X to Y", X and Y of one semantic category, 4 categories per class, each word used
# mostly as one word class. The phrases differ in their function words too ("the" vs "to"), as in the brain study.
NOUNS = {
    'places': """village harbour meadow suburb canyon island valley cottage castle museum library airport
        stadium prairie lagoon glacier volcano cathedral jungle bakery tavern fortress monastery orchard""".split(),
    'animals': """rabbit tiger elephant giraffe donkey zebra lion leopard camel kangaroo penguin ostrich
        sparrow pigeon flamingo eagle turtle lizard dolphin octopus hamster panda gorilla cheetah""".split(),
    'objects': """sofa lamp kettle teapot wardrobe pillow cushion carpet blanket cupboard drawer candle
        basket bucket saucepan spoon umbrella wallet mattress curtain cabinet ladder suitcase toaster""".split(),
    'foods': """pancake biscuit pizza sausage cheese yogurt muffin omelette pumpkin spinach lettuce mango
        peach apricot avocado broccoli celery almond walnut pretzel bagel cucumber raisin cherry""".split(),
}
VERBS = {
    'mouth': """chew nibble munch slurp gargle gulp lick spit suck mumble mutter whisper yawn sneeze chomp
        gnaw devour inhale exhale stammer recite sing giggle chatter""".split(),
    'hand': """grab squeeze pinch knead stir scrub wipe rub fold twist grasp clutch shove tickle scratch
        pluck unzip sew knit carve sprinkle crumple unscrew unwrap""".split(),
    'motion': """wander crawl climb swim dive jump hop leap stagger stumble hurry tiptoe wade trudge stroll
        sprint jog glide slither waddle saunter roam amble scramble""".split(),
    'perception': """see hear listen notice observe stare gaze peek gawk sniff squint glimpse overhear
        perceive behold inspect examine eavesdrop recognise discern detect glance scrutinise ogle""".split(),
}

def phrase_stimuli(seed, per_category=72):
    """Noun and verb phrases, per_category of each category (72, as Elli et al.): each word is X in
    per_category / n_words phrases and Y in as many, Y != X. Returns {'noun_places': ["the village the
    meadow", ...], ..., 'verb_mouth': ["to chew to gulp", ...], ...}."""
    rng = random.Random(seed + 2)
    out = {}
    for kind, article, categories in (('noun', 'the', NOUNS), ('verb', 'to', VERBS)):
        for category, words in categories.items():
            n = len(words)
            order = rng.sample(words, n)
            # round r pairs the i-th word with the (i + shift_r)-th: a shift of 1..n-1 never pairs a word
            # with itself, and distinct shifts never repeat a phrase
            shifts = rng.sample(range(1, n), per_category // n)
            out[f'{kind}_{category}'] = [f"{article} {order[i]} {article} {order[(i + s) % n]}"
                                         for s in shifts for i in range(n)]
    return out

PHRASE_NOUNS = [f'noun_{c}' for c in NOUNS]
PHRASE_VERBS = [f'verb_{c}' for c in VERBS]

# Word class x meaning (after Moseley & Pulvermueller 2014): 48 single words in each cell of concrete/abstract x
# noun/verb, each used mostly as one word class; cells of similar mean length (5.5-6.8 letters, 1.9-2.1 GPT-2 tokens).
WORDS = {
    'concrete_nouns': """apple banana carrot onion potato tomato lemon cherry cabbage sandwich spoon kettle
        teapot saucepan blanket pillow cushion sofa wardrobe window pencil basket bucket candle lamp
        necklace umbrella wallet jacket sweater scissors bicycle tractor helicopter violin piano rabbit
        horse tiger elephant giraffe donkey pebble cottage cucumber carpet rooster spider""".split(),
    'abstract_nouns': """justice freedom truth honesty wisdom courage patience loyalty liberty democracy theory
        concept idea notion belief faith virtue mercy grief sorrow jealousy happiness sadness kindness fairness duty
        glory poverty wealth knowledge logic purpose destiny fate chaos harmony mystery morality ethics philosophy
        religion tradition opinion ambition anxiety boredom curiosity dignity""".split(),
    'concrete_verbs': """grab throw chew lick squeeze scatter pour unbutton fasten sharpen sweep wipe scrub
        carry lift drag tighten climb crawl wriggle kneel grasp clutch shove fling stagger crouch wash
        bake tiptoe boil grind wrestle sneeze blink pinch tickle juggle knead crumple squat nibble swim
        unpack steer scribble sprinkle stumble""".split(),
    'abstract_verbs': """believe think know understand remember forget imagine suppose assume decide consider
        realize recognize pretend deserve intend prefer admire forgive hesitate ponder presume conclude infer deduce
        perceive dare yearn tolerate neglect ignore resent crave approve deny justify evaluate interpret analyze
        accept exist belong persuade convince reconcile seem expect envision""".split(),
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
    chosen = rng.sample(list(itertools.product(_FRAMES, _TOPICS, _ADJECTIVES)), n)
    return {'positive': [frame.format(topic, good) for frame, topic, (good, _) in chosen],
            'negative': [frame.format(topic, bad) for frame, topic, (_, bad) in chosen]}

# Words a non-word must not be: every word used here; the two-letter English words the generator can make; and
# every form of 3 to 7 letters that it can make and GPT-2's tokenizer holds as one whole-word token, lowercase or
# capitalised, after a space or not (words, names, abbreviations: found by running through all such forms once).
_REAL_WORDS = set(' '.join(_SUBJECTS.split('|') + _PREDICATES.split('|') + _ADVERBIALS.split('|')).split())
_REAL_WORDS |= {w for lists in (WORDS, NOUNS, VERBS) for ws in lists.values() for w in ws}
_REAL_WORDS |= set("""ab ad ag av ed id if of ok op up uk
ado ago aka ali ana api idi iso ori abu ada agu aki ala ara ari iro isa obi oro uni uri
bona data goto guru lava logo mana mini mono mosa nano para radi saga situ soda sofa solo sudo tofu tuna
vari visa vivo boko dana dani dino dota fifa gaga gaza gina goku kali kara kira kodi kuro lama lana lara
liga lima lisa loki lori luna mali mama mara mari mata miko milo modi mori moto nadu nasa nato nazi nina
nora nova palo papa paso polo rita robo roku roma romo rosa sana sara sina siri sora tara tata tina toro
vita zika zoro lago amino aroma initi drama flora plaza produ promo proto akira anita asuka atari
obama osaka osama bravo bruno plato pluto spani banana bikini potato saliva tomato vagina dakota konami kosovo latino
maduro makoto manila marina marino naruto nikola panama paragu safari sakura somali subaru suzuki tanaka
stamina stimuli adinida alabama alibaba arizona florida tripoli""".split())

def builtin_stimuli(seed):
    """Every condition of the built-in contrasts: {condition: [texts]}."""
    return {**language_stimuli(seed), **phrase_stimuli(seed), **WORDS, **sentiment_stimuli(seed)}

# name: (first group, second group, null); a group = (label, its conditions). 'paired': the two groups
# are matched pairs, stimulus i of the first with stimulus i of the second.
CONTRASTS = OrderedDict([
    ('language', (('sentences', ['sentences']), ('non-words', ['nonwords']), 'paired')),
    ('noun_verb', (('noun phrases', PHRASE_NOUNS), ('verb phrases', PHRASE_VERBS), 'shuffled')),
    ('noun_verb_words', (('nouns', ['concrete_nouns', 'abstract_nouns']),
                         ('verbs', ['concrete_verbs', 'abstract_verbs']), 'shuffled')),
    ('concrete_abstract', (('concrete', ['concrete_nouns', 'concrete_verbs']),
                           ('abstract', ['abstract_nouns', 'abstract_verbs']), 'shuffled')),
    ('noun_verb_concrete', (('concrete nouns', ['concrete_nouns']),
                            ('concrete verbs', ['concrete_verbs']), 'shuffled')),
    ('noun_verb_abstract', (('abstract nouns', ['abstract_nouns']),
                            ('abstract verbs', ['abstract_verbs']), 'shuffled')),
    ('sentiment', (('positive', ['positive']), ('negative', ['negative']), 'paired')),
])

NULLS = {'paired': 'labels swapped within matched pairs', 'shuffled': 'labels shuffled over all stimuli'}

def read_stimuli_csv(path):
    """A user's own contrast: a CSV with columns condition,text and exactly two conditions.
    Returns (contrast name = the file's stem, {condition: [texts]}) in the file's order."""
    if not os.path.isfile(path):
        raise UsageError(f"--stimuli: no file {path}")
    try:
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
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} cannot be read; a Latin-1 "
                         f"or Windows file?): save it as UTF-8") from None
    except csv.Error as e:
        raise UsageError(f"{path} is not a readable CSV ({e})") from None
    if len(groups) != 2:
        raise UsageError(f"{path}: needs exactly two conditions, found {len(groups)}: {list(groups)}")
    for cond, texts in groups.items():
        if len(set(texts)) < 2:
            raise UsageError(f"{path}: condition {cond!r} has {len(set(texts))} different non-empty texts; "
                             f"a t-test needs 2 or more")
    a, b = groups.values()
    if sorted(a) == sorted(b):
        raise UsageError(f"{path}: the two conditions hold the same texts, so every t would be 0")
    return os.path.splitext(os.path.basename(path))[0], groups

# ---- Models and their responses ---------------------------------------------

def load_model(path, positions_dir, device):
    """Any of the three kinds of checkpoint, read once and recognised here: topo_gpt.py's and topoformer.py's
    (by their model_type) and the official TopoLM code's (no model_type; its model_args spell n_embed), whose
    unit places come from positions_dir ('' = model_args' position_dir beside it). Returns (model, info dict)."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint file {path}")
    try:
        ckpt = topo_gpt.read_pickled(path, torch_file=True)
    except Exception as e:
        raise UsageError(f"{path} cannot be read as a checkpoint: it is damaged, cut short or no torch file "
                         f"({type(e).__name__})") from None
    kind, args = (ckpt.get('model_type'), ckpt.get('model_args')) if isinstance(ckpt, dict) else (None, None)
    official = kind is None and isinstance(args, dict) and 'n_embed' in args
    if kind is None and not official:
        raise UsageError(f"{path} is a foreign checkpoint: not one of topo_gpt.py, topoformer.py or the "
                         f"official TopoLM code")
    if kind not in (None, 'topolm', 'topoformer'):
        raise UsageError(f"{path}: unknown model_type {kind!r} (expected 'topolm' or 'topoformer')")
    missing = [k for k in ('model_args', 'model') if k not in ckpt]
    if missing or not isinstance(args, dict):
        raise UsageError(f"{path} is incomplete: it has no {' or '.join(missing) or 'model_args dict'}")
    if official and not positions_dir:
        if 'position_dir' not in args:
            raise UsageError(f"{path} names no position_dir: give the folder of its position pickles with "
                             f"--positions=DIR")
        positions_dir = os.path.join(os.path.dirname(os.path.abspath(path)), args['position_dir'])
    try:
        if official:
            model = topo_gpt.GPT.from_official(ckpt, positions_dir, device)
        elif kind == 'topolm':
            model = topo_gpt.GPT.from_checkpoint(ckpt, device)
        else:
            import topoformer
            model = topoformer.Topoformer.from_checkpoint(ckpt, device)
    except ValueError as e:  # (from_official: no or bad position pickles, or a variant this repo lacks)
        hint = "; --positions=DIR names the folder of its position pickles" if official and 'position' in str(e) else ''
        raise UsageError(f"{path}: {str(e).splitlines()[0]}{hint}") from None
    except (KeyError, TypeError, RuntimeError) as e:  # weights that do not fit the model their config describes
        raise UsageError(f"{path}: its weights do not fit the model its config describes ({type(e).__name__}); a "
                         f"file of another version of the script?") from None
    try:  # (the published TopoLM's places put some units on one cell: fail now, not after the long work)
        [to_lattice(model.positions(m).cpu().numpy()) for m in model.map_names]
    except ValueError as e:
        raise UsageError(f"{path}: {e} (as do the published TopoLM's places); analyze.py draws one unit per "
                         f"cell") from None
    config = model.config  # the control: sq = sr = 1 (Topoformer), alpha = 0 (TopoLM)
    topographic = (config.sq < 1 or config.sr < 1) if kind == 'topoformer' else config.alpha > 0
    return model, dict(checkpoint=path, model_type=kind or 'topolm', official=official, topographic=topographic,
                       step=ckpt.get('iter_num'), losses=ckpt.get('losses'))

def describe(info):
    name = {'topolm': 'TopoLM', 'topoformer': 'Topoformer'}[info['model_type']]
    return f"{name}{', official' if info['official'] else ''} ({'' if info['topographic'] else 'non-'}topographic)"

def gpt2_tokenizer():
    """tiktoken's GPT-2 encoding. tiktoken downloads it once into its cache; offline it needs a copy."""
    try:
        import tiktoken
        return tiktoken.get_encoding('gpt2')
    except ImportError:
        raise UsageError("the tokenizer needs tiktoken: pip install tiktoken") from None
    except Exception as e:
        raise UsageError(f"could not load the GPT-2 tokenizer ({type(e).__name__}); without internet, set "
                         f"TIKTOKEN_CACHE_DIR to a copy of tiktoken's cache (e.g. ../shared/tiktoken_cache)") from None

def unit_responses(model, texts, enc, batch_size=64, device='cpu'):
    """Response of every unit of every map to every text: its activation averaged over the text's own tokens.
    Texts are grouped by token length and run as whole batches, so there is no padding (the official code pads
    and averages over the padding too; a bidirectional model would attend to it). Returns {map: (N, C) float32}."""
    ids = [enc.encode_ordinary(t) for t in texts]
    too_long = [i for i, x in enumerate(ids) if len(x) > model.config.block_size]
    if too_long:
        raise UsageError(f"{len(too_long)} stimuli, e.g. {texts[too_long[0]][:40]!r}..., have more tokens than the "
                         f"model's block_size {model.config.block_size} (the longest {max(map(len, ids))}): "
                         f"leave their contrast out (--contrasts=...)")
    by_length = defaultdict(list)
    for i, x in enumerate(ids):
        if not x:
            raise UsageError(f"stimulus {texts[i]!r} has no tokens")
        by_length[len(x)].append(i)
    out, t0, done, shown = None, time.time(), 0, time.time()
    # logits unused; the output head (T x vocab a text) costs as much as a small model's blocks: feed it the last token
    hook = model.lm_head.register_forward_pre_hook(lambda mod, inp: (inp[0][:, -1:],))
    try:
        with torch.no_grad():
            for T, rows in sorted(by_length.items()):
                for s in range(0, len(rows), batch_size):
                    chunk = rows[s:s + batch_size]
                    idx = torch.tensor([ids[i] for i in chunk], dtype=torch.long, device=device)  # (B, T)
                    _, _, maps = model(idx, return_maps=True)  # {name: (B, T, C)}
                    if out is None:
                        out = OrderedDict((k, np.zeros((len(texts), m.size(-1)), np.float32)) for k, m in maps.items())
                    for k, m in maps.items():
                        out[k][chunk] = m.float().mean(dim=1).cpu().numpy()
                    done += len(chunk)
                    if time.time() - shown > 10:  # a big model takes a while: say how far it got
                        print(f"  {done}/{len(texts)} stimuli...", flush=True)
                        shown = time.time()
    finally:
        hook.remove()
    print(f"  responses of {len(out)} maps to {len(texts)} stimuli in {time.time() - t0:.1f}s", flush=True)
    return out

def to_lattice(positions):
    """Integer grid coordinates (D, 2) (row, col) of the units, checked: every model places its units on
    the integer lattice, one unit per cell of an H x W grid. Returns (lattice, (H, W))."""
    pos = np.asarray(positions, dtype=np.float64)
    lattice = np.rint(pos).astype(np.int64)
    if pos.ndim != 2 or pos.shape[1] != 2 or not np.array_equal(lattice, pos) or lattice.min() < 0:
        raise ValueError("unit positions must be (D, 2) integer lattice coordinates (row, col) >= 0")
    H, W = lattice.max(0) + 1
    cells = len(np.unique(lattice[:, 0] * W + lattice[:, 1]))
    if H * W != len(pos) or cells != len(pos):
        raise ValueError(f"the {len(pos)} units take {cells} of the {H * W} cells of the {H} x {W} grid, not one each")
    return lattice, (int(H), int(W))

def to_grid(values, positions):
    """Place values (..., D) of D units at their grid positions (D, 2): returns (..., H, W)."""
    lattice, (H, W) = to_lattice(positions)
    values = np.asarray(values)
    grid = np.zeros(values.shape[:-1] + (H, W), dtype=values.dtype)
    grid[..., lattice[:, 0], lattice[:, 1]] = values
    return grid

def smooth(grids, fwhm):
    """Gaussian smoothing of maps (..., H, W), FWHM in grid units: sigma = FWHM / sqrt(8 ln 2). Separable:
    out = K_rows @ map @ K_cols^T with row-normalised Gaussian matrices K[i, j] ~ exp(-(i-j)^2 / 2 sigma^2),
    so a constant map stays constant, borders included. The official read-out (eval/hrf.py) leaves it unnormalised:
    the two differ by a positive factor per grid cell, which Welch's t ignores (the smoothed t-maps are the same)."""
    sigma = fwhm / math.sqrt(8 * math.log(2))
    def kernel(n):
        d = np.arange(n)[:, None] - np.arange(n)[None, :]
        k = np.exp(-d**2 / (2 * sigma**2))
        return (k / k.sum(1, keepdims=True)).astype(grids.dtype)
    H, W = grids.shape[-2:]
    return kernel(H) @ grids @ kernel(W).T

# ---- Statistics, written here (no scipy), each checked against hand values in the tests ----

def welch_t(a, b):
    """Welch's t-test of mean(a) - mean(b) along axis 0, per unit. a: (n_a, ...), b: (n_b, ...).
        s2_a = var(a) / n_a (unbiased variance),  t = (mean a - mean b) / sqrt(s2_a + s2_b)
        df   = (s2_a + s2_b)^2 / (s2_a^2 / (n_a - 1) + s2_b^2 / (n_b - 1))    (Welch-Satterthwaite)
    A unit silent on every stimulus gets t = 0, df = n_a + n_b - 2. Returns t, df (...)."""
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
    """Benjamini-Hochberg q-values of p-values of any shape (one family: all entries):
        q_(i) = min over j >= i of p_(j) * m / j, for the p-values sorted ascending, capped at 1.
    A unit is significant at FDR level alpha if its q < alpha."""
    p = np.asarray(p, np.float64)
    flat, m = p.ravel(), p.size
    order = np.argsort(flat)
    scaled = flat[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(scaled[::-1])[::-1]  # running min from the largest p down
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    return q.reshape(p.shape)

# ---- Topography: Moran's I, patches, correlation vs distance ----------------

_QUEEN = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]

def morans_i(grid):
    """Moran's I of a map (H, W) with queen contiguity (the 8 surrounding cells are neighbours), the weights
    row-standardised (each cell's neighbours share weight 1), as TopoLM (esda's Moran, libpysal's lat2W(rook=False)):
        z = x - mean(x),   I = (N / S0) sum_ij w_ij z_i z_j / sum_i z_i^2,   S0 = sum_ij w_ij = N
    so I = sum_i z_i * (mean of z over i's neighbours) / sum_i z_i^2.
    About +1 for a smooth map, -1/(N-1) on average for shuffled noise; NaN for a constant map."""
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
    """Connected components of a boolean map (H, W) with 4-connectivity (up, down, left, right), by flood fill.
    Returns labels (H, W) int (0 = background, 1..k in row-major order of their first cell) and sizes [of 1, ..., k]."""
    mask = np.asarray(mask, bool)
    H, W = mask.shape
    labels, sizes = np.zeros((H, W), dtype=np.int64), []
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
    """Patches of a t-map: the 4-connected clusters of significant units, positive and negative t
    separately, of at least min_size units. Returns {'positive': sizes, 'negative': sizes} (largest
    first) and a map (H, W) that is +1 on the units of positive patches, -1 on negative ones, else 0."""
    sizes, where = {}, np.zeros(t.shape, dtype=np.int64)
    for sign, s, mask in (('positive', 1, significant & (t > 0)), ('negative', -1, significant & (t < 0))):
        labels, all_sizes = clusters(mask)
        big = [k + 1 for k, n in enumerate(all_sizes) if n >= min_size]
        sizes[sign] = sorted((all_sizes[k - 1] for k in big), reverse=True)
        where[np.isin(labels, big)] = s
    return sizes, where

def correlation_profile(responses):
    """Smoothness without any contrast: the Pearson correlation of every pair of units over all stimuli,
    averaged in bins of grid distance (Euclidean, rounded to the nearest integer: 1, 2, ..., side - 1).
    responses: (N stimuli, H, W). Returns distances (B,), mean r (B,). Silent units are left out."""
    N, H, W = responses.shape
    x = responses.reshape(N, H * W).astype(np.float64)
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

# ---- One contrast: t-maps, selectivity, Moran's I, patches; the nulls -------

def t_maps(grids, ia, ib, fdr):
    """Welch t of group ia - group ib for every unit of every map (grids: {map: (N, H, W)}), and which units are
    significant: BH-FDR q < fdr over all units of all maps, as the official code. Returns ({map: t}, {map: q < fdr})."""
    ts, ps = OrderedDict(), []
    for name, g in grids.items():
        t, df = welch_t(g[ia], g[ib])
        ts[name] = t
        ps.append(t_pvalue(t, df))
    q = bh_fdr(np.stack(ps))
    return ts, OrderedDict((name, qk < fdr) for name, qk in zip(ts, q))

def contrast_stats(grids, ia, ib, fdr, min_size, smoothed=None):
    """The t-maps of group ia - group ib (t_maps) and what they show, per map: Moran's I, the patches of selective
    units, percent_selective = % of units significant with t > 0 (selective for the first group), _second: t < 0.
    smoothed: the same grids smoothed, for the smoothed read-out (the official localizer's: smoothed responses,
    then t, FDR and selectivity): its Moran's I and percent_selective_smoothed. Returns {map: dict(t, significant,
    morans_i, morans_i_smoothed, percent_selective(_second, _smoothed), patches, patch_map)}."""
    ts, sig = t_maps(grids, ia, ib, fdr)
    ts_smooth, sig_smooth = t_maps(smoothed, ia, ib, fdr) if smoothed is not None else (None, None)
    out = OrderedDict()
    for name, t in ts.items():
        sizes, where = patches(t, sig[name], min_size)
        out[name] = dict(t=t, significant=sig[name], morans_i=morans_i(t),
                         morans_i_smoothed=None if smoothed is None else morans_i(ts_smooth[name]),
                         percent_selective=100 * (sig[name] & (t > 0)).mean(),
                         percent_selective_second=100 * (sig[name] & (t < 0)).mean(),
                         percent_selective_smoothed=None if smoothed is None else
                         100 * (sig_smooth[name] & (ts_smooth[name] > 0)).mean(),
                         patches=sizes, patch_map=where)
    return out

def redraw_labels(ia, ib, null, rng):
    """One draw of the null's labels for groups ia, ib (row indices). shuffled: all stimuli pooled and dealt
    out again, group sizes kept. paired: ia[i] and ib[i] are a matched pair (a sentence and its non-word twin);
    each pair's two labels swap with probability 1/2, so every pair stays split across the groups and the null
    keeps what the pairs share (length, frame, topic), as a null of matched pairs must."""
    if null == 'paired':
        swap = rng.random(len(ia)) < 0.5
        return np.where(swap, ib, ia), np.where(swap, ia, ib)
    perm = rng.permutation(np.concatenate([ia, ib]))
    return perm[:len(ia)], perm[len(ia):]

def _mean_sd(values):
    v = np.asarray([np.nan if x is None else x for x in values], np.float64)
    if not len(v) or np.isnan(v).all():
        return dict(mean=None, sd=None)
    return dict(mean=float(np.nanmean(v)), sd=float(np.nanstd(v)))  # population sd: the draws' spread, 0 for one

def _n_patches(sizes):
    return len(sizes['positive']) + len(sizes['negative'])

def _largest(sizes):
    return max(sizes['positive'] + sizes['negative'] + [0])

def summarize(real, nulls, scattered):
    """The numbers of one contrast: each map's own beside its null summaries, then their means over the maps. real:
    contrast_stats of the true labels, nulls: [contrast_stats] of redrawn labels, scattered: scattered_patches."""
    with_null = ('morans_i', 'morans_i_smoothed', 'percent_selective', 'percent_selective_smoothed')
    maps = OrderedDict()
    for m, s in real.items():
        v = maps[m] = dict(percent_selective_second=s['percent_selective_second'], patches=s['patches'],
                           n_patches=_n_patches(s['patches']), largest_patch=_largest(s['patches']),
                           n_patches_null=_mean_sd([_n_patches(n[m]['patches']) for n in nulls]),
                           n_patches_scattered=_mean_sd([_n_patches(x) for x in scattered[m]]),
                           largest_patch_scattered=_mean_sd([_largest(x) for x in scattered[m]]))
        for key in with_null:
            v[key], v[key + '_null'] = s[key], _mean_sd([n[m][key] for n in nulls])
    over_maps = lambda key, stats: _mean_sd([v[key] for v in stats.values()])['mean']
    # the means over the maps (the maps are of equal size: the % selective is that of all units)
    means = dict(percent_selective_second=over_maps('percent_selective_second', real), maps=maps)
    for key in with_null:
        mean = key if key.startswith('percent') else 'mean_' + key
        means[mean], means[mean + '_null'] = over_maps(key, real), _mean_sd([over_maps(key, n) for n in nulls])
    return means

def scattered_patches(stats, n, min_size, rng):
    """The patches that chance alone makes at each map's share of selective units: the same t-map with its
    units' places shuffled, n times. (When most units are selective, random neighbours join into big
    clusters too: percolation, as in a non-topographic control.) Returns {map: [patch sizes]}."""
    out = {}
    for m, s in stats.items():
        t, sig = s['t'].ravel(), s['significant'].ravel()
        out[m] = [patches(t[p].reshape(s['t'].shape), sig[p].reshape(s['t'].shape), min_size)[0]
                  for p in (rng.permutation(t.size) for _ in range(n))]
    return out

# ---- One model: responses -> grids -> every contrast ------------------------

def analyze_model(model, info, suites, rows, texts, enc, cfg, device):
    """Every contrast of one model. suites: [(name, (label, conditions), (label, conditions), null)]; rows:
    {condition: row indices into texts}. Returns (metrics, {contrast: {map: (t, patch map)}}, {map: (d, mean r)})."""
    grids = OrderedDict((m, to_grid(r, model.positions(m).cpu().numpy()))  # {map: (N, H, W)}
                        for m, r in unit_responses(model, texts, enc, cfg['batch_size'], device).items())
    # the smoothed read-out: each stimulus's map smoothed once; every draw of the null reuses them
    smoothed = OrderedDict((m, smooth(g, cfg['fwhm'])) for m, g in grids.items()) if cfg['fwhm'] > 0 else None
    H, W = next(iter(grids.values())).shape[1:]
    metrics = dict(**info, grid=[H, W], maps=list(grids), contrasts=OrderedDict())
    tmaps = OrderedDict()
    for name, (label_a, cond_a), (label_b, cond_b), null in suites:
        t0 = time.time()
        ia, ib = (np.concatenate([rows[c] for c in conditions]) for conditions in (cond_a, cond_b))
        rng = np.random.default_rng(cfg['seed'])  # seeded per contrast: the same null whichever others run
        real = contrast_stats(grids, ia, ib, cfg['fdr'], cfg['min_patch'], smoothed)
        nulls = [contrast_stats(grids, *redraw_labels(ia, ib, null, rng), cfg['fdr'], cfg['min_patch'], smoothed)
                 for _ in range(cfg['n_shuffles'])]
        scattered = scattered_patches(real, cfg['n_shuffles'], cfg['min_patch'], rng)
        metrics['contrasts'][name] = dict(conditions=[label_a, label_b], n_stimuli=[len(ia), len(ib)], null=null,
                                          n_shuffles=cfg['n_shuffles'], **summarize(real, nulls, scattered))
        tmaps[name] = OrderedDict((m, (s['t'], s['patch_map'])) for m, s in real.items())
        print(f"  {name}: {time.time() - t0:.1f}s", flush=True)
    profiles = OrderedDict((m, correlation_profile(g)) for m, g in grids.items())
    metrics['correlation_profile'] = OrderedDict(
        (m, dict(distance=d.tolist(), mean_r=r.tolist())) for m, (d, r) in profiles.items())
    return metrics, tmaps, profiles

# ---- Plotting ---------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot, drawing into files (no screen needed), imported only when a figure is drawn."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt

def _layout(names):
    """Map names 'h.<layer>.<kind>' -> ({name: (row = layer, column = kind)}, n rows, n columns)."""
    keys = [tuple(n.split('.')[1:]) if n.count('.') == 2 else (n, '') for n in names]
    layers, kinds = list(dict.fromkeys(k[0] for k in keys)), list(dict.fromkeys(k[1] for k in keys))
    return {n: (layers.index(l), kinds.index(k)) for n, (l, k) in zip(names, keys)}, len(layers), len(kinds)

def _fmt(x, spec='.2f'):
    return '-' if x is None else format(x, spec)  # None: no draws, no smoothing, or a constant map

def _vmax(tmaps):
    """The colour scale of t-maps [{map: (t, patch map)}]: the 99th percentile of all |t|, as a few extreme
    t-values of one model (the control's, often) would pale every other map; 1 if all t are 0."""
    return float(np.percentile(np.abs(np.concatenate([t.ravel() for tm in tmaps for t, _ in tm.values()])), 99)) or 1.0

def plot_contrast(path, blocks, title):
    """t-maps of one contrast: a grid of layers x maps for each model, side by side (the model left, its control
    right), one symmetric colour scale, patches outlined. blocks: [(label, {map: (t, patch map)}, {map: metrics})]."""
    plt = pyplot()
    layouts = [_layout(list(tm)) for _, tm, _ in blocks]
    n_rows = max(l[1] for l in layouts)
    # the blocks' columns, with a narrow empty column between two blocks
    ratios = [r for i, l in enumerate(layouts) for r in ([0.25] if i else []) + [1] * l[2]]
    vmax = _vmax([tm for _, tm, _ in blocks])  # one scale for both models, as the comparison needs
    content = 2.0 * sum(ratios)  # inches of maps; plus 0.1 left, 1.3 right for the colour bar
    width, height = max(content + 1.4, 9.0), 2.3 * n_rows + 1.3  # at least 9 inches: room for the title
    pad = (width - content - 1.4) / 2  # centre narrow grids
    fig = plt.figure(figsize=(width, height))
    gs = fig.add_gridspec(n_rows, len(ratios), width_ratios=ratios, left=(0.1 + pad) / width,
                          right=1 - (1.3 + pad) / width, bottom=0.2 / height, top=1 - 1.3 / height,
                          wspace=0.15, hspace=0.55)  # fixed margins: a tight layout takes seconds a figure
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
            v = mm[m]
            smoothed = f" (smoothed {_fmt(v['morans_i_smoothed'])})" if v['morans_i_smoothed'] is not None else ''
            ax.set_title(f"{label.split(':')[0] + ' ' if len(blocks) > 1 else ''}{m}\n"
                         f"Moran's I {_fmt(v['morans_i'])}{smoothed}", fontsize=8)
        col0 += n_kinds + 1
    fig.colorbar(im, cax=fig.add_axes([1 - (1.05 + pad) / width, 0.2, 0.15 / width, 0.6]), extend='both',
                 label=f"Welch's t (scale: the 99th percentile of |t|, {vmax:.1f})")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)

def plot_profiles(path, models, title):
    """Correlation vs grid distance, one panel per model, one line per map (darker = deeper)."""
    plt = pyplot()
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

# ---- The printout: a table per contrast, a legend, a line per contrast ------

_COLUMNS = [("Moran's I", 9), ('shuffled', 10), ('smoothed I', 10), ('shuffled', 10), ('% selective', 11),
            ('smoothed %', 11), ('patches', 9)]

def _cells(v):
    """The cells of one model's row: v = a map's metrics, or a contrast's (its means over the maps)."""
    moran = 'morans_i' if 'morans_i' in v else 'mean_morans_i'  # a map's, or the mean over the maps
    with_sd = lambda s: '-' if s['mean'] is None else f"{s['mean']:.2f}±{s['sd']:.2f}"
    share = lambda key: f"{_fmt(v[key], '.1f')} ({_fmt(v[key + '_null']['mean'], '.1f')})"
    patches = f"{v['n_patches']} ({_fmt(v['n_patches_scattered']['mean'], '.1f')})" if 'patches' in v else ''
    return [_fmt(v[moran]), with_sd(v[moran + '_null']), _fmt(v[moran + '_smoothed']),
            with_sd(v[moran + '_smoothed_null']), share('percent_selective'), share('percent_selective_smoothed'),
            patches]

def print_table(name, results, cfg):
    """One contrast: a row per map and a row of means, the model's columns and then the control's."""
    first = results[0]['contrasts'][name]
    print(f"\n{name}: {' - '.join(first['conditions'])} ({first['n_stimuli'][0]} vs {first['n_stimuli'][1]} stimuli; "
          f"null: {NULLS[first['null']]}, {first['n_shuffles']} draws)")
    width = sum(w for _, w in _COLUMNS) + len(_COLUMNS) - 1
    print((f"{'':10s}" + ''.join(f" | {(role + ': ' + describe(r))[:width]:{width}s}"
                                 for r, role in zip(results, ['model', 'control']))).rstrip())
    print(f"{'map':10s}" + ''.join(' | ' + ' '.join(f"{c:>{w}s}" for c, w in _COLUMNS) for _ in results))
    for m in list(first['maps']) + ['mean']:
        line = f"{m:10s}"
        for r in results:
            c = r['contrasts'][name]
            v = c if m == 'mean' else c['maps'].get(m)  # (None: a control with other maps)
            line += ' |' if v is None else ' | ' + ' '.join(f"{x:>{w}s}" for x, (_, w) in zip(_cells(v), _COLUMNS))
        print(line.rstrip())
    if len(results) == 2:
        d = [_difference(results, name, k) for k in ('mean_morans_i', 'mean_morans_i_smoothed')]
        print(f"difference of the mean Moran's I, model - control: {_fmt(d[0], '+.2f')} unsmoothed"
              + (f", {_fmt(d[1], '+.2f')} smoothed" if cfg['fwhm'] > 0 else ''))

def _difference(results, name, key):
    a, b = (r['contrasts'][name][key] for r in results)
    return None if a is None or b is None else a - b

def print_legend(cfg, nulls):
    """What every column means, printed once under the tables."""
    lines = [
        ("Moran's I", "how smooth the t-map of the contrast is on the sheet (queen neighbours, row-standardised): "
                      "about 0 for units at random places, near 1 for a smooth map"),
        ("shuffled", f"the column before it with the labels redrawn, mean ± sd of {cfg['n_shuffles']} draws: what "
                     f"the model's smoothness alone gives. A real cluster beats it" if cfg['n_shuffles'] else
                     "not computed (--n_shuffles=0)"),
        ("smoothed I", f"Moran's I after smoothing every stimulus's response map with a Gaussian of FWHM "
                       f"{cfg['fwhm']:g} grid units (the paper's fMRI-like read-out); smoothing raises the "
                       f"shuffled value too" if cfg['fwhm'] > 0 else "not computed (--fwhm=0)"),
        ("% selective", f"units selective for the first condition: BH-FDR q < {cfg['fdr']:g} over all units of all "
                        f"maps, and t positive; in brackets the mean of the shuffled draws"),
        ("smoothed %", "the same of the smoothed read-out's t-maps (the official localizer's selectivity)"
                       if cfg['fwhm'] > 0 else "not computed (--fwhm=0)"),
        ("patches", f"groups of >= {cfg['min_patch']} side-by-side (4-connected) selective units of one sign; in "
                    f"brackets how many the same units make at scattered places (chance)"),
    ]
    lines += [(f"null: {n}", {'paired': "the labels of each matched pair (a sentence and its non-word twin, "
                                        "two sentences that differ in one adjective) swapped with probability 1/2",
                              'shuffled': "all stimuli's labels permuted, group sizes kept"}[n]) for n in nulls]
    lines.append(('', "% selective, patches and the figures are of the unsmoothed t-maps"))
    print()
    for key, text in lines:
        print(textwrap.fill(text, 110, initial_indent=f"{key:>14s}  ", subsequent_indent=' ' * 16))

def print_summary(name, results):
    """One line per contrast: the mean Moran's I (unsmoothed, smoothed) and the % of selective units."""
    c = [r['contrasts'][name] for r in results]
    moran, moran_smooth = ([_fmt(x[key]) for x in c] for key in ('mean_morans_i', 'mean_morans_i_smoothed'))
    sel, sel_smooth = ([_fmt(x[key], '.1f') for x in c] for key in ('percent_selective', 'percent_selective_smoothed'))
    if len(c) == 1:
        print(f"{name}: mean Moran's I {moran[0]} (shuffled {_fmt(c[0]['mean_morans_i_null']['mean'])}), smoothed "
              f"{moran_smooth[0]} (shuffled {_fmt(c[0]['mean_morans_i_smoothed_null']['mean'])}); {sel[0]}% selective, "
              f"smoothed {sel_smooth[0]}%")
        return
    diff, diff_smooth = (_fmt(_difference(results, name, 'mean_morans_i' + s), '+.2f') for s in ('', '_smoothed'))
    print(f"{name}: mean Moran's I {moran[0]} vs control {moran[1]}, difference {diff}; smoothed {moran_smooth[0]} vs "
          f"{moran_smooth[1]}, difference {diff_smooth}; selective {sel[0]}% vs {sel[1]}%, smoothed {sel_smooth[0]}% "
          f"vs {sel_smooth[1]}%")

def _json_ready(x):
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()  # a Python int or bool
    return x

# ---- main -------------------------------------------------------------------

def select_suites(cfg):
    """The contrasts of the run: ([(name, (label, conditions), (label, conditions), null)], all texts in one
    list, {condition: its rows in that list})."""
    if cfg['stimuli']:
        name, conditions = read_stimuli_csv(cfg['stimuli'])
        a, b = list(conditions)
        suites = [(name, (a, [a]), (b, [b]), 'shuffled')]
    else:
        names = list(CONTRASTS) if cfg['contrasts'] == 'all' else [c.strip() for c in cfg['contrasts'].split(',')]
        unknown = [n for n in names if n not in CONTRASTS]
        if unknown or not names:
            raise UsageError(f"unknown contrast(s) {unknown}; choose from {', '.join(CONTRASTS)} or all")
        suites = [(n, *CONTRASTS[n]) for n in dict.fromkeys(names)]
        stim = builtin_stimuli(cfg['seed'])
        conditions = {c: stim[c] for _, (_, ca), (_, cb), _ in suites for c in ca + cb}
    texts, rows = [], {}
    for cond, ts in conditions.items():
        rows[cond] = np.arange(len(texts), len(texts) + len(ts))
        texts += ts
    return suites, texts, rows

def load_models(ckpt_path, cfg, device):
    """The model and, with --control, its control: [(model, info)], checked to be of one kind."""
    loaded = [load_model(p, cfg['positions'], device) for p in [ckpt_path] + [cfg['control']] * bool(cfg['control'])]
    if cfg['positions'] and not any(info['official'] for _, info in loaded):
        raise UsageError("--positions is for official TopoLM checkpoints; these carry their units' places")
    if len({info['model_type'] for _, info in loaded}) > 1:
        raise UsageError(f"the model is a {describe(loaded[0][1])} and the control a {describe(loaded[1][1])}: "
                         f"a control must be the same kind of model, trained without topography")
    return loaded

def write_whole(out, files):
    """files {name: write(path)} into out, each whole: written to a temporary file first, then all renamed at once
    with Ctrl-C held off (metrics.json last), so that out holds this analysis or the one before, never a mix."""
    topo_gpt.writable_dir(out)
    tmp = {name: os.path.join(out, f'.tmp.{name}') for name in files}  # (the extension last: it names the format)
    try:
        os.makedirs(out, exist_ok=True)
        for name, write in files.items():
            write(tmp[name])
        with topo_gpt.signals_deferred():
            for name in sorted(files, key=lambda n: n == 'metrics.json'):
                os.replace(tmp[name], os.path.join(out, name))
    except OSError as e:
        raise UsageError(f"could not write into {out} ({e.strerror or e}; a full disk?)") from None
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)

def write_json(data):
    return lambda path: pathlib.Path(path).write_text(json.dumps(_json_ready(data), indent=1))

def metrics_of(suites, results, cfg):
    """metrics.json of one analysis: the config, the model's and the control's results, and their comparison."""
    metrics = dict(config=cfg, model=results[0], control=results[1] if len(results) > 1 else None)
    if len(results) > 1:
        each = lambda name, key: [r['contrasts'][name][key] for r in results]
        metrics['comparison'] = OrderedDict((name, dict(
            mean_morans_i=each(name, 'mean_morans_i'), difference=_difference(results, name, 'mean_morans_i'),
            mean_morans_i_smoothed=each(name, 'mean_morans_i_smoothed'),
            difference_smoothed=_difference(results, name, 'mean_morans_i_smoothed'),
            percent_selective=each(name, 'percent_selective'),
            percent_selective_smoothed=each(name, 'percent_selective_smoothed'))) for name, *_ in suites)
    return metrics

def write_results(out, suites, results, tmaps, profiles, cfg):
    """The figures and metrics.json of one checkpoint (and its control). Returns the metrics."""
    labels = [f"{role}: {describe(r)}" for r, role in zip(results, ['model', 'control'])]
    smoothing = f"; in brackets: Moran's I smoothed (FWHM {cfg['fwhm']:g})" if cfg['fwhm'] > 0 else ''
    files = {}
    for name, *_ in suites:
        a, b = results[0]['contrasts'][name]['conditions']
        title = (f"{name}: Welch's t of {a} - {b} per unit (unsmoothed)\n"
                 f"outlined: patches (>= {cfg['min_patch']} selective units, BH q < {cfg['fdr']:g}){smoothing}\n"
                 + '   |   '.join(labels))
        blocks = [(lab, tm[name], r['contrasts'][name]['maps']) for lab, tm, r in zip(labels, tmaps, results)]
        files[f"{name}.png"] = lambda path, blocks=blocks, title=title: plot_contrast(path, blocks, title)
    profile_title = "response correlation vs grid distance, over all stimuli (unsmoothed)"
    files['correlation_distance.png'] = lambda path: plot_profiles(path, list(zip(labels, profiles)), profile_title)
    metrics = metrics_of(suites, results, cfg)
    files['metrics.json'] = write_json(metrics)
    write_whole(out, files)
    return metrics

# ---- Hear the model: what a TopoLM says after a prompt, what a Topoformer puts where it says [MASK] ----

DEFAULT_PROMPTS = {'topolm': "To be, or not to be", 'topoformer': "To be, or not to [MASK], that is the question."}

def say(model, info, prompt, enc, cfg, device, n_tokens=30, k=5):
    """One line of what the model makes of prompt: a TopoLM's continuation (nanoGPT's sampling: temperature 0.8,
    the 200 likeliest tokens, seeded), a Topoformer's k likeliest tokens at each [MASK]. Starts with the prompt."""
    if not prompt.strip():
        raise UsageError("--sample: the prompt is empty")
    T = model.config.block_size
    if info['model_type'] == 'topolm':
        idx = torch.tensor([enc.encode_ordinary(prompt)], device=device)
        g = torch.Generator(device=device).manual_seed(cfg['seed'])
        out = model.generate(idx, n_tokens, temperature=0.8, top_k=200, generator=g)[0, idx.size(1):].tolist()
        cropped = f" [the first {idx.size(1) - T} tokens lie beyond the context of {T}]" * (idx.size(1) > T)
        return (prompt + enc.decode(out) + cropped).replace('\n', ' / ')
    import topoformer
    parts = prompt.split('[MASK]')
    if len(parts) < 2:
        raise UsageError("--sample: a Topoformer fills [MASK]: write [MASK] where it should guess a word")
    ids = sum(([topoformer.MASK_ID] * (i > 0) + enc.encode_ordinary(p) for i, p in enumerate(parts)), [])
    if topoformer.MASK_ID not in ids[-T:]:
        raise UsageError(f"--sample: no [MASK] within the model's last {T} tokens of the prompt")
    probs, top = model.fill_mask(torch.tensor([ids[-T:]], device=device), k)
    guesses = ['[MASK] = ' + ', '.join(f"{enc.decode([t])!r} {p:.2f}" for t, p in zip(ts.tolist(), ps.tolist()))
               for ps, ts in zip(probs, top)]
    return f"{prompt} -> {'; '.join(guesses)}"

def print_samples(loaded, prompt, enc, cfg, device):
    """The model's line beside its control's, on the same prompt."""
    prompt = prompt or DEFAULT_PROMPTS[loaded[0][1]['model_type']]
    for (model, info), role in zip(loaded, ['model', 'control']):
        print(f"{role + ':':9s}{say(model, info, prompt, enc, cfg, device)}")

# ---- Over training: a folder of snapshots, each analysed, the map forming step by step ----

def snapshot_files(folder):
    """The snapshots of a folder (step_<iter>.pt, as topo_gpt.py and topoformer.py write them), in step order."""
    files = sorted(f for f in os.listdir(folder) if re.fullmatch(r'step_\d+\.pt', f))
    if not files:
        raise UsageError(f"{folder} holds no snapshots (step_*.pt): train with --snapshot_iters=log, "
                         f"or give a checkpoint")
    return [os.path.join(folder, f) for f in files]

def plot_over_training(path, entries, control, names):
    """Per contrast, the mean Moran's I of the model's t-maps at each step beside its shuffled-label null (mean and
    spread) and the control's, the validation loss on a second axis."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    steps = [e['step'] for e in entries]
    for ax, name in zip(axes[0], names):
        c = [e['contrasts'][name] for e in entries]
        i = np.array([x['mean_morans_i'] for x in c], float)  # (a None, where nothing could be computed: NaN)
        null = np.array([[x['mean_morans_i_null']['mean'], x['mean_morans_i_null']['sd']] for x in c], float)
        ax.fill_between(steps, null[:, 0] - null[:, 1], null[:, 0] + null[:, 1], color='grey', alpha=0.3)
        ax.plot(steps, null[:, 0], color='grey', lw=1, label='shuffled labels (mean ± sd)')
        ax.plot(steps, i, 'o-', color='C3', label='model')
        if control is not None:
            ax.axhline(float(np.array(control['contrasts'][name]['mean_morans_i'], float)), color='C0', ls='--',
                       label='control')
        ax.set_xscale('symlog', linthresh=max([1] + [s for s in steps if s > 0][:1]))  # log steps, 0 included
        ax.set_xticks(steps, [str(s) for s in steps], fontsize=7)
        ax.set(xlabel='training step', ylabel="mean Moran's I of the t-maps", title=name)
        loss = ax.twinx()
        loss.plot(steps, np.array([(e['losses'] or {}).get('val') for e in entries], float), ':', color='k', lw=1)
        loss.set_ylabel('validation loss (dotted)')
        ax.legend(fontsize=7, loc='upper left')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

def plot_map_strip(path, steps, tmaps, control_tmaps, name, vmax):
    """One contrast's t-map of every map (rows) at every step (columns), the control's last, on one colour scale."""
    plt = pyplot()
    columns = [(f"step {s}", tm) for s, tm in zip(steps, tmaps)] + [('control', control_tmaps)] * bool(control_tmaps)
    maps = list(tmaps[0])
    fig, axes = plt.subplots(len(maps), len(columns), figsize=(1.3 * len(columns) + 1.2, 1.3 * len(maps) + 0.8),
                             squeeze=False)
    for j, (label, tm) in enumerate(columns):
        for i, m in enumerate(maps):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if m in tm:
                im = ax.imshow(tm[m][0], cmap='RdBu_r', vmin=-vmax, vmax=vmax, interpolation='nearest')
            ax.set_title(label if i == 0 else '', fontsize=8)
            ax.set_ylabel(m if j == 0 else '', fontsize=7)
    fig.suptitle(f"{name}: Welch's t per unit as training goes on (scale: the 99th percentile of |t|, {vmax:.1f})",
                 fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6, extend='both')
    fig.savefig(path, dpi=90)
    plt.close(fig)

def write_gif(path, steps, tmaps, results, name, vmax):
    """The same t-maps as an animation: one frame per step, the maps laid out as in <contrast>.png (Pillow, which
    matplotlib already needs, writes the GIF)."""
    plt = pyplot()
    from matplotlib.animation import FuncAnimation, PillowWriter
    where, n_rows, n_cols = _layout(list(tmaps[0]))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.8 * n_cols + 0.4, 1.8 * n_rows + 0.6), squeeze=False)
    images = {}
    for m, (r, c) in where.items():
        axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[r, c].set_title(m, fontsize=8)
        images[m] = axes[r, c].imshow(tmaps[0][m][0], cmap='RdBu_r', vmin=-vmax, vmax=vmax, interpolation='nearest')

    def frame(k):
        for m, im in images.items():
            im.set_data(tmaps[k][m][0])
        c = results[k]['contrasts'][name]
        fig.suptitle(f"{name}, step {steps[k]}: Moran's I {_fmt(c['mean_morans_i'])} (shuffled "
                     f"{_fmt(c['mean_morans_i_null']['mean'])})", fontsize=9)
        return list(images.values())
    FuncAnimation(fig, frame, frames=len(steps)).save(path, writer=PillowWriter(fps=1.5))
    plt.close(fig)

def analyze_snapshots(folder, cfg, given, suites, rows, texts, enc, device):
    """Every snapshot of a folder, with fewer label redraws (2, unless --n_shuffles says), and the control once:
    the figures over training, metrics.json with the list over_training, and a table."""
    paths = snapshot_files(folder)
    out = cfg['out_dir'] or os.path.join(folder, 'analysis')
    topo_gpt.writable_dir(out)
    snap_cfg = {**cfg, 'n_shuffles': cfg['n_shuffles'] if 'n_shuffles' in given else min(cfg['n_shuffles'], 2)}
    print(f"{len(paths)} snapshots in {folder}, {snap_cfg['n_shuffles']} label redraws each "
          f"(--n_shuffles=N for more)")
    # every file read before any long work: a damaged snapshot or a control of another kind fails here
    one = lambda path: load_models(path, {**cfg, 'control': ''}, device)[0]
    if len({one(p)[1]['model_type'] for p in [cfg['control']] * bool(cfg['control']) + paths}) > 1:
        raise UsageError("the snapshots and the control are not all the same kind of model")
    control, control_tmaps = None, {}
    if cfg['control']:
        model, info = one(cfg['control'])
        print(f"control: {info['checkpoint']}, {describe(info)}", flush=True)
        control, control_tmaps, _ = analyze_model(model, info, suites, rows, texts, enc, cfg, device)
    entries, tmaps = [], []
    for path in paths:
        model, info = one(path)
        print(f"step {info['step']}: {path}", flush=True)
        metrics, t, _ = analyze_model(model, info, suites, rows, texts, enc, snap_cfg, device)
        entries.append(dict(step=info['step'], checkpoint=path, losses=info['losses'], contrasts=metrics['contrasts']))
        tmaps.append(t)
    names, first = [n for n, *_ in suites], suites[0][0]
    steps = [e['step'] for e in entries]
    vmax = _vmax([tm.get(first, {}) for tm in tmaps + [control_tmaps]])
    strip, control_strip = [tm[first] for tm in tmaps], control_tmaps.get(first)
    summary = dict(config=cfg, snapshots=folder, control=control, over_training=entries)
    write_whole(out, {'over_training.png': lambda p: plot_over_training(p, entries, control, names),
                      'over_training_maps.png': lambda p: plot_map_strip(p, steps, strip, control_strip, first, vmax),
                      'over_training.gif': lambda p: write_gif(p, steps, strip, entries, first, vmax),
                      'metrics.json': write_json(summary)})
    print(f"\n{'step':>6s} {'val loss':>9s}" + ''.join(f" | {n + ': Moran I (shuffled)':34s}" for n in names))
    for e in entries:
        cells = [(e['contrasts'][n]['mean_morans_i'], e['contrasts'][n]['mean_morans_i_null']) for n in names]
        print(f"{e['step']:6d} {_fmt((e['losses'] or {}).get('val'), '9.3f')}" + ''.join(
            f" | {_fmt(moran):>6s} ({_fmt(null['mean'])} ± {_fmt(null['sd'])})".ljust(37) for moran, null in cells))
    if control:
        print(f"{'control':>16s}" + ''.join(f" | {_fmt(control['contrasts'][n]['mean_morans_i']):>6s}".ljust(37)
                                            for n in names))
    print(f"\nwrote {out}/: over_training.png, over_training_maps.png, over_training.gif ({first}), metrics.json")

def main(argv):
    positional = [a for a in argv if not a.startswith('-')]
    cfg, given = parse_config([a for a in argv if a.startswith('-')], DEFAULTS, {}, __doc__, __file__)
    if len(positional) != 1:
        raise UsageError("usage: python analyze.py CHECKPOINT|SNAPSHOT_FOLDER [--key=value ...] (see --help)")
    ckpt_path = positional[0]
    # everything that can be wrong with the input fails here, before any long work
    suites, texts, rows = select_suites(cfg)
    enc = gpt2_tokenizer()
    device = topo_gpt.start_processes(cfg['device'])[3]
    if os.path.isdir(ckpt_path):
        if cfg['sample']:
            raise UsageError("--sample is for a checkpoint, not a folder of snapshots")
        return analyze_snapshots(ckpt_path, cfg, given, suites, rows, texts, enc, device)
    out = cfg['out_dir'] or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), 'analysis')
    topo_gpt.writable_dir(out)
    loaded = load_models(ckpt_path, cfg, device)
    if cfg['sample']:
        return print_samples(loaded, cfg['sample'], enc, cfg, device)
    analyses = []  # (metrics, t-maps, correlation profiles) of the model and of its control
    for (model, info), role in zip(loaded, ['model', 'control']):
        print(f"{role}: {info['checkpoint']}, {describe(info)}", flush=True)
        if (role == 'model') != info['topographic']:
            print(f"note: the {role} is {'' if info['topographic'] else 'not '}topographic")
        analyses.append(analyze_model(model, info, suites, rows, texts, enc, cfg, device))
    results, tmaps, profiles = map(list, zip(*analyses))
    metrics = write_results(out, suites, results, tmaps, profiles, cfg)
    for name, *_ in suites:
        print_table(name, results, cfg)
    print_legend(cfg, list(dict.fromkeys(null for *_, null in suites)))
    print()
    for name, *_ in suites:
        print_summary(name, results)
    print(f"\nwhat they say (--sample=PROMPT for your own):")
    print_samples(loaded, '', enc, cfg, device)
    print(f"\nwrote {out}/: {', '.join(f'{n}.png' for n, *_ in suites)}, correlation_distance.png, metrics.json")
    return metrics

if __name__ == '__main__':
    sys.exit(command(main, sys.argv[1:],
                     interrupted="nothing half-written: out_dir holds the analysis it held before, or this one whole"))
