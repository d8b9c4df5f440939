"""A tiny synthetic instruction-following world, small enough to align a few-million-parameter model on a CPU.

Real alignment data (HH-RLHF, AlpacaFarm, SHP) needs a model too large for a laptop, and its "true quality" is
unknown. This world has a few hundred words, five task families and an exact quality oracle, so every method in
nanoalign (SFT, reward model, PPO, DPO, R3, REAL) can be run in minutes and judged against the truth.

Task families (prompt -> reference answer), qtype in brackets:
  arithmetic [CONSTRAINED]  "What is 17 plus 25?"                        -> "17 plus 25 is 42."
  reverse    [CONSTRAINED]  "Reverse the list: lemon, tiger, cloud."     -> "The reversed list is cloud, tiger, lemon."
  sort       [CONSTRAINED]  "Sort the words: lemon, tiger, cloud."       -> "The sorted list is cloud, lemon, tiger."
  lookup     [CONSTRAINED]  "Mia lives in Oslo. Tom lives in Rome. Where does Tom live?" -> "Tom lives in Rome."
  facts      [OPENENDED]    "Tell me two facts about bees." -> two distinct true facts from the topic's fact bank,
                            e.g. "Bees make honey. Bees visit flowers." (any subset, any order is a reference)

Candidate responses of graded quality are made by corrupting the reference: `incorrect` (wrong number, swapped
words, wrong city, a false fact), `off_topic` (the answer to another prompt), `repetitive` (one sentence repeated),
`too_short` (the bare answer, or one fact), `too_long` (the reference plus filler sentences) and `copy` (the prompt).

The oracle `quality(prompt, response)` is in [0, 1]; the reference always scores 1.0 and every corruption less.
It splits the response into sentences and prefers, in this order:
  closed-ended: the exact reference sentence (1.0) > the bare right answer (0.6) > a near miss (up to 0.4: a number
      within 10 of the answer, some words in the right place, a city from the prompt) > anything else (0.0), and a
      response that states two different answers to the question scores 0.0 (a hedge answers nothing);
  open-ended: min(k, n) / n for k distinct true facts about the topic when n were asked for (n = 3 by default);
  then it subtracts 0.15 per extra sentence (closed) or off-topic/false sentence (open), 0.15 per repeated
  sentence, 0.05 per fact beyond n, and 0.3 for copying the question; the result is clipped to [0, 1].
Gotcha: the oracle matches whole sentences exactly (case- and whitespace-insensitive), and reads the bare answers
and near misses in the world's own spelling (a capitalised city, "is N", list words joined by ", "), so a
paraphrase or a respelling ("rome.", "cloud,tiger") scores as off topic. That is the point: the world's language is
closed, and a model that has learnt it writes its sentences.

The annotator is a noisy Bradley-Terry judge: P(a preferred to b) = sigmoid((q(a) - q(b)) / tau), tau = 0.1, so
its error rate is ~40% on near-ties (gap < 0.05), ~7% at gap 0.25 and ~0 above 0.5 (measured: data/world.json).
Preference pairs are labelled by it, so a known fraction (~6%) of chosen/rejected pairs is wrong, as in real data.

The default world's writer is chatty: its SFT demonstrations are the references, 90% of them followed by one to
three filler sentences ("That is a good question."), and half of the compared answers of its preference pairs
carry fillers too, whatever their kind, with every pair labelled by the annotator as shown (README, "The default
world: a chatty writer"). So the SFT model learns a flaw the oracle charges for (0.15 a filler sentence), and the
world's own pairs price it: preference learning has something it can see to fix. `--padded_demos=F` and
`--padded_prefs=G` set the two fractions (pad_demonstrations, pad_preferences; each with an rng of its own, so
every other file is byte-identical whatever they are); `--padded_demos=0 --padded_prefs=0` builds the ideal
writer's world, whose demonstrations are the bare references (the default before 2026-12-07, where SFT imitates
ideal answers and what is left to fix is what the tiny model cannot compute).

`python -m nanoalign.world` rebuilds data/ byte for byte from the seed (all randomness flows from one
random.Random; the BPE tokenizer trained by `tokenizers` is deterministic) and prints a summary.
"""
import json
import math
import random
import re
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TAU = 0.1  # annotator temperature on the quality scale
PADDED_DEMOS = 0.9  # the default world's demonstrator pads this fraction of its SFT answers with filler sentences
PADDED_PREFS = 0.5  # and this fraction of the compared answers of the preference pairs (relabelled as shown)
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2
HH = "\n\nHuman: {prompt}\n\nAssistant: {response}"

# --- the world's vocabulary

FACTS = """cats: are small animals | like to sleep | drink milk | have soft fur | chase mice | purr when happy
dogs: are loyal animals | like to run | bark at night | have a good nose | love to play | guard the house
birds: can fly | build nests | sing in the morning | lay eggs | have feathers | eat seeds
fish: live in water | can swim | have fins | breathe with gills | eat small plants | swim in groups
bees: make honey | live in a hive | visit flowers | can sting | work together | have a queen
flowers: grow in gardens | have bright colors | smell nice | need sun and water | attract bees | bloom in spring
trees: have green leaves | grow from seeds | give us wood | make fresh air | have deep roots | can live for many years
apples: grow on trees | can be red or green | are sweet | are good for you | have seeds inside | are picked in autumn
rivers: flow to the sea | carry fresh water | can be very long | are home to fish | start in the hills | give water to farms
mountains: are very tall | have snow on top | are made of rock | are hard to climb | have cold air | can be seen from far away
trains: run on tracks | carry many people | can be very fast | stop at stations | pull many cars | have a driver
cars: have four wheels | need fuel | drive on roads | have an engine | can carry a family | need a driver
boats: float on water | have a sail or an engine | sail on the sea | need a captain | are made of wood or metal | carry goods
books: have many pages | tell stories | are read in school | are kept in a library | have a cover | teach new words
the sun: is a star | is very hot | gives us light | rises in the east | sets in the west | is far away
the moon: goes around the earth | is made of rock | shines at night | has no air | changes shape | pulls the sea
rain: falls from clouds | is made of water | helps plants grow | makes the ground wet | comes with storms | fills the rivers
snow: is cold | falls in winter | is white | is made of ice | melts in the sun | covers the ground
the sea: is very big | is full of salt water | has big waves | is home to whales | is blue | covers most of the earth
bread: is made from wheat | is baked in an oven | is soft inside | has a hard crust | is eaten every day | goes well with butter
milk: comes from cows | is white | is good for bones | can be made into cheese | is drunk by children | must be kept cold
music: has a beat | is made with instruments | can make people happy | is played at parties | has many songs | helps people dance
winter: is the cold season | has short days | comes after autumn | brings snow | makes lakes freeze | is a time for warm clothes
summer: is the warm season | has long days | comes after spring | is good for swimming | brings fruit | is a time for holidays"""
TOPICS = {line.split(":")[0]: [p.strip() for p in line.split(":")[1].split("|")] for line in FACTS.splitlines()}
SINGULAR = ["the sun", "the moon", "rain", "snow", "the sea", "bread", "milk", "music", "winter", "summer"]
NAMES = "Mia Tom Ana Ben Eva Sam Lea Max Ivy Leo Zoe Jon Amy Ian Kim Ray".split()
CITIES = "Oslo Rome Paris Lima Cairo Tokyo Delhi Berlin Madrid Dublin Vienna Prague Athens Seoul Quito Riga".split()
WORDS = ("apple river stone cloud tiger lemon house green piano zebra candle mango forest violin rabbit orange "
         "window banana garden pencil yellow honey kettle dragon").split()
FILLERS = ["I hope this helps.", "Let me know if you have more questions.", "That is a good question.",
           "There is a lot more to say.", "Thank you for asking.", "I like this topic very much."]
COUNTS = {"two": 2, "three": 3, "four": 4}
OPEN_TEMPLATES = ["Tell me about {t}.", "What do you know about {t}?", "Write a few sentences about {t}.",
                  "Describe {t}.", "Tell me {n} facts about {t}.", "Describe {t} in {n} sentences.",
                  "Give me {n} facts about {t}."]
FAMILIES = ["arithmetic", "reverse", "sort", "lookup", "facts"]
MAX_NUMBER = 40

# split: (prompts, distinct open-ended prompts). Every split has 1/5 of its prompts from each family; closed-ended
# prompts are all distinct, open-ended ones cycle over the split's share of the 24 * 13 = 312 possible prompts.
# No prompt is in two splits. Preference splits make 2 pairs per prompt.
SPLITS = {"sft_train": (4000, 80), "sft_val": (200, 16), "prefs_train": (1500, 40), "prefs_val": (150, 16),
          "multi_train": (500, 100), "prompts_test": (300, 60)}
PAIRS_PER_PROMPT, RESPONSES_PER_PROMPT = 2, 5

# --- prompts and reference answers


def _fact(topic, predicate):
    return f"{topic[0].upper()}{topic[1:]} {predicate}."


def _open_prompts():
    """All open-ended prompts, in a fixed order."""
    out = []
    for topic in TOPICS:
        for tpl in OPEN_TEMPLATES:
            out += [tpl.format(t=topic, n=n) for n in COUNTS] if "{n}" in tpl else [tpl.format(t=topic)]
    return out


def sample_prompt(rng, family):
    """A random closed-ended prompt of `family` (open-ended prompts are enumerated by _open_prompts)."""
    if family == "arithmetic":
        a, b = rng.randint(1, MAX_NUMBER), rng.randint(1, MAX_NUMBER)
        op = rng.choice(["plus", "minus"])
        a, b = (max(a, b), min(a, b)) if op == "minus" else (a, b)  # no negative answers
        return f"What is {a} {op} {b}?"
    if family in ("reverse", "sort"):
        words = rng.sample(WORDS, rng.randint(3, 5))
        while family == "sort" and words == sorted(words):  # an already sorted list would make copying correct
            rng.shuffle(words)
        return ("Reverse the list: " if family == "reverse" else "Sort the words: ") + ", ".join(words) + "."
    if family == "lookup":
        people = rng.sample(NAMES, rng.randint(2, 4))
        cities = rng.sample(CITIES, len(people))
        facts = " ".join(f"{p} lives in {c}." for p, c in zip(people, cities))
        return f"{facts} Where does {rng.choice(people)} live?"
    raise ValueError(f"unknown closed-ended family {family!r}")


_OPEN_RES = [re.compile(re.escape(t).replace(r"\{t\}", "(?P<t>[a-z ]+)").replace(r"\{n\}", "(?P<n>two|three|four)"))
             for t in OPEN_TEMPLATES]


def parse_prompt(prompt):
    """Family, qtype and the facts the oracle needs; ValueError for a prompt that is not from this world."""
    if m := re.fullmatch(r"What is (\d+) (plus|minus) (\d+)\?", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return dict(family="arithmetic", qtype="CONSTRAINED", question=prompt, a=a, op=op, b=b,
                    answer=a + b if op == "plus" else a - b)
    if m := re.fullmatch(r"(Reverse the list|Sort the words): ([a-z]+(?:, [a-z]+)+)\.", prompt):
        words = m[2].split(", ")
        family = "reverse" if m[1].startswith("Reverse") else "sort"
        return dict(family=family, qtype="CONSTRAINED", question=prompt,
                    answer=words[::-1] if family == "reverse" else sorted(words))
    if m := re.fullmatch(r"((?:[A-Z][a-z]+ lives in [A-Z][a-z]+\. )+)Where does ([A-Z][a-z]+) live\?", prompt):
        homes = dict(re.findall(r"([A-Z][a-z]+) lives in ([A-Z][a-z]+)\.", m[1]))
        if m[2] in homes:
            return dict(family="lookup", qtype="CONSTRAINED", question=f"Where does {m[2]} live?", name=m[2],
                        answer=homes[m[2]], cities=sorted(homes.values()))
    for regex in _OPEN_RES:
        if (m := regex.fullmatch(prompt)) and m["t"] in TOPICS:
            n = COUNTS[m["n"]] if "n" in regex.groupindex else 3
            return dict(family="facts", qtype="OPENENDED", question=prompt, topic=m["t"], n=n)
    raise ValueError(f"not a prompt of the tiny world: {prompt!r}")


def reference(prompt, rng=None):
    """The reference answer; for open-ended prompts a random choice of n facts (the first n without rng)."""
    p = parse_prompt(prompt)
    if p["family"] == "arithmetic":
        return f"{p['a']} {p['op']} {p['b']} is {p['answer']}."
    if p["family"] in ("reverse", "sort"):
        return f"The {'reversed' if p['family'] == 'reverse' else 'sorted'} list is {', '.join(p['answer'])}."
    if p["family"] == "lookup":
        return f"{p['name']} lives in {p['answer']}."
    predicates = TOPICS[p["topic"]]
    chosen = rng.sample(predicates, p["n"]) if rng else predicates[:p["n"]]
    return " ".join(_fact(p["topic"], pred) for pred in chosen)


def candidates(prompt, rng):
    """[(kind, response)] of graded quality: the reference and six corruptions of it."""
    p, ref = parse_prompt(prompt), reference(prompt, rng)
    other_family = rng.choice([f for f in FAMILIES if f not in (p["family"], "facts")])
    off_topic = reference(sample_prompt(rng, other_family), rng)
    too_long = " ".join([ref] + rng.sample(FILLERS, 3))
    if p["family"] == "arithmetic":
        wrong = p["answer"] + rng.choice([d for d in range(-5, 6) if d and p["answer"] + d >= 0])
        incorrect, short, repeated = ref.replace(f"is {p['answer']}.", f"is {wrong}."), f"{p['answer']}.", ref
    elif p["family"] in ("reverse", "sort"):
        words = list(p["answer"])
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
        incorrect = ref.replace(", ".join(p["answer"]), ", ".join(words))
        short, repeated = ", ".join(p["answer"]) + ".", ref
    elif p["family"] == "lookup":
        incorrect = f"{p['name']} lives in {rng.choice([c for c in p['cities'] if c != p['answer']])}."
        short, repeated = f"{p['answer']}.", ref
    else:
        topic, sentences = p["topic"], re.findall(r"[^.]+\.", ref)
        # a false fact: another topic's predicate with the same verb agreement ("Cats have deep roots.")
        false = [pred for t, preds in TOPICS.items() if (t in SINGULAR) == (topic in SINGULAR) and t != topic
                 for pred in preds if pred not in TOPICS[topic]]
        incorrect = " ".join([s.strip() for s in sentences[:-1]] + [_fact(topic, rng.choice(false))])
        other = rng.choice([t for t in TOPICS if t != topic])
        off_topic = " ".join(_fact(other, pred) for pred in rng.sample(TOPICS[other], p["n"]))
        short = repeated = _fact(topic, rng.choice(TOPICS[topic]))
    return [("correct", ref), ("incorrect", incorrect), ("off_topic", off_topic),
            ("repetitive", " ".join([repeated] * 3)), ("too_short", short), ("too_long", too_long), ("copy", prompt)]


# --- the oracle


def _sentences(text):
    return [" ".join(s.lower().split()) for s in re.findall(r"[^.?!]+[.?!]?", text) if s.strip()]


_CITY_NAMES = {c.lower() for c in CITIES}


def _stated_answers(p, response):
    """The answers to this question that a closed-ended response states, in the world's spelling, outside a copy of
    the question: "A op B is N" with the prompt's own A op B (or a bare number), a list of the prompt's words in
    some order, the city where the asked person lives (or a bare city of the prompt's). A sentence about something
    else ("12 plus 29 is 41." to "What is 12 plus 27?", "Kim lives in an engine.") answers no question here."""
    question = _sentences(p["question"])[-1]
    answers = set()
    for s in _sentences(response):
        if s == question:
            continue
        bare = s.rstrip(".?!")
        if p["family"] == "arithmetic":
            answers |= set(re.findall(rf"\b{p['a']} {p['op']} {p['b']} is (\d+)", s))
            answers |= set(re.findall(r"^(\d+)$", bare))
        elif p["family"] in ("reverse", "sort"):
            lists = re.findall(r"[a-z]+(?:, [a-z]+)+", s)
            answers |= {m for m in lists if sorted(m.split(", ")) == sorted(p["answer"])}
        else:
            answers |= set(re.findall(rf"\b{p['name'].lower()} lives in ([a-z]+)", s)) & _CITY_NAMES
            answers |= {bare} & {c.lower() for c in p["cities"]}
    return answers


def _correctness(prompt, p, response):
    """1.0 for the exact reference sentence, 0.6 for the bare right answer, up to 0.4 for a near miss; 0.0 for a
    response that states two different answers (a hedge such as "17 plus 25 is 41. 17 plus 25 is 42." answers
    nothing, and would otherwise score the reference sentence's 1.0 less one extra sentence)."""
    if len(_stated_answers(p, response)) > 1:
        return 0.0
    if _sentences(reference(prompt))[0] in _sentences(response):
        return 1.0
    family, bare = p["family"], response.strip().rstrip(".")
    if family == "arithmetic":
        m = re.search(r"\bis (\d+)", response) or re.fullmatch(r"(\d+)", bare)
        if not m:
            return 0.0
        miss = abs(int(m[1]) - p["answer"])
        return 0.6 if miss == 0 else 0.4 * max(0.0, 1 - miss / 10)
    if family in ("reverse", "sort"):
        m = re.search(r"[a-z]+(?:, [a-z]+)+", response.lower())
        if not m:
            return 0.0
        words = m[0].split(", ")
        if words == p["answer"]:
            return 0.6
        return 0.4 * sum(w == a for w, a in zip(words, p["answer"])) / max(len(words), len(p["answer"]))
    m = re.search(rf"\b{p['name']} lives in ([A-Z][a-z]+)", response) or re.fullmatch(r"([A-Z][a-z]+)", bare)
    if not m:
        return 0.0
    return 0.6 if m[1] == p["answer"] else 0.1 if m[1] in p["cities"] else 0.0


def _topic_facts(topic):
    """Every true fact about a topic, as normalised sentences."""
    return set(_sentences(" ".join(_fact(topic, pred) for pred in TOPICS[topic])))


def quality(prompt, response):
    """The oracle's score of `response` to `prompt` in [0, 1] (see the module docstring for what it prefers)."""
    p = parse_prompt(prompt)
    sentences = _sentences(response)
    distinct = list(dict.fromkeys(sentences))
    if not distinct:
        return 0.0
    penalty = 0.15 * (len(sentences) - len(distinct))  # repetition
    penalty += 0.3 * (_sentences(p["question"])[-1] in distinct)  # copying the question
    if p["qtype"] == "CONSTRAINED":
        score = _correctness(prompt, p, response)
        penalty += 0.15 * (len(distinct) - (score > 0))  # every sentence but the answer is rambling
    else:
        facts = _topic_facts(p["topic"])
        k = sum(s in facts for s in distinct)
        score = min(k, p["n"]) / p["n"]
        penalty += 0.15 * (len(distinct) - k) + 0.05 * max(0, k - p["n"])
    return round(min(1.0, max(0.0, score - penalty)), 4)


def is_padded(response):
    """Does the response hold a filler sentence ("I hope this helps.")? What the padded demonstrator adds and what
    too_long candidates carry: the count the padded-world experiments report."""
    return any(f in response for f in FILLERS)


def is_world_prompt(prompt):
    try:
        parse_prompt(prompt)
        return True
    except ValueError:
        return False


def is_correct(prompt, response):
    """Did the response get the task right? Closed-ended: it states the right answer (the reference sentence or
    the bare answer), and no other one, without copying the question. Open-ended: it states at least the n distinct
    true facts asked for."""
    p = parse_prompt(prompt)
    if _sentences(p["question"])[-1] in _sentences(response):  # copying the question is never an answer
        return False
    if p["qtype"] == "CONSTRAINED":
        return _correctness(prompt, p, response) >= 0.6
    facts = _topic_facts(p["topic"])
    return len(facts & set(_sentences(response))) >= p["n"]


# --- the annotator


def annotate(prompt, a, b, rng, tau=TAU):
    """True if the annotator prefers a to b. Bradley-Terry: P(a > b) = sigmoid((q(a) - q(b)) / tau).
    rng is anything with .random() (random.Random, numpy Generator)."""
    z = (quality(prompt, b) - quality(prompt, a)) / tau
    return rng.random() < (1 / (1 + math.exp(z)) if z < 700 else 0.0)  # exp(709+) overflows a float: P is ~0 there


GAP_BINS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]


def annotator_error_by_gap(triples, rng, tau=TAU):
    """Fraction of pairs where the annotator prefers the lower-quality response, binned by |quality gap|.
    triples: (prompt, a, b) with q(a) != q(b). Returns [{"gap": [lo, hi], "n": ..., "error": ...}]."""
    counts = [[0, 0] for _ in GAP_BINS[1:]]
    for prompt, a, b in triples:
        gap = quality(prompt, a) - quality(prompt, b)
        i = next(i for i, hi in enumerate(GAP_BINS[1:]) if abs(gap) <= hi)
        counts[i][0] += 1
        counts[i][1] += annotate(prompt, a, b, rng, tau) != (gap > 0)
    return [{"gap": [lo, hi], "n": n, "error": round(wrong / n, 4) if n else None}
            for lo, hi, (n, wrong) in zip(GAP_BINS, GAP_BINS[1:], counts)]


# --- building data/


def _split_prompts(rng):
    """{split: [prompt]} with no prompt in two splits; family f at positions i % 5 == f."""
    open_prompts, used, out = _open_prompts(), set(), {}
    rng.shuffle(open_prompts)
    assert sum(n_open for _, n_open in SPLITS.values()) == len(open_prompts)
    for split, (n, n_open) in SPLITS.items():
        pool, open_prompts = open_prompts[:n_open], open_prompts[n_open:]
        prompts = []
        for i in range(n):
            family = FAMILIES[i % len(FAMILIES)]
            if family == "facts":
                prompts.append(pool[(i // len(FAMILIES)) % len(pool)])
                continue
            while (prompt := sample_prompt(rng, family)) in used:
                pass
            used.add(prompt)
            prompts.append(prompt)
        out[split] = prompts
    return out


def _sample_pair(cands, scores, rng):
    """Two candidates of different quality; exact and near ties (gap < 0.05) are kept one time in four."""
    for _ in range(100):
        i, j = rng.sample(range(len(cands)), 2)
        if abs(scores[i] - scores[j]) >= 0.05 or rng.random() < 0.25:
            break
    return i, j


def _record(prompt, ref, **fields):
    p = parse_prompt(prompt)
    return {"prompt": prompt, "qtype": p["qtype"], "family": p["family"], "reference": ref, **fields}


def make_splits(rng, tau=TAU):
    """{split: [record]} in the formats of INTERFACES.md."""
    prompts, data = _split_prompts(rng), {}
    for split in ("sft_train", "sft_val"):
        data[split] = [_record(p, ref, response=ref) for p in prompts[split] for ref in [reference(p, rng)]]
    data["prompts_test"] = [_record(p, reference(p)) for p in prompts["prompts_test"]]
    for split in ("prefs_train", "prefs_val"):
        data[split] = []
        for p in prompts[split]:
            cands = list(dict.fromkeys(text for _, text in candidates(p, rng)))
            scores = [quality(p, c) for c in cands]
            for _ in range(PAIRS_PER_PROMPT):
                i, j = _sample_pair(cands, scores, rng)
                a_wins = annotate(p, cands[i], cands[j], rng, tau)
                chosen, rejected = (cands[i], cands[j]) if a_wins else (cands[j], cands[i])
                data[split].append(_record(p, cands[0], chosen=chosen, rejected=rejected))
    data["multi_train"] = []
    for p in prompts["multi_train"]:
        cands = list(dict.fromkeys(text for _, text in candidates(p, rng)))
        responses = rng.sample(cands, min(RESPONSES_PER_PROMPT, len(cands)))
        data["multi_train"].append(_record(p, cands[0], responses=responses,
                                           scores=[quality(p, r) for r in responses]))
    return data


def _chatty(text, fraction, rng):
    """text, or with probability `fraction` text followed by one to three distinct filler sentences it does not
    hold yet (the oracle takes 0.15 off per filler sentence)."""
    if rng.random() >= fraction:
        return text
    unused = [f for f in FILLERS if f not in text]
    return " ".join([text] + rng.sample(unused, min(len(unused), rng.randint(1, 3))))


def pad_demonstrations(records, fraction, rng):
    """A chatty demonstrator: each SFT response, with probability `fraction`, becomes the reference followed by
    one to three distinct filler sentences (oracle quality 1 - 0.15 per filler). The reference, prompt and
    family stay; other records are unchanged. Real demonstrations are rarely all ideal; this makes the gap
    between what SFT imitates and what the preferences reward visible (README, "Padded demonstrations")."""
    return [{**r, "response": _chatty(r["reference"], fraction, rng)} for r in records]


def pad_preferences(records, fraction, rng, tau=TAU):
    """The compared answers written by the same chatty writer: in each pair the chosen and then the rejected
    answer, each with probability `fraction`, get one to three filler sentences they do not hold yet (a pair
    that would become two equal answers stays as it was), and the annotator judges every pair again as shown, so
    a filler costs an answer what the oracle takes off for it. Prompt, reference, qtype and family stay.
    Filler presence is then independent of the kind of answer, so a judge can learn its price from the pairs."""
    out = []
    for r in records:
        a, b = _chatty(r["chosen"], fraction, rng), _chatty(r["rejected"], fraction, rng)
        if a == b:
            a, b = r["chosen"], r["rejected"]
        chosen, rejected = (a, b) if annotate(r["prompt"], a, b, rng, tau) else (b, a)
        out.append({**r, "chosen": chosen, "rejected": rejected})
    return out


def make_pretrain(sft_prompts, rng, n_docs=4000):
    """Plain-text documents: half world knowledge (facts, who lives where, sums), half hh dialogues whose
    answers are mostly, not always, good, so the base model speaks the language but still needs aligning."""
    docs, sums = [], [p for p in sft_prompts if parse_prompt(p)["family"] == "arithmetic"]
    for i in range(n_docs):
        if i % 2 == 0:
            sentences = []
            for _ in range(rng.randint(2, 4)):
                topic = rng.choice(list(TOPICS))
                sentences += [_fact(topic, pred) for pred in rng.sample(TOPICS[topic], rng.randint(1, 4))]
                sentences += [f"{rng.choice(NAMES)} lives in {rng.choice(CITIES)}."]
                sentences += [reference(rng.choice(sums))]
            rng.shuffle(sentences)
            docs.append(" ".join(sentences))
        else:
            turns = []
            for prompt in rng.sample(sft_prompts, rng.randint(1, 3)):
                kinds = candidates(prompt, rng)
                response = kinds[0][1] if rng.random() < 0.6 else rng.choice(kinds)[1]
                turns.append(HH.format(prompt=prompt, response=response))
            docs.append("".join(turns))
    return docs


def train_tokenizer(texts, vocab_size=VOCAB_SIZE):
    """Byte-level BPE (as GPT-2/Pythia), so decode(encode(x)) == x for any text; specials are ids 0, 1, 2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, sort_keys=True, ensure_ascii=True) + "\n" for r in records)


def build(out_dir="data", seed=0, tau=TAU, padded_demos=PADDED_DEMOS, padded_prefs=PADDED_PREFS):
    """Write the whole world to out_dir (see INTERFACES.md); returns the summary written to world.json.
    padded_demos > 0 pads that fraction of the SFT training responses (pad_demonstrations), padded_prefs > 0 that
    fraction of the preference pairs' answers, relabelled (pad_preferences); each with an rng of its own, so every
    other file is the same whatever the two fractions (0 and 0: the ideal writer's world)."""
    for name, fraction in [("padded_demos", padded_demos), ("padded_prefs", padded_prefs)]:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"--{name}={fraction} must be a fraction in [0, 1]")
    out, rng = Path(out_dir), random.Random(seed)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    data = make_splits(rng, tau)
    sft_prompts = list(dict.fromkeys(r["prompt"] for r in data["sft_train"]))
    data["pretrain"] = [{"text": t} for t in make_pretrain(sft_prompts, rng)]
    if padded_demos:
        data["sft_train"] = pad_demonstrations(data["sft_train"], padded_demos, random.Random(seed + 2))
    if padded_prefs:
        prefs_rng = random.Random(seed + 3)  # one stream, the training pairs first
        for split in ("prefs_train", "prefs_val"):
            data[split] = pad_preferences(data[split], padded_prefs, prefs_rng, tau)
    for name, records in data.items():
        _write_jsonl(out / f"{name}.jsonl", records)

    texts = [r["text"] for r in data["pretrain"]] + [HH.format(prompt=r["prompt"], response=r["reference"])
                                                      for name in SPLITS for r in data[name]]
    tok = train_tokenizer(texts)
    tok.save(str(out / "tokenizer" / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False}
    (out / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    # measure the annotator on every candidate pair of the preference prompts, with its own rng
    triples, rng = [], random.Random(seed + 1)
    for p in dict.fromkeys(r["prompt"] for r in data["prefs_train"]):
        cands = [text for _, text in candidates(p, rng)]
        triples += [(p, a, b) for i, a in enumerate(cands) for b in cands[i + 1:] if quality(p, a) != quality(p, b)]
    wrong = sum(quality(r["prompt"], r["chosen"]) < quality(r["prompt"], r["rejected"]) for r in data["prefs_train"])
    summary = {"seed": seed, "tau": tau, "tokenizer_vocab_size": tok.get_vocab_size(),
               "counts": {name: len(records) for name, records in data.items()},
               "qtypes": {q: sum(r["qtype"] == q for r in data["sft_train"]) for q in ("CONSTRAINED", "OPENENDED")},
               "prefs_train_mislabelled": round(wrong / len(data["prefs_train"]), 4),
               "annotator_error_by_gap": annotator_error_by_gap(triples, rng, tau)}
    if padded_demos:
        summary["padded_demos"] = {"fraction": padded_demos, "padded": sum(
            r["response"] != r["reference"] for r in data["sft_train"]), "sft_train_mean_quality": round(
            sum(quality(r["prompt"], r["response"]) for r in data["sft_train"]) / len(data["sft_train"]), 4)}
    if padded_prefs:
        summary["padded_prefs"] = {"fraction": padded_prefs, **{f"padded_{side}": sum(
            is_padded(r[side]) for r in data["prefs_train"]) for side in ("chosen", "rejected")}}
    (out / "world.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def main(argv=None):
    from .cli import ArgumentParser, check_output, finite_float, seed_int

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data")
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--padded_demos", type=finite_float, default=PADDED_DEMOS,
                        help="pad this fraction of the SFT training responses with filler sentences "
                             f"(default: {PADDED_DEMOS}; 0: the ideal writer)")
    parser.add_argument("--padded_prefs", type=finite_float, default=PADDED_PREFS,
                        help="pad this fraction of the preference pairs' answers, then label the pairs again "
                             f"(default: {PADDED_PREFS}; 0: the ideal writer's pairs)")
    args = parser.parse_args(argv)
    check_output(args.out, "out", directory=True)
    # a bad fraction: ValueError, one line
    summary = build(args.out, args.seed, padded_demos=args.padded_demos, padded_prefs=args.padded_prefs)
    for path in sorted(Path(args.out).rglob("*.json*")):
        print(f"{str(path):40s} {path.stat().st_size / 1e3:8.1f} kB")
    print("counts:", summary["counts"])
    print(f"prefs_train mislabelled by the annotator: {summary['prefs_train_mislabelled']:.1%}")
    for row in summary["annotator_error_by_gap"]:
        print(f"annotator error at gap ({row['gap'][0]:.2f}, {row['gap'][1]:.2f}]: {row['error']} (n={row['n']})")
    if "padded_demos" in summary:
        pads = summary["padded_demos"]
        print(f"sft_train: {pads['padded']} responses padded with filler, mean oracle quality "
              f"{pads['sft_train_mean_quality']:.3f}")
    if "padded_prefs" in summary:
        pads = summary["padded_prefs"]
        print(f"prefs_train: {pads['padded_chosen']} chosen and {pads['padded_rejected']} rejected answers padded "
              f"with filler")


if __name__ == "__main__":
    from .cli import run

    run(main)
