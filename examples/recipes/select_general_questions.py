"""Writes src/posttrain/evals/data/general_questions.jsonl: the general questions the base model answers right.

The candidates below were written for posttrain: short general-knowledge questions (geography, science, everyday
facts, arithmetic, language, history) with every acceptable short answer spelled out. The script answers each one
greedily with the embedded base model (SmolLM2-135M-Instruct, ``smollm2-135m``; 48 new tokens, the ``evals:``
default) and keeps those whose answer mentions an accepted answer (``posttrain.evals.scoring.answers_correctly``:
whole words, case-insensitive, after ``fold()``). ``general/accuracy`` then starts at 1.0 for the base model and
measures what a post-trained model forgot.

``EXCLUDED`` lists the questions dropped by eye after reading the model's answers: ones where a wrong answer could
mention an accepted answer by accident (a number that also appears in the question or in a wrong working, a name
that also occurs in unrelated text).

Run from the repository root (about 30 s on two CPU cores; the file is checked in):

    .venv/bin/python examples/recipes/select_general_questions.py            # writes the jsonl
    .venv/bin/python examples/recipes/select_general_questions.py --show     # also prints every answer
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SUFFIX = " Answer in a few words."

# (question, accepted answers)
CANDIDATES: list[tuple[str, list[str]]] = [
    # geography
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]),
    ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Spain?", ["Madrid"]),
    ("What is the capital of the United Kingdom?", ["London"]),
    ("What is the capital of Russia?", ["Moscow"]),
    ("What is the capital of Egypt?", ["Cairo"]),
    ("What is the capital of Canada?", ["Ottawa"]),
    ("What is the capital of China?", ["Beijing", "Peking"]),
    ("What is the capital of Greece?", ["Athens"]),
    ("What is the largest ocean on Earth?", ["Pacific", "Pacific Ocean"]),
    ("What is the longest river in Africa?", ["Nile", "the Nile", "Nile River"]),
    ("On which continent is Brazil?", ["South America"]),
    ("What is the tallest mountain in the world?", ["Everest", "Mount Everest", "Mt Everest"]),
    ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("Which country is home to kangaroos?", ["Australia"]),
    ("In which city is the Eiffel Tower?", ["Paris"]),
    ("Which country is called the Land of the Rising Sun?", ["Japan"]),
    ("What is the largest continent?", ["Asia"]),
    ("In which city is the Statue of Liberty?", ["New York", "New York City", "NYC"]),
    # science
    ("What is the chemical formula for water?", ["H2O"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("Which planet is closest to the Sun?", ["Mercury"]),
    ("Which gas do plants take in from the air for photosynthesis?", ["carbon dioxide", "CO2"]),
    ("Which gas do people need to breathe in to stay alive?", ["oxygen", "O2"]),
    ("What is the chemical symbol for gold?", ["Au"]),
    ("What is the chemical symbol for sodium?", ["Na"]),
    ("At what temperature in degrees Celsius does water freeze?", ["0", "zero"]),
    ("At what temperature in degrees Celsius does water boil at sea level?", ["100", "one hundred"]),
    ("How many planets are in our solar system?", ["8", "eight"]),
    ("Which star is at the centre of our solar system?", ["Sun", "the Sun", "Sol"]),
    ("What force pulls objects towards the Earth?", ["gravity", "gravitation", "gravitational force"]),
    ("Which organ pumps blood around the body?", ["heart", "the heart"]),
    ("What is the hardest natural substance?", ["diamond", "diamonds"]),
    ("What is the largest organ of the human body?", ["skin", "the skin"]),
    ("What sweet food do bees make?", ["honey"]),
    ("What does a caterpillar turn into?", ["butterfly", "butterflies", "moth", "moths"]),
    ("Which element has the chemical symbol O?", ["oxygen"]),
    ("How many bones are in the adult human body?", ["206", "two hundred and six", "two hundred six"]),
    ("Which gas makes up most of the Earth's atmosphere?", ["nitrogen", "N2"]),
    ("What green pigment do plants use to capture sunlight?", ["chlorophyll"]),
    ("What is the largest mammal?", ["blue whale", "blue whales"]),
    ("What is the fastest land animal?", ["cheetah", "cheetahs"]),
    ("What is the common name for H2O?", ["water"]),
    ("What is the natural satellite of the Earth called?", ["Moon", "the Moon", "Luna"]),
    # everyday facts
    ("How many days are there in a week?", ["7", "seven"]),
    ("How many months are there in a year?", ["12", "twelve"]),
    ("How many hours are there in a day?", ["24", "twenty-four"]),
    ("How many minutes are there in an hour?", ["60", "sixty"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("How many legs does a dog have?", ["4", "four"]),
    ("What colour do you get when you mix blue and yellow paint?", ["green"]),
    ("What colour is the sky on a clear, sunny day?", ["blue"]),
    ("What is frozen water called?", ["ice"]),
    ("How many sides does a triangle have?", ["3", "three"]),
    ("How many sides does a hexagon have?", ["6", "six"]),
    ("Which month comes after March?", ["April"]),
    ("Which day comes after Monday?", ["Tuesday"]),
    ("How many days are there in a leap year?", ["366", "three hundred and sixty-six", "three hundred sixty-six"]),
    ("What colour is a ripe banana?", ["yellow"]),
    ("Which farm animal says 'moo'?", ["cow", "cows", "cattle"]),
    ("What is the meal eaten in the morning called?", ["breakfast"]),
    ("How many cents are in one US dollar?", ["100", "one hundred"]),
    ("How many continents are there?", ["7", "seven"]),
    # arithmetic
    ("What is 2 + 2?", ["4", "four"]),
    ("What is 5 + 3?", ["8", "eight"]),
    ("What is 10 - 4?", ["6", "six"]),
    ("What is 3 times 4?", ["12", "twelve"]),
    ("What is 9 + 10?", ["19", "nineteen"]),
    ("What is 50 divided by 5?", ["10", "ten"]),
    ("What is 7 times 8?", ["56", "fifty-six"]),
    ("What is half of 20?", ["10", "ten"]),
    ("What is 15 + 15?", ["30", "thirty"]),
    ("What is the square root of 81?", ["9", "nine"]),
    ("What is 6 + 7?", ["13", "thirteen"]),
    # language
    ("What is the opposite of 'hot'?", ["cold"]),
    ("What is the plural of 'mouse'?", ["mice"]),
    ("What is the opposite of 'up'?", ["down"]),
    ("What is the past tense of 'go'?", ["went"]),
    ("Which language is mainly spoken in Brazil?", ["Portuguese"]),
    ("Which language is mainly spoken in France?", ["French"]),
    ("How do you say 'hello' in Spanish?", ["hola"]),
    ("What is a baby cat called?", ["kitten", "kittens"]),
    ("What is a baby dog called?", ["puppy", "puppies", "pup"]),
    ("How many letters are in the English alphabet?", ["26", "twenty-six"]),
    ("What is the opposite of 'big'?", ["small", "little", "tiny"]),
    # history and culture
    ("Who was the first President of the United States?", ["George Washington", "Washington"]),
    ("Who wrote 'Romeo and Juliet'?", ["Shakespeare", "William Shakespeare"]),
    ("Who painted the Mona Lisa?", ["Leonardo da Vinci", "da Vinci", "Leonardo"]),
    ("In which year did World War II end?", ["1945"]),
    ("Who was the first person to walk on the Moon?", ["Neil Armstrong", "Armstrong"]),
    ("Who discovered penicillin?", ["Alexander Fleming", "Fleming"]),
    ("Which scientist developed the theory of relativity?", ["Einstein", "Albert Einstein"]),
    ("Which ship sank in 1912 after hitting an iceberg?", ["Titanic", "RMS Titanic"]),
    ("In which country did the ancient Olympic Games begin?", ["Greece"]),
    ("Who wrote the Harry Potter books?", ["J.K. Rowling", "Rowling"]),
    ("What is the currency of Japan?", ["yen"]),
    ("Who invented the telephone?", ["Alexander Graham Bell", "Graham Bell"]),
    ("Which musical instrument has 88 keys?", ["piano"]),
]

# Dropped by eye (see the module docstring): questions whose scoring could be fooled.
EXCLUDED: dict[str, str] = {
    "Which gas do plants take in from the air for photosynthesis?":
        "a wrong answer ('plants take in oxygen and give out carbon dioxide') names the accepted answer",
    "Which gas makes up most of the Earth's atmosphere?":
        "the base model lists several gases (wrongly led by carbon dioxide), nitrogen among them",
    "What is the common name for H2O?": "'water' is echoed by confused answers ('the common name for water is H2O')",
    "What is frozen water called?": "'ice' occurs in descriptions that do not answer ('a liquid frozen into ice')",
    "How many legs does a spider have?": "a wrong answer ('six legs and eight eyes') can mention 8",
    "Who painted the Mona Lisa?":
        "'Leonardo da Vinci's Mona Lisa' is a set phrase; the base model names him and then credits Michelangelo",
    "Which scientist developed the theory of relativity?":
        "'Einstein's theory of relativity' is a set phrase; the base model names him and then credits Bohr",
}

OUT = Path(__file__).resolve().parents[2] / "src" / "posttrain" / "evals" / "data" / "general_questions.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--show", action="store_true", help="print every question, answer and verdict")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from posttrain.evals.scoring import answers_correctly
    from posttrain.generation import SamplingConfig, generate
    from posttrain.models.adapters import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m", None, False)
    prompts = [q + SUFFIX for q, _ in CANDIDATES]
    answers = generate(model, tok, [[{"role": "user", "content": p}] for p in prompts],
                       SamplingConfig(max_new_tokens=48, temperature=0.0), batch_size=16)
    kept = []
    for (q, accepted), prompt, answer in zip(CANDIDATES, prompts, answers, strict=True):
        right = answers_correctly(answer, accepted)
        verdict = "EXCLUDED" if q in EXCLUDED else ("right" if right else "wrong")
        if args.show:
            print(f"[{verdict}] {q} {accepted}\n    -> {answer!r}")
        if right and q not in EXCLUDED:
            kept.append({"prompt": prompt, "answers": accepted})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for row in kept:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    n_right = sum(answers_correctly(a, acc) for (_, acc), a in zip(CANDIDATES, answers))
    print(f"{len(CANDIDATES)} candidates, {n_right} answered right, {len(kept)} kept "
          f"({len(EXCLUDED)} excluded by eye) -> {args.out}")


if __name__ == "__main__":
    main()
