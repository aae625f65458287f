#!/usr/bin/env python3
"""Writes short-instructions.jsonl: 320 short, varied instructions for distillation experiments
(the soft-label experiment in the README uses them). Deterministic: the same file every run.

    python3 prompts/make_short_instructions.py > prompts/short-instructions.jsonl
"""
import json
import random

rng = random.Random(20261204)
rows = []


def add(kind, prompt, **meta):
    rows.append({"id": f"{kind}-{sum(r['id'].startswith(kind + '-') for r in rows) + 1:03d}", "prompt": prompt,
                 "metadata": {"kind": kind, **meta}})


# Arithmetic word problems with their answers (80).
names = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jon", "Kira", "Leo"]
things = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells"]
for _ in range(80):
    n, t = rng.choice(names), rng.choice(things)
    form = rng.randrange(4)
    a, b = rng.randint(3, 60), rng.randint(2, 25)
    if form == 0:
        add("math", f"{n} has {a} {t} and buys {b} more. How many {t} does {n} have now?", answer=str(a + b))
    elif form == 1:
        a = a + b
        add("math", f"{n} had {a} {t} and gave away {b}. How many {t} are left?", answer=str(a - b))
    elif form == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        add("math", f"There are {a} boxes with {b} {t} in each box. How many {t} are there in total?", answer=str(a * b))
    else:
        b = rng.randint(2, 9)
        q = rng.randint(2, 12)
        add("math", f"{n} shares {b * q} {t} equally among {b} friends. How many {t} does each friend get?", answer=str(q))

# Capitals (40).
capitals = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Austria": "Vienna", "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "India": "New Delhi", "China": "Beijing", "Russia": "Moscow", "Mexico": "Mexico City", "Brazil": "Brasília",
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Switzerland": "Bern", "Morocco": "Rabat", "Nigeria": "Abuja",
    "Colombia": "Bogotá", "South Korea": "Seoul",
}
for country, city in capitals.items():
    add("capital", f"What is the capital of {country}?", answer=city)

# Definitions (40).
words = ["gravity", "democracy", "volcano", "photosynthesis", "metaphor", "inflation", "glacier", "vaccine",
         "algorithm", "ecosystem", "friction", "molecule", "orbit", "harvest", "rhythm", "erosion", "symphony",
         "telescope", "bacteria", "recipe", "tax", "library", "compass", "oxygen", "poem", "bridge", "election",
         "desert", "memory", "habit", "currency", "planet", "island", "language", "muscle", "thunder", "museum",
         "password", "battery", "calendar"]
for w in words:
    add("define", f"Explain what {'an' if w[0] in 'aeiou' else 'a'} {w} is in one sentence." if w not in
        ("gravity", "democracy", "photosynthesis", "inflation", "friction", "oxygen", "erosion", "bacteria",
         "memory", "thunder") else f"Explain what {w} is in one sentence.")

# Synonyms and antonyms (40).
pairs = ["happy", "fast", "big", "cold", "bright", "quiet", "strong", "easy", "old", "rich", "brave", "early",
         "clean", "soft", "heavy", "wide", "angry", "kind", "simple", "empty"]
for w in pairs:
    add("synonym", f"Give one synonym for the word \"{w}\".")
    add("antonym", f"What is the opposite of \"{w}\"?")

# Lists (40).
groups = ["fruits", "vegetables", "colors", "farm animals", "musical instruments", "planets", "sports",
          "kitchen tools", "birds", "flowers", "trees", "countries in Europe", "programming languages", "metals",
          "ocean animals", "board games", "types of weather", "parts of a car", "school subjects", "desserts"]
for g in groups:
    add("list", f"Name three {g}.")
    add("list", f"List five {g}, separated by commas.")

# Sentences with a word (40).
for w in rng.sample(words + pairs, 40):
    add("sentence", f"Write one short sentence that uses the word \"{w}\".")

# Everyday questions (40).
questions = [
    "Why do we need to sleep?", "How do plants drink water?", "Why is the ocean salty?", "How does a rainbow form?",
    "Why do leaves change color in autumn?", "What makes a good friend?", "How can I save energy at home?",
    "Why should we drink water every day?", "How do bees make honey?", "Why does ice float on water?",
    "What is the fastest land animal?", "How many days are in a leap year?", "What do cows eat?",
    "Why do cats purr?", "How do airplanes stay in the air?", "What is the boiling point of water in Celsius?",
    "Why is exercise good for you?", "How do you make a cup of tea?", "What is the largest ocean on Earth?",
    "Why do we have day and night?", "How do magnets work?", "What is the tallest mountain in the world?",
    "How many legs does a spider have?", "Why do birds migrate?", "What does a thermometer measure?",
    "How do you plant a seed?", "Why is the moon visible during the day sometimes?", "What is a healthy breakfast?",
    "How does recycling help the planet?", "Why do we brush our teeth?", "What is the main ingredient of bread?",
    "How many continents are there?", "Why does a ball fall down when you drop it?", "What is a noun?",
    "How do fish breathe underwater?", "Why do people wear seat belts?", "What is the freezing point of water?",
    "How do you say thank you politely in an email?", "What is the longest river in Africa?",
    "Why do we see lightning before we hear thunder?",
]
for q in questions:
    add("question", q)

assert len(rows) == 320, len(rows)
for r in rows:
    print(json.dumps(r, ensure_ascii=False))
