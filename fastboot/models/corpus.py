"""Deterministic English-like text to train the test models' tokenizer on.

`sentences(n)` returns the same `n` lines on every run, machine and numpy version: words are picked
from the embedded list below by the raw PCG64 stream (`numpy.random.PCG64.random_raw`), whose
output NumPy guarantees to keep stable, unlike the `Generator` distribution methods. Nothing is
read from disk or the network.

The text is nonsense, but it has the statistics a byte-level BPE needs to learn a real-looking
vocabulary: frequent short words, rarer long ones, capitals after full stops, punctuation,
numbers, quotes and line breaks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

#: Seed of the corpus stream. Changing it changes every tokenizer fastboot generates.
CORPUS_SEED = 20_240_601

# Roughly in order of frequency: the picker below favours the front of the list.
_WORD_TEXT = """
    the of and to a in is that it was for on are as with his they at be this from have or by
    one had not but what all were when we there can an your which their said if do will each
    about how up out them then she many some so these would other into has more her two like him
    see time could no make than first been its who now people my made over did down only way find
    use may water long little very after words called just where most know get through back much
    go good new write our me man too any day same right look think also around another came come
    work three word must because does part even place well such here take why things help put
    years different away again off went old number great tell men say small every found still
    between name should home big give air line set own under read last never us left end along
    while might next sound below saw something thought both few those always looked show large
    often together asked house don world going want school important until form food keep children
    feet land side without boy once animals life enough took sometimes four head above kind began
    almost live page got earth need far hand high year mother light parts country father let night
    following picture being study second eyes soon times story boys since white days ever paper
    hard near sentence better best across during today others however sure means knew try told
    young miles sun ways thing whole hear example heard several change answer room sea against top
    turned learn point city play toward five using himself usually money seen car morning body
    upon family later turn move face door cut done group true half red fish plants living black
    eat short united run book gave order open ground cold really table remember tree course front
    american space inside ago map system model tokenizer snapshot engine memory process server
    request response token replica restore checkpoint network kernel machine weights layer
    attention hidden cache batch prompt language river mountain window garden library
    question problem letter village market evening summer winter spring autumn breakfast dinner
    kitchen teacher student doctor friend stranger journey island forest valley bridge
    station harbour lantern whisper thunder silver golden gentle quiet bright careful curious
    wonderful beautiful dangerous ordinary remarkable simple quickly slowly suddenly carefully
"""

#: The vocabulary of the corpus: a few hundred common (and a few fastboot-flavoured) words.
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())

#: Sentence endings, weighted towards full stops by repetition.
_ENDINGS = (".", ".", ".", ".", ".", "?", "!", "...")


def _draws(seed: int) -> Iterator[int]:
    """The raw 64-bit PCG64 stream as Python ints, fetched from NumPy a block at a time."""
    bits = np.random.PCG64(seed)
    return itertools.chain.from_iterable(
        bits.random_raw(1 << 16).tolist() for _ in itertools.count()
    )


# One draw makes one word, cut into bit fields (their small modulo bias does not matter):
#   0-15 and 16-31   two picks from WORDS; the smaller wins, a falling Zipf-like frequency
#   32-41            kind, mod 100: 0-2 a number of 2-4 digits instead of the word, 3-4 quoted,
#                    5-6 in parentheses, 97-99 capitalised
#   42-55            the number
#   56-63            punctuation after the previous word: < 24 a comma, < 28 a semicolon
def _sentence(draws: Iterator[int]) -> str:
    head = next(draws)
    parts: list[str] = []
    for i in range(3 + head % 12):
        r = next(draws)
        word = WORDS[min((r & 0xFFFF) % len(WORDS), (r >> 16 & 0xFFFF) % len(WORDS))]
        kind = (r >> 32 & 0x3FF) % 100
        if kind < 3:
            word = str((r >> 42 & 0x3FFF) % 10 ** (2 + kind))
        elif kind < 5:
            word = f'"{word}"'
        elif kind < 7:
            word = f"({word})"
        if i == 0 or kind >= 97:
            word = word[:1].upper() + word[1:]
        punctuation = r >> 56
        if i > 1 and punctuation < 28:
            parts[-1] += "," if punctuation < 24 else ";"
        parts.append(word)
    return " ".join(parts) + _ENDINGS[(head >> 8) % len(_ENDINGS)]


def sentences(n: int, seed: int = CORPUS_SEED) -> list[str]:
    """`n` lines of text, each one to four sentences, identical on every run for a given seed.

    About 115 bytes per line on average; one line in twenty has inner line breaks. Each line
    takes one draw (sentence count, separator), then each sentence one (length, ending) and one
    per word.
    """
    draws = _draws(seed)
    lines: list[str] = []
    for _ in range(n):
        head = next(draws)
        separator = "\n" if (head >> 8) % 20 == 0 else " "
        lines.append(separator.join(_sentence(draws) for _ in range(1 + head % 4)))
    return lines
