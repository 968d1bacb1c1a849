"""Write the two sample tasks of prompt evolution (deterministic; nothing downloaded).

    python examples/tasks/make_sample_tasks.py        # rewrites the files next to this script

* commonsense_mc.jsonl — 300 multiple-choice commonsense questions (choices A–E, expected = the
  right label), composed from small hand-written fact tables (where things are kept, what
  tools are for, what follows from an everyday situation, what people feel, what things are
  made of), with the choices shuffled by a seeded generator;
* sentiment.csv — 300 short reviews/posts labelled positive or negative, composed from
  hand-written subjects, opinion phrases and endings;
* commonsense_mc.prompt.txt, sentiment.prompt.txt — the static starting prompts.

The same script always writes the same bytes (random.Random(seed) only).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = "ABCDE"

# (thing, where it is usually kept)
PLACES = [
    ("milk", "a refrigerator"), ("a toothbrush", "a bathroom"), ("a car", "a garage"), ("books", "a bookshelf"),
    ("frozen peas", "a freezer"), ("winter coats", "a closet"), ("a pillow", "a bed"), ("letters", "a mailbox"),
    ("cutlery", "a kitchen drawer"), ("a lawn mower", "a shed"), ("medicine", "a medicine cabinet"),
    ("firewood", "a woodpile"), ("cash", "a wallet"), ("shoes", "a shoe rack"), ("dirty laundry", "a hamper"),
    ("a spare tire", "a car trunk"), ("jewellery", "a jewellery box"), ("plates", "a cupboard"),
    ("seeds", "a garden shed"), ("a passport", "a drawer at home"), ("fish", "an aquarium"),
    ("paintings", "a museum"), ("airplanes", "a hangar"), ("wine", "a cellar"), ("bread", "a bread box"),
]
PLACE_DISTRACTORS = ["an oven", "a swimming pool", "a parking meter", "the roof", "a volcano", "a desert",
                     "a washing machine", "the ceiling", "a bus stop", "a chimney", "a sandbox", "a fountain"]

# (tool, what it is used for)
TOOLS = [
    ("a hammer", "driving nails"), ("scissors", "cutting paper"), ("a ladder", "reaching high places"),
    ("an umbrella", "staying dry in the rain"), ("a thermometer", "measuring temperature"),
    ("a broom", "sweeping the floor"), ("a kettle", "boiling water"), ("a map", "finding the way"),
    ("a key", "opening a lock"), ("a spoon", "eating soup"), ("glue", "sticking things together"),
    ("a flashlight", "seeing in the dark"), ("a towel", "drying off"), ("a pen", "writing a note"),
    ("a shovel", "digging a hole"), ("a clock", "telling the time"), ("a needle", "sewing a button"),
    ("a bicycle pump", "inflating a tyre"), ("a calculator", "doing arithmetic"), ("sunscreen", "avoiding sunburn"),
    ("a fridge magnet", "holding a note on the fridge"), ("a rake", "gathering leaves"),
    ("a stapler", "joining sheets of paper"), ("a whisk", "beating eggs"), ("a compass", "finding north"),
]
TOOL_DISTRACTORS = ["painting the sky", "growing taller", "speaking French", "predicting the lottery",
                    "melting ice cubes faster", "teaching a cat to read", "making it rain", "charging a phone",
                    "flying to the moon", "cooling the sun", "learning to swim", "stopping time"]

# (situation, what most likely happens next / why)
EFFECTS = [
    ("leaves ice cream in the sun", "it melts"), ("forgets to water a plant for weeks", "it wilts"),
    ("stays up all night", "they feel tired the next day"), ("drops a glass on a tile floor", "it breaks"),
    ("runs a marathon", "their legs are sore"), ("skips lunch", "they get hungry"),
    ("leaves the front door open in winter", "the house gets cold"), ("eats very spicy food", "their mouth burns"),
    ("forgets their umbrella on a rainy day", "they get wet"), ("puts too much salt in the soup", "it tastes salty"),
    ("leaves bread out for two weeks", "it goes mouldy"), ("plants seeds and waters them", "they sprout"),
    ("studies hard for an exam", "they are more likely to pass"), ("turns off the lights", "the room gets dark"),
    ("leaves a car's lights on overnight", "the battery runs flat"), ("shouts in a quiet library", "people stare"),
    ("presses the elevator button", "the elevator comes"), ("boils an egg for ten minutes", "it becomes hard"),
    ("stands in the rain without a coat", "they get soaked"), ("heats water to 100 degrees", "it boils"),
    ("drops a ball from a window", "it falls to the ground"), ("adds sugar to tea", "it tastes sweeter"),
    ("forgets to charge a phone", "the phone turns off"), ("opens a window on a windy day", "papers blow around"),
    ("puts a metal spoon in the microwave", "it sparks"),
]
EFFECT_DISTRACTORS = ["it turns into gold", "the moon goes dark", "they become invisible", "it starts to sing",
                      "the neighbours move away", "it grows wings", "they forget their name",
                      "it becomes a different colour forever", "the sun sets early", "it doubles in size",
                      "the street floods", "it learns to talk"]

# (situation, how the person most likely feels)
FEELINGS = [
    ("wins a prize", "happy"), ("loses their keys", "frustrated"), ("hears a strange noise at night", "scared"),
    ("gets a surprise birthday party", "delighted"), ("misses the last bus home", "annoyed"),
    ("sees an old friend after years", "glad"), ("fails a driving test", "disappointed"),
    ("finishes a long project", "relieved"), ("is praised by their boss", "proud"),
    ("waits two hours at the doctor's", "impatient"), ("is given a puppy", "excited"),
    ("loses a close game", "disappointed"), ("is alone in a dark forest", "afraid"),
    ("burns the dinner for guests", "embarrassed"), ("gets a good grade", "pleased"),
]
FEELING_DISTRACTORS = ["sleepy", "hungry", "bored", "confused", "jealous", "indifferent", "nostalgic", "sick",
                       "thirsty", "cold", "amused", "curious"]

# (object, what it is usually made of)
MATERIALS = [
    ("a window pane", "glass"), ("a candle", "wax"), ("a wooden spoon", "wood"), ("a T-shirt", "cotton"),
    ("a nail", "metal"), ("a tyre", "rubber"), ("a brick", "clay"), ("a notebook", "paper"),
    ("a water bottle", "plastic"), ("a wedding ring", "gold"), ("a sweater", "wool"), ("a snowman", "snow"),
]
MATERIAL_DISTRACTORS = ["cheese", "feathers", "smoke", "sand", "chocolate", "ice", "soap", "string", "leaves",
                        "bread", "water", "air"]

NAMES = ["Sam", "Alex", "Maria", "John", "Priya", "Chen", "Fatima", "Lucas", "Emma", "Kofi", "Yuki", "Omar"]

QUESTION_FORMS = {
    "place": ["Where would you usually keep {x}?", "Where is {x} most likely to be found at home or nearby?",
              "If you were looking for {x}, where would you look first?",
              "Someone needs {x}. Which place should they check?"],
    "tool": ["What is {x} mostly used for?", "Why would someone pick up {x}?", "{X} is a tool for what?",
             "Which task is {x} best suited for?"],
    "effect": ["{n} {x}. What most likely happens?", "What is the most likely result when {n} {x}?",
               "{n} {x}. What happens next?", "Suppose {n} {x}. What is the likely consequence?"],
    "feeling": ["{n} {x}. How does {n} most likely feel?", "How would someone feel if they {x}?"],
    "material": ["What is {x} usually made of?", "Which material is {x} most often made from?"],
}


def _mc(rng: random.Random, question: str, right: str, pool: list[str], others: list[str]) -> tuple[list[str], str]:
    wrong = rng.sample([o for o in others + pool if o != right], 4)
    options = wrong + [right]
    rng.shuffle(options)
    return options, LABELS[options.index(right)]


def commonsense_rows(n: int = 300, seed: int = 15) -> list[dict]:
    rng = random.Random(seed)
    tables = [("place", PLACES, PLACE_DISTRACTORS), ("tool", TOOLS, TOOL_DISTRACTORS),
              ("effect", EFFECTS, EFFECT_DISTRACTORS), ("feeling", FEELINGS, FEELING_DISTRACTORS),
              ("material", MATERIALS, MATERIAL_DISTRACTORS)]
    candidates = []
    for kind, facts, distractors in tables:
        answers = [a for _, a in facts]
        for x, right in facts:
            for form in QUESTION_FORMS[kind]:
                candidates.append((kind, form, x, right, distractors, answers))
    rng.shuffle(candidates)
    rows, seen = [], set()
    for kind, form, x, right, distractors, answers in candidates:
        name = rng.choice(NAMES)
        question = form.format(x=x, X=x[0].upper() + x[1:], n=name)
        if question in seen:
            continue
        seen.add(question)
        options, label = _mc(rng, question, right, distractors, [a for a in answers if a != right])
        rows.append({"example_id": f"cs{len(rows) + 1:04d}", "input": question,
                     "choices": [f"{lb}) {opt}" for lb, opt in zip(LABELS, options)], "expected": label,
                     "metadata": {"kind": kind}})
        if len(rows) == n:
            break
    return rows


SUBJECTS = ["the pizza", "this phone", "the hotel room", "the new album", "the movie", "our waiter",
            "the delivery", "this laptop", "the concert", "the customer service", "the coffee", "the train ride",
            "the museum tour", "this book", "the app update", "the haircut", "the playground", "the headphones",
            "the yoga class", "the rental car"]
POSITIVE = ["was absolutely wonderful", "exceeded every expectation", "made my whole week", "was a real delight",
            "works perfectly", "was friendly and fast", "is worth every penny", "felt cosy and clean",
            "was fun from start to finish", "was better than I hoped"]
NEGATIVE = ["was a complete disappointment", "broke after two days", "ruined my evening", "was cold and bland",
            "is a waste of money", "was rude and slow", "felt dirty and cramped", "kept crashing",
            "was boring from start to finish", "was worse than I feared"]
POS_END = ["Highly recommend!", "Will come back.", "Loved it.", "Five stars.", "So happy with it.", ""]
NEG_END = ["Never again.", "Avoid.", "One star.", "Really annoyed.", "I want a refund.", ""]


def sentiment_rows(n: int = 300, seed: int = 16) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        positive = rng.random() < 0.5
        subject = rng.choice(SUBJECTS)
        phrase = rng.choice(POSITIVE if positive else NEGATIVE)
        end = rng.choice(POS_END if positive else NEG_END)
        text = f"{subject[0].upper() + subject[1:]} {phrase}. {end}".strip()
        if text in seen:
            continue
        seen.add(text)
        rows.append({"example_id": f"se{len(rows) + 1:04d}", "input": text,
                     "expected": "positive" if positive else "negative"})
    return rows


COMMONSENSE_PROMPT = "You are a friendly assistant who loves to chat.\nAnswer the following multiple-choice question.\n"
SENTIMENT_PROMPT = "Classify the sentiment of the text as positive or negative.\n"


def main() -> None:
    with (HERE / "commonsense_mc.jsonl").open("w", encoding="utf-8", newline="\n") as f:
        for row in commonsense_rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with (HERE / "sentiment.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["example_id", "input", "expected"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(sentiment_rows())
    (HERE / "commonsense_mc.prompt.txt").write_text(COMMONSENSE_PROMPT, encoding="utf-8")
    (HERE / "sentiment.prompt.txt").write_text(SENTIMENT_PROMPT, encoding="utf-8")


if __name__ == "__main__":
    main()
