"""A seeded English grammar that ships with the package (word pools x sentence patterns):
statements and everyday questions (`sentence_stream`), general-knowledge questions for an instruct
LLM (`question_stream`), and EVERYDAY, sentences written by hand outside every pattern (held out
from training, to measure whether a model learned speech rather than the training text's patterns).

It varies the sentence shape but knows 443 word types only: an adaptor trained on it alone learns
those words and nothing else (`textsource` mixes it with broad English and takes distinct rows).
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import numpy as np

NAMES = ("Anna", "Ben", "Carlos", "Diana", "Emma", "Frank", "Grace", "Henry", "Isabel", "Jack", "Karen", "Leo",
         "Maria", "Nathan", "Olivia", "Peter", "Rachel", "Sam", "Tina", "Victor", "William", "Zoe", "Laura", "Omar")
PEOPLE = ("my sister", "my brother", "the teacher", "our neighbor", "the doctor", "my friend", "the old man",
          "a young woman", "the driver", "my mother", "my father", "the baker", "the children", "the students",
          "the manager", "a little boy", "the nurse", "my cousin", "the farmer", "our guests")
PLACES = ("the park", "the station", "the library", "the market", "the office", "the beach", "the kitchen",
          "the garden", "the hospital", "the school", "the museum", "the airport", "the river", "the city center",
          "the mountains", "the village", "the bakery", "the cinema", "the hotel", "the restaurant")
CITIES = ("London", "Paris", "Tokyo", "Berlin", "Madrid", "Rome", "Chicago", "Boston", "Sydney", "Toronto",
          "Dublin", "Vienna", "Cairo", "Seattle", "Denver", "Lisbon")
TIMES = ("this morning", "yesterday", "last night", "on Monday", "every weekend", "after lunch", "before dinner",
         "last summer", "next week", "tomorrow", "at noon", "in the evening", "on Friday", "early today",
         "later tonight", "in the spring")
THINGS = ("a red bicycle", "the blue umbrella", "some fresh bread", "a cup of coffee", "the newspaper",
          "a heavy box", "the car keys", "a birthday cake", "two tickets", "a new phone", "the green jacket",
          "a basket of apples", "the map", "a small dog", "a bottle of water", "the old piano", "three books",
          "a warm blanket", "the garden chairs", "a bag of rice", "the kitchen table", "a pair of shoes",
          "a letter", "some flowers", "the computer", "a sandwich", "the window", "a guitar")
PAST = ("bought", "found", "carried", "painted", "cleaned", "sold", "borrowed", "fixed", "lost", "brought",
        "ordered", "washed", "opened", "moved", "packed", "picked up", "dropped", "delivered")
BASE = ("buy", "find", "carry", "paint", "clean", "sell", "borrow", "fix", "bring", "order", "wash", "open",
        "move", "pack", "pick up", "deliver", "check", "visit")
MOTION = ("walked to", "drove to", "ran to", "went to", "cycled to", "hurried to", "came back from", "arrived at",
          "stayed at", "waited at")
ADJ = ("quiet", "busy", "cold", "warm", "bright", "crowded", "beautiful", "noisy", "empty", "clean", "expensive",
       "cheap", "small", "large", "friendly", "dark", "sunny", "windy", "comfortable", "famous")
FEELINGS = ("happy", "tired", "hungry", "nervous", "excited", "surprised", "worried", "calm", "bored", "proud")
WEATHER = ("rain", "snow", "be sunny", "be windy", "get colder", "be cloudy", "get warmer", "be foggy")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "fifteen", "twenty",
           "thirty", "forty", "fifty", "a hundred")
UNITS = ("minutes", "hours", "days", "weeks", "dollars", "miles", "people", "pages", "kilometers", "euros")
JOBS = ("cook", "write", "swim", "sing", "dance", "drive", "read", "paint", "run", "study", "work", "travel")

_STATEMENTS = (
    "{person} {past} {thing} {time}.",
    "{name} {motion} {place} {time}.",
    "{Person} {past} {thing} at {place}.",
    "{name} said that {place} was very {adj} {time}.",
    "I think it will {weather} {time}.",
    "{name} and {name2} {motion} {place} together.",
    "We waited for {number} {unit} at {place}.",
    "{Person} felt {feeling} after the long day.",
    "The train to {city} leaves in {number} minutes.",
    "{name} wants to {base} {thing} before {time2}.",
    "It took {number} {unit} to get to {city}.",
    "{Person} likes to {job} {time}.",
    "The room at {place} was {adj} and {adj2}.",
    "I need to {base} {thing} {time}.",
    "{name} has lived in {city} for {number} years.",
    "There were {number} people at {place} {time}.",
    "{name} forgot {thing} at {place}.",
    "Please {base} {thing} for {name}.",
    "Don't forget to {base} {thing} {time}.",
    "My favorite place in {city} is {place}.",
)
_QUESTIONS_ASR = (
    "Did {name} {base} {thing} {time}?",
    "Where did {person} put {thing}?",
    "How long does it take to get to {city}?",
    "Can you {base} {thing} for me?",
    "Why was {place} so {adj} {time}?",
    "Is {name} going to {city} {time}?",
    "When does {place} open on Sunday?",
    "Have you seen {thing} anywhere?",
)

# Questions a small instruct LLM answers from general knowledge: the spoken-question set.
COUNTRIES = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
             "Canada": "Ottawa", "Egypt": "Cairo", "Australia": "Canberra", "Portugal": "Lisbon",
             "Ireland": "Dublin", "Austria": "Vienna", "Greece": "Athens", "Norway": "Oslo", "Mexico": "Mexico City",
             "China": "Beijing", "Russia": "Moscow", "Kenya": "Nairobi", "Peru": "Lima", "Sweden": "Stockholm"}
ANIMALS = ("a cat", "a dog", "an elephant", "a spider", "a bird", "a horse", "a cow", "a bee", "a fish", "a lion",
           "a penguin", "a frog", "a rabbit", "a snake", "a dolphin", "an owl")
FOODS = ("bread", "cheese", "pizza", "a salad", "pancakes", "rice", "soup", "an omelette", "a cake", "pasta",
         "cookies", "tea", "lemonade", "a smoothie")
TOPICS = ("sleeping better", "saving money", "learning a new language", "staying healthy", "reducing stress",
          "studying for an exam", "making friends", "keeping a plant alive", "writing a good email",
          "waking up early", "staying focused", "cooking for the first time", "running a marathon",
          "traveling on a budget", "keeping a house clean")
THINGS_Q = ("the sun", "the moon", "rain", "a rainbow", "the ocean", "a volcano", "a computer", "the internet",
            "a battery", "a tree", "a cloud", "an airplane", "a bicycle", "music", "a library", "a river")
_QUESTIONS = (
    "What is the capital of {country}?",
    "Can you tell me the capital city of {country}?",
    "What does {animal} eat?",
    "Where does {animal} live?",
    "How do you make {food}?",
    "Give me one tip for {topic}.",
    "What are some good ways of {topic}?",
    "What is {thing_q}?",
    "Can you explain what {thing_q} is?",
    "Why is {thing_q} important?",
    "What is a good name for {animal}?",
    "Describe {animal} in one sentence.",
    "What is the weather usually like in {city}?",
    "Tell me something interesting about {city}.",
    "What should I visit in {city}?",
    "What is the opposite of {adj}?",
    "What does the word {adj} mean?",
    "What should I cook for dinner with {food}?",
    "Write a short poem about {thing_q}.",
    "What is {number} plus {number2}?",
)

# Everyday sentences written by hand, outside every pattern above: held out from training.
EVERYDAY = (
    "Could you turn the music down a little?",
    "I'm running late, so start the meeting without me.",
    "The coffee machine on the third floor is broken again.",
    "She finally finished reading that novel over the holidays.",
    "Let's meet in front of the theater at seven thirty.",
    "My phone battery always dies in the middle of the afternoon.",
    "He promised to call his grandmother on her birthday.",
    "The kids built a sandcastle near the water.",
    "We ran out of milk, so I will stop by the store.",
    "Honestly, that was the best soup I have ever tasted.",
    "Please remember to lock the back door when you leave.",
    "The flight was delayed because of a storm over the ocean.",
    "I usually take the bus, but today I walked to work.",
    "Our team won the match in the last minute.",
    "It is too hot to sit outside this afternoon.",
    "They are planning a surprise party for their teacher.",
    "Can I borrow your charger for a few minutes?",
    "The museum is free for students on Wednesdays.",
    "I left my glasses somewhere in the living room.",
    "Thank you so much for helping me move last weekend.",
    "The baby finally fell asleep after a long walk.",
    "Turn left at the second traffic light and keep going straight.",
    "This printer only works when nobody is watching it.",
    "My brother is learning to play the drums, and the neighbors are not happy.",
    "We should probably book the hotel before the prices go up.",
    "The soup needs a bit more salt and some pepper.",
    "I haven't seen that movie yet, so please don't tell me the ending.",
    "The garden looks lovely after all that rain.",
    "Every morning she jogs around the lake with her dog.",
    "Dinner will be ready in about twenty minutes.",
)

_SLOTS: dict[str, Callable[[np.random.Generator], str]] = {}


def _pick(pool):
  return lambda rng: pool[int(rng.integers(len(pool)))]


_SLOTS.update(name=_pick(NAMES), name2=_pick(NAMES), person=_pick(PEOPLE), place=_pick(PLACES), city=_pick(CITIES),
              time=_pick(TIMES), time2=_pick(TIMES), thing=_pick(THINGS), past=_pick(PAST), base=_pick(BASE),
              motion=_pick(MOTION), adj=_pick(ADJ), adj2=_pick(ADJ), feeling=_pick(FEELINGS),
              weather=_pick(WEATHER), number=_pick(NUMBERS), number2=_pick(NUMBERS), unit=_pick(UNITS),
              job=_pick(JOBS), country=_pick(tuple(COUNTRIES)), animal=_pick(ANIMALS), food=_pick(FOODS),
              topic=_pick(TOPICS), thing_q=_pick(THINGS_Q))
_SLOTS["Person"] = lambda rng: _SLOTS["person"](rng).capitalize()


def _fill(pattern: str, rng: np.random.Generator) -> str:
  text = re.sub(r"\{(\w+)\}", lambda m: _SLOTS[m.group(1)](rng), pattern)
  return text[0].upper() + text[1:]


def _stream(patterns, seed: int) -> Iterator[str]:
  rng = np.random.default_rng(seed)
  while True:
    yield _fill(patterns[int(rng.integers(len(patterns)))], rng)


def sentence_stream(seed: int) -> Iterator[str]:
  """Endless seeded statements and everyday questions, repeats included."""
  return _stream(_STATEMENTS + _QUESTIONS_ASR, seed)


def question_stream(seed: int) -> Iterator[str]:
  """Endless seeded general-knowledge questions and requests, repeats included."""
  return _stream(_QUESTIONS, seed)
