"""Generate the demo's three built-in tasks: arithmetic word problems, Python functions, geography facts.

Deterministic (seeded), written by the project, so the data is license-clean:

    python -m qkov.pipeline.data.make_tasks            # (re)write arithmetic.jsonl, python_code.jsonl, geography.jsonl
    python -m qkov.pipeline.data.make_tasks --check    # verify the committed files match, rows split, lengths fit

Every row is {"id", "text", "prompt", "completion"} with prompt + completion == text exactly,
for a completion-only loss: an arithmetic prompt is the question up to its "?" and the
completion the worked answer after it (starting with its space); a code prompt is the
source up to and including the newline that ends the first def/class docstring, and the
completion the body after it; a geography prompt is the question and the completion the
answer (starting with its space).

Every arithmetic answer is checked by evaluating its worked expression, every code sample
carries checks (kept out of the JSONL) that the tests run against the function, and every
geography row comes from the small fact table COUNTRIES below (facts chosen to be
uncontroversial; a field is None where a fact was not certain enough to use).
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
N_SAMPLES = 64
SEED = 20240611
MIN_TOKENS, MAX_TOKENS = 20, 80  # with the SmolLM2 tokenizer

NAMES = (
    "Sam", "Maya", "Omar", "Lena", "Kenji", "Priya", "Diego", "Amara", "Tom", "Zoe",
    "Ravi", "Elena", "Noah", "Aisha", "Lucas", "Mei", "Jonas", "Fatima", "Leo", "Nadia",
)


@dataclass(frozen=True)
class Split:
    """A sample cut in two for a completion-only loss: text is prompt + completion, exactly."""

    prompt: str
    completion: str

    def __post_init__(self):
        if not self.prompt or not self.completion:
            raise AssertionError(f"empty prompt or completion: {self.prompt!r} | {self.completion!r}")

    @property
    def text(self) -> str:
        return self.prompt + self.completion


@dataclass(frozen=True)
class Problem(Split):
    expression: str  # the worked expression in Python syntax, e.g. "12 + 7 * 3"
    answer: int


@dataclass(frozen=True)
class Function(Split):
    checks: tuple[str, ...]  # Python expressions that must be True after exec(text)


@dataclass(frozen=True)
class Fact(Split):
    country: str
    template: str  # the template's name, e.g. "capital"


# ------------------------------------------------------------------ arithmetic

def _show(expr: str) -> str:
    return expr.replace("*", "×").replace("//", "÷").replace("/", "÷")


def _problem(question: str, expr: str, answer_sentence: str, answer: int) -> Problem:
    if eval(expr) != answer:  # noqa: S307 - our own expression; guards every template
        raise AssertionError(f"wrong worked answer: {expr} != {answer}")
    return Problem(question, f" {_show(expr)} = {answer}. {answer_sentence}", expr, answer)


def _buy_bags(r: random.Random, a: str, b: str) -> Problem:
    item = r.choice(("apples", "oranges", "pears", "plums", "lemons"))
    x, n, k = r.randint(5, 30), r.randint(2, 9), r.randint(2, 8)
    ans = x + n * k
    return _problem(f"{a} has {x} {item} and buys {n} more bags of {k} {item} each. How many {item} does {a} have?",
                    f"{x} + {n} * {k}", f"{a} has {ans} {item}.", ans)


def _give_away(r: random.Random, a: str, b: str) -> Problem:
    item = r.choice(("stickers", "marbles", "cards", "stamps"))
    n, k = r.randint(2, 6), r.randint(2, 9)
    x = n * k + r.randint(3, 40)
    ans = x - n * k
    return _problem(f"{a} had {x} {item} and gave {k} to each of {n} friends. How many {item} does {a} have left?",
                    f"{x} - {n} * {k}", f"{a} has {ans} {item} left.", ans)


def _share(r: random.Random, a: str, b: str) -> Problem:
    item = r.choice(("cookies", "grapes", "crayons", "candies"))
    n, each = r.randint(2, 9), r.randint(3, 15)
    x = n * each
    return _problem(f"{a} shares {x} {item} equally among {n} friends. How many {item} does each friend get?",
                    f"{x} // {n}", f"Each friend gets {each} {item}.", each)


def _savings(r: random.Random, a: str, b: str) -> Problem:
    thing = r.choice(("a book", "a game", "a scarf", "a kite", "a lamp"))
    per, weeks = r.randint(3, 15), r.randint(4, 12)
    cost = r.randint(5, per * weeks - 1)
    ans = per * weeks - cost
    return _problem(f"{a} saves ${per} every week for {weeks} weeks and then spends ${cost} on {thing}. "
                    f"How much money does {a} have left?", f"{per} * {weeks} - {cost}", f"{a} has ${ans} left.", ans)


def _area(r: random.Random, a: str, b: str) -> Problem:
    place = r.choice(("garden", "patio", "classroom", "carpet"))
    x, y = r.randint(3, 20), r.randint(2, 15)
    return _problem(f"A {place} is {x} meters long and {y} meters wide. What is its area?",
                    f"{x} * {y}", f"The area is {x * y} square meters.", x * y)


def _perimeter(r: random.Random, a: str, b: str) -> Problem:
    x, y = r.randint(5, 60), r.randint(3, 40)
    ans = 2 * (x + y)
    return _problem(f"{a} walks once around a rectangular field that is {x} meters long and {y} meters wide. "
                    f"How far does {a} walk?", f"2 * ({x} + {y})", f"{a} walks {ans} meters.", ans)


def _speed(r: random.Random, a: str, b: str) -> Problem:
    vehicle = r.choice(("train", "bus", "ferry", "truck"))
    v, h = r.choice((40, 45, 50, 60, 70, 80, 90)), r.randint(2, 6)
    return _problem(f"A {vehicle} travels at {v} kilometers per hour for {h} hours. How far does it go?",
                    f"{v} * {h}", f"The {vehicle} travels {v * h} kilometers.", v * h)


def _ages(r: random.Random, a: str, b: str) -> Problem:
    x, d, y = r.randint(6, 15), r.randint(2, 9), r.randint(2, 10)
    ans = x + d + y
    return _problem(f"{a} is {x} years old and {b} is {d} years older than {a}. How old will {b} be in {y} years?",
                    f"{x} + {d} + {y}", f"{b} will be {ans} years old.", ans)


def _reading(r: random.Random, a: str, b: str) -> Problem:
    per, days = r.randint(8, 25), r.randint(3, 9)
    total = per * days + r.randint(10, 120)
    ans = total - per * days
    return _problem(f"A book has {total} pages. {a} reads {per} pages a day for {days} days. How many pages are left?",
                    f"{total} - {per} * {days}", f"There are {ans} pages left.", ans)


def _bakery(r: random.Random, a: str, b: str) -> Problem:
    item = r.choice(("muffins", "rolls", "bagels", "scones"))
    trays, per = r.randint(3, 8), r.choice((6, 8, 10, 12))
    sold = r.randint(5, trays * per - 2)  # at least 2 left: plural nouns stay right
    ans = trays * per - sold
    return _problem(f"A baker makes {trays} trays of {per} {item} and sells {sold} of them. How many {item} are left?",
                    f"{trays} * {per} - {sold}", f"There are {ans} {item} left.", ans)


def _change(r: random.Random, a: str, b: str) -> Problem:
    item = r.choice(("notebooks", "pens", "mugs", "socks"))
    price, n = r.randint(2, 9), r.randint(2, 5)
    bill = next(v for v in (10, 20, 50, 100) if v > price * n)
    ans = bill - price * n
    return _problem(f"{item.capitalize()} cost ${price} each. {a} buys {n} {item} and pays with a ${bill} bill. "
                    f"How much change does {a} get?", f"{bill} - {price} * {n}", f"{a} gets ${ans} in change.", ans)


def _boxes(r: random.Random, a: str, b: str) -> Problem:
    fruit = r.choice(("strawberries", "cherries", "tomatoes", "eggs"))
    per = r.choice((4, 5, 6, 8, 10))
    total = per * r.randint(4, 12)
    mon = r.randint(per, total - per)
    ans = total // per
    return _problem(f"{a} collects {mon} {fruit} on Monday and {total - mon} on Tuesday, then packs them into boxes "
                    f"of {per}. How many boxes does {a} fill?", f"({mon} + {total - mon}) // {per}",
                    f"{a} fills {ans} boxes.", ans)


def _temperature(r: random.Random, a: str, b: str) -> Problem:
    t0, up, down = r.randint(2, 15), r.randint(3, 12), r.randint(4, 18)
    ans = t0 + up - down
    return _problem(f"The temperature was {t0} degrees in the morning. It rose {up} degrees by noon and fell {down} "
                    f"degrees by night. What was the temperature at night?", f"{t0} + {up} - {down}",
                    f"It was {ans} degree{'' if abs(ans) == 1 else 's'} at night.", ans)


def _practice(r: random.Random, a: str, b: str) -> Problem:
    instrument = r.choice(("piano", "violin", "guitar", "drums"))
    mins, weeks = r.choice((15, 20, 25, 30, 40, 45)), r.randint(2, 4)
    ans = mins * 7 * weeks
    return _problem(f"{a} practices the {instrument} for {mins} minutes every day. How many minutes is that in "
                    f"{weeks} weeks?", f"{mins} * 7 * {weeks}", f"{a} practices for {ans} minutes.", ans)


def _half(r: random.Random, a: str, b: str) -> Problem:
    item = r.choice(("shells", "coins", "beads", "buttons"))
    x, found = 2 * r.randint(6, 30), r.randint(2, 15)
    ans = x // 2 + found
    return _problem(f"{a} has {x} {item} and gives half of them to {b}. Then {a} finds {found} more. "
                    f"How many {item} does {a} have now?", f"{x} // 2 + {found}", f"{a} has {ans} {item}.", ans)


def _seats(r: random.Random, a: str, b: str) -> Problem:
    rows, per, empty = r.randint(5, 20), r.randint(8, 24), r.randint(3, 30)
    ans = rows * per - empty
    return _problem(f"A theater has {rows} rows of {per} seats. On Friday {empty} seats are empty. "
                    f"How many people are watching the play?", f"{rows} * {per} - {empty}",
                    f"There are {ans} people watching.", ans)


ARITHMETIC: tuple[Callable[[random.Random, str, str], Problem], ...] = (
    _buy_bags, _give_away, _share, _savings, _area, _perimeter, _speed, _ages,
    _reading, _bakery, _change, _boxes, _temperature, _practice, _half, _seats,
)


def arithmetic_problems(n: int = N_SAMPLES, seed: int = SEED) -> list[Problem]:
    """`n` word problems cycling through every template, in a seeded shuffled order."""
    r = random.Random(seed)
    out = []
    for k in range(n):
        a, b = r.sample(NAMES, 2)
        out.append(ARITHMETIC[k % len(ARITHMETIC)](r, a, b))
    r.shuffle(out)
    return out


# ------------------------------------------------------------------ python code

def _split_after_docstring(text: str) -> tuple[str, str]:
    """(source up to the end of the first def/class docstring, the rest from the newline that ends
    it): the cut falls between tokens (SmolLM2 reads a newline and the next line's indentation
    as one token, which a cut after the newline would split)."""
    node = next(n for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
    doc = node.body[0]
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
        raise AssertionError(f"{node.name} has no docstring")
    cut = sum(len(line) for line in text.splitlines(keepends=True)[: doc.end_lineno])
    if text[cut - 1] != "\n":
        raise AssertionError(f"{node.name}: the docstring does not end its line")
    return text[:cut - 1], text[cut - 1:]


def _f(text: str, *checks: str) -> Function:
    text = text.strip("\n") + "\n"
    return Function(*_split_after_docstring(text), tuple(checks))


_CONVERSIONS = (  # (name, parameter, docstring phrase, expression, check)
    ("celsius_to_fahrenheit", "celsius", "degrees Celsius to Fahrenheit", "celsius * 9 / 5 + 32", "celsius_to_fahrenheit(100) == 212"),
    ("kilometers_to_miles", "km", "kilometers to miles", "km * 0.621371", "abs(kilometers_to_miles(10) - 6.21371) < 1e-9"),
    ("inches_to_centimeters", "inches", "inches to centimeters", "inches * 2.54", "inches_to_centimeters(10) == 25.4"),
    ("hours_to_seconds", "hours", "hours to seconds", "hours * 3600", "hours_to_seconds(2) == 7200"),
)

_COMPREHENSIONS = (  # (name, docstring, element expression, condition, check)
    ("squares_of_evens", "Return the squares of the even numbers in values.", "v * v", "v % 2 == 0",
     "squares_of_evens([1, 2, 3, 4]) == [4, 16]"),
    ("cubes_of_odds", "Return the cubes of the odd numbers in values.", "v ** 3", "v % 2 == 1",
     "cubes_of_odds([1, 2, 3]) == [1, 27]"),
    ("doubled_positives", "Return twice each positive number in values.", "2 * v", "v > 0",
     "doubled_positives([-1, 0, 3, 5]) == [6, 10]"),
    ("short_words_upper", "Return the words of at most three letters, in upper case.", "v.upper()", "len(v) <= 3",
     "short_words_upper(['a', 'tree', 'fox']) == ['A', 'FOX']"),
)

_COUNTERS = (  # (name, docstring noun, predicate on ch, check)
    ("count_vowels", "vowels", "ch.lower() in 'aeiou'", "count_vowels('Education') == 5"),
    ("count_digits", "digits", "ch.isdigit()", "count_digits('a1b22c333') == 6"),
    ("count_uppercase", "upper-case letters", "ch.isupper()", "count_uppercase('Hello World') == 2"),
)

_MULTIPLES = (3, 5, 7)


def _families() -> list[Function]:
    out = [
        _f(f'''
def {name}({p}):
    """Convert {phrase}."""
    return {expr}
''', check) for name, p, phrase, expr, check in _CONVERSIONS
    ]
    out += [
        _f(f'''
def {name}(values):
    """{doc}"""
    return [{elem} for v in values if {cond}]
''', check) for name, doc, elem, cond, check in _COMPREHENSIONS
    ]
    out += [
        _f(f'''
def {name}(text):
    """Return how many characters of text are {noun}."""
    return sum(1 for ch in text if {pred})
''', check) for name, noun, pred, check in _COUNTERS
    ]
    out += [
        _f(f'''
def sum_of_multiples_of_{k}(limit):
    """Return the sum of all positive multiples of {k} below limit."""
    return sum(range({k}, limit, {k}))
''', f"sum_of_multiples_of_{k}(20) == {sum(range(k, 20, k))}") for k in _MULTIPLES
    ]
    return out


_SINGLES = (
    _f('''
def factorial(n):
    """Return n! computed recursively."""
    if n <= 1:
        return 1
    return n * factorial(n - 1)
''', "factorial(5) == 120", "factorial(0) == 1"),
    _f('''
def fibonacci(n):
    """Return the n-th Fibonacci number, starting from fibonacci(0) == 0."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
''', "fibonacci(10) == 55", "fibonacci(1) == 1"),
    _f('''
def gcd(a, b):
    """Return the greatest common divisor of a and b (Euclid's algorithm)."""
    while b:
        a, b = b, a % b
    return a
''', "gcd(48, 36) == 12", "gcd(7, 5) == 1"),
    _f('''
def flatten(items):
    """Flatten arbitrarily nested lists into one flat list."""
    flat = []
    for item in items:
        if isinstance(item, list):
            flat.extend(flatten(item))
        else:
            flat.append(item)
    return flat
''', "flatten([1, [2, [3, 4]], 5]) == [1, 2, 3, 4, 5]"),
    _f('''
class Stack:
    """A last-in, first-out stack."""

    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()
''', "(lambda s: (s.push(1), s.push(2), s.pop())[2])(Stack()) == 2"),
    _f('''
class Counter:
    """Count how many times increment has been called."""

    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value
''', "Counter(5).increment(3) == 8"),
    _f('''
class BankAccount:
    """A bank account that refuses to go below zero."""

    def __init__(self, balance=0):
        self.balance = balance

    def withdraw(self, amount):
        if amount > self.balance:
            raise ValueError("insufficient funds")
        self.balance -= amount
''', "(lambda a: (a.withdraw(30), a.balance)[1])(BankAccount(100)) == 70"),
    _f('''
from dataclasses import dataclass


@dataclass
class Rectangle:
    """A rectangle with a width and a height."""

    width: float
    height: float

    def area(self):
        return self.width * self.height
''', "Rectangle(3, 4).area() == 12"),
    _f('''
import math


class Point:
    """A point in the plane."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def distance_to(self, other):
        return math.hypot(self.x - other.x, self.y - other.y)
''', "Point(0, 0).distance_to(Point(3, 4)) == 5.0"),
    _f('''
def reverse_words(sentence):
    """Return the sentence with its words in reverse order."""
    return " ".join(reversed(sentence.split()))
''', "reverse_words('the quick fox') == 'fox quick the'"),
    _f('''
def is_palindrome(text):
    """Return True if text reads the same backwards, ignoring case and punctuation."""
    letters = [ch.lower() for ch in text if ch.isalnum()]
    return letters == letters[::-1]
''', "is_palindrome('A man, a plan, a canal: Panama')", "not is_palindrome('python')"),
    _f('''
def clamp(value, low, high):
    """Limit value to the closed interval [low, high]."""
    return max(low, min(value, high))
''', "clamp(15, 0, 10) == 10", "clamp(-3, 0, 10) == 0", "clamp(4, 0, 10) == 4"),
    _f('''
def unique(items):
    """Return the items without duplicates, keeping their first order."""
    seen = set()
    return [x for x in items if not (x in seen or seen.add(x))]
''', "unique([3, 1, 3, 2, 1]) == [3, 1, 2]"),
    _f('''
def chunks(items, size):
    """Split items into consecutive lists of at most size elements."""
    return [items[i:i + size] for i in range(0, len(items), size)]
''', "chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]"),
    _f('''
def word_counts(text):
    """Return a dict mapping each lower-case word of text to its count."""
    counts = {}
    for word in text.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts
''', "word_counts('a b A') == {'a': 2, 'b': 1}"),
    _f('''
def running_totals(numbers):
    """Return the cumulative sums of numbers."""
    totals, total = [], 0
    for n in numbers:
        total += n
        totals.append(total)
    return totals
''', "running_totals([1, 2, 3, 4]) == [1, 3, 6, 10]"),
    _f('''
def capitalize_words(text):
    """Return text with the first letter of every word in upper case."""
    return " ".join(word[:1].upper() + word[1:] for word in text.split())
''', "capitalize_words('hello big world') == 'Hello Big World'"),
    _f('''
def caesar(text, shift):
    """Shift every lower-case letter of text by shift places in the alphabet."""
    return "".join(
        chr((ord(ch) - 97 + shift) % 26 + 97) if ch.islower() else ch for ch in text
    )
''', "caesar('abc xyz', 3) == 'def abc'"),
    _f('''
from bisect import bisect_left


def binary_search(items, target):
    """Return the index of target in the sorted list items, or -1."""
    i = bisect_left(items, target)
    return i if i < len(items) and items[i] == target else -1
''', "binary_search([1, 3, 5, 7, 9], 7) == 3", "binary_search([1, 3, 5], 4) == -1"),
    _f('''
def median(numbers):
    """Return the median of a non-empty list of numbers."""
    ordered = sorted(numbers)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2
''', "median([5, 1, 3]) == 3", "median([4, 1, 3, 2]) == 2.5"),
    _f('''
def is_prime(n):
    """Return True if n is a prime number."""
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n ** 0.5) + 1))
''', "is_prime(97)", "not is_prime(91)", "not is_prime(1)"),
    _f('''
def digit_sum(n):
    """Return the sum of the decimal digits of a non-negative integer, recursively."""
    if n < 10:
        return n
    return n % 10 + digit_sum(n // 10)
''', "digit_sum(4096) == 19"),
    _f('''
def power(base, exponent):
    """Return base ** exponent by repeated squaring (exponent >= 0)."""
    if exponent == 0:
        return 1
    half = power(base, exponent // 2)
    return half * half * (base if exponent % 2 else 1)
''', "power(3, 5) == 243", "power(2, 10) == 1024"),
    _f('''
def longest_word(sentence):
    """Return the longest word of sentence (the first one on ties)."""
    return max(sentence.split(), key=len)
''', "longest_word('a quick brown fox') == 'quick'"),
    _f('''
def transpose(matrix):
    """Return the transpose of a matrix given as a list of rows."""
    return [list(column) for column in zip(*matrix)]
''', "transpose([[1, 2, 3], [4, 5, 6]]) == [[1, 4], [2, 5], [3, 6]]"),
    _f('''
def invert(mapping):
    """Return a dict that maps each value of mapping back to its key."""
    return {value: key for key, value in mapping.items()}
''', "invert({'a': 1, 'b': 2}) == {1: 'a', 2: 'b'}"),
    _f('''
def average(numbers):
    """Return the mean of numbers, or None for an empty list."""
    if not numbers:
        return None
    return sum(numbers) / len(numbers)
''', "average([2, 4, 9]) == 5", "average([]) is None"),
    _f('''
def safe_divide(a, b, default=0.0):
    """Return a / b, or default when b is zero."""
    try:
        return a / b
    except ZeroDivisionError:
        return default
''', "safe_divide(7, 2) == 3.5", "safe_divide(1, 0) == 0.0"),
    _f('''
def countdown(n):
    """Yield the numbers from n down to 1."""
    while n > 0:
        yield n
        n -= 1
''', "list(countdown(3)) == [3, 2, 1]"),
    _f('''
from itertools import groupby


def run_length(text):
    """Compress runs of repeated characters, e.g. 'aaab' -> 'a3b1'."""
    return "".join(f"{ch}{len(list(run))}" for ch, run in groupby(text))
''', "run_length('aaabcc') == 'a3b1c2'"),
    _f('''
def is_anagram(a, b):
    """Return True if a and b contain the same letters, ignoring case and spaces."""
    def normalise(s):
        return sorted(s.replace(" ", "").lower())
    return normalise(a) == normalise(b)
''', "is_anagram('Listen', 'Silent')", "not is_anagram('abc', 'abd')"),
    _f('''
def is_leap_year(year):
    """Return True if year is a leap year in the Gregorian calendar."""
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
''', "is_leap_year(2024)", "not is_leap_year(1900)", "is_leap_year(2000)"),
    _f('''
def hamming_distance(a, b):
    """Return the number of positions where the equal-length strings a and b differ."""
    if len(a) != len(b):
        raise ValueError("strings must have the same length")
    return sum(x != y for x, y in zip(a, b))
''', "hamming_distance('karolin', 'kathrin') == 3"),
    _f('''
def nested_sum(items):
    """Return the sum of all numbers in a nested list, recursively."""
    return sum(nested_sum(x) if isinstance(x, list) else x for x in items)
''', "nested_sum([1, [2, 3], [[4]]]) == 10"),
    _f('''
def remove_vowels(text):
    """Return text with every vowel removed."""
    return "".join(ch for ch in text if ch.lower() not in "aeiou")
''', "remove_vowels('Programming') == 'Prgrmmng'"),
    _f('''
def second_largest(numbers):
    """Return the second largest distinct value in numbers."""
    distinct = sorted(set(numbers))
    if len(distinct) < 2:
        raise ValueError("need at least two distinct values")
    return distinct[-2]
''', "second_largest([4, 9, 9, 2]) == 4"),
    _f('''
def long_words(words, min_length):
    """Return the words with at least min_length characters."""
    return [w for w in words if len(w) >= min_length]
''', "long_words(['hi', 'hello', 'hey'], 3) == ['hello', 'hey']"),
    _f('''
def pairs_to_dict(keys, values):
    """Combine two parallel lists into a dict."""
    return dict(zip(keys, values))
''', "pairs_to_dict(['x', 'y'], [1, 2]) == {'x': 1, 'y': 2}"),
    _f('''
def top_words(text, n):
    """Return the n most frequent words of text, most frequent first."""
    counts = {}
    for word in text.split():
        counts[word] = counts.get(word, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))[:n]
''', "top_words('b a b c a b', 2) == ['b', 'a']"),
    _f('''
def acronym(phrase):
    """Return the upper-case initials of the words in phrase."""
    return "".join(word[0].upper() for word in phrase.split())
''', "acronym('portable network graphics') == 'PNG'"),
    _f('''
def triangle_number(n):
    """Return 1 + 2 + ... + n using the closed formula."""
    return n * (n + 1) // 2
''', "triangle_number(10) == 55"),
    _f('''
def letter_grade(score):
    """Map a score from 0 to 100 to a letter grade."""
    for threshold, grade in ((90, "A"), (80, "B"), (70, "C"), (60, "D")):
        if score >= threshold:
            return grade
    return "F"
''', "letter_grade(85) == 'B'", "letter_grade(42) == 'F'"),
    _f('''
def rotate(items, k):
    """Rotate a list k places to the right."""
    if not items:
        return []
    k %= len(items)
    return items[-k:] + items[:-k]
''', "rotate([1, 2, 3, 4, 5], 2) == [4, 5, 1, 2, 3]"),
    _f('''
def fizzbuzz(n):
    """Return the FizzBuzz word for n."""
    if n % 15 == 0:
        return "FizzBuzz"
    if n % 3 == 0:
        return "Fizz"
    if n % 5 == 0:
        return "Buzz"
    return str(n)
''', "fizzbuzz(30) == 'FizzBuzz'", "fizzbuzz(9) == 'Fizz'", "fizzbuzz(7) == '7'"),
    _f('''
def count_occurrences(items, target):
    """Return how many times target appears in items."""
    return sum(1 for item in items if item == target)
''', "count_occurrences([1, 2, 1, 1], 1) == 3"),
    _f('''
def max_depth(items):
    """Return the nesting depth of a list (a flat list has depth 1)."""
    if not isinstance(items, list):
        return 0
    return 1 + max((max_depth(x) for x in items), default=0)
''', "max_depth([1, [2, [3]]]) == 3", "max_depth([]) == 1"),
    _f('''
def product(numbers):
    """Return the product of all numbers (1 for an empty list)."""
    result = 1
    for n in numbers:
        result *= n
    return result
''', "product([2, 3, 4]) == 24", "product([]) == 1"),
    _f('''
def is_sorted(items):
    """Return True if items are in non-decreasing order."""
    return all(a <= b for a, b in zip(items, items[1:]))
''', "is_sorted([1, 2, 2, 5])", "not is_sorted([3, 1])"),
    _f('''
def snake_to_camel(name):
    """Convert a snake_case name to camelCase."""
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)
''', "snake_to_camel('max_retry_count') == 'maxRetryCount'"),
    _f('''
def group_by_length(words):
    """Group words into a dict keyed by word length."""
    groups = {}
    for word in words:
        groups.setdefault(len(word), []).append(word)
    return groups
''', "group_by_length(['ab', 'c', 'de']) == {2: ['ab', 'de'], 1: ['c']}"),
    _f('''
def binary_string(n):
    """Return the binary representation of a non-negative integer, recursively."""
    if n < 2:
        return str(n)
    return binary_string(n // 2) + str(n % 2)
''', "binary_string(10) == '1010'", "binary_string(0) == '0'"),
    _f('''
def sum_of_squares(n):
    """Return 1**2 + 2**2 + ... + n**2."""
    return sum(k * k for k in range(1, n + 1))
''', "sum_of_squares(4) == 30"),
    _f('''
def index_of_max(values):
    """Return the position of the largest value (the first one on ties)."""
    return max(range(len(values)), key=values.__getitem__)
''', "index_of_max([3, 9, 2, 9]) == 1"),
    _f('''
def dot(u, v):
    """Return the dot product of two equal-length vectors."""
    return sum(a * b for a, b in zip(u, v))
''', "dot([1, 2, 3], [4, 5, 6]) == 32"),
)


def python_functions(n: int = N_SAMPLES, seed: int = SEED) -> list[Function]:
    """`n` distinct functions and classes (template families + hand-written ones), seeded order."""
    pool = _families() + list(_SINGLES)
    if n > len(pool):
        raise ValueError(f"only {len(pool)} code samples available, asked for {n}")
    return random.Random(seed + 1).sample(pool, n)


# ------------------------------------------------------------------ geography

@dataclass(frozen=True)
class Country:
    name: str  # as written mid-sentence: "Kenya", "the United States"
    capital: str
    continent: str | None  # None for countries that span two continents (Russia, Turkey)
    language: str | None  # what most people speak; None where that is not one clear language
    currency: str
    largest_city: str | None  # None where not certain (e.g. Australia: Sydney or Melbourne by some counts)
    neighbour: str | None  # one country sharing a land border; None for island countries and Australia
    island: bool = False  # an island country without any land border


COUNTRIES: tuple[Country, ...] = (
    # Europe
    Country("France", "Paris", "Europe", "French", "euro", "Paris", "Spain"),
    Country("Germany", "Berlin", "Europe", "German", "euro", "Berlin", "Poland"),
    Country("Italy", "Rome", "Europe", "Italian", "euro", "Rome", "France"),
    Country("Spain", "Madrid", "Europe", "Spanish", "euro", "Madrid", "Portugal"),
    Country("Portugal", "Lisbon", "Europe", "Portuguese", "euro", "Lisbon", "Spain"),
    Country("the United Kingdom", "London", "Europe", "English", "pound sterling", "London", "Ireland"),
    Country("Ireland", "Dublin", "Europe", None, "euro", "Dublin", "the United Kingdom"),
    Country("Austria", "Vienna", "Europe", "German", "euro", "Vienna", "Germany"),
    Country("Poland", "Warsaw", "Europe", "Polish", "Polish złoty", "Warsaw", "Germany"),
    Country("the Czech Republic", "Prague", "Europe", "Czech", "Czech koruna", "Prague", "Germany"),
    Country("Hungary", "Budapest", "Europe", "Hungarian", "Hungarian forint", "Budapest", "Austria"),
    Country("Greece", "Athens", "Europe", "Greek", "euro", "Athens", "Bulgaria"),
    Country("Sweden", "Stockholm", "Europe", "Swedish", "Swedish krona", "Stockholm", "Norway"),
    Country("Norway", "Oslo", "Europe", "Norwegian", "Norwegian krone", "Oslo", "Sweden"),
    Country("Denmark", "Copenhagen", "Europe", "Danish", "Danish krone", "Copenhagen", "Germany"),
    Country("Finland", "Helsinki", "Europe", "Finnish", "euro", "Helsinki", "Sweden"),
    Country("Iceland", "Reykjavík", "Europe", "Icelandic", "Icelandic króna", "Reykjavík", None, island=True),
    Country("Russia", "Moscow", None, "Russian", "Russian ruble", "Moscow", "Finland"),
    Country("Turkey", "Ankara", None, "Turkish", "Turkish lira", "Istanbul", "Greece"),
    # Africa
    Country("Egypt", "Cairo", "Africa", "Arabic", "Egyptian pound", "Cairo", "Libya"),
    Country("Morocco", "Rabat", "Africa", "Arabic", "Moroccan dirham", "Casablanca", "Algeria"),
    Country("Nigeria", "Abuja", "Africa", None, "naira", "Lagos", "Niger"),
    Country("Kenya", "Nairobi", "Africa", None, "Kenyan shilling", "Nairobi", "Tanzania"),
    Country("Ethiopia", "Addis Ababa", "Africa", None, "birr", "Addis Ababa", "Kenya"),
    Country("Tanzania", "Dodoma", "Africa", "Swahili", "Tanzanian shilling", "Dar es Salaam", "Kenya"),
    Country("Madagascar", "Antananarivo", "Africa", "Malagasy", "Malagasy ariary", "Antananarivo", None, island=True),
    # the Americas
    Country("the United States", "Washington, D.C.", "North America", "English", "US dollar", "New York City", "Canada"),
    Country("Canada", "Ottawa", "North America", None, "Canadian dollar", "Toronto", "the United States"),
    Country("Mexico", "Mexico City", "North America", "Spanish", "Mexican peso", "Mexico City", "the United States"),
    Country("Brazil", "Brasília", "South America", "Portuguese", "Brazilian real", "São Paulo", "Argentina"),
    Country("Argentina", "Buenos Aires", "South America", "Spanish", "Argentine peso", "Buenos Aires", "Chile"),
    Country("Chile", "Santiago", "South America", "Spanish", "Chilean peso", "Santiago", "Argentina"),
    Country("Peru", "Lima", "South America", "Spanish", "Peruvian sol", "Lima", "Ecuador"),
    Country("Colombia", "Bogotá", "South America", "Spanish", "Colombian peso", "Bogotá", "Venezuela"),
    # Asia
    Country("Japan", "Tokyo", "Asia", "Japanese", "Japanese yen", "Tokyo", None, island=True),
    Country("South Korea", "Seoul", "Asia", "Korean", "South Korean won", "Seoul", "North Korea"),
    Country("China", "Beijing", "Asia", "Mandarin Chinese", "renminbi", None, "Mongolia"),
    Country("India", "New Delhi", "Asia", None, "Indian rupee", None, "Nepal"),
    Country("Pakistan", "Islamabad", "Asia", None, "Pakistani rupee", "Karachi", "Afghanistan"),
    Country("Bangladesh", "Dhaka", "Asia", "Bengali", "Bangladeshi taka", "Dhaka", "India"),
    Country("Vietnam", "Hanoi", "Asia", "Vietnamese", "Vietnamese dong", "Ho Chi Minh City", "Laos"),
    Country("Thailand", "Bangkok", "Asia", "Thai", "Thai baht", "Bangkok", "Cambodia"),
    Country("Iran", "Tehran", "Asia", "Persian", "Iranian rial", "Tehran", "Iraq"),
    Country("Iraq", "Baghdad", "Asia", "Arabic", "Iraqi dinar", "Baghdad", "Iran"),
    Country("Saudi Arabia", "Riyadh", "Asia", "Arabic", "Saudi riyal", "Riyadh", "Jordan"),
    # Oceania
    Country("Australia", "Canberra", "Oceania", "English", "Australian dollar", None, None),
    Country("New Zealand", "Wellington", "Oceania", "English", "New Zealand dollar", "Auckland", None, island=True),
)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _stop(s: str) -> str:
    """End a sentence after s without doubling a final dot ("Washington, D.C.")."""
    return s if s.endswith(".") else s + "."


def _geo_capital(c: Country) -> tuple[str, str] | None:
    second = f"{_cap(c.name)} is a country in {c.continent}." if c.continent else f"{_cap(c.name)} uses the {c.currency}."
    return f"What is the capital of {c.name}?", f" The capital of {c.name} is {_stop(c.capital)} {second}"


def _geo_capital_of(c: Country) -> tuple[str, str] | None:
    if c.continent is None:
        return None
    return (f"Which country has {c.capital} as its capital city?",
            f" {c.capital} is the capital city of {c.name}, a country in {c.continent}.")


def _geo_continent(c: Country) -> tuple[str, str] | None:
    if c.continent is None:
        return None
    return (f"On which continent is {c.name}?",
            f" {_cap(c.name)} is in {c.continent}. Its capital city is {c.capital}, and its currency is the {c.currency}.")


def _geo_language(c: Country) -> tuple[str, str] | None:
    if c.language is None:
        return None
    return (f"What language do most people in {c.name} speak?",
            f" Most people in {c.name} speak {c.language}. The capital of {c.name} is {_stop(c.capital)}")


def _geo_largest_city(c: Country) -> tuple[str, str] | None:
    if c.largest_city is None:
        return None
    if c.largest_city == c.capital:
        return (f"Is {c.capital} the largest city in {c.name}?",
                f" Yes. {c.capital} is both the capital and the largest city of {c.name}.")
    return (f"Is {c.largest_city} the capital of {c.name}?",
            f" No. {c.largest_city} is the largest city in {c.name}, but the capital is {_stop(c.capital)}")


def _geo_neighbour(c: Country) -> tuple[str, str] | None:
    if c.island:
        return (f"Which countries share a land border with {c.name}?",
                f" None. {_cap(c.name)} is an island country with no land borders. Its capital is {_stop(c.capital)}")
    if c.neighbour is None:
        return None
    return (f"Name one country that shares a land border with {c.name}.",
            f" {_cap(c.neighbour)} shares a land border with {c.name}, whose capital is {_stop(c.capital)}")


def _geo_currency(c: Country) -> tuple[str, str] | None:
    return (f"What currency is used in {c.name}?",
            f" {_cap(c.name)} uses the {c.currency}. It is the money people spend in {c.capital}, the capital city.")


GEOGRAPHY: tuple[Callable[[Country], tuple[str, str] | None], ...] = (
    _geo_capital, _geo_capital_of, _geo_continent, _geo_language, _geo_largest_city, _geo_neighbour, _geo_currency,
)


def geography_facts(n: int = N_SAMPLES, seed: int = SEED) -> list[Fact]:
    """`n` question/answer pairs cycling through every template, each (country, template) at most once,
    spreading the countries evenly; seeded order."""
    names = [c.name for c in COUNTRIES]
    if len(set(names)) != len(names):
        raise AssertionError("duplicate country in COUNTRIES")
    r = random.Random(seed + 2)
    order = {t: r.sample(COUNTRIES, len(COUNTRIES)) for t in GEOGRAPHY}
    used: dict[str, int] = {c.name: 0 for c in COUNTRIES}
    done: set[tuple[str, str]] = set()
    out = []
    for k in range(n):
        template = GEOGRAPHY[k % len(GEOGRAPHY)]
        tname = template.__name__.removeprefix("_geo_")
        candidates = [c for c in order[template] if (c.name, tname) not in done and template(c) is not None]
        if not candidates:
            raise ValueError(f"geography template {tname} ran out of countries at sample {k + 1}")
        c = min(candidates, key=lambda c: used[c.name])  # first of the least-used, in the seeded order
        used[c.name] += 1
        done.add((c.name, tname))
        out.append(Fact(*template(c), c.name, tname))
    r.shuffle(out)
    return out


# ------------------------------------------------------------------ files

FIELDS = ("id", "text", "prompt", "completion")


def rows(prefix: str, samples: list[Split]) -> list[dict[str, str]]:
    out = [{"id": f"{prefix}-{k:03d}", "text": s.text, "prompt": s.prompt, "completion": s.completion}
           for k, s in enumerate(samples, 1)]
    bad = row_problems(out)
    if bad:
        raise AssertionError("; ".join(bad))
    return out


def row_problems(rs: list[dict]) -> list[str]:
    """What is wrong with task rows: fields, prompt + completion != text, empty parts, repeated ids or texts."""
    bad = []
    for r in rs:
        if tuple(r) != FIELDS:
            bad.append(f"{r.get('id')}: fields {list(r)}, expected {list(FIELDS)}")
        elif not r["prompt"] or not r["completion"]:
            bad.append(f"{r['id']}: empty prompt or completion")
        elif r["prompt"] + r["completion"] != r["text"]:
            bad.append(f"{r['id']}: prompt + completion != text")
    for key in ("id", "text"):
        values = [r.get(key) for r in rs]
        if len(set(values)) != len(values):
            bad.append(f"repeated {key}s")
    return bad


def render() -> dict[str, str]:
    """File name -> JSONL content of the three built-in tasks."""
    tasks = {
        "arithmetic.jsonl": rows("arith", arithmetic_problems()),
        "python_code.jsonl": rows("code", python_functions()),
        "geography.jsonl": rows("geo", geography_facts()),
    }
    return {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs) for name, rs in tasks.items()}


def token_length_problems(tokenizer) -> list[str]:
    """Samples whose token count (with `tokenizer`) falls outside [MIN_TOKENS, MAX_TOKENS]."""
    bad = []
    for name, content in render().items():
        for line in content.splitlines():
            row = json.loads(line)
            n = len(tokenizer(row["text"]).input_ids)
            if not MIN_TOKENS <= n <= MAX_TOKENS:
                bad.append(f"{name} {row['id']}: {n} tokens")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify the committed files and token lengths; write nothing")
    args = ap.parse_args(argv)
    files = render()
    if args.check:
        stale = [n for n, c in files.items() if not (HERE / n).is_file() or (HERE / n).read_text(encoding="utf-8") != c]
        # the committed rows themselves (a hand edit that --check would otherwise only call stale)
        split = [f"{n} {msg}" for n in files if (HERE / n).is_file()
                 for msg in row_problems([json.loads(line) for line in (HERE / n).read_text(encoding="utf-8").splitlines()])]
        from qkov.pipeline.spec import ModelSpec
        from qkov.workers.models import load_tokenizer

        bad = token_length_problems(load_tokenizer(ModelSpec(name="smollm2-135m")))
        for msg in [f"{n} is out of date: run python -m qkov.pipeline.data.make_tasks" for n in stale] + split + bad:
            print(msg, file=sys.stderr)
        return 1 if stale or split or bad else 0
    for name, content in files.items():
        (HERE / name).write_text(content, encoding="utf-8")
        print(f"wrote {HERE / name} ({content.count(chr(10))} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
